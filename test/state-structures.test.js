// The state structures in one process over a real memfd: the API of StateFile, AppendLog,
// VersionedCell and CounterSet, their errors, recovery on reopen, and a randomized model
// check that after every single operation every valid snapshot in the file still names
// exactly the state committed with it (the discipline restore-v1 relies on).
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { MemoryFile, StateFile, appendLog, counterSet, versionedCell, recordBytes, keyValueMap, entryBytes, MAX_KEY_BYTES } from 'shmfd';
import { SnapshotFile } from 'shmfd/snapshot';
import fs from 'node:fs';
import { planLayout } from '../dist/state/layout.js';
import { mapGeometry } from '../dist/state/kv-map.js';
import { rebuildIndex, REBUILT_SLOT_WORDS } from '../dist/state/kv-rebuild.js';
import { seededRandom } from './helpers.js';

const SEED = process.env.STATE_SEED === undefined ? Date.now() % 1_000_000_007 : Number(process.env.STATE_SEED);
console.log(`# state model seed ${SEED} (replay with STATE_SEED=${SEED})`);

const enc = (s) => new TextEncoder().encode(s);
const dec = (b) => new TextDecoder().decode(b);

function memory(t, size = 0) {
  const file = MemoryFile.create('state-test', { size });
  t.after(() => file.close());
  return file;
}

function throwsCode(fn, code, what) {
  assert.throws(fn, (/** @type {NodeJS.ErrnoException} */ err) => {
    assert.equal(err.code, code, `${what}: ${err.message}`);
    return true;
  }, what);
}

test('a state file round-trips logs, cells and counters through a reopen of the same memfd', (t) => {
  const file = memory(t);
  const decl = { events: appendLog(4096), gauge: versionedCell(Float64Array, 3), hits: counterSet(2) };
  const a = StateFile.open(file, decl);
  assert.equal(a.recovered, false);
  assert.equal(a.sequence, 0);
  const { events, gauge, hits } = a.structures;
  assert.deepEqual([...gauge.value], [0, 0, 0], 'a cell starts as zeros');
  assert.equal(hits.get(1), 0n, 'counters start at 0');
  assert.equal(a.commit(), false, 'nothing changed: nothing to commit');
  events.append(enc('one'));
  events.append(enc(''));
  assert.equal(events.append(enc('three')), 2, 'append returns the index');
  assert.equal(events.committedLength, 0, 'appends are pending until the commit');
  assert.deepEqual([...events.pendingRecords()].map(dec), ['one', '', 'three']);
  gauge.stage((g) => g.set([1.5, -2, 3]));
  assert.equal(gauge.version, 0, 'a staged version is not committed');
  assert.deepEqual([...gauge.value], [1.5, -2, 3], 'value shows the staged version');
  assert.deepEqual([...gauge.committed], [0, 0, 0]);
  assert.equal(hits.add(1, 5n), 5n);
  assert.equal(hits.add(1), 6n);
  assert.equal(a.commit(), true);
  assert.equal(a.sequence, 1);
  assert.equal(gauge.version, 1);
  assert.equal(gauge.update((g) => (g[2] = 4)), 2, 'update commits and returns the version');
  events.append(enc('lost'));
  hits.add(0, 100);
  a.close();

  const b = StateFile.open(file, decl);
  assert.equal(b.recovered, true);
  assert.equal(b.sequence, 2);
  assert.deepEqual([...b.structures.events].map(dec), ['one', '', 'three'], 'uncommitted records are gone');
  assert.equal(b.structures.events.byteLength, recordBytes(3) + recordBytes(0) + recordBytes(5));
  assert.deepEqual([...b.structures.gauge.value], [1.5, -2, 4]);
  assert.equal(b.structures.gauge.version, 2);
  assert.deepEqual(b.structures.hits.values(), [0n, 6n], 'the uncommitted add is gone');
  b.close();
});

test('recovery zeroes the records appended after the committed end, and only past it', (t) => {
  const file = memory(t);
  const decl = { events: appendLog(8192) };
  const a = StateFile.open(file, decl);
  a.structures.events.append(enc('kept'));
  a.commit();
  for (let i = 0; i < 20; i++) a.structures.events.append(new Uint8Array(37).fill(0xee));
  const regionStart = a.snapshotLayout.tailStart + a.layout.structures[0].offset;
  a.close();
  const b = StateFile.open(file, decl);
  const bytes = file.map().bytes;
  const end = regionStart + recordBytes(4);
  assert.equal(dec(bytes.subarray(regionStart + 8, regionStart + 12)), 'kept');
  assert.ok(bytes.subarray(end, regionStart + 8192).every((x) => x === 0), 'everything after the committed record is zero');
  assert.deepEqual([...b.structures.events].map(dec), ['kept']);
  b.close();
});

test('a full log refuses a record with ERR_STATE_LOG_FULL and writes nothing; a record larger than the log is ERR_STATE_RECORD_TOO_LARGE', (t) => {
  const state = StateFile.open(memory(t), { events: appendLog(64) });
  const log = state.structures.events;
  throwsCode(() => log.append(new Uint8Array(57)), 'ERR_STATE_RECORD_TOO_LARGE', 'a record needing 72 of 64 bytes');
  log.append(new Uint8Array(40)); // 48 bytes
  throwsCode(() => log.append(new Uint8Array(9)), 'ERR_STATE_LOG_FULL', 'a record needing 24 of the 16 left');
  assert.equal(log.byteLength, 48, 'the refused record left nothing behind');
  assert.equal(log.length, 1);
  log.append(new Uint8Array(8)); // exactly fills it
  assert.equal(log.available, 0);
  state.commit();
  throwsCode(() => log.append(new Uint8Array(0)), 'ERR_STATE_LOG_FULL', 'even an empty record needs a header');
  state.close();
});

test('discard drops pending records and a staged cell version; a throwing stage drops its version', (t) => {
  const state = StateFile.open(memory(t), { events: appendLog(256), gauge: versionedCell(Int32Array, 2), hits: counterSet(1) });
  const { events, gauge, hits } = state.structures;
  events.append(enc('a'));
  state.commit();
  events.append(enc('b'));
  events.append(enc('c'));
  assert.equal(events.discard(), 2);
  assert.deepEqual([...events].map(dec), ['a']);
  assert.equal(events.pending, false);
  gauge.stage((g) => (g[0] = 7));
  gauge.discard();
  assert.deepEqual([...gauge.value], [0, 0]);
  assert.throws(() => gauge.stage((g) => {
    g[0] = 9;
    throw new Error('boom');
  }), /boom/);
  assert.equal(gauge.staged, false, 'the half-written version is dropped');
  assert.deepEqual([...gauge.value], [0, 0]);
  hits.add(0, 3);
  hits.discard();
  assert.equal(hits.get(0), 0n);
  assert.throws(() => hits.add(1), RangeError);
  state.close();
});

test('declarations are checked: each mistake is ERR_STATE_DECLARATION naming the structure', (t) => {
  const file = memory(t);
  /** @type {Array<[import('../dist/index.js').Declarations, RegExp]>} */
  const cases = [
    [{}, /at least one/],
    [{ '1x': appendLog(64) }, /"1x"/],
    [{ ['n'.repeat(25)]: appendLog(64) }, /name/],
    [{ log: appendLog(60) }, /log: .*multiple of 8/],
    [{ log: appendLog(8) }, /log: /],
    [{ c: versionedCell(Float64Array, 0) }, /c: .*length/],
    // @ts-expect-error: a plain Array is what the check refuses
    [{ c: versionedCell(Array, 2) }, /c: .*typed array/],
    [{ c: versionedCell(Float64Array, 2, { copies: 1 }) }, /c: copies/],
    [{ h: counterSet(2, { copies: 65 }) }, /h: copies/],
    // @ts-expect-error: no such kind of structure
    [{ x: { kind: 'tree' } }, /x: not a structure/],
  ];
  for (const [decl, pattern] of cases) {
    assert.throws(() => StateFile.open(file, decl), { code: 'ERR_STATE_DECLARATION', message: pattern }, JSON.stringify(Object.keys(decl)));
  }
  throwsCode(() => StateFile.open(file, { l: appendLog(64) }, { entries: 3 }), 'ERR_STATE_DECLARATION', 'entries not a power of two');
  assert.equal(file.size, 0, 'nothing was written to the file');
});

