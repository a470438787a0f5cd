/**
 * What /proc tells about processes and their descriptors. Reading it has no effect and
 * loads nothing: modules that only ask about a descriptor import this one, not the scan
 * of the caller's descriptors in exec/caller-fds.ts.
 * @module
 */
import fs from 'node:fs';

/** The kind of an open descriptor as /proc shows it, e.g. `socket:[123]`, `/memfd:x (deleted)`. */
export function fdTarget(fd: number, pid: number | 'self' = 'self'): string | undefined {
  try {
    return fs.readlinkSync(`/proc/${pid}/fd/${fd}`);
  } catch {
    return undefined;
  }
}

const O_CLOEXEC = 0o2000000;

/** Scratch for {@link readStart}: what is asked of /proc is in the first lines. */
const head = Buffer.allocUnsafe(1024);

/**
 * The start of a /proc file (up to 1 KiB), as latin1. One open, read and close:
 * `readFileSync` of a file whose size reads as 0 costs several times more (measured: 20
 * fdinfo files in 2.7-7 ms against 0.73 ms), and exec takes the inventory at every start.
 * @throws what `open` or `read` throws
 */
function readStart(file: string): string {
  const fd = fs.openSync(file, 'r');
  try {
    return head.toString('latin1', 0, fs.readSync(fd, head, 0, head.length, 0));
  } finally {
    fs.closeSync(fd);
  }
}

/**
 * Whether descriptor `fd` of this process is close-on-exec, as /proc/self/fdinfo shows it
 * (its `flags` carry O_CLOEXEC for that); undefined when it is not open. The same answer as
 * fcntl(F_GETFD), without a call into libc.
 */
export function fdCloseOnExec(fd: number): boolean | undefined {
  let info: string;
  try {
    info = readStart(`/proc/self/fdinfo/${fd}`);
  } catch {
    return undefined;
  }
  const flags = /^flags:\s*([0-7]+)$/m.exec(info)?.[1];
  return flags === undefined ? undefined : (parseInt(flags, 8) & O_CLOEXEC) !== 0;
}

/** The parent pid of `pid`, from /proc; undefined once at the root or when unreadable. */
export function parentOf(pid: number): number | undefined {
  try {
    const stat = readStart(`/proc/${pid}/stat`);
    // The command name in parentheses may itself contain spaces and parentheses.
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    const ppid = Number(fields[1]);
    return ppid > 0 ? ppid : undefined;
  } catch {
    return undefined;
  }
}
