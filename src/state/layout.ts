/**
 * What a state file declares and how it lies in the tail of a snapshot file: the
 * declarations of the structures, the directory page that records them, and the snapshot
 * payload that names a committed state of every structure (docs/state.md).
 * @module
 */
import { TextDecoder, TextEncoder } from 'node:util';
import { ShmfdError } from '../base/errors.js';
import { PAGE } from '../snapshot/format.js';

/** The typed arrays a {@link versionedCell} can hold. */
export type CellArray =
  | Int8Array
  | Uint8Array
  | Uint8ClampedArray
  | Int16Array
  | Uint16Array
  | Int32Array
  | Uint32Array
  | Float32Array
  | Float64Array
  | BigInt64Array
  | BigUint64Array;

/** Constructor of a {@link CellArray} (e.g. `Float64Array`). */
export interface CellArrayConstructor<T extends CellArray> {
  new (buffer: ArrayBuffer, byteOffset: number, length: number): T;
  readonly BYTES_PER_ELEMENT: number;
}

/** An append-only log of byte records; see {@link appendLog}. */
export interface LogDeclaration {
  readonly kind: 'log';
  /** Bytes for records (headers and padding included), a multiple of 8. */
  readonly capacity: number;
  /** Retained logs: bytes of the newest records a commit keeps; undefined keeps everything. */
  readonly keepBytes?: number | undefined;
  /** Retained logs: most records a commit keeps; undefined for no limit. */
  readonly keepRecords?: number | undefined;
}

/**
 * Options of {@link appendLog}. Without them a log keeps every record and ends in
 * `ERR_STATE_LOG_FULL`; with either, it is a ring that drops its oldest records.
 */
export interface AppendLogOptions {
  /**
   * Keep the newest records within this many bytes (headers, padding and the gap a
   * record skips at the end of the region included): a multiple of 8 from 16 to
   * `capacity - 24`. The rest of the capacity is the room for the records appended
   * between two commits. Default with `keepRecords`: half the capacity.
   */
  keepBytes?: number;
  /** Keep at most the newest `keepRecords` records (an integer from 1 to 2^32 - 1). */
  keepRecords?: number;
}

/** A versioned fixed-size value; see {@link versionedCell}. */
export interface CellDeclaration<T extends CellArray = CellArray> {
  readonly kind: 'cell';
  readonly type: CellArrayConstructor<T>;
  /** Number of elements. */
  readonly length: number;
  /** Copies kept in the tail (2 = double buffer). */
  readonly copies: number;
}

/** A set of u64 counters; see {@link counterSet}. */
export interface CounterDeclaration {
  readonly kind: 'counters';
  /** Number of counters. */
  readonly count: number;
  /** Copies kept in the tail (2 = double buffer). */
  readonly copies: number;
}

/** A key-value map; see {@link keyValueMap}. */
export interface MapDeclaration {
  readonly kind: 'map';
  /** Bytes of the map's region: index, ring of entries and a header page. */
  readonly maxBytes: number;
}

/** Options of {@link keyValueMap}. */
export interface KeyValueMapOptions {
  /**
   * Bytes the map may take in the memory file, a multiple of 4096 from 64 KiB to 2^32
   * (pages are only allocated when touched). Entries may take about a third of it.
   */
  maxBytes: number;
}

/** Any structure declaration. */
export type Declaration = LogDeclaration | CellDeclaration | CounterDeclaration | MapDeclaration;

/**
 * The structures of a state file by name, in the order their regions follow each other in
 * the tail. Names are 1 to 24 bytes: a letter or `_`, then letters, digits, `_`, `.`, `-`.
 */
export type Declarations = Readonly<Record<string, Declaration>>;

/** Options of {@link versionedCell} and {@link counterSet}. */
export interface CopiesOptions {
  /**
   * Copies of the value kept in the tail, 2 to 64 (default 2, a double buffer). A
   * snapshot naming a copy stays valid until the copy is reused, `copies - 1` committed
   * updates later: more copies give a restore host more time to copy the file.
   */
  copies?: number;
}

