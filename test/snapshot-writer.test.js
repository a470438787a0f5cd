// The snapshot API over mapped memory (src/snapshot): configuration, recovery, the
// corrected writer protocol, commitWith, and a randomized run against a model that checks
// that every slot claiming validity holds exactly the bytes committed for it.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { ConfigureFile, PAGE, SnapshotFile, SnapshotFormatError, parseHead, readSlots } from 'shmfd/snapshot';
import { HEAD, MAGIC, slotPosition } from '../dist/snapshot/format.js';
import { FileDiscovery } from '../dist/snapshot/file.js';
import { SnapshotWriter } from '../dist/snapshot/writer.js';
import { seededRandom } from './helpers.js';

/** A deterministic PRNG, so a failing random case can be replayed. */
const prng = (seed) => seededRandom(seed).next;

const enc = (s) => new TextEncoder().encode(s);
const dec = (b) => new TextDecoder().decode(b);

function u64At(bytes, position) {
  return new DataView(bytes.buffer, bytes.byteOffset).getBigUint64(position, true);
}

function slotAt(bytes, index) {
  return { offset: u64At(bytes, slotPosition(index)), length: u64At(bytes, slotPosition(index) + 8) };
}

function throwsCode(fn, code, what) {
  assert.throws(fn, (err) => {
    assert.ok(err instanceof SnapshotFormatError, `${what}: expected a SnapshotFormatError, got ${err}`);
    assert.equal(err.code, code, `${what}: ${err.message}`);
    return true;
  });
}

test('configuration: the Rust flow (recover into a ConfigureFile, orInsertWith, configure) on a new and on an existing file', () => {
  const bytes = new Uint8Array(8 * PAGE);
  const first = new ConfigureFile();
  assert.equal(new SnapshotFile(bytes).recover(first), undefined, 'a zero file is not configured');
  assert.equal(first.isInitialized(), false, 'recover leaves the configuration empty');
  first.orInsertWith((c) => {
    c.entries = 0x100;
    c.data = 0x800;
  });
  assert.equal(first.isInitialized(), true);
  const writer = new SnapshotFile(bytes).configure(first);
  writer.commit(enc('one'));

  const second = new ConfigureFile();
  const found = new SnapshotFile(bytes).recover(second);
  assert.ok(found);
  assert.deepEqual({ ...second, initialized: second.isInitialized() }, { entries: 0x100, data: 0x800, initialOffset: 3, initialized: true });
  let called = false;
  second.orInsertWith(() => {
    called = true;
  });
  assert.equal(called, false, 'orInsertWith leaves a discovered configuration alone');
  assert.deepEqual(second.orInsert({ entries: 2, data: 4 }).entries, 0x100);
  assert.deepEqual(found.configuration.entries, 0x100);
});

test('configuration: invalid or empty configurations and too-small files are typed errors', () => {
  const file = new SnapshotFile(new Uint8Array(8 * PAGE));
  throwsCode(() => file.configure(new ConfigureFile()), 'ERR_SNAPSHOT_NOT_CONFIGURED', 'an empty ConfigureFile');
  throwsCode(() => file.intoWriter(), 'ERR_SNAPSHOT_NOT_CONFIGURED', 'intoWriter on an unconfigured file');
  for (const bad of [{ entries: 3, data: 64 }, { entries: 0, data: 64 }, { entries: 4, data: 1 }, { entries: 4, data: 100 }, { entries: 4, data: 64, initialOffset: -1 }, { entries: 4, data: 64, initialOffset: 2 ** 53 }, { entries: 4, data: 2 ** 33 }, { entries: 2 ** 21, data: 64 }]) {
    throwsCode(() => file.configure(bad), 'ERR_SNAPSHOT_BAD_CONFIG', JSON.stringify(bad));
  }
  throwsCode(() => file.configure({ entries: 4, data: 8 * PAGE }), 'ERR_SNAPSHOT_TOO_SMALL', 'a ring bigger than the file');
  throwsCode(() => new SnapshotFile(new Uint8Array(2 * PAGE)).configure({ entries: 1, data: 2 }), 'ERR_SNAPSHOT_TOO_SMALL', 'two pages');
  assert.ok(new SnapshotFile(new Uint8Array(3 * PAGE)).configure({ entries: 1, data: 2 }), 'three pages are the minimum');
  throwsCode(() => new SnapshotFile(new Uint8Array(new ArrayBuffer(8 * PAGE), 4)), 'ERR_SNAPSHOT_ALIGNMENT', 'unaligned memory');
  assert.equal(u64At(file.bytes, 0), 0n, 'failed configurations leave the file alone');
});

