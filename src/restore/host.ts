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
 * @module
 */
import { spawn, spawnSync, type ChildProcess, type StdioOptions } from 'node:child_process';
import os from 'node:os';
import path from 'node:path';
import { StderrLog, type Log } from '../base/log.js';
import { ShmfdError } from '../base/errors.js';
import { commandErrorStatus, resolveCommand } from '../exec/exec.js';
import { checkFdName, listenEnv, readListenFds, withEnv, DEFAULT_FIRST_FD, type Environment, type PassedFd } from '../fds/listen-fds.js';
import type { MemoryFile } from '../fds/memory-file.js';
import { Notifier, storeInFdStore } from '../fds/notify.js';
import { passedOrNewMemoryFile, SHARED_FD_NAME } from '../fds/shared-fd.js';
import { SnapshotFormatError } from '../snapshot/errors.js';
import { BackupFile, type BackupInspection } from './backup.js';
import { describeError } from '../system/libc.js';
import { BackupLock } from './lock.js';
import { directorySyncWarning, persistAtomically, type PersistResult } from './persist.js';
import { formatBytes, formatDuration, withProgress } from './progress.js';
import { readSlotState, type SlotState } from '../snapshot/pread.js';
import { quiescentCopyFixup, Snapshotter } from './snapshotter.js';

/** Snapshot strategies of `--snapshot`. */
export const SNAPSHOT_MODES = ['restore-v1'] as const;
export type SnapshotMode = (typeof SNAPSHOT_MODES)[number];

/** Exit status when the host itself fails (as `env`, `nice`, `timeout` do). */
export const EXIT_HOST_FAILURE = 125;

/** The signals the host forwards to the program. */
export const FORWARDED_SIGNALS = ['SIGINT', 'SIGTERM', 'SIGHUP', 'SIGQUIT'] as const;

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
}

/**
 * The descriptors the program gets, in order: those the host was passed (re-passed as they
 * are), then new ones (e.g. sockets), then the memory file when the host created it.
 * A memory file that was passed in is already among the first.
 */
export function childDescriptors(
  passed: readonly PassedFd[],
  added: readonly PassedFd[],
  createdMemory: PassedFd | undefined,
): PassedFd[] {
  return [...passed, ...added, ...(createdMemory === undefined ? [] : [createdMemory])];
}

/** The `stdio` of `spawn` that puts `descriptors` at `first`, `first + 1`, ... in the child. */
export function childStdio(descriptors: readonly PassedFd[], first: number = DEFAULT_FIRST_FD): StdioOptions {
  if (!Number.isSafeInteger(first) || first < DEFAULT_FIRST_FD) {
    throw new ShmfdError('ERR_INVALID_ARGUMENT', `the first passed descriptor must be ${DEFAULT_FIRST_FD} or more, not ${first}`);
  }
  const gap = new Array<'ignore'>(first - DEFAULT_FIRST_FD).fill('ignore');
  return ['inherit', 'inherit', 'inherit', ...gap, ...descriptors.map((d) => d.fd)];
}


/**
 * The `setpriv` (util-linux 2.33 or later) in `env.PATH` that can start the program with a
 * parent-death signal, or undefined when there is none.
 */
export function findSetpriv(env: Environment): string | undefined {
  let file: string;
  try {
    file = resolveCommand('setpriv', env);
  } catch {
    return undefined;
  }
  // Options are parsed in order: a setpriv without --pdeathsig fails before --version answers.
  const probe = spawnSync(file, ['--pdeathsig', 'KILL', '--version'], { stdio: 'ignore' });
  return probe.status === 0 ? file : undefined;
}

/**
 * The shell program run in front of COMMAND ("$0", its arguments "$@"); it ends by exec'ing
 * COMMAND, which keeps the shell's pid. With `hostPid` (under `setpriv --pdeathsig KILL`):
 * setpriv sets the signal some time after the fork, so a host killed in between would
 * leave the program unguarded; the shell starts after that, and if its parent is no
 * longer the host it kills itself instead of starting COMMAND. With `listenPid`, it sets
 * `LISTEN_PID` to that pid (docs/fd-passing.md).
 */
