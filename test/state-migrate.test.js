// Migrations of a state file to other declarations, in one process over a real memfd:
// every structure kind copied into a new layout (added, removed, resized, retyped), the
// old state read as the file's directory describes it, a migration that throws or shrinks
// a structure below its contents (old state kept byte for byte, the next open retries),
// no migration (ERR_STATE_LAYOUT_MISMATCH as before), layouts placed after, then before,
// an older one, and the worked example of docs/state.md.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { MemoryFile, StateFile, appendLog, counterSet, keyValueMap, versionedCell } from 'shmfd';
import { SnapshotFile } from 'shmfd/snapshot';
import { cleanEnv, NODE, ROOT, run } from './helpers.js';

const enc = (s) => new TextEncoder().encode(s);
const dec = (b) => new TextDecoder().decode(b);

function memory(t) {
  const file = MemoryFile.create('state-migrate-test');
  t.after(() => file.close());
  return file;
}

/** @returns {any} the error `fn` throws, after checking its code */
function throwsCode(fn, code, what) {
  try {
    fn();
  } catch (err) {
    assert.equal(err.code, code, `${what}: ${err.message}`);
    return err;
  }
  assert.fail(`${what}: nothing thrown`);
}

const V1 = () => ({
  events: appendLog(4096),
  gauge: versionedCell(Float64Array, 2),
  hits: counterSet(2),
  sessions: keyValueMap({ maxBytes: 1 << 16 }),
  scratch: appendLog(1024),
});

const V2 = () => ({
  added: counterSet(1),
  hits: counterSet(3, { copies: 4 }),
  sessions: keyValueMap({ maxBytes: 1 << 17 }),
  gauge: versionedCell(Float32Array, 3),
  events: appendLog(8192),
});

/** Writes a v1 state: 3 commits, so that several snapshots are valid. */
function writeV1(file) {
  const a = StateFile.open(file, V1());
  const { events, gauge, hits, sessions, scratch } = a.structures;
  for (let i = 0; i < 40; i++) events.append(enc(`event ${i}`));
  scratch.append(enc('dropped by v2'));
  gauge.stage((g) => g.set([1.5, -2]));
  hits.add(0, 7n);
  hits.add(1, 9n);
  for (let i = 0; i < 50; i++) sessions.set(`user:${i}`, enc(`session ${i}`));
  a.commit();
  sessions.delete('user:3');
  a.commit();
  hits.add(0, 1n);
  a.commit();
  const sequence = a.sequence;
  a.close();
  return sequence;
}

/** A migration from V1 to V2 that copies everything, converting where the kinds changed. */
function v1ToV2(old, next) {
  assert.deepEqual(Object.keys(old), ['events', 'gauge', 'hits', 'sessions', 'scratch'], 'old gives the structures the directory records');
  for (const r of old.events) next.events.append(enc(dec(r).toUpperCase()));
  next.gauge.stage((g) => g.set([...old.gauge.value, 42]));
  old.hits.values().forEach((v, i) => next.hits.set(i, v));
  next.hits.set(2, BigInt(old.scratch.length));
  for (const [key, value] of old.sessions) next.sessions.set(key, value);
  next.added.add(0, 1n);
}

function checkV2(state, what) {
  const { events, gauge, hits, sessions, added } = state.structures;
  assert.deepEqual([...events].map(dec), Array.from({ length: 40 }, (_, i) => `EVENT ${i}`), `${what}: log`);
  assert.deepEqual([...gauge.value], [1.5, -2, 42], `${what}: retyped cell`);
  assert.ok(gauge.value instanceof Float32Array);
  assert.deepEqual(hits.values(), [8n, 9n, 1n], `${what}: counters`);
  assert.equal(added.get(0), 1n, `${what}: added counter set`);
  assert.equal(sessions.size, 49, `${what}: map size`);
  assert.equal(sessions.get('user:3'), undefined);
  assert.equal(dec(sessions.get('user:49')), 'session 49', `${what}: map entry`);
  assert.equal('scratch' in state.structures, false);
}