test('a snapshot layout in which a commit could empty the committed state before publishing the next is refused', (t) => {
  // With one slot, or a ring shorter than two payloads, a commit first invalidates the only
  // valid snapshot: a crash right then left no committed state at all (a silent fresh start).
  const file = memory(t);
  const decl = { hits: counterSet(2) };
  const payload = planLayout(decl).payloadBytes;
  assert.throws(() => StateFile.open(file, decl, { entries: 1 }), { code: 'ERR_STATE_DECLARATION', message: /at least 2 snapshot slots/ });
  const small = 2 ** Math.floor(Math.log2(2 * payload - 1));
  assert.throws(() => StateFile.open(file, decl, { entries: 4, data: small }), { code: 'ERR_STATE_DECLARATION', message: /at least twice that/ });
  assert.equal(file.size, 0);
  // A file that holds committed state in such a layout (entry_mask patched to 0) is not written to.
  const a = StateFile.open(file, decl, { entries: 2 });
  a.structures.hits.add(0, 5);
  a.commit();
  a.close();
  const bytes = file.map().bytes;
  new DataView(bytes.buffer, bytes.byteOffset).setBigUint64(8, 0n, true);
  const before = Buffer.from(bytes);
  assert.throws(() => StateFile.open(file, decl), { code: 'ERR_STATE_LAYOUT_MISMATCH', message: /unsafe/ });
  assert.ok(before.equals(Buffer.from(file.map().bytes)));
});

test('a configured state file cut to less than a snapshot file is ERR_SNAPSHOT_TOO_SMALL, not a silent fresh start', (t) => {
  const file = MemoryFile.create('state-cut', { sealShrink: false });
  t.after(() => file.close());
  const a = StateFile.open(file, { hits: counterSet(1) });
  a.structures.hits.add(0, 1);
  a.commit();
  a.close();
  for (const size of [4096, 8192]) {
    file.resize(size);
    throwsCode(() => StateFile.open(file, { hits: counterSet(1) }), 'ERR_SNAPSHOT_TOO_SMALL', `${size} bytes`);
    assert.equal(file.size, size, 'the file is left as it is');
  }
});

test('a file with committed state of another layout is ERR_STATE_LAYOUT_MISMATCH and is left alone; without committed state the layout may change', (t) => {
  const file = memory(t);
  const a = StateFile.open(file, { events: appendLog(4096), hits: counterSet(2) });
  a.close();
  // No commit yet: another program may take the file over.
  const b = StateFile.open(file, { hits: counterSet(3) });
  b.structures.hits.add(2, 1);
  b.commit();
  b.close();
  const before = Buffer.from(file.map().bytes);
  assert.throws(() => StateFile.open(file, { hits: counterSet(4) }), { code: 'ERR_STATE_LAYOUT_MISMATCH', message: /hits is declared differently/ });
  assert.throws(() => StateFile.open(file, { other: counterSet(3) }), { code: 'ERR_STATE_LAYOUT_MISMATCH', message: /"hits" in the file, "other" in the program/ });
  assert.throws(() => StateFile.open(file, { hits: counterSet(3), more: appendLog(64) }), /declares 1 structures \[hits\], the program 2/);
  assert.ok(before.equals(Buffer.from(file.map().bytes)), 'the file is unchanged');
  const c = StateFile.open(file, { hits: counterSet(3) });
  assert.equal(c.structures.hits.get(2), 1n, 'the right declarations still recover it');
  c.close();
});

test('a snapshot file written without the state structures (primes-snapshot style) is ERR_STATE_LAYOUT_MISMATCH', (t) => {
  const file = memory(t, 64 * 4096);
  const writer = new SnapshotFile(file.map().bytes).configure({ entries: 256, data: 2048 });
  writer.commit(new Uint8Array(8).fill(1));
  throwsCode(() => StateFile.open(file, { hits: counterSet(1) }), 'ERR_STATE_LAYOUT_MISMATCH', 'no directory');
});

test('a damaged committed log is ERR_STATE_CORRUPT naming the log and the record', (t) => {
  const file = memory(t);
  const decl = { events: appendLog(256) };
  const a = StateFile.open(file, decl);
  a.structures.events.append(enc('abc'));
  a.structures.events.append(enc('defgh'));
  a.commit();
  const at = a.snapshotLayout.tailStart + a.layout.structures[0].offset + recordBytes(3);
  a.close();
  const bytes = file.map().bytes;
  bytes[at] = 99; // the second record's length no longer matches its check word
  assert.throws(() => StateFile.open(file, decl), { code: 'ERR_STATE_CORRUPT', message: /log events: record 1 at byte 16/ });
});

test('fromEnv without a passed memory file is ERR_STATE_NO_SHARED_FD', () => {
  throwsCode(() => StateFile.fromEnv({ hits: counterSet(1) }, { env: {} }), 'ERR_STATE_NO_SHARED_FD', 'empty environment');
});

test('after a cell update only snapshots naming intact copies are valid (double buffer discipline)', (t) => {
  const state = StateFile.open(memory(t), { gauge: versionedCell(Uint32Array, 1) }, { entries: 64 });
  const gauge = state.structures.gauge;
  for (let v = 1; v <= 10; v++) {
    gauge.update((g) => (g[0] = v));
    // Copy v % 2 holds v; copy (v+1) % 2 holds v-1. Staging v+1 must first invalidate
    // every snapshot that names copy (v+1) % 2.
    gauge.stage((g) => (g[0] = 1000 + v));
    const valid = state.writer.valid();
    assert.ok(valid.length >= 1, 'the newest snapshot stays valid');
    for (const s of valid) {
      const version = Number(new DataView(state.writer.read(s).buffer).getBigUint64(24, true));
      assert.equal(version % 2, v % 2, `v=${v}: snapshot at ${s.offset} names the copy being written`);
    }
    gauge.discard();
  }
  state.close();
});

