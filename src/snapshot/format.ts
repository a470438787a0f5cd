/**
 * The on-memory layout of a snapshot file (docs/snapshot-format.md), as pure functions over
 * bytes. Nothing here maps a file: the functions work on any `Uint8Array` that holds the
 * pages they need (the head page; for slots also the sequence region) while the real
 * file length is passed separately, so a reader that `pread`s only those pages can use
 * them. All integers are little-endian u64.
 * @module
 */
import { SnapshotFormatError } from './errors.js';

/** Page size of the format, in bytes. */
export const PAGE = 4096;
/** `version` of a configured file. */
export const MAGIC = 0x96c2a6f4b68519b3n;
/** Byte offsets of the head page's fields. */
export const HEAD = Object.freeze({ version: 0x00, entryMask: 0x08, dataMask: 0x10, writeOffset: 0x18 });
/** Bytes per snapshot slot (`offset` then `length`). */
export const SLOT_SIZE = 16;
/** Byte offsets of a slot's fields, relative to the slot. */
export const SLOT = Object.freeze({ offset: 0, length: 8 });
/** Slots per page of the sequence region. */
export const SLOTS_PER_PAGE = PAGE / SLOT_SIZE;
/** The smallest configured file: head, one sequence page, one data page. */
export const MIN_FILE_LENGTH = 3 * PAGE;
/**
 * Largest data ring this implementation accepts (4 GiB). Bigger rings are legal in the
 * Rust crate but absurd for snapshot payloads, and cannot be mapped by Node 20 anyway.
 */
export const MAX_DATA = 2 ** 32;
/**
 * Most slots this implementation accepts (2^20: a 16 MiB sequence region). Readers load the
 * whole sequence region, so an untrusted `entry_mask` must not choose how much they read;
 * real files use a few hundred slots (the Rust crate's examples and this package use 256),
 * and every slot holds at least one byte of a ring that keeps only the newest `data` bytes.
 */
export const MAX_ENTRIES = 2 ** 20;

/**
 * A snapshot slot that claims to hold a snapshot. Stream positions are plain numbers:
 * files whose positions exceed `Number.MAX_SAFE_INTEGER` are rejected.
 */
export interface Snapshot {
  /** Slot index, `0 <= index < entries`. */
  readonly index: number;
  /** Stream position of the first data byte. */
  readonly offset: number;
  /** Number of data bytes, `1 <= length <= data - 1`. */
  readonly length: number;
}

/** Where the regions of a configured file lie (all in bytes). */
export interface SnapshotLayout {
  /** Number of slots (a power of two). */
  readonly entries: number;
  /** Size of the data ring (a power of two). */
  readonly data: number;
  /** `P_seq`: pages of the sequence region. */
  readonly sequencePages: number;
  /** `P_data`: pages of the data ring. */
  readonly dataPages: number;
  /** File offset of the data ring. */
  readonly dataStart: number;
  /** File offset of the tail (the program's own area). */
  readonly tailStart: number;
  /** Bytes of the tail: the whole pages after the data ring. */
  readonly tailLength: number;
  /** Length of the file this layout was computed for. */
  readonly fileLength: number;
}

/** A layout recovered from a configured head page, with the stored write position. */
export interface DiscoveredHead extends SnapshotLayout {
  /** `write_offset` as stored in the head page. */
  readonly writeOffset: number;
}

/** `P_seq = ceil(entries / 256)`. */
export function sequencePages(entries: number): number {
  return Math.ceil(entries / SLOTS_PER_PAGE);
}

/** `P_data = ceil(data / PAGE)`, at least one page. */
export function dataPages(data: number): number {
  return Math.max(1, Math.ceil(data / PAGE));
}

/** File offset of the data ring for `entries` slots. */
export function dataStart(entries: number): number {
  return PAGE * (1 + sequencePages(entries));
}

/** File offset of the tail for a layout of `entries` slots and a `data`-byte ring. */
export function tailStart(entries: number, data: number): number {
  return dataStart(entries) + PAGE * dataPages(data);
}

/** Bytes of the tail: whole pages only, since a partial last page belongs to nobody. */
export function tailLength(entries: number, data: number, fileLength: number): number {
  return Math.max(0, wholePages(fileLength) - tailStart(entries, data));
}

/** File offset of slot `index`. */
export function slotPosition(index: number): number {
  return PAGE + SLOT_SIZE * index;
}

/** File offset of the byte at stream position `stream`. */
export function ringPosition(layout: SnapshotLayout, stream: number): number {
  return layout.dataStart + (stream % layout.data);
}