function checkV1(file, sequence, what) {
  const s = StateFile.open(file, V1());
  try {
    assert.equal(s.sequence, sequence, `${what}: the old state is the committed one`);
    assert.equal(s.migrated, false);
    assert.equal(s.structures.events.length, 40);
    assert.deepEqual(s.structures.hits.values(), [8n, 9n]);
    assert.equal(s.structures.sessions.size, 49);
    assert.equal(dec(s.structures.scratch.records().next().value), 'dropped by v2');
  } finally {
    s.close();
  }
}

function v1Layout(file) {
  const s = StateFile.open(file, V1());
  s.close();
  return s.layout;
}

/** The bytes a committed state consists of: head, slots, ring and the old layout's regions. */
function oldBytes(file, layout) {
  const m = file.map();
  try {
    const head = new SnapshotFile(m.bytes).recover().head;
    return Buffer.from(m.bytes.subarray(0, head.tailStart + layout.tailBytes));
  } finally {
    m.unmap();
  }
}

test('a migration adds, removes, resizes and retypes structures of every kind, with one commit', (t) => {
  const file = memory(t);
  const sequence = writeV1(file);
  let calls = 0;
  const b = StateFile.open(file, V2(), {
    migrate(old, next) {
      calls++;
      assert.equal(next.events.length, 0, 'next starts empty');
      assert.equal(next.sessions.size, 0);
      v1ToV2(old, next);
    },
  });
  assert.equal(calls, 1);
  assert.equal(b.migrated, true);
  assert.equal(b.recovered, true);
  assert.equal(b.sequence, sequence + 1, 'the migration is the next commit');
  assert.equal(b.dirty, false, 'the migration is committed');
  assert.ok(b.layout.base > 0, 'the new layout lies after the old one');
  checkV2(b, 'after the migration');
  b.structures.events.append(enc('after'));
  b.commit();
  b.close();

  const c = StateFile.open(file, V2(), { migrate: () => assert.fail('the file already holds the new declarations') });
  assert.equal(c.migrated, false);
  assert.equal(c.sequence, sequence + 2);
  assert.equal(c.structures.sessions.rebuilt, false, 'the map index built during the migration is reused');
  assert.equal(dec([...c.structures.events].at(-1)), 'after');
  c.close();

  throwsCode(() => StateFile.open(file, V1()), 'ERR_STATE_LAYOUT_MISMATCH', 'the old declarations without a migration');
});

test('a migrated state round-trips through a copy in a new memfd (as restore-v1 restores it)', (t) => {
  const file = memory(t);
  writeV1(file);
  StateFile.open(file, V2(), { migrate: v1ToV2 }).close();
  const m = file.map();
  const copy = memory(t);
  copy.grow(m.bytes.length);
  const cm = copy.map();
  cm.bytes.set(m.bytes);
  cm.unmap();
  m.unmap();
  const s = StateFile.open(copy, V2());
  assert.equal(s.structures.sessions.rebuilt, true);
  checkV2(s, 'the copy');
  s.close();
});

test('no migration: other declarations are ERR_STATE_LAYOUT_MISMATCH, the file untouched', (t) => {
  const file = memory(t);
  writeV1(file);
  const size = file.size;
  const before = oldBytes(file, v1Layout(file));
  const err = throwsCode(() => StateFile.open(file, V2()), 'ERR_STATE_LAYOUT_MISMATCH', 'no migrate');
  assert.match(err.message, /another layout/);
  assert.equal(file.size, size);
  assert.deepEqual(oldBytes(file, v1Layout(file)), before);
});

