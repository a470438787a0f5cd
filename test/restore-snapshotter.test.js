// One round of the restore-v1 snapshotter (src/restore/snapshotter.ts) on a real memfd
// and a real backup file: memory that is not (yet) a snapshot file with a snapshot is
// never persisted; a round after a commit persists a backup that holds exactly the
// committed snapshots; a round with nothing new committed writes nothing; a failing
// round is counted and logged once, and the old backup stays; the pause after a round
// counts its own CPU time, not that of work run beside it through besideRounds; a backup
// with other names (hard links) is never written in place, nor a file at the journal's name.
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { MemoryFile } from 'shmfd';
import { BackupFile } from '../dist/restore/backup.js';
import { besideRounds, Snapshotter } from '../dist/restore/snapshotter.js';
import { SnapshotFile } from '../dist/snapshot/index.js';
import { fingerprint, tempDir, tempFiles } from './helpers.js';

const PAGE = 4096;

/** A Log that keeps its lines. */
function collectingLog() {
  /** @type {string[]} */
  const lines = [];
  const at = (/** @type {string} */ level) => (/** @type {string} */ message) => lines.push(`${level}: ${message}`);
  return { lines, error: at('error'), warn: at('warn'), info: at('info'), debug: at('debug') };
}

/**
 * A memfd of `pages` pages, mapped, closed when `t` ends, and a snapshotter of it into
 * `dir/state`.
 * @param {import('node:test').TestContext} t
 */
function setUp(t, pages = 8) {
  const memory = MemoryFile.create('snapshotter', { size: pages * PAGE, sealShrink: false });
  const mapping = memory.map();
  t.after(() => {
    mapping.unmap();
    memory.close();
  });
  const dir = tempDir(t);
  const backup = new BackupFile(path.join(dir, 'state'));
  const log = collectingLog();
  /** @type {Array<import('../dist/restore/snapshotter.js').DurableSnapshot>} */
  const persisted = [];
  const snapshotter = new Snapshotter({ memoryFd: memory.fd, backup, log, onPersisted: (snapshot) => persisted.push(snapshot) });
  return { memory, bytes: mapping.bytes, dir, backup, log, snapshotter, persisted };
}

/** The payloads of the valid snapshots in the backup file, oldest first, as text. */
function backupPayloads(/** @type {string} */ file) {
  const found = SnapshotFile.open(new Uint8Array(fs.readFileSync(file))).recover();
  assert.ok(found !== undefined, `${file} is a configured snapshot file`);
  return found.valid().map((snapshot) => Buffer.from(found.read(snapshot)).toString());
}

test('memory that is no snapshot file, or holds no snapshot yet, is never persisted', async (t) => {
  const { memory, bytes, backup, log, snapshotter } = setUp(t);
  assert.equal(await snapshotter.round(), 'not-ready', 'zeros: not configured');
  new SnapshotFile(bytes).configure({ entries: 16, data: 2 * PAGE });
  assert.equal(await snapshotter.round(), 'not-ready', 'configured, no snapshot');
  bytes.fill(0xff, 0, 64);
  assert.equal(await snapshotter.round(), 'not-ready', 'a damaged head');
  memory.resize(0);
  assert.equal(await snapshotter.round(), 'not-ready', 'an empty file');
  assert.equal(fs.existsSync(backup.path), false, 'no backup was written');
  assert.deepEqual(tempFiles(backup.dir), []);
  assert.deepEqual(snapshotter.counts, { persisted: 0, unchanged: 0, 'not-ready': 4, discarded: 0, failed: 0, aborted: 0 });
  assert.equal(snapshotter.lastPersisted, undefined);
  assert.ok(log.lines.every((line) => line.startsWith('debug: no snapshot taken: ')), log.lines.join('\n'));
});

