// Snapshots across processes: a child writes into a shared memfd, this process recovers
// (and, concurrently, reads while the child writes). Uses src/fds/memory-file.ts for the memfd.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { MemoryFile } from 'shmfd';
import { PAGE, SnapshotFile } from 'shmfd/snapshot';
import { NODE, fixture, run } from './helpers.js';

const pattern = (position) => Math.imul(position >>> 0, 0x9e3779b1) >>> 24; // as in the fixture

function matchesPattern(bytes, offset) {
  for (let k = 0; k < bytes.length; k++) if (bytes[k] !== pattern(offset + k)) return false;
  return true;
}

test('cross-process round trip: snapshots a child committed are recovered byte for byte, and writing continues here', async () => {
  const file = MemoryFile.create('snapshot-round-trip', { size: 8 * PAGE });
  try {
    const child = await run(NODE, [fixture('snapshot-writer.js'), '1000'], { extraFds: [file.fd] });
    assert.equal(child.stderr, '');
    assert.equal(child.code, 0);
    const bytes = file.map().bytes;
    const found = new SnapshotFile(bytes).recover();
    assert.ok(found, 'the child configured the file');
    assert.deepEqual([found.head.entries, found.head.data], [64, 4096]);
    const valid = found.valid();
    assert.ok(valid.length > 10, `${valid.length} snapshots survive in a 4 KiB ring`);
    for (const s of valid) assert.ok(matchesPattern(found.read(s), s.offset), `snapshot ${JSON.stringify(s)}`);
    const newest = valid[valid.length - 1];
    assert.equal(newest.offset + newest.length, Number(child.stdout.trim()), 'the newest ends at the final write offset');
    assert.equal(newest.index, 999 % 64);
    const writer = new SnapshotFile(bytes).intoWriter();
    assert.equal(writer.tailU64[0], 1000n, 'every commitWith step ran once');
    assert.equal(writer.nextIndex, 1000 % 64);
    assert.equal(writer.commit(new Uint8Array([1, 2, 3])), 1000 % 64);
  } finally {
    file.close();
  }
});

test('cross-process concurrency: a snapshot still current after it was read has intact bytes while another process writes', async () => {
  const file = MemoryFile.create('snapshot-concurrent', { size: 8 * PAGE });
  try {
    // Configure here first, so this process can watch from the start.
    const bytes = file.map().bytes;
    const own = new SnapshotFile(bytes).configure({ entries: 64, data: 4096 });
    const child = run(NODE, [fixture('snapshot-writer.js'), '0'], { extraFds: [file.fd] });
    const found = new SnapshotFile(bytes).recover();
    const started = Date.now();
    while (Atomics.load(own.tailU64, 2) === 0n && Date.now() - started < 20_000) {
      await new Promise((resolve) => setTimeout(resolve, 5));
    }
    let verified = 0;
    let overtaken = 0;
    let windows = 0;
    let acked = 0n;
    const scan = () => {
      for (const s of found.valid()) {
        const data = found.read(s);
        if (!found.isCurrent(s)) {
          overtaken++;
          continue;
        }
        assert.ok(matchesPattern(data, s.offset), `snapshot ${JSON.stringify(s)} was current but its bytes changed`);
        verified++;
      }
    };
    // Five seconds, and longer (up to a minute) until the counts asserted below are
    // reached: on a loaded machine the two processes rarely run at the same time.
    const until = Date.now() + 5_000;
    const guard = Date.now() + 60_000;
    const enough = () => windows >= 50 && verified > 1000 && Atomics.load(own.tailU64, 0) > 800n;
    while (windows < 200 && (Date.now() < until || !enough()) && Date.now() < guard) {
      const held = Atomics.load(own.tailU64, 3);
      scan();
      if (held !== acked && Atomics.load(own.tailU64, 5) !== held) {
        // The whole scan ran while that transaction was held open (the writer waits for
        // this echo, and announces in word 5 when it stops waiting).
        windows++;
        acked = held;
        Atomics.store(own.tailU64, 4, held);
      }
    }
    Atomics.store(own.tailU64, 1, 1n);
    const result = await child;
    assert.equal(result.stderr, '');
    assert.equal(result.code, 0);
    const commits = Atomics.load(own.tailU64, 0);
    assert.ok(commits > 800n, `the child committed ${commits} times while we read`);
    assert.ok(windows >= 50, `only ${windows} scans inside a held transaction`);
    assert.ok(verified > 1000, `${verified} reads verified, ${overtaken} overtaken by the writer`);
  } finally {
    file.close();
  }
});
