/**
 * Sparse file-to-file copy with `sendfile(2)`: only the data extents of the source are
 * copied (found with `lseek(SEEK_DATA/SEEK_HOLE)`, which memfds and ext4 support), and the
 * destination is sized first, so holes stay holes. A 100 MB memfd with 1 MB in use costs
 * 1 MB of I/O. Nothing is mapped: a source that shrinks under the copy ends it early
 * instead of killing the process with SIGBUS.
 * @module
 */
import fs from 'node:fs';
import * as sys from '../system/libc.js';

const SEEK_SET = 0;
/**
 * Bytes per `sendfile` call (and per read of other whole-file passes). Each call blocks
 * the event loop; 16 MiB is a few milliseconds, so signals are still forwarded promptly
 * during a gigabyte copy.
 */
export const CHUNK = 16 * 2 ** 20;

/** Called after every chunk with the bytes copied so far and the bytes in data extents seen so far. */
export type CopyProgress = (copied: number, total: number) => void;

/** Options of {@link copySparse}. */
export interface CopySparseOptions {
  /** Progress callback, called after every chunk. */
  progress?: CopyProgress;
  /** Checked between chunks; an aborted copy throws the signal's reason. */
  signal?: AbortSignal;
}

/** What a copy did. */
export interface CopyResult {
  /** Bytes actually copied (the data extents); fewer when the source shrank during the copy. */
  copied: number;
}

/** The data extents of `fd` within `[0, size)`, as `[start, end)` pairs. */
export function dataExtents(fd: number, size: number): [number, number][] {
  const extents: [number, number][] = [];
  let pos = 0;
  while (pos < size) {
    let start: number;
    try {
      start = sys.lseek(fd, pos, sys.SEEK_DATA);
    } catch (err) {
      // A file system without SEEK_DATA support: treat the rest as data.
      if (sys.isSystemError(err, 'EINVAL')) {
        extents.push([pos, size]);
        break;
      }
      throw err;
    }
    if (start < 0 || start >= size) break;
    const hole = sys.lseek(fd, start, sys.SEEK_HOLE);
    const end = hole < 0 || hole > size ? size : hole;
    if (end <= start) break;
    extents.push([start, end]);
    pos = end;
  }
  return extents;
}

/**
 * A new open file description of the file behind `fd`, with its own file offset.
 * `lseek` and `sendfile` move the offset of the description they are given, and a
 * descriptor passed to a program shares its description with the host's: seeking on
 * that one would move the program's offset under it.
 */
function ownDescription(fd: number, flags: string): number {
  return fs.openSync(`/proc/self/fd/${fd}`, flags);
}

/**
 * Copies the first `size` bytes of `source` into `dest`, which must be empty or hold
 * nothing that matters: it is truncated to `size` first, then only the source's data
 * extents are written. Yields to the event loop between chunks. The file offsets of
 * `source` and `dest` stay where they were (the copy seeks on descriptions of its own).
 */
export async function copySparse(
  source: number,
  dest: number,
  size: number,
  options: CopySparseOptions = {},
): Promise<CopyResult> {
  sys.ftruncate(dest, size);
  const from = ownDescription(source, 'r');
  let to: number | undefined;
  try {
    to = ownDescription(dest, 'r+');
    return await copyExtents(from, to, size, options);
  } finally {
    fs.closeSync(from);
    if (to !== undefined) fs.closeSync(to);
  }
}

async function copyExtents(source: number, dest: number, size: number, options: CopySparseOptions): Promise<CopyResult> {
  const extents = dataExtents(source, size);
  const total = extents.reduce((sum, [start, end]) => sum + end - start, 0);
  let copied = 0;
  let sinceYield = 0;
  for (const [start, end] of extents) {
    sys.lseek(dest, start, SEEK_SET);
    let at = start;
    while (at < end) {
      options.signal?.throwIfAborted();
      const n = sys.sendfile(dest, source, at, Math.min(CHUNK, end - at));
      if (n === 0) return { copied };
      at += n;
      copied += n;
      sinceYield += n;
      options.progress?.(copied, total);
      if (sinceYield >= CHUNK) {
        sinceYield = 0;
        await yieldToLoop();
      }
    }
  }
  return { copied };
}

/** Lets the event loop run (signal handlers, timers) before the next chunk. */
export function yieldToLoop(): Promise<void> {
  return new Promise((resolve) => setImmediate(resolve));
}