test('configure: a different layout first clears the sequence region, so garbage never turns into snapshots', () => {
  const bytes = new Uint8Array(8 * PAGE).fill(0x5a); // garbage everywhere, lengths included
  const writer = new SnapshotFile(bytes).configure({ entries: 16, data: 1024 });
  assert.deepEqual(writer.valid(), []);
  assert.equal(u64At(bytes, 0), MAGIC);
  writer.commit(enc('kept'));
  // Same layout again: the snapshot survives.
  assert.deepEqual(new SnapshotFile(bytes).configure({ entries: 16, data: 1024 }).valid(), [{ index: 0, offset: 0, length: 4 }]);
  // Another layout: it does not.
  assert.deepEqual(new SnapshotFile(bytes).configure({ entries: 32, data: 1024 }).valid(), []);
  assert.equal(u64At(bytes, 8), 31n);
});

test('configure: a different layout continues the stream past the old one, so a reader holding an old snapshot sees it is gone', () => {
  const bytes = new Uint8Array(8 * PAGE);
  const first = new SnapshotFile(bytes).configure({ entries: 16, data: 1024 });
  first.commit(enc('aaaaaaaa'));
  const reader = new SnapshotFile(bytes).recover();
  const held = reader.newest();
  assert.deepEqual(held, { index: 0, offset: 0, length: 8 });
  // Same slot count, another ring: slot 0 again, but not stream position 0 again.
  const second = new SnapshotFile(bytes).configure({ entries: 16, data: 2048 });
  assert.equal(second.writeOffset, 8);
  second.commit(enc('bbbbbbbb'));
  assert.equal(reader.isCurrent(held), false);
});

test('stream positions near 2^53: the writer stops at the bound parseHead accepts, so its file stays readable', () => {
  const bytes = new Uint8Array(8 * PAGE);
  const data = 1024;
  const top = Number.MAX_SAFE_INTEGER - data;
  const writer = new SnapshotFile(bytes).configure({ entries: 16, data, initialOffset: top - 3 });
  writer.commit(enc('abc'));
  assert.equal(writer.writeOffset, top);
  throwsCode(() => writer.commit(enc('d')), 'ERR_SNAPSHOT_BAD_OFFSET', 'one byte past the bound');
  const found = new SnapshotFile(bytes).recover();
  assert.equal(dec(found.read(found.newest())), 'abc');
  assert.equal(new SnapshotFile(bytes).intoWriter().writeOffset, top);
});

test('round trip: snapshots committed are recovered, in order and byte for byte, by a new object over the same memory', () => {
  const bytes = new Uint8Array(8 * PAGE);
  const writer = new SnapshotFile(bytes).configure({ entries: 8, data: 4096 });
  const payloads = ['alpha', 'beta', 'gamma', 'delta'].map(enc);
  const indices = payloads.map((p) => writer.commit(p));
  assert.deepEqual(indices, [0, 1, 2, 3]);

  const found = new SnapshotFile(bytes).recover();
  const valid = found.valid();
  assert.deepEqual(valid.map((s) => [s.index, s.offset, s.length]), [[0, 0, 5], [1, 5, 4], [2, 9, 5], [3, 14, 5]]);
  assert.deepEqual(valid.map((s) => dec(found.read(s))), ['alpha', 'beta', 'gamma', 'delta']);
  assert.deepEqual(found.newest(), { index: 3, offset: 14, length: 5 });
  assert.deepEqual(writer.valid(), valid, 'the writer lists the same snapshots');
  assert.deepEqual(writer.snapshotAt(2), { index: 2, offset: 9, length: 5 });
  assert.equal(writer.snapshotAt(5), undefined);
  assert.equal(writer.snapshotAt(99), undefined);
});

test('reopen: a new writer continues at write_offset and in the slot after the newest snapshot', () => {
  const bytes = new Uint8Array(8 * PAGE);
  const first = new SnapshotFile(bytes).configure({ entries: 4, data: 64 });
  for (const s of ['aaaa', 'bbbb', 'cccc', 'dddd', 'eeee', 'ffff']) first.commit(enc(s)); // slots 0 1 2 3 0 1
  const again = new SnapshotFile(bytes).intoWriter();
  assert.equal(again.writeOffset, 24);
  assert.equal(again.nextIndex, 2);
  assert.equal(again.commit(enc('gggg')), 2);
  assert.deepEqual(slotAt(bytes, 2), { offset: 24n, length: 4n });
  assert.equal(dec(bytes.subarray(2 * PAGE + 24, 2 * PAGE + 28)), 'gggg');
  assert.deepEqual(again.valid().map((s) => dec(again.read(s))), ['dddd', 'eeee', 'ffff', 'gggg'], 'slot 2 (cccc) was reused');
  // configure() with the discovered configuration is the same as intoWriter().
  const config = new ConfigureFile();
  const file = new SnapshotFile(bytes);
  file.recover(config);
  const third = file.configure(config);
  assert.equal(third.nextIndex, 3);
  assert.equal(third.writeOffset, 28);
});

