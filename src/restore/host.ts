/**
 * The restore host (`shm-restore`): keeps a program's shared memory alive across crashes,
 * reboots and power loss by mirroring it to a backup file (restore.md).
 *
 * Start: the memory file comes from the passed descriptors when one has the name (it came
 * back from the service manager's fd store and is newer than the disk), or is created,
 * restored from the backup, and parked in the fd store. Then the program runs as a child
 * with the memory among its descriptors; signals to the host are forwarded to it; with
 * `--snapshot=restore-v1` consistent snapshots are persisted while it runs; after it
 * exits, the quiescent memory is written back atomically and its exit status returned.
 *
 * The host never maps the memory file: it reads it with `pread` and copies it with
 * `sendfile`, so a program that resizes it can never make the host fault.
 *
 * This module runs those steps in order; the child process (start, signals, exit status)
 * is child.ts, the final write-back write-back.ts, the snapshots snapshotter.ts.
 * @module
 */
import path from 'node:path';
import { StderrLog, type Log } from '../base/log.js';
import { ShmfdError } from '../base/errors.js';
import { commandErrorStatus, resolveCommand } from '../exec/exec.js';
import { checkFdName, readListenFds, withEnv, DEFAULT_FIRST_FD, type Environment, type PassedFd } from '../fds/listen-fds.js';
import type { MemoryFile } from '../fds/memory-file.js';
import { Notifier, storeInFdStore } from '../fds/notify.js';
import { passedOrNewMemoryFile, SHARED_FD_NAME } from '../fds/shared-fd.js';
import { DirtyPages, DIRTY_PAGES_NAME } from '../fds/dirty-pages.js';
import { describeError } from '../system/libc.js';
import { BackupFile, type BackupInspection } from './backup.js';
import { childDescriptors, exitStatus, findSetpriv, SignalRelay, startChild, waitForChild } from './child.js';
import { BackupLock } from './lock.js';
import { formatBytes, formatDuration, withProgress } from './progress.js';
import { replayJournal } from './journal.js';
import { Snapshotter, type RoundGate } from './snapshotter.js';
import { writeBack, type DurableState } from './write-back.js';

/** Snapshot strategies of `--snapshot`. */
export const SNAPSHOT_MODES = ['restore-v1'] as const;
export type SnapshotMode = (typeof SNAPSHOT_MODES)[number];

/** Exit status when the host itself fails (as `env`, `nice`, `timeout` do). */
export const EXIT_HOST_FAILURE = 125;

/** Options of {@link runRestoreHost}. */
export interface RestoreHostOptions {
  /** Path of the backup file. */
  backup: string;
  /** The program to run; looked up in `PATH`, never interpreted by a shell. */
  command: string;
  args?: readonly string[];
  /** Descriptor name of the memory file (default `SHM_SHARED_FD`). */
  name?: string;
  /** Take consistent snapshots while the program runs; without it the backup is written at exit only. */
  snapshot?: SnapshotMode;
  /** Least pause between snapshot rounds in milliseconds (default 250, `DEFAULT_INTERVAL_MS`). */
  intervalMs?: number;
  /** Set `LISTEN_PID` to the program's pid (default true); false is `--no-pid`. */
  listenPid?: boolean;
  /** Descriptors to pass besides those passed in and the memory file (e.g. sockets opened by the CLI). */
  extraFds?: readonly PassedFd[];
  /** Descriptor number of the first passed descriptor in the program (default 3). */
  firstFd?: number;
  /** Environment of the host, passed on to the program (default `process.env`). */
  env?: Environment;
  /** Where the host reports what it does (default: warnings and errors on stderr, as `shm-restore: ...`). */
  log?: Log;
  /** Show progress of slow copies when stderr is a terminal (default true). */
  progress?: boolean;
  /**
   * Called after every snapshot round that made a new backup durable, and after the final
   * write-back (which may have left the backup as it was). Until it returns, no round
   * writes the backup: it holds exactly that round's state.
   */
  onDurable?: (durable: DurableBackup) => void;
  /** Told when each snapshot round begins and ends (see {@link RoundGate}). */
  gate?: RoundGate;
}

/** What {@link RestoreHostOptions.onDurable} is told. */
export interface DurableBackup {
  /** The backup file: complete and synced. */
  path: string;
  /**
   * The byte ranges `[offset, length]` the round changed in the backup file in place;
   * undefined when the file there is a new one (or may be).
   */
  changed?: readonly (readonly [number, number])[];
}

