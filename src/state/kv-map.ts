/**
 * A crash-consistent key-value map in a tail region: an append-only ring of entry records
 * is the truth (the snapshot payload names its committed window), and a hash index in the
 * same region is a cache of it, trusted on open only when it provably matches.
 * @module
 */
import fs from 'node:fs';
import { Buffer } from 'node:buffer';
import { ShmfdError } from '../base/errors.js';
import type { Log } from '../base/log.js';
import { readAt } from '../base/read-at.js';
import type { Mapping } from '../fds/memory-file.js';
import { PAGE } from '../snapshot/format.js';
import { storeU64 } from '../snapshot/mapped.js';
import { writtenRing, type StructureContainer, type Structure } from './structure.js';
import { fnv1a64, type KeyValueMapOptions, type MapDeclaration } from './layout.js';
import { NamedPositions } from './named-positions.js';
import { ENTRY_HEADER, entryBytes, FLAG_TOMBSTONE, FLAG_WRAP, hashBytes, KEY_MASK, CHECK_SALT, MAX_KEY_BYTES } from './kv-record.js';
import { rebuildIndex, REBUILT_SLOT_WORDS } from './kv-rebuild.js';
import { emptySlot, removeSlot } from './kv-index.js';

export { ENTRY_HEADER, entryBytes, MAX_KEY_BYTES } from './kv-record.js';

export type { KeyValueMapOptions, MapDeclaration } from './layout.js';

/** Smallest `maxBytes` of a map. */
export const MIN_MAP_BYTES = 16 * PAGE;
/** Index slots a new (or cleared) index starts with; it doubles as entries are added. */
const MIN_SLOTS = 1024;
/**
 * Ring bytes made writable ahead of the staged records at a time: one madvise instead of
 * a page fault per page (half the cost here) until the ring has been gone round once.
 */
const POPULATE_BYTES = 256 * 1024;
/** Windows from this size on take long enough to rebuild that opening warns first. */
const LARGE_REBUILD = 64 * 2 ** 20;
/** `"shmkvidx"` as two little-endian u32: the index header's first words. */
const INDEX_MAGIC_LO = 0x6b6d6873;
const INDEX_MAGIC_HI = 0x78646976;

/** Header words (u32 indexes into the region's first page). */
const H_MAGIC = 0;
const H_VALID = 2;
const H_IDENTITY = 4;
const H_TAIL = 6;
const H_HEAD = 8;
const H_SLOTS = 10;
const H_COUNT = 12;
const H_LIVE = 14;

/** How a map's region is divided; a pure function of the region's length. */
export interface MapGeometry {
  /** Region offset of the index table (after the header page). */
  readonly indexOffset: number;
  /** Most index slots (a power of two); 8 bytes each. */
  readonly maxSlots: number;
  /** Region offset of the ring. */
  readonly ringOffset: number;
  /** Bytes of the ring (a multiple of 8). */
  readonly ringBytes: number;
  /** Largest record (header, key, value, padding): `ringBytes / 64`, rounded down to 8. */
  readonly maxRecordBytes: number;
  /** Most entries: three quarters of the slots. */
  readonly maxEntries: number;
}

/** The geometry of a map region of `length` bytes (whole pages, at least {@link MIN_MAP_BYTES}). */
export function mapGeometry(length: number): MapGeometry {
  let maxSlots = 1;
  while (maxSlots * 2 * 8 <= (length - PAGE) / 8) maxSlots *= 2;
  const ringOffset = PAGE + maxSlots * 8;
  const ringBytes = length - ringOffset;
  return {
    indexOffset: PAGE,
    maxSlots,
    ringOffset,
    ringBytes,
    maxRecordBytes: Math.floor(ringBytes / 64 / 8) * 8,
    maxEntries: (maxSlots / 4) * 3,
  };
}

/** Declares a key-value map of at most `options.maxBytes` bytes (see {@link KeyValueMap}). */
export function keyValueMap(options: KeyValueMapOptions): MapDeclaration {
  return { kind: 'map', maxBytes: options.maxBytes };
}

/** A key: a string (stored as its UTF-8 bytes) or bytes. `'a'` and `Uint8Array [0x61]` are the same key. */
export type MapKey = string | Uint8Array;

let bootId: string | undefined;

/**
 * What tells this memory file apart from any other, also from a copy of its bytes in a new
 * memfd (a restored backup) and from a file of an earlier boot: a hash of the boot id,
 * device, inode and birth time (the change time moves with every store through a mapping).
 * A false difference only costs a rebuild.
 */
function memoryIdentity(fd: number): readonly [number, number] {
  if (bootId === undefined) {
    try {
      bootId = fs.readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim();
    } catch {
      bootId = '';
    }
  }
  const st = fs.fstatSync(fd, { bigint: true });
  const h = fnv1a64(Buffer.from(`${bootId}:${st.dev}:${st.ino}:${st.birthtimeNs}`));
  return [Number(h & 0xffffffffn), Number(h >> 32n)];
}

/**
 * Copies of values and keys are carved from shared 8 KiB buffers, as `Buffer.allocUnsafe`
 * does: a typed array over 64 bytes with its own buffer costs a malloc'd backing store
 * that the GC tracks, several times the rest of a `get`.
 */