test('ring wrap: a commit invalidates exactly the snapshots whose bytes it overwrites, and the slot it reuses', () => {
  const bytes = new Uint8Array(8 * PAGE);
  const writer = new SnapshotFile(bytes).configure({ entries: 16, data: 64 });
  for (let i = 0; i < 4; i++) writer.commit(new Uint8Array(15).fill(i)); // 0..59
  writer.commit(new Uint8Array(20).fill(9)); // 60..79 overwrites stream 0..15 → slots 0 (0..14) and 1 (15..29)
  assert.deepEqual(writer.valid().map((s) => s.index), [2, 3, 4]);
  assert.equal(slotAt(bytes, 0).length, 0n);
  assert.equal(slotAt(bytes, 1).length, 0n);
  assert.deepEqual([...writer.read(writer.snapshotAt(2))], new Array(15).fill(2));
  assert.deepEqual([...writer.read(writer.snapshotAt(4))], new Array(20).fill(9));
  // A snapshot ending exactly where the next write's overwrite begins survives.
  writer.commit(new Uint8Array(10).fill(7)); // 80..89: overwrites stream 16..25, slot 2 is 30..44
  assert.deepEqual(writer.valid().map((s) => s.index), [2, 3, 4, 5]);
});

test('commitWith: the step runs after invalidation and the data write, before write_offset and the slot are stored', () => {
  const bytes = new Uint8Array(8 * PAGE);
  const writer = new SnapshotFile(bytes).configure({ entries: 8, data: 64 });
  for (let i = 0; i < 4; i++) writer.commit(new Uint8Array(15).fill(i)); // slots 0..3 at 0, 15, 30, 45
  const seen = writer.commitWith(new Uint8Array(20).fill(0xab), (tx) => {
    assert.deepEqual([tx.index, tx.offset, tx.length], [4, 60, 20]);
    assert.equal(slotAt(bytes, 0).length, 0n, 'overlapped slot 0 already invalidated');
    assert.equal(slotAt(bytes, 1).length, 0n, 'overlapped slot 1 already invalidated');
    assert.equal(slotAt(bytes, 2).length, 15n, 'slot 2 is not overlapped');
    assert.equal(slotAt(bytes, 4).length, 0n, 'not yet published');
    assert.equal(u64At(bytes, 24), 60n, 'write_offset not yet stored');
    assert.deepEqual([...bytes.subarray(2 * PAGE + 60, 2 * PAGE + 64)], [0xab, 0xab, 0xab, 0xab], 'payload written before the wrap');
    assert.deepEqual([...bytes.subarray(2 * PAGE, 2 * PAGE + 16)], new Array(16).fill(0xab), 'and after it');
    return 'value';
  });
  assert.deepEqual(seen, { index: 4, value: 'value' });
  assert.deepEqual(slotAt(bytes, 4), { offset: 60n, length: 20n });
  assert.equal(u64At(bytes, 24), 80n);
});

test('commitWith: the reused slot is emptied before the step runs', () => {
  const bytes = new Uint8Array(8 * PAGE);
  const writer = new SnapshotFile(bytes).configure({ entries: 2, data: 1024 });
  writer.commit(enc('a'));
  writer.commit(enc('b'));
  writer.commitWith(enc('c'), (tx) => {
    assert.equal(tx.index, 0);
    assert.equal(slotAt(bytes, 0).length, 0n, 'slot 0 is being reused');
    assert.equal(slotAt(bytes, 1).length, 1n);
  });
  assert.deepEqual(writer.valid().map((s) => dec(writer.read(s))), ['b', 'c']);
});

test('commitWith: replace rewrites the payload in place (never longer), and the tail is reachable', () => {
  const bytes = new Uint8Array(8 * PAGE);
  const writer = new SnapshotFile(bytes).configure({ entries: 8, data: 64 });
  const result = writer.commitWith(enc('12345678'), (tx) => {
    tx.replace(enc('ab'));
    throwsCode(() => tx.replace(enc('123456789')), 'ERR_SNAPSHOT_PAYLOAD_SIZE', 'a longer replacement');
    assert.equal(tx.tail, writer.tail);
    assert.equal(tx.tailU64, writer.tailU64);
    tx.tailU64[0] = 0x0102030405060708n;
    tx.tail[100] = 42;
    return tx.tailU64.length;
  });
  assert.equal(result.value, (8 * PAGE - 3 * PAGE) / 8);
  assert.equal(dec(writer.read(writer.newest())), 'ab345678');
  assert.deepEqual([...bytes.subarray(3 * PAGE, 3 * PAGE + 8)], [8, 7, 6, 5, 4, 3, 2, 1], 'tail words are little-endian u64 at tail_start');
  assert.equal(bytes[3 * PAGE + 100], 42);
  // Replacement across the ring end.
  const wrapping = new SnapshotFile(new Uint8Array(8 * PAGE)).configure({ entries: 8, data: 64, initialOffset: 62 });
  wrapping.commitWith(enc('....'), (tx) => tx.replace(enc('WXY')));
  assert.equal(dec(wrapping.read(wrapping.newest())), 'WXY.');
});

