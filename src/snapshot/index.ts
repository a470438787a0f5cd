/**
 * The entry `shmfd/snapshot`: crash-consistent snapshots in a file's memory, over plain
 * bytes (a `Uint8Array`), in the format of docs/snapshot-format.md, byte-compatible with the
 * Rust crate `shm-snapshot` 0.2.
 * It loads no koffi and nothing of Node's but what every module has, so it works on any
 * OS, e.g. to read a backup copied elsewhere. Each name is described in docs/api.md.
 * @module
 */
export { SnapshotFormatError, type SnapshotErrorCode } from './errors.js';
export { PAGE, parseHead, readSlots, snapshotRanges, type Snapshot, type SnapshotLayout, type DiscoveredHead } from './format.js';
export { ConfigureFile, type SnapshotConfig } from './config.js';
export { SnapshotFile, type FileDiscovery } from './file.js';
export { type SnapshotWriter, type PreparedTransaction, type CommitResult } from './writer.js';
