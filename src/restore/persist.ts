/**
 * Atomic persistence of a memory file to the backup: a temporary file next to the backup
 * (mode 0600), a sparse copy, an optional fix-up, its size and digest recorded in an
 * extended attribute, the old backup's permission bits (and owner, in a root host),
 * `fsync`, `rename` over the backup,
 * `fsync` of the directory. A crash at any instant leaves the old backup or the new one;
 * every path out of here that this process controls removes the temporary file.
 * @module
 */
import fs from 'node:fs';
import { recordBackupCheck, type BackupFile } from './backup.js';
import { isSystemError } from '../system/libc.js';
import { copySparse, type CopyProgress } from './copy.js';

/** Milliseconds spent in each step of a persist. */
export interface PersistTimings {
  copyMs: number;
  validateMs: number;
  fsyncMs: number;
  renameMs: number;
}

/** A persisted backup. */
export interface PersistResult {
  /** Size of the new backup. */
  size: number;
  /** Bytes copied (the data extents of the source). */
  copied: number;
  timings: PersistTimings;
  /**
   * The backup's status once written (after the rename, which changes its ctime): a later
   * look at the file that finds another inode or ctime knows someone else changed it.
   */
  written: fs.BigIntStats;
  /**
   * Set when the rename worked but the directory's fsync failed: the new backup is in
   * place, but a power loss may still bring back the previous one.
   */
  directorySyncError?: unknown;
}

/**
 * Checks, and may fix, the copy in the temporary file before it is made durable. Runs
 * right after the copy ended. Returns false to discard the copy.
 */
export type PersistFixup = (tempFd: number, size: number) => boolean;

/** Options of {@link persistAtomically}. */
export interface PersistOptions {
  fixup?: PersistFixup;
  /** Aborts between chunks of the copy and before the rename; the old backup stays. */
  signal?: AbortSignal;
  progress?: CopyProgress;
  /**
   * Called once nothing more is read from the source (after the copy and the fix-up),
   * while the temporary file is being synced: closing the last descriptor of a large
   * memfd here frees its pages during the fsync instead of after it.
   */
  releaseSource?: () => void;
}

const TEMP_FLAGS = fs.constants.O_RDWR | fs.constants.O_CREAT | fs.constants.O_EXCL;

/** True for a write refused for lack of room (`ENOSPC`, or `EDQUOT` past a quota). */
export function refusedForRoom(err: unknown): boolean {
  return isSystemError(err, 'ENOSPC') || isSystemError(err, 'EDQUOT');
}

/**
 * Writes the first `size` bytes of `source` to `backup` atomically.
 * @returns the result, or undefined when the fix-up discarded the copy
 * @throws the error of the failing step (ENOSPC, EIO, ...) or the abort reason; the old
 *   backup is then untouched and the temporary file removed
 */
export async function persistAtomically(
  backup: BackupFile,
  source: number,
  size: number,
  options: PersistOptions = {},
): Promise<PersistResult | undefined> {
  const temp = backup.tempPath();
  const handle = await fs.promises.open(temp, TEMP_FLAGS, 0o600);
  let renamed = false;
  try {
    const t0 = performance.now();
    const { copied } = await copySparse(source, handle.fd, size, { signal: options.signal, progress: options.progress });
    const t1 = performance.now();
    if (options.fixup !== undefined && !options.fixup(handle.fd, size)) return undefined;
    await recordBackupCheck(handle.fd, size, options.signal);
    await backup.giveAttributes(handle);
    const t2 = performance.now();
    const synced = handle.sync();
    try {
      options.releaseSource?.();
    } finally {
      await synced;
    }
    options.signal?.throwIfAborted();
    const t3 = performance.now();
    await fs.promises.rename(temp, backup.path);
    renamed = true;
    const written = await handle.stat({ bigint: true });
    // After the rename, not before: a torn backup waiting for its journal must never be
    // left without it. A journal left by a crash here names the old file's inode, which
    // the new file (it existed beside the old one) cannot have: it is discarded at start.
    await removeJournal(backup);
    const directorySyncError = await syncDirectory(backup.dir).then(
      () => undefined,
      (err: unknown) => err,
    );
    const t4 = performance.now();
    return { size, copied, timings: { copyMs: t1 - t0, validateMs: t2 - t1, fsyncMs: t3 - t2, renameMs: t4 - t3 }, written, directorySyncError };
  } finally {
    await handle.close().catch(() => undefined);
    if (!renamed) await fs.promises.unlink(temp).catch(() => undefined);
  }
}

/** The warning for a {@link PersistResult} whose directory fsync failed, or undefined. */
export function directorySyncWarning(backup: BackupFile, result: PersistResult): string | undefined {
  if (result.directorySyncError === undefined) return undefined;
  const err = result.directorySyncError;
  const reason = err instanceof Error ? err.message : String(err);
  return `the new backup ${backup.path} is in place, but syncing its directory failed (${reason}): a power loss may still bring back the previous one`;
}

/** Makes a rename in `dir` durable. */
export async function syncDirectory(dir: string): Promise<void> {
  const handle = await fs.promises.open(dir, fs.constants.O_RDONLY | fs.constants.O_DIRECTORY);
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}

/**
 * Removes the journal of in-place rounds (journal.ts), if any; the caller syncs the
 * directory.
 * @returns whether there was one
 */
export async function removeJournal(backup: BackupFile): Promise<boolean> {
  try {
    await fs.promises.unlink(backup.journalPath);
    return true;
  } catch (err) {
    if (isSystemError(err, 'ENOENT')) return false;
    throw err;
  }
}