/** Most structures one state file holds (what fits the directory page). */
export const MAX_STRUCTURES = 63;
/** Longest structure name, in UTF-8 bytes. */
export const MAX_NAME_BYTES = 24;
/** Record headers, record starts and log capacities are multiples of this. */
export const RECORD_ALIGN = 8;
/** Bytes of a record header: u32 length, then u32 bitwise NOT of the length. */
export const RECORD_HEADER = 8;
/** `"shmstate"` in ASCII, read as a little-endian u64: the directory's first word. */
export const DIRECTORY_MAGIC = 0x6574617473_6d6873n;
/** Version of the directory and payload format. */
export const STATE_FORMAT_VERSION = 1;
/** `"SHST"` in ASCII as a little-endian u32: the first word of every payload. */
export const PAYLOAD_MAGIC = 0x54534853;
/** Payload bytes before the per-structure words. */
export const PAYLOAD_HEADER = 24;
/** Payload bytes per structure: two u64. */
export const PAYLOAD_PER_STRUCTURE = 16;
/** Bytes a payload of a layout not at tail offset 0 ends with: the u64 tail offset of its directory. */
export const PAYLOAD_BASE_BYTES = 8;
/** Directory bytes before the entries. */
export const DIRECTORY_HEADER = 32;
/** Directory bytes per entry. */
export const DIRECTORY_ENTRY = 64;
/** Cell copies start on this boundary (a cache line). */
const COPY_ALIGN = 64;

/** Kind codes stored in the directory. */
export const KIND_CODE = Object.freeze({ log: 1, cell: 2, counters: 3, map: 4 } as const);

const ELEMENT_TYPES: readonly CellArrayConstructor<CellArray>[] = [
  Int8Array,
  Uint8Array,
  Uint8ClampedArray,
  Int16Array,
  Uint16Array,
  Int32Array,
  Uint32Array,
  Float32Array,
  Float64Array,
  BigInt64Array,
  BigUint64Array,
];

const NAME_PATTERN = /^[A-Za-z_][A-Za-z0-9_.-]*$/;
const MAX_REGION = 2 ** 32;

/**
 * Declares an append-only log of byte records: by default one that keeps every record
 * until it is full; with `keepBytes` or `keepRecords` a ring that keeps only the newest.
 * @param capacity bytes for records in the tail, a multiple of 8; a record takes 8 header
 *   bytes (16 in a retained log) plus its length rounded up to 8
 */
export function appendLog(capacity: number, options: AppendLogOptions = {}): LogDeclaration {
  const { keepBytes, keepRecords } = options;
  if (keepBytes === undefined && keepRecords === undefined) return { kind: 'log', capacity };
  return { kind: 'log', capacity, keepBytes: keepBytes ?? Math.floor(capacity / 16) * 8, keepRecords };
}

/**
 * Declares a versioned value of `length` elements of `type`, kept in `copies` copies.
 * Its value before the first committed update is all zeros.
 */
export function versionedCell<T extends CellArray>(type: CellArrayConstructor<T>, length: number, options: CopiesOptions = {}): CellDeclaration<T> {
  return { kind: 'cell', type, length, copies: options.copies ?? 2 };
}

/** Declares `count` unsigned 64-bit counters, all 0 before the first commit. */
export function counterSet(count: number, options: CopiesOptions = {}): CounterDeclaration {
  return { kind: 'counters', count, copies: options.copies ?? 2 };
}

/** A declared structure with its place in the tail. */
export interface PlacedStructure {
  readonly name: string;
  readonly declaration: Declaration;
  /** Index in the directory and in every payload. */
  readonly index: number;
  /** Tail offset of the region (page-aligned). */
  readonly offset: number;
  /** Bytes of the region (whole pages). */
  readonly length: number;
  /** Cells: bytes between the starts of two copies. */
  readonly stride: number;
  /** Cells: bytes of one copy's value. */
  readonly valueBytes: number;
}

/** Where everything lies in the tail, and the directory bytes that describe it. */
export interface StateLayout {
  readonly structures: readonly PlacedStructure[];
  /** Tail offset of the directory page: 0, or past an older layout after a migration. */
  readonly base: number;
  /** Tail bytes the directory page and all regions need (up to the end of the last region). */
  readonly tailBytes: number;
  /** The directory's bytes (header and entries, without the zero rest of its page). */
  readonly directory: Uint8Array;
  /** FNV-1a 64 of {@link directory}: every payload carries it. */
  readonly hash: bigint;
  /** Bytes of every payload. */
  readonly payloadBytes: number;
}

function declarationError(message: string): ShmfdError {
  return new ShmfdError('ERR_STATE_DECLARATION', message);
}

function roundUp(n: number, to: number): number {
  return Math.ceil(n / to) * to;
}

function checkCopies(name: string, copies: number): void {
  if (!Number.isInteger(copies) || copies < 2 || copies > 64) {
    throw declarationError(`${name}: copies must be an integer from 2 to 64, got ${String(copies)}`);
  }
}

/**
 * Validates the declarations and places them: the directory takes the page at tail offset
 * `base` (a multiple of the page size; 0 but for a layout a migration placed after an
 * older one), then every region follows on a page boundary, in declaration order.
 * @throws {@link ShmfdError} `ERR_STATE_DECLARATION` naming the structure and the problem
 */
