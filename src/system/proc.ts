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

/** The parent pid of `pid`, from /proc; undefined once at the root or when unreadable. */
export function parentOf(pid: number): number | undefined {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'latin1');
    // The command name in parentheses may itself contain spaces and parentheses.
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    const ppid = Number(fields[1]);
    return ppid > 0 ? ppid : undefined;
  } catch {
    return undefined;
  }
}
