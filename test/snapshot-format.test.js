// The snapshot file format as pure functions over bytes (src/snapshot/format.ts): region
// arithmetic, head parsing with typed errors on garbage, slot reading, and the exact byte
// layout a writer produces (hand-computed from docs/snapshot-format.md), and that page's
// tables against the constants, so the description cannot drift from the code.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { PAGE, SnapshotFile, SnapshotFormatError, parseHead, readSlots, snapshotRanges } from 'shmfd/snapshot';
import {
  HEAD,
  MAGIC,
  MAX_DATA,
  MAX_ENTRIES,
  MIN_FILE_LENGTH,
  SLOT,
  SLOTS_PER_PAGE,
  SLOT_SIZE,
  dataPages,
  readNewestSlot,
  readStreamEnd,
  dataStart,
  ringPosition,
  sequencePages,
  slotPosition,
  tailLength,
  tailStart,
} from '../dist/snapshot/format.js';
import { SlotTable } from '../dist/snapshot/pread.js';
import { ROOT, seededRandom } from './helpers.js';

/** A deterministic PRNG, so a failing random case can be replayed. */
const prng = (seed) => seededRandom(seed).next;

/** A file image whose head holds the given u64 fields (little-endian). */
function headFile(length, { version = MAGIC, entryMask = 0xffn, dataMask = 0x7ffn, writeOffset = 0n } = {}) {
  const bytes = new Uint8Array(length);
  if (length >= 32) {
    const view = new DataView(bytes.buffer);
    view.setBigUint64(HEAD.version, version, true);
    view.setBigUint64(HEAD.entryMask, entryMask, true);
    view.setBigUint64(HEAD.dataMask, dataMask, true);
    view.setBigUint64(HEAD.writeOffset, writeOffset, true);
  }
  return bytes;
}

function setSlot(bytes, index, offset, length) {
  const view = new DataView(bytes.buffer, bytes.byteOffset);
  view.setBigUint64(slotPosition(index), BigInt(offset), true);
  view.setBigUint64(slotPosition(index) + 8, BigInt(length), true);
}

function u64At(bytes, position) {
  return new DataView(bytes.buffer, bytes.byteOffset).getBigUint64(position, true);
}

function throwsCode(fn, code, what) {
  assert.throws(fn, (err) => {
    assert.ok(err instanceof SnapshotFormatError, `${what}: expected a SnapshotFormatError, got ${err}`);
    assert.equal(err.code, code, `${what}: ${err.message}`);
    return true;
  });
}

test('constants: page size, magic and head field offsets are those of docs/snapshot-format.md', () => {
  assert.equal(PAGE, 4096);
  assert.equal(MAGIC, 0x96c2a6f4b68519b3n);
  assert.deepEqual({ ...HEAD }, { version: 0, entryMask: 8, dataMask: 16, writeOffset: 24 });
  assert.equal(SLOT_SIZE, 16);
  assert.equal(SLOTS_PER_PAGE, 256);
  assert.equal(MIN_FILE_LENGTH, 3 * 4096);
});

const FORMAT_DOC = fs.readFileSync(path.join(ROOT, 'docs', 'snapshot-format.md'), 'utf8');

