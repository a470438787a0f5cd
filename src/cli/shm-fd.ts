/**
 * `shm-fd`: finds or creates a named memfd, passes it to a program as a systemd-style
 * descriptor, and replaces itself with that program.
 * @module
 */
import { listenEnv, withEnv, type PassedFd } from '../fds/listen-fds.js';
import { storeInFdStore } from '../fds/notify.js';
import { passedOrNewMemoryFile, SHARED_FD_NAME } from '../fds/shared-fd.js';
import { commonOptions, last, parseArgs, parseSize, SIZE_SUFFIXES, usageError, usageErrorSeeHelp, type OptionSpec } from './args.js';
import { failureLine, parseFirstFd, prepareSocketOptions, warnIfNodeRestarter } from './common.js';
import { StderrLog } from '../base/log.js';

const USAGE = `Usage: shm-fd [OPTIONS] [--] COMMAND [ARGS...]

Runs COMMAND in place of shm-fd (same pid) with a named shared memory file (memfd)
passed as a systemd-style descriptor (LISTEN_FDS, LISTEN_FDNAMES, LISTEN_PID). The file
comes from the descriptors shm-fd was given (e.g. by systemd's fd store) when one has
the name; otherwise it is created and, under systemd (NOTIFY_SOCKET), parked in the fd
store (FDSTORE=1) so that it survives restarts of the service.

Options:
      --name NAME       descriptor name of the memory file (default ${SHARED_FD_NAME})
      --size BYTES      size of a new file (suffixes ${SIZE_SUFFIXES}); an existing one
                        grows to it
  -s, --socket SPEC     open a listening socket and pass it too (repeatable), before the
                        memory file: [NAME=][KIND::]ADDR, KIND tcp, http, https, udp or
                        unix; ADDR PORT (on 127.0.0.1), IP:PORT, [IPV6]:PORT or a path;
                        NAME defaults to KIND (e.g. -s http::8080 is named http)
      --first-fd K      pass the descriptors from K on (LISTEN_FDS_FIRST_FD=K); use 17 or
                        more behind Node-based tools (node --watch, nodemon)
      --no-pid          leave LISTEN_PID unset, for COMMANDs that re-spawn the program
      --log-level LEVEL silent, error, warn (default), info or debug; also SHMFD_LOG
  -h, --help            show this help
  -V, --version         show the version

Exit status: that of COMMAND; 125 if shm-fd fails, 126 if COMMAND cannot be executed,
127 if it is not found.

Examples: shm-fd watch -n 0.1 node examples/primes.js
          shm-fd --first-fd 17 -s http::8080 node --watch examples/http-counter.js`;

const OPTIONS: OptionSpec[] = [
  { name: 'name', value: true },
  { name: 'size', value: true },
  { name: 'socket', short: 's', value: true },
  { name: 'first-fd', value: true },
  { name: 'no-pid' },
  { name: 'log-level', value: true },
  { name: 'help', short: 'h' },
  { name: 'version', short: 'V' },
];

export const EXIT_FAILURE = 125;

/**
 * The exec module, loaded once the command line asks for a COMMAND: loading it takes the
 * inventory of inherited descriptors (through koffi), which `--help` and `--version` do not
 * need, and which must come before anything is opened here.
 */
const loadExec = () => import('../exec/exec.js');

async function run(argv: readonly string[], log: StderrLog): Promise<number> {
  const args = parseArgs(argv, OPTIONS, 'shm-fd');
  const answered = commonOptions(args, 'shm-fd', USAGE, log);
  if (answered !== undefined) return answered;
  const [command, ...commandArgs] = args.rest;
  if (command === undefined) throw usageErrorSeeHelp('shm-fd', 'no COMMAND given');
  const name = last(args, 'name') ?? SHARED_FD_NAME;
  const sizeText = last(args, 'size');
  const size = sizeText === undefined ? undefined : parseSize('--size', sizeText);

  const first = parseFirstFd(last(args, 'first-fd'));
  const { execReplace, roomForDescriptor } = await loadExec();
  const sockets = await prepareSocketOptions(args.options.get('socket') ?? [], name, process.env, log);
  const passed = sockets.passed;
  const fds: PassedFd[] = [...passed, ...sockets.opened];
  const { file, created } = passedOrNewMemoryFile(passed, name, { size });
  if (!created) {
    log.info(`using the passed memory file ${name} (fd ${file.fd}, ${file.size} bytes)`);
  } else {
    fds.push({ fd: file.fd, name });
    log.info(`created memory file ${name} (${file.size} bytes)`);
    storeInFdStore([{ name, fds: [file.fd] }], { consequence: `${name} will not survive a restart; set FileDescriptorStoreMax=1 or more`, log });
  }

  checkFirstFd(first, fds, command, commandArgs, log, roomForDescriptor);
  const placements = fds.map((f, i) => ({ from: f.fd, to: first + i }));
  const env = withEnv(
    process.env,
    listenEnv(
      fds.map((f) => f.name),
      { pid: args.options.has('no-pid') ? undefined : process.pid, first },
    ),
  );
  log.debug(`exec ${command} with LISTEN_FDS=${env.LISTEN_FDS} LISTEN_FDNAMES=${env.LISTEN_FDNAMES}`);
  return execReplace({ command, args: commandArgs, env, fds: placements, programName: 'shm-fd' });
}

/**
 * Fails early, with a clear message, when the descriptors would not fit under the
 * open-file limit, and warns when a Node-based restarter would swallow
 * the descriptors: Node marks every inherited descriptor below 16, and the run after it,
 * close-on-exec at start-up (libuv's uv_disable_stdio_inheritance), so its children only
 * see descriptors from 17 on, above a gap at 16.
 */
function checkFirstFd(
  first: number,
  fds: readonly PassedFd[],
  command: string,
  args: readonly string[],
  log: StderrLog,
  roomForDescriptor: (fd: number, probe: number) => boolean,
): void {
  const probe = fds[0];
  if (probe === undefined) return;
  // The exec stages every descriptor above the highest target before placing it.
  const highest = first + 2 * fds.length - 1;
  if (!roomForDescriptor(highest, probe.fd)) {
    throw usageError(`--first-fd ${first}: descriptor ${highest} is above the limit of open files (ulimit -n)`);
  }
  warnIfNodeRestarter(command, args, first, log);
}

/** Runs the command line; resolves to an exit status only when it did not exec. */
export async function main(argv: readonly string[]): Promise<number> {
  const log = new StderrLog('shm-fd');
  try {
    return await run(argv, log);
  } catch (err) {
    log.error(failureLine(err));
    const commandStatus = (await loadExec()).commandErrorStatus(err);
    if (commandStatus !== undefined) return commandStatus;
    return EXIT_FAILURE;
  }
}