function childShell(hostPid: number | undefined, listenPid: boolean): string {
  const guard = hostPid === undefined ? '' : `[ "$PPID" = ${hostPid} ] || kill -KILL $$; `;
  return `${guard}${listenPid ? 'LISTEN_PID=$$; export LISTEN_PID; ' : ''}exec "$0" "$@"`;
}

/** The shell convention: 128 + N for a program killed by signal N. */
export function exitStatus(code: number | null, signal: NodeJS.Signals | null): number {
  if (code !== null) return code;
  const n = signal === null ? undefined : os.constants.signals[signal];
  return 128 + (n ?? 0);
}

/** Forwards signals to the program; before it runs, remembers the first one to stop early. */
class SignalRelay {
  child: ChildProcess | undefined;
  childExited = false;
  received: NodeJS.Signals | undefined;
  readonly abort = new AbortController();
  #handlers = new Map<NodeJS.Signals, () => void>();

  constructor(private readonly log: Log) {
    for (const signal of FORWARDED_SIGNALS) {
      const handler = (): void => this.#on(signal);
      this.#handlers.set(signal, handler);
      process.on(signal, handler);
    }
  }

  #on(signal: NodeJS.Signals): void {
    if (this.child === undefined) {
      this.received ??= signal;
      this.abort.abort(new Error(`received ${signal}`));
      this.log.info(`received ${signal} before the program started: stopping`);
    } else if (!this.childExited) {
      this.log.info(`received ${signal}: forwarding it to the program (pid ${this.child.pid})`);
      try {
        this.child.kill(signal);
      } catch {
        // Gone in the meantime: its exit is on the way.
      }
    } else {
      this.log.info(`received ${signal}: finishing the write-back first`);
    }
  }

  uninstall(): void {
    for (const [signal, handler] of this.#handlers) process.off(signal, handler);
    this.#handlers.clear();
  }
}

type ChildEnd = { code: number | null; signal: NodeJS.Signals | null } | { error: Error };

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

  const descriptors = childDescriptors(passed, o.extraFds ?? [], created ? { fd: memory.fd, name } : undefined);
  const child = startChild(o, executable, setpriv, withEnv(env, { SHMFD_BACKUP: backup.path }), descriptors, first, log);
  const ended = waitForChild(child);
  relay.child = child;

  const mode = inspection.state === 'present' ? inspection.mode : 0o600;
  let snapshotter: Snapshotter | undefined;
  let statusTimer: NodeJS.Timeout | undefined;
  if (o.snapshot !== undefined && child.pid !== undefined) {
    snapshotter = new Snapshotter({
      memoryFd: memory.fd,
      backup,
      intervalMs: o.intervalMs,
      log,
      baselineWriteOffset: inspection.state === 'present' ? inspection.slots?.head.writeOffset : undefined,
      mode,
      progress: showProgress,
    });
    snapshotter.start();
    statusTimer = reportStatus(env, snapshotter, log);
  }

  const end = await ended;
  relay.childExited = true;
  if (statusTimer !== undefined) clearInterval(statusTimer);
  await snapshotter?.stop();
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
  const written = await writeBack(o, backup, durable, memory, mode, log, showProgress);
  if (!written) return status === 0 ? EXIT_HOST_FAILURE : status;
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

function startChild(
  o: RestoreHostOptions,
  executable: string,
  setpriv: string | undefined,
  env: Environment,
  descriptors: readonly PassedFd[],
  first: number,
  log: Log,
): ChildProcess {
  const childEnv = withEnv(env, listenEnv(descriptors.map((d) => d.name), { pid: undefined, first }));
  const stdio = childStdio(descriptors, first);
  const args = o.args ?? [];
  log.debug(`starting ${o.command} with LISTEN_FDS=${childEnv.LISTEN_FDS} LISTEN_FDNAMES=${childEnv.LISTEN_FDNAMES}`);
  // The shell only sets LISTEN_PID to its pid and execs the program in its place. A name
  // starting with '-' would be taken for an option of exec by some shells.
  const target = o.command.startsWith('-') ? path.resolve(executable) : o.command;
  const listenPid = o.listenPid !== false;
  if (setpriv !== undefined) {
    // Node cannot run code between fork and exec: setpriv sets the parent-death signal
    // there and execs the shell, which execs the program; the pid stays the same.
    const shell = childShell(process.pid, listenPid);
    return spawn(setpriv, ['--pdeathsig', 'KILL', '--', '/bin/sh', '-c', shell, target, ...args], { env: childEnv, stdio });
  }
  if (!listenPid) return spawn(executable, args, { argv0: o.command, env: childEnv, stdio });
  return spawn('/bin/sh', ['-c', childShell(undefined, true), target, ...args], { env: childEnv, stdio });
}

