/**
 * The contract between the state file and the structures it holds: what a structure needs
 * from its container, and how the container drives a structure. Not exported from the
 * package.
 * @module
 * @internal
 */
import type { SnapshotWriter } from '../snapshot/writer.js';

/** The state file as the structures it contains see it. */
export interface StructureContainer {
  /** The file's one snapshot writer. */
  readonly writer: SnapshotWriter;
  /** Something changed since the last commit. */
  markDirty(): void;
  /** Publishes the current state of every structure; see `StateFile.commit`. */
  commit(): boolean;
  /**
   * Bytes `[start, end)` of `view` (a view of the mapped file) hold what the snapshot
   * about to be published names for the first time: tells the restore host to copy their
   * pages (docs/restore.md, "Incremental rounds"). Called from `encode`, after the bytes
   * were written and before the snapshot is published.
   */
  written(view: Uint8Array, start: number, end: number): void;
}

/** How the state file drives a structure. */
export interface Structure {
  /**
   * Writes the structure's two payload u64s (as u32 pairs) from u32 index `word`, and
   * reports through {@link StructureContainer.written} the bytes this commit makes live.
   */
  encode(u32: Uint32Array, word: number): void;
  /** The snapshot whose payload `encode` just wrote was published at stream `offset`. */
  published(offset: number): void;
}

/**
 * Reports stream positions `[from, to)` of a ring (position `p` is `ring[p % ring.length]`)
 * as written: one range, or two when it wraps, or the whole ring.
 */
export function writtenRing(container: StructureContainer, ring: Uint8Array, from: number, to: number): void {
  const n = ring.length;
  if (to <= from) return;
  if (to - from >= n) {
    container.written(ring, 0, n);
    return;
  }
  const a = from % n;
  const b = a + (to - from);
  if (b <= n) {
    container.written(ring, a, b);
  } else {
    container.written(ring, a, n);
    container.written(ring, 0, b - n);
  }
}
