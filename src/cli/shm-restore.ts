/**
 * `shm-restore`: runs a program with a shared memory file that is restored from a backup
 * file at start and written back atomically at exit (and, with `--snapshot=restore-v1`,
 * continuously while it runs). See docs/restore.md.
 * @module
 */
import { EXIT_HOST_FAILURE, runRestoreHost, SNAPSHOT_MODES, type RestoreHostOptions, type SnapshotMode } from '../restore/host.js';
import { DEFAULT_INTERVAL_MS, RoundGate } from '../restore/snapshotter.js';
import { BackupFile } from '../restore/backup.js';
import { lockHolder } from '../restore/lock.js';
import { backupStatus } from '../restore/status.js';
import { isReplicaUrl } from '../replica/url.js';
import { SHARED_FD_NAME } from '../fds/shared-fd.js';
import { commandErrorStatus } from '../exec/exec.js';
import { commonOptions, last, parseArgs, printAnswer, usageError, usageErrorSeeHelp, type OptionSpec, type ParsedArgs } from './args.js';
import { StderrLog } from '../base/log.js';
import { failureLine, parseFirstFd, prepareSocketOptions, warnIfNodeRestarter } from './common.js';

const USAGE = `Usage: shm-restore [OPTIONS] BACKUP [--] COMMAND [ARGS...]
       shm-restore [--snapshot=restore-v1] [--replica URL] status BACKUP
       shm-restore status nats://HOST:PORT/NAME

Runs COMMAND with a shared memory file (memfd) passed as a systemd-style descriptor
(LISTEN_FDS, LISTEN_FDNAMES, LISTEN_PID), and keeps a copy of it in the file BACKUP:
restored into a new memory file at start, written back atomically (temporary file,
fsync, rename) when COMMAND exits. A memory file passed in under the name (from
systemd's fd store) is newer than BACKUP and used as it is; a new one is handed to the
fd store under systemd. Signals (INT, TERM, HUP, QUIT) are forwarded to COMMAND, which
shm-restore always outlives; if shm-restore is killed, so is COMMAND (SIGKILL, through
setpriv --pdeathsig from util-linux). One host per BACKUP: a lock on .BACKUP.lock beside
it is held while it runs, and a second host on the same BACKUP is refused.

Options:
      --snapshot=MODE   also persist consistent snapshots while COMMAND runs; MODE is
                        restore-v1 (the memory is a snapshot file, see docs/snapshot.md)
      --interval MS     least pause between two snapshots (default ${DEFAULT_INTERVAL_MS}); a round
                        copies nothing when no new snapshot was committed
      --name NAME       descriptor name of the memory file (default ${SHARED_FD_NAME})
  -s, --socket SPEC     open a listening socket and pass it too (repeatable), before the
                        memory file: [NAME=][KIND::]ADDR as in shm-fd (see docs/sockets.md);
                        under systemd it is parked in the fd store and reused on restart
      --first-fd K      pass the descriptors from K on (LISTEN_FDS_FIRST_FD=K); use 17 or
                        more behind Node-based tools (node --watch, nodemon)
      --no-pid          leave LISTEN_PID unset, for COMMANDs that re-spawn the program
      --replica URL     also stream every durable snapshot to NATS JetStream, and start
                        from the newer of BACKUP and the replica; needs --snapshot.
                        URL is nats://HOST:PORT[,HOST:PORT...]/NAME[?replicas=N&lease=S]
                        (tls:// for TLS); credentials come from NATS_CREDS,
                        NATS_TOKEN_FILE, NATS_TOKEN or NATS_USER and NATS_PASSWORD, never
                        from the command line (see docs/replica.md)
      --log-level LEVEL silent, error, warn (default), info or debug; also SHMFD_LOG
      --status BACKUP   same as the status command
  -h, --help            show this help
  -V, --version         show the version

status BACKUP prints the backup's size, its number of snapshots, the size and age of
the newest durable snapshot, and the pid of the host running on it, one fact per line;
exit status 1 when BACKUP is missing or invalid. (A backup file named "status" is
written ./status.) With --replica, or given a nats:// or tls:// URL instead of BACKUP,
it also prints the replica's newest committed state, its age, and the lease's holder.

Exit status: that of COMMAND (128+N when it died of signal N); 125 if shm-restore fails
(e.g. an unreadable or invalid BACKUP, which is never overwritten, a BACKUP in use by
another shm-restore, or a replica whose lease another host holds) or the final
write-back fails after COMMAND succeeded; 126 if COMMAND cannot be executed, 127 if it
is not found.

Example: shm-restore --snapshot=restore-v1 /var/lib/primes/state node examples/primes-snapshot.js`;

const OPTIONS: OptionSpec[] = [
  { name: 'snapshot', value: true },
  { name: 'interval', value: true },
  { name: 'name', value: true },
  { name: 'socket', short: 's', value: true },
  { name: 'first-fd', value: true },
  { name: 'no-pid' },
  { name: 'log-level', value: true },
  { name: 'replica', value: true },
  { name: 'status', value: true },
  { name: 'help', short: 'h' },
  { name: 'version', short: 'V' },
];

