/**
 * The writer: appends snapshots with the corrected protocol of docs/snapshot-format.md.
 * @module
 */
import { SnapshotFormatError } from './errors.js';
import { readSlots, streamEnd, type DiscoveredHead, type Snapshot, type SnapshotLayout } from './format.js';
import { LENGTH_U32, NEEDS_FENCE, WRITE_OFFSET_U32, slotU32, storeU64, type MappedSnapshot } from './mapped.js';
import { SnapshotReader } from './reader.js';

const TWO_32 = 0x1_0000_0000;
/** Payloads up to this many bytes are copied byte by byte (measured: faster than `set`). */
const SMALL_PAYLOAD = 16;

/** What {@link SnapshotWriter.commitWith} returns for a published snapshot. */
export interface CommitResult<T> {
  /** Slot the snapshot was published in. */
  readonly index: number;
  /** What the step returned. */
  readonly value: T;
}

/**
 * A snapshot being written, handed to the step of {@link SnapshotWriter.commitWith}.
 * Its payload is in the ring but not published; the step may rewrite it in place,
 * change the tail, or {@link abort}. Usable only while the step runs (synchronously).
 */
export class PreparedTransaction {
  #writer: SnapshotWriter;
  #open = false;
  #aborted = false;
  #index = 0;
  #offset = 0;
  #length = 0;
  #ringPos = 0;

  /** @internal created by the writer, one per writer, reused for every commit. */
  constructor(writer: SnapshotWriter) {
    this.#writer = writer;
  }

  /** Slot the snapshot will be published in. */
  get index(): number {
    return this.#index;
  }

  /** Stream position of the payload's first byte. */
  get offset(): number {
    return this.#offset;
  }

  /** Payload length; {@link replace} can never make it longer. */
  get length(): number {
    return this.#length;
  }

  /** True after {@link abort}. */
  get aborted(): boolean {
    return this.#aborted;
  }

  /** The tail bytes (the same view as {@link SnapshotWriter.tail}). */
  get tail(): Uint8Array {
    this.#check();
    return this.#writer.tail;
  }

  /** The tail as u64 words (the same view as {@link SnapshotWriter.tailU64}). */
  get tailU64(): BigUint64Array {
    this.#check();
    return this.#writer.tailU64;
  }

  /**
   * Overwrites the start of the payload with `bytes`; the published length stays the one
   * given to `commitWith`.
   * @throws {@link SnapshotFormatError} `ERR_SNAPSHOT_PAYLOAD_SIZE` when `bytes` is longer
   *   than the payload, `ERR_SNAPSHOT_TRANSACTION_CLOSED` after the step returned
   */
  replace(bytes: Uint8Array): void {
    this.#check();
    if (bytes.length > this.#length) {
      throw new SnapshotFormatError('ERR_SNAPSHOT_PAYLOAD_SIZE', `a replacement of ${bytes.length} bytes is longer than the ${this.#length}-byte payload`);
    }
    this.#writer.writeRing(this.#ringPos, bytes);
  }

  /** Drops the snapshot: nothing is published, and its slot stays empty. */
  abort(): void {
    this.#check();
    this.#aborted = true;
  }

  /** @internal */
  open(index: number, offset: number, length: number, ringPos: number): void {
    this.#index = index;
    this.#offset = offset;
    this.#length = length;
    this.#ringPos = ringPos;
    this.#aborted = false;
    this.#open = true;
  }

  /** @internal */
  close(): void {
    this.#open = false;
  }

  #check(): void {
    if (!this.#open) {
      throw new SnapshotFormatError('ERR_SNAPSHOT_TRANSACTION_CLOSED', 'the transaction is only usable while its commitWith step runs');
    }
  }
}

/**
 * Appends snapshots to a configured file. There must be one writer per file at a time
 * (across all processes); readers may run concurrently.
 *
 * Obtain one from {@link SnapshotFile.configure} or {@link SnapshotFile.intoWriter}.
 */
export class SnapshotWriter extends SnapshotReader {
  /** Layout of the file. */
  readonly layout: SnapshotLayout;
  /** The tail: the program's own area after the data ring. */
  readonly tail: Uint8Array;
  /** The tail as native (little-endian) u64 words. */
  readonly tailU64: BigUint64Array;