test('commitWith: abort (or a throwing step) leaves the slot empty and the next commit takes its place', () => {
  const bytes = new Uint8Array(8 * PAGE);
  const writer = new SnapshotFile(bytes).configure({ entries: 4, data: 64 });
  writer.commit(enc('first'));
  assert.equal(writer.commitWith(enc('dropped'), (tx) => tx.abort()), undefined);
  assert.equal(slotAt(bytes, 1).length, 0n);
  assert.equal(u64At(bytes, 24), 5n, 'write_offset unchanged');
  assert.throws(() => writer.commitWith(enc('thrown'), () => {
    throw new Error('step failed');
  }), /step failed/);
  assert.equal(slotAt(bytes, 1).length, 0n);
  assert.deepEqual([writer.nextIndex, writer.writeOffset], [1, 5]);
  assert.equal(writer.commit(enc('second')), 1);
  assert.deepEqual(writer.valid().map((s) => dec(writer.read(s))), ['first', 'second']);
  assert.equal(new SnapshotFile(bytes).intoWriter().nextIndex, 2);
});

test('commitWith: the transaction is unusable after its step, and commits cannot nest', () => {
  const writer = new SnapshotFile(new Uint8Array(8 * PAGE)).configure({ entries: 4, data: 64 });
  let kept;
  writer.commitWith(enc('x'), (tx) => {
    kept = tx;
    throwsCode(() => writer.commit(enc('nested')), 'ERR_SNAPSHOT_BUSY', 'commit inside a step');
    throwsCode(() => writer.commitWith(enc('nested'), () => 0), 'ERR_SNAPSHOT_BUSY', 'commitWith inside a step');
  });
  throwsCode(() => kept.replace(enc('y')), 'ERR_SNAPSHOT_TRANSACTION_CLOSED', 'replace afterwards');
  throwsCode(() => kept.abort(), 'ERR_SNAPSHOT_TRANSACTION_CLOSED', 'abort afterwards');
  throwsCode(() => kept.tail, 'ERR_SNAPSHOT_TRANSACTION_CLOSED', 'tail afterwards');
  assert.equal(writer.valid().length, 1, 'the nested attempts published nothing');
});

test('payload size: 1 to data - 1 bytes; read checks its snapshot and buffer', () => {
  const writer = new SnapshotFile(new Uint8Array(8 * PAGE)).configure({ entries: 4, data: 64 });
  throwsCode(() => writer.commit(new Uint8Array(0)), 'ERR_SNAPSHOT_PAYLOAD_SIZE', 'empty');
  throwsCode(() => writer.commit(new Uint8Array(64)), 'ERR_SNAPSHOT_PAYLOAD_SIZE', 'data bytes');
  throwsCode(() => writer.commitWith(new Uint8Array(64), () => 0), 'ERR_SNAPSHOT_PAYLOAD_SIZE', 'data bytes via commitWith');
  const big = new Uint8Array(63).map((_, i) => i);
  writer.commit(big);
  assert.deepEqual(writer.read(writer.newest()), big);
  const into = new Uint8Array(100);
  const out = writer.read(writer.newest(), into);
  assert.equal(out.buffer, into.buffer);
  assert.deepEqual(out, big);
  throwsCode(() => writer.read(writer.newest(), new Uint8Array(10)), 'ERR_SNAPSHOT_PAYLOAD_SIZE', 'a short buffer');
  for (const bad of [{ offset: 0, length: 0 }, { offset: 0, length: 64 }, { offset: -1, length: 4 }, { offset: 2 ** 53, length: 4 }, { offset: 0.5, length: 4 }]) {
    throwsCode(() => writer.read(bad), 'ERR_SNAPSHOT_BAD_SNAPSHOT', JSON.stringify(bad));
  }
});

test('discovery: invalidate and retain drop snapshots a caller no longer trusts, and the writer steps over the holes', () => {
  const bytes = new Uint8Array(8 * PAGE);
  const writer = new SnapshotFile(bytes).configure({ entries: 8, data: 1024 });
  for (const s of ['a', 'b', 'c', 'd', 'e']) writer.commit(enc(s));
  const found = new SnapshotFile(bytes).recover();
  const [a, b, c] = found.valid();
  assert.equal(found.invalidate(b), true);
  assert.equal(found.invalidate(b), false, 'already gone');
  assert.equal(found.isCurrent(a), true);
  assert.equal(found.isCurrent(b), false);
  assert.equal(found.invalidate({ ...c, offset: c.offset + 1 }), false, 'a different snapshot in the same slot is left alone');
  assert.equal(found.retain((s) => s.index !== 3), 1);
  assert.deepEqual(found.valid().map((s) => dec(found.read(s))), ['a', 'c', 'e']);
  // The writer sees the holes and keeps going.
  assert.deepEqual(writer.valid().map((s) => s.index), [0, 2, 4]);
  const reopened = new SnapshotFile(bytes).intoWriter();
  for (const s of ['f', 'g', 'h', 'i']) reopened.commit(enc(s)); // slots 5 6 7 0
  assert.deepEqual(reopened.valid().map((s) => dec(reopened.read(s))), ['c', 'e', 'f', 'g', 'h', 'i']);
});

