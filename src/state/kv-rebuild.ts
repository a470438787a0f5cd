/**
 * Rebuilds a key-value map's index from its committed records, for a copy of the memory
 * file (a restored backup) or after a crash left the index unfinished.
 *
 * The cost is memory latency, not arithmetic. Inserting the records in ring order looks at
 * a random table slot per record, and at the older record of every overwritten key: a
 * cache and TLB miss each, over the whole window (1.4 s for 1 M keys written twice in a
 * 1 GiB map here). So the window is read in order with pread(2), twice: once to check
 * every record and count the records of each part of the table (8192 slots), once to
 * gather each part's records and keys into one place, in ring order. Then the parts are
 * filled one after the other, each from data that fits the CPU's cache. The table is built
 * in the heap (with each slot's record size and key) and written into the map's index in
 * one ordered pass at the end. A window of more than {@link RANGE_RECORDS} records, or
 * with more than {@link RANGE_KEY_BYTES} of keys, is done range by range, so the memory
 * this takes stays bounded; a key inserted in an earlier range is compared where it lies.
 * @module
 */
import { Buffer } from 'node:buffer';
import { CHECK_SALT, ENTRY_HEADER, entryBytes, FLAG_TOMBSTONE, FLAG_WRAP, hashBytes, KEY_MASK, MAX_KEY_BYTES } from './kv-record.js';
import { emptySlot, removeSlot } from './kv-index.js';

/** Bytes read at a time; more than the largest key and a record header. */
const READ_BYTES = 1 << 20;
/** Slots of one part of the table, as a power of two: 8192 (128 KiB of it, a quarter of a typical L2 cache). */
const PART_SHIFT = 13;
/** Most records gathered at a time (12 bytes each, and their keys). */
const RANGE_RECORDS = 1 << 22;
/** Most bytes of keys (and their 2-byte lengths) gathered at a time. */
const RANGE_KEY_BYTES = 64 * 2 ** 20;
/** Words per slot of the table under construction: record, hash, record bytes, key. */
export const REBUILT_SLOT_WORDS = 4;

/** What a rebuild reads: the committed window of a map's ring and the map's limits. */
export interface RebuildInput {
  /** Name of the map, for the description of damage. */
  readonly name: string;
  /** Bytes of the ring. */
  readonly ring: number;
  /** The committed window, as stream positions. */
  readonly tail: number;
  readonly head: number;
  /** Slots the table starts with (a power of two); it doubles up to `maxSlots` as needed. */
  readonly slots: number;
  readonly maxSlots: number;
  readonly maxEntries: number;
  readonly maxRecordBytes: number;
  /** The ring as mapped: read only to compare a key gathered in an earlier range. */
  readonly ringBytes: Uint8Array;
  readonly ringWords: Uint32Array;
  /** Reads ring bytes from `phys` into `into`, at most `limit`; returns how many. */
  read(into: Uint8Array, phys: number, limit: number): number;
  /** Most records per range (default {@link RANGE_RECORDS}); smaller only to test ranges. */
  readonly rangeRecords?: number;
}

/** A rebuilt index, in the heap: the map writes it into its index table. */
export interface RebuiltIndex {
  /** {@link REBUILT_SLOT_WORDS} words per slot: record (ring byte / 8 + 1, 0 for an empty slot), hash, and two words of the rebuild's own. */
  readonly table: Uint32Array;
  readonly slots: number;
  /** Entries, and record bytes of the entries. */
  readonly count: number;
  readonly live: number;
}

/** A stretch of the window gathered at once: stream positions, records, key bytes, and per part. */
interface Range {
  from: number;
  to: number;
  records: number;
  keyBytes: number;
  /** Records and key bytes of each part of the table (as sized when the range was counted). */
  parts: Uint32Array;
  partKeys: Uint32Array;
}

/**
 * Rebuilds the index of the records in `input`'s window, checking every record header and
 * key hash on the way.
 * @returns the index, or a description of the damage found
 */