  private readonly mapped: MappedSnapshot;
  private readonly bytes: Uint8Array;
  private readonly u32: Uint32Array;
  private readonly ringStart: number;
  private readonly data: number;
  private readonly entries: number;
  private readonly entryMask: number;
  private readonly tx: PreparedTransaction;
  /** Offset of each slot we consider published, -1 for an empty one. */
  private readonly offsets: Float64Array;
  private stream: number;
  private ringPos: number;
  /** Slot the next commit publishes in. */
  private next = 0;
  /**
   * Published slots form a ring range `oldest .. next-1` (`rangeLength` slots, holes
   * allowed) whose offsets grow, so invalidation walks forward from `oldest` and stops
   * at the first slot it need not touch: no scan per commit.
   */
  private oldest = 0;
  private rangeLength = 0;
  /**
   * Payloads must be shorter than this: `data`, or 0 while a commitWith step runs, so a
   * single comparison also refuses nested commits.
   */
  private payloadLimit: number;

  /**
   * @internal use {@link SnapshotFile.configure} or {@link SnapshotFile.intoWriter}.
   * Takes over the slots of `head`: the valid ones that follow the ring order stay,
   * every other slot that claims a snapshot is emptied.
   */
  constructor(mapped: MappedSnapshot, head: DiscoveredHead, initialOffset: number) {
    const layout: SnapshotLayout = {
      entries: head.entries,
      data: head.data,
      sequencePages: head.sequencePages,
      dataPages: head.dataPages,
      dataStart: head.dataStart,
      tailStart: head.tailStart,
      tailLength: head.tailLength,
      fileLength: head.fileLength,
    };
    super(mapped, layout);
    this.mapped = mapped;
    this.bytes = mapped.bytes;
    this.u32 = mapped.u32;
    this.layout = layout;
    this.ringStart = head.dataStart;
    this.data = head.data;
    this.entries = head.entries;
    this.entryMask = head.entries - 1;
    this.payloadLimit = head.data;
    const tail = mapped.tail(head);
    this.tail = tail.bytes;
    this.tailU64 = tail.u64;
    this.offsets = new Float64Array(head.entries).fill(-1);
    this.tx = new PreparedTransaction(this);
    this.stream = Math.max(head.writeOffset, initialOffset);
    this.adopt(readSlots(mapped.bytes, head));
    this.ringPos = this.stream % this.data;
  }

  /** Stream position of the next write. */
  get writeOffset(): number {
    return this.stream;
  }

  /** Slot the next commit publishes in. */
  get nextIndex(): number {
    return this.next;
  }

  /** Largest payload a commit accepts: `data - 1` bytes. */
  get maxPayload(): number {
    return this.data - 1;
  }

  /**
   * Publishes `payload` as a new snapshot.
   * @returns the slot index it was published in
   * @throws {@link SnapshotFormatError} `ERR_SNAPSHOT_PAYLOAD_SIZE` unless
   *   `1 <= payload.length <= data - 1`; `ERR_SNAPSHOT_BUSY` from inside a commitWith step
   */
  commit(payload: Uint8Array): number {
    const n = payload.length;
    if (n === 0 || n >= this.payloadLimit) this.reject(n);
    const index = this.reserve(n);
    const pos = this.ringPos;
    if (n <= this.data - pos) {
      const at = this.ringStart + pos;
      // A call into TypedArray.prototype.set costs more than copying a few bytes.
      if (n <= SMALL_PAYLOAD) for (let i = 0; i < n; i++) this.bytes[at + i] = payload[i]!;
      else this.bytes.set(payload, at);
    } else {
      this.writeRing(pos, payload);
    }
    this.publish(index, n);
    return index;
  }

