/**
 * Reading the snapshots of a mapped file: what a recovered file (`FileDiscovery`) and a
 * writer (`SnapshotWriter`) both offer, written once.
 * @module
 */
import { SnapshotFormatError } from './errors.js';
import { checkSnapshot, type Snapshot, type SnapshotLayout } from './format.js';
import type { MappedSnapshot } from './mapped.js';

/**
 * The snapshots of a mapped file, and their bytes. Concurrent readers copy a snapshot with
 * {@link read} and then check {@link isCurrent}: while it is still true, the bytes copied
 * are the ones committed (the writer empties a slot before it overwrites its bytes, and
 * stream positions never repeat).
 */
export abstract class SnapshotReader {
  readonly #mapped: MappedSnapshot;
  readonly #layout: SnapshotLayout;

  /** @internal */
  protected constructor(mapped: MappedSnapshot, layout: SnapshotLayout) {
    this.#mapped = mapped;
    this.#layout = layout;
  }

  /** The valid snapshots, oldest first. */
  abstract valid(): Snapshot[];

  /**
   * The newest valid snapshot (largest offset), if any: the last of {@link valid}, found
   * without building the others (a recovery that resumes from it needs only this one).
   */
  abstract newest(): Snapshot | undefined;

  /**
   * Copies a snapshot's bytes. When another process may be writing, check
   * {@link isCurrent} afterwards: the bytes are intact if it is still true.
   * @param into destination; a new array of `snapshot.length` bytes by default
   * @returns `into`, or the part of it that was filled when it is longer than the snapshot
   * @throws {@link SnapshotFormatError} `ERR_SNAPSHOT_BAD_SNAPSHOT` for a snapshot that
   *   cannot belong to this ring; `ERR_SNAPSHOT_PAYLOAD_SIZE` when `into` is too short
   */
  read(snapshot: Pick<Snapshot, 'offset' | 'length'>, into?: Uint8Array): Uint8Array {
    const layout = this.#layout;
    checkSnapshot(layout, snapshot);
    const out = into ?? new Uint8Array(snapshot.length);
    if (out.length < snapshot.length) {
      throw new SnapshotFormatError('ERR_SNAPSHOT_PAYLOAD_SIZE', `${snapshot.length} bytes do not fit a ${out.length}-byte buffer`);
    }
    this.#mapped.copyOut(layout, snapshot.offset, snapshot.length, out);
    return out.length === snapshot.length ? out : out.subarray(0, snapshot.length);
  }

  /** True when slot `snapshot.index` still holds exactly this snapshot. */
  isCurrent(snapshot: Snapshot): boolean {
    return this.#mapped.holds(this.#layout, snapshot);
  }
}