test('reader API: a recovered file and its writer read snapshots through one implementation, with the same answers', () => {
  for (const method of ['read', 'isCurrent']) {
    assert.equal(FileDiscovery.prototype[method], SnapshotWriter.prototype[method], `${method} is written once`);
  }
  const bytes = new Uint8Array(8 * PAGE);
  const writer = new SnapshotFile(bytes).configure({ entries: 4, data: 64 });
  for (const s of ['one', 'two', 'three']) writer.commit(enc(s));
  const found = new SnapshotFile(bytes).recover();
  assert.deepEqual(found.valid(), writer.valid());
  assert.deepEqual(found.newest(), writer.newest());
  assert.equal(dec(found.read(found.newest())), 'three');
  assert.equal(dec(writer.read(writer.newest())), 'three');
  const first = found.valid()[0];
  // Eight commits of 20 bytes wrap the 64-byte ring: the first snapshot is overwritten.
  for (let i = 0; i < 8; i++) writer.commit(new Uint8Array(20).fill(i + 1));
  assert.equal(found.isCurrent(first), false);
  assert.equal(writer.isCurrent(first), false);
  assert.equal(found.isCurrent(writer.newest()), true);
});

test('emptying a foreign slot whose length has a high half clears the whole u64', () => {
  const bytes = new Uint8Array(8 * PAGE);
  new SnapshotFile(bytes).configure({ entries: 4, data: 2048 });
  const view = new DataView(bytes.buffer);
  view.setBigUint64(slotPosition(2), 0n, true);
  view.setBigUint64(slotPosition(2) + 8, (1n << 40n) + 5n, true);
  const found = new SnapshotFile(bytes).recover();
  assert.deepEqual(found.valid(), [], 'a length of 2^40 + 5 is not a snapshot of a 2048-byte ring');
  assert.equal(found.retain(() => true), 1);
  assert.equal(slotAt(bytes, 2).length, 0n);
  view.setBigUint64(slotPosition(1) + 8, 1n << 33n, true);
  new SnapshotFile(bytes).intoWriter();
  assert.equal(slotAt(bytes, 1).length, 0n, 'a writer taking over the file empties it as well');
});

test('foreign slot order: on a file another writer left out of ring order, the writer empties what it cannot keep track of', () => {
  const bytes = new Uint8Array(8 * PAGE);
  new SnapshotFile(bytes).configure({ entries: 4, data: 2048 });
  const view = new DataView(bytes.buffer);
  const put = (index, offset, length) => {
    view.setBigUint64(slotPosition(index), BigInt(offset), true);
    view.setBigUint64(slotPosition(index) + 8, BigInt(length), true);
  };
  // As after a Rust writer (always slot 0, never storing write_offset) continued our file.
  put(0, 100, 8);
  put(3, 50, 8);
  put(2, 70, 8); // newer than slot 3 but before it in the ring
  put(1, 10, 8);
  const head = parseHead(bytes, bytes.length);
  assert.deepEqual(readSlots(bytes, head).map((s) => s.index), [1, 3, 2, 0]);
  const writer = new SnapshotFile(bytes).intoWriter();
  assert.deepEqual(writer.valid().map((s) => s.index), [1, 3, 0]);
  assert.equal(slotAt(bytes, 2).length, 0n, 'slot 2 emptied');
  assert.deepEqual([writer.nextIndex, writer.writeOffset], [1, 108], 'continues after the newest end, not at the stale write_offset 0');
  assert.equal(writer.commit(enc('x')), 1);
  assert.deepEqual(writer.valid().map((s) => s.index), [3, 0, 1]);
});

/** Stores slot `index` = (offset, length); numbers or bigints. */
function putSlot(bytes, index, offset, length) {
  const view = new DataView(bytes.buffer, bytes.byteOffset);
  view.setBigUint64(slotPosition(index), BigInt(offset), true);
  view.setBigUint64(slotPosition(index) + 8, BigInt(length), true);
}