export function rebuildIndex(input: RebuildInput): RebuiltIndex | string {
  return new Rebuild(input).run();
}

/** Called for each record of a walk: its stream position, ring byte, header words, and where its key is in `chunk`. */
type Visit = (at: number, phys: number, word0: number, valueBytes: number, hash: number, chunk: Uint8Array, keyAt: number) => string | undefined;

class Rebuild {
  readonly #in: RebuildInput;
  #table: Uint32Array;
  #slots: number;
  #count = 0;
  #live = 0;
  readonly #chunk: Buffer;
  readonly #view: Uint32Array;

  constructor(input: RebuildInput) {
    this.#in = input;
    this.#slots = input.slots;
    this.#table = new Uint32Array(REBUILT_SLOT_WORDS * input.slots);
    this.#chunk = Buffer.allocUnsafeSlow(Math.min(READ_BYTES, input.ring));
    this.#view = new Uint32Array(this.#chunk.buffer, this.#chunk.byteOffset, this.#chunk.length / 4);
  }

  run(): RebuiltIndex | string {
    const ranges = this.#survey();
    if (typeof ranges === 'string') return ranges;
    for (let r = 0; r < ranges.length; r++) {
      // Keys gathered for an earlier range are gone: its entries are compared in the ring.
      if (r > 0) for (let s = 3; s < this.#table.length; s += REBUILT_SLOT_WORDS) this.#table[s] = 0;
      const damage = this.#fill(ranges[r]!);
      if (damage !== undefined) return damage;
    }
    return { table: this.#table, slots: this.#slots, count: this.#count, live: this.#live };
  }

  /** Part of the table the home slot of `hash` lies in. */
  #part(hash: number): number {
    return (hash & (this.#slots - 1)) >>> PART_SHIFT;
  }

  /** The first pass: checks every record, cuts the window into ranges and counts their records per part. */
  #survey(): Range[] | string {
    const { name, maxRecordBytes } = this.#in;
    const rangeRecords = this.#in.rangeRecords ?? RANGE_RECORDS;
    const parts = Math.max(1, this.#slots >>> PART_SHIFT);
    const ranges: Range[] = [];
    const open = (from: number): Range => ({ from, to: from, records: 0, keyBytes: 0, parts: new Uint32Array(parts), partKeys: new Uint32Array(parts) });
    let range = open(this.#in.tail);
    const damage = this.#walk(this.#in.tail, this.#in.head, (at, phys, word0, valueBytes, hash, chunk, keyAt) => {
      if (((word0 ^ valueBytes ^ hash ^ CHECK_SALT) >>> 0) !== this.#view[(keyAt - ENTRY_HEADER + 12) >>> 2] || (word0 & ~(KEY_MASK | FLAG_TOMBSTONE | FLAG_WRAP)) !== 0) {
        return `map ${name}: the record at ring byte ${phys} (stream ${at}) has a damaged header`;
      }
      const keyBytes = word0 & KEY_MASK;
      const bytes = entryBytes(keyBytes, valueBytes);
      if (keyBytes > MAX_KEY_BYTES || bytes > maxRecordBytes || phys + bytes > this.#in.ring || at + bytes > this.#in.head) {
        return `map ${name}: the record at ring byte ${phys} (stream ${at}) does not fit the ring`;
      }
      if (hashBytes(chunk, keyAt, keyBytes) !== hash) {
        return `map ${name}: the record at ring byte ${phys} (stream ${at}) has a key that does not match its hash`;
      }
      if (range.records === rangeRecords || range.keyBytes + 2 + keyBytes > RANGE_KEY_BYTES) {
        range.to = at;
        ranges.push(range);
        range = open(at);
      }
      const p = this.#part(hash);
      range.records++;
      range.keyBytes += 2 + keyBytes;
      range.parts[p]!++;
      range.partKeys[p]! += 2 + keyBytes;
      return undefined;
    });
    if (damage !== undefined) return damage;
    range.to = this.#in.head;
    ranges.push(range);
    return ranges;
  }

  /** Gathers the records of `range` part by part (in ring order within a part), then inserts them. */
  #fill(range: Range): string | undefined {
    // Three words per record: hash, record (+ 2^31 for a tombstone), record bytes. The keys
    // lie in `arena` in the same order, each after its 2-byte length.
    const records = new Uint32Array(3 * range.records);
    const arena = new Uint8Array(range.keyBytes);
    const parts = range.parts.length;
    // Where each part's next record and next key go.
    const next = new Uint32Array(parts);
    const nextKey = new Uint32Array(parts);
    for (let p = 1; p < parts; p++) {
      next[p] = next[p - 1]! + 3 * range.parts[p - 1]!;
      nextKey[p] = nextKey[p - 1]! + range.partKeys[p - 1]!;
    }
    // The table may have grown since the range was counted: parts are those of the count.
    const mask = (parts << PART_SHIFT) - 1;
    this.#walk(range.from, range.to, (_at, phys, word0, valueBytes, hash, chunk, keyAt) => {
      const p = (hash & mask) >>> PART_SHIFT;
      const j = next[p]!;
      next[p] = j + 3;
      const keyBytes = word0 & KEY_MASK;
      records[j] = hash;
      // Ring bytes are below 2^32, so phys / 8 + 1 leaves the top bit for a tombstone.
      records[j + 1] = (phys / 8 + 1 + ((word0 & FLAG_TOMBSTONE) !== 0 ? 0x8000_0000 : 0)) >>> 0;
      records[j + 2] = entryBytes(keyBytes, valueBytes);
      const k = nextKey[p]!;
      arena[k] = keyBytes & 0xff;
      arena[k + 1] = keyBytes >>> 8;
      for (let i = 0; i < keyBytes; i++) arena[k + 2 + i] = chunk[keyAt + i]!;
      nextKey[p] = k + 2 + keyBytes;
      return undefined;
    });
    for (let j = 0, key = 0; j < records.length; j += 3) {
      const damage = this.#insert(records[j]!, records[j + 1]!, records[j + 2]!, key + 1, arena);
      if (damage !== undefined) return damage;
      key += 2 + (arena[key]! | (arena[key + 1]! << 8));
    }
    return undefined;
  }

  /**
   * Calls `visit` for each record of the window's stretch `[from, to)`, read in order (wrap
   * markers skipped), with its header and its key in the read buffer.
   */
  #walk(from: number, to: number, visit: Visit): string | undefined {
    const ring = this.#in.ring;
    const chunk = this.#chunk;
    const view = this.#view;
    // The ring bytes [chunkAt, chunkAt + chunkBytes) are in `chunk`.
    let chunkAt = 0;
    let chunkBytes = 0;
    // The ring byte of stream position `at`, kept beside it: `at % ring` of positions past
    // 2^31 is a floating-point remainder, a tenth of the pass.
    let phys = from % ring;
    for (let at = from; at < to; ) {
      if (phys >= ring) phys -= ring;
      if (ring - phys < ENTRY_HEADER) {
        at += ring - phys;
        phys = ring;
        continue;
      }
      if (phys < chunkAt || phys + ENTRY_HEADER > chunkAt + chunkBytes) {
        chunkAt = phys;
        chunkBytes = this.#in.read(chunk, phys, Math.min(this.#in.head - at, ring - phys));
      }
      const w = (phys - chunkAt) >>> 2;
      const word0 = view[w]!;
      if ((word0 & FLAG_WRAP) !== 0 && (word0 & ~(KEY_MASK | FLAG_TOMBSTONE | FLAG_WRAP)) === 0 && ((word0 ^ view[w + 1]! ^ view[w + 2]! ^ CHECK_SALT) >>> 0) === view[w + 3]) {
        at += ring - phys;
        phys = ring;
        continue;
      }
      const valueBytes = view[w + 1]!;
      // A damaged length is reported by the visit of the first pass, before it is used.
      const keyBytes = Math.min(word0 & KEY_MASK, MAX_KEY_BYTES);
      const bytes = entryBytes(word0 & KEY_MASK, valueBytes);
      if (phys + ENTRY_HEADER + keyBytes > chunkAt + chunkBytes) {
        chunkAt = phys;
        chunkBytes = this.#in.read(chunk, phys, Math.min(this.#in.head - at, ring - phys));
      }
      const damage = visit(at, phys, word0, valueBytes, view[((phys - chunkAt) >>> 2) + 2]!, chunk, phys - chunkAt + ENTRY_HEADER);
      if (damage !== undefined) return damage;
      at += bytes;
      phys += bytes;
    }
    return undefined;
  }

  /** Inserts one record: the newest record of a key replaces the older, a tombstone removes it. */
  #insert(hash: number, position: number, size: number, key: number, arena: Uint8Array): string | undefined {
    const tombstone = position >= 0x8000_0000;
    const record = tombstone ? position - 0x8000_0000 : position;
    if (!tombstone && this.#count >= (this.#slots / 4) * 3 && this.#slots < this.#in.maxSlots) this.#grow(this.#slots * 2);
    const t = this.#table;
    const mask = this.#slots - 1;
    // One probe sequence finds the key's slot or the empty slot where it goes.
    let s = REBUILT_SLOT_WORDS * (hash & mask);
    for (;;) {
      if (t[s] === 0) break;
      if (t[s + 1] === hash && this.#sameKey(t[s]!, t[s + 3]!, key, arena)) break;
      s = (s + REBUILT_SLOT_WORDS) & (REBUILT_SLOT_WORDS * mask);
    }
    if (tombstone) {
      if (t[s] !== 0) {
        this.#live -= t[s + 2]!;
        this.#remove(s / REBUILT_SLOT_WORDS);
      }
      return undefined;
    }
    if (t[s] === 0) {
      if (this.#count >= this.#in.maxEntries) return `map ${this.#in.name}: the ring holds more than ${this.#in.maxEntries} entries`;
      this.#count++;
      t[s + 1] = hash;
    } else {
      this.#live -= t[s + 2]!;
    }
    this.#live += size;
    t[s] = record;
    t[s + 2] = size;
    t[s + 3] = key;
    return undefined;
  }

  /**
   * Whether the entry of a slot (its record, and its key in `arena` or 0 when gathered in an
   * earlier range) has the key at `key` in `arena`.
   */
  #sameKey(record: number, slotKey: number, key: number, arena: Uint8Array): boolean {
    const n = arena[key - 1]! | (arena[key]! << 8);
    if (slotKey !== 0) {
      if ((arena[slotKey - 1]! | (arena[slotKey]! << 8)) !== n) return false;
      for (let j = 0; j < n; j++) if (arena[slotKey + 1 + j] !== arena[key + 1 + j]) return false;
      return true;
    }
    const phys = (record - 1) * 8;
    if ((this.#in.ringWords[phys >>> 2]! & KEY_MASK) !== n) return false;
    const bytes = this.#in.ringBytes;
    for (let j = 0; j < n; j++) if (bytes[phys + ENTRY_HEADER + j] !== arena[key + 1 + j]) return false;
    return true;
  }

  /** Empties `slot`, moving later slots of the probe run back (no tombstones). */
  #remove(slot: number): void {
    removeSlot(this.#table, 0, REBUILT_SLOT_WORDS, this.#slots - 1, slot);
    this.#count--;
  }

  #grow(slots: number): void {
    const old = this.#table;
    const t = new Uint32Array(REBUILT_SLOT_WORDS * slots);
    const mask = slots - 1;
    for (let s = 0; s < old.length; s += REBUILT_SLOT_WORDS) {
      if (old[s] === 0) continue;
      const i = emptySlot(t, 0, REBUILT_SLOT_WORDS, mask, old[s + 1]!);
      for (let w = 0; w < REBUILT_SLOT_WORDS; w++) t[REBUILT_SLOT_WORDS * i + w] = old[s + w]!;
    }
    this.#table = t;
    this.#slots = slots;
  }
}