// The randomized model check. Each committed state is remembered by its sequence number;
// after every operation, every valid slot is decoded independently of the library, and the
// log bytes and cell copies it names must equal that remembered state.
test('model check: random operations against an in-memory model, every valid snapshot intact after every operation', (t) => {
  const rng = seededRandom(SEED);
  const file = memory(t);
  const decl = {
    log: appendLog(8192),
    cell: versionedCell(Float64Array, 3, { copies: 2 }),
    wide: versionedCell(Uint8Array, 100, { copies: 4 }),
    hits: counterSet(2, { copies: 3 }),
  };
  const options = { entries: 8, data: 512 }; // small: slots and ring wrap often
  const layout = planLayout(decl);
  let state = StateFile.open(file, decl, options);
  const committed = { records: [], cell: [0, 0, 0], wide: new Array(100).fill(0), hits: [0n, 0n], seq: 0 };
  /** @type {(ReturnType<typeof snapshotOf> & {touched: Set<unknown>}) | null} */
  let pending = null; // the model's staged state, or null
  const history = new Map([[0, snapshotOf(committed)]]);
  const counts = { append: 0, full: 0, stage: 0, commit: 0, reopen: 0, discard: 0, throwing: 0, checks: 0 };

  function snapshotOf(s) {
    return { records: s.records.slice(), cell: s.cell.slice(), wide: s.wide.slice(), hits: s.hits.slice() };
  }
  function staged() {
    pending ??= { ...snapshotOf(committed), touched: new Set() };
    return pending;
  }

  function checkValidSnapshots(step) {
    const bytes = file.map().bytes;
    const found = new SnapshotFile(bytes).recover();
    const tail = found.head.tailStart;
    for (const slot of found.valid()) {
      const p = new DataView(found.read(slot).buffer);
      const seq = Number(p.getBigUint64(16, true));
      const want = history.get(seq);
      assert.ok(want !== undefined, `step ${step}: a valid snapshot names sequence ${seq}, never committed`);
      const word = (i, k) => Number(p.getBigUint64(24 + 16 * i + 8 * k, true));
      // log
      const region = (i) => tail + layout.structures[i].offset;
      const end = word(0, 0);
      assert.equal(word(0, 1), want.records.length, `step ${step}: seq ${seq} record count`);
      let at = 0;
      for (const [n, r] of want.records.entries()) {
        const view = new DataView(bytes.buffer, bytes.byteOffset + region(0) + at);
        assert.equal(view.getUint32(0, true), r.length, `step ${step}: seq ${seq} record ${n} length`);
        assert.deepEqual([...bytes.subarray(region(0) + at + 8, region(0) + at + 8 + r.length)], r, `step ${step}: seq ${seq} record ${n}`);
        at += recordBytes(r.length);
      }
      assert.equal(at, end, `step ${step}: seq ${seq} log end`);
      // cells: copy version % copies
      const copy = (i, copies) => region(i) + (word(i, 0) % copies) * layout.structures[i].stride;
      const cell = new Float64Array(bytes.buffer, bytes.byteOffset + copy(1, 2), 3);
      assert.deepEqual([...cell], want.cell, `step ${step}: seq ${seq} cell`);
      assert.deepEqual([...bytes.subarray(copy(2, 4), copy(2, 4) + 100)], want.wide, `step ${step}: seq ${seq} wide cell`);
      const hits = new BigUint64Array(bytes.buffer, bytes.byteOffset + copy(3, 3), 2);
      assert.deepEqual([...hits], want.hits, `step ${step}: seq ${seq} counters`);
      counts.checks++;
    }
  }

  function checkLive(step) {
    const { log, cell, wide, hits } = state.structures;
    const view = pending ?? committed;
    assert.deepEqual([...log.records()].map((r) => [...r]), committed.records, `step ${step}: committed records`);
    assert.deepEqual([...log.records(), ...log.pendingRecords()].map((r) => [...r]), view.records, `step ${step}: all records`);
    assert.deepEqual([...cell.value], view.cell, `step ${step}: cell value`);
    assert.deepEqual([...wide.value], view.wide, `step ${step}: wide value`);
    assert.deepEqual(hits.values(), view.hits, `step ${step}: counters`);
    assert.equal(state.sequence, committed.seq, `step ${step}: sequence`);
  }

  for (let step = 0; step < 3000; step++) {
    const op = rng.int(0, 99);
    const { log, cell, wide, hits } = state.structures;
    if (op < 30) {
      const r = Array.from({ length: rng.int(0, 60) }, () => rng.int(0, 255));
      const used = (pending ?? committed).records.reduce((sum, x) => sum + recordBytes(x.length), 0);
      if (used + recordBytes(r.length) > 8192) {
        assert.throws(() => log.append(Uint8Array.from(r)), { code: 'ERR_STATE_LOG_FULL' }, `step ${step}`);
        counts.full++;
      } else {
        log.append(Uint8Array.from(r));
        staged().records.push(r);
        counts.append++;
      }
    } else if (op < 45) {
      const i = rng.int(0, 2);
      const v = rng.int(-1000, 1000) / 8;
      cell.stage((c) => (c[i] = v));
      staged().cell[i] = v;
      counts.stage++;
    } else if (op < 52) {
      const i = rng.int(0, 99);
      const v = rng.int(0, 255);
      wide.stage((c) => (c[i] = v));
      staged().wide[i] = v;
      counts.stage++;
    } else if (op < 60) {
      const i = rng.int(0, 1);
      const d = BigInt(rng.int(0, 5));
      hits.add(i, d);
      staged().hits[i] += d;
      counts.stage++;
    } else if (op < 62) {
      // A stage that throws halfway leaves nothing staged for that cell, so the model must
      // forget the cell's staged values.
      assert.throws(() => cell.stage((c) => {
        c[0] = 12345;
        throw new Error('halfway');
      }), /halfway/);
      staged().cell = committed.cell.slice(); // the state file still counts as changed
      counts.throwing++;
    } else if (op < 85) {
      const changed = pending !== null;
      assert.equal(state.commit(), changed, `step ${step}: commit publishes exactly when something changed`);
      if (changed) {
        committed.records = pending.records;
        committed.cell = pending.cell;
        committed.wide = pending.wide;
        committed.hits = pending.hits;
        committed.seq++;
        history.set(committed.seq, snapshotOf(committed));
        pending = null;
        counts.commit++;
      }
    } else if (op < 90) {
      log.discard();
      if (pending !== null) pending.records = committed.records.slice();
      counts.discard++;
    } else {
      // A crash at an operation boundary: the process's state object is gone, pending
      // changes with it; a new process opens the same memory.
      state.close();
      state = StateFile.open(file, decl, options);
      pending = null;
      counts.reopen++;
    }
    checkValidSnapshots(step);
    checkLive(step);
  }
  state.close();
  t.diagnostic(`seed ${SEED}: ${JSON.stringify(counts)}`);
  assert.ok(counts.commit > 100 && counts.reopen > 50 && counts.full > 0, 'the run exercised commits, reopens and a full log');
});

// ---- the key-value map

const hex = (b) => Buffer.from(b).toString('hex');
const mapEntries = (m) => [...m.entries()].map(([k, v]) => [hex(k), hex(v)]).sort();

/** A copy of `file` in a new memfd: what a restored backup is. */
function copyOf(t, file) {
  const copy = memory(t, file.size);
  const from = file.map();
  const to = copy.map();
  to.bytes.set(from.bytes);
  from.unmap();
  to.unmap();
  return copy;
}

/**
 * The entries a map's committed window names, decoded from the bytes as docs/state.md
 * describes them, without the library: the region is a header page, an index of the
 * largest power of two of 8-byte slots within an eighth of the rest, then the ring.
 */
function decodeMapWindow(bytes, regionStart, regionLength, tail, head) {
  let slots = 1;
  while (slots * 2 * 8 <= (regionLength - 4096) / 8) slots *= 2;
  const ringStart = regionStart + 4096 + slots * 8;
  const ring = regionLength - 4096 - slots * 8;
  const view = new DataView(bytes.buffer, bytes.byteOffset);
  const out = new Map();
  for (let at = tail; at < head; ) {
    const phys = at % ring;
    const word0 = ring - phys >= 16 ? view.getUint32(ringStart + phys, true) : 0x0200_0000;
    if (word0 & 0x0200_0000) {
      at += ring - phys;
      continue;
    }
    const keyBytes = word0 & 0xffffff;
    const valueBytes = view.getUint32(ringStart + phys + 4, true);
    const key = hex(bytes.subarray(ringStart + phys + 16, ringStart + phys + 16 + keyBytes));
    if (word0 & 0x0100_0000) out.delete(key);
    else out.set(key, hex(bytes.subarray(ringStart + phys + 16 + keyBytes, ringStart + phys + 16 + keyBytes + valueBytes)));
    at += 16 + Math.ceil((keyBytes + valueBytes) / 8) * 8;
  }
  return [...out].sort();
}

