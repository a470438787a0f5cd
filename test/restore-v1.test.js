// restore-v1 while the program runs (issue 3, restore.md): backups appear on disk while it
// commits, each a valid snapshot file whose every slot holds what was committed there; an
// idle program causes no writes; unconfigured memory is never snapshotted nor written over
// a good backup; and killing the host during persistence never leaves a torn backup.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { SnapshotFile } from 'shmfd/snapshot';
import { COUNTER, fingerprint, fixture, isDead, isStopped, RAW, readCounterBackup, runHost, seededRandom, sleep, startHost, tempDir, tempFiles, waitFor } from './helpers.js';

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
  // Each version seen is held open: its inode number cannot be handed to a later one.
  const held = [];
  t.after(() => held.forEach((fd) => fs.closeSync(fd)));
  await waitFor(() => {
    assert.equal(host.child.exitCode, null, 'the program is still running');
    const b = readCounterBackup(backup);
    if (b === undefined) return false;
    assertSlotsIntact(b);
    if (seen.at(-1) !== b.counter) seen.push(b.counter);
    const fd = fs.openSync(backup, 'r');
    const { ino } = fs.fstatSync(fd);
    if (inodes.has(ino)) fs.closeSync(fd);
    else {
      inodes.add(ino);
      held.push(fd);
    }
    return seen.length >= 3;
  }, 'three successive backups while the program runs', 60_000, 5);
  for (let i = 1; i < seen.length; i++) assert.ok(seen[i] > seen[i - 1], `counters only grow: ${seen}`);
  assert.ok(inodes.size >= 2, 'each backup replaced the previous file');
  host.child.kill('SIGTERM');
  const end = await host.exited;
  assert.equal(end.code, 143, end.stderr);
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
  // Every round reads the memory's head page (one pread): the host's read count tells
  // when it has run rounds, however slow the machine. The only other reads are the event
  // loop's wake-ups as the last persisting round's file operations complete (seven in a
  // strace of it), so 50 more reads hold some 40 rounds; 20 are asserted.
  const reads = () => Number(/^syscr: (\d+)$/m.exec(fs.readFileSync(`/proc/${host.child.pid}/io`, 'utf8'))[1]);
  const readsBefore = reads();
  await waitFor(() => reads() >= readsBefore + 50, 'forty more rounds of the host');
  assert.deepEqual(fingerprint(backup), before, 'no backup was written while nothing was committed');
  host.child.kill('SIGTERM');
  const end = await host.exited;
  assert.equal(end.code, 143);
  const rounds = /snapshot rounds: (\d+) persisted, (\d+) unchanged/.exec(end.stderr);
  assert.ok(rounds !== null && Number(rounds[2]) >= 20, `rounds were skipped, not run: ${rounds?.[0]}`);
});

test('memory that is not a snapshot file is never snapshotted, and never replaces a good backup at exit', async (t) => {
  const dir = tempDir(t);
  const backup = path.join(dir, 'b');
  const made = await runHost(['--snapshot=restore-v1', backup, process.execPath, COUNTER, '--commits', '2', '--exit']);
  assert.equal(made.code, 0, made.stderr);
  const before = fingerprint(backup);
  // The program overwrites the head with text: the memory is no snapshot file any more.
  const r = await runHost(['--snapshot=restore-v1', '--interval', '5', backup, process.execPath, RAW, '--write', 'not a snapshot', '--code', '4']);
  assert.equal(r.code, 4);
  assert.match(r.stderr, /warning: the program never configured its memory as a snapshot file; the backup .* is kept as it was/);
  assert.equal(r.stderr.trim().split('\n').length, 1, r.stderr);
  assert.deepEqual(fingerprint(backup), before);

  // No backup at all, and a program that never configures its memory: nothing is written.
  const fresh = path.join(dir, 'fresh');
  const f = await runHost(['--snapshot=restore-v1', fresh, process.execPath, RAW, '--write', 'raw']);
  assert.equal(f.code, 0);
  assert.match(f.stderr, /nothing was written/);
  assert.equal(fs.existsSync(fresh), false);
  assert.deepEqual(tempFiles(dir), []);
});