  /**
   * Writes `payload` into the ring, runs `step` with the prepared transaction, then
   * publishes the snapshot, unless the step aborted or threw (then the slot stays empty
   * and the next commit reuses the same position). The step runs synchronously: do not
   * hand the transaction to asynchronous code.
   *
   * @returns the slot and the step's value, or `undefined` when the step aborted
   * @throws whatever the step throws; {@link SnapshotFormatError} as for {@link commit}
   */
  commitWith<T>(payload: Uint8Array, step: (tx: PreparedTransaction) => T): CommitResult<T> | undefined {
    const n = payload.length;
    if (n === 0 || n >= this.payloadLimit) this.reject(n);
    const index = this.reserve(n);
    this.writeRing(this.ringPos, payload);
    const tx = this.tx;
    tx.open(index, this.stream, n, this.ringPos);
    this.payloadLimit = 0;
    let value: T;
    try {
      value = step(tx);
    } finally {
      this.payloadLimit = this.data;
      tx.close();
    }
    if (tx.aborted) return undefined;
    this.publish(index, n);
    return { index, value };
  }

  /** The snapshot in slot `index`, or `undefined` when the slot is empty. */
  snapshotAt(index: number): Snapshot | undefined {
    if (!Number.isInteger(index) || index < 0 || index >= this.entries) return undefined;
    const length = this.mapped.slotLength(index);
    if (length <= 0) return undefined;
    const at = slotU32(index);
    return { index, offset: Atomics.load(this.u32, at + 1) * TWO_32 + Atomics.load(this.u32, at), length };
  }

  /** The valid snapshots, oldest first. */
  valid(): Snapshot[] {
    const out: Snapshot[] = [];
    for (let k = 0, i = this.oldest; k < this.rangeLength; k++, i = (i + 1) & this.entryMask) {
      const offset = this.offsets[i] ?? -1;
      const length = offset < 0 ? 0 : this.mapped.slotLength(i);
      if (length > 0) out.push({ index: i, offset, length });
    }
    return out;
  }

  /** The newest valid snapshot (largest offset), if any; see {@link SnapshotReader.newest}. */
  newest(): Snapshot | undefined {
    for (let k = this.rangeLength - 1; k >= 0; k--) {
      const i = (this.oldest + k) & this.entryMask;
      const offset = this.offsets[i] ?? -1;
      const length = offset < 0 ? 0 : this.mapped.slotLength(i);
      if (length > 0) return { index: i, offset, length };
    }
    return undefined;
  }

  /**
   * Empties every published slot of this writer whose snapshot starts before stream
   * position `position`, oldest first. A program calls this before it modifies tail data
   * that those older snapshots refer to (a double buffer reusing its spare copy): once it
   * returns, no reader or restore host can trust them any more, so the modification can
   * never be seen as part of a valid snapshot. Costs O(1) amortized: every slot is
   * emptied at most once per publication.
   *
   * Each slot is emptied before the tail stores that follow can become visible (see
   * docs/snapshot-format.md, "Ordering").
   * @returns the number of slots emptied
   */
  invalidateBefore(position: number): number {
    const offsets = this.offsets;
    let oldest = this.oldest;
    let range = this.rangeLength;
    let cleared = 0;
    while (range > 0) {
      const offset = offsets[oldest]!; // in bounds: oldest < entries
      if (offset >= position) break;
      if (offset >= 0) {
        this.mapped.clearSlot(oldest);
        offsets[oldest] = -1;
        cleared++;
      }
      oldest = (oldest + 1) & this.entryMask;
      range--;
    }
    this.oldest = oldest;
    this.rangeLength = range;
    return cleared;
  }

  /** @internal writes ring bytes at ring position `pos`. */
  writeRing(pos: number, src: Uint8Array): void {
    const first = this.data - pos;
    if (src.length <= first) {
      this.bytes.set(src, this.ringStart + pos);
    } else {
      this.bytes.set(src.subarray(0, first), this.ringStart + pos);
      this.bytes.set(src.subarray(first), this.ringStart);
    }
  }

