/**
 * Replacing the current Node process with another program (execve), so that it keeps the
 * pid, and finding that program in `PATH`. A Node process is not a clean parent: the
 * steps here undo what Node and libuv leave behind (see docs/exec.md).
 * @module
 */
import fs from 'node:fs';
import module from 'node:module';
import path from 'node:path';
import { ShmfdError } from '../base/errors.js';
import type { Environment } from '../fds/listen-fds.js';
import { callerFds } from './caller-fds.js';
import * as sys from '../system/libc.js';

const DEFAULT_PATH = '/usr/local/bin:/usr/bin:/bin';

/**
 * Finds `command` the way execvp(3) and shells do: a name with a `/` is used as it is,
 * anything else is searched in `PATH` (an empty entry is the current directory). A match
 * that cannot be executed (no permission, a directory) is remembered and the search goes
 * on; it is the error only when nothing executable is found.
 * @throws ShmfdError `ERR_COMMAND_NOT_FOUND` (exit 127 in a shell), `ERR_COMMAND_NOT_EXECUTABLE` (126)
 */
export function resolveCommand(command: string, env: Environment = process.env): string {
  if (command === '') throw new ShmfdError('ERR_COMMAND_NOT_FOUND', 'empty command name');
  const candidates = command.includes('/')
    ? [command]
    : (env.PATH ?? DEFAULT_PATH).split(':').map((dir) => path.join(dir === '' ? '.' : dir, command));
  let denied: ShmfdError | undefined;
  for (const candidate of candidates) {
    let stat: fs.Stats;
    try {
      stat = fs.statSync(candidate);
    } catch (err) {
      if (sys.isSystemError(err, 'EACCES')) denied ??= notExecutable(candidate, 'permission denied (EACCES)', err);
      continue;
    }
    if (stat.isDirectory()) {
      denied ??= notExecutable(candidate, 'is a directory');
      continue;
    }
    try {
      fs.accessSync(candidate, fs.constants.X_OK);
      if (stat.isFile()) return candidate;
      denied ??= notExecutable(candidate, 'not a regular file');
    } catch (err) {
      denied ??= notExecutable(candidate, 'permission denied (EACCES)', err);
    }
  }
  if (denied !== undefined) throw denied;
  throw new ShmfdError('ERR_COMMAND_NOT_FOUND', `${command}: command not found`);
}

function notExecutable(file: string, why: string, cause?: unknown): ShmfdError {
  return new ShmfdError('ERR_COMMAND_NOT_EXECUTABLE', `cannot execute ${file}: ${why}`, cause === undefined ? undefined : { cause });
}

/**
 * Whether this process may hold a descriptor numbered `fd` or above (the open-file limit,
 * ulimit -n), found by duplicating the open descriptor `probe` there and closing the copy.
 * {@link execReplace} stages every descriptor above its targets: a wrapper asks this first,
 * to fail with a clear message before it does anything.
 */
export function roomForDescriptor(fd: number, probe: number): boolean {
  try {
    sys.close(sys.dupAbove(probe, fd));
    return true;
  } catch {
    return false;
  }
}

/**
 * The exit status a shell gives for a command it cannot start: 127 when it is not found,
 * 126 when it cannot be executed; undefined for an error that is about something else.
 * {@link resolveCommand}'s errors say which by their code. With `fromExec`, `err` is what
 * execve(2) or spawn failed with: ENOENT is "not found", anything else "cannot execute".
 */
export function commandErrorStatus(err: unknown, fromExec: true): 126 | 127;
export function commandErrorStatus(err: unknown, fromExec?: boolean): 126 | 127 | undefined;
export function commandErrorStatus(err: unknown, fromExec = false): 126 | 127 | undefined {
  let notFound: boolean;
  if (err instanceof ShmfdError && (err.code === 'ERR_COMMAND_NOT_FOUND' || err.code === 'ERR_COMMAND_NOT_EXECUTABLE')) {
    notFound = err.code === 'ERR_COMMAND_NOT_FOUND';
  } else if (fromExec) {
    notFound = sys.isSystemError(err, 'ENOENT');
  } else {
    return undefined;
  }
  return notFound ? 127 : 126;
}

/*
 * Node decodes its arguments and environment as UTF-8 and replaces bytes that are not
 * (a Latin-1 file name, say) with U+FFFD: passed on as such, they would reach the program
 * changed. Such strings are looked up among this process's own arguments and environment
 * as the kernel holds them, and the original bytes are passed instead.
 */
const REPLACEMENT_CHARACTER = '\uFFFD';

function nulSeparated(file: string): Buffer[] {
  let bytes: Buffer;
  try {
    bytes = fs.readFileSync(file);
  } catch {
    return [];
  }
  const items: Buffer[] = [];
  for (let start = 0; start < bytes.length; ) {
    let end = bytes.indexOf(0, start);
    if (end < 0) end = bytes.length;
    items.push(bytes.subarray(start, end));
    start = end + 1;
  }
  return items;
}

