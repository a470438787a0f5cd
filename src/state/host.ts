/**
 * What a structure needs from the state file that holds it. Not exported from the package.
 * @module
 * @internal
 */
import type { SnapshotWriter } from '../snapshot/writer.js';

/** The state file as its structures see it. */
export interface StateHost {
  /** The file's one snapshot writer. */
  readonly writer: SnapshotWriter;
  /** Something changed since the last commit. */
  markDirty(): void;
  /** Publishes the current state of every structure; see `StateFile.commit`. */
  commit(): boolean;
}

/** How the state file drives a structure. */
export interface Structure {
  /** Writes the structure's two payload words (u64 as u32 pairs) at u32 index `word`. */
  encode(u32: Uint32Array, word: number): void;
  /** The snapshot whose payload `encode` just wrote was published at stream `offset`. */
  published(offset: number): void;
}

/** Stores `value` (an integer below 2^53) as a little-endian u64 at u32 index `word`. */
export function putU64(u32: Uint32Array, word: number, value: number): void {
  u32[word] = value >>> 0;
  u32[word + 1] = (value / 0x1_0000_0000) >>> 0;
}