export function planLayout(declarations: Declarations, base = 0): StateLayout {
  if (typeof declarations !== 'object' || declarations === null) throw declarationError('the declarations must be an object of named structures');
  const names = Object.keys(declarations);
  if (names.length === 0) throw declarationError('declare at least one structure');
  if (names.length > MAX_STRUCTURES) throw declarationError(`at most ${MAX_STRUCTURES} structures fit the directory, got ${names.length}`);
  const encoder = new TextEncoder();
  const structures: PlacedStructure[] = [];
  let offset = base + PAGE;
  for (const [index, name] of names.entries()) {
    const d = declarations[name]!;
    if (!NAME_PATTERN.test(name) || encoder.encode(name).length > MAX_NAME_BYTES) {
      throw declarationError(`${JSON.stringify(name)}: a name is 1 to ${MAX_NAME_BYTES} letters, digits, '_', '.', '-', starting with a letter or '_'`);
    }
    let bytes: number;
    let stride = 0;
    let valueBytes = 0;
    switch (d?.kind) {
      case 'log':
        if (!Number.isSafeInteger(d.capacity) || d.capacity < 2 * RECORD_ALIGN || d.capacity % RECORD_ALIGN !== 0 || d.capacity > MAX_REGION) {
          throw declarationError(`${name}: a log's capacity must be a multiple of 8 from 16 to 2^32 bytes, got ${String(d.capacity)}`);
        }
        if (d.keepBytes !== undefined || d.keepRecords !== undefined) {
          const k = d.keepBytes;
          if (k === undefined || !Number.isSafeInteger(k) || k < 16 || k % RECORD_ALIGN !== 0 || k > d.capacity - 24) {
            throw declarationError(`${name}: keepBytes must be a multiple of 8 from 16 to the capacity less 24 (room for appends between commits), got ${String(k)}`);
          }
          const r = d.keepRecords;
          if (r !== undefined && (!Number.isSafeInteger(r) || r < 1 || r >= 2 ** 32)) {
            throw declarationError(`${name}: keepRecords must be an integer from 1 to 2^32 - 1, got ${String(r)}`);
          }
        }
        bytes = d.capacity;
        break;
      case 'map':
        if (!Number.isSafeInteger(d.maxBytes) || d.maxBytes < 16 * PAGE || d.maxBytes % PAGE !== 0 || d.maxBytes > MAX_REGION) {
          throw declarationError(`${name}: a map's maxBytes must be a multiple of ${PAGE} from ${16 * PAGE} to 2^32, got ${String(d.maxBytes)}`);
        }
        bytes = d.maxBytes;
        break;
      case 'cell':
      case 'counters': {
        if (d.kind === 'cell' && (typeof d.type !== 'function' || !ELEMENT_TYPES.includes(d.type))) {
          throw declarationError(`${name}: a cell's type must be a typed array constructor such as Float64Array`);
        }
        const size = d.kind === 'cell' ? d.type.BYTES_PER_ELEMENT : 8;
        const length = d.kind === 'cell' ? d.length : d.count;
        if (!Number.isSafeInteger(length) || length < 1 || length * size > MAX_REGION / 64) {
          throw declarationError(`${name}: the ${d.kind === 'cell' ? 'length' : 'count'} must be a positive integer (at most 64 MiB of value), got ${String(length)}`);
        }
        checkCopies(name, d.copies);
        valueBytes = length * size;
        stride = roundUp(valueBytes, COPY_ALIGN);
        bytes = stride * d.copies;
        break;
      }
      default:
        throw declarationError(`${name}: not a structure declaration (use appendLog, versionedCell, counterSet or keyValueMap)`);
    }
    const length = roundUp(bytes, PAGE);
    structures.push({ name, declaration: d, index, offset, length, stride, valueBytes });
    offset += length;
  }
  const directory = encodeDirectory(structures, offset, encoder);
  return {
    structures,
    base,
    tailBytes: offset,
    directory,
    hash: fnv1a64(directory),
    payloadBytes: PAYLOAD_HEADER + PAYLOAD_PER_STRUCTURE * structures.length + (base === 0 ? 0 : PAYLOAD_BASE_BYTES),
  };
}