test('reopen over overlapping slots: the writer continues past the furthest slot end, so no byte of a listed snapshot changes', () => {
  const bytes = new Uint8Array(8 * PAGE);
  new SnapshotFile(bytes).configure({ entries: 4, data: 64 });
  for (let i = 0; i < 64; i++) bytes[2 * PAGE + i] = 0x80 + i;
  // Slot 0 reaches further than slot 1, the newest by offset: only a damaged or foreign file looks like this.
  putSlot(bytes, 0, 0, 40);
  putSlot(bytes, 1, 10, 1);
  new DataView(bytes.buffer).setBigUint64(HEAD.writeOffset, 11n, true);
  const found = new SnapshotFile(bytes).recover();
  const listed = found.valid();
  assert.deepEqual(listed.map((s) => s.index), [0, 1]);
  const saved = listed.map((s) => found.read(s).slice());

  const writer = new SnapshotFile(bytes).intoWriter();
  assert.equal(writer.writeOffset, 40, 'after the end of slot 0, not after the newest slot (11)');
  writer.commit(new Uint8Array(8).fill(0xff));
  for (const [k, s] of listed.entries()) {
    assert.ok(found.isCurrent(s), `slot ${s.index} was intact and need not be dropped`);
    assert.deepEqual(found.read(s), saved[k], `slot ${s.index} is still listed: its bytes must not change`);
  }
  assert.deepEqual(new SnapshotFile(bytes).recover().valid(), [...listed, { index: 2, offset: 40, length: 8 }]);
});

test('reopen: a slot ending beyond the stream positions a head can store is not a snapshot, and cannot make the file unreadable', () => {
  const bytes = new Uint8Array(8 * PAGE);
  const data = 2048;
  new SnapshotFile(bytes).configure({ entries: 4, data }).commit(enc('kept'));
  putSlot(bytes, 2, Number.MAX_SAFE_INTEGER - 100, 8); // ends past 2^53 - 1 - data: no writer of ours gets there
  const head = parseHead(bytes, bytes.length);
  assert.deepEqual(readSlots(bytes, head), [{ index: 0, offset: 0, length: 4 }], 'it does not hide the intact snapshot');
  const writer = new SnapshotFile(bytes).configure({ entries: 4, data });
  assert.equal(writer.writeOffset, 4);
  assert.equal(slotAt(bytes, 2).length, 0n, 'emptied');
  writer.commit(enc('next'));
  const found = new SnapshotFile(bytes).recover();
  assert.deepEqual(found.valid().map((s) => dec(found.read(s))), ['kept', 'next']);
});

/**
 * Damaged or foreign slot tables (overlapping slots, slots ahead of or far behind
 * write_offset, lengths of `data` or more, offsets near 2^53), reopened in every way and
 * committed to. After the reopen and after every commit, each slot that claims a snapshot
 * (length != 0: what the Rust crate's reader lists) holds either exactly the bytes it held
 * before the reopen or exactly what this writer committed into it, and readers list what
 * the writer lists.
 */
