// restore-v1 while the program runs (issue 3, restore.md): backups appear on disk while it
// commits, each a valid snapshot file whose every slot holds what was committed there; an
// idle program causes no writes; unconfigured memory is never snapshotted nor written over
// a good backup; and killing the host during persistence never leaves a torn backup.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { SnapshotFile } from '../dist/snapshot/index.js';
import { COUNTER, RAW, fingerprint, readCounterBackup, runHost, startHost, tempFiles, waitFor } from './fixtures/restore-helpers.js';
import { fixture, seededRandom, sleep, tempDir } from './helpers.js';

/** True once `pid` is gone or a zombie (its reaper may take its time). */
function isDead(pid) {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'latin1');
    return stat.slice(stat.lastIndexOf(')') + 2).startsWith('Z');
  } catch {
    return true;
  }
}

/** Entries of restore-counter's log in the tail. */
const LOG_ENTRIES = 8192;

/**
 * Checks a backup of restore-counter against what the program did: the valid slots hold
 * counters that grow with their stream position, and the tail log holds 1..c for the
 * newest counter c (the log entry of a commit is written before it is published and
 * never changed after): a torn or stale copy breaks one of them.
 */
function assertSlotsIntact(backup) {
  const found = SnapshotFile.open(backup.bytes).recover();
  const valid = found.valid();
  assert.ok(valid.length > 0, 'a persisted backup holds at least one snapshot');
  let last = 0;
  for (const s of [...valid].sort((a, b) => a.offset - b.offset)) {
    assert.equal(s.length, 8);
    const counter = Number(Buffer.from(found.read(s)).readBigUInt64BE(0));
    assert.ok(counter > last, `slot ${s.index} at ${s.offset} holds ${counter}, after ${last}`);
    last = counter;
  }
  const log = new BigUint64Array(backup.bytes.buffer, backup.bytes.byteOffset + found.head.tailStart, Math.min(last, LOG_ENTRIES));
  for (let i = 0; i < log.length; i++) assert.equal(log[i], BigInt(i + 1), `tail log entry ${i}`);
}

test('backups appear on disk while the program runs, each a valid snapshot file with intact slots', async (t) => {
  const dir = tempDir(t);
  const backup = path.join(dir, 'b');
  const host = startHost(['--snapshot=restore-v1', '--interval', '20', backup, process.execPath, COUNTER, '--every', '5']);
  assert.equal((await host.next()).recovered, 0);
  const seen = [];
  const inodes = new Set();
  await waitFor(() => {
    assert.equal(host.child.exitCode, null, 'the program is still running');
    const b = readCounterBackup(backup);
    if (b === undefined) return false;
    assertSlotsIntact(b);
    if (seen.at(-1) !== b.counter) seen.push(b.counter);
    inodes.add(fs.statSync(backup).ino);
    return seen.length >= 3;
  }, 'three successive backups while the program runs', 30_000, 5);
  for (let i = 1; i < seen.length; i++) assert.ok(seen[i] > seen[i - 1], `counters only grow: ${seen}`);
  assert.ok(inodes.size >= 2, 'each backup replaced the previous file');
  host.child.kill('SIGTERM');
  const end = await host.exited;
  assert.equal(end.status, 143, end.stderr);
  const last = readCounterBackup(backup);
  assertSlotsIntact(last);
  assert.ok(last.counter >= seen.at(-1));
  assert.deepEqual(tempFiles(dir), []);
});

test('an idle program causes no backup writes: rounds are skipped while write_offset stays', async (t) => {
  const dir = tempDir(t);
  const backup = path.join(dir, 'b');
  const host = startHost(['--snapshot=restore-v1', '--interval', '10', '--log-level', 'debug', backup, process.execPath, COUNTER, '--commits', '3']);
  assert.equal((await host.next()).recovered, 0);
  assert.equal((await host.next()).committed, 3);
  await waitFor(() => readCounterBackup(backup)?.counter === 3, 'the backup of the third commit');
  const before = fingerprint(backup);
  await sleep(300);
  assert.deepEqual(fingerprint(backup), before, 'no backup was written while nothing was committed');
  host.child.kill('SIGTERM');
  const end = await host.exited;
  assert.equal(end.status, 143);
  const rounds = /snapshot rounds: (\d+) persisted, (\d+) unchanged/.exec(end.stderr);
  assert.ok(rounds !== null && Number(rounds[2]) >= 5, `rounds were skipped, not run: ${rounds?.[0]}`);
});

test('memory that is not a snapshot file is never snapshotted, and never replaces a good backup at exit', async (t) => {
  const dir = tempDir(t);
  const backup = path.join(dir, 'b');
  const made = await runHost(['--snapshot=restore-v1', backup, process.execPath, COUNTER, '--commits', '2', '--exit']);
  assert.equal(made.status, 0, made.stderr);
  const before = fingerprint(backup);
  // The program overwrites the head with text: the memory is no snapshot file any more.
  const r = await runHost(['--snapshot=restore-v1', '--interval', '5', backup, process.execPath, RAW, '--write', 'not a snapshot', '--code', '4']);
  assert.equal(r.status, 4);
  assert.match(r.stderr, /warning: the program never configured its memory as a snapshot file; the backup .* is kept as it was/);
  assert.equal(r.stderr.trim().split('\n').length, 1, r.stderr);
  assert.deepEqual(fingerprint(backup), before);

  // No backup at all, and a program that never configures its memory: nothing is written.
  const fresh = path.join(dir, 'fresh');
  const f = await runHost(['--snapshot=restore-v1', fresh, process.execPath, RAW, '--write', 'raw']);
  assert.equal(f.status, 0);
  assert.match(f.stderr, /nothing was written/);
  assert.equal(fs.existsSync(fresh), false);
  assert.deepEqual(tempFiles(dir), []);
});