/**
 * Runs the restore host to the end and returns the exit status: the program's (128 + N
 * for signal N), or 125 when the final write-back failed after a successful program.
 * The backup's lock (`.BACKUP.lock` beside it) is held from the start to the end.
 * @throws ShmfdError before the program starts: `ERR_BACKUP_IN_USE`, `ERR_BACKUP_ACCESS`,
 *   `ERR_BACKUP_INVALID`, `ERR_COMMAND_NOT_FOUND`, `ERR_COMMAND_NOT_EXECUTABLE`,
 *   `ERR_LISTEN_*`, `ERR_NOT_A_MEMORY_FILE`; SystemError for a memory file that cannot be
 *   created or restored (ENOMEM, ENOSPC)
 */
export async function runRestoreHost(options: RestoreHostOptions): Promise<number> {
  const log = options.log ?? new StderrLog('shm-restore');
  const relay = new SignalRelay(log);
  let lock: BackupLock | undefined;
  try {
    const name = checkFdName(options.name ?? SHARED_FD_NAME);
    const backup = new BackupFile(options.backup);
    // One writer per backup, and before anything reads or changes its directory: the
    // sweep of temporary files then removes only those of hosts that are gone.
    lock = BackupLock.acquire(backup);
    return await host(options, name, backup, log, relay);
  } finally {
    lock?.release();
    relay.uninstall();
  }
}

async function host(o: RestoreHostOptions, name: string, backup: BackupFile, log: Log, relay: SignalRelay): Promise<number> {
  const env = o.env ?? process.env;
  const first = o.firstFd ?? DEFAULT_FIRST_FD;
  const showProgress = o.progress !== false;

  // A round interrupted in the middle of its in-place writes is finished first: until
  // then the backup may be torn, and its record does not match it.
  await replayJournal(backup, log);
  // Everything that can be refused is checked before the memory is touched.
  const inspection = backup.inspect(o.snapshot === undefined ? 'raw' : 'snapshot');
  const leftovers = backup.removeLeftovers();
  if (leftovers.length > 0) log.info(`removed ${leftovers.length} temporary file(s) left by a host that was killed: ${leftovers.join(', ')}`);
  backup.checkWritable();
  const executable = resolveCommand(o.command, env);
  const setpriv = findSetpriv(env);
  if (setpriv === undefined) {
    log.warn(`no setpriv with --pdeathsig (util-linux 2.33 or later) in PATH: if shm-restore is killed, ${o.command} keeps running and nothing it does is persisted; install util-linux`);
  }
  const passed = readListenFds({ env });
  describeInspection(log, backup, inspection);

  const { file: memory, created } = passedOrNewMemoryFile(passed, name);
  if (!created) {
    log.info(`using the memory file ${name} passed in (fd ${memory.fd}, ${formatBytes(memory.size)}): it is newer than the backup, which is not restored`);
  } else {
    await restore(backup, inspection, memory, log, relay, showProgress);
  }
  // A signal ends the host here, before a partly restored memory file (cut short by the
  // signal) reaches the store: it would win over the disk at the next start.
  if (relay.received !== undefined) return exitStatus(null, relay.received);
  if (created) parkMemory(env, name, memory, log);

  const dirtyPages = o.snapshot !== undefined ? DirtyPages.create() : undefined;
  const descriptors = childDescriptors(
    passed,
    o.extraFds ?? [],
    created ? { fd: memory.fd, name } : undefined,
    dirtyPages === undefined ? undefined : { fd: dirtyPages.file.fd, name: DIRTY_PAGES_NAME },
  );
  const child = startChild(
    {
      command: o.command,
      executable,
      args: o.args ?? [],
      setpriv,
      env: withEnv(env, { SHMFD_BACKUP: backup.path }),
      descriptors,
      first,
      listenPid: o.listenPid !== false,
    },
    log,
  );
  const ended = waitForChild(child);
  relay.child = child;

  let snapshotter: Snapshotter | undefined;
  let statusTimer: NodeJS.Timeout | undefined;
  if (o.snapshot !== undefined && child.pid !== undefined) {
    snapshotter = new Snapshotter({
      memoryFd: memory.fd,
      backup,
      intervalMs: o.intervalMs,
      log,
      baselineWriteOffset: inspection.state === 'present' ? inspection.slots?.head.writeOffset : undefined,
      progress: showProgress,
      dirtyPages,
      gate: o.gate,
      // The memory is a copy of the backup: what the program marks from now on is all that differs.
      backupMatchesMemory: created && inspection.state === 'present' && inspection.size > 0,
      onPersisted:
        o.onDurable === undefined ? undefined : (round) => o.onDurable?.({ path: backup.path, changed: round.changed }),
    });
    snapshotter.start();
    statusTimer = reportStatus(env, snapshotter, log);
  }

  const end = await ended;
  relay.childExited = true;
  if (statusTimer !== undefined) clearInterval(statusTimer);
  const backupState = await snapshotter?.finish();
  dirtyPages?.close();
  if ('error' in end) {
    log.error(`cannot start ${o.command}: ${describeError(end.error)}`);
    return commandErrorStatus(end.error, true);
  }
  const status = exitStatus(end.code, end.signal);
  log.info(`${o.command} exited ${end.signal === null ? `with status ${end.code}` : `on ${end.signal}`}`);
  if (snapshotter !== undefined) {
    const c = snapshotter.counts;
    log.debug(`snapshot rounds: ${c.persisted} persisted, ${c.unchanged} unchanged, ${c['not-ready']} not ready, ${c.discarded} discarded, ${c.failed} failed`);
  }

  // What is durable now: the backup found at start, or a newer one the snapshotter wrote.
  const durable: DurableState = {
    exists: (inspection.state === 'present' && inspection.size > 0) || snapshotter?.lastPersisted !== undefined,
    snapshots: snapshotter?.lastPersisted?.count ?? (inspection.state === 'present' ? (inspection.slots?.slots.length ?? 0) : 0),
  };
  const outcome = await writeBack(backup, durable, memory, {
    snapshot: o.snapshot !== undefined,
    log,
    progress: showProgress,
    backupState,
    writeInPlace: snapshotter === undefined ? undefined : () => snapshotter.persistDifferences(),
  });
  if (outcome === 'failed') return status === 0 ? EXIT_HOST_FAILURE : status;
  // A backup kept as it was has been told already (by its round, or at start).
  if (outcome === 'written') o.onDurable?.({ path: backup.path });
  return status;
}