function encodeDirectory(structures: readonly PlacedStructure[], end: number, encoder: TextEncoder): Uint8Array {
  const out = new Uint8Array(DIRECTORY_HEADER + DIRECTORY_ENTRY * structures.length);
  const view = new DataView(out.buffer);
  view.setBigUint64(0, DIRECTORY_MAGIC, true);
  view.setUint32(8, STATE_FORMAT_VERSION, true);
  view.setUint32(12, structures.length, true);
  view.setBigUint64(16, BigInt(end), true);
  for (const s of structures) {
    const at = DIRECTORY_HEADER + DIRECTORY_ENTRY * s.index;
    const d = s.declaration;
    view.setUint32(at, KIND_CODE[d.kind], true);
    view.setBigUint64(at + 8, BigInt(s.offset), true);
    view.setBigUint64(at + 16, BigInt(s.length), true);
    if (d.kind === 'log' || d.kind === 'map') {
      view.setBigUint64(at + 32, BigInt(d.kind === 'log' ? d.capacity : d.maxBytes), true);
      // Zero for a log that keeps everything: such files read exactly as before retention.
      if (d.kind === 'log' && d.keepBytes !== undefined) {
        view.setUint32(at + 24, d.keepBytes, true);
        view.setUint32(at + 28, d.keepRecords ?? 0, true);
      }
    } else {
      const type = d.kind === 'cell' ? d.type : BigUint64Array;
      view.setUint32(at + 4, d.copies, true);
      view.setUint32(at + 24, ELEMENT_TYPES.indexOf(type) + 1, true);
      view.setUint32(at + 28, type.BYTES_PER_ELEMENT, true);
      view.setBigUint64(at + 32, BigInt(d.kind === 'cell' ? d.length : d.count), true);
    }
    out.set(encoder.encode(s.name), at + 40);
  }
  return out;
}

/** FNV-1a, 64 bits. */
export function fnv1a64(bytes: Uint8Array): bigint {
  let hash = 0xcbf29ce484222325n;
  for (const b of bytes) hash = ((hash ^ BigInt(b)) * 0x100000001b3n) & 0xffffffffffffffffn;
  return hash;
}

/**
 * Describes how the directory found at the start of a tail differs from `layout`'s, or
 * returns `undefined` when they are the same.
 */
export function directoryDifference(found: Uint8Array, layout: StateLayout): string | undefined {
  const view = new DataView(found.buffer, found.byteOffset, found.length);
  if (found.length < DIRECTORY_HEADER || view.getBigUint64(0, true) !== DIRECTORY_MAGIC) return 'the tail has no state directory';
  const version = view.getUint32(8, true);
  if (version !== STATE_FORMAT_VERSION) return `the state directory has format version ${version}, this code reads ${STATE_FORMAT_VERSION}`;
  const count = view.getUint32(12, true);
  const expected = layout.directory;
  const decoder = new TextDecoder();
  const names: string[] = [];
  for (let i = 0; i < Math.min(count, MAX_STRUCTURES); i++) {
    const at = DIRECTORY_HEADER + DIRECTORY_ENTRY * i + 40;
    const raw = found.subarray(at, at + MAX_NAME_BYTES);
    const end = raw.indexOf(0);
    names.push(decoder.decode(end < 0 ? raw : raw.subarray(0, end)));
  }
  const describe = `[${names.join(', ')}]`;
  if (count !== layout.structures.length) return `the file declares ${count} structures ${describe}, the program ${layout.structures.length}`;
  for (const s of layout.structures) {
    const at = DIRECTORY_HEADER + DIRECTORY_ENTRY * s.index;
    for (let k = 0; k < DIRECTORY_ENTRY; k++) {
      if (found[at + k] !== expected[at + k]) {
        return names[s.index] === s.name
          ? `structure ${s.name} is declared differently in the file (kind, size, type, copies or retention)`
          : `structure ${s.index + 1} is ${JSON.stringify(names[s.index])} in the file, ${JSON.stringify(s.name)} in the program`;
      }
    }
  }
  for (let k = 0; k < DIRECTORY_HEADER; k++) {
    if (found[k] !== expected[k]) return 'the state directory header differs';
  }
  return undefined;
}

/** A decoded payload: the sequence number and the two words of every structure. */
export interface DecodedPayload {
  readonly sequence: number;
  /** `words[2*i]`, `words[2*i+1]`: structure i's words. */
  readonly words: Float64Array;
}

/**
 * Decodes a payload written for `layout`, or explains why it cannot be one.
 * @returns the payload, or a string describing the problem
 */
