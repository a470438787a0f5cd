// SnapshotWriter.invalidateBefore, the writer method the state structures use before they
// reuse tail data that older snapshots name: it empties exactly the writer's slots that
// start before a position, keeps the writer's own bookkeeping right for later commits,
// and works on the slots a reopened writer adopted.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { SnapshotFile, readSlots, parseHead } from 'shmfd/snapshot';

function file(pages = 8) {
  const bytes = new Uint8Array(new ArrayBuffer(pages * 4096));
  return { bytes, snapshots: new SnapshotFile(bytes) };
}

const payload = (n, fill = 1) => new Uint8Array(n).fill(fill);
const slotsOf = (bytes) => readSlots(bytes, parseHead(bytes, bytes.length));

test('invalidateBefore empties exactly the slots starting before the position, oldest first', () => {
  const { bytes, snapshots } = file();
  const writer = snapshots.configure({ entries: 16, data: 4096 });
  const offsets = [];
  for (let i = 0; i < 6; i++) {
    offsets.push(writer.writeOffset);
    writer.commit(payload(10, i + 1));
  }
  assert.equal(writer.invalidateBefore(offsets[3]), 3, 'the three older snapshots were emptied');
  assert.deepEqual(slotsOf(bytes).map((s) => s.offset), offsets.slice(3), 'a reader sees only the newer ones');
  assert.deepEqual(writer.valid().map((s) => s.offset), offsets.slice(3), 'the writer agrees');
  assert.equal(writer.invalidateBefore(offsets[3]), 0, 'a second call empties nothing');
  assert.equal(writer.invalidateBefore(0), 0, 'a position before every snapshot empties nothing');
  assert.equal(writer.invalidateBefore(offsets[5] + 1), 3, 'up to and including the newest');
  assert.deepEqual(slotsOf(bytes), []);
});

test('commits after invalidateBefore keep the ring bookkeeping: slots are reused and invalidated in order', () => {
  const { bytes, snapshots } = file();
  const writer = snapshots.configure({ entries: 4, data: 64 });
  for (let round = 0; round < 50; round++) {
    const before = writer.writeOffset;
    writer.commit(payload(1 + (round % 13), round & 255));
    if (round % 3 === 0) writer.invalidateBefore(before);
    const seen = slotsOf(bytes);
    assert.deepEqual(seen, writer.valid(), `round ${round}: reader and writer agree`);
    for (const s of seen) {
      const want = writer.read(s);
      assert.ok(want.every((b) => b === want[0]), `round ${round}: slot ${s.index} holds one committed payload`);
    }
    assert.equal(seen.at(-1)?.offset, before, `round ${round}: the newest snapshot stays valid`);
    if (round % 3 === 0) assert.equal(seen.length, 1, `round ${round}: only the newest is left`);
  }
});

test('a reopened writer can invalidate the snapshots it adopted', () => {
  const { bytes, snapshots } = file();
  const first = snapshots.configure({ entries: 8, data: 256 });
  const offsets = [];
  for (let i = 0; i < 5; i++) {
    offsets.push(first.writeOffset);
    first.commit(payload(7, i + 1));
  }
  const second = new SnapshotFile(bytes).intoWriter();
  assert.equal(second.invalidateBefore(offsets[4]), 4);
  assert.deepEqual(slotsOf(bytes).map((s) => s.offset), [offsets[4]]);
  second.commit(payload(7, 9));
  assert.equal(slotsOf(bytes).length, 2);
});