/** `args`, with each one that Node decoded lossily from this process's own arguments replaced by its bytes. */
function rawArguments(args: readonly string[]): (string | Buffer)[] {
  if (!args.some((arg) => arg.includes(REPLACEMENT_CHARACTER))) return [...args];
  // process.argv is [node, script, ...arguments]; the kernel's copy ends with the same arguments.
  const own = process.argv.slice(2);
  const raw = nulSeparated('/proc/self/cmdline').slice(-own.length);
  if (own.length === 0 || raw.length !== own.length || raw.some((bytes, i) => bytes.toString() !== own[i])) return [...args];
  const used = new Set<number>();
  return args.map((arg) => {
    if (!arg.includes(REPLACEMENT_CHARACTER)) return arg;
    const index = own.findIndex((candidate, i) => candidate === arg && !used.has(i));
    if (index < 0) return arg;
    used.add(index);
    return raw[index] as Buffer;
  });
}

let rawEnvironment: Map<string, Buffer> | undefined;

/** `KEY=value`, as the bytes this process got when Node decoded them lossily into `value`. */
function rawEnvironmentEntry(key: string, value: string): string | Buffer {
  const entry = `${key}=${value}`;
  if (!value.includes(REPLACEMENT_CHARACTER)) return entry;
  rawEnvironment ??= new Map(
    nulSeparated('/proc/self/environ').map((bytes) => [bytes.subarray(0, Math.max(0, bytes.indexOf(0x3d))).toString(), bytes]),
  );
  const raw = rawEnvironment.get(key);
  return raw !== undefined && raw.toString() === entry ? raw : entry;
}

/** Where a descriptor goes in the new program. */
export interface FdPlacement {
  /** An open descriptor of this process. */
  from: number;
  /** The number it gets in the program. */
  to: number;
}

/** What to run in place of this process. */
export interface ExecRequest {
  /** Command name or path; looked up in `env.PATH` (see {@link resolveCommand}). */
  command: string;
  args: readonly string[];
  env: Environment;
  /**
   * Descriptors the program gets at given numbers. Besides these and stdio, only the
   * descriptors the caller handed down to this process pass through, at their numbers
   * (see {@link callerFds} and docs/exec.md); Node's own and the program's are closed.
   */
  fds: readonly FdPlacement[];
  /** Prefix of the one line written if execve fails (default `shmfd`). */
  programName?: string;
}

/**
 * Replaces this process with `request.command` (same pid). Never returns: when execve
 * itself fails, it writes one line to stderr and ends the process with status 126 (or 127
 * for a vanished file), because by then Node's own descriptors are gone.
 *
 * Errors found before anything is changed (command not found, not executable, bad
 * descriptors) are thrown, and the process is left intact.
 */
export function execReplace(request: ExecRequest): never {
  const file = resolveCommand(request.command, request.env);
  const env = Object.entries(request.env)
    .filter((entry): entry is [string, string] => entry[1] !== undefined)
    .map(([key, value]) => rawEnvironmentEntry(key, value));
  const argv = [request.command, ...rawArguments(request.args)];
  // EBADF from the kernel for a source that is not open, before anything is changed.
  for (const { from } of request.fds) sys.getFdFlags(from);
  const highest = Math.max(3, ...request.fds.flatMap(({ from, to }) => [from, to])) + 1;
  const sources = new Set(request.fds.map(({ from }) => from));
  const targets = new Set(request.fds.map(({ to }) => to));
  const passThrough = callerFds(request.env).filter((fd) => !sources.has(fd) && !targets.has(fd));
  // Move every source out of the way first, so that placing one never clobbers another.
  // Done while nothing is changed yet: no room above the targets (ulimit -n) is an error
  // that leaves the process intact.
  const staged: FdPlacement[] = [];
  try {
    for (const { from, to } of request.fds) staged.push({ from: sys.dupAbove(from, highest), to });
  } catch (err) {
    for (const { from } of staged) sys.close(from);
    throw err;
  }

  // Node writes its compile cache at exit, which an exec never reaches (flushCompileCache:
  // Node 22.10 and later; not in @types/node 20).
  (module as { flushCompileCache?: () => void }).flushCompileCache?.();
  // Past this point the process is committed: no JavaScript that touches libuv runs again.
  sys.resetSignalsForExec();
  for (let fd = 0; fd <= 2; fd++) {
    if (!sys.isOpen(fd)) continue;
    sys.setCloexec(fd, false);
    // Node may have made stdio non-blocking; most programs don't expect EAGAIN on stdout.
    sys.setNonBlocking(fd, false);
  }
  sys.cloexecFrom(3);
  for (const fd of passThrough) sys.setCloexec(fd, false);
  // fd 3 is usually libuv's epoll descriptor: overwriting it is the last thing before execve.
  for (const { from, to } of staged) sys.dup2(from, to, false);
  try {
    try {
      sys.execve(file, argv, env);
    } catch (err) {
      // A script without "#!": execvp(3) and shells run it with /bin/sh.
      if (!sys.isSystemError(err, 'ENOEXEC')) throw err;
      sys.execve('/bin/sh', ['sh', file, ...argv.slice(1)], env);
    }
  } catch (err) {
    const message = err instanceof Error ? err.message : String(err);
    try {
      fs.writeSync(2, `${request.programName ?? 'shmfd'}: cannot execute ${request.command}: ${message}\n`);
    } finally {
      sys.exitNow(commandErrorStatus(err, true));
    }
  }
}