test('a migration that throws keeps the old state byte for byte; the next open migrates again', (t) => {
  const file = memory(t);
  const sequence = writeV1(file);
  const layout = v1Layout(file);
  const before = oldBytes(file, layout);
  const boom = new Error('boom');
  const err = throwsCode(
    () =>
      StateFile.open(file, V2(), {
        migrate(old, next) {
          v1ToV2(old, next);
          throw boom;
        },
      }),
    'ERR_STATE_MIGRATION_FAILED',
    'a throwing migration',
  );
  assert.equal(err.cause, boom, 'the cause is attached');
  assert.match(err.message, /boom/);
  assert.match(err.message, /old state is kept/);
  assert.deepEqual(oldBytes(file, layout), before, 'head, slots, ring and old regions are unchanged');
  checkV1(file, sequence, 'after the failed migration');

  const b = StateFile.open(file, V2(), { migrate: v1ToV2 });
  assert.equal(b.migrated, true);
  checkV2(b, 'the retry');
  b.close();
});

test('the old state is read only, and a migration cannot commit', (t) => {
  const file = memory(t);
  const sequence = writeV1(file);
  const layout = v1Layout(file);
  const before = oldBytes(file, layout);
  const attempts = [
    (old) => old.events.append(enc('x')),
    (old) => old.gauge.stage((g) => (g[0] = 1)),
    (old) => old.hits.add(0),
    (old) => old.sessions.set('k', enc('v')),
    (old) => old.sessions.clear(),
    (_, next) => {
      next.events.append(enc('x'));
      next.events.commit();
    },
  ];
  for (const [i, attempt] of attempts.entries()) {
    const err = throwsCode(() => StateFile.open(file, V2(), { migrate: attempt }), 'ERR_STATE_MIGRATION_FAILED', `attempt ${i}`);
    assert.equal(err.cause.code, 'ERR_STATE_READ_ONLY', `attempt ${i}: ${err.cause.message}`);
    // A refused append or stage may have written bytes no valid snapshot names (past a
    // log's committed end, a cell copy no snapshot names): the snapshots and the directory
    // stay byte for byte, and the state they name is the old one.
    const head = new SnapshotFile(before).recover().head;
    const kept = head.tailStart + 4096;
    assert.deepEqual(oldBytes(file, layout).subarray(0, kept), before.subarray(0, kept), `attempt ${i}: no snapshot changed`);
    checkV1(file, sequence, `attempt ${i}`);
  }
  checkV1(file, sequence, 'after the refused changes');
});

test('shrinking a structure below its contents: a stable code with or without a migration, nothing lost', (t) => {
  const file = memory(t);
  const sequence = writeV1(file);
  const small = () => ({ ...V1(), events: appendLog(256) });
  throwsCode(() => StateFile.open(file, small()), 'ERR_STATE_LAYOUT_MISMATCH', 'without a migration');
  const err = throwsCode(
    () =>
      StateFile.open(file, small(), {
        migrate(old, next) {
          for (const r of /** @type {import('shmfd').AppendLog} */ (old.events)) next.events.append(r);
        },
      }),
    'ERR_STATE_MIGRATION_FAILED',
    'a migration copying 40 records into 256 bytes',
  );
  assert.equal(err.cause.code, 'ERR_STATE_LOG_FULL');
  checkV1(file, sequence, 'after the refused shrink');
});

test('successive migrations place each layout where the previous one is not, reusing freed space', (t) => {
  const file = memory(t);
  const a = StateFile.open(file, { big: appendLog(64 * 4096) });
  for (let i = 0; i < 10; i++) a.structures.big.append(enc(`r${i}`));
  a.commit();
  a.close();
  const copyLog = (from) => (old, next) => {
    for (const r of /** @type {import('shmfd').AppendLog} */ (old[from])) next.log.append(r);
  };
  const b = StateFile.open(file, { log: appendLog(8 * 4096) }, { migrate: copyLog('big') });
  assert.equal(b.layout.base, 65 * 4096, 'after the first layout');
  b.close();
  // Fits before the current layout (where the first one was): goes there.
  const c = StateFile.open(file, { log: appendLog(16 * 4096), n: counterSet(1) }, { migrate: copyLog('log') });
  assert.equal(c.layout.base, 0, 'back at the start of the tail');
  c.close();
  // Does not fit before the current one (which starts at 0): after it.
  const d = StateFile.open(file, { log: appendLog(8 * 4096) }, { migrate: copyLog('log') });
  assert.equal(d.layout.base, c.layout.tailBytes);
  assert.deepEqual([...d.structures.log].map(dec), Array.from({ length: 10 }, (_, i) => `r${i}`));
  d.close();
  const e = StateFile.open(file, { log: appendLog(8 * 4096) });
  assert.deepEqual([...e.structures.log].map(dec), Array.from({ length: 10 }, (_, i) => `r${i}`), 'reopened without a migration');
  e.close();
});