test('randomized: reopening a damaged slot table never lets a commit change a byte of a snapshot still listed', () => {
  const random = prng(0xda3a9e);
  const int = (lo, hi) => lo + Math.floor(random() * (hi - lo + 1));
  const top = (data) => Number.MAX_SAFE_INTEGER - data; // the largest write_offset a head may hold
  const stats = { commits: 0, keptAtReopen: 0, survivors: 0, overlapsKept: 0, refused: 0 };
  const byStream = (a, b) => a.offset - b.offset || a.index - b.index;
  for (let c = 0; c < 3000; c++) {
    const entries = 2 ** int(0, 4);
    const data = 2 ** int(1, 8);
    const bytes = new Uint8Array(4 * PAGE);
    const view = new DataView(bytes.buffer);
    // A file some writer filled (in ring order, or not at all), then damaged.
    const start = random() < 0.7 ? int(0, 3 * data) : int(0, 2 ** 40);
    const first = new SnapshotFile(bytes).configure({ entries, data, initialOffset: start });
    const small = Math.max(1, Math.floor(data / entries) - 1); // so that several snapshots fit the ring
    for (let k = int(0, 2 * entries); k > 0; k--) first.commit(new Uint8Array(random() < 0.8 ? int(1, small) : int(1, data - 1)));
    const ring = 2 * PAGE;
    for (let i = 0; i < data; i++) bytes[ring + i] = int(0, 255);
    const base = first.writeOffset;
    const position = () => {
      const r = random();
      if (r < 0.9) return Math.max(0, base + int(-2 * data, data));
      if (r < 0.97) return int(0, 2 ** 52);
      return Number.MAX_SAFE_INTEGER - int(0, 3 * data);
    };
    const length = () => {
      const r = random();
      if (r < 0.75) return BigInt(int(1, data - 1));
      if (r < 0.85) return 0n;
      if (r < 0.95) return BigInt(data + int(0, data));
      return 1n << BigInt(int(32, 63));
    };
    const damage = [0.1, 0.3, 1][int(0, 2)];
    for (let i = 0; i < entries; i++) if (random() < damage) putSlot(bytes, i, position(), length());
    if (random() < 0.5) view.setBigUint64(HEAD.writeOffset, BigInt(Math.min(position(), top(data))), true);
    const where = `case ${c} (entries ${entries}, data ${data})`;

    const ringBytes = (offset, n) => {
      const out = new Uint8Array(n);
      for (let k = 0; k < n; k++) out[k] = bytes[ring + ((offset + k) % data)];
      return out;
    };
    const before = new Map(); // index → { offset, length, payload }: what each claiming slot held
    for (let i = 0; i < entries; i++) {
      const { offset, length } = slotAt(bytes, i);
      if (length === 0n) continue;
      const payload = length < BigInt(data) && offset <= BigInt(Number.MAX_SAFE_INTEGER) ? ringBytes(Number(offset), Number(length)) : undefined;
      before.set(i, { offset, length, payload });
    }
    const listedBefore = readSlots(bytes, parseHead(bytes, bytes.length));
    const committed = new Map(); // index → { offset, length, payload } of this writer's last commit there
    const check = (when) => {
      for (let i = 0; i < entries; i++) {
        const { offset, length } = slotAt(bytes, i);
        if (length === 0n) continue;
        const own = committed.get(i);
        const old = before.get(i);
        const held = own !== undefined && own.offset === offset && own.length === length ? own : old;
        assert.ok(held !== undefined && held.offset === offset && held.length === length, `${where}, ${when}: slot ${i} claims (${offset}, ${length}), which nobody wrote`);
        assert.ok(held.payload !== undefined, `${where}, ${when}: slot ${i} claims (${offset}, ${length}), which no ring can hold`);
        assert.deepEqual(ringBytes(Number(offset), Number(length)), held.payload, `${where}, ${when}: slot ${i} still claims (${offset}, ${length}) but its bytes changed`);
      }
    };

    const mode = int(0, 2);
    const file = new SnapshotFile(bytes);
    let writer;
    if (mode === 0) writer = file.intoWriter();
    else if (mode === 1) writer = file.configure(file.recover().configuration);
    else writer = file.configure({ entries, data, initialOffset: Math.min(position(), top(data)) });
    check('after the reopen');
    const listed = readSlots(bytes, parseHead(bytes, bytes.length));
    assert.deepEqual([...writer.valid()].sort(byStream), [...listed].sort(byStream), `${where}: the writer and readers list the same snapshots`);
    const newest = listedBefore[listedBefore.length - 1];
    if (mode !== 2 && newest !== undefined) assert.ok(writer.isCurrent(newest), `${where}: the newest snapshot was dropped`);
    stats.keptAtReopen += listed.length;
    for (const s of listed) for (const t of listed) if (s.index < t.index && s.offset < t.offset + t.length && t.offset < s.offset + s.length) stats.overlapsKept++;

    for (let k = int(1, 6); k > 0; k--) {
      const payload = new Uint8Array(int(1, data - 1));
      for (let i = 0; i < payload.length; i++) payload[i] = int(0, 255);
      const offset = writer.writeOffset;
      if (offset + payload.length > top(data)) {
        throwsCode(() => writer.commit(payload), 'ERR_SNAPSHOT_BAD_OFFSET', where);
        stats.refused++;
        break;
      }
      const index = writer.commit(payload);
      committed.set(index, { offset: BigInt(offset), length: BigInt(payload.length), payload });
      stats.commits++;
      check(`after commit ${stats.commits}`);
    }
    assert.ok(parseHead(bytes, bytes.length), `${where}: the file stays readable`);
    for (const [i, old] of before) if (old.length === slotAt(bytes, i).length && old.offset === slotAt(bytes, i).offset) stats.survivors++;
  }
  // The generator must produce what the writer has to cope with, or this test proves little.
  assert.ok(stats.commits > 6000, JSON.stringify(stats));
  assert.ok(stats.keptAtReopen > 2500 && stats.survivors > 200, `old snapshots must survive where they can: ${JSON.stringify(stats)}`);
  assert.ok(stats.overlapsKept > 200, JSON.stringify(stats));
  assert.ok(stats.refused > 50, JSON.stringify(stats));
});

/**
 * Randomized run against a model of what must be valid: commits, aborted and replaced
 * commitWith, drops, reopen. After every operation, the set of slots claiming validity
 * in memory equals the model's, and each one's ring bytes are exactly what was committed.
 */