function describeInspection(log: Log, backup: BackupFile, inspection: BackupInspection): void {
  if (inspection.state === 'missing') {
    log.info(`no backup at ${backup.path} yet: fresh start`);
  } else if (inspection.size === 0) {
    log.info(`the backup ${backup.path} is empty: fresh start`);
  } else if (inspection.slots !== undefined) {
    log.info(`backup ${backup.path}: ${formatBytes(inspection.size)}, ${inspection.slots.slots.length} valid snapshot(s)`);
  }
}

async function restore(
  backup: BackupFile,
  inspection: BackupInspection,
  memory: MemoryFile,
  log: Log,
  relay: SignalRelay,
  showProgress: boolean,
): Promise<void> {
  if (inspection.state === 'missing' || inspection.size === 0) return;
  log.debug(`restoring ${formatBytes(inspection.size)} from ${backup.path} into a new memory file`);
  const started = performance.now();
  let result;
  try {
    result = await withProgress(`shm-restore: restoring ${path.basename(backup.path)}`, showProgress, (progress) =>
      backup.restoreInto(memory.fd, { signal: relay.abort.signal, progress }),
    );
  } catch (err) {
    if (relay.abort.signal.aborted) return;
    throw new ShmfdError('ERR_BACKUP_ACCESS', `cannot restore backup ${backup.path} into memory: ${describeError(err)}`, { cause: err });
  }
  log.info(`restored ${formatBytes(result.size)} from ${backup.path} (${formatBytes(result.copied)} of data) in ${formatDuration(performance.now() - started)}`);
}

/** Parks a new memory file in the fd store; a manager that cannot take it costs a warning, not the start. */
function parkMemory(env: Environment, name: string, memory: MemoryFile, log: Log): void {
  try {
    const consequence = `${name} will not survive a restart of the service, only the backup will; set FileDescriptorStoreMax=1 or more`;
    storeInFdStore([{ name, fds: [memory.fd] }], { consequence, env, log });
  } catch (err) {
    log.warn(`cannot hand ${name} to the service manager: ${describeError(err)}`);
  }
}

/** Sends `STATUS=` with the age of the newest durable snapshot every few seconds, under systemd. */
function reportStatus(env: Environment, snapshotter: Snapshotter, log: Log): NodeJS.Timeout | undefined {
  let notifier: Notifier | undefined;
  try {
    notifier = Notifier.fromEnv(env);
  } catch {
    return undefined;
  }
  if (notifier === undefined) return undefined;
  const timer = setInterval(() => {
    const last = snapshotter.lastPersisted;
    const text =
      last === undefined
        ? 'no snapshot persisted by this host yet'
        : `newest durable snapshot ${formatDuration(Date.now() - last.takenAt)} old (${last.count} snapshot(s), ${formatBytes(last.size)})`;
    try {
      notifier.status(text);
    } catch (err) {
      log.debug(`cannot send STATUS to the service manager: ${describeError(err)}`);
    }
  }, 5000);
  timer.unref();
  return timer;
}
