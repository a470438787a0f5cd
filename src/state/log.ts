/**
 * An append-only log of byte records in a tail region: appended records become part of
 * the state with the next commit, and committed bytes are never written again.
 * @module
 */
import { ShmfdError } from '../base/errors.js';
import { storeU64 } from '../snapshot/mapped.js';
import type { StructureContainer, Structure } from './structure.js';
import { RECORD_ALIGN, RECORD_HEADER } from './layout.js';

/** Bytes a record of `length` bytes takes in a log: header plus length rounded up to 8. */
export function recordBytes(length: number): number {
  return RECORD_HEADER + Math.ceil(length / RECORD_ALIGN) * RECORD_ALIGN;
}

/**
 * An append-only log of byte records (see docs/state.md). {@link append} writes a record
 * after the last one; the next commit of the state file makes every appended record part
 * of the committed state at once. Committed records are never modified, so every snapshot
 * that names a log length stays intact while it is valid.
 *
 * Records are length-prefixed and 8-byte aligned: a u32 length, the u32 bitwise NOT of the
 * length, the bytes, zero padding to a multiple of 8.
 */
export class AppendLog implements Structure {
  /** The name the log was declared under. */
  readonly name: string;
  /** Bytes available for records, headers and padding included. */
  readonly capacity: number;
  readonly #container: StructureContainer;
  readonly #bytes: Uint8Array;
  readonly #u32: Uint32Array;
  #end = 0;
  #count = 0;
  #committedEnd = 0;
  #committedCount = 0;

  /** @internal created by the state file. */
  constructor(container: StructureContainer, name: string, region: Uint8Array, capacity: number) {
    this.#container = container;
    this.name = name;
    this.capacity = capacity;
    this.#bytes = region.subarray(0, capacity);
    this.#u32 = new Uint32Array(region.buffer, region.byteOffset, capacity / 4);
  }

  /** Records, including the appended ones not committed yet. */
  get length(): number {
    return this.#count;
  }

  /** Records in the committed state. */
  get committedLength(): number {
    return this.#committedCount;
  }

  /** Bytes used, including records not committed yet. */
  get byteLength(): number {
    return this.#end;
  }

  /** Bytes used by the committed records. */
  get committedByteLength(): number {
    return this.#committedEnd;
  }

  /** Bytes still free (a record needs {@link recordBytes} of its length). */
  get available(): number {
    return this.capacity - this.#end;
  }

  /** Whether records were appended since the last commit. */
  get pending(): boolean {
    return this.#end !== this.#committedEnd;
  }

  /**
   * Writes `record` after the last record. It is part of the state once the state file
   * commits (call {@link commit}, or commit several structures at once).
   * @returns the record's index
   * @throws {@link ShmfdError} `ERR_STATE_RECORD_TOO_LARGE` when the record could never fit
   *   the log, `ERR_STATE_LOG_FULL` when it does not fit the space left; nothing is written
   */
  append(record: Uint8Array): number {
    const n = record.length;
    const size = recordBytes(n);
    const at = this.#end;
    if (at + size > this.capacity) throw this.#tooBig(n, size);
    const bytes = this.#bytes;
    const word = at >>> 2;
    // Header first: a crash mid-append then leaves a header that says how far the
    // uncommitted bytes reach, and recovery can clear them.
    this.#u32[word] = n;
    this.#u32[word + 1] = ~n >>> 0;
    bytes.set(record, at + RECORD_HEADER);
    const padded = at + size;
    // Whatever an uncommitted record left here earlier must not show in the padding.
    if ((n & 7) !== 0) bytes.fill(0, at + RECORD_HEADER + n, padded);
    this.#end = padded;
    this.#container.markDirty();
    return this.#count++;
  }

  /** Commits the whole state file (this log and every other structure). See `StateFile.commit`. */
  commit(): boolean {
    return this.#container.commit();
  }

  /**
   * Drops the records appended since the last commit and zeroes their bytes.
   * @returns how many records were dropped
   */
  discard(): number {
    const dropped = this.#count - this.#committedCount;
    this.#bytes.fill(0, this.#committedEnd, this.#end);
    this.#end = this.#committedEnd;
    this.#count = this.#committedCount;
    return dropped;
  }

  /**
   * The committed records, oldest first, as views into the shared memory (zero-copy; do
   * not modify them). Records committed while iterating are included.
   */
  *records(): IterableIterator<Uint8Array> {
    yield* this.#walk(0, () => this.#committedEnd);
  }

  /** The records appended since the last commit, as views (do not modify them). */
  *pendingRecords(): IterableIterator<Uint8Array> {
    yield* this.#walk(this.#committedEnd, () => this.#end);
  }

  /** Same as {@link records}. */
  [Symbol.iterator](): IterableIterator<Uint8Array> {
    return this.records();
  }

  /** @internal */
  encode(u32: Uint32Array, word: number): void {
    storeU64(u32, word, this.#end);
    storeU64(u32, word + 2, this.#count);
  }

  /** @internal */
  published(): void {
    this.#committedEnd = this.#end;
    this.#committedCount = this.#count;
  }

  /**
   * @internal Takes over the committed state `end`, `count` after checking that the
   * records up to `end` are well formed, and zeroes the uncommitted records after it.
   * @returns a description of the damage, or undefined
   */
  restore(end: number, count: number): string | undefined {
    if (end % RECORD_ALIGN !== 0 || end > this.capacity) return `log ${this.name}: committed length ${end} is not a multiple of 8 within its ${this.capacity} bytes`;
    const u32 = this.#u32;
    let at = 0;
    let n = 0;
    while (at < end) {
      const length = u32[at >>> 2]!;
      if (u32[(at >>> 2) + 1] !== ~length >>> 0 || at + recordBytes(length) > end) {
        return `log ${this.name}: record ${n} at byte ${at} has a damaged header`;
      }
      at += recordBytes(length);
      n++;
    }
    if (n !== count) return `log ${this.name}: the snapshot counts ${count} records, the log holds ${n}`;
    this.#end = this.#committedEnd = end;
    this.#count = this.#committedCount = count;
    this.#bytes.fill(0, end, this.#writtenAfter(end));
    return undefined;
  }

  /**
   * End of what uncommitted appends wrote after `end`: they form a chain of headers (each
   * written before its bytes); a torn header ends the chain and is included.
   */
  #writtenAfter(end: number): number {
    const u32 = this.#u32;
    let at = end;
    while (at + RECORD_HEADER <= this.capacity) {
      const length = u32[at >>> 2]!;
      const check = u32[(at >>> 2) + 1]!;
      if (length === 0 && check === 0) break;
      if (check !== ~length >>> 0) return at + RECORD_HEADER;
      at = Math.min(this.capacity, at + recordBytes(length));
    }
    return at;
  }

  *#walk(from: number, end: () => number): IterableIterator<Uint8Array> {
    let at = from;
    while (at < end()) {
      const length = this.#u32[at >>> 2]!;
      yield this.#bytes.subarray(at + RECORD_HEADER, at + RECORD_HEADER + length);
      at += recordBytes(length);
    }
  }

  #tooBig(n: number, size: number): ShmfdError {
    if (size > this.capacity) {
      return new ShmfdError('ERR_STATE_RECORD_TOO_LARGE', `log ${this.name}: a record of ${n} bytes needs ${size} bytes, more than the log's capacity of ${this.capacity}`);
    }
    return new ShmfdError('ERR_STATE_LOG_FULL', `log ${this.name} is full: a record of ${n} bytes needs ${size} bytes, ${this.available} of ${this.capacity} are left`);
  }
}