test('a round after commits persists exactly the committed snapshots; without a new commit it writes nothing', async (t) => {
  const { bytes, backup, log, snapshotter, persisted } = setUp(t);
  const writer = new SnapshotFile(bytes).configure({ entries: 16, data: 2 * PAGE });
  writer.commit(Buffer.from('first'));
  writer.commit(Buffer.from('second'));
  const writeOffset = writer.writeOffset;
  assert.equal(await snapshotter.round(), 'persisted');
  assert.deepEqual(backupPayloads(backup.path), ['first', 'second']);
  assert.equal(fs.statSync(backup.path).size, bytes.length);
  assert.equal(persisted.length, 1);
  assert.deepEqual(
    { count: persisted[0]?.count, writeOffset: persisted[0]?.writeOffset, size: persisted[0]?.size, newest: persisted[0]?.newest?.length },
    { count: 2, writeOffset, size: bytes.length, newest: 'second'.length },
  );
  assert.equal(snapshotter.lastPersisted, persisted[0]);
  const found = backup.inspect('snapshot');
  assert.ok(found.state === 'present' && found.record !== undefined, 'with a verified record');

  // Nothing committed since: the round reads the head only and leaves the backup alone.
  const before = fingerprint(backup.path);
  bytes[bytes.length - 1] = 7; // the tail changes, no commit: still nothing to persist
  assert.equal(await snapshotter.round(), 'unchanged');
  assert.equal(await snapshotter.round(), 'unchanged');
  assert.deepEqual(fingerprint(backup.path), before);
  assert.equal(persisted.length, 1);

  writer.commit(Buffer.from('third'));
  assert.equal(await snapshotter.round(), 'persisted');
  assert.deepEqual(backupPayloads(backup.path), ['first', 'second', 'third']);
  assert.equal(fs.readFileSync(backup.path)[bytes.length - 1], 7, 'the tail is copied with the snapshots');
  assert.equal(persisted.length, 2);
  assert.deepEqual(snapshotter.counts, { persisted: 2, unchanged: 2, 'not-ready': 0, discarded: 0, failed: 0, aborted: 0 });
  assert.deepEqual(tempFiles(backup.dir), []);
  assert.deepEqual(log.lines.filter((line) => !line.startsWith('debug: ')), [], 'nothing above debug');
});

test('commits during the copy: the backup keeps only the snapshots valid before and after it; none left is no backup', async (t) => {
  const { bytes, backup, snapshotter, persisted } = setUp(t);
  const writer = new SnapshotFile(bytes).configure({ entries: 16, data: 2 * PAGE });
  for (const name of ['a', 'b', 'c']) writer.commit(Buffer.alloc(1000, name));
  // round() reads the slots before its first await, and copies after it: the commit below
  // lands between the two. Its data wraps the ring over the oldest snapshot, 'a'.
  const round = snapshotter.round();
  writer.commit(Buffer.alloc(5500, 'd'));
  assert.equal(await round, 'persisted');
  const kept = backupPayloads(backup.path).map((payload) => `${payload[0]}${payload.length}`);
  assert.deepEqual(kept, ['b1000', 'c1000'], "'a' was overwritten during the copy, 'd' was not there before it");
  assert.equal(persisted[0]?.count, 2);

  const before = fingerprint(backup.path);
  const again = snapshotter.round();
  for (let i = 0; i < 3; i++) writer.commit(Buffer.alloc(6000, 'e')); // overwrites every snapshot the round read
  assert.equal(await again, 'discarded');
  assert.deepEqual(fingerprint(backup.path), before, 'a copy with no snapshot intact replaces nothing');
  assert.deepEqual(tempFiles(backup.dir), []);
});

test('a snapshotter told the write offset of the backup on disk does not copy an unchanged memory again', async (t) => {
  const { memory, bytes, backup, log } = setUp(t);
  const writer = new SnapshotFile(bytes).configure({ entries: 16, data: 2 * PAGE });
  writer.commit(Buffer.from('kept'));
  const snapshotter = new Snapshotter({ memoryFd: memory.fd, backup, log, baselineWriteOffset: writer.writeOffset });
  assert.equal(await snapshotter.round(), 'unchanged');
  assert.equal(fs.existsSync(backup.path), false);
});

test('a round that cannot persist is counted as failed and logged once; the old backup stays; the next round recovers', async (t) => {
  const { bytes, dir, backup, log, snapshotter } = setUp(t);
  const writer = new SnapshotFile(bytes).configure({ entries: 16, data: 2 * PAGE });
  writer.commit(Buffer.from('one'));
  assert.equal(await snapshotter.round(), 'persisted');
  const before = fingerprint(backup.path);
  writer.commit(Buffer.from('two'));
  // The backup's directory is gone (moved away) while two rounds run.
  fs.renameSync(dir, `${dir}-away`);
  try {
    assert.equal(await snapshotter.round(), 'failed');
    assert.equal(await snapshotter.round(), 'failed');
  } finally {
    fs.renameSync(`${dir}-away`, dir);
  }
  assert.deepEqual(fingerprint(backup.path), before, 'the old backup stays');
  const errors = log.lines.filter((line) => line.startsWith('error: '));
  assert.equal(errors.length, 1, `the same failure is logged once: ${log.lines.join('\n')}`);
  assert.match(errors[0] ?? '', new RegExp(`^error: cannot persist a snapshot to ${backup.path}: `));
  assert.equal(await snapshotter.round(), 'persisted');
  assert.deepEqual(backupPayloads(backup.path), ['one', 'two']);
  assert.ok(log.lines.includes('info: persisting snapshots works again'), log.lines.join('\n'));
  assert.equal(snapshotter.counts.failed, 2);
});