/**
 * The file ranges (one, or two when it wraps around the ring) that hold a snapshot's
 * bytes, in stream order.
 */
export function snapshotRanges(
  layout: SnapshotLayout,
  snapshot: Pick<Snapshot, 'offset' | 'length'>,
): { position: number; length: number }[] {
  checkSnapshot(layout, snapshot);
  const pos = snapshot.offset % layout.data;
  const first = Math.min(snapshot.length, layout.data - pos);
  const ranges = [{ position: layout.dataStart + pos, length: first }];
  if (first < snapshot.length) ranges.push({ position: layout.dataStart, length: snapshot.length - first });
  return ranges;
}

/** True for 1, 2, 4, ... up to 2^53. */
export function isPowerOfTwo(n: number): boolean {
  return Number.isSafeInteger(n) && n > 0 && 2 ** Math.round(Math.log2(n)) === n;
}

/** Computes a layout without validating it against the file; see {@link parseHead}. */
export function computeLayout(entries: number, data: number, fileLength: number): SnapshotLayout {
  const seq = sequencePages(entries);
  const pdata = dataPages(data);
  const start = PAGE * (1 + seq);
  const tail = start + PAGE * pdata;
  return {
    entries,
    data,
    sequencePages: seq,
    dataPages: pdata,
    dataStart: start,
    tailStart: tail,
    tailLength: Math.max(0, wholePages(fileLength) - tail),
    fileLength,
  };
}

/** True when the regions of `layout` end within the whole pages of its file. */
export function layoutFits(layout: SnapshotLayout): boolean {
  return layout.tailStart <= wholePages(layout.fileLength);
}

/**
 * Recovers the configuration of a file from its head page.
 *
 * @param bytes at least the first page of the file (more is fine)
 * @param fileLength the real length of the file
 * @returns the layout and stored write position, or `undefined` when the file is not
 *   configured (`version` is not the magic, e.g. an all-zero new memfd)
 * @throws {@link SnapshotFormatError} `ERR_SNAPSHOT_TOO_SMALL` (file shorter than a page,
 *   or configured but shorter than the smallest layout), `ERR_SNAPSHOT_SHORT_BUFFER`
 *   (`bytes` lacks the head page), `ERR_SNAPSHOT_BAD_MASK` (a mask not of the form
 *   2^k - 1, a ring above {@link MAX_DATA}, or more slots than {@link MAX_ENTRIES}),
 *   `ERR_SNAPSHOT_BEYOND_END` (regions past the end of the file), `ERR_SNAPSHOT_BAD_OFFSET`
 *   (write position not representable). Costs the same whatever the masks say: nothing is
 *   read or allocated beyond the head page.
 */
export function parseHead(bytes: Uint8Array, fileLength: number): DiscoveredHead | undefined {
  checkLength(fileLength);
  if (fileLength < PAGE) {
    throw new SnapshotFormatError('ERR_SNAPSHOT_TOO_SMALL', `a snapshot file needs at least one page (${PAGE} bytes) for its head; this one has ${fileLength}`);
  }
  if (bytes.length < PAGE) {
    throw new SnapshotFormatError('ERR_SNAPSHOT_SHORT_BUFFER', `the head page needs ${PAGE} bytes, only ${bytes.length} were given`);
  }
  const view = new DataView(bytes.buffer, bytes.byteOffset, PAGE);
  if (view.getBigUint64(HEAD.version, true) !== MAGIC) return undefined;
  if (fileLength < MIN_FILE_LENGTH) {
    throw new SnapshotFormatError('ERR_SNAPSHOT_TOO_SMALL', `a configured snapshot file needs at least ${MIN_FILE_LENGTH} bytes; this one has ${fileLength}`);
  }
  const entryMask = view.getBigUint64(HEAD.entryMask, true);
  const dataMask = view.getBigUint64(HEAD.dataMask, true);
  const writeOffset = view.getBigUint64(HEAD.writeOffset, true);
  checkMask('entry_mask', entryMask);
  checkMask('data_mask', dataMask);
  if (dataMask === 0n) {
    throw new SnapshotFormatError('ERR_SNAPSHOT_BAD_MASK', 'data_mask 0 describes a 1-byte data ring, which holds no snapshot (at least 2 bytes)');
  }
  if (dataMask >= BigInt(MAX_DATA)) {
    throw new SnapshotFormatError('ERR_SNAPSHOT_BAD_MASK', `data_mask 0x${dataMask.toString(16)} describes a data ring above ${MAX_DATA} bytes`);
  }
  // Both masks are checked against the file before converting, so the numbers stay exact.
  const fileBig = BigInt(fileLength);
  if ((entryMask + 1n) * BigInt(SLOT_SIZE) > fileBig || dataMask + 1n > fileBig) {
    throw beyondEnd(entryMask, dataMask, fileLength);
  }
  const layout = computeLayout(Number(entryMask + 1n), Number(dataMask + 1n), fileLength);
  if (!layoutFits(layout)) throw beyondEnd(entryMask, dataMask, fileLength);
  if (layout.entries > MAX_ENTRIES) {
    throw new SnapshotFormatError('ERR_SNAPSHOT_BAD_MASK', `entry_mask 0x${entryMask.toString(16)} describes ${layout.entries} slots, above the ${MAX_ENTRIES} this implementation reads`);
  }
  if (writeOffset > BigInt(Number.MAX_SAFE_INTEGER - layout.data)) {
    throw new SnapshotFormatError('ERR_SNAPSHOT_BAD_OFFSET', `write_offset ${writeOffset} is beyond the stream positions this implementation represents (2^53)`);
  }
  return discoveredHead(layout, Number(writeOffset));
}

