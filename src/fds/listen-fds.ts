/**
 * The systemd descriptor-passing convention (sd_listen_fds(3)): `LISTEN_FDS`,
 * `LISTEN_FDNAMES`, `LISTEN_PID`, and listenfd's `LISTEN_FDS_FIRST_FD` (docs/fd-passing.md).
 * Reading what a parent passed, looking descriptors up by name, and describing what to pass on.
 * @module
 */
import { ShmfdError } from '../base/errors.js';
import { fdTarget, parentOf } from '../system/proc.js';
import * as sys from '../system/libc.js';

/** The first passed descriptor when `LISTEN_FDS_FIRST_FD` is not set. */
export const DEFAULT_FIRST_FD = 3;
/** The smallest first descriptor that reaches a program run by a Node parent (node --watch, nodemon; see docs/sockets.md). */
export const NODE_SAFE_FIRST_FD = 17;
/** The name of a passed descriptor when `LISTEN_FDNAMES` is absent. */
export const UNKNOWN_NAME = 'unknown';

const MAX_FD = 0x7fffffff;
const MAX_NAME_LENGTH = 255;

/** A descriptor passed in by a parent, at its number, with its name. */
export interface PassedFd {
  fd: number;
  name: string;
}

/** Environment variables, as in `process.env`. */
export type Environment = Record<string, string | undefined>;

/** Options of {@link readListenFds}. */
export interface ReadListenFdsOptions {
  /** The environment to read (default `process.env`). */
  env?: Environment;
  /** The pid the descriptors must be meant for (default: this process). */
  pid?: number;
  /** Mark the descriptors close-on-exec, as libsystemd does (default true). */
  cloexec?: boolean;
  /** Remove the variables from `env` afterwards so children don't misread them (default false). */
  unsetEnv?: boolean;
}

function parseDecimal(variable: string, value: string, min: number, max: number): number {
  if (!/^[0-9]+$/.test(value)) {
    throw new ShmfdError('ERR_LISTEN_FDS_INVALID', `${variable}=${value} is not a decimal number`);
  }
  const n = Number(value);
  if (!Number.isSafeInteger(n) || n < min || n > max) {
    throw new ShmfdError('ERR_LISTEN_FDS_INVALID', `${variable}=${value} is out of range (${min}..${max})`);
  }
  return n;
}

function isAncestor(candidate: number, of: number): boolean {
  for (let pid = parentOf(of), depth = 0; pid !== undefined && depth < 64; pid = parentOf(pid), depth++) {
    if (pid === candidate) return true;
  }
  return false;
}

/**
 * Whom `LISTEN_PID` says the descriptors are for, seen from `pid`:
 * - `'self'`: missing (accepted, as listenfd does) or equal to `pid`;
 * - `'ancestor'`: a process that `pid` descends from, which handed the descriptors down
 *   through a tool that re-spawns its program (`watch`, `node --watch`, nodemon);
 * - `'other'`: anybody else: the descriptors are not ours.
 */
export function listenPidTarget(env: Environment = process.env, pid: number = process.pid): 'self' | 'ancestor' | 'other' {
  const value = env.LISTEN_PID;
  if (value === undefined) return 'self';
  const target = parseDecimal('LISTEN_PID', value, 1, MAX_FD);
  if (target === pid) return 'self';
  // pid 1 is everybody's ancestor but re-spawns nobody's program: its descriptors are its own.
  return target !== 1 && isAncestor(target, pid) ? 'ancestor' : 'other';
}

/**
 * Reads the descriptors passed in the environment, with the exact semantics of
 * sd_listen_fds(3) plus listenfd's extensions:
 * - no `LISTEN_FDS`: none;
 * - `LISTEN_PID` naming a process other than this one or one of its ancestors (pid 1
 *   excepted): none;
 * - `LISTEN_PID` naming an ancestor, and a descriptor in the range not open (or the
 *   runtime's own): none, they are variables the ancestor left behind;
 * - `LISTEN_FDS`, `LISTEN_PID` or `LISTEN_FDS_FIRST_FD` not a decimal number in range: error;
 * - `LISTEN_FDNAMES` with another count of names than `LISTEN_FDS`: error;
 * - `LISTEN_FDNAMES` absent: every descriptor is named `unknown`;
 * - otherwise, a descriptor in the range that is not open: error.
 * @throws ShmfdError `ERR_LISTEN_FDS_INVALID`, `ERR_LISTEN_FDNAMES_MISMATCH`, `ERR_FD_NOT_PASSED`
 */
export function readListenFds(options: ReadListenFdsOptions = {}): PassedFd[] {
  const env = options.env ?? process.env;
  const listed = parseListenEnv(env, options.pid ?? process.pid);
  if (listed === undefined) return [];
  // Check before building anything of size `count`: a bogus LISTEN_FDS=2000000000 must be
  // an error at the first closed descriptor, not an out-of-memory abort.
  const fds: PassedFd[] = [];
  for (let i = 0; i < listed.count; i++) {
    const passed = checkPassed(listed, i);
    if (passed === undefined) return [];
    fds.push(passed);
  }
  if (options.cloexec !== false) for (const { fd } of fds) sys.setCloexec(fd, true);
  if (options.unsetEnv === true) {
    for (const key of ['LISTEN_FDS', 'LISTEN_FDNAMES', 'LISTEN_PID', 'LISTEN_FDS_FIRST_FD']) delete env[key];
  }
  return fds;
}

/**
 * The first descriptor passed under `name`, with the semantics of {@link readListenFds}
 * but checking only that descriptor: a program that closed another passed descriptor
 * (its memory file, a socket it stopped serving) can still look up the rest.
 * @throws the errors of {@link readListenFds}, `ERR_FD_NOT_PASSED` only for this descriptor
 */
