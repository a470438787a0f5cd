/**
 * Typed-array access to a mapped snapshot file, shared by the discovery and the writer.
 * Not exported from the package.
 * @module
 * @internal
 */
import { SnapshotFormatError } from './errors.js';
import { PAGE, SLOT, SLOT_SIZE, type Snapshot, type SnapshotLayout } from './format.js';

/** u32 index of the head's `write_offset` (low half). */
export const WRITE_OFFSET_WORD = 0x18 / 4;

const SLOT_WORDS_START = PAGE / 4;
const WORDS_PER_SLOT_SHIFT = Math.log2(SLOT_SIZE / 4);

/** u32 index of slot `index`'s `offset` (low half). */
export function slotWord(index: number): number {
  // Integer arithmetic only: this sits on the commit path.
  return (index << WORDS_PER_SLOT_SHIFT) + SLOT_WORDS_START;
}

/** Distance in u32 words from a slot's `offset` to its `length`. */
export const LENGTH_WORDS = SLOT.length / 4;

/**
 * x86 compiles `Atomics.store` to a full barrier. Elsewhere (aarch64: `stlr`) a release
 * store does not keep *later* plain stores from overtaking it; a following acquire load
 * does, which is what an invalidation needs before the ring bytes change.
 */
export const NEEDS_FENCE = process.arch !== 'x64' && process.arch !== 'ia32';

export class Memory {
  readonly bytes: Uint8Array;
  readonly u32: Uint32Array;
  readonly u64: BigUint64Array;
  /** A private word for the fence of {@link holds}. */
  readonly #fence = new Int32Array(1);

  constructor(bytes: Uint8Array) {
    if (bytes.byteOffset % 8 !== 0) {
      throw new SnapshotFormatError('ERR_SNAPSHOT_ALIGNMENT', `the mapped memory must start 8-byte aligned (byteOffset ${bytes.byteOffset})`);
    }
    this.bytes = bytes;
    this.u32 = new Uint32Array(bytes.buffer, bytes.byteOffset, Math.floor(bytes.length / 4));
    this.u64 = new BigUint64Array(bytes.buffer, bytes.byteOffset, Math.floor(bytes.length / 8));
  }

  get length(): number {
    return this.bytes.length;
  }

  /** The `length` of slot `index`, or -1 when it does not fit a number below 2^32. */
  slotLength(index: number): number {
    const w = slotWord(index) + LENGTH_WORDS;
    if (Atomics.load(this.u32, w + 1) !== 0) return -1;
    return Atomics.load(this.u32, w);
  }

  /**
   * Stores `length = 0` into slot `index`. Our own slots have a zero high half, so one
   * 32-bit atomic store empties the whole u64 at once; foreign ones get a 64-bit store.
   */
  clearSlot(index: number): void {
    const w = slotWord(index) + LENGTH_WORDS;
    if (this.u32[w + 1] !== 0) Atomics.store(this.u64, w >> 1, 0n);
    else Atomics.store(this.u32, w, 0);
  }

  /** True when slot `snapshot.index` still holds exactly `snapshot`. */
  holds(layout: SnapshotLayout, snapshot: Snapshot): boolean {
    const { index } = snapshot;
    if (!Number.isInteger(index) || index < 0 || index >= layout.entries) return false;
    const w = slotWord(index);
    // The reader copied the ring bytes with plain loads before this check. An acquire load
    // does not keep earlier loads before it (aarch64 may finish them later, when the writer
    // already overwrote them); a read-modify-write (acquire and release) does.
    Atomics.add(this.#fence, 0, 0);
    // Length first: a writer stores the offset before publishing the length.
    const length = this.slotLength(index);
    const offset = Atomics.load(this.u32, w + 1) * 0x1_0000_0000 + Atomics.load(this.u32, w);
    return length === snapshot.length && offset === snapshot.offset;
  }

  /** Copies `length` ring bytes from stream position `offset` into `into`. */
  copyOut(layout: SnapshotLayout, offset: number, length: number, into: Uint8Array): void {
    const start = layout.dataStart;
    const pos = offset % layout.data;
    const first = layout.data - pos;
    if (length <= first) {
      into.set(this.bytes.subarray(start + pos, start + pos + length));
    } else {
      into.set(this.bytes.subarray(start + pos, start + layout.data));
      into.set(this.bytes.subarray(start, start + length - first), first);
    }
  }

  /** The tail as bytes and as u64 words (whole words only). */
  tail(layout: SnapshotLayout): { bytes: Uint8Array; u64: BigUint64Array } {
    const bytes = this.bytes.subarray(layout.tailStart, layout.tailStart + layout.tailLength);
    const u64 = new BigUint64Array(this.bytes.buffer, this.bytes.byteOffset + layout.tailStart, Math.floor(layout.tailLength / 8));
    return { bytes, u64 };
  }
}