/**
 * A layout with its write position, spelled out: V8 copies a spread object through a slow
 * generic path, which cost most of a recovery of 4,096 slots (~3 µs).
 */
function discoveredHead(layout: SnapshotLayout, writeOffset: number): DiscoveredHead {
  return {
    entries: layout.entries,
    data: layout.data,
    sequencePages: layout.sequencePages,
    dataPages: layout.dataPages,
    dataStart: layout.dataStart,
    tailStart: layout.tailStart,
    tailLength: layout.tailLength,
    fileLength: layout.fileLength,
    writeOffset,
  };
}

/**
 * Reads the slots that hold a usable snapshot, oldest first (by stream position).
 *
 * A slot counts when its `length` is not 0 (the format's validity), and it also describes
 * bytes the ring can still hold: `length <= data - 1`, an end a head's `write_offset` can
 * store (at most 2^53 - 1 - `data`, the bound of {@link parseHead}), and not older than
 * `data` bytes before the {@link streamEnd}. Slots failing that can only come from a
 * foreign or damaged writer (the Rust crate never invalidates), and their bytes are not
 * what was committed.
 *
 * @param bytes at least the head page and the sequence region of the file
 * @param head the result of {@link parseHead} on the same bytes
 * @throws {@link SnapshotFormatError} `ERR_SNAPSHOT_SHORT_BUFFER` if `bytes` ends before
 *   the last slot
 */
export function readSlots(bytes: Uint8Array, head: DiscoveredHead): Snapshot[] {
  const { count, first, table } = scanSlots(bytes, head);
  const found = new Array<Snapshot>(count);
  for (let k = 0, at = first * 3; k < count; k++, at += 3) {
    if (at === count * 3) at = 0;
    // Integers out of the f64 table where they are ones: V8 boxes a double field apart.
    found[k] = { index: table[at]! | 0, offset: table[at + 1]!, length: table[at + 2]! >>> 0 };
  }
  return found;
}

/**
 * The newest snapshot {@link readSlots} would list (the valid one with the largest
 * offset), found without building the others.
 * @internal
 */
export function readNewestSlot(bytes: Uint8Array, head: DiscoveredHead): Snapshot | undefined {
  const entries = head.entries;
  const words = slotWords(bytes, entries);
  const data = head.data;
  const lastEnd = Number.MAX_SAFE_INTEGER - data;
  let end = head.writeOffset;
  let newest = -1;
  let newestOffset = -1;
  // The rules of scanSlots, keeping only the largest offset (ties to the larger index, as
  // readSlots orders them): every slot older than a ring before the end is older than it,
  // so the last rule is one check at the end. Nothing is written per slot.
  for (let index = 0, w = PAGE >>> 2; index < entries; index++, w += SLOT_SIZE >>> 2) {
    const length = words[w + 2]!;
    if (words[w + 3]! !== 0 || length === 0 || length >= data) continue;
    const offset = words[w + 1]! * 0x1_0000_0000 + words[w]!;
    const slotEnd = offset + length;
    if (slotEnd > lastEnd) continue;
    if (slotEnd > end) end = slotEnd;
    if (offset >= newestOffset) {
      newestOffset = offset;
      newest = index;
    }
  }
  if (newest < 0 || newestOffset < end - data) return undefined;
  return { index: newest, offset: newestOffset, length: words[(PAGE >>> 2) + newest * (SLOT_SIZE >>> 2) + 2]! };
}

