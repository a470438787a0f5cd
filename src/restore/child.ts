/**
 * The restore host's child process: the descriptors and environment it gets, starting it
 * (under `setpriv --pdeathsig KILL` when there is one), relaying the host's signals to it,
 * and its exit status.
 * @module
 */
import { spawn, spawnSync, type ChildProcess, type StdioOptions } from 'node:child_process';
import os from 'node:os';
import path from 'node:path';
import type { Log } from '../base/log.js';
import { ShmfdError } from '../base/errors.js';
import { resolveCommand } from '../exec/exec.js';
import { listenEnv, withEnv, DEFAULT_FIRST_FD, type Environment, type PassedFd } from '../fds/listen-fds.js';

/** The signals the host forwards to the program. */
export const FORWARDED_SIGNALS = ['SIGINT', 'SIGTERM', 'SIGHUP', 'SIGQUIT'] as const;

/**
 * The descriptors the program gets, in order: those the host was passed (re-passed as they
 * are), then new ones (e.g. sockets), then the memory file when the host created it, then
 * (restore-v1) the dirty-page map. A memory file that was passed in is already among the
 * first.
 */
export function childDescriptors(
  passed: readonly PassedFd[],
  added: readonly PassedFd[],
  createdMemory: PassedFd | undefined,
  dirtyPages?: PassedFd,
): PassedFd[] {
  return [...passed, ...added, ...(createdMemory === undefined ? [] : [createdMemory]), ...(dirtyPages === undefined ? [] : [dirtyPages])];
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
 * `LISTEN_PID` to that pid (fd-passing.md).
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
export class SignalRelay {
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

/** How the child ended: its exit, or the error that kept it from starting. */
export type ChildEnd = { code: number | null; signal: NodeJS.Signals | null } | { error: Error };

/** The program to start, and what it gets; see {@link startChild}. */
export interface ChildRequest {
  /** The command as given (its name is the program's argv[0]). */
  command: string;
  /** The command found in `PATH` ({@link resolveCommand}). */
  executable: string;
  args: readonly string[];
  /** A setpriv that can set a parent-death signal ({@link findSetpriv}), if there is one. */
  setpriv: string | undefined;
  env: Environment;
  descriptors: readonly PassedFd[];
  /** Descriptor number of the first of `descriptors` in the program. */
  first: number;
  /** Set `LISTEN_PID` to the program's pid. */
  listenPid: boolean;
}

/**
 * Starts the program as a child, with `descriptors` from `first` on and `LISTEN_FDS`,
 * `LISTEN_FDNAMES` (and `LISTEN_PID`) describing them; under setpriv, it is killed when
 * the host dies.
 */
export function startChild(request: ChildRequest, log: Log): ChildProcess {
  const { command, executable, setpriv, descriptors, first, listenPid } = request;
  const childEnv = withEnv(request.env, listenEnv(descriptors.map((d) => d.name), { pid: undefined, first }));
  const stdio = childStdio(descriptors, first);
  const args = request.args;
  log.debug(`starting ${command} with LISTEN_FDS=${childEnv.LISTEN_FDS} LISTEN_FDNAMES=${childEnv.LISTEN_FDNAMES}`);
  // The shell only sets LISTEN_PID to its pid and execs the program in its place. A name
  // starting with '-' would be taken for an option of exec by some shells.
  const target = command.startsWith('-') ? path.resolve(executable) : command;
  if (setpriv !== undefined) {
    // Node cannot run code between fork and exec: setpriv sets the parent-death signal
    // there and execs the shell, which execs the program; the pid stays the same.
    const shell = childShell(process.pid, listenPid);
    return spawn(setpriv, ['--pdeathsig', 'KILL', '--', '/bin/sh', '-c', shell, target, ...args], { env: childEnv, stdio });
  }
  if (!listenPid) return spawn(executable, args, { argv0: command, env: childEnv, stdio });
  return spawn('/bin/sh', ['-c', childShell(undefined, true), target, ...args], { env: childEnv, stdio });
}

/** Resolves when the child exits, or with the error when it could not be started. */
export function waitForChild(child: ChildProcess): Promise<ChildEnd> {
  return new Promise((resolve) => {
    child.once('exit', (code, signal) => resolve({ code, signal }));
    child.on('error', (error) => {
      // After a successful start, errors come from kill() on a process that is already gone.
      if (child.pid === undefined) resolve({ error });
    });
  });
}