function waitForChild(child: ChildProcess): Promise<ChildEnd> {
  return new Promise((resolve) => {
    child.once('exit', (code, signal) => resolve({ code, signal }));
    child.on('error', (error) => {
      // After a successful start, errors come from kill() on a process that is already gone.
      if (child.pid === undefined) resolve({ error });
    });
  });
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

/** The backup on disk as the final write-back must respect it. */
interface DurableState {
  /** A backup with content exists (found at start, or persisted since). */
  exists: boolean;
  /** Its number of valid snapshots. */
  snapshots: number;
}

/**
 * The final write-back of quiescent memory. Returns false when it failed (the old backup
 * then stays, and the reason has been logged).
 */
async function writeBack(
  o: RestoreHostOptions,
  backup: BackupFile,
  durable: DurableState,
  memory: MemoryFile,
  mode: number,
  log: Log,
  showProgress: boolean,
): Promise<boolean> {
  let size: number;
  let expected: SlotState | undefined;
  try {
    size = memory.size;
    if (o.snapshot !== undefined) {
      const verdict = checkFinalSnapshot(memory.fd, size, durable);
      if (typeof verdict === 'string') {
        if (durable.exists) log.warn(`${verdict}; the backup ${backup.path} is kept as it was`);
        else if (size > 0) log.warn(`${verdict}; nothing was written to ${backup.path}`);
        return true;
      }
      expected = verdict;
    }
  } catch (err) {
    log.error(`cannot read the memory for the final write-back: ${describeError(err)}; the backup ${backup.path} is kept as it was`);
    return false;
  }
  let result: PersistResult | undefined;
  try {
    result = await withProgress(`shm-restore: writing back to ${path.basename(backup.path)}`, showProgress, (progress) =>
      persistAtomically(backup, memory.fd, size, {
        fixup: expected === undefined ? undefined : quiescentCopyFixup(expected),
        progress,
        mode,
        // The host is done with the memory: unless the fd store (or a grandchild) holds it
        // too, its pages are freed while the copy is synced.
        releaseSource: () => memory.close(),
      }),
    );
  } catch (err) {
    log.error(`the final write-back to ${backup.path} failed: ${describeError(err)}; ${backup.whatIsLeft()}, the newest state is lost`);
    return false;
  }
  if (result === undefined) {
    log.error(`the final write-back to ${backup.path} failed: the memory changed during the copy (is another process still writing to it?); ${backup.whatIsLeft()}`);
    return false;
  }
  const unsynced = directorySyncWarning(backup, result);
  if (unsynced !== undefined) log.warn(unsynced);
  const t = result.timings;
  log.info(
    `wrote back ${formatBytes(result.size)} to ${backup.path} (${formatBytes(result.copied)} of data): ` +
      `copy ${formatDuration(t.copyMs)}, validate ${formatDuration(t.validateMs)}, fsync ${formatDuration(t.fsyncMs)}, rename ${formatDuration(t.renameMs)}`,
  );
  return true;
}

/**
 * In snapshot mode, the memory may replace the backup only when it is a valid snapshot
 * file with at least one valid snapshot.
 * @returns the memory's slots, or why it must not replace the backup
 */
function checkFinalSnapshot(fd: number, size: number, durable: DurableState): SlotState | string {
  if (size === 0) return 'the memory is empty';
  let state: SlotState | undefined;
  try {
    state = readSlotState(fd, size);
  } catch (err) {
    if (err instanceof SnapshotFormatError) return `the memory is not a valid snapshot file (${err.message})`;
    throw err;
  }
  if (state === undefined) return 'the program never configured its memory as a snapshot file';
  // It would restore nothing; and a start without the record refuses such a file as damaged.
  if (state.slots.length === 0) return durable.snapshots > 0 ? 'the memory holds no valid snapshot but the backup does' : 'the memory holds no valid snapshot';
  return state;
}