/**
 * {@link streamEnd} of the head's `write_offset` and the slots that pass the first two
 * rules of {@link readSlots}, without building them.
 * @internal
 */
export function readStreamEnd(bytes: Uint8Array, head: DiscoveredHead): number {
  return scanSlots(bytes, head).end;
}

/**
 * Sets `into[index]` to 1 for each slot {@link readSlots} would list and to 0 for every
 * other slot (`into` has at least `head.entries` bytes), without building them.
 * @returns how many slots were marked, and the {@link readStreamEnd} of the file
 * @internal
 */
export function markValidSlots(bytes: Uint8Array, head: DiscoveredHead, into: Uint8Array): { count: number; end: number } {
  const { count, end, table } = scanSlots(bytes, head);
  into.fill(0, 0, head.entries);
  for (let k = 0; k < count; k++) into[table[3 * k]!] = 1;
  return { count, end };
}

/**
 * How many snapshots {@link readSlots} would list, without building them.
 * @internal
 */
export function countValidSlots(bytes: Uint8Array, head: DiscoveredHead): number {
  return scanSlots(bytes, head).count;
}

/** What {@link scanSlots} found: `count` slots in `table`, stream order from triple `first` on. */
interface SlotScan {
  readonly count: number;
  /** The oldest slot's triple; the list wraps from the last triple to triple 0. */
  readonly first: number;
  /** The largest of `write_offset` and the end of every slot passing the first two rules. */
  readonly end: number;
  /** `index, offset, length` of each valid slot, three numbers each. */
  readonly table: Float64Array;
}

/**
 * Scratch for {@link scanSlots}: every caller consumes a scan before it returns, so one
 * table serves them all, and a recovery allocates nothing per slot. Tables above
 * `SCRATCH_KEEP` numbers (more than 65,536 slots) are allocated per call instead, so a
 * rare huge file does not pin memory.
 */
let scratch = new Float64Array(3 * SLOTS_PER_PAGE);
const SCRATCH_KEEP = 3 * 65536;

/**
 * The rules of {@link readSlots} in one pass over the slots' u32 words, into a shared
 * table of numbers; the valid slots come out as a rotation of the table (how a writer
 * fills the slots), or sorted in place when they are not one.
 */
function scanSlots(bytes: Uint8Array, head: DiscoveredHead): SlotScan {
  const entries = head.entries;
  const words = slotWords(bytes, entries);
  let table = scratch;
  if (table.length < 3 * entries) {
    table = new Float64Array(3 * entries);
    if (table.length <= SCRATCH_KEEP) scratch = table;
  }
  const data = head.data;
  const lastEnd = Number.MAX_SAFE_INTEGER - data;
  let end = head.writeOffset;
  let n = 0;
  // Where index order breaks stream order, and the oldest offset: when nothing is older
  // than a ring before the end (the usual case), this pass is the only one.
  let breaks = 0;
  let first = 0;
  let previous = -1;
  let lowest = Infinity;
  for (let index = 0, w = PAGE >>> 2; index < entries; index++, w += SLOT_SIZE >>> 2) {
    const length = words[w + 2]!;
    const lengthHigh = words[w + 3]!;
    if ((length | lengthHigh) === 0) continue;
    // A length of 2^32 or more has a non-zero high half. An offset of 2^53 or more loses
    // precision as a number, but stays above lastEnd, so the end check drops it.
    if (lengthHigh !== 0 || length >= data) continue;
    const offset = words[w + 1]! * 0x1_0000_0000 + words[w]!;
    const slotEnd = offset + length;
    if (slotEnd > lastEnd) continue;
    if (slotEnd > end) end = slotEnd;
    if (offset < previous) {
      breaks++;
      first = n / 3;
    }
    if (offset < lowest) lowest = offset;
    previous = offset;
    table[n] = index;
    table[n + 1] = offset;
    table[n + 2] = length;
    n += 3;
  }
  let kept = n;
  const oldest = end - data;
  if (lowest < oldest) {
    // Drop the slots older than a ring before the end, and find the breaks among the rest.
    kept = 0;
    breaks = 0;
    first = 0;
    previous = -1;
    for (let at = 0; at < n; at += 3) {
      const offset = table[at + 1]!;
      if (offset < oldest) continue;
      if (offset < previous) {
        breaks++;
        first = kept / 3;
      }
      previous = offset;
      table[kept] = table[at]!;
      table[kept + 1] = offset;
      table[kept + 2] = table[at + 2]!;
      kept += 3;
    }
  }
  const count = kept / 3;
  if (breaks === 0) return { count, first: 0, end, table };
  // One break and the last slot older than the first: a rotation.
  if (breaks === 1 && table[kept - 2]! < table[1]!) return { count, first, end, table };
  sortTable(table, count);
  return { count, first: 0, end, table };
}

