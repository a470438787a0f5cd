/**
 * Typed-array views of a mapped snapshot file and the atomic accesses the protocol makes
 * through them (docs/snapshot-format.md), shared by the discovery and the writer. Not
 * exported from the package.
 * @module
 * @internal
 */
import { SnapshotFormatError } from './errors.js';
import { HEAD, PAGE, SLOT, SLOT_SIZE, type Snapshot, type SnapshotLayout } from './format.js';

/** Index in the file's u32 array of the low half of the head's `write_offset`. */
export const WRITE_OFFSET_U32 = HEAD.writeOffset / 4;

const SLOTS_U32 = PAGE / 4;
const U32_PER_SLOT_SHIFT = Math.log2(SLOT_SIZE / 4);

/** Index in the file's u32 array of the low half of slot `index`'s `offset`. */
export function slotU32(index: number): number {
  // Integer arithmetic only: this sits on the commit path.
  return (index << U32_PER_SLOT_SHIFT) + SLOTS_U32;
}

/** Distance in u32 elements from a slot's `offset` to its `length`. */
export const LENGTH_U32 = SLOT.length / 4;

/** Stores `value` (an integer below 2^53) as a little-endian u64 at u32 index `at`. */
export function storeU64(u32: Uint32Array, at: number, value: number): void {
  u32[at] = value >>> 0;
  u32[at + 1] = (value / 0x1_0000_0000) >>> 0;
}

/**
 * x86 compiles `Atomics.store` to a full barrier. Elsewhere (aarch64: `stlr`) a release
 * store does not keep *later* plain stores from overtaking it; a following acquire load
 * does, which is what an invalidation needs before the ring bytes change.
 */
export const NEEDS_FENCE = process.arch !== 'x64' && process.arch !== 'ia32';

/** The whole mapped snapshot file as bytes, u32 and u64 elements. */
export class MappedSnapshot {
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
    const at = slotU32(index) + LENGTH_U32;
    if (Atomics.load(this.u32, at + 1) !== 0) return -1;
    return Atomics.load(this.u32, at);
  }

  /**
   * Stores `length = 0` into slot `index`, ordered before every store that follows (the
   * ring or tail bytes the slot's snapshot refers to). The one way a slot is emptied.
   *
   * Our own slots have a zero high half, so one 32-bit store empties the whole u64; a
   * foreign one gets a 64-bit atomic store. On x86 (TSO) stores become visible in program
   * order and V8 emits them in program order, so a plain store is enough and this stays
   * cheap on the commit path (`Atomics.store` is an `xchg` there, ~8 ns per commit).
   * Elsewhere an atomic store followed by an acquire load keeps later stores behind it.
   */
  clearSlot(index: number): void {
    const at = slotU32(index) + LENGTH_U32;
    if (this.u32[at + 1] !== 0) Atomics.store(this.u64, at >> 1, 0n);
    else if (NEEDS_FENCE) Atomics.store(this.u32, at, 0);
    else this.u32[at] = 0;
    if (NEEDS_FENCE) Atomics.load(this.u32, at);
  }

  /** True when slot `snapshot.index` still holds exactly `snapshot`. */
  holds(layout: SnapshotLayout, snapshot: Snapshot): boolean {
    const { index } = snapshot;
    if (!Number.isInteger(index) || index < 0 || index >= layout.entries) return false;
    const at = slotU32(index);
    // The reader copied the ring bytes with plain loads before this check. An acquire load
    // does not keep earlier loads before it (aarch64 may finish them later, when the writer
    // already overwrote them); a read-modify-write (acquire and release) does.
    Atomics.add(this.#fence, 0, 0);
    // Length first: a writer stores the offset before publishing the length.
    const length = this.slotLength(index);
    const offset = Atomics.load(this.u32, at + 1) * 0x1_0000_0000 + Atomics.load(this.u32, at);
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

  /** The tail as bytes and as u64 elements (whole ones only). */
  tail(layout: SnapshotLayout): { bytes: Uint8Array; u64: BigUint64Array } {
    const bytes = this.bytes.subarray(layout.tailStart, layout.tailStart + layout.tailLength);
    const u64 = new BigUint64Array(this.bytes.buffer, this.bytes.byteOffset + layout.tailStart, Math.floor(layout.tailLength / 8));
    return { bytes, u64 };
  }
}
