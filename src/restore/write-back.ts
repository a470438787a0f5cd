/**
 * The restore host's last step: writing the quiescent memory back to the backup,
 * atomically, once the program has exited; in snapshot mode only a memory that holds a
 * valid snapshot may replace it.
 * @module
 */
import path from 'node:path';
import type { Log } from '../base/log.js';
import type { MemoryFile } from '../fds/memory-file.js';
import { SnapshotFormatError } from '../snapshot/errors.js';
import { describeError } from '../system/libc.js';
import type { BackupFile, BackupState } from './backup.js';
import { directorySyncWarning, persistAtomically, refusedForRoom, type PersistResult } from './persist.js';
import { formatBytes, formatDuration, withProgress } from './progress.js';
import { readSlotState, type SlotState } from '../snapshot/pread.js';
import { quiescentCopyFixup } from './snapshotter.js';

/** The backup on disk as the final write-back must respect it. */
export interface DurableState {
  /** A backup with content exists (found at start, or persisted since). */
  exists: boolean;
  /** Its number of valid snapshots. */
  snapshots: number;
}

/** Options of {@link writeBack}. */
export interface WriteBackOptions {
  /** The memory is a snapshot file (`--snapshot`): it may replace the backup only when valid. */
  snapshot: boolean;
  log: Log;
  /** Show progress of a slow copy on a terminal. */
  progress: boolean;
  /** What the backup holds before the write-back ({@link Snapshotter.finish}); `previous` by default. */
  backupState?: BackupState;
  /**
   * When the whole copy finds no room: writes what differs in place instead
   * ({@link Snapshotter.persistDifferences}), returning what the backup holds then.
   */
  writeInPlace?: () => Promise<BackupState>;
}

/**
 * The final write-back of quiescent memory: `written` when the memory is now the backup,
 * `kept` when nothing needed writing (the backup, if any, stays as it was: the reason has
 * been logged), `failed` when the write failed (the old backup stays, the reason logged).
 */
export async function writeBack(
  backup: BackupFile,
  durable: DurableState,
  memory: MemoryFile,
  options: WriteBackOptions,
): Promise<'written' | 'kept' | 'failed'> {
  const { log } = options;
  let size: number;
  let expected: SlotState | undefined;
  try {
    size = memory.size;
    if (options.snapshot) {
      const verdict = checkFinalSnapshot(memory.fd, size, durable);
      if (typeof verdict === 'string') {
        if (durable.exists) log.warn(`${verdict}; ${options.backupState === 'torn' ? backup.whatIsLeft('torn') : `the backup ${backup.path} is kept as it was`}`);
        else if (size > 0) log.warn(`${verdict}; nothing was written to ${backup.path}`);
        return 'kept';
      }
      expected = verdict;
    }
  } catch (err) {
    log.error(`cannot read the memory for the final write-back: ${describeError(err)}; the backup ${backup.path} is kept as it was`);
    return 'failed';
  }
  let state = options.backupState ?? 'previous';
  // Asked once the copy failed: what is at the backup's path then is what the line describes.
  const left = () => (state === 'newest' ? backup.whatIsLeft(state) : `${backup.whatIsLeft(state)}, the newest state is lost`);
  let released = false;
  let result: PersistResult | undefined;
  try {
    result = await withProgress(`shm-restore: writing back to ${path.basename(backup.path)}`, options.progress, (progress) =>
      persistAtomically(backup, memory.fd, size, {
        fixup: expected === undefined ? undefined : quiescentCopyFixup(expected),
        progress,
        // The host is done with the memory: unless the fd store (or a grandchild) holds it
        // too, its pages are freed while the copy is synced.
        releaseSource: () => {
          released = true;
          memory.close();
        },
      }),
    );
  } catch (err) {
    if (refusedForRoom(err) && !released && state !== 'newest' && options.writeInPlace !== undefined) {
      state = await options.writeInPlace();
    }
    log.error(`the final write-back to ${backup.path} failed: ${describeError(err)}; ${left()}`);
    return 'failed';
  }
  if (result === undefined) {
    log.error(`the final write-back to ${backup.path} failed: the memory changed during the copy (is another process still writing to it?); ${left()}`);
    return 'failed';
  }
  const unsynced = directorySyncWarning(backup, result);
  if (unsynced !== undefined) log.warn(unsynced);
  const t = result.timings;
  log.info(
    `wrote back ${formatBytes(result.size)} to ${backup.path} (${formatBytes(result.copied)} of data): ` +
      `copy ${formatDuration(t.copyMs)}, validate ${formatDuration(t.validateMs)}, fsync ${formatDuration(t.fsyncMs)}, rename ${formatDuration(t.renameMs)}`,
  );
  return 'written';
}

/**
 * In snapshot mode, the memory may replace the backup only when it is a valid snapshot
 * file with at least one valid snapshot.
 * @returns the memory's slots, or why it must not replace the backup
 */
function checkFinalSnapshot(fd: number, size: number, durable: DurableState): SlotState | string {
  if (size === 0) return 'the memory is empty';
  let state: SlotState | undefined;
  try {
    state = readSlotState(fd, size);
  } catch (err) {
    if (err instanceof SnapshotFormatError) return `the memory is not a valid snapshot file (${err.message})`;
    throw err;
  }
  if (state === undefined) return 'the program never configured its memory as a snapshot file';
  // It would restore nothing; and a start without the record refuses such a file as damaged.
  if (state.slots.length === 0) return durable.snapshots > 0 ? 'the memory holds no valid snapshot but the backup does' : 'the memory holds no valid snapshot';
  return state;
}