/** The body rows of the first table under the heading `## title`, as arrays of cell texts. */
function docTable(title) {
  const section = FORMAT_DOC.split(/^## /m).find((part) => part.startsWith(`${title}\n`));
  assert.ok(section !== undefined, `docs/snapshot-format.md has a section "${title}"`);
  const rows = section.split('\n').filter((line) => line.startsWith('|'));
  assert.ok(rows.length > 2, `the section "${title}" has a table`);
  return rows.slice(2).map((row) => row.slice(1, -1).split('|').map((cell) => cell.trim().replace(/^`|`$/g, '')));
}

const snakeCase = (name) => name.replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`);

test('docs/snapshot-format.md: its offset tables are those of HEAD and SLOT, field for field', () => {
  for (const [title, fields] of [['Head page', HEAD], ['Slots', SLOT]]) {
    const rows = docTable(title);
    const documented = rows.map(([offset, field, inCode]) => {
      const [object, key] = inCode.split('.');
      assert.equal(object, title === 'Head page' ? 'HEAD' : 'SLOT', `${title}: ${inCode}`);
      assert.equal(field, snakeCase(key), `${title}: the field ${field} is ${inCode}`);
      assert.equal(Number(offset), fields[key], `${title}: the offset of ${field}`);
      return key;
    });
    assert.deepEqual(documented.sort(), Object.keys(fields).sort(), `${title}: every field is documented`);
  }
  assert.match(FORMAT_DOC, /Slot `i` \(`0 <= i < entries`\) is 16 bytes at offset `PAGE \+ 16\*i`/);
  assert.equal(slotPosition(3), PAGE + SLOT_SIZE * 3);
});

test('docs/snapshot-format.md: its constants table gives the values of the code', () => {
  const code = { PAGE, SLOT_SIZE, SLOTS_PER_PAGE, MIN_FILE_LENGTH, MAX_ENTRIES, MAX_DATA, MAGIC };
  const rows = docTable('Conventions');
  for (const [name, value] of rows) {
    assert.ok(name in code, `the table names ${name}, which the test compares`);
    if (typeof code[name] === 'bigint') assert.equal(BigInt(value), code[name], name);
    else assert.equal(Number(value), code[name], name);
  }
  assert.deepEqual(rows.map(([name]) => name).sort(), Object.keys(code).sort(), 'every constant is in the table');
});

test('region arithmetic: P_seq = ceil(entries/256), P_data = ceil(data/PAGE) >= 1, tail = whole pages after the ring', () => {
  assert.deepEqual([1, 2, 256, 257, 512, 4096].map(sequencePages), [1, 1, 1, 2, 2, 16]);
  assert.deepEqual([2, 2048, 4096, 4097, 8192, 1 << 20].map(dataPages), [1, 1, 1, 2, 2, 256]);
  assert.equal(dataStart(256), 2 * 4096);
  assert.equal(dataStart(257), 3 * 4096);
  assert.equal(tailStart(256, 2048), 3 * 4096);
  assert.equal(tailStart(4096, 1 << 20), 4096 * (1 + 16 + 256));
  assert.equal(tailLength(256, 2048, 5 * 4096), 2 * 4096);
  assert.equal(tailLength(256, 2048, 5 * 4096 + 4095), 2 * 4096, 'a partial last page belongs to nobody');
  assert.equal(tailLength(256, 2048, 3 * 4096), 0);
  assert.equal(tailLength(256, 2048, 2 * 4096), 0, 'never negative');
  assert.equal(slotPosition(0), 4096);
  assert.equal(slotPosition(255), 4096 + 255 * 16);
  assert.equal(slotPosition(256), 2 * 4096, 'slot 256 starts the second sequence page');
});

test('ring positions: stream position s lives at data_start + (s mod data), and snapshots wrap in two ranges', () => {
  // The ring arithmetic reads these three fields only.
  const layout = /** @type {import('../dist/snapshot/index.js').SnapshotLayout} */ ({ entries: 256, data: 2048, dataStart: 8192 });
  assert.equal(ringPosition(layout, 0), 8192);
  assert.equal(ringPosition(layout, 2047), 8192 + 2047);
  assert.equal(ringPosition(layout, 2048), 8192);
  assert.equal(ringPosition(layout, 2048 * 1000 + 5), 8192 + 5);
  assert.deepEqual(snapshotRanges(layout, { offset: 10, length: 5 }), [{ position: 8202, length: 5 }]);
  assert.deepEqual(snapshotRanges(layout, { offset: 2046, length: 4 }), [
    { position: 8192 + 2046, length: 2 },
    { position: 8192, length: 2 },
  ]);
  assert.deepEqual(snapshotRanges(layout, { offset: 4096 - 3, length: 3 }), [{ position: 8192 + 2045, length: 3 }], 'ends exactly at the ring end');
  throwsCode(() => snapshotRanges(layout, { offset: 0, length: 2048 }), 'ERR_SNAPSHOT_BAD_SNAPSHOT', 'a snapshot is at most data - 1 bytes');
});

test('byte layout: a configured file has the head fields, slots and ring bytes exactly where docs/snapshot-format.md puts them', () => {
  const bytes = new Uint8Array(5 * PAGE);
  bytes.fill(0xee, 3 * PAGE); // the tail must stay untouched
  const writer = new SnapshotFile(bytes).configure({ entries: 256, data: 2048 });
  assert.deepEqual([...bytes.subarray(0, 8)], [0xb3, 0x19, 0x85, 0xb6, 0xf4, 0xa6, 0xc2, 0x96], 'magic, little-endian');
  assert.equal(u64At(bytes, 8), 0xffn, 'entry_mask = entries - 1');
  assert.equal(u64At(bytes, 16), 0x7ffn, 'data_mask = data - 1');
  assert.equal(u64At(bytes, 24), 0n, 'write_offset');
  assert.ok(bytes.subarray(32, PAGE).every((b) => b === 0), 'the reserved part of the head stays zero');

  assert.equal(writer.commit(new TextEncoder().encode('hello')), 0);
  assert.equal(writer.commit(new TextEncoder().encode('abc')), 1);
  assert.equal(u64At(bytes, 4096), 0n, 'slot 0 offset');
  assert.equal(u64At(bytes, 4096 + 8), 5n, 'slot 0 length');
  assert.equal(u64At(bytes, 4112), 5n, 'slot 1 offset');
  assert.equal(u64At(bytes, 4112 + 8), 3n, 'slot 1 length');
  assert.equal(u64At(bytes, 24), 8n, 'write_offset after both');
  assert.equal(new TextDecoder().decode(bytes.subarray(8192, 8200)), 'helloabc', 'the ring starts at PAGE * (1 + P_seq)');
  assert.ok(bytes.subarray(3 * PAGE).every((b) => b === 0xee), 'the tail is not written by commits');
  assert.equal(writer.tail.length, 2 * PAGE);
  assert.equal(writer.tail.byteOffset, bytes.byteOffset + 3 * PAGE);
});

test('byte layout: a write that crosses the ring end continues at data_start', () => {
  const bytes = new Uint8Array(4 * PAGE);
  const writer = new SnapshotFile(bytes).configure({ entries: 16, data: 2048, initialOffset: 2046 });
  assert.equal(u64At(bytes, 24), 2046n, 'write_offset = initial offset');
  assert.equal(writer.commit(new TextEncoder().encode('WXYZ')), 0);
  assert.equal(String.fromCharCode(bytes[8192 + 2046], bytes[8192 + 2047]), 'WX');
  assert.equal(String.fromCharCode(bytes[8192], bytes[8193]), 'YZ');
  assert.equal(u64At(bytes, 4096), 2046n);
  assert.equal(u64At(bytes, 4096 + 8), 4n);
  assert.equal(u64At(bytes, 24), 2050n);
  assert.equal(new TextDecoder().decode(writer.read({ offset: 2046, length: 4 })), 'WXYZ');
});

test('byte layout: 4096 entries take 16 sequence pages, the ring follows them', () => {
  const layout = parseHead(headFile(4096 * 20, { entryMask: 4095n, dataMask: 4095n }), 4096 * 20);
  assert.equal(layout.sequencePages, 16);
  assert.equal(layout.dataStart, 17 * 4096);
  assert.equal(layout.tailStart, 18 * 4096);
  assert.equal(layout.tailLength, 2 * 4096);
});

test('parseHead: an unconfigured file (version is not the magic) is undefined, not an error', () => {
  assert.equal(parseHead(new Uint8Array(PAGE), PAGE), undefined, 'one zero page');
  assert.equal(parseHead(new Uint8Array(10 * PAGE), 10 * PAGE), undefined, 'an all-zero memfd');
  assert.equal(parseHead(headFile(10 * PAGE, { version: MAGIC ^ 1n }), 10 * PAGE), undefined, 'foreign version');
});

test('parseHead: files too small give ERR_SNAPSHOT_TOO_SMALL', () => {
  throwsCode(() => parseHead(new Uint8Array(0), 0), 'ERR_SNAPSHOT_TOO_SMALL', '0 bytes');
  throwsCode(() => parseHead(new Uint8Array(4095), 4095), 'ERR_SNAPSHOT_TOO_SMALL', 'less than a page');
  throwsCode(() => parseHead(headFile(PAGE), PAGE), 'ERR_SNAPSHOT_TOO_SMALL', '1 page with the magic');
  throwsCode(() => parseHead(headFile(2 * PAGE), 2 * PAGE), 'ERR_SNAPSHOT_TOO_SMALL', '2 pages with the magic');
});

test('parseHead: masks not of the form 2^k - 1, or absurd, give ERR_SNAPSHOT_BAD_MASK', () => {
  const len = 64 * PAGE;
  for (const entryMask of [0xfen, 0x100n, 0x5n, 0x8000000000000000n]) {
    throwsCode(() => parseHead(headFile(len, { entryMask }), len), 'ERR_SNAPSHOT_BAD_MASK', `entry_mask ${entryMask}`);
  }
  for (const dataMask of [0x7fen, 0x800n, 0xfffffffffffffffen]) {
    throwsCode(() => parseHead(headFile(len, { dataMask }), len), 'ERR_SNAPSHOT_BAD_MASK', `data_mask ${dataMask}`);
  }
  throwsCode(() => parseHead(headFile(len, { dataMask: 0xffffffffffffffffn }), len), 'ERR_SNAPSHOT_BAD_MASK', 'a 2^64-byte ring');
  throwsCode(() => parseHead(headFile(len, { dataMask: 0n }), len), 'ERR_SNAPSHOT_BAD_MASK', 'a 1-byte ring, which holds no snapshot');
  throwsCode(() => parseHead(headFile(len, { dataMask: BigInt(MAX_DATA) * 2n - 1n }), len), 'ERR_SNAPSHOT_BAD_MASK', 'a ring above MAX_DATA');
});

test('parseHead: masks that need more than the file give ERR_SNAPSHOT_BEYOND_END', () => {
  const len = 10 * PAGE;
  throwsCode(() => parseHead(headFile(len, { entryMask: 0xfffn }), len), 'ERR_SNAPSHOT_BEYOND_END', '16 sequence pages in 10');
  throwsCode(() => parseHead(headFile(len, { dataMask: (1n << 20n) - 1n }), len), 'ERR_SNAPSHOT_BEYOND_END', 'a 1 MiB ring in 40 KiB');
  throwsCode(() => parseHead(headFile(len, { entryMask: 0xffffffffffffffffn }), len), 'ERR_SNAPSHOT_BEYOND_END', '2^64 entries');
  throwsCode(() => parseHead(headFile(len, { dataMask: 0xffffn }), len), 'ERR_SNAPSHOT_BEYOND_END', 'head + sequence page + 16 ring pages in 10 pages');
  // The boundary: regions that end exactly at the last whole page fit.
  const exact = 1 * PAGE + PAGE + 8 * PAGE;
  assert.equal(parseHead(headFile(exact, { dataMask: 0x7fffn }), exact).tailLength, 0);
  assert.equal(parseHead(headFile(exact + 4095, { dataMask: 0x7fffn }), exact + 4095).tailLength, 0, 'a partial page is no tail');
  throwsCode(() => parseHead(headFile(exact - 1, { dataMask: 0x7fffn }), exact - 1), 'ERR_SNAPSHOT_BEYOND_END', 'one byte short');
});

test('parseHead: more slots than MAX_ENTRIES give ERR_SNAPSHOT_BAD_MASK from the head page alone, even in a file big enough for them', () => {
  assert.equal(MAX_ENTRIES, 2 ** 20);
  const huge = 2 ** 48; // a sparse file of 256 TiB holds even 2^40 slots
  for (let k = 21; k <= 40; k++) {
    const entryMask = (1n << BigInt(k)) - 1n;
    assert.throws(
      () => parseHead(headFile(PAGE, { entryMask }), huge),
      (err) => err instanceof SnapshotFormatError && err.code === 'ERR_SNAPSHOT_BAD_MASK' && err.message === `entry_mask 0x${entryMask.toString(16)} describes ${2 ** k} slots, above the 1048576 this implementation reads`,
      `2^${k} slots`,
    );
  }
  const head = parseHead(headFile(PAGE, { entryMask: BigInt(MAX_ENTRIES - 1) }), huge);
  assert.equal(head.entries, MAX_ENTRIES);
  assert.equal(head.dataStart, PAGE * (1 + 4096), 'a 16 MiB sequence region');
  assert.deepEqual(readSlots(new Uint8Array(slotPosition(MAX_ENTRIES)), head), []);
});

test('parseHead: a write_offset beyond 2^53 gives ERR_SNAPSHOT_BAD_OFFSET', () => {
  const len = 4 * PAGE;
  for (const writeOffset of [1n << 53n, 1n << 60n, 0xffffffffffffffffn]) {
    throwsCode(() => parseHead(headFile(len, { writeOffset }), len), 'ERR_SNAPSHOT_BAD_OFFSET', `write_offset ${writeOffset}`);
  }
  assert.equal(parseHead(headFile(len, { writeOffset: 1n << 52n }), len).writeOffset, 2 ** 52);
});

test('parseHead/readSlots work on the head and sequence pages alone (as read with pread), with the real file length', () => {
  const full = new Uint8Array(300 * PAGE);
  const writer = new SnapshotFile(full).configure({ entries: 512, data: 1 << 20 });
  for (let i = 0; i < 300; i++) writer.commit(new Uint8Array([i, i >> 8]));
  const partial = full.slice(0, 3 * PAGE); // head + 2 sequence pages
  const head = parseHead(partial, full.length);
  assert.equal(head.entries, 512);
  assert.equal(head.tailStart, (3 + 256) * PAGE);
  assert.equal(head.writeOffset, 600);
  const slots = readSlots(partial, head);
  assert.equal(slots.length, 300);
  assert.deepEqual(slots, writer.valid());
  throwsCode(() => parseHead(full.subarray(0, 100), full.length), 'ERR_SNAPSHOT_SHORT_BUFFER', 'less than the head page');
  throwsCode(() => readSlots(full.subarray(0, 2 * PAGE), head), 'ERR_SNAPSHOT_SHORT_BUFFER', 'half the sequence region');
});

test('readSlots: valid slots oldest first; slots whose bytes cannot be intact are not reported', () => {
  const len = 4 * PAGE;
  const bytes = headFile(len, { entryMask: 0xffn, dataMask: 0x7ffn, writeOffset: 10_000n });
  setSlot(bytes, 7, 9_000, 8); // intact: within the last 2048 bytes
  setSlot(bytes, 3, 9_500, 100); // intact, newer, lower index
  setSlot(bytes, 5, 5_000, 8); // older than write_offset - data: overwritten since
  setSlot(bytes, 9, 9_990, 2048); // longer than data - 1
  setSlot(bytes, 11, 2 ** 60, 8); // beyond 2^53
  setSlot(bytes, 12, 9_800, 0); // empty
  const head = parseHead(bytes, len);
  assert.deepEqual(readSlots(bytes, head), [
    { index: 7, offset: 9_000, length: 8 },
    { index: 3, offset: 9_500, length: 100 },
  ]);
});

test('readSlots: a head write_offset behind the slots (the Rust crate never stores it) still reports them', () => {
  const len = 4 * PAGE;
  const bytes = headFile(len, { writeOffset: 0n });
  setSlot(bytes, 0, 4_000, 8);
  setSlot(bytes, 1, 100, 8); // older than the newest end minus data: overwritten
  const head = parseHead(bytes, len);
  assert.deepEqual(readSlots(bytes, head), [{ index: 0, offset: 4_000, length: 8 }]);
});

/**
 * The rules of docs/snapshot-format.md "Discovery", spelled out on u64 fields as BigInts:
 * the valid slots sorted by stream position (ties by slot index), and the end of the
 * stream they imply. readSlots and its faster paths must agree with this on any table.
 */
function discoveryRules(bytes, head) {
  const view = new DataView(bytes.buffer, bytes.byteOffset);
  const data = BigInt(head.data);
  const claims = [];
  for (let index = 0; index < head.entries; index++) {
    const offset = view.getBigUint64(slotPosition(index) + SLOT.offset, true);
    const length = view.getBigUint64(slotPosition(index) + SLOT.length, true);
    if (length === 0n || length > data - 1n || offset + length > BigInt(Number.MAX_SAFE_INTEGER) - data) continue;
    claims.push({ index, offset, length });
  }
  let end = BigInt(head.writeOffset);
  for (const c of claims) if (c.offset + c.length > end) end = c.offset + c.length;
  const valid = claims
    .filter((c) => c.offset >= end - data)
    .map((c) => ({ index: c.index, offset: Number(c.offset), length: Number(c.length) }))
    .sort((a, b) => a.offset - b.offset || a.index - b.index);
  return { valid, end: Number(end) };
}

/**
 * A random slot table: runs written in ring order from any slot (as a writer leaves
 * them, with holes), mixed per case with slots out of order, equal or overlapping
 * offsets, slots older than the ring, and foreign u64 values whose high halves are set.
 */
function randomSlotTable(random, { entries, data, byteOffset = 0 }) {
  const int = (lo, hi) => lo + Math.floor(random() * (hi - lo + 1));
  const fileLength = tailStart(entries, data) + PAGE;
  const bytes = new Uint8Array(new ArrayBuffer(fileLength + byteOffset), byteOffset, fileLength);
  const view = new DataView(bytes.buffer, byteOffset);
  const setU64 = (index, field, value) => view.setBigUint64(slotPosition(index) + field, BigInt.asUintN(64, BigInt(value)), true);
  const lastEnd = Number.MAX_SAFE_INTEGER - data;
  const bases = [int(0, 4 * data), int(0, 2 ** 40), lastEnd - int(0, 3 * data)];
  let stream = bases[int(0, 2)];
  const maxLength = Math.max(1, Math.min(data - 1, int(1, 3) === 1 ? data : 64));
  const mess = random() < 0.6 ? random() * 0.3 : 0;
  for (let k = 0, index = int(0, entries - 1); k < entries; k++, index = (index + 1) % entries) {
    const length = int(1, maxLength);
    if (random() < mess) {
      const r = random();
      if (r < 0.2) setU64(index, SLOT.offset, stream - int(0, 3 * data)); // out of order, maybe older than the ring
      else if (r < 0.35) setU64(index, SLOT.offset, stream + int(0, 2 * data)); // ahead, overlapping
      else if (r < 0.5) setU64(index, SLOT.offset, (BigInt(int(1, 2 ** 32 - 1)) << 32n) | BigInt(int(0, 2 ** 32 - 1))); // foreign high half
      else if (r < 0.6) setU64(index, SLOT.offset, lastEnd - length + int(-2, 2)); // around the last end a head can store
      else setU64(index, SLOT.offset, stream - int(0, 2) * length); // equal to a neighbour's
      const q = random();
      if (q < 0.15) setU64(index, SLOT.length, (BigInt(int(1, 2 ** 32 - 1)) << 32n) | BigInt(length)); // high half set
      else if (q < 0.3) setU64(index, SLOT.length, data - int(-1, 1)); // around data - 1
      else setU64(index, SLOT.length, length);
      continue;
    }
    if (random() < 0.2) continue; // a hole (empty slot) or a slot never written
    if (stream + length > lastEnd) break;
    setU64(index, SLOT.offset, stream);
    setU64(index, SLOT.length, length);
    stream += length;
  }
  const writeOffset = random() < 0.3 ? 0 : Math.max(0, Math.min(lastEnd, stream + int(-data, data)));
  view.setBigUint64(HEAD.version, MAGIC, true);
  view.setBigUint64(HEAD.entryMask, BigInt(entries - 1), true);
  view.setBigUint64(HEAD.dataMask, BigInt(data - 1), true);
  view.setBigUint64(HEAD.writeOffset, BigInt(writeOffset), true);
  return bytes;
}

test('readSlots, newest and the stream end agree with the rules of Discovery on random and adversarial slot tables', () => {
  const random = prng(0x510757);
  const int = (lo, hi) => lo + Math.floor(random() * (hi - lo + 1));
  const seen = { sorted: 0, rotated: 0, outOfOrder: 0, dropped: 0, empty: 0 };
  let previous = { listed: [], valid: [] };
  for (let i = 0; i < 3000; i++) {
    const entries = i === 0 ? 2 ** 17 : 2 ** int(0, 10); // one table above what the scan keeps between calls
    const data = 2 ** int(1, 16);
    // An unaligned view is what a Buffer from a pool can be: the slots are read from a copy.
    const bytes = randomSlotTable(random, { entries, data, byteOffset: random() < 0.1 ? int(1, 7) : 0 });
    const head = parseHead(bytes, bytes.length);
    const { valid, end } = discoveryRules(bytes, head);
    const listed = readSlots(bytes, head);
    assert.deepEqual(listed, valid, `case ${i}: readSlots`);
    assert.equal(readStreamEnd(bytes, head), end, `case ${i}: stream end`);
    assert.deepEqual(readNewestSlot(bytes, head), valid.at(-1), `case ${i}: newest`);
    const table = new SlotTable(bytes, head);
    assert.deepEqual([...table.valid.keys()].filter((k) => table.valid[k] === 1), valid.map((s) => s.index).sort((a, b) => a - b), `case ${i}: SlotTable`);
    assert.equal(table.end, end, `case ${i}: SlotTable end`);
    assert.deepEqual(table.newestOf(table.valid), valid.at(-1), `case ${i}: SlotTable newest`);
    if (bytes.byteOffset % 8 === 0) {
      const found = new SnapshotFile(bytes).recover();
      assert.deepEqual(found.valid(), valid, `case ${i}: FileDiscovery.valid`);
      assert.deepEqual(found.newest(), valid.at(-1), `case ${i}: FileDiscovery.newest`);
    }
    // A list handed out earlier is the caller's: later reads never change it.
    assert.deepEqual(previous.listed, previous.valid, `case ${i}: the list of case ${i - 1}`);
    previous = { listed, valid };
    const byIndex = [...valid].sort((a, b) => a.index - b.index);
    const breaks = byIndex.filter((s, k) => k > 0 && s.offset < byIndex[k - 1].offset).length;
    if (valid.length === 0) seen.empty++;
    else if (breaks === 0) seen.sorted++;
    else if (breaks === 1 && byIndex.at(-1).offset < byIndex[0].offset) seen.rotated++;
    else seen.outOfOrder++;
    if (discoveryRulesClaims(bytes, head) > valid.length) seen.dropped++;
  }
  // Every path of the scan must be taken often, or agreeing proves little.
  for (const [what, n] of Object.entries(seen)) assert.ok(n > 100, `${what}: only ${n} cases (${JSON.stringify(seen)})`);
});

/** How many slots claim a snapshot (a non-zero length), valid or not. */
function discoveryRulesClaims(bytes, head) {
  const view = new DataView(bytes.buffer, bytes.byteOffset);
  let n = 0;
  for (let index = 0; index < head.entries; index++) if (view.getBigUint64(slotPosition(index) + SLOT.length, true) !== 0n) n++;
  return n;
}

test('readSlots: slots at equal offsets are listed by slot index, rotated or not', () => {
  const len = 4 * PAGE;
  const bytes = headFile(len, { entryMask: 0xffn, dataMask: 0x7ffn, writeOffset: 1_000n });
  setSlot(bytes, 4, 900, 8);
  setSlot(bytes, 5, 950, 8);
  setSlot(bytes, 6, 950, 8);
  setSlot(bytes, 1, 980, 8); // wraps: a rotation from slot 4
  const head = parseHead(bytes, len);
  const expected = [
    { index: 4, offset: 900, length: 8 },
    { index: 5, offset: 950, length: 8 },
    { index: 6, offset: 950, length: 8 },
    { index: 1, offset: 980, length: 8 },
  ];
  assert.deepEqual(readSlots(bytes, head), expected);
  setSlot(bytes, 2, 900, 8); // equal to slot 4's offset, but a lower index: not a rotation any more
  assert.deepEqual(readSlots(bytes, head), [{ index: 2, offset: 900, length: 8 }, ...expected]);
  assert.deepEqual(readNewestSlot(bytes, head), { index: 1, offset: 980, length: 8 });
});

test('SlotTable: the slots valid in two readings with the same bytes, and a copy cleared of every other (restore-v1)', () => {
  const len = 4 * PAGE;
  const before = headFile(len, { writeOffset: 300n });
  setSlot(before, 0, 0, 100);
  setSlot(before, 1, 100, 100);
  setSlot(before, 2, 200, 100);
  setSlot(before, 3, 5, 4096); // malformed: never valid, must go from a copy too
  setSlot(before, 4, 250, 10);
  const a = new SlotTable(before, parseHead(before, len));
  assert.equal(a.count, 4);
  assert.equal(a.end, 300);
  assert.deepEqual(a.newestOf(a.valid), { index: 4, offset: 250, length: 10 });

  const after = before.slice();
  setSlot(after, 0, 0, 0); // invalidated
  setSlot(after, 2, 999, 100); // the slot reused for a newer snapshot
  setSlot(after, 5, 300, 10); // published after the first reading
  const keep = new Uint8Array(256);
  assert.equal(a.validThrough(new SlotTable(after, parseHead(after, len)), keep), 2);
  assert.deepEqual([...keep.keys()].filter((i) => keep[i] === 1), [1, 4]);
  assert.deepEqual(a.newestOf(keep), { index: 4, offset: 250, length: 10 });

  // Slot 4 is unchanged, but write_offset moved a ring (2 KiB) past it: a writer that never
  // invalidates (the Rust crate) may have overwritten its bytes, so it is not kept.
  const overrun = after.slice();
  new DataView(overrun.buffer).setBigUint64(HEAD.writeOffset, 300n + 2048n, true);
  assert.equal(a.validThrough(new SlotTable(overrun, parseHead(overrun, len)), keep), 0);

  a.validThrough(new SlotTable(after, parseHead(after, len)), keep);
  const copy = after.slice();
  setSlot(copy, 1, 100, 99); // changed between the readings and back: not what was checked
  assert.equal(a.clearOthersIn(copy, keep), 4, 'slots 1, 2, 3 and 5 are emptied');
  assert.deepEqual(readSlots(copy, parseHead(copy, len)), [{ index: 4, offset: 250, length: 10 }]);
  assert.equal(u64At(copy, slotPosition(3) + 8), 0n);
  assert.equal(u64At(copy, slotPosition(2)), 999n, 'only the length is cleared');
});

test('garbage: random heads with the magic give a layout or a SnapshotFormatError, never another exception', () => {
  const random = prng(0x5eed);
  const u64 = () => (BigInt(Math.floor(random() * 2 ** 32)) << 32n) | BigInt(Math.floor(random() * 2 ** 32));
  const mask = () => {
    const r = random();
    if (r < 0.6) return (1n << BigInt(Math.floor(random() * 16))) - 1n; // 2^k - 1 that may fit
    if (r < 0.7) return (1n << BigInt(Math.floor(random() * 65))) - 1n; // 2^k - 1, any k
    if (r < 0.85) return BigInt(Math.floor(random() * 5000));
    return u64();
  };
  const seen = { layouts: 0, errors: new Set() };
  for (let i = 0; i < 3000; i++) {
    const pages = 1 + Math.floor(random() * 40);
    const len = pages * PAGE + (random() < 0.2 ? Math.floor(random() * PAGE) : 0);
    const bytes = new Uint8Array(len);
    for (let k = 0; k + 4 <= Math.min(len, 5 * PAGE); k += 4) new DataView(bytes.buffer).setUint32(k, Math.floor(random() * 2 ** 32));
    const writeOffset = random() < 0.5 ? BigInt(Math.floor(random() * 1e6)) : u64();
    const view = new DataView(bytes.buffer);
    view.setBigUint64(0, MAGIC, true);
    view.setBigUint64(8, mask(), true);
    view.setBigUint64(16, mask(), true);
    view.setBigUint64(24, writeOffset, true);
    let head;
    try {
      head = parseHead(bytes, len);
    } catch (err) {
      assert.ok(err instanceof SnapshotFormatError, `case ${i}: ${err}`);
      seen.errors.add(err.code);
      continue;
    }
    seen.layouts++;
    assert.ok(head.tailStart <= len && head.entries >= 1 && head.data >= 1);
    const slots = readSlots(bytes, head);
    for (const s of slots) {
      assert.ok(s.length >= 1 && s.length < head.data && Number.isSafeInteger(s.offset + s.length));
      assert.ok(snapshotRanges(head, s).every((r) => r.position >= head.dataStart && r.position + r.length <= head.tailStart));
    }
  }
  // The generator must actually reach every outcome, or this test proves little.
  assert.ok(seen.layouts > 50, `only ${seen.layouts} valid layouts`);
  assert.deepEqual([...seen.errors].sort(), ['ERR_SNAPSHOT_BAD_MASK', 'ERR_SNAPSHOT_BAD_OFFSET', 'ERR_SNAPSHOT_BEYOND_END', 'ERR_SNAPSHOT_TOO_SMALL']);
});

test('garbage: heads with huge masks in files up to 2^53 bytes, read from the head page alone, give a bounded layout or a SnapshotFormatError', () => {
  const random = prng(0xb16);
  const int = (lo, hi) => lo + Math.floor(random() * (hi - lo + 1));
  const u64 = () => (BigInt(int(0, 2 ** 32 - 1)) << 32n) | BigInt(int(0, 2 ** 32 - 1));
  const mask = () => (random() < 0.8 ? (1n << BigInt(int(0, 64))) - 1n : u64());
  const seen = { layouts: 0, tooManySlots: 0, errors: new Set() };
  for (let i = 0; i < 20000; i++) {
    // As a reader that preads the head page of a (sparse) file of any size gets it.
    const fileLength = random() < 0.5 ? int(0, 2 ** 53 - 1) : 2 ** int(12, 52) + int(0, 2 * PAGE);
    const page = new Uint8Array(PAGE);
    const view = new DataView(page.buffer);
    for (let k = 0; k < 64; k += 4) view.setUint32(k, int(0, 2 ** 32 - 1));
    if (random() < 0.95) view.setBigUint64(HEAD.version, MAGIC, true);
    view.setBigUint64(HEAD.entryMask, mask(), true);
    view.setBigUint64(HEAD.dataMask, mask(), true);
    view.setBigUint64(HEAD.writeOffset, random() < 0.5 ? BigInt(int(0, 2 ** 40)) : u64(), true);
    let head;
    try {
      head = parseHead(page, fileLength);
    } catch (err) {
      assert.ok(err instanceof SnapshotFormatError, `case ${i}: ${err}`);
      seen.errors.add(err.code);
      if (/slots, above/.test(err.message)) seen.tooManySlots++;
      continue;
    }
    if (head === undefined) continue;
    seen.layouts++;
    assert.ok(head.entries <= MAX_ENTRIES && head.data <= MAX_DATA && head.tailStart <= fileLength, `case ${i}`);
    try {
      for (const s of readSlots(page, head)) assert.ok(s.length < head.data, `case ${i}`);
    } catch (err) {
      assert.ok(err instanceof SnapshotFormatError && err.code === 'ERR_SNAPSHOT_SHORT_BUFFER', `case ${i}: ${err}`);
    }
  }
  assert.ok(seen.layouts > 500 && seen.tooManySlots > 500, JSON.stringify({ ...seen, errors: [...seen.errors] }));
  assert.deepEqual([...seen.errors].sort(), ['ERR_SNAPSHOT_BAD_MASK', 'ERR_SNAPSHOT_BAD_OFFSET', 'ERR_SNAPSHOT_BEYOND_END', 'ERR_SNAPSHOT_TOO_SMALL']);
});
