/**
 * Crash-consistent snapshots in a shared-memory file: the format of docs/snapshot-format.md
 * and a typed API whose concepts follow the Rust crate `shm-snapshot` 0.2.
 * @module
 */
export { SnapshotFormatError, type SnapshotErrorCode } from './errors.js';
export {
  PAGE,
  MAGIC,
  HEAD,
  SLOT,
  SLOT_SIZE,
  SLOTS_PER_PAGE,
  MIN_FILE_LENGTH,
  MAX_DATA,
  MAX_ENTRIES,
  sequencePages,
  dataPages,
  dataStart,
  tailStart,
  tailLength,
  slotPosition,
  ringPosition,
  snapshotRanges,
  isPowerOfTwo,
  computeLayout,
  layoutFits,
  parseHead,
  readSlots,
  clearSlotsExcept,
  sameSnapshot,
  type Snapshot,
  type SnapshotLayout,
  type DiscoveredHead,
} from './format.js';
export { ConfigureFile, type SnapshotConfig } from './config.js';
export { SnapshotFile, FileDiscovery } from './file.js';
export type { SnapshotReader } from './reader.js';
export { SnapshotWriter, PreparedTransaction, type CommitResult } from './writer.js';
