/**
 * Whose descriptors are these? A Node process holds descriptors of its own (libuv's epoll,
 * eventfds, signal pipes) next to those its caller passed, and Node blurs the difference
 * at start. This module tells them apart, for exec (pass the caller's through) and for
 * reading `LISTEN_FDS` (a claimed descriptor that is Node's own was never passed).
 * @module
 */
import fs from 'node:fs';
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
 * The descriptors (>= 3) this process inherited from its caller, which an exec wrapper
 * passes through. Past the range Node marked at start they are exactly those without
 * close-on-exec. Within it the flag tells nothing, so they are told apart from Node's own
 * by kind: Node's are epoll and event descriptors and pipes whose both ends it holds. The
 * range is estimated from the descriptors open now (Node's own may have filled the gap that
 * ended it at start, which only widens the range to more of Node's own, told apart by kind).
 */
export function callerFds(): number[] {
  const targets = new Map<number, string>();
  for (const entry of fs.readdirSync('/proc/self/fd')) {
    const fd = Number(entry);
    if (fd < 3) continue;
    // The directory listing's own descriptor is closed by now: no target.
    const target = fdTarget(fd);
    if (target !== undefined) targets.set(fd, target);
  }
  let markedUpTo = NODE_ALWAYS_MARKS_BELOW - 1;
  while (targets.has(markedUpTo + 1)) markedUpTo++;
  const ends = new Map<string, number>();
  for (const target of targets.values()) ends.set(target, (ends.get(target) ?? 0) + 1);
  const inherited: number[] = [];
  for (const [fd, target] of targets) {
    if (!sys.isOpen(fd)) continue;
    if ((sys.getFdFlags(fd) & sys.FD_CLOEXEC) === 0) inherited.push(fd);
    else if (fd <= markedUpTo && !isRuntimeKind(target) && !(target.startsWith('pipe:') && (ends.get(target) ?? 0) > 1)) {
      inherited.push(fd);
    }
  }
  return inherited.sort((a, b) => a - b);
}