export function findListenFd(name: string, options: Pick<ReadListenFdsOptions, 'env' | 'pid'> = {}): PassedFd | undefined {
  const listed = parseListenEnv(options.env ?? process.env, options.pid ?? process.pid);
  if (listed === undefined) return undefined;
  for (let i = 0; i < listed.count; i++) {
    if ((listed.names?.[i] ?? UNKNOWN_NAME) !== name) continue;
    const passed = checkPassed(listed, i);
    if (passed !== undefined) sys.setCloexec(passed.fd, true);
    return passed;
  }
  return undefined;
}

interface ListenEnv {
  first: number;
  count: number;
  names: string[] | undefined;
  meantFor: 'self' | 'ancestor';
}

/** The `LISTEN_*` variables, checked; undefined when there are none for this process. */
function parseListenEnv(env: Environment, pid: number): ListenEnv | undefined {
  const countText = env.LISTEN_FDS;
  if (countText === undefined) return undefined;
  const meantFor = listenPidTarget(env, pid);
  if (meantFor === 'other') return undefined;
  // 0..2 are stdio, never passed descriptors: the start is at least 3.
  const first =
    env.LISTEN_FDS_FIRST_FD === undefined
      ? DEFAULT_FIRST_FD
      : parseDecimal('LISTEN_FDS_FIRST_FD', env.LISTEN_FDS_FIRST_FD, DEFAULT_FIRST_FD, MAX_FD);
  const count = parseDecimal('LISTEN_FDS', countText, 0, MAX_FD - first);
  let names: string[] | undefined;
  if (env.LISTEN_FDNAMES !== undefined) {
    // An empty LISTEN_FDNAMES is one empty name; with LISTEN_FDS=0 it stands for none.
    names = count === 0 && env.LISTEN_FDNAMES === '' ? [] : env.LISTEN_FDNAMES.split(':');
    if (names.length !== count) {
      throw new ShmfdError('ERR_LISTEN_FDNAMES_MISMATCH', `LISTEN_FDNAMES has ${names.length} names but LISTEN_FDS=${count}`);
    }
  }
  return { first, count, names, meantFor };
}

/**
 * Descriptor `i` of the list, if it was passed; undefined when it is not open and the
 * variables came from an ancestor (left behind after it used and closed its descriptors,
 * which libsystemd would conclude from the pid alone).
 * @throws ShmfdError `ERR_FD_NOT_PASSED`
 */
function checkPassed(listed: ListenEnv, i: number): PassedFd | undefined {
  const fd = listed.first + i;
  const name = listed.names?.[i] ?? UNKNOWN_NAME;
  const target = sys.isOpen(fd) ? (fdTarget(fd) ?? '') : undefined;
  // Not open, or an anonymous kernel object (epoll, io_uring, eventfd: what a runtime opens
  // for its event loop, never a service's socket or file): nothing was passed at this number.
  if (target === undefined || target.startsWith('anon_inode:')) {
    if (listed.meantFor === 'ancestor') return undefined;
    if (target === undefined) throw new ShmfdError('ERR_FD_NOT_PASSED', `LISTEN_FDS=${listed.count} but descriptor ${fd} (${name}) is not open`);
    throw new ShmfdError('ERR_FD_NOT_PASSED', `LISTEN_FDS=${listed.count} but descriptor ${fd} (${name}) was not passed: it is Node's own ${target}`);
  }
  return { fd, name };
}

/** The first passed descriptor with this name, if any. Names are not unique: the first wins. */
export function findPassedFd(fds: readonly PassedFd[], name: string): PassedFd | undefined {
  return fds.find((f) => f.name === name);
}

/**
 * Checks a name for `LISTEN_FDNAMES` and `FDNAME=`: ASCII 32..126 without `:`, at most 255
 * characters. An empty name is valid.
 * @throws ShmfdError `ERR_LISTEN_FDNAME_INVALID`
 */
export function checkFdName(name: string): string {
  if (name.length > MAX_NAME_LENGTH || !/^[\x20-\x39\x3b-\x7e]*$/.test(name)) {
    throw new ShmfdError(
      'ERR_LISTEN_FDNAME_INVALID',
      `invalid descriptor name ${JSON.stringify(name)}: use at most ${MAX_NAME_LENGTH} printable ASCII characters without ':'`,
    );
  }
  return name;
}

/** Options of {@link listenEnv}. */
export interface ListenEnvOptions {
  /** `LISTEN_PID`; undefined removes it (`--no-pid`). */
  pid: number | undefined;
  /** First descriptor number (default 3; other values set `LISTEN_FDS_FIRST_FD`). */
  first?: number;
}

/**
 * The `LISTEN_*` variables that describe `names` passed at `first, first+1, ...`: assign
 * them over an environment (an `undefined` value means: remove the variable).
 */
export function listenEnv(names: readonly string[], options: ListenEnvOptions): Environment {
  const first = options.first ?? DEFAULT_FIRST_FD;
  names.forEach(checkFdName);
  return {
    LISTEN_FDS: String(names.length),
    LISTEN_FDNAMES: names.join(':'),
    LISTEN_PID: options.pid === undefined ? undefined : String(options.pid),
    LISTEN_FDS_FIRST_FD: first === DEFAULT_FIRST_FD ? undefined : String(first),
  };
}

/** Applies {@link listenEnv}-style updates to a copy of `env`. */
export function withEnv(env: Environment, updates: Environment): Environment {
  const next: Environment = { ...env };
  for (const [key, value] of Object.entries(updates)) {
    if (value === undefined) delete next[key];
    else next[key] = value;
  }
  return next;
}