/**
 * The u32 words of the head page and sequence region of `bytes`, for `entries` slots: the
 * little-endian u64 fields as halves. An aligned array is several times faster than a
 * DataView, so only an unaligned buffer pays for a copy.
 */
function slotWords(bytes: Uint8Array, entries: number): Uint32Array {
  const needed = slotPosition(entries);
  if (bytes.length < needed) {
    throw new SnapshotFormatError('ERR_SNAPSHOT_SHORT_BUFFER', `the sequence region ends at byte ${needed}, only ${bytes.length} bytes were given`);
  }
  return bytes.byteOffset % 4 === 0 ? new Uint32Array(bytes.buffer, bytes.byteOffset, needed >>> 2) : new Uint32Array(bytes.slice(0, needed).buffer);
}

/** Sorts the first `count` triples of `table` by offset, then index. */
function sortTable(table: Float64Array, count: number): void {
  const order = new Uint32Array(count);
  for (let k = 0; k < count; k++) order[k] = k * 3;
  order.sort((a, b) => table[a + 1]! - table[b + 1]! || table[a]! - table[b]!);
  const sorted = new Float64Array(count * 3);
  for (let k = 0; k < count; k++) {
    const at = order[k]!;
    sorted[k * 3] = table[at]!;
    sorted[k * 3 + 1] = table[at + 1]!;
    sorted[k * 3 + 2] = table[at + 2]!;
  }
  table.set(sorted);
}

/**
 * Where writing continues after `slots`: the larger of `writeOffset` and the furthest end
 * of a slot. The furthest end, not the newest slot's: in a damaged or foreign file an
 * older slot may reach further (slots that overlap), and a write before its end would
 * change bytes it claims.
 * @internal
 */
export function streamEnd(writeOffset: number, slots: readonly Pick<Snapshot, 'offset' | 'length'>[]): number {
  let end = writeOffset;
  for (const s of slots) if (s.offset + s.length > end) end = s.offset + s.length;
  return end;
}

/** True when two snapshots name the same slot contents. */
export function sameSnapshot(a: Snapshot, b: Snapshot): boolean {
  return a.index === b.index && a.offset === b.offset && a.length === b.length;
}

/**
 * Throws `ERR_SNAPSHOT_BAD_SNAPSHOT` unless `snapshot` can describe bytes of `layout`'s ring.
 * @internal
 */
export function checkSnapshot(layout: SnapshotLayout, snapshot: Pick<Snapshot, 'offset' | 'length'>): void {
  const { offset, length } = snapshot;
  if (
    !Number.isSafeInteger(offset) || offset < 0 ||
    !Number.isSafeInteger(length) || length < 1 || length >= layout.data ||
    offset + length > Number.MAX_SAFE_INTEGER
  ) {
    throw new SnapshotFormatError('ERR_SNAPSHOT_BAD_SNAPSHOT', `(offset ${offset}, length ${length}) is not a snapshot of a ${layout.data}-byte data ring`);
  }
}

function wholePages(fileLength: number): number {
  return Math.floor(fileLength / PAGE) * PAGE;
}

function checkLength(fileLength: number): void {
  if (!Number.isSafeInteger(fileLength) || fileLength < 0) {
    throw new TypeError(`file length must be a non-negative integer, got ${fileLength}`);
  }
}

function checkMask(name: string, mask: bigint): void {
  // 2^k - 1 has no zero bit below its highest one bit, so adding 1 carries through all of them.
  if ((mask & (mask + 1n)) !== 0n) {
    throw new SnapshotFormatError('ERR_SNAPSHOT_BAD_MASK', `${name} 0x${mask.toString(16)} is not of the form 2^k - 1`);
  }
}

function beyondEnd(entryMask: bigint, dataMask: bigint, fileLength: number): SnapshotFormatError {
  return new SnapshotFormatError(
    'ERR_SNAPSHOT_BEYOND_END',
    `entries 0x${(entryMask + 1n).toString(16)} and data 0x${(dataMask + 1n).toString(16)} need regions beyond the end of the ${fileLength}-byte file`,
  );
}