test('SIGKILL of the host during persistence, again and again: the backup is always a whole valid one, and leftovers are removed at the next start', async (t) => {
  const dir = tempDir(t);
  const backup = path.join(dir, 'b');
  const SIZE = 64 * 2 ** 20;
  const random = seededRandom(12345).next;
  let previous = 0;
  let leftovers = [];
  let sawLeftover = false;
  for (let round = 0; round < 8; round++) {
    const host = startHost(['--snapshot=restore-v1', '--interval', '1', backup, process.execPath, COUNTER, '--size', String(SIZE), '--fill', '7', '--every', '2']);
    const start = await host.next();
    assert.equal(start.recovered, previous, 'the program starts from the backup on disk');
    for (const name of leftovers) assert.ok(!fs.existsSync(path.join(dir, name)), `${name} was removed at start`);
    if (round % 2 === 0) {
      await sleep(50 + random() * 350);
    } else {
      // Aim: kill as soon as a persist is under way (its temporary file exists).
      await waitFor(() => tempFiles(dir).length > 0, 'a persist in progress', 20_000, 1);
      await sleep(random() * 40);
    }
    host.child.kill('SIGKILL');
    await host.exit;
    process.kill(start.pid, 'SIGKILL');
    await waitFor(() => isDead(start.pid), 'the orphaned program to end', 10_000, 5);
    leftovers = tempFiles(dir);
    if (leftovers.length > 0) sawLeftover = true;
    const b = readCounterBackup(backup);
    if (b === undefined) {
      assert.equal(previous, 0, 'a backup, once written, never disappears');
      continue;
    }
    assert.equal(b.size, SIZE);
    assert.equal(b.bytes[SIZE - 1], 7, 'the copy is whole, to the last byte of the tail');
    assertSlotsIntact(b);
    assert.ok(b.counter >= previous, `the durable counter never goes back (${previous} -> ${b.counter})`);
    previous = b.counter;
  }
  assert.ok(previous > 0, 'some backup was persisted');
  assert.ok(sawLeftover, 'at least one kill hit a persist in progress (a temporary file was left)');
});

test('restore-v1: a program that ends without snapshots does not replace a backup the host persisted while it ran', async (t) => {
  const dir = tempDir(t);
  const backup = path.join(dir, 'b');
  const r = await runHost(['--snapshot=restore-v1', '--interval', '20', '--log-level', 'debug', backup, process.execPath, fixture('restore-drop-all.js'), '1500']);
  assert.equal(r.status, 0, r.stderr);
  assert.equal(JSON.parse(r.stdout).valid, 0);
  assert.match(r.stderr, /snapshot persisted: 3 of 3 slots kept/);
  assert.match(r.stderr, /warning: the memory holds no valid snapshot but the backup does; the backup .* is kept as it was/);
  const status = await runHost(['--snapshot=restore-v1', 'status', backup]);
  assert.match(status.stdout, /^snapshots: 3$/m);
});

test('restore-v1: memory that grows under the host never yields a backup whose newest snapshot refers past its end', async (t) => {
  const dir = tempDir(t);
  const backup = path.join(dir, 'b');
  const TAIL = 3 * 4096;
  const host = startHost(['--snapshot=restore-v1', '--interval', '1', backup, process.execPath, fixture('restore-grow.js'), '1500', '1']);
  const seen = new Set();
  const bad = [];
  let ended = false;
  const exited = host.exited.then((end) => {
    ended = true;
    return end;
  });
  // Check every backup the host makes durable while the program appends and commits.
  while (!ended) {
    let bytes;
    try {
      // A freed inode number is handed out again: the change time tells the files apart.
      const stat = fs.statSync(backup, { bigint: true });
      const id = `${stat.ino}:${stat.ctimeNs}`;
      if (seen.has(id)) {
        await sleep(1);
        continue;
      }
      seen.add(id);
      bytes = fs.readFileSync(backup);
    } catch {
      await sleep(1);
      continue;
    }
    const aligned = new Uint8Array(new ArrayBuffer(TAIL + 4096));
    aligned.set(bytes.subarray(0, TAIL + 4096));
    const found = SnapshotFile.open(aligned).recover();
    const newest = found?.newest();
    if (newest === undefined) continue;
    const n = Number(Buffer.from(found.read(newest)).readBigUInt64LE(0));
    const at = TAIL + 8 * (n - 1);
    if (bytes.length < at + 8 || bytes.readBigUInt64LE(at) !== BigInt(n)) bad.push(`snapshot ${n}, file of ${bytes.length} bytes`);
  }
  const end = await exited;
  assert.equal(end.status, 0, end.stderr);
  assert.ok(seen.size >= 10, `only ${seen.size} backups seen`);
  assert.deepEqual(bad, [], `${bad.length} of ${seen.size} backups were short`);
});
