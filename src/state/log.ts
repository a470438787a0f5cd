/**
 * An append-only log of byte records in a tail region: appended records become part of
 * the state with the next commit. A log keeps every record until it is full, or (declared
 * with retention) is a ring whose commits drop the oldest records; bytes that a valid
 * snapshot names are never written again.
 * @module
 */
import { ShmfdError } from '../base/errors.js';
import { storeU64 } from '../snapshot/mapped.js';
import { writtenRing, type StructureContainer, type Structure } from './structure.js';
import { RECORD_ALIGN, RECORD_HEADER, type LogDeclaration } from './layout.js';
import { NamedPositions } from './named-positions.js';

/** Bytes of a record header in a retained log: the header of a log, then the u64 record index. */
const RING_HEADER = 16;
/** Length word of the marker that fills the end of a ring's region a record does not fit. */
const WRAP = 0xffffffff;

/** Bytes a record of `length` bytes takes in a log: header plus length rounded up to 8. */
export function recordBytes(length: number): number {
  return RECORD_HEADER + Math.ceil(length / RECORD_ALIGN) * RECORD_ALIGN;
}

/**
 * An append-only log of byte records (see docs/state.md). {@link append} writes a record
 * after the last one; the next commit of the state file makes every appended record part
 * of the committed state at once.
 *
 * Records are length-prefixed and 8-byte aligned: a u32 length, the u32 bitwise NOT of the
 * length (in a retained log then the u64 index of the record), the bytes, zero padding to
 * a multiple of 8.
 *
 * A log declared without retention keeps every record: committed records are never
 * modified, and a full log refuses appends. A retained log is a ring over its region:
 * records sit at stream positions that only grow (position `p` is region byte
 * `p % capacity`), each commit keeps the newest records within `keepBytes` (and at most
 * `keepRecords`) and drops the older ones, and an append that comes round to bytes a valid
 * snapshot still names first invalidates that snapshot. Record indexes keep counting
 * across drops: the oldest retained record is {@link firstIndex}.
 */
export class AppendLog implements Structure {
  /** The name the log was declared under. */
  readonly name: string;
  /** Bytes available for records, headers and padding included. */
  readonly capacity: number;
  /** Retained logs: bytes of the newest records a commit keeps; undefined when the log keeps every record. */
  readonly keepBytes: number | undefined;
  /** Retained logs: most records a commit keeps; undefined for no limit. */
  readonly keepRecords: number | undefined;
  /** Bytes of the largest record (header and padding included) {@link append} takes. */
  readonly maxRecordBytes: number;
  readonly #container: StructureContainer;
  readonly #bytes: Uint8Array;
  readonly #u32: Uint32Array;
  readonly #ring: boolean;
  readonly #header: number;
  /** Committed window `[#first, #committedEnd)`; the oldest record there has index #firstIndex. */
  #first = 0;
  #firstIndex = 0;
  #end = 0;
  #count = 0;
  #committedEnd = 0;
  #committedCount = 0;
  /** The window the snapshot being published names, set by encode (retained logs). */
  #nextFirst = 0;
  #nextFirstIndex = 0;
  /** Retained logs: the first positions that valid snapshots may name. */
  readonly #named: NamedPositions;

  /** @internal created by the state file. */
  constructor(container: StructureContainer, name: string, region: Uint8Array, declaration: LogDeclaration) {
    this.#container = container;
    this.name = name;
    const capacity = declaration.capacity;
    this.capacity = capacity;
    this.keepBytes = declaration.keepBytes;
    this.keepRecords = declaration.keepRecords;
    this.#ring = this.keepBytes !== undefined;
    this.#header = this.#ring ? RING_HEADER : RECORD_HEADER;
    // After a commit the window is at most keepBytes; one record and the gap it may skip
    // at the region's end (at most the record less 8) must still fit the rest.
    this.maxRecordBytes = this.keepBytes === undefined ? capacity : Math.min(this.keepBytes, Math.floor((capacity - this.keepBytes + 8) / 16) * 8);
    this.#bytes = region.subarray(0, capacity);
    this.#u32 = new Uint32Array(region.buffer, region.byteOffset, capacity / 4);
    const slots = this.#ring ? container.writer.layout.entries : 0;
    this.#named = new NamedPositions(slots);
  }

  /** Index the next appended record gets: records ever appended, the uncommitted ones included. */
  get length(): number {
    return this.#count;
  }

  /** Index after the last committed record: records ever committed. */
  get committedLength(): number {
    return this.#committedCount;
  }

  /**
   * Index of the oldest record {@link records} yields: 0 in a log that keeps everything,
   * and until a retained log first drops a record.
   */
  get firstIndex(): number {
    return this.#firstIndex;
  }

  /** Bytes from the oldest committed record to the end, including records not committed yet. */
  get byteLength(): number {
    return this.#end - this.#first;
  }

  /** Bytes of the committed window (a retained log counts the gap a record skipped at the region's end). */
  get committedByteLength(): number {
    return this.#committedEnd - this.#first;
  }

