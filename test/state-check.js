// Checks backups of the incremental-writer.js fixture (the state-model.js commits under
// restore-v1) from the format's bytes alone, independently of src/: every valid snapshot
// must name exactly the bytes of the committed state it claims.
import assert from 'node:assert/strict';
import { MemoryFile, StateFile } from 'shmfd';
import { declarations, gaugeAt, record } from './fixtures/state-model.js';

/** The capacity the tests give incremental-writer.js. */
export const CAPACITY = 1 << 22;

export const PAGE = 4096;

/** Where the structures of state-model.js lie in the tail (offsets of the declarations, not of any file). */
const LAYOUT = (() => {
  const memory = MemoryFile.create('layout');
  try {
    const state = StateFile.open(memory, declarations(CAPACITY));
    const byName = Object.fromEntries(state.layout.structures.map((s) => [s.name, s]));
    state.close();
    return byName;
  } finally {
    memory.close();
  }
})();

/**
 * The bytes of the log after commit `k`, as appended (per record u32 n, u32 ~n, the bytes,
 * zero padding to 8): a prefix of one buffer grown as commits are asked for.
 */
const log = { bytes: Buffer.alloc(0), length: 0, endAt: [0] };
function logAt(k) {
  for (let c = log.endAt.length; c <= k; c++) {
    for (let j = 0; j < c % 3; j++) {
      const r = record(c, j);
      const size = 8 + Math.ceil(r.length / 8) * 8;
      if (log.length + size > log.bytes.length) {
        const grown = Buffer.alloc(Math.max(2 * log.bytes.length, log.length + size, 1 << 16));
        log.bytes.copy(grown, 0, 0, log.length);
        log.bytes = grown;
      }
      log.bytes.writeUInt32LE(r.length, log.length);
      log.bytes.writeUInt32LE(~r.length >>> 0, log.length + 4);
      log.bytes.set(r, log.length + 8);
      log.length += size;
    }
    log.endAt.push(log.length);
  }
  return log.bytes.subarray(0, log.endAt[k]);
}

/**
 * Every valid snapshot of the snapshot file `bytes`, decoded from the format's bytes (head,
 * slots, ring; docs/snapshot-format.md) with the payload of each, and where the tail starts.
 */
export function validSnapshots(bytes, what) {
  assert.ok(bytes.length >= 3 * PAGE, `${what}: ${bytes.length} bytes`);
  assert.equal(bytes.readBigUInt64LE(0), 0x96c2a6f4b68519b3n, `${what}: the magic`);
  const entries = Number(bytes.readBigUInt64LE(8)) + 1;
  const data = Number(bytes.readBigUInt64LE(16)) + 1;
  const writeOffset = Number(bytes.readBigUInt64LE(24));
  const ringStart = PAGE * (1 + Math.ceil(entries / 256));
  const tailStart = ringStart + PAGE * Math.ceil(data / PAGE);
  const slots = [];
  for (let i = 0; i < entries; i++) {
    const offset = Number(bytes.readBigUInt64LE(PAGE + 16 * i));
    const length = Number(bytes.readBigUInt64LE(PAGE + 16 * i + 8));
    if (length !== 0 && length <= data - 1) slots.push({ i, offset, length });
  }
  const end = Math.max(writeOffset, ...slots.map((s) => s.offset + s.length));
  const snapshots = slots.filter((x) => x.offset >= end - data).map((s) => {
    const payload = Buffer.alloc(s.length);
    for (let b = 0; b < s.length; b++) payload[b] = bytes[ringStart + ((s.offset + b) % data)];
    return { i: s.i, offset: s.offset, payload };
  });
  return { tailStart, snapshots };
}

/**
 * Checks what every valid snapshot of `bytes` names against the state-model.js state after
 * the commit its payload names: the log's bytes, both cells' named copies.
 * @returns the newest commit (0 for none) and how many snapshots were checked
 */
export function checkAllSnapshots(bytes, what) {
  let newest = 0;
  let checked = 0;
  const { tailStart, snapshots } = validSnapshots(bytes, what);
  for (const { i, payload } of snapshots) {
    const k = Number(payload.readBigUInt64LE(16));
    const word = (structure, n) => Number(payload.readBigUInt64LE(24 + 16 * LAYOUT[structure].index + 8 * n));
    const at = `${what}, slot ${i} (commit ${k})`;
    const events = LAYOUT.events;
    const expected = logAt(k);
    assert.equal(word('events', 0), expected.length, `${at}: the log's end`);
    const logStart = tailStart + events.offset;
    assert.ok(bytes.subarray(logStart, logStart + expected.length).equals(expected), `${at}: the log's bytes differ from the records of commits 1..${k}`);
    let records = 0;
    for (let c = 1; c <= k; c++) records += c % 3;
    /** @type {[string, unknown[]][]} */
    const cells = [
      ['totals', [BigInt(k), BigInt((k * (k + 1)) / 2), BigInt(records)]],
      ['gauge', gaugeAt(k)],
    ];
    for (const [name, want] of cells) {
      const cell = LAYOUT[name];
      const version = word(name, 0);
      assert.equal(version, k, `${at}: ${name}'s version`);
      const copies = name === 'totals' ? 2 : 3; // state-model.js: counterSet(3), versionedCell(Float64Array, 4, { copies: 3 })
      const copy = tailStart + cell.offset + (version % copies) * cell.stride;
      const got = name === 'totals'
        ? [0, 1, 2].map((j) => bytes.readBigUInt64LE(copy + 8 * j))
        : [0, 1, 2, 3].map((j) => bytes.readDoubleLE(copy + 8 * j));
      assert.deepEqual(got, want, `${at}: ${name}'s named copy`);
    }
    newest = Math.max(newest, k);
    checked++;
  }
  return { newest, checked };
}