test('a key-value map stages, reads its staged changes, commits with the other structures and round-trips through a reopen', (t) => {
  const file = memory(t);
  const decl = { sessions: keyValueMap({ maxBytes: 1 << 20 }), totals: counterSet(2) };
  let state = StateFile.open(file, decl);
  let { sessions, totals } = state.structures;
  assert.equal(sessions.size, 0);
  assert.equal(sessions.rebuilt, false, 'a new map has nothing to rebuild');
  assert.equal(sessions.set('alice', enc('{"n":1}')), sessions, 'set returns the map');
  sessions.set(enc('bob'), enc('b'));
  sessions.set('', new Uint8Array(0));
  const value = enc('mutable');
  sessions.set('carol', value);
  value[0] = 0;
  assert.equal(dec(sessions.get('carol')), 'mutable', 'set copies the value');
  assert.equal(dec(sessions.get(enc('alice'))), '{"n":1}', 'string and byte keys are the same key');
  assert.equal(dec(sessions.get('bob')), 'b');
  assert.equal(sessions.get('nobody'), undefined);
  assert.equal(sessions.size, 4);
  assert.equal(sessions.has(''), true);
  assert.equal(sessions.delete('carol'), true);
  assert.equal(sessions.delete('carol'), false, 'deleting an absent key says so');
  assert.equal(sessions.stagedBytes, 3 * entryBytes(5, 7) + entryBytes(3, 1) + entryBytes(0, 0) - entryBytes(5, 7), 'one record per staged key, the deleted one kept as a tombstone');
  sessions.set('alice', enc('{"n":9}'));
  assert.equal(sessions.stagedBytes, 3 * entryBytes(5, 7) + entryBytes(3, 1) + entryBytes(0, 0) - entryBytes(5, 7), 'a value of the same size is rewritten in place');
  sessions.set('alice', enc('{"n":1}'));
  totals.add(0, 3n);
  assert.equal(state.commit(), true);
  assert.equal(sessions.stagedBytes, 0);
  const got = sessions.get('alice');
  got[0] = 0;
  assert.equal(dec(sessions.get('alice')), '{"n":1}', 'get returns a copy');
  sessions.set('alice', enc(JSON.stringify({ n: 2 })));
  sessions.delete('bob');
  assert.equal(JSON.parse(dec(sessions.get('alice'))).n, 2, 'reads see staged changes');
  assert.equal(sessions.has('bob'), false);
  assert.deepEqual(mapEntries(sessions), [['', ''], [hex(enc('alice')), hex(enc('{"n":2}'))]]);
  state.close();

  state = StateFile.open(file, decl);
  ({ sessions, totals } = state.structures);
  assert.equal(sessions.rebuilt, false, 'reopening the same memfd uses the index as it is');
  assert.equal(totals.get(0), 3n);
  assert.deepEqual(mapEntries(sessions), [['', ''], [hex(enc('alice')), hex(enc('{"n":1}'))], [hex(enc('bob')), hex(enc('b'))]], 'uncommitted changes are gone');
  assert.deepEqual([...sessions.keys()].map(dec).sort(), ['', 'alice', 'bob']);
  sessions.set('dave', enc('d'));
  sessions.discard();
  assert.equal(sessions.has('dave'), false, 'discard drops staged changes');
  sessions.clear();
  assert.equal(sessions.size, 0);
  assert.equal(sessions.get('alice'), undefined, 'a staged clear hides the committed entries');
  sessions.set('erin', enc('e'));
  assert.deepEqual([...sessions.keys()].map(dec), ['erin']);
  state.commit();
  state.close();

  const restored = copyOf(t, file);
  const lines = [];
  const log = { error: (m) => lines.push(`error ${m}`), warn: (m) => lines.push(`warn ${m}`), info: (m) => lines.push(`info ${m}`), debug: () => {} };
  state = StateFile.open(restored, decl, { log });
  ({ sessions } = state.structures);
  assert.equal(sessions.rebuilt, true, 'a copy in another memfd never trusts the copied index');
  assert.deepEqual([...sessions.keys()].map(dec), ['erin']);
  assert.match(lines[0], /^info map sessions: rebuilding its index from 0\.0 MiB of entries/, 'a rebuild says so (a warning from 64 MiB on)');
  assert.match(lines[1], /^info map sessions: index rebuilt, 1 entries, in \d+ ms$/);
  state.close();
  lines.length = 0;
  state = StateFile.open(restored, decl, { log });
  assert.equal(state.structures.sessions.rebuilt, false, 'the rebuilt index is used by the next open of that memfd');
  assert.deepEqual(lines, [], 'reattaching says nothing');
  state.close();
});

test('a map commit that changes nothing else still publishes; an iteration across a commit that changes the map is ERR_STATE_MAP_CHANGED', (t) => {
  const state = StateFile.open(memory(t), { m: keyValueMap({ maxBytes: 1 << 16 }) });
  const { m } = state.structures;
  m.set('a', enc('1'));
  m.set('b', enc('2'));
  assert.equal(state.commit(), true);
  const it = m.keys();
  it.next();
  m.set('c', enc('3'));
  assert.equal(it.next().done, false, 'staging does not end an iteration');
  state.commit();
  assert.throws(() => it.next(), { code: 'ERR_STATE_MAP_CHANGED' });
  state.close();
});

test('map limits: a long key, a large value and a full map are refused with their codes, nothing staged, nothing committed lost', (t) => {
  const file = memory(t);
  const decl = { m: keyValueMap({ maxBytes: 1 << 16 }) };
  const state = StateFile.open(file, decl);
  const { m } = state.structures;
  throwsCode(() => m.set('k'.repeat(MAX_KEY_BYTES + 1), enc('v')), 'ERR_STATE_KEY_TOO_LARGE', 'long string key');
  throwsCode(() => m.get(new Uint8Array(MAX_KEY_BYTES + 1)), 'ERR_STATE_KEY_TOO_LARGE', 'long byte key');
  throwsCode(() => m.set('k', new Uint8Array(m.maxRecordBytes)), 'ERR_STATE_VALUE_TOO_LARGE', 'large value');
  m.set('k', new Uint8Array(m.maxRecordBytes - entryBytes(1, 0)));
  assert.equal(m.size, 1, 'the largest record fits');
  state.commit();
  let i = 0;
  const value = new Uint8Array(100);
  assert.throws(() => {
    for (;; i++) {
      m.set(`key${i}`, value);
      if (i % 10 === 9) state.commit();
    }
  }, { code: 'ERR_STATE_MAP_FULL', message: /map m is full/ });
  assert.equal(m.has(`key${i}`), false, 'the refused entry is not staged');
  assert.ok(m.liveBytes <= m.maxLiveBytes);
  state.commit();
  const before = mapEntries(m);
  assert.equal(before.length, i + 1);
  // Overwrites and deletions go on in a full map: their space is reclaimed.
  for (let round = 0; round < 50; round++) {
    for (let j = 0; j < i; j += 3) {
      m.set(`key${j}`, new Uint8Array(100).fill(round));
      if (j % 30 === 0) state.commit();
    }
    state.commit();
  }
  m.delete('key0');
  m.set('fresh', value);
  state.commit();
  state.close();
  const again = StateFile.open(file, decl);
  const after = again.structures.m;
  assert.equal(after.size, i + 1);
  assert.deepEqual([...after.get('key3')], new Array(100).fill(49));
  assert.deepEqual([...after.get('key1')], new Array(100).fill(0));
  again.close();
});