const POOL_BYTES = 8192;
let pool = new ArrayBuffer(POOL_BYTES);
let poolBytes = new Uint8Array(pool);
let poolAt = 0;

/** A copy of `src[from..from+n)`, in its own memory or a slice of a shared pool buffer. */
function copyOut(src: Uint8Array, from: number, n: number): Uint8Array {
  if (n > POOL_BYTES / 8) return src.slice(from, from + n);
  if (poolAt + n > POOL_BYTES) {
    pool = new ArrayBuffer(POOL_BYTES);
    poolBytes = new Uint8Array(pool);
    poolAt = 0;
  }
  const at = poolAt;
  poolBytes.set(src.subarray(from, from + n), at);
  poolAt = (at + n + 7) & ~7;
  return new Uint8Array(pool, at, n);
}

const NO_BYTES = new Uint8Array(0);

/** Slots a new staged index starts with (it doubles as keys are staged). */
const MIN_STAGED_SLOTS = 64;

/**
 * A key-value map (see docs/state.md): keys are strings or bytes, values bytes. Changes
 * are staged and become part of the state with the next commit of the state file,
 * atomically with every other structure; reads see the staged changes.
 *
 * Committed entries are records in a ring in the shared memory; the index that finds them
 * in O(1) lives there too and survives a restart on the same memory file. Staged changes
 * are records too, written past the committed head, where no valid snapshot looks; a
 * commit makes them part of the window it publishes. Space of deleted and overwritten
 * entries is reclaimed by commits, without ever writing bytes that a valid snapshot names.
 */
export class KeyValueMap implements Structure {
  /** The name the map was declared under. */
  readonly name: string;
  /** Largest record: `entryBytes(key, value)` must not exceed it. */
  readonly maxRecordBytes: number;
  /** Most entries the map holds. */
  readonly maxEntries: number;
  /** Most bytes of records (`entryBytes` of every entry) the map holds. */
  readonly maxLiveBytes: number;
  readonly #container: StructureContainer;
  readonly #bytes: Uint8Array;
  readonly #u32: Uint32Array;
  readonly #geometry: MapGeometry;
  readonly #ring: number;
  /** Region offset of the ring. */
  readonly #ringOffset: number;
  /** u32 index of the ring's first word. */
  readonly #ringWord: number;
  /** u32 index of the index table's first word. */
  readonly #indexWord: number;
  readonly #identity: readonly [number, number];
  /** The memory file and the file offset of the region, for the reads of a rebuild. */
  readonly #fd: number;
  readonly #fileOffset: number;
  /** The mapping holding the region, and the ring's offset in it. */
  readonly #mapping: Mapping;
  readonly #mappingRing: number;
  /** Stream position up to which the ring is populated ahead of the staged records. */
  #populated = 0;
  /** Bytes populated so far: once the ring's size, every page is there. */
  #populatedBytes = 0;
  readonly #scratch: Buffer;
  /** Committed window of the ring, as stream positions. */
  #tail = 0;
  #head = 0;
  /** End of the staged records, which lie in `[head, end)`. */
  #end = 0;
  #slots: number;
  #count = 0;
  #live = 0;
  #rebuilt = false;
  /**
   * The staged keys, in the order first staged: ring byte of the key's newest staged record
   * (a tombstone for a deletion) and the key's hash; found through `#stagedSlots`, an open
   * addressing table of list index + 1. In the JS heap: nothing of it has to survive.
   */
  #stagedAt = new Uint32Array(MIN_STAGED_SLOTS / 2);
  #stagedHash = new Uint32Array(MIN_STAGED_SLOTS / 2);
  #stagedSlots = new Uint32Array(MIN_STAGED_SLOTS);
  #stagedCount = 0;
  #cleared = false;
  /** Staged totals: entries and record bytes after the commit, record bytes staged. */
  #countAfter = 0;
  #liveAfter = 0;
  #need = 0;
  /** Bumped by every commit that changes the ring: iterators started before it stop. */
  #generation = 0;
  #changed = false;
  /** The ring tails that valid snapshots may name: their bytes are reused only after. */
  readonly #named: NamedPositions;

  /** @internal created by the state file. */
  constructor(container: StructureContainer, name: string, mapping: Mapping, regionOffset: number, regionBytes: number, fd: number) {
    const region = mapping.bytes.subarray(regionOffset, regionOffset + regionBytes);
    this.#container = container;
    this.name = name;
    this.#bytes = region;
    this.#u32 = new Uint32Array(region.buffer, region.byteOffset, region.length / 4);
    const g = mapGeometry(region.length);
    this.#geometry = g;
    this.#ring = g.ringBytes;
    this.#ringOffset = g.ringOffset;
    this.#ringWord = g.ringOffset / 4;
    this.#mappingRing = regionOffset + g.ringOffset;
    this.#indexWord = g.indexOffset / 4;
    this.maxRecordBytes = g.maxRecordBytes;
    this.maxEntries = g.maxEntries;
    this.maxLiveBytes = Math.floor((g.ringBytes * 3) / 8 / 8) * 8;
    this.#identity = memoryIdentity(fd);
    this.#fd = fd;
    this.#fileOffset = mapping.offset + regionOffset;
    this.#mapping = mapping;
    this.#scratch = Buffer.alloc(MAX_KEY_BYTES);
    this.#slots = Math.min(MIN_SLOTS, g.maxSlots);
    this.#named = new NamedPositions(container.writer.layout.entries);
  }

