/**
 * `shm-restore`: runs a program with a shared memory file that is restored from a backup
 * file at start and written back atomically at exit (and, with `--snapshot=restore-v1`,
 * continuously while it runs). See docs/restore.md.
 * @module
 */
import { EXIT_HOST_FAILURE, runRestoreHost, SNAPSHOT_MODES, type SnapshotMode } from '../restore/host.js';
import { DEFAULT_INTERVAL_MS } from '../restore/snapshotter.js';
import { BackupFile } from '../restore/backup.js';
import { lockHolder } from '../restore/lock.js';
import { backupStatus } from '../restore/status.js';
import { SHARED_FD_NAME } from '../fds/shared-fd.js';
import { commandErrorStatus } from '../exec/exec.js';
import { commonOptions, last, parseArgs, printAnswer, usageError, usageErrorSeeHelp, type OptionSpec, type ParsedArgs } from './args.js';
import { StderrLog } from '../base/log.js';
import { failureLine, parseFirstFd, prepareSocketOptions, warnIfNodeRestarter } from './common.js';

const USAGE = `Usage: shm-restore [OPTIONS] BACKUP [--] COMMAND [ARGS...]
       shm-restore [--snapshot=restore-v1] status BACKUP

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
      --log-level LEVEL silent, error, warn (default), info or debug; also SHMFD_LOG
      --status BACKUP   same as the status command
  -h, --help            show this help
  -V, --version         show the version

status BACKUP prints the backup's size, its number of snapshots, the size and age of
the newest durable snapshot, and the pid of the host running on it, one fact per line;
exit status 1 when BACKUP is missing or invalid. (A backup file named "status" is
written ./status.)

Exit status: that of COMMAND (128+N when it died of signal N); 125 if shm-restore fails
(e.g. an unreadable or invalid BACKUP, which is never overwritten, or a BACKUP in use by
another shm-restore) or the final write-back fails after COMMAND succeeded; 126 if
COMMAND cannot be executed, 127 if it is not found.

Example: shm-restore --snapshot=restore-v1 /var/lib/primes/state node examples/primes-snapshot.js`;

const OPTIONS: OptionSpec[] = [
  { name: 'snapshot', value: true },
  { name: 'interval', value: true },
  { name: 'name', value: true },
  { name: 'socket', short: 's', value: true },
  { name: 'first-fd', value: true },
  { name: 'no-pid' },
  { name: 'log-level', value: true },
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

function status(file: string, mode: SnapshotMode | undefined): number {
  const result = backupStatus(file, mode === undefined ? 'raw' : 'snapshot');
  const holder = lockHolder(new BackupFile(file));
  const host = holder === undefined ? 'host: none' : `host: running, pid ${holder}`;
  printAnswer(`${[...result.lines, host].join('\n')}\n`);
  return result.ok ? 0 : 1;
}

async function run(argv: readonly string[], log: StderrLog): Promise<number> {
  const args = parseArgs(argv, OPTIONS, 'shm-restore');
  const answered = commonOptions(args, 'shm-restore', USAGE, log);
  if (answered !== undefined) return answered;
  const snapshot = snapshotMode(args);
  const interval = intervalMs(args);

  const statusOf = last(args, 'status');
  if (statusOf !== undefined) {
    if (args.rest.length > 0) throw usageErrorSeeHelp('shm-restore', '--status takes no COMMAND');
    return statusCommand(statusOf, snapshot, log);
  }
  if (args.rest[0] === 'status') {
    if (args.rest.length !== 2) throw usageError('usage: shm-restore status BACKUP');
    return statusCommand(args.rest[1] as string, snapshot, log);
  }

  const [backup, ...more] = args.rest;
  if (backup === undefined) throw usageErrorSeeHelp('shm-restore', 'no BACKUP given');
  const [command, ...commandArgs] = more[0] === '--' ? more.slice(1) : more;
  if (command === undefined) throw usageErrorSeeHelp('shm-restore', 'no COMMAND given');
  if (interval !== undefined && snapshot === undefined) log.warn('--interval has no effect without --snapshot');
  const memoryName = last(args, 'name') ?? SHARED_FD_NAME;
  const firstFd = parseFirstFd(last(args, 'first-fd'));
  warnIfNodeRestarter(command, commandArgs, firstFd, log);
  const sockets = (await prepareSocketOptions(args.options.get('socket') ?? [], memoryName, process.env, log)).opened;

  return runRestoreHost({
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
  });
}

function statusCommand(file: string, mode: SnapshotMode | undefined, log: StderrLog): number {
  try {
    return status(file, mode);
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
