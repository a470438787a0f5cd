/**
 * Positional reads to a length, for the files the host reads without mapping them (live
 * memfds, backups, journals): `pread` may return less than asked, and only the end of the
 * file ends a read early.
 * @module
 */
import fs from 'node:fs';

/**
 * Reads up to `length` bytes of `fd` from `position` into `buffer` from `offset` on.
 * @returns how many were read: fewer than `length` only where the file ends
 */
export function readAt(fd: number, buffer: Uint8Array, length: number, position: number, offset = 0): number {
  let done = 0;
  while (done < length) {
    const n = fs.readSync(fd, buffer, offset + done, length - done, position + done);
    if (n === 0) break;
    done += n;
  }
  return done;
}