test('the worked example of docs/state.md runs as written and prints what its comments say', async (t) => {
  const text = fs.readFileSync(path.join(ROOT, 'docs', 'state.md'), 'utf8');
  const code = /\*\*Worked example\.\*\*[\s\S]*?```js\n([\s\S]*?)```/.exec(text)?.[1];
  assert.ok(code, 'docs/state.md has the worked example');
  // Inside the package, so that `import ... from 'shmfd'` resolves to this checkout.
  const dir = fs.mkdtempSync(path.join(ROOT, 'test', '.state-example-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  const file = path.join(dir, 'upgrade.mjs');
  fs.writeFileSync(file, code);
  const r = await run(NODE, [file], { env: cleanEnv() });
  assert.equal(r.code, 0, r.stderr);
  assert.equal(r.stderr, '');
  const expected = [...code.matchAll(/console\.log\(.*\/\/ (.*)$/gm)].map((m) => m[1].trim());
  assert.equal(expected.length, 4);
  assert.deepEqual(r.stdout.trim().split('\n'), expected);
});

test('new declarations whose payload the file\'s snapshot ring cannot hold twice: ERR_STATE_LAYOUT_MISMATCH, untouched', (t) => {
  const file = memory(t);
  const a = StateFile.open(file, { l: appendLog(64) }, { entries: 2, data: 128 });
  a.structures.l.append(enc('kept'));
  a.commit();
  a.close();
  const size = file.size;
  let called = false;
  const err = throwsCode(
    () => StateFile.open(file, { l: appendLog(64), a: counterSet(1), b: counterSet(1), c: counterSet(1) }, { migrate: () => (called = true) }),
    'ERR_STATE_LAYOUT_MISMATCH',
    'a 96-byte payload in a 128-byte ring',
  );
  assert.match(err.message, /needs a data ring of at least twice that \(192\), got 128/);
  assert.equal(called, false, 'the migration does not run');
  assert.equal(file.size, size);
  const b = StateFile.open(file, { l: appendLog(64) });
  assert.equal(dec([...b.structures.l][0]), 'kept');
  b.close();
});

test('a retained log is read in a migration as its directory declares it: the kept records, their indexes', (t) => {
  const file = memory(t);
  const v1 = () => ({ events: appendLog(1024, { keepRecords: 5 }) });
  const a = StateFile.open(file, v1());
  for (let i = 0; i < 300; i++) {
    a.structures.events.append(enc(`event ${i}`));
    a.commit();
  }
  a.close();
  let seen = { first: -1, records: /** @type {string[]} */ ([]) };
  const b = StateFile.open(file, { events: appendLog(4096), total: counterSet(1) }, {
    migrate(old, next) {
      const events = /** @type {import('shmfd').AppendLog} */ (old.events);
      seen = { first: events.firstIndex, records: [...events].map(dec) };
      for (const record of events) next.events.append(record);
      next.total.add(0, BigInt(events.firstIndex + seen.records.length));
    },
  });
  assert.deepEqual(seen, { first: 295, records: [295, 296, 297, 298, 299].map((i) => `event ${i}`) }, 'the old log keeps its newest 5 records after wrapping');
  assert.deepEqual([...b.structures.events].map(dec), seen.records);
  assert.equal(b.structures.total.get(0), 300n);
  b.close();
});
