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
}

/** How the state file drives a structure. */
export interface Structure {
  /** Writes the structure's two payload u64s (as u32 pairs) from u32 index `word`. */
  encode(u32: Uint32Array, word: number): void;
  /** The snapshot whose payload `encode` just wrote was published at stream `offset`. */
  published(offset: number): void;
}