  /**
   * Protocol step 2: empties every slot whose bytes the write of `n` bytes will
   * overwrite (offset older than `end - data`), and the slot about to be reused.
   */
  private reserve(n: number): number {
    const end = this.stream + n;
    // The same bound that parseHead puts on a stored write_offset: a file must stay readable.
    if (end > Number.MAX_SAFE_INTEGER - this.data) {
      throw new SnapshotFormatError('ERR_SNAPSHOT_BAD_OFFSET', 'the stream position would pass 2^53 - data');
    }
    const limit = end - this.data;
    const offsets = this.offsets;
    let oldest = this.oldest;
    let range = this.rangeLength;
    // Steady state: the oldest slot is the one to reuse or to invalidate, or none is.
    while (range > 0) {
      const offset = offsets[oldest]!; // in bounds: oldest < entries
      // A full range means `oldest` is the slot `next` reuses, whatever its offset.
      if (offset >= limit && range < this.entries) break;
      if (offset >= 0) {
        this.mapped.clearSlot(oldest);
        offsets[oldest] = -1;
      }
      oldest = (oldest + 1) & this.entryMask;
      range--;
    }
    this.oldest = oldest;
    this.rangeLength = range;
    return this.next;
  }

  /** Protocol steps 5 to 7. */
  private publish(index: number, n: number): void {
    const start = this.stream;
    const end = start + n;
    const u32 = this.u32;
    // Plain stores are enough for these: the length store below is atomic and orders them.
    storeU64(u32, WRITE_OFFSET_U32, end);
    const at = slotU32(index);
    storeU64(u32, at, start);
    // The slot was emptied as a whole u64, so its high length word is already 0 and this
    // single store publishes the complete length. It needs release order only: every
    // store above must be visible first. The memory is a plain ArrayBuffer shared with
    // other processes, which the JavaScript memory model does not speak of, so what holds
    // is what V8 emits: stores in program order. On x86 (TSO) stores are never reordered
    // with older stores, so a plain store is a release store, and `Atomics.store` (an
    // xchg, a full barrier) would only add ~8 ns to every commit. Elsewhere (aarch64)
    // `Atomics.store` compiles to a release store (stlr).
    if (NEEDS_FENCE) Atomics.store(u32, at + LENGTH_U32, n);
    else u32[at + LENGTH_U32] = n;
    this.offsets[index] = start;
    this.rangeLength++;
    this.next = (index + 1) & this.entryMask;
    this.stream = end;
    const pos = this.ringPos + n;
    this.ringPos = pos >= this.data ? pos - this.data : pos;
  }

  private reject(n: number): never {
    if (this.payloadLimit === 0) {
      throw new SnapshotFormatError('ERR_SNAPSHOT_BUSY', 'a commit cannot start inside a commitWith step');
    }
    throw new SnapshotFormatError('ERR_SNAPSHOT_PAYLOAD_SIZE', `a payload must have 1 to ${this.data - 1} bytes, got ${n}`);
  }

  /**
   * Rebuilds the published range from recovered slots so that the protocol keeps every
   * slot it leaves claiming data intact. Writing continues past the end of every slot,
   * so no write lands on bytes a slot claims before the slot is emptied; slots the ring
   * no longer holds from there (older than `data` bytes before it) go. Walking back from the
   * newest, it keeps each slot whose offset does not grow: invalidation walks the range
   * in that order and stops at the first slot it need not touch. Every other slot that
   * claims data is emptied now, before any write: later it could not be emptied in time.
   */
  private adopt(recovered: Snapshot[]): void {
    const end = streamEnd(this.stream, recovered);
    this.stream = end;
    const slots = recovered.filter((s) => s.offset >= end - this.data);
    const newest = slots[slots.length - 1];
    const kept = new Uint8Array(this.entries);
    if (newest !== undefined) {
      const byIndex: (Snapshot | undefined)[] = new Array<Snapshot | undefined>(this.entries);
      for (const s of slots) byIndex[s.index] = s;
      let bound = newest.offset;
      let oldest = newest.index;
      for (let k = 0; k < this.entries; k++) {
        const i = (newest.index - k) & this.entryMask;
        const s = byIndex[i];
        if (s === undefined || s.offset > bound) continue;
        kept[i] = 1;
        this.offsets[i] = s.offset;
        bound = s.offset;
        oldest = i;
      }
      this.oldest = oldest;
      this.rangeLength = ((newest.index - oldest) & this.entryMask) + 1;
      this.next = (newest.index + 1) & this.entryMask;
    }
    for (let i = 0; i < this.entries; i++) {
      if (kept[i] === 0 && this.mapped.slotLength(i) !== 0) this.mapped.clearSlot(i);
    }
  }
}