  /**
   * Bytes free for appends before the next commit (a record needs {@link recordBytes} of
   * its length; in a retained log also the bytes it skips at the region's end).
   */
  get available(): number {
    return this.capacity - (this.#end - this.#first);
  }

  /** Whether records were appended since the last commit. */
  get pending(): boolean {
    return this.#end !== this.#committedEnd;
  }

  /** Bytes a record of `length` bytes takes in this log: its header (8, or 16 when retained) plus the length rounded up to 8. */
  recordBytes(length: number): number {
    return this.#header + Math.ceil(length / RECORD_ALIGN) * RECORD_ALIGN;
  }

  /**
   * Writes `record` after the last record. It is part of the state once the state file
   * commits (call {@link commit}, or commit several structures at once); in a retained
   * log, that commit drops the oldest records beyond `keepBytes` / `keepRecords`.
   * @returns the record's index (they count on across the drops of a retained log)
   * @throws {@link ShmfdError} `ERR_STATE_RECORD_TOO_LARGE` when the record needs more
   *   than {@link maxRecordBytes}, `ERR_STATE_LOG_FULL` when it does not fit the space left
   *   (in a retained log: before the next commit); nothing is written
   */
  append(record: Uint8Array): number {
    const n = record.length;
    const size = this.recordBytes(n);
    if (size > this.maxRecordBytes) throw this.#tooLarge(n, size);
    const capacity = this.capacity;
    let start = this.#end;
    let phys = start % capacity;
    // A record never wraps: the rest of the region is skipped (a log that keeps
    // everything never comes back to its start, so that is a full log).
    const gap = capacity - phys < size ? capacity - phys : 0;
    if (start + gap + size - this.#first > capacity) throw this.#full(n, size);
    const u32 = this.#u32;
    if (this.#ring) this.#protect(start + gap + size);
    if (gap > 0) {
      u32[phys >>> 2] = WRAP;
      u32[(phys >>> 2) + 1] = 0;
      start += gap;
      phys = 0;
    }
    const word = phys >>> 2;
    // Header first: a crash mid-append then leaves a header that says how far the
    // uncommitted bytes reach, and recovery of a log that keeps everything can clear them.
    u32[word] = n;
    u32[word + 1] = ~n >>> 0;
    const index = this.#count;
    if (this.#ring) storeU64(u32, word + 2, index);
    const header = this.#header;
    this.#bytes.set(record, phys + header);
    // Whatever an older record left here must not show in the padding.
    if ((n & 7) !== 0) this.#bytes.fill(0, phys + header + n, phys + size);
    this.#end = start + size;
    this.#count = index + 1;
    this.#container.markDirty();
    return index;
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
    this.#zero(this.#committedEnd, this.#end);
    this.#end = this.#committedEnd;
    this.#count = this.#committedCount;
    return dropped;
  }

  /**
   * The committed records, oldest first (index {@link firstIndex} first), as views into
   * the shared memory (zero-copy; do not modify them). Records committed while iterating
   * are included. In a retained log a view shows other bytes once its record is dropped
   * and its bytes are reused: copy what you keep past a commit.
   * @throws {@link ShmfdError} `ERR_STATE_LOG_DROPPED` when a commit dropped the record
   *   the iteration was about to read
   */
  *records(): IterableIterator<Uint8Array> {
    yield* this.#walk(this.#first, () => this.#committedEnd);
  }

  /** The records appended since the last commit, as views (do not modify them). */
  *pendingRecords(): IterableIterator<Uint8Array> {
    yield* this.#walk(this.#committedEnd, () => this.#end);
  }

  /** Same as {@link records}. */
  [Symbol.iterator](): IterableIterator<Uint8Array> {
    return this.records();
  }

  /**
   * @internal Log that keeps everything: the end and the record count. Retained log: the
   * window the snapshot names, after dropping the oldest records beyond the retention.
   */
  encode(u32: Uint32Array, word: number): void {
    writtenRing(this.#container, this.#bytes, this.#committedEnd, this.#end);
    if (!this.#ring) {
      storeU64(u32, word, this.#end);
      storeU64(u32, word + 2, this.#count);
      return;
    }
    const keepBytes = this.keepBytes!;
    const keepRecords = this.keepRecords ?? Infinity;
    const end = this.#end;
    let first = this.#first;
    let index = this.#firstIndex;
    // Only headers of the window are read, and nothing is written: the committed snapshot
    // still names all of it.
    while (first < end && (end - first > keepBytes || this.#count - index > keepRecords)) {
      first += this.recordBytes(this.#u32[(first % this.capacity) >>> 2]!);
      index++;
      if (first < end && this.#u32[(first % this.capacity) >>> 2] === WRAP) first += this.capacity - (first % this.capacity);
    }
    this.#nextFirst = first;
    this.#nextFirstIndex = index;
    storeU64(u32, word, first);
    storeU64(u32, word + 2, end);
  }

  /** @internal */
  published(offset: number): void {
    this.#committedEnd = this.#end;
    this.#committedCount = this.#count;
    if (!this.#ring) return;
    this.#first = this.#nextFirst;
    this.#firstIndex = this.#nextFirstIndex;
    this.named(this.#first, offset);
  }

  /** @internal A valid snapshot at stream `offset` names a window from position `first`. */
  named(first: number, offset: number): void {
    if (this.#ring) this.#named.add(first, offset);
  }

  /**
   * Before region bytes up to stream position `end` are written: they overwrite positions
   * below `end - capacity`, so every snapshot naming a first position below that is
   * invalidated. The committed window never starts below it (the check in {@link append}).
   */
  #protect(end: number): void {
    const offset = this.#named.dropBelow(end - this.capacity);
    if (offset >= 0) this.#container.writer.invalidateBefore(offset + 1);
  }

  /**
   * @internal Takes over the committed state named by a snapshot's words `a`, `b` after
   * checking that its records are well formed. A log that keeps everything (`a` the end,
   * `b` the record count) zeroes the uncommitted records after the end; a retained log
   * (`a` the first position, `b` the end) leaves the rest of its ring as it is: older
   * valid snapshots may name it.
   * @returns a description of the damage, or undefined
   */
  restore(a: number, b: number): string | undefined {
    if (this.#ring) return this.#restoreRing(a, b);
    const end = a;
    const count = b;
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

  #restoreRing(first: number, end: number): string | undefined {
    const capacity = this.capacity;
    if (first % RECORD_ALIGN !== 0 || end % RECORD_ALIGN !== 0 || first > end || end - first > capacity || (first === end && end !== 0)) {
      return `log ${this.name}: the committed window ${first}..${end} is not a window of its ${capacity}-byte ring`;
    }
    const u32 = this.#u32;
    let at = first;
    let firstIndex = 0;
    let n = 0;
    while (at < end) {
      const phys = at % capacity;
      const word = phys >>> 2;
      const length = u32[word]!;
      if (length === WRAP && u32[word + 1] === 0 && phys !== 0 && at !== first) {
        at += capacity - phys;
        continue;
      }
      const index = u32[word + 2]! + u32[word + 3]! * 0x1_0000_0000;
      const size = this.recordBytes(length);
      if (u32[word + 1] !== ~length >>> 0 || phys + size > capacity || at + size > end || (n > 0 && index !== firstIndex + n)) {
        return `log ${this.name}: record ${n} of the window at stream byte ${at} has a damaged header`;
      }
      if (n === 0) firstIndex = index;
      at += size;
      n++;
    }
    this.#first = this.#nextFirst = first;
    this.#firstIndex = this.#nextFirstIndex = firstIndex;
    this.#end = this.#committedEnd = end;
    this.#count = this.#committedCount = firstIndex + n;
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

  /** Zeroes the region bytes of stream positions `[from, to)` (less than the capacity). */
  #zero(from: number, to: number): void {
    if (from === to) return;
    const capacity = this.capacity;
    const a = from % capacity;
    const b = to % capacity;
    if (a < b) {
      this.#bytes.fill(0, a, b);
    } else {
      this.#bytes.fill(0, a, capacity);
      this.#bytes.fill(0, 0, b);
    }
  }

  *#walk(from: number, end: () => number): IterableIterator<Uint8Array> {
    const capacity = this.capacity;
    const header = this.#header;
    let at = from;
    while (at < end()) {
      if (at < this.#first) {
        throw new ShmfdError('ERR_STATE_LOG_DROPPED', `log ${this.name}: a commit dropped the records this iteration was about to read; iterate again from the oldest retained record (index ${this.#firstIndex})`);
      }
      const phys = at % capacity;
      const length = this.#u32[phys >>> 2]!;
      if (this.#ring && length === WRAP) {
        at += capacity - phys;
        continue;
      }
      yield this.#bytes.subarray(phys + header, phys + header + length);
      at += this.recordBytes(length);
    }
  }

  #tooLarge(n: number, size: number): ShmfdError {
    const what = this.#ring ? `the ${this.maxRecordBytes} bytes the log can hold and retain in one record (keepBytes ${this.keepBytes}, capacity ${this.capacity})` : `the log's capacity of ${this.capacity}`;
    return new ShmfdError('ERR_STATE_RECORD_TOO_LARGE', `log ${this.name}: a record of ${n} bytes needs ${size} bytes, more than ${what}`);
  }

  #full(n: number, size: number): ShmfdError {
    if (this.#ring) {
      return new ShmfdError(
        'ERR_STATE_LOG_FULL',
        `log ${this.name}: a record of ${n} bytes needs ${size} bytes, ${this.available} of ${this.capacity} are left before the next commit drops old records; commit more often`,
      );
    }
    return new ShmfdError('ERR_STATE_LOG_FULL', `log ${this.name} is full: a record of ${n} bytes needs ${size} bytes, ${this.available} of ${this.capacity} are left`);
  }
}
