/**
 * Whose descriptors are these? A Node process holds descriptors of its own (libuv's epoll,
 * io_uring, eventfds, signal pipes) next to those its caller handed down, and Node blurs
 * the difference at start. This module finds the caller's, for exec to pass them through.
 * @module
 */
import fs from 'node:fs';
import type { Environment } from '../fds/listen-fds.js';
import { fdCloseOnExec, fdTarget, parentOf } from '../system/proc.js';

/**
 * The descriptors (>= 3) of this process without close-on-exec, with their targets.
 *
 * Everything Node and libuv open is close-on-exec (O_CLOEXEC), on every Node line. So a
 * descriptor open without it was inherited. The converse does not hold: at start libuv
 * (uv_disable_stdio_inheritance) marks 0..15 close-on-exec, and then every descriptor after
 * 15 up to the first one not open, the caller's included; there the flag tells nothing.
 */
function inheritable(): Map<number, string> {
  const targets = new Map<number, string>();
  let entries: string[];
  try {
    entries = fs.readdirSync('/proc/self/fd');
  } catch {
    return targets;
  }
  for (const entry of entries) {
    const fd = Number(entry);
    if (fd < 3) continue;
    // Read from /proc, not with fcntl: taking this inventory loads no koffi. Most are
    // close-on-exec, so the flag is read first and only the others' targets. Not open
    // (undefined: the listing's own descriptor, or one closed meanwhile): not ours to pass.
    if (fdCloseOnExec(fd) !== false) continue;
    const target = fdTarget(fd);
    if (target !== undefined) targets.set(fd, target);
  }
  return targets;
}

/**
 * Taken when this module is loaded, before the program (or the CLI) opened anything: what
 * it opens later is its own, even without close-on-exec (a native addon's open(2)).
 */
const inheritableAtLoad = inheritable();

/**
 * The make jobserver's pipe descriptors that `MAKEFLAGS` names (`--jobserver-auth=R,W`,
 * or `--jobserver-fds=R,W` before GNU make 4.2; the last one counts, as in make). A
 * fifo jobserver (`--jobserver-auth=fifo:PATH`, make 4.4) names none.
 */
function jobserverFds(env: Environment): number[] {
  const found = [...(env.MAKEFLAGS ?? '').matchAll(/(?:^|\s)--jobserver-(?:auth|fds)=(\d+),(\d+)(?=\s|$)/g)].at(-1);
  return found === undefined ? [] : [Number(found[1]), Number(found[2])];
}

/**
 * Whether an ancestor of this process holds `target` (a pipe, named with its inode): such
 * a pipe existed before this process, so it was handed down, not opened by Node. An
 * ancestor whose table cannot be read (another user's) proves nothing.
 */
function heldByAncestor(target: string): boolean {
  for (let pid = parentOf(process.pid), depth = 0; pid !== undefined && depth < 64; pid = parentOf(pid), depth++) {
    let entries: string[];
    try {
      entries = fs.readdirSync(`/proc/${pid}/fd`);
    } catch {
      continue;
    }
    if (entries.some((entry) => fdTarget(Number(entry), pid) === target)) return true;
  }
  return false;
}

/**
 * The descriptors (>= 3) this process got from its caller, which an exec wrapper passes
 * through to the program it becomes (`env` is the program's environment):
 * - those open without close-on-exec when this module was loaded, and still the same file;
 * - the make jobserver's pipe that `MAKEFLAGS` in `env` names, when an ancestor holds that
 *   very pipe (make itself): Node marked it close-on-exec at start, and when make did not
 *   hand it down, Node's own descriptors sit at those numbers.
 * Nothing else: a descriptor the caller handed down at a number Node marked at start cannot
 * be told from Node's own (docs/exec.md says how to pass one anyway). `LISTEN_FDS`
 * descriptors are not found here; the caller of exec places them.
 */
export function callerFds(env: Environment = process.env): number[] {
  const fds = new Set<number>();
  for (const [fd, target] of inheritableAtLoad) if (fdTarget(fd) === target) fds.add(fd);
  for (const fd of jobserverFds(env)) {
    const target = fdTarget(fd);
    if (target?.startsWith('pipe:') === true && heldByAncestor(target)) fds.add(fd);
  }
  return [...fds].sort((a, b) => a - b);
}