function modelRun(seed, { entries, data, pages, ops }) {
  const random = prng(seed);
  const bytes = new Uint8Array(pages * PAGE);
  let writer = new SnapshotFile(bytes).configure({ entries, data });
  const dataStart = PAGE * (1 + Math.ceil(entries / 256));
  const live = new Map(); // index → { offset, length, payload }
  let stream = 0;
  let next = 0;
  let commits = 0;
  let invalidations = 0;
  const where = (op) => `seed ${seed}, entries ${entries}, data ${data}, op ${op}`;

  const randomPayload = () => {
    const r = random();
    const max = r < 0.6 ? Math.min(8, data - 1) : r < 0.9 ? Math.max(1, data >> 2) : data - 1;
    const p = new Uint8Array(1 + Math.floor(random() * max));
    for (let i = 0; i < p.length; i++) p[i] = Math.floor(random() * 256);
    return p;
  };
  const invalidateFor = (n) => {
    const limit = stream + n - data;
    for (const [i, s] of live) {
      if (s.offset < limit || i === next) {
        live.delete(i);
        invalidations++;
      }
    }
  };

  for (let op = 0; op < ops; op++) {
    const r = random();
    if (r < 0.7) {
      const p = randomPayload();
      invalidateFor(p.length);
      assert.equal(writer.commit(p), next, where(op));
      live.set(next, { offset: stream, length: p.length, payload: p });
      stream += p.length;
      next = (next + 1) % entries;
      commits++;
    } else if (r < 0.8) {
      const p = randomPayload();
      invalidateFor(p.length);
      assert.equal(writer.commitWith(p, (tx) => tx.abort()), undefined);
    } else if (r < 0.88) {
      const p = randomPayload();
      const q = randomPayload().subarray(0, p.length);
      invalidateFor(p.length);
      const res = writer.commitWith(p, (tx) => {
        tx.replace(q);
        return op;
      });
      assert.deepEqual(res, { index: next, value: op });
      const final = p.slice();
      final.set(q);
      live.set(next, { offset: stream, length: p.length, payload: final });
      stream += p.length;
      next = (next + 1) % entries;
      commits++;
    } else if (r < 0.94) {
      const found = new SnapshotFile(bytes).recover();
      const victims = found.valid().filter(() => random() < 0.3);
      for (const v of victims) {
        assert.equal(found.invalidate(v), true);
        live.delete(v.index);
      }
    } else {
      const file = new SnapshotFile(bytes);
      if (random() < 0.5) {
        writer = file.intoWriter();
      } else {
        const config = new ConfigureFile();
        file.recover(config);
        writer = file.configure(config);
      }
      let newest;
      for (const [i, s] of live) if (newest === undefined || s.offset > newest.offset) newest = { i, ...s };
      next = newest === undefined ? 0 : (newest.i + 1) % entries;
      assert.equal(writer.nextIndex, next, where(op));
      assert.equal(writer.writeOffset, stream, where(op));
    }

    // Every slot that claims validity holds exactly the committed bytes, and nothing
    // the model still counts as valid was invalidated.
    for (let i = 0; i < entries; i++) {
      const { offset, length } = slotAt(bytes, i);
      const expected = live.get(i);
      if (length === 0n) {
        assert.equal(expected, undefined, `${where(op)}: slot ${i} was invalidated needlessly`);
        continue;
      }
      assert.ok(expected, `${where(op)}: slot ${i} claims (${offset}, ${length}) but should be empty`);
      assert.equal(offset, BigInt(expected.offset), where(op));
      assert.equal(length, BigInt(expected.length), where(op));
      for (let k = 0; k < expected.length; k++) {
        if (bytes[dataStart + ((expected.offset + k) % data)] !== expected.payload[k]) {
          assert.fail(`${where(op)}: slot ${i} byte ${k} changed while the slot claims validity`);
        }
      }
    }
    const modelOrder = [...live].sort((a, b) => a[1].offset - b[1].offset).map(([i, s]) => ({ index: i, offset: s.offset, length: s.length }));
    assert.deepEqual(writer.valid(), modelOrder, where(op));
    assert.deepEqual(writer.newest(), modelOrder.at(-1), `${where(op)}: the writer's newest`);
    if (op % 50 === 0) {
      const head = parseHead(bytes, bytes.length);
      assert.deepEqual(readSlots(bytes, head), modelOrder, where(op));
      assert.deepEqual(new SnapshotFile(bytes).recover().newest(), modelOrder.at(-1), `${where(op)}: the discovery's newest`);
      assert.equal(head.writeOffset, stream, where(op));
      for (const s of modelOrder) assert.deepEqual(writer.read(s), live.get(s.index).payload, where(op));
    }
  }
  return { commits, invalidations, wraps: Math.floor(stream / data) };
}

test('randomized: many commits of many sizes keep exactly the intact snapshots valid (model check)', () => {
  const configs = [
    { entries: 1, data: 16, pages: 4 },
    { entries: 4, data: 64, pages: 4 },
    { entries: 16, data: 2, pages: 4 },
    { entries: 16, data: 2048, pages: 4 },
    { entries: 512, data: 1024, pages: 6 },
    { entries: 256, data: 8192, pages: 6 },
  ];
  for (const [k, config] of configs.entries()) {
    const stats = modelRun(1000 + k, { ...config, ops: 2500 });
    // The run must exercise wrapping and invalidation, or it checks little.
    assert.ok(stats.commits > 1500, JSON.stringify(stats));
    assert.ok(stats.wraps >= 3, `${JSON.stringify(config)}: ${JSON.stringify(stats)}`);
    assert.ok(stats.invalidations > 100, `${JSON.stringify(config)}: ${JSON.stringify(stats)}`);
  }
});