/** SIGKILL to `pid`, unless it is gone already. */
function killIfThere(pid) {
  try {
    process.kill(pid, 'SIGKILL');
  } catch (err) {
    if (err.code !== 'ESRCH') throw err;
  }
}

/** Bytes the file system holds for `file` (its allocated blocks), 0 when it is gone. */
function allocated(file) {
  try {
    return fs.statSync(file).blocks * 512;
  } catch {
    return 0;
  }
}

/** Identity of the file at `file` now: a replacement by rename changes it. */
function identity(file) {
  const stat = fs.statSync(file, { bigint: true });
  return `${stat.ino}:${stat.ctimeNs}`;
}

/**
 * Checks a backup of `restore-counter --size SIZE --fill FILL` byte by byte, with nothing
 * of the code under test: the head that program configures (entries 0x100, data 0x800),
 * every slot that claims a snapshot holding a counter at its stream position, counters
 * growing with position, the tail log holding 1..c for the newest counter c, and the
 * fill to the last byte. Returns the newest counter.
 */
function checkCounterBackup(file, size, fill) {
  const PAGE = 4096;
  const bytes = fs.readFileSync(file);
  assert.equal(bytes.length, size, `${file} has the size of the memory`);
  assert.equal(bytes.readBigUInt64LE(0x00), 0x96c2a6f4b68519b3n, 'the head holds the snapshot magic');
  assert.equal(bytes.readBigUInt64LE(0x08), 0xffn, 'entry_mask');
  assert.equal(bytes.readBigUInt64LE(0x10), 0x7ffn, 'data_mask');
  const writeOffset = Number(bytes.readBigUInt64LE(0x18));
  const DATA_START = 2 * PAGE;
  const TAIL_START = 3 * PAGE;
  const slots = [];
  for (let i = 0; i < 0x100; i++) {
    const offset = Number(bytes.readBigUInt64LE(PAGE + 16 * i));
    const length = Number(bytes.readBigUInt64LE(PAGE + 16 * i + 8));
    if (length === 0) continue;
    assert.equal(length, 8, `slot ${i}: an 8-byte counter`);
    assert.ok(offset + 8 <= writeOffset && offset >= writeOffset - 0x800, `slot ${i} at ${offset} lies in the ring before write_offset ${writeOffset}`);
    const counter = Number(bytes.readBigUInt64BE(DATA_START + (offset % 0x800)));
    slots.push({ i, offset, counter });
  }
  assert.ok(slots.length > 0, 'a persisted backup holds at least one snapshot');
  slots.sort((a, b) => a.offset - b.offset);
  for (let k = 1; k < slots.length; k++) {
    const [a, b] = [slots[k - 1], slots[k]];
    assert.ok(b.counter > a.counter && b.offset - a.offset >= 8 * (b.counter - a.counter), `slot ${b.i} at ${b.offset} holds ${b.counter}, after ${a.counter} at ${a.offset}`);
  }
  const newest = slots.at(-1).counter;
  for (let c = 1; c <= Math.min(newest, LOG_ENTRIES); c++) {
    assert.equal(bytes.readBigUInt64LE(TAIL_START + 8 * (c - 1)), BigInt(c), `tail log entry ${c - 1}`);
  }
  const chunk = Buffer.alloc(PAGE, fill);
  for (let at = TAIL_START + 8 * LOG_ENTRIES; at < size; at += PAGE) {
    if (!bytes.subarray(at, at + PAGE).equals(chunk)) assert.fail(`the copy is whole, to the last byte of the tail: the page at ${at} differs`);
  }
  return newest;
}