/**
 * Runs one round of `snapshotter` while the same thread hashes 32 MiB at each turn of the
 * event loop the round leaves free (as a replicator sending the previous backup does),
 * each turn through `wrap`.
 * @returns the round's outcome, and the CPU time (µs) of the work beside it
 */
async function roundBesideWork(snapshotter, /** @type {<T>(work: () => T) => T} */ wrap) {
  const block = crypto.randomBytes(32 * 2 ** 20);
  let running = true;
  let micros = 0;
  const turn = () => {
    if (!running) return;
    wrap(() => {
      const before = process.cpuUsage();
      crypto.createHash('sha256').update(block).digest();
      const used = process.cpuUsage(before);
      micros += used.user + used.system;
    });
    setImmediate(turn);
  };
  setImmediate(turn);
  const outcome = await snapshotter.round();
  running = false;
  return { outcome, micros };
}

test("work beside a round on the host's thread, run through besideRounds, does not slow the next round down", async (t) => {
  const { memory, bytes, backup, log } = setUp(t);
  const writer = new SnapshotFile(bytes).configure({ entries: 16, data: 2 * PAGE });
  // A round of 32 KiB costs a few ms of CPU (more the first time): 10 times that is less than 500 ms.
  const snapshotter = new Snapshotter({ memoryFd: memory.fd, backup, log, intervalMs: 500 });
  writer.commit(Buffer.from('warm-up'));
  assert.equal(await snapshotter.round(), 'persisted');
  writer.commit(Buffer.from('one'));
  const beside = await roundBesideWork(snapshotter, besideRounds);
  assert.equal(beside.outcome, 'persisted');
  // The work beside it would have paused the next round more than its interval, were it counted.
  assert.ok((10 * beside.micros) / 1000 > snapshotter.intervalMs, `${beside.micros} µs of work ran beside the round`);
  assert.equal(snapshotter.pauseMs, snapshotter.intervalMs, 'a round of 32 KiB is paced by its interval alone');

  // The same work not declared is counted: the pacing still bounds what the host spends.
  writer.commit(Buffer.from('two'));
  const counted = await roundBesideWork(snapshotter, (work) => work());
  assert.equal(counted.outcome, 'persisted');
  assert.ok(counted.micros > 0, 'work ran beside the round');
  assert.ok(snapshotter.pauseMs >= (10 * counted.micros) / 1000, `paused ${snapshotter.pauseMs} ms after ${counted.micros} µs of CPU`);
  assert.deepEqual(backupPayloads(backup.path), ['warm-up', 'one', 'two']);
});

test('persistDifferences writes in place exactly the pages where the memory differs from the backup, past its end too: the backup then equals the memory', async (t) => {
  const { memory, bytes, backup, snapshotter, persisted } = setUp(t, 64);
  const writer = new SnapshotFile(bytes).configure({ entries: 16, data: 2 * PAGE });
  writer.commit(Buffer.from('first'));
  assert.equal(await snapshotter.round(), 'persisted');
  // After the program exited: two pages changed, one more, a commit, and the file grown by
  // 16 pages with one of them written.
  bytes.fill(1, 10 * PAGE, 12 * PAGE);
  bytes[40 * PAGE + 100] = 2;
  writer.commit(Buffer.from('second'));
  memory.resize(80 * PAGE);
  const grown = memory.map();
  t.after(() => grown.unmap());
  grown.bytes[75 * PAGE] = 3;
  assert.equal(await snapshotter.finish(), 'previous', 'no round in place without marks');
  assert.equal(await snapshotter.persistDifferences(), 'newest');
  assert.ok(fs.readFileSync(backup.path).equals(Buffer.from(grown.bytes)), 'the backup is the memory, byte for byte');
  assert.deepEqual(backupPayloads(backup.path), ['first', 'second']);
  const round = persisted.at(-1);
  assert.equal(round?.incremental, true);
  const region = round?.changed?.[0]?.[1] ?? 0;
  assert.ok(region > 0 && region % PAGE === 0 && region <= 10 * PAGE, `head, slots and ring first: ${region}`);
  assert.deepEqual(round?.changed, [[0, region], [10 * PAGE, 2 * PAGE], [40 * PAGE, PAGE], [75 * PAGE, PAGE]]);
  assert.ok(fs.existsSync(backup.journalPath), 'its journal stays beside the backup');
  const found = backup.inspect('snapshot');
  assert.ok(found.state === 'present' && found.record !== undefined, 'with a verified record');
});