export function decodePayload(bytes: Uint8Array, layout: StateLayout): DecodedPayload | string {
  if (bytes.length !== layout.payloadBytes) return `its payload has ${bytes.length} bytes, a state payload for this layout ${layout.payloadBytes}`;
  if (payloadBase(bytes) !== layout.base) return 'its payload names the directory of another layout';
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.length);
  if (view.getUint32(0, true) !== PAYLOAD_MAGIC) return 'its payload does not start with the state magic';
  if (view.getUint32(4, true) !== layout.structures.length) return 'its payload names another number of structures';
  if (view.getBigUint64(8, true) !== layout.hash) return 'its payload was written for another state directory';
  const n = layout.structures.length;
  const words = new Float64Array(2 * n + 1);
  for (let i = 0; i <= 2 * n; i++) {
    const at = 16 + 8 * i;
    const high = view.getUint32(at + 4, true);
    if (high >= 0x20_0000) return 'its payload holds a number above 2^53';
    words[i] = high * 0x1_0000_0000 + view.getUint32(at, true);
  }
  return { sequence: words[0]!, words: words.subarray(1) };
}

/**
 * The tail offset of the directory a state payload was written for: 0, or the u64 a
 * payload 8 bytes longer than its structures need ends with (a layout a migration placed).
 * @returns the offset, or a string describing why `bytes` is not a state payload
 */
export function payloadBase(bytes: Uint8Array): number | string {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.length);
  if (bytes.length < PAYLOAD_HEADER || view.getUint32(0, true) !== PAYLOAD_MAGIC) return 'its payload does not start with the state magic';
  const plain = PAYLOAD_HEADER + PAYLOAD_PER_STRUCTURE * view.getUint32(4, true);
  if (bytes.length === plain) return 0;
  if (bytes.length !== plain + PAYLOAD_BASE_BYTES) return `its payload has ${bytes.length} bytes, not a state payload for ${view.getUint32(4, true)} structures`;
  const base = Number(view.getBigUint64(plain, true));
  if (base === 0 || base % PAGE !== 0 || !Number.isSafeInteger(base)) return `its payload names a directory at tail offset ${base}, not a page boundary past 0`;
  return base;
}

/**
 * The declarations a directory found at tail offset `base` records, as the declaration
 * functions would give them: a migration reads the old state with them, without the old
 * program's code. Checked by planning them again: the result must be the same directory.
 * @returns the declarations, or a string describing why `found` is not such a directory
 */
export function declarationsOf(found: Uint8Array, base: number): Declarations | string {
  const view = new DataView(found.buffer, found.byteOffset, found.length);
  if (found.length < DIRECTORY_HEADER || view.getBigUint64(0, true) !== DIRECTORY_MAGIC) return 'the tail has no state directory';
  if (view.getUint32(8, true) !== STATE_FORMAT_VERSION) return `the state directory has format version ${view.getUint32(8, true)}, this code reads ${STATE_FORMAT_VERSION}`;
  const count = view.getUint32(12, true);
  if (count < 1 || count > MAX_STRUCTURES) return `the state directory counts ${count} structures`;
  const decoder = new TextDecoder();
  const declarations: Record<string, Declaration> = {};
  for (let i = 0; i < count; i++) {
    const at = DIRECTORY_HEADER + DIRECTORY_ENTRY * i;
    const raw = found.subarray(at + 40, at + 40 + MAX_NAME_BYTES);
    const end = raw.indexOf(0);
    const name = decoder.decode(end < 0 ? raw : raw.subarray(0, end));
    const kind = view.getUint32(at, true);
    const copies = view.getUint32(at + 4, true);
    const size = Number(view.getBigUint64(at + 32, true));
    const type = ELEMENT_TYPES[view.getUint32(at + 24, true) - 1];
    if (kind === KIND_CODE.log) {
      const keepBytes = view.getUint32(at + 24, true);
      const keepRecords = view.getUint32(at + 28, true);
      declarations[name] = keepBytes === 0 ? appendLog(size) : appendLog(size, { keepBytes, ...(keepRecords === 0 ? {} : { keepRecords }) });
    }
    else if (kind === KIND_CODE.map) declarations[name] = { kind: 'map', maxBytes: size };
    else if (kind === KIND_CODE.counters) declarations[name] = counterSet(size, { copies });
    else if (kind === KIND_CODE.cell && type !== undefined) declarations[name] = versionedCell(type, size, { copies });
    else return `structure ${JSON.stringify(name)} of the state directory has an unknown kind ${kind}`;
  }
  let planned: StateLayout;
  try {
    planned = planLayout(declarations, base);
  } catch (err) {
    if (err instanceof ShmfdError) return `the state directory declares ${err.message}`;
    throw err;
  }
  const bytes = planned.directory;
  for (let k = 0; k < bytes.length; k++) {
    if (found[k] !== bytes[k]) return 'the state directory records something this code does not declare';
  }
  return declarations;
}
