/**
 * Whose descriptors are these? A Node process holds descriptors of its own (libuv's epoll,
 * eventfds, signal pipes) next to those its caller passed, and Node blurs the difference
 * at start. This module tells them apart, for exec (pass the caller's through) and for
 * reading `LISTEN_FDS` (a claimed descriptor that is Node's own was never passed).
 * @module
 */
import fs from 'node:fs';
import { createRequire } from 'node:module';
import * as sys from './system.js';

/** The kinds of descriptor a Node runtime opens for itself: epoll and event descriptors. */
export function isRuntimeKind(target: string): boolean {
  return target.startsWith('anon_inode:[eventpoll]') || target.startsWith('anon_inode:[eventfd]');
}

/** The kind of an open descriptor as /proc shows it, e.g. `socket:[123]`, `/memfd:x (deleted)`. */
export function fdTarget(fd: number): string | undefined {
  try {
    return fs.readlinkSync(`/proc/self/fd/${fd}`);
  } catch {
    return undefined;
  }
}

/**
 * At start, Node (libuv's uv_disable_stdio_inheritance) marks descriptors 0..15 close-on-exec,
 * and then every one after them up to the first that is not open, whether it opened them
 * or not; past that, only its own are close-on-exec (libuv opens everything with O_CLOEXEC).
 */
const NODE_ALWAYS_MARKS_BELOW = 16;

/**
 * The descriptors (>= 3) open in a process (this one by default), with what /proc shows
 * for each; empty when its table cannot be read (another user's process, or gone).
 */
function openFds(pid: number | 'self' = 'self'): Map<number, string> {
  const targets = new Map<number, string>();
  let entries: string[];
  try {
    entries = fs.readdirSync(`/proc/${pid}/fd`);
  } catch {
    return targets;
  }
  for (const entry of entries) {
    const fd = Number(entry);
    if (fd < 3) continue;
    try {
      targets.set(fd, fs.readlinkSync(`/proc/${pid}/fd/${entry}`));
    } catch {
      // Closed meanwhile (the directory listing's own descriptor, for this process).
    }
  }
  return targets;
}

/**
 * The descriptors open when this module was loaded, before the program (or the CLI) opened
 * anything of its own: only these can have come from the caller. Their targets name the
 * same open file later only if the number was not closed and reused in between.
 */
const openAtLoad = openFds();

/** The socket of Node's inspector (`--inspect`), which is Node's own, or undefined. */
function inspectorPort(): number | undefined {
  let url: string | undefined;
  try {
    // Loaded here, not imported: a Node built without the inspector throws on loading it.
    const inspector = createRequire(import.meta.url)('node:inspector') as typeof import('node:inspector');
    url = inspector.url();
  } catch {
    return undefined;
  }
  if (url === undefined) return undefined;
  const port = Number(new URL(url).port);
  return Number.isInteger(port) && port > 0 ? port : undefined;
}

function isInspectorSocket(fd: number, target: string, port: number | undefined): boolean {
  if (port === undefined || !target.startsWith('socket:')) return false;
  try {
    const info = sys.socketInfo(fd);
    return info.listening && info.address !== undefined && 'port' in info.address && info.address.port === port;
  } catch {
    return false;
  }
}

/**
 * The descriptors (>= 3) this process inherited from its caller, which an exec wrapper
 * passes through. Only descriptors already open when this module was loaded count (what
 * the program opened since is its own). Past the range Node marked at start they are
 * exactly those without close-on-exec. Within it the flag tells nothing, so they are told
 * apart from Node's own by kind: Node's are epoll and event descriptors, pipes whose both
 * ends it holds (unless the parent holds the same pipe, as make does with its jobserver),
 * and the inspector's socket. The range is estimated from the descriptors open at load
 * (Node's own may have filled the gap that ended it at start, which only widens the range
 * to more of Node's own, told apart by kind).
 */
export function callerFds(): number[] {
  const targets = new Map([...openFds()].filter(([fd, target]) => openAtLoad.get(fd) === target));
  let markedUpTo = NODE_ALWAYS_MARKS_BELOW - 1;
  while (openAtLoad.has(markedUpTo + 1)) markedUpTo++;
  const ends = new Map<string, number>();
  for (const target of targets.values()) ends.set(target, (ends.get(target) ?? 0) + 1);
  let parents: Set<string> | undefined;
  const port = inspectorPort();
  const isNodesOwn = (fd: number, target: string): boolean => {
    if (isRuntimeKind(target) || isInspectorSocket(fd, target, port)) return true;
    if (!target.startsWith('pipe:') || (ends.get(target) ?? 0) < 2) return false;
    parents ??= new Set(openFds(process.ppid).values());
    return !parents.has(target);
  };
  const inherited: number[] = [];
  for (const [fd, target] of targets) {
    if ((sys.getFdFlags(fd) & sys.FD_CLOEXEC) === 0) inherited.push(fd);
    else if (fd <= markedUpTo && !isNodesOwn(fd, target)) inherited.push(fd);
  }
  return inherited.sort((a, b) => a - b);
}