  /** Entries, staged changes included. */
  get size(): number {
    return this.#countAfter;
  }

  /** Record bytes of the entries, staged changes included (at most {@link maxLiveBytes}). */
  get liveBytes(): number {
    return this.#liveAfter;
  }

  /**
   * Ring bytes the staged changes take: every record staged since the last commit,
   * `discard` or `clear` (a change of a staged key to a value of another size adds a
   * record; to one of the same size, or a deletion, rewrites it).
   */
  get stagedBytes(): number {
    return this.#need;
  }

  /** Whether changes are staged. */
  get staged(): boolean {
    return this.#stagedCount > 0 || this.#cleared;
  }

  /**
   * Whether opening rebuilt the index from the ring: after a crash, in a restored backup
   * (another memory file), or with a damaged index. `false` when the index left by the
   * previous process on the same memory file was used as it was, or the map is new.
   */
  get rebuilt(): boolean {
    return this.#rebuilt;
  }

  /**
   * The value of `key` (a copy), staged changes included; `undefined` when absent. A small
   * copy may share its `buffer` with other copies (as `Buffer.allocUnsafe` does): use its
   * `byteOffset` and `length`.
   */
  get(key: MapKey): Uint8Array | undefined {
    const at = this.#lookup(key);
    if (at < 0) return undefined;
    const w = this.#ringWord + (at >>> 2);
    const start = this.#ringOffset + at + ENTRY_HEADER + (this.#u32[w]! & KEY_MASK);
    return copyOut(this.#bytes, start, this.#u32[w + 1]!);
  }

  /** Whether `key` is present, staged changes included. */
  has(key: MapKey): boolean {
    return this.#lookup(key) >= 0;
  }

  /** Ring byte of the record holding the key's value, staged changes included; -1 when absent. */
  #lookup(key: MapKey): number {
    const n = this.#key(key);
    const s = this.#scratch;
    const hash = hashBytes(s, 0, n);
    if (this.#stagedCount > 0) {
      const i = this.#findStaged(hash, s, 0, n);
      if (i >= 0) {
        const at = this.#stagedAt[i]!;
        return (this.#u32[this.#ringWord + (at >>> 2)]! & FLAG_TOMBSTONE) !== 0 ? -1 : at;
      }
    }
    if (this.#cleared) return -1;
    const slot = this.#find(hash, s, 0, n);
    return slot < 0 ? -1 : this.#recordByte(slot);
  }

  /**
   * Stages `key` = `value` (the value's bytes are copied). Committed with the next commit.
   * @throws {@link ShmfdError} `ERR_STATE_KEY_TOO_LARGE` (key over {@link MAX_KEY_BYTES}),
   *   `ERR_STATE_VALUE_TOO_LARGE` (record over {@link maxRecordBytes}), `ERR_STATE_MAP_FULL`
   *   (the map would hold more than {@link maxEntries} entries or {@link maxLiveBytes}
   *   bytes, or the commit would append more than the ring can take now: commit first);
   *   nothing is staged then
   */
  set(key: MapKey, value: Uint8Array): this {
    const n = this.#key(key);
    if (!(value instanceof Uint8Array)) throw new TypeError(`map ${this.name}: a value is a Uint8Array`);
    const size = entryBytes(n, value.length);
    if (size > this.maxRecordBytes) {
      throw new ShmfdError('ERR_STATE_VALUE_TOO_LARGE', `map ${this.name}: an entry with a ${n}-byte key and a ${value.length}-byte value needs ${size} bytes, more than the largest record of ${this.maxRecordBytes}`);
    }
    const s = this.#scratch;
    const hash = hashBytes(s, 0, n);
    const u32 = this.#u32;
    // What the key contributes to the totals after the commit, before and after the change.
    let count = this.#countAfter + 1;
    let live = this.#liveAfter + size;
    let need = this.#need + size;
    const i = this.#stagedCount > 0 ? this.#findStaged(hash, s, 0, n) : -1;
    let inPlace = -1;
    if (i >= 0) {
      const at = this.#stagedAt[i]!;
      const w = this.#ringWord + (at >>> 2);
      const old = entryBytes(u32[w]! & KEY_MASK, u32[w + 1]!);
      if ((u32[w]! & FLAG_TOMBSTONE) === 0) {
        count--;
        live -= old;
      }
      if (old === size) {
        need -= size;
        inPlace = at;
      }
    } else if (!this.#cleared) {
      const slot = this.#find(hash, s, 0, n);
      if (slot >= 0) {
        count--;
        live -= this.#recordBytesAt(this.#recordByte(slot));
      }
    }
    this.#checkRoom(count, live, need);
    if (inPlace >= 0) this.#writeRecord(inPlace, n, hash, value);
    else {
      const at = this.#append(n, hash, value.length);
      this.#writeRecord(at, n, hash, value);
      if (i >= 0) this.#stagedAt[i] = at;
      else this.#addStaged(hash, at);
    }
    this.#countAfter = count;
    this.#liveAfter = live;
    this.#need = need;
    this.#container.markDirty();
    return this;
  }

  /**
   * Stages the deletion of `key`.
   * @returns whether the key was present (staged changes included)
   */
  delete(key: MapKey): boolean {
    const n = this.#key(key);
    const s = this.#scratch;
    const hash = hashBytes(s, 0, n);
    const u32 = this.#u32;
    const i = this.#stagedCount > 0 ? this.#findStaged(hash, s, 0, n) : -1;
    if (i >= 0) {
      // The staged record becomes the tombstone: no room needed, and an earlier record of
      // the key in the window (committed, or staged before) is overridden by it.
      const at = this.#stagedAt[i]!;
      const w = this.#ringWord + (at >>> 2);
      const word0 = u32[w]!;
      if ((word0 & FLAG_TOMBSTONE) !== 0) return false;
      this.#writeHeader(at, word0 | FLAG_TOMBSTONE, u32[w + 1]!, hash);
      this.#countAfter--;
      this.#liveAfter -= entryBytes(word0 & KEY_MASK, u32[w + 1]!);
      this.#container.markDirty();
      return true;
    }
    if (this.#cleared) return false;
    const slot = this.#find(hash, s, 0, n);
    if (slot < 0) return false;
    // A tombstone takes no more than the record it deletes: this never exceeds the room.
    const at = this.#append(n, hash, 0);
    this.#writeRecord(at, FLAG_TOMBSTONE | n, hash, NO_BYTES);
    this.#addStaged(hash, at);
    this.#countAfter--;
    this.#liveAfter -= this.#recordBytesAt(this.#recordByte(slot));
    this.#need += entryBytes(n, 0);
    this.#container.markDirty();
    return true;
  }

  /** Stages the removal of every entry. */
  clear(): void {
    if (this.#countAfter === 0 && !this.staged) return;
    this.#dropStaged();
    this.#cleared = true;
    this.#countAfter = 0;
    this.#liveAfter = 0;
    this.#container.markDirty();
  }

  /** Drops the staged changes. */
  discard(): void {
    this.#dropStaged();
    this.#cleared = false;
    this.#countAfter = this.#count;
    this.#liveAfter = this.#live;
  }

  /** Commits the whole state file (see `StateFile.commit`). */
  commit(): boolean {
    return this.#container.commit();
  }

  /**
   * The entries as `[key, value]` (copies; keys as bytes: decode string keys with
   * `TextDecoder`), staged changes included: committed entries in the order they were last
   * written, then the staged ones. A commit that changes the map ends an iteration started
   * before it with `ERR_STATE_MAP_CHANGED`; staging does not.
   */
  *entries(): IterableIterator<[Uint8Array, Uint8Array]> {
    for (const at of this.#walk()) {
      const w = this.#ringWord + (at >>> 2);
      const start = this.#ringOffset + at + ENTRY_HEADER;
      const keyBytes = this.#u32[w]! & KEY_MASK;
      yield [copyOut(this.#bytes, start, keyBytes), copyOut(this.#bytes, start + keyBytes, this.#u32[w + 1]!)];
    }
  }

  /** The keys (copies, as bytes), in the order of {@link entries}. */
  *keys(): IterableIterator<Uint8Array> {
    for (const at of this.#walk()) {
      const start = this.#ringOffset + at + ENTRY_HEADER;
      yield copyOut(this.#bytes, start, this.#u32[this.#ringWord + (at >>> 2)]! & KEY_MASK);
    }
  }

  /** Same as {@link entries}. */
  [Symbol.iterator](): IterableIterator<[Uint8Array, Uint8Array]> {
    return this.entries();
  }

  /**
   * Ring bytes of the records of the entries: the committed ones not overridden by a
   * staged change, then the staged ones. A commit between two steps ends the walk.
   */
  *#walk(): IterableIterator<number> {
    const generation = this.#generation;
    const changed = (): ShmfdError => new ShmfdError('ERR_STATE_MAP_CHANGED', `map ${this.name}: a commit changed the map during an iteration`);
    const ring = this.#ringWord;
    let at = this.#cleared ? this.#head : this.#tail;
    while (at < this.#head) {
      if (this.#generation !== generation) throw changed();
      const phys = at % this.#ring;
      if (this.#ring - phys < ENTRY_HEADER || (this.#u32[ring + (phys >>> 2)]! & FLAG_WRAP) !== 0) {
        at += this.#ring - phys;
        continue;
      }
      const w = ring + (phys >>> 2);
      const word0 = this.#u32[w]!;
      const keyBytes = word0 & KEY_MASK;
      at += entryBytes(keyBytes, this.#u32[w + 1]!);
      const hash = this.#u32[w + 2]!;
      if ((word0 & FLAG_TOMBSTONE) !== 0 || !this.#isCurrent(phys, hash)) continue;
      if (this.#stagedCount > 0 && this.#findStaged(hash, this.#bytes, this.#ringOffset + phys + ENTRY_HEADER, keyBytes) >= 0) continue;
      yield phys;
    }
    // Staging during the walk may add keys (seen) or replace records (their new ones are seen).
    for (let i = 0; i < this.#stagedCount; i++) {
      if (this.#generation !== generation) throw changed();
      const phys = this.#stagedAt[i]!;
      if ((this.#u32[ring + (phys >>> 2)]! & FLAG_TOMBSTONE) === 0) yield phys;
    }
  }

  /** Puts the bytes of `key` into the scratch buffer; returns their number. */
  #key(key: MapKey): number {
    const s = this.#scratch;
    if (typeof key === 'string') {
      // Short ASCII keys are copied here: cheaper than a call into Buffer's UTF-8 encoder.
      const length = key.length;
      if (length <= 64) {
        let i = 0;
        for (; i < length; i++) {
          const c = key.charCodeAt(i);
          if (c >= 0x80) break;
          s[i] = c;
        }
        if (i === length) return length;
      }
      if (key.length * 3 > MAX_KEY_BYTES && Buffer.byteLength(key, 'utf8') > MAX_KEY_BYTES) throw this.#keyTooLarge(Buffer.byteLength(key, 'utf8'));
      return s.write(key, 0, 'utf8');
    }
    if (!(key instanceof Uint8Array)) throw new TypeError(`map ${this.name}: a key is a string or a Uint8Array`);
    if (key.length > MAX_KEY_BYTES) throw this.#keyTooLarge(key.length);
    s.set(key, 0);
    return key.length;
  }

  #keyTooLarge(n: number): ShmfdError {
    return new ShmfdError('ERR_STATE_KEY_TOO_LARGE', `map ${this.name}: a key of ${n} bytes is longer than ${MAX_KEY_BYTES} bytes`);
  }

  /** Throws `ERR_STATE_MAP_FULL` unless the totals after a change fit the limits. */
  #checkRoom(count: number, live: number, need: number): void {
    if (count <= this.maxEntries && live <= this.maxLiveBytes && live + need <= this.#ring / 2 - 4 * this.maxRecordBytes) return;
    throw new ShmfdError(
      'ERR_STATE_MAP_FULL',
      count > this.maxEntries
        ? `map ${this.name} is full: it holds at most ${this.maxEntries} entries`
        : live > this.maxLiveBytes
          ? `map ${this.name} is full: ${live} bytes of entries would exceed its ${this.maxLiveBytes} bytes`
          : `map ${this.name}: the staged changes (${need} bytes) do not fit the ring before a commit; commit more often`,
    );
  }

  /**
   * Writes a record at ring byte `at`: header word `word0` (the key's length and flags),
   * the key in the scratch buffer, `value`, zero padding. Without allocating: a subarray
   * is an object per call.
   */
  #writeRecord(at: number, word0: number, hash: number, value: Uint8Array): void {
    const n = word0 & KEY_MASK;
    this.#writeHeader(at, word0, value.length, hash);
    const bytes = this.#bytes;
    const start = this.#ringOffset + at + ENTRY_HEADER;
    const s = this.#scratch;
    if (n <= 128) for (let j = 0; j < n; j++) bytes[start + j] = s[j]!;
    else bytes.set(s.subarray(0, n), start);
    if (value.length > 0) bytes.set(value, start + n);
    const end = this.#ringOffset + at + entryBytes(n, value.length);
    for (let j = start + n + value.length; j < end; j++) bytes[j] = 0;
  }

  // ---- the staged index: open addressing with linear probing over the staged keys

  /** List index of the staged key `src[from..from+n)` with `hash`, or -1. */
  #findStaged(hash: number, src: Uint8Array, from: number, n: number): number {
    const table = this.#stagedSlots;
    const mask = table.length - 1;
    for (let j = hash & mask; ; j = (j + 1) & mask) {
      const e = table[j]!;
      if (e === 0) return -1;
      if (this.#stagedHash[e - 1] === hash && this.#sameKey(this.#stagedAt[e - 1]!, src, from, n)) return e - 1;
    }
  }

  /** Whether the record at ring byte `at` has the key `src[from..from+n)`. */
  #sameKey(at: number, src: Uint8Array, from: number, n: number): boolean {
    if ((this.#u32[this.#ringWord + (at >>> 2)]! & KEY_MASK) !== n) return false;
    const bytes = this.#bytes;
    const key = this.#ringOffset + at + ENTRY_HEADER;
    for (let j = 0; j < n; j++) if (bytes[key + j] !== src[from + j]) return false;
    return true;
  }

  #addStaged(hash: number, at: number): void {
    if ((this.#stagedCount + 1) * 2 > this.#stagedSlots.length) this.#growStaged();
    const i = this.#stagedCount++;
    this.#stagedAt[i] = at;
    this.#stagedHash[i] = hash;
    const table = this.#stagedSlots;
    const mask = table.length - 1;
    let j = hash & mask;
    while (table[j] !== 0) j = (j + 1) & mask;
    table[j] = i + 1;
  }

  #growStaged(): void {
    const slots = this.#stagedSlots.length * 2;
    const at = new Uint32Array(slots / 2);
    at.set(this.#stagedAt);
    const hashes = new Uint32Array(slots / 2);
    hashes.set(this.#stagedHash);
    this.#stagedAt = at;
    this.#stagedHash = hashes;
    const table = new Uint32Array(slots);
    const mask = slots - 1;
    for (let i = 0; i < this.#stagedCount; i++) {
      let j = hashes[i]! & mask;
      while (table[j] !== 0) j = (j + 1) & mask;
      table[j] = i + 1;
    }
    this.#stagedSlots = table;
  }

  /** Forgets the staged keys and records (their ring bytes are garbage past the head). */
  #dropStaged(): void {
    const table = this.#stagedSlots;
    if (this.#stagedCount * 8 < table.length) {
      // Few keys in a large table: clear their slots only (found by value, past zeroed ones).
      const mask = table.length - 1;
      for (let i = 0; i < this.#stagedCount; i++) {
        let j = this.#stagedHash[i]! & mask;
        while (table[j] !== i + 1) j = (j + 1) & mask;
        table[j] = 0;
      }
    } else {
      table.fill(0);
    }
    this.#stagedCount = 0;
    this.#end = this.#head;
    this.#need = 0;
  }

  // ---- the index: open addressing with linear probing, 8-byte slots (record position / 8 + 1, hash)

  /** Byte offset in the ring of the record slot `slot` names. */
  #recordByte(slot: number): number {
    return (this.#u32[this.#indexWord + 2 * slot]! - 1) * 8;
  }

  #recordBytesAt(phys: number): number {
    const w = this.#ringWord + (phys >>> 2);
    return entryBytes(this.#u32[w]! & KEY_MASK, this.#u32[w + 1]!);
  }

  /** The slot holding the key `src[from..from+n)` with `hash`, or -1. */
  #find(hash: number, src: Uint8Array, from: number, n: number): number {
    const u32 = this.#u32;
    const base = this.#indexWord;
    const mask = this.#slots - 1;
    for (let i = hash & mask; ; i = (i + 1) & mask) {
      const pos = u32[base + 2 * i]!;
      if (pos === 0) return -1;
      if (u32[base + 2 * i + 1] === hash && this.#sameKey((pos - 1) * 8, src, from, n)) return i;
    }
  }

  /** Whether the index names the record at ring byte `phys` (whose key hashes to `hash`). */
  #isCurrent(phys: number, hash: number): boolean {
    const u32 = this.#u32;
    const base = this.#indexWord;
    const mask = this.#slots - 1;
    const want = phys / 8 + 1;
    for (let i = hash & mask; ; i = (i + 1) & mask) {
      const pos = u32[base + 2 * i]!;
      if (pos === 0) return false;
      if (pos === want) return true;
    }
  }

  #insertNew(hash: number, phys: number): void {
    const u32 = this.#u32;
    const base = this.#indexWord;
    const i = emptySlot(u32, base, 2, this.#slots - 1, hash);
    u32[base + 2 * i] = phys / 8 + 1;
    u32[base + 2 * i + 1] = hash;
  }

  /** Empties `slot`, moving later slots of the probe run back (no tombstones). */
  #remove(slot: number): void {
    removeSlot(this.#u32, this.#indexWord, 2, this.#slots - 1, slot);
    this.#count--;
  }

  /** Makes the table `slots` long, reinserting every entry (after a clear: empty). */
  #resize(slots: number, keep: boolean): void {
    const base = this.#indexWord;
    const old = keep ? this.#u32.slice(base, base + 2 * this.#slots) : undefined;
    this.#u32.fill(0, base, base + 2 * Math.max(slots, this.#slots));
    this.#slots = slots;
    if (old === undefined) return;
    for (let i = 0; i < old.length; i += 2) {
      if (old[i] !== 0) this.#insertNew(old[i + 1]!, (old[i]! - 1) * 8);
    }
  }

  // ---- the ring

  /**
   * Makes room for a record at the end of the staged records (after a wrap marker when it
   * does not fit before the ring's end) and returns its ring byte; the caller writes it.
   */
  #append(keyBytes: number, hash: number, valueBytes: number): number {
    const size = entryBytes(keyBytes, valueBytes);
    let phys = this.#end % this.#ring;
    if (this.#ring - phys < size) {
      this.#protect(this.#end + (this.#ring - phys));
      if (this.#ring - phys >= ENTRY_HEADER) this.#writeHeader(phys, FLAG_WRAP, 0, 0);
      this.#end += this.#ring - phys;
      phys = 0;
    }
    this.#protect(this.#end + size);
    if (this.#end + size > this.#populated) this.#populate(this.#end + size);
    this.#end += size;
    return phys;
  }

  /** Populates the ring in {@link POPULATE_BYTES} steps from the end of the staged records past `end`. */
  #populate(end: number): void {
    let from = Math.max(this.#populated, this.#end);
    while (from < end) {
      const phys = from % this.#ring;
      const length = Math.min(POPULATE_BYTES, this.#ring - phys);
      if (!this.#mapping.populate(this.#mappingRing + phys, length)) {
        from = Infinity;
        break;
      }
      from += length;
      this.#populatedBytes += length;
    }
    this.#populated = this.#populatedBytes >= this.#ring ? Infinity : from;
  }

  #writeHeader(phys: number, word0: number, valueBytes: number, hash: number): void {
    const w = this.#ringWord + (phys >>> 2);
    this.#u32[w] = word0;
    this.#u32[w + 1] = valueBytes;
    this.#u32[w + 2] = hash;
    this.#u32[w + 3] = (word0 ^ valueBytes ^ hash ^ CHECK_SALT) >>> 0;
  }

  /**
   * Before ring bytes up to stream position `end` are written: they overwrite positions
   * below `end - ring`, so every snapshot naming a tail below that is invalidated first.
   * The committed tail is never below it (the space accounting of {@link #checkRoom}).
   */
  #protect(end: number): void {
    const offset = this.#named.dropBelow(end - this.#ring);
    if (offset >= 0) this.#container.writer.invalidateBefore(offset + 1);
  }

  // ---- commit

  /**
   * @internal Makes the staged records part of the committed window (the snapshot about to
   * be published names it) and updates the index, reclaiming space from the tail; writes
   * the payload words: the ring's tail and head.
   */
  encode(u32: Uint32Array, word: number): void {
    if (this.staged) {
      const from = this.#head;
      this.#write();
      writtenRing(this.#container, this.#bytes.subarray(this.#ringOffset, this.#ringOffset + this.#ring), from, this.#head);
    }
    storeU64(u32, word, this.#tail);
    storeU64(u32, word + 2, this.#head);
  }

  #write(): void {
    const h = this.#u32;
    h[H_VALID] = 0; // the index changes now; a crash before it is valid again means a rebuild
    if (this.#cleared) {
      this.#tail = this.#head;
      this.#count = 0;
      this.#live = 0;
      this.#resize(Math.min(MIN_SLOTS, this.#geometry.maxSlots), false);
    }
    let slots = this.#slots;
    while (this.#countAfter > (slots / 4) * 3 && slots < this.#geometry.maxSlots) slots *= 2;
    if (slots !== this.#slots) this.#resize(slots, true);
    this.#reclaim();
    const bytes = this.#bytes;
    const keyAt = this.#ringOffset + ENTRY_HEADER;
    // Deletions first, so the table never holds more than the final number of entries.
    for (let pass = 0; pass < 2; pass++) {
      for (let i = 0; i < this.#stagedCount; i++) {
        const at = this.#stagedAt[i]!;
        const w = this.#ringWord + (at >>> 2);
        const tombstone = (h[w]! & FLAG_TOMBSTONE) !== 0;
        if (tombstone !== (pass === 0)) continue;
        const hash = this.#stagedHash[i]!;
        const slot = this.#find(hash, bytes, keyAt + at, h[w]! & KEY_MASK);
        if (tombstone) {
          if (slot >= 0) this.#remove(slot);
        } else if (slot >= 0) {
          h[this.#indexWord + 2 * slot] = at / 8 + 1;
        } else {
          this.#insertNew(hash, at);
          this.#count++;
        }
      }
    }
    this.#head = this.#end;
    this.#live = this.#liveAfter;
    this.#countAfter = this.#count;
    this.#dropStaged();
    this.#cleared = false;
    this.#generation++;
    this.#changed = true;
  }

  /**
   * Moves the oldest records out of the way until the window (committed records, the
   * staged ones, and the ones moved) is at most half the ring less two records: a live
   * record not changed by this commit is copied after the staged ones, a dead one
   * (overwritten, deleted, a tombstone) is dropped. The bytes behind the new tail stay
   * untouched until no valid snapshot names them.
   */
  #reclaim(): void {
    const ring = this.#ring;
    const target = ring / 2 - 2 * this.maxRecordBytes;
    const end = this.#head;
    const u32 = this.#u32;
    const bytes = this.#bytes;
    while (this.#end - this.#tail > target && this.#tail < end) {
      const phys = this.#tail % ring;
      const w = this.#ringWord + (phys >>> 2);
      if (ring - phys < ENTRY_HEADER || (u32[w]! & FLAG_WRAP) !== 0) {
        this.#tail += ring - phys;
        continue;
      }
      const word0 = u32[w]!;
      const keyBytes = word0 & KEY_MASK;
      const valueBytes = u32[w + 1]!;
      const hash = u32[w + 2]!;
      const size = entryBytes(keyBytes, valueBytes);
      if ((word0 & FLAG_TOMBSTONE) === 0 && this.#isCurrent(phys, hash)) {
        const start = this.#ringOffset + phys;
        if (this.#stagedCount === 0 || this.#findStaged(hash, bytes, start + ENTRY_HEADER, keyBytes) < 0) {
          // The source stays named by the committed snapshot, and the copy lands past the
          // window, so it cannot overlap the source.
          const moved = this.#append(keyBytes, hash, valueBytes);
          bytes.copyWithin(this.#ringOffset + moved, start, start + size);
          u32[this.#indexWord + 2 * this.#slotOf(phys, hash)] = moved / 8 + 1;
        }
      }
      this.#tail += size;
    }
  }

  #slotOf(phys: number, hash: number): number {
    const mask = this.#slots - 1;
    const want = phys / 8 + 1;
    for (let i = hash & mask; ; i = (i + 1) & mask) if (this.#u32[this.#indexWord + 2 * i] === want) return i;
  }

  /** @internal */
  published(offset: number): void {
    this.#named.add(this.#tail, offset);
    if (!this.#changed) return;
    this.#changed = false;
    this.#writeIndexHeader();
  }

  #writeIndexHeader(): void {
    const h = this.#u32;
    h[H_VALID] = 0;
    h[H_MAGIC] = INDEX_MAGIC_LO;
    h[H_MAGIC + 1] = INDEX_MAGIC_HI;
    h[H_IDENTITY] = this.#identity[0];
    h[H_IDENTITY + 1] = this.#identity[1];
    storeU64(h, H_TAIL, this.#tail);
    storeU64(h, H_HEAD, this.#head);
    storeU64(h, H_SLOTS, this.#slots);
    storeU64(h, H_COUNT, this.#count);
    storeU64(h, H_LIVE, this.#live);
    h[H_VALID] = 1;
  }

  /** @internal A valid snapshot at stream `offset` names the ring tail `tail`. */
  named(tail: number, offset: number): void {
    this.#named.add(tail, offset);
  }

  /**
   * @internal Takes over the committed window `[tail, head)`: uses the index when its
   * header says it was built for exactly that window in this memory file, otherwise
   * rebuilds it from the records.
   * @returns a description of the damage, or undefined
   */
  restore(tail: number, head: number, fresh: boolean, log: Log): string | undefined {
    if (fresh) {
      this.#tail = this.#head = 0;
      this.#resize(Math.min(MIN_SLOTS, this.#geometry.maxSlots), false);
      this.#count = this.#live = 0;
      this.#writeIndexHeader();
      this.discard();
      return undefined;
    }
    if (tail % 8 !== 0 || head % 8 !== 0 || tail > head || head - tail > this.#ring / 2) {
      return `map ${this.name}: the committed window [${tail}, ${head}) does not fit half its ${this.#ring}-byte ring`;
    }
    this.#tail = tail;
    this.#head = head;
    if (this.#trustIndex()) {
      this.discard();
      return undefined;
    }
    const window = `${((head - tail) / 2 ** 20).toFixed(1)} MiB`;
    const report = head - tail >= LARGE_REBUILD ? log.warn.bind(log) : log.info.bind(log);
    report(`map ${this.name}: rebuilding its index from ${window} of entries (a restored copy, or a commit was interrupted); a few seconds per GiB`);
    const started = performance.now();
    const damage = this.#rebuild();
    if (damage === undefined) log.info(`map ${this.name}: index rebuilt, ${this.#count} entries, in ${Math.round(performance.now() - started)} ms`);
    this.discard();
    return damage;
  }

  #trustIndex(): boolean {
    const h = this.#u32;
    const u64 = (w: number): number => h[w]! + h[w + 1]! * 0x1_0000_0000;
    const slots = u64(H_SLOTS);
    const ok =
      h[H_MAGIC] === INDEX_MAGIC_LO &&
      h[H_MAGIC + 1] === INDEX_MAGIC_HI &&
      h[H_VALID] === 1 &&
      h[H_IDENTITY] === this.#identity[0] &&
      h[H_IDENTITY + 1] === this.#identity[1] &&
      u64(H_TAIL) === this.#tail &&
      u64(H_HEAD) === this.#head &&
      slots >= Math.min(MIN_SLOTS, this.#geometry.maxSlots) &&
      slots <= this.#geometry.maxSlots &&
      (slots & (slots - 1)) === 0 &&
      u64(H_COUNT) <= (slots / 4) * 3 &&
      u64(H_LIVE) <= this.#ring;
    if (!ok) return false;
    this.#slots = slots;
    this.#count = u64(H_COUNT);
    this.#live = u64(H_LIVE);
    return true;
  }

  /**
   * Rebuilds the index from the committed records (see ./kv-rebuild.ts), starting at the
   * table size the old index header suggests (a hint only), and writes it into the table.
   */
  #rebuild(): string | undefined {
    this.#rebuilt = true;
    const u32 = this.#u32;
    u32[H_VALID] = 0;
    const maxSlots = this.#geometry.maxSlots;
    const hinted = u32[H_SLOTS]! + u32[H_SLOTS + 1]! * 0x1_0000_0000;
    let slots = Math.min(MIN_SLOTS, maxSlots);
    if (hinted > slots && hinted <= maxSlots && (hinted & (hinted - 1)) === 0) slots = hinted;
    const ring = this.#bytes.subarray(this.#ringOffset, this.#ringOffset + this.#ring);
    const rebuilt = rebuildIndex({
      name: this.name,
      ring: this.#ring,
      tail: this.#tail,
      head: this.#head,
      slots,
      maxSlots,
      maxEntries: this.maxEntries,
      maxRecordBytes: this.maxRecordBytes,
      ringBytes: ring,
      ringWords: this.#u32.subarray(this.#ringWord, this.#ringWord + this.#ring / 4),
      read: (into, phys, limit) => this.#readRing(into, phys, limit),
    });
    if (typeof rebuilt === 'string') return rebuilt;
    // Every slot is written, empty ones too: the table is written once, in order.
    const t = rebuilt.table;
    const index = this.#indexWord;
    for (let slot = 0, s = 0; slot < rebuilt.slots; slot++, s += REBUILT_SLOT_WORDS) {
      u32[index + 2 * slot] = t[s]!;
      u32[index + 2 * slot + 1] = t[s + 1]!;
    }
    this.#slots = rebuilt.slots;
    this.#count = rebuilt.count;
    this.#live = rebuilt.live;
    this.#writeIndexHeader();
    return undefined;
  }

  /** Reads ring bytes from `phys` into `into`, at most `limit`; returns how many. */
  #readRing(into: Uint8Array, phys: number, limit: number): number {
    return readAt(this.#fd, into, Math.min(into.length, limit), this.#fileOffset + this.#ringOffset + phys);
  }
}