test('map declarations are checked: maxBytes a multiple of 4096 from 64 KiB', (t) => {
  const file = memory(t);
  for (const maxBytes of [undefined, 1000, 4096 * 15, 4096 * 16 + 1, 2 ** 33]) {
    assert.throws(() => StateFile.open(file, { m: keyValueMap({ maxBytes }) }), { code: 'ERR_STATE_DECLARATION', message: /m: a map's maxBytes/ }, String(maxBytes));
  }
});

test('a damaged committed map record in a restored copy is ERR_STATE_CORRUPT naming the map', (t) => {
  const file = memory(t);
  const decl = { m: keyValueMap({ maxBytes: 1 << 16 }) };
  const state = StateFile.open(file, decl);
  state.structures.m.set('a', enc('1'));
  state.structures.m.set('b', enc('2'));
  state.commit();
  const ringStart = state.snapshotLayout.tailStart + state.layout.structures[0].offset + 4096 + 512 * 8;
  state.close();
  const copy = copyOf(t, file);
  const mapping = copy.map();
  mapping.bytes[ringStart + 24 + 4] ^= 1; // the second record's value length
  mapping.unmap();
  assert.throws(() => StateFile.open(copy, decl), { code: 'ERR_STATE_CORRUPT', message: /map m: the record at ring byte 24/ });
});

test('a restored copy whose index header is gone rebuilds a large map: every entry, deletions and overwrites applied', (t) => {
  // More records than a rebuild inserts at a time, and a table that must grow from its
  // smallest size: the header that would suggest its size is zeroed.
  const file = memory(t);
  const decl = { m: keyValueMap({ maxBytes: 64 << 20 }) };
  const state = StateFile.open(file, decl);
  const { m } = state.structures;
  const model = new Map();
  const rng = seededRandom(SEED);
  for (let i = 0; i < 90_000; i++) {
    const key = `k${rng.int(0, 59_999)}`;
    if (rng.next() < 0.1) {
      m.delete(key);
      model.delete(key);
    } else {
      const value = enc(`${key}=${i}`);
      m.set(key, value);
      model.set(key, `${key}=${i}`);
    }
    if (i % 1000 === 999) state.commit();
  }
  state.commit();
  const header = state.snapshotLayout.tailStart + state.layout.structures[0].offset;
  state.close();
  const copy = copyOf(t, file);
  const mapping = copy.map();
  mapping.bytes.fill(0, header, header + 4096);
  mapping.unmap();
  const restored = StateFile.open(copy, decl, { log: { error() {}, warn() {}, info() {}, debug() {} } });
  t.after(() => restored.close());
  const r = restored.structures.m;
  assert.equal(r.rebuilt, true);
  assert.equal(r.size, model.size);
  for (const [key, value] of model) assert.equal(dec(r.get(key)), value, key);
  let n = 0;
  for (const [key, value] of r) {
    assert.equal(dec(value), model.get(dec(key)));
    n++;
  }
  assert.equal(n, model.size);
});

// Keys whose 32-bit record hashes are equal (found by search over `collide-N`): a rebuild
// must tell them apart by their bytes. The test checks that their records' hash words match.
const COLLIDING = [['collide-16517', 'collide-58230'], ['collide-16510', 'collide-58237']];

/** The map region of `state`'s first structure: where it starts in the file, its geometry, and the committed window from its index header. */
function mapRegion(state) {
  const region = state.layout.structures[0];
  const start = state.snapshotLayout.tailStart + region.offset;
  return { start, length: region.length, geometry: mapGeometry(region.length) };
}

test('a rebuild tells apart keys whose hashes collide: overwrites and deletions reach the right one', (t) => {
  const file = memory(t);
  const decl = { m: keyValueMap({ maxBytes: 1 << 20 }) };
  const state = StateFile.open(file, decl);
  const { m } = state.structures;
  const [[a, b], [c, d]] = COLLIDING;
  m.set(a, enc('a1')).set(b, enc('b1')).set(c, enc('c1')).set(d, enc('d1'));
  state.commit();
  m.set(b, enc('b2')).set(c, enc('c2'));
  m.delete(d);
  state.commit();
  m.set(a, enc('a3'));
  state.commit();
  const { start, geometry } = mapRegion(state);
  const mapping = file.map();
  const view = new DataView(mapping.bytes.buffer, mapping.bytes.byteOffset);
  const hashOf = new Map();
  for (let at = 0, ring = start + geometry.ringOffset; ; ) {
    const word0 = view.getUint32(ring + at, true);
    if (word0 === 0) break;
    const keyBytes = word0 & 0xffffff;
    hashOf.set(dec(mapping.bytes.subarray(ring + at + 16, ring + at + 16 + keyBytes)), view.getUint32(ring + at + 8, true));
    at += 16 + Math.ceil((keyBytes + view.getUint32(ring + at + 4, true)) / 8) * 8;
  }
  mapping.unmap();
  assert.equal(hashOf.get(a), hashOf.get(b), 'the test needs keys whose hashes collide');
  assert.equal(hashOf.get(c), hashOf.get(d), 'the test needs keys whose hashes collide');
  state.close();
  const restored = StateFile.open(copyOf(t, file), decl, { log: { error() {}, warn() {}, info() {}, debug() {} } });
  t.after(() => restored.close());
  const r = restored.structures.m;
  assert.equal(r.rebuilt, true);
  assert.deepEqual([a, b, c, d].map((k) => r.get(k) && dec(r.get(k))), ['a3', 'b2', 'c2', undefined]);
  assert.equal(r.size, 3);
  assert.equal(r.liveBytes, entryBytes(a.length, 2) + entryBytes(b.length, 2) + entryBytes(c.length, 2));
});

test('a rebuild done range by range, from any table size, names exactly the records of a rebuild done at once', (t) => {
  // Ranges of a few records put the older record of an overwritten key in an earlier range
  // than the newer one: the keys are then compared in the ring, not in the gathered copy.
  const file = memory(t);
  const decl = { m: keyValueMap({ maxBytes: 4 << 20 }) };
  const state = StateFile.open(file, decl);
  const { m } = state.structures;
  const rng = seededRandom(SEED + 2);
  const keys = [...COLLIDING.flat(), ...Array.from({ length: 3000 }, (_, i) => (i % 7 === 0 ? `long-${'x'.repeat(rng.int(60, 300))}-${i}` : `k${i}`))];
  for (let i = 0; i < 12_000; i++) {
    const key = keys[rng.int(0, keys.length - 1)];
    if (rng.next() < 0.15) m.delete(key);
    else m.set(key, enc(`${key}=${i}`.slice(0, rng.int(0, 40))));
    if (i % 97 === 96) state.commit();
  }
  state.commit();
  const { start, length, geometry } = mapRegion(state);
  const mapping = file.map();
  const header = new DataView(mapping.bytes.buffer, mapping.bytes.byteOffset + start);
  const tail = Number(header.getBigUint64(24, true));
  const head = Number(header.getBigUint64(32, true));
  const ringStart = start + geometry.ringOffset;
  const input = {
    name: 'm',
    ring: geometry.ringBytes,
    tail,
    head,
    maxSlots: geometry.maxSlots,
    maxEntries: geometry.maxEntries,
    maxRecordBytes: geometry.maxRecordBytes,
    ringBytes: mapping.bytes.subarray(ringStart, ringStart + geometry.ringBytes),
    ringWords: new Uint32Array(mapping.buffer, mapping.bytes.byteOffset + ringStart, geometry.ringBytes / 4),
    read: (into, phys, limit) => fs.readSync(file.fd, into, 0, Math.min(into.length, limit), ringStart + phys),
  };
  const expected = decodeMapWindow(mapping.bytes, start, length, tail, head);
  /** @param {import('../dist/state/kv-rebuild.js').RebuildInput} options */
  const rebuilt = (options) => {
    const r = rebuildIndex(options);
    if (typeof r === 'string') assert.fail(r);
    return r;
  };
  const named = (r) => {
    const entries = [];
    for (let s = 0; s < r.table.length; s += REBUILT_SLOT_WORDS) {
      if (r.table[s] === 0) continue;
      const phys = (r.table[s] - 1) * 8;
      const keyBytes = input.ringWords[phys / 4] & 0xffffff;
      const valueBytes = input.ringWords[phys / 4 + 1];
      const at = phys + 16;
      entries.push([hex(input.ringBytes.subarray(at, at + keyBytes)), hex(input.ringBytes.subarray(at + keyBytes, at + keyBytes + valueBytes))]);
    }
    return entries.sort();
  };
  const whole = rebuilt({ ...input, slots: 1024 });
  assert.deepEqual(named(whole), expected, 'the rebuilt index names the newest record of every key present, and nothing else');
  assert.equal(whole.count, expected.length);
  assert.equal(whole.count, m.size);
  assert.equal(whole.live, m.liveBytes);
  for (const rangeRecords of [1, 7, 1000]) {
    for (const slots of [1024, 16384]) {
      const r = rebuilt({ ...input, slots, rangeRecords });
      assert.deepEqual(named(r), expected, `ranges of ${rangeRecords} records, from ${slots} slots`);
      assert.equal(r.count, whole.count);
      assert.equal(r.live, whole.live);
    }
  }
  mapping.unmap();
  state.close();
});

// The map's model check: random sets, deletes, clears, discards, commits, and reopens (of
// the same memfd, or of a copy in a new one: a restored backup) against a JS Map; a small
// map, so the ring wraps and reclaims often. After every operation every valid snapshot is
// decoded without the library and must name exactly the map committed with its sequence.
test('model check: a key-value map under random operations, every valid snapshot intact after every operation', (t) => {
  const rng = seededRandom(SEED + 1);
  let file = memory(t);
  const decl = { m: keyValueMap({ maxBytes: 1 << 16 }), n: counterSet(1, { copies: 64 }) };
  // Snapshots live for 63 commits (the counters' copies): long enough for the ring to come
  // round to the bytes they name.
  const options = { entries: 64, data: 4096 };
  const layout = planLayout(decl);
  let state = StateFile.open(file, decl, options);
  let committed = new Map();
  let pending = null; // staged: { map, cleared, records: record bytes of each staged key's newest record, need }
  const history = new Map([[0, []]]);
  let seq = 0;
  let written = 0; // record bytes committed
  const counts = { set: 0, delete: 0, clear: 0, full: 0, commit: 0, reopen: 0, restore: 0, discard: 0, checks: 0, rebuilt: 0 };
  const sorted = (map) => [...map].sort();
  const view = () => pending?.map ?? committed;
  const staged = () => {
    pending ??= { map: new Map(committed), cleared: false, records: new Map(), need: 0 };
    return pending;
  };
  const { maxLiveBytes, maxEntries, maxRecordBytes } = state.structures.m;
  const ringBytes = layout.structures[0].length - 4096 - 512 * 8;

  /**
   * Whether the map takes a change leading to `after` (the limits of docs/state.md): the
   * entries, their record bytes, and the ring bytes staged since the last commit (a change
   * of a staged key to a record of the same size, or its deletion, rewrites its record; any
   * other change adds one).
   */
  function fits(after) {
    let live = 0;
    for (const [k, v] of after.map) live += entryBytes(k.length / 2, v.length / 2);
    return after.map.size <= maxEntries && live <= maxLiveBytes && live + after.need <= ringBytes / 2 - 4 * maxRecordBytes;
  }

  function checkSnapshots(step) {
    const bytes = file.map().bytes;
    const found = new SnapshotFile(bytes).recover();
    const sequences = [];
    for (const slot of found.valid()) {
      const p = new DataView(found.read(slot).buffer);
      const s = Number(p.getBigUint64(16, true));
      const want = history.get(s);
      assert.ok(want !== undefined, `step ${step}: a valid snapshot names sequence ${s}, never committed`);
      const tail = Number(p.getBigUint64(24, true));
      const head = Number(p.getBigUint64(32, true));
      const region = found.head.tailStart + layout.structures[0].offset;
      assert.deepEqual(decodeMapWindow(bytes, region, layout.structures[0].length, tail, head), want, `step ${step}: seq ${s} map`);
      assert.equal(p.getBigUint64(40, true), BigInt(s), `step ${step}: seq ${s} counter (cell version)`);
      counts.checks++;
      sequences.push(s);
    }
    assert.ok(seq === 0 || sequences.includes(seq), `step ${step}: the newest commit (${seq}) is still valid`);
  }

  const covered = () => counts.full > 0 && counts.restore > 20 && counts.rebuilt > 20 && written > 2 * ringBytes;
  // At least 2500 steps, then on until the run covered what it is for: seeds differ in how
  // soon the map fills and the ring comes round.
  for (let step = 0; step < 2500 || (!covered() && step < 20_000); step++) {
    const op = rng.int(0, 99);
    const { m } = state.structures;
    const key = (rng.int(0, 1) === 0 ? enc(`k${rng.int(0, 300)}`) : enc(`key-${rng.int(0, 40)}`));
    const k = hex(key);
    if (op < 55) {
      const v = Uint8Array.from({ length: rng.int(0, rng.int(0, 1) === 0 ? 700 : 150) }, () => rng.int(0, 255));
      const after = { map: new Map(view()), cleared: pending?.cleared ?? false, records: new Map(pending?.records ?? []), need: pending?.need ?? 0 };
      const size = entryBytes(key.length, v.length);
      after.map.set(k, hex(v));
      if (after.records.get(k) !== size) after.need += size;
      after.records.set(k, size);
      if (fits(after)) {
        m.set(key, v);
        pending = after;
        counts.set++;
      } else {
        assert.throws(() => m.set(key, v), { code: 'ERR_STATE_MAP_FULL' }, `step ${step}`);
        counts.full++;
      }
    } else if (op < 68) {
      const present = view().has(k);
      assert.equal(m.delete(key), present, `step ${step}: delete says whether the key was there`);
      if (present) {
        const p = staged();
        p.map.delete(k);
        if (!p.records.has(k)) {
          // A committed key not staged yet: a tombstone record (a staged one becomes one).
          p.records.set(k, entryBytes(key.length, 0));
          p.need += entryBytes(key.length, 0);
        }
        counts.delete++;
      }
    } else if (op < 69) {
      if (rng.int(0, 2) !== 0) continue; // rarely: the map should fill up between clears
      m.clear();
      const p = staged();
      p.map.clear();
      p.records.clear();
      p.need = 0;
      p.cleared = true;
      counts.clear++;
    } else if (op < 71) {
      m.discard();
      if (pending !== null) pending = { map: new Map(committed), cleared: false, records: new Map(), need: 0 };
      counts.discard++;
    } else if (op < 89) {
      state.structures.n.set(0, seq + 1); // every commit publishes; the counter's version is its sequence
      state.commit();
      seq++;
      if (pending !== null) {
        written += pending.need;
        committed = pending.map;
      }
      pending = null;
      history.set(seq, sorted(committed));
      counts.commit++;
    } else {
      const restore = op >= 95;
      state.close();
      if (restore) file = copyOf(t, file);
      state = StateFile.open(file, decl, options);
      assert.equal(state.structures.m.rebuilt, restore && seq > 0, `step ${step}: ${restore ? 'a copy rebuilds its index' : 'the same memfd keeps its index'}`);
      if (state.structures.m.rebuilt) counts.rebuilt++;
      pending = null;
      counts[restore ? 'restore' : 'reopen']++;
    }
    checkSnapshots(step); // staging writes records past the committed head: never into a valid snapshot
    assert.deepEqual(mapEntries(state.structures.m), sorted(view()), `step ${step}: entries`);
    assert.equal(state.structures.m.size, view().size, `step ${step}: size`);
    assert.equal(state.structures.m.stagedBytes, pending?.need ?? 0, `step ${step}: staged ring bytes`);
    const probe = rng.int(0, 40);
    assert.equal(state.structures.m.has(`key-${probe}`), view().has(hex(enc(`key-${probe}`))), `step ${step}: has`);
  }
  state.close();
  t.diagnostic(`seed ${SEED + 1}: ${JSON.stringify(counts)}, ${written} record bytes committed into a ${ringBytes}-byte ring`);
  assert.ok(counts.full > 0 && counts.restore > 20 && counts.rebuilt > 20, 'the run exercised full maps and restores');
  assert.ok(written > 2 * ringBytes, 'the ring wrapped and was reclaimed many times');
});

// ---- retained logs

/**
 * The records a retained log's committed window `[first, end)` names, decoded from the
 * bytes as docs/state.md describes them, without the library: 16-byte headers (u32
 * length, u32 NOT length, u64 index), a wrap marker (length 0xffffffff) skipping to the
 * region's start. Returns [index, hex] pairs.
 */
function decodeLogWindow(bytes, regionStart, capacity, first, end, what) {
  const view = new DataView(bytes.buffer, bytes.byteOffset);
  const out = [];
  for (let at = first; at < end; ) {
    const phys = at % capacity;
    const length = view.getUint32(regionStart + phys, true);
    if (length === 0xffffffff) {
      at += capacity - phys;
      continue;
    }
    assert.equal(view.getUint32(regionStart + phys + 4, true), ~length >>> 0, `${what}: record at stream byte ${at}: check word`);
    const index = Number(view.getBigUint64(regionStart + phys + 8, true));
    out.push([index, hex(bytes.subarray(regionStart + phys + 16, regionStart + phys + 16 + length))]);
    at += 16 + Math.ceil(length / 8) * 8;
  }
  return out;
}

/**
 * A retained log as docs/state.md specifies it, in plain JS: where each record lies, which
 * records a commit keeps. `committed` and `pending` are { first, firstIndex, end, records }
 * with records [{ index, pos, size, hex }].
 */
class RingModel {
  constructor(capacity, keepBytes, keepRecords = Infinity) {
    this.capacity = capacity;
    this.keepBytes = keepBytes;
    this.keepRecords = keepRecords;
    this.maxRecordBytes = Math.min(keepBytes, Math.floor((capacity - keepBytes + 8) / 16) * 8);
    this.committed = { first: 0, firstIndex: 0, end: 0, records: [] };
    this.pending = [];
  }
  get end() {
    return this.pending.at(-1)?.end ?? this.committed.end;
  }
  get next() {
    return this.committed.firstIndex + this.committed.records.length + this.pending.length;
  }
  /** 'too large', 'full', or the appended record's index. */
  append(bytes) {
    const size = 16 + Math.ceil(bytes.length / 8) * 8;
    if (size > this.maxRecordBytes) return 'too large';
    const phys = this.end % this.capacity;
    const pos = this.end + (this.capacity - phys < size ? this.capacity - phys : 0);
    if (pos + size - this.committed.first > this.capacity) return 'full';
    this.pending.push({ index: this.next, pos, size, end: pos + size, hex: hex(bytes) });
    return this.next - 1;
  }
  commit() {
    const all = [...this.committed.records, ...this.pending];
    const end = this.end;
    let drop = 0;
    const first = () => (drop < all.length ? all[drop].pos : end);
    while (drop < all.length && (end - first() > this.keepBytes || all.length - drop > this.keepRecords)) drop++;
    this.committed = { first: first(), firstIndex: this.committed.firstIndex + drop, end, records: all.slice(drop) };
    this.pending = [];
  }
  window() {
    return this.committed.records.map((r) => [r.index, r.hex]);
  }
}

test('a retained log keeps the newest records: indexes count on across drops, and a reopen or a copy keeps the window', (t) => {
  const file = memory(t);
  const decl = { recent: appendLog(1024, { keepRecords: 3 }), tail: appendLog(256, { keepBytes: 64 }), plain: appendLog(64) };
  let state = StateFile.open(file, decl);
  let { recent, tail } = state.structures;
  assert.equal(recent.keepRecords, 3);
  assert.equal(recent.keepBytes, 512, 'keepRecords alone keeps at most half the capacity in bytes');
  assert.equal(state.structures.plain.keepBytes, undefined, 'a log without options keeps everything');
  assert.equal(tail.recordBytes(8), 24, 'a retained record has a 16-byte header');
  assert.equal(tail.maxRecordBytes, 64);
  assert.equal(recent.maxRecordBytes, 256, '(1024 - 512 + 8) / 2, rounded down to a multiple of 8');
  for (let i = 0; i < 5; i++) assert.equal(recent.append(enc(`r${i}`)), i, 'append returns the index');
  assert.deepEqual([...recent].map(dec), [], 'nothing is committed yet');
  assert.deepEqual([...recent.pendingRecords()].map(dec), ['r0', 'r1', 'r2', 'r3', 'r4']);
  state.commit();
  assert.deepEqual([...recent].map(dec), ['r2', 'r3', 'r4'], 'the commit kept the newest 3');
  assert.equal(recent.firstIndex, 2);
  assert.equal(recent.committedLength, 5);
  assert.equal(recent.length, 5);
  // Around the rings many times, committing every few records.
  const want = [];
  for (let i = 0; i < 500; i++) {
    const r = enc(`t${i}`.padEnd(8, '.'));
    assert.equal(tail.append(r), i);
    want.push(`t${i}`.padEnd(8, '.'));
    recent.append(enc(`r${i + 5}`));
    if (i % 3 === 2) state.commit();
  }
  state.commit();
  assert.deepEqual([...tail].map(dec), want.slice(-2), '64 bytes keep two records of 24 bytes');
  assert.equal(tail.firstIndex, 498);
  assert.equal(tail.committedByteLength, 48);
  assert.deepEqual([...recent].map(dec), ['r502', 'r503', 'r504']);
  tail.append(enc('uncommitted'));
  state.close();

  /** @type {Array<[string, MemoryFile]>} */
  const files = [['a reopen of the same memfd', file], ['a copy in a new memfd', copyOf(t, file)]];
  for (const [what, f] of files) {
    state = StateFile.open(f, decl);
    ({ recent, tail } = state.structures);
    assert.deepEqual([...tail].map(dec), want.slice(-2), what);
    assert.equal(tail.firstIndex, 498, what);
    assert.equal(tail.length, 500, `${what}: the uncommitted record is gone`);
    assert.equal(recent.firstIndex, 502, what);
    assert.equal(recent.append(enc('next')), 505, `${what}: indexes continue`);
    state.commit();
    assert.deepEqual([...recent].map(dec), ['r503', 'r504', 'next'], what);
    state.close();
  }
});

test('retained log limits: a record over maxRecordBytes is ERR_STATE_RECORD_TOO_LARGE, appends beyond the room before the next commit ERR_STATE_LOG_FULL; nothing is written', (t) => {
  const state = StateFile.open(memory(t), { small: appendLog(256, { keepBytes: 160 }), big: appendLog(256, { keepBytes: 48 }) });
  const { small, big } = state.structures;
  assert.equal(small.maxRecordBytes, 48, 'the room: (256 - 160 + 8) / 2, rounded down to 8');
  assert.equal(big.maxRecordBytes, 48, 'keepBytes: a larger record could never be kept');
  throwsCode(() => small.append(new Uint8Array(33)), 'ERR_STATE_RECORD_TOO_LARGE', '56 of 48 bytes (room)');
  throwsCode(() => big.append(new Uint8Array(33)), 'ERR_STATE_RECORD_TOO_LARGE', '56 of 48 bytes (keepBytes)');
  assert.equal(small.length, 0);
  for (let round = 0; round < 40; round++) {
    let appended = 0;
    let full;
    for (;;) {
      try {
        small.append(new Uint8Array(32).fill(round));
        appended++;
      } catch (err) {
        full = err;
        break;
      }
    }
    assert.equal(full.code, 'ERR_STATE_LOG_FULL');
    assert.match(full.message, /log small: .*commit more often/);
    assert.ok(appended >= 1, `round ${round}: a record of maxRecordBytes always fits after a commit`);
    state.commit();
    assert.ok(small.committedByteLength <= 160, 'the commit keeps at most keepBytes');
    assert.deepEqual([...small].at(-1), new Uint8Array(32).fill(round));
  }
  state.close();
});

test('retained log declarations are checked, and are part of the layout: another retention is ERR_STATE_LAYOUT_MISMATCH', (t) => {
  const file = memory(t);
  /** @type {Array<[import('../dist/index.js').AppendLogOptions, RegExp]>} */
  const cases = [
    [{ keepBytes: 100 }, /r: keepBytes must be a multiple of 8/],
    [{ keepBytes: 8 }, /r: keepBytes/],
    [{ keepBytes: 1024 - 16 }, /capacity less 24/],
    [{ keepRecords: 0 }, /r: keepRecords must be an integer from 1/],
    [{ keepRecords: 2 ** 32 }, /r: keepRecords/],
    [{ keepBytes: 512, keepRecords: 1.5 }, /r: keepRecords/],
  ];
  for (const [options, pattern] of cases) {
    assert.throws(() => StateFile.open(file, { r: appendLog(1024, options) }), { code: 'ERR_STATE_DECLARATION', message: pattern }, JSON.stringify(options));
  }
  assert.equal(file.size, 0);
  const a = StateFile.open(file, { r: appendLog(1024, { keepRecords: 3 }) });
  a.structures.r.append(enc('x'));
  a.commit();
  a.close();
  const before = Buffer.from(file.map().bytes);
  for (const other of [appendLog(1024), appendLog(1024, { keepRecords: 4 }), appendLog(1024, { keepBytes: 256, keepRecords: 3 })]) {
    assert.throws(() => StateFile.open(file, { r: other }), { code: 'ERR_STATE_LAYOUT_MISMATCH', message: /r is declared differently .*retention/ });
  }
  assert.ok(before.equals(Buffer.from(file.map().bytes)), 'the file is unchanged');
  const b = StateFile.open(file, { r: appendLog(1024, { keepBytes: 512, keepRecords: 3 }) });
  assert.deepEqual([...b.structures.r].map(dec), ['x'], 'the same retention spelled out opens it');
  b.close();
  // Logs without retention keep the directory (and so the payload hash) of files written
  // before retention existed.
  assert.equal(planLayout({ events: appendLog(4096), hits: counterSet(2) }).hash, 0x99c1f4060c7f5d7fn);
});

test('an iteration of a retained log that a commit overtakes is ERR_STATE_LOG_DROPPED; a damaged window is ERR_STATE_CORRUPT', (t) => {
  const file = memory(t);
  const decl = { r: appendLog(1024, { keepRecords: 2 }) };
  const state = StateFile.open(file, decl);
  const { r } = state.structures;
  for (const s of ['a', 'b']) r.append(enc(s));
  state.commit();
  const it = r.records();
  assert.equal(dec(it.next().value), 'a');
  r.append(enc('c'));
  assert.equal(dec(it.next().value), 'b', 'staging does not disturb an iteration');
  const again = r.records();
  again.next();
  state.commit(); // drops 'a'
  assert.equal(dec(it.next().value), 'c', 'an iteration ahead of the drops goes on, and sees the new commit');
  r.append(enc('d'));
  state.commit(); // drops 'b'
  throwsCode(() => again.next(), 'ERR_STATE_LOG_DROPPED', 'the iteration was at the dropped record b');
  const at = state.snapshotLayout.tailStart + state.layout.structures[0].offset + 3 * 24 + 8; // the index word of 'd', the window's second record
  state.close();
  const copy = copyOf(t, file);
  const mapping = copy.map();
  mapping.bytes[at] ^= 1;
  mapping.unmap();
  assert.throws(() => StateFile.open(copy, decl), { code: 'ERR_STATE_CORRUPT', message: /log r: record 1 of the window at stream byte 72/ });
});

// The retained logs' model check: random appends (some too large, some beyond the room),
// commits, discards, reopens of the same memfd and of copies in new memfds, against
// RingModel. Snapshots live up to 63 commits (the counter's copies), long enough for the
// small rings to come round to the bytes they name many times: after every operation
// every valid snapshot is decoded without the library and must name exactly the window
// committed with its sequence.
test('model check: retained logs under random operations, every valid snapshot intact after every operation', (t) => {
  const rng = seededRandom(SEED + 2);
  let file = memory(t);
  const decl = { a: appendLog(1024, { keepBytes: 512 }), b: appendLog(2048, { keepRecords: 7 }), n: counterSet(1, { copies: 64 }) };
  const options = { entries: 64, data: 8192 };
  const layout = planLayout(decl);
  let state = StateFile.open(file, decl, options);
  const models = { a: new RingModel(1024, 512), b: new RingModel(2048, 1024, 7) };
  const history = new Map([[0, { a: [], b: [] }]]);
  let seq = 0;
  const counts = { append: 0, tooLarge: 0, full: 0, commit: 0, discard: 0, reopen: 0, restore: 0, dropped: 0, checks: 0 };
  const committedBytes = { a: 0, b: 0 };

  function checkSnapshots(step) {
    const bytes = file.map().bytes;
    const found = new SnapshotFile(bytes).recover();
    for (const slot of found.valid()) {
      const p = new DataView(found.read(slot).buffer);
      const s = Number(p.getBigUint64(16, true));
      const want = history.get(s);
      assert.ok(want !== undefined, `step ${step}: a valid snapshot names sequence ${s}, never committed`);
      for (const [i, name] of ['a', 'b'].entries()) {
        const first = Number(p.getBigUint64(24 + 16 * i, true));
        const end = Number(p.getBigUint64(32 + 16 * i, true));
        const region = found.head.tailStart + layout.structures[i].offset;
        assert.deepEqual(decodeLogWindow(bytes, region, models[name].capacity, first, end, `step ${step}: seq ${s} log ${name}`), want[name], `step ${step}: seq ${s} log ${name}`);
      }
      assert.equal(p.getBigUint64(56, true), BigInt(s), `step ${step}: seq ${s} counter (cell version)`);
      counts.checks++;
    }
  }

  for (let step = 0; step < 4000; step++) {
    const op = rng.int(0, 99);
    const name = rng.int(0, 1) === 0 ? 'a' : 'b';
    const log = state.structures[name];
    const model = models[name];
    if (op < 62) {
      const big = rng.int(0, 9) === 0;
      const r = Uint8Array.from({ length: big ? rng.int(model.maxRecordBytes - 40, model.maxRecordBytes) : rng.int(0, 90) }, () => rng.int(0, 255));
      const want = model.append(r);
      if (want === 'too large') {
        assert.throws(() => log.append(r), { code: 'ERR_STATE_RECORD_TOO_LARGE' }, `step ${step}`);
        counts.tooLarge++;
      } else if (want === 'full') {
        assert.throws(() => log.append(r), { code: 'ERR_STATE_LOG_FULL' }, `step ${step}`);
        counts.full++;
      } else {
        assert.equal(log.append(r), want, `step ${step}: index`);
        counts.append++;
      }
    } else if (op < 80) {
      state.structures.n.set(0, seq + 1); // every commit publishes; the counter's version is its sequence
      state.commit();
      seq++;
      for (const [n, m] of Object.entries(models)) {
        committedBytes[n] += m.end - m.committed.end;
        m.commit();
      }
      history.set(seq, { a: models.a.window(), b: models.b.window() });
      counts.commit++;
    } else if (op < 83) {
      assert.equal(log.discard(), model.pending.length);
      model.pending = [];
      counts.discard++;
    } else if (op < 87) {
      // An iteration overtaken by a commit that drops the record it is at.
      const it = log.records();
      it.next();
      const before = model.committed.firstIndex;
      state.structures.n.set(0, seq + 1);
      state.commit();
      seq++;
      for (const m of Object.values(models)) m.commit();
      history.set(seq, { a: models.a.window(), b: models.b.window() });
      if (model.committed.firstIndex > before + 1) {
        assert.throws(() => it.next(), { code: 'ERR_STATE_LOG_DROPPED' }, `step ${step}`);
        counts.dropped++;
      }
    } else {
      const restore = op >= 96;
      state.close();
      if (restore) file = copyOf(t, file);
      state = StateFile.open(file, decl, options);
      for (const m of Object.values(models)) m.pending = [];
      counts[restore ? 'restore' : 'reopen']++;
    }
    checkSnapshots(step);
    for (const [n, m] of Object.entries(models)) {
      const l = state.structures[n];
      assert.deepEqual([...l.records()].map((r, i) => [l.firstIndex + i, hex(r)]), m.window(), `step ${step}: log ${n} committed records`);
      assert.deepEqual([...l.pendingRecords()].map(hex), m.pending.map((r) => r.hex), `step ${step}: log ${n} pending records`);
      assert.equal(l.firstIndex, m.committed.firstIndex, `step ${step}: log ${n} firstIndex`);
      assert.equal(l.length, m.next, `step ${step}: log ${n} length`);
      assert.equal(l.committedByteLength, m.committed.end - m.committed.first, `step ${step}: log ${n} committedByteLength`);
    }
  }
  state.close();
  t.diagnostic(`seed ${SEED + 2}: ${JSON.stringify(counts)}, bytes committed ${JSON.stringify(committedBytes)}`);
  assert.ok(committedBytes.a > 30 * 1024 && committedBytes.b > 20 * 2048, 'the rings wrapped many times');
  assert.ok(counts.tooLarge > 0 && counts.full > 0 && counts.restore > 20 && counts.dropped > 0, 'the run exercised the limits, restores and overtaken iterations');
});