test('persistDifferences with no backup to write into writes nothing and says the backup is as it was', async (t) => {
  const { bytes, backup, log, snapshotter } = setUp(t);
  new SnapshotFile(bytes).configure({ entries: 16, data: 2 * PAGE }).commit(Buffer.from('first'));
  assert.equal(await snapshotter.persistDifferences(), 'previous');
  assert.equal(fs.existsSync(backup.path), false);
  assert.equal(fs.existsSync(backup.journalPath), false);
  assert.deepEqual(log.lines, ['debug: no round in place: there is no backup to write into']);
});

test('a backup with other names (hard links) is not written in place: they keep their bytes; a file at the journal\'s name is not written through', async (t) => {
  const { bytes, dir, backup, log, snapshotter } = setUp(t, 16);
  const writer = new SnapshotFile(bytes).configure({ entries: 16, data: 2 * PAGE });
  writer.commit(Buffer.from('first'));
  assert.equal(await snapshotter.round(), 'persisted');
  const monday = path.join(dir, 'monday');
  fs.linkSync(backup.path, monday);
  const kept = fs.readFileSync(monday);
  writer.commit(Buffer.from('second'));
  bytes.fill(1, 10 * PAGE, 11 * PAGE);
  assert.equal(await snapshotter.persistDifferences(), 'previous', 'nothing written in place');
  assert.match(
    log.lines.at(-1) ?? '',
    /^error: cannot persist a snapshot to \/.*\/state: it has 2 names \(hard links\): writing it in place would change the others too, and there is no room for a whole copy; /,
  );
  assert.ok(fs.readFileSync(monday).equals(kept));
  assert.equal(fs.existsSync(backup.journalPath), false, 'no journal either');
  // A round that may copy whole does: the backup is a new file, the other name keeps its bytes.
  assert.equal(await snapshotter.round(), 'persisted');
  assert.deepEqual(backupPayloads(backup.path), ['first', 'second']);
  assert.equal(fs.statSync(backup.path).nlink, 1);
  assert.ok(fs.readFileSync(monday).equals(kept));
  // In place again, with another file's hard link where the journal goes.
  const other = path.join(dir, 'other');
  fs.writeFileSync(other, 'not a journal');
  fs.linkSync(other, backup.journalPath);
  writer.commit(Buffer.from('third'));
  assert.equal(await snapshotter.persistDifferences(), 'newest');
  assert.deepEqual(backupPayloads(backup.path), ['first', 'second', 'third']);
  assert.equal(fs.readFileSync(other, 'utf8'), 'not a journal');
  assert.equal(fs.statSync(other).nlink, 1, 'the journal is a file of its own');
  assert.ok(fs.readFileSync(monday).equals(kept));
  assert.deepEqual(backupPayloads(monday), ['first']);
  if (process.geteuid?.() !== 0) return;
  // A file someone else made at the journal's name (in a directory others may write) is
  // not written into either: it would hand them the state. (A whole copy removes the journal first.)
  assert.equal(await snapshotter.round(), 'unchanged');
  writer.commit(Buffer.from('fourth'));
  assert.equal(await snapshotter.round(), 'persisted');
  assert.equal(fs.existsSync(backup.journalPath), false);
  fs.writeFileSync(backup.journalPath, 'someone else\'s');
  fs.chownSync(backup.journalPath, 65534, 65534);
  const theirs = fs.openSync(backup.journalPath, 'r');
  t.after(() => fs.closeSync(theirs));
  writer.commit(Buffer.from('fifth'));
  assert.equal(await snapshotter.persistDifferences(), 'newest');
  assert.deepEqual(backupPayloads(backup.path), ['first', 'second', 'third', 'fourth', 'fifth']);
  assert.equal(fs.readFileSync(theirs, 'utf8'), 'someone else\'s');
  assert.equal(fs.statSync(backup.journalPath).uid, 0);
});