test('SIGKILL of the host during persistence, again and again: the backup is always a whole valid one, and leftovers are removed at the next start', async (t) => {
  const dir = tempDir(t);
  const backup = path.join(dir, 'b');
  const SIZE = 64 * 2 ** 20;
  const FILL = 7;
  const random = seededRandom(12345).next;
  // Where each kill lands, by what the host is doing, never by the clock: while the
  // temporary file grows to a random fraction of the memory (the copy), once it is whole
  // (fix-up, fsync, rename), and just after a new backup took the old one's place.
  const aims = ['copy', 'copy', 'copied', 'renamed'];
  const landed = [];
  let previous = 0;
  let leftovers = [];
  let running = [];
  t.after(() => running.forEach((pid) => killIfThere(pid)));
  for (let round = 0; round < 8; round++) {
    const host = startHost(['--snapshot=restore-v1', '--interval', '1', '--log-level', 'debug', backup, process.execPath, COUNTER, '--size', String(SIZE), '--fill', String(FILL), '--every', '2']);
    running = [host.child.pid];
    const start = await host.next();
    running.push(start.pid);
    assert.equal(start.recovered, previous, 'the program starts from the backup on disk');
    for (const name of leftovers) assert.ok(!fs.existsSync(path.join(dir, name)), `${name} was removed at start`);
    // Aimed kills need a backup that a persist replaces: the first host makes one.
    if (round === 0) await waitFor(() => /snapshot persisted/.test(host.stderr), 'a first persisted backup', 120_000);

    const aim = aims[round % aims.length];
    const fraction = random();
    const before = identity(backup);
    // The copy skips holes: the pages of the tail log not written yet may be some.
    const data = SIZE - 8 * LOG_ENTRIES;
    const hit = () => {
      if (aim === 'renamed') return identity(backup) !== before;
      const target = aim === 'copy' ? fraction * data : data;
      return tempFiles(dir).some((name) => allocated(path.join(dir, name)) >= target);
    };
    // Stopped first, the host is caught exactly where it is: the kill lands there.
    await waitFor(
      async () => {
        if (!hit()) return false;
        process.kill(host.child.pid, 'SIGSTOP');
        await waitFor(() => isStopped(host.child.pid), 'the host to stop', 60_000, 1);
        if (aim === 'renamed' || tempFiles(dir).length > 0) return true;
        process.kill(host.child.pid, 'SIGCONT'); // the persist ended meanwhile: aim at the next one
        return false;
      },
      `a kill aimed at "${aim}"`,
      120_000,
      1,
    );
    const during = tempFiles(dir).length > 0;
    host.child.kill('SIGKILL');
    await host.exit;
    killIfThere(start.pid);
    await waitFor(() => isDead(start.pid), 'the orphaned program to end', 60_000, 5);
    leftovers = tempFiles(dir);
    landed.push(`${aim}${aim === 'copy' ? ` ${(fraction * 100).toFixed(0)}%` : ''}: ${during ? 'during a persist' : 'between persists'}`);
    if (aim !== 'renamed') assert.ok(leftovers.length > 0, 'the kill hit a persist in progress: its temporary file is left');
    const counter = checkCounterBackup(backup, SIZE, FILL);
    assert.ok(counter >= previous, `the durable counter never goes back (${previous} -> ${counter})`);
    previous = counter;
  }
  t.diagnostic(`kills: ${landed.join('; ')}`);
});

test('restore-v1: a program that ends without snapshots does not replace a backup the host persisted while it ran', async (t) => {
  const dir = tempDir(t);
  const backup = path.join(dir, 'b');
  const r = await runHost(['--snapshot=restore-v1', '--interval', '20', '--log-level', 'debug', backup, process.execPath, fixture('restore-drop-all.js'), backup]);
  assert.equal(r.code, 0, r.stderr);
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
  assert.equal(end.code, 0, end.stderr);
  assert.ok(seen.size >= 10, `only ${seen.size} backups seen`);
  assert.deepEqual(bad, [], `${bad.length} of ${seen.size} backups were short`);
});