function snapshotMode(args: ParsedArgs): SnapshotMode | undefined {
  const mode = last(args, 'snapshot');
  if (mode === undefined) return undefined;
  if (!(SNAPSHOT_MODES as readonly string[]).includes(mode)) {
    throw usageError(`--snapshot: unknown mode ${JSON.stringify(mode)} (known: ${SNAPSHOT_MODES.join(', ')})`);
  }
  return mode as SnapshotMode;
}

function intervalMs(args: ParsedArgs): number | undefined {
  const text = last(args, 'interval');
  if (text === undefined) return undefined;
  const n = Number(text);
  if (!/^[0-9]+$/.test(text) || !Number.isSafeInteger(n) || n < 1 || n > 2 ** 31 - 1) {
    throw usageError(`--interval: ${JSON.stringify(text)} is not a number of milliseconds from 1 to ${2 ** 31 - 1}`);
  }
  return n;
}

async function status(file: string, mode: SnapshotMode | undefined, replica: string | undefined): Promise<number> {
  let lines: string[] = [];
  let ok = true;
  if (!isReplicaUrl(file)) {
    const result = backupStatus(file, mode === undefined ? 'raw' : 'snapshot');
    const holder = lockHolder(new BackupFile(file));
    lines = [...result.lines, holder === undefined ? 'host: none' : `host: running, pid ${holder}`];
    ok = result.ok;
  }
  const url = isReplicaUrl(file) ? file : replica;
  if (url !== undefined) {
    // Loaded only here and for --replica: a host without a replica never loads the NATS client.
    const { replicaStatus } = await import('../replica/start.js');
    const result = await replicaStatus(url, process.env);
    lines.push(...result.lines);
    ok &&= result.ok;
  }
  printAnswer(`${lines.join('\n')}\n`);
  return ok ? 0 : 1;
}

async function run(argv: readonly string[], log: StderrLog): Promise<number> {
  const args = parseArgs(argv, OPTIONS, 'shm-restore');
  const answered = commonOptions(args, 'shm-restore', USAGE, log);
  if (answered !== undefined) return answered;
  const snapshot = snapshotMode(args);
  const interval = intervalMs(args);

  const replica = last(args, 'replica');
  const statusOf = last(args, 'status');
  if (statusOf !== undefined) {
    if (args.rest.length > 0) throw usageErrorSeeHelp('shm-restore', '--status takes no COMMAND');
    return statusCommand(statusOf, snapshot, replica, log);
  }
  if (args.rest[0] === 'status') {
    if (args.rest.length !== 2) throw usageError('usage: shm-restore status BACKUP');
    return statusCommand(args.rest[1] as string, snapshot, replica, log);
  }
  if (replica !== undefined && snapshot === undefined) throw usageError('--replica needs --snapshot=restore-v1');

  const [backup, ...more] = args.rest;
  if (backup === undefined) throw usageErrorSeeHelp('shm-restore', 'no BACKUP given');
  const [command, ...commandArgs] = more[0] === '--' ? more.slice(1) : more;
  if (command === undefined) throw usageErrorSeeHelp('shm-restore', 'no COMMAND given');
  if (interval !== undefined && snapshot === undefined) log.warn('--interval has no effect without --snapshot');
  const memoryName = last(args, 'name') ?? SHARED_FD_NAME;
  const firstFd = parseFirstFd(last(args, 'first-fd'));
  warnIfNodeRestarter(command, commandArgs, firstFd, log);
  const sockets = (await prepareSocketOptions(args.options.get('socket') ?? [], memoryName, process.env, log)).opened;

  const options: RestoreHostOptions = {
    backup,
    command,
    args: commandArgs,
    name: last(args, 'name'),
    snapshot,
    intervalMs: interval,
    listenPid: !args.options.has('no-pid'),
    extraFds: sockets,
    firstFd,
    log,
    progress: log.enabled('error'),
  };
  if (replica === undefined) return runRestoreHost(options);
  const { startReplica } = await import('../replica/start.js');
  const gate = new RoundGate();
  const { replicator } = await startReplica(replica, backup, gate, process.env, log);
  replicator.start();
  try {
    return await runRestoreHost({ ...options, gate, onDurable: (durable) => replicator.offer(durable) });
  } finally {
    await replicator.stop(REPLICA_GRACE_MS);
  }
}

/** How long a host whose program ended waits for the replica to receive its last state. */
const REPLICA_GRACE_MS = 10_000;

async function statusCommand(file: string, mode: SnapshotMode | undefined, replica: string | undefined, log: StderrLog): Promise<number> {
  try {
    return await status(file, mode, replica);
  } catch (err) {
    log.error(failureLine(err));
    return 1;
  }
}

/** Runs the command line; resolves to the exit status. */
export async function main(argv: readonly string[]): Promise<number> {
  const log = new StderrLog('shm-restore');
  try {
    return await run(argv, log);
  } catch (err) {
    log.error(failureLine(err));
    const commandStatus = commandErrorStatus(err);
    if (commandStatus !== undefined) return commandStatus;
    return EXIT_HOST_FAILURE;
  }
}
