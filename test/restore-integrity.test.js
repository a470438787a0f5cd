// The integrity record of backups (issue 7, "a flipped bit throws away a good backup"):
// with every backup it writes, shm-restore records its size and a SHA-256 digest of the part
// that decides what the snapshots are (restore-v1: everything before the tail; without
// --snapshot: the whole file) in the extended attribute user.shmfd.check, and refuses at
// start a backup that no longer matches it. A restore-v1 backup without the record whose
// head shows no valid snapshot is refused too: either way, a good backup is never replaced
// by a fresh state because it now reads as empty.
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { BackupFile } from '../dist/restore/backup.js';
import * as sys from '../dist/system/libc.js';
import { COUNTER, fingerprint, RAW, readCounterBackup, run, runHost, seededRandom, SHM_RESTORE, startHost, tempDir, tempFiles, writeInPlace } from './helpers.js';

const CHECK = 'user.shmfd.check';
const WRITE_OFFSET = 0x18;

function attribute(file, name = CHECK) {
  const fd = fs.openSync(file, 'r');
  try {
    return sys.getXattr(fd, name);
  } finally {
    fs.closeSync(fd);
  }
}

/** Sets an extended attribute; false where the file system keeps none. */
function setAttribute(file, value, name = CHECK) {
  const fd = fs.openSync(file, 'r');
  try {
    return sys.setXattr(fd, name, value);
  } finally {
    fs.closeSync(fd);
  }
}

function flipBit(file, byte, bit) {
  const b = Buffer.alloc(1);
  const fd = fs.openSync(file, 'r+');
  try {
    fs.readSync(fd, b, 0, 1, byte);
    b[0] ^= 1 << bit;
    fs.writeSync(fd, b, 0, 1, byte);
  } finally {
    fs.closeSync(fd);
  }
}

function u64(value) {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(value);
  return b;
}

/**
 * A backup of 64 KiB with 3 snapshots written by the real host (restore-v1 unless `args`
 * say otherwise); undefined, and the test skipped, where the file system keeps no user
 * extended attributes.
 */
async function hostBackup(t, dir, name = 'good', args = ['--snapshot=restore-v1']) {
  const probe = path.join(dir, '.probe');
  fs.writeFileSync(probe, '');
  const kept = setAttribute(probe, 'x');
  fs.rmSync(probe);
  if (!kept) {
    t.skip(`the file system of ${dir} keeps no user extended attributes`);
    return undefined;
  }
  const file = path.join(dir, name);
  const r = await runHost([...args, file, process.execPath, COUNTER, '--commits', '3', '--exit']);
  assert.equal(r.code, 0, r.stderr);
  assert.notEqual(attribute(file), undefined, `the host records ${CHECK}`);
  return file;
}

/** A copy made the way a user makes one: `cp`, which keeps no extended attributes. */
async function plainCopy(from, to) {
  const r = await run('cp', [from, to]);
  assert.equal(r.code, 0, r.stderr);
  assert.equal(attribute(to), undefined, 'cp keeps no extended attributes');
  return to;
}

/** Runs the host on `backup` with the counter program and checks the refusal. */
async function expectRefusal(backup, args, problem) {
  const dir = path.dirname(backup);
  const marker = path.join(dir, 'program-ran');
  const before = fingerprint(backup);
  const r = await run(process.execPath, [SHM_RESTORE, ...args, backup, 'touch', marker]);
  assert.equal(r.code, 125, `${backup}: ${r.stdout}${r.stderr}`);
  const lines = r.stderr.trim().split('\n');
  assert.equal(lines.length, 1, r.stderr);
  assert.ok(lines[0].startsWith(`shm-restore: error: backup ${backup}: `), lines[0]);
  assert.match(lines[0], problem);
  assert.equal(fs.existsSync(marker), false, 'the program must not run');
  assert.deepEqual(fingerprint(backup), before, 'the backup must be untouched');
  assert.deepEqual(tempFiles(dir), []);
  return lines[0];
}

const CHANGED = /: changed since shm-restore wrote it: its first \d+ bytes no longer match the digest recorded in user\.shmfd\.check \(to restore it anyway, drop the record: cp .* && mv .*\)$/;
const NO_SNAPSHOT = /: holds no valid snapshot though it has the snapshot magic, and no user\.shmfd\.check record vouches for it: damaged, or not written by a restore-v1 host \(to start fresh anyway, move it aside: mv .*\)$/;

test('a flipped bit in write_offset of a backup the host wrote is refused in both modes, not replaced by a fresh state', async (t) => {
  const dir = tempDir(t);
  const file = await hostBackup(t, dir);
  if (file === undefined) return;
  const good = readCounterBackup(file);
  assert.equal(good.valid, 3);

  // Bit 5 of byte 0x1c: write_offset grows by 2^37 and every slot falls out of the ring.
  flipBit(file, 0x1c, 5);
  for (const args of [['--snapshot=restore-v1'], []]) await expectRefusal(file, args, CHANGED);
  flipBit(file, 0x1c, 5);
  writeInPlace(file, WRITE_OFFSET, u64(2n ** 40n));
  await expectRefusal(file, ['--snapshot=restore-v1'], CHANGED);

  // Put back, the backup restores its newest snapshot.
  writeInPlace(file, WRITE_OFFSET, u64(BigInt(good.head.writeOffset)));
  const host = startHost(['--snapshot=restore-v1', file, process.execPath, COUNTER, '--commits', '1', '--exit']);
  assert.equal((await host.next()).recovered, good.counter);
  assert.equal((await host.exited).code, 0);
});

test('restore-v1: a copy without the record (cp) whose head shows no valid snapshot is refused, not replaced', async (t) => {
  const dir = tempDir(t);
  const file = await hostBackup(t, dir);
  if (file === undefined) return;
  const good = readCounterBackup(file);
  for (const [name, offset] of Object.entries({ 'bit-37': BigInt(good.head.writeOffset) ^ (1n << 37n), '2^40': 2n ** 40n })) {
    const copy = await plainCopy(file, path.join(dir, name));
    writeInPlace(copy, WRITE_OFFSET, u64(offset));
    await expectRefusal(copy, ['--snapshot=restore-v1'], NO_SNAPSHOT);
  }
  // A copy that still shows its snapshots is restored (the Rust host's files have no record).
  const copy = await plainCopy(file, path.join(dir, 'intact'));
  const host = startHost(['--snapshot=restore-v1', copy, process.execPath, COUNTER, '--commits', '1', '--exit']);
  assert.equal((await host.next()).recovered, good.counter);
  assert.equal((await host.exited).code, 0);
});

test('60 seeded single-bit flips in the head: with the record each is refused; without it none reads as empty', async (t) => {
  const dir = tempDir(t);
  const file = await hostBackup(t, dir);
  if (file === undefined) return;
  const original = fs.readFileSync(file);
  const copy = await plainCopy(file, path.join(dir, 'copy'));
  const random = seededRandom(7);
  let refusedWithoutRecord = 0;
  for (let i = 0; i < 60; i++) {
    const byte = random.int(0, 31);
    const bit = random.int(0, 7);
    const what = `flip of bit ${bit} of byte 0x${byte.toString(16)}`;
    for (const f of [file, copy]) {
      writeInPlace(f, 0, original);
      flipBit(f, byte, bit);
    }
    assert.throws(() => new BackupFile(file).inspect('snapshot'), { code: 'ERR_BACKUP_DAMAGED', message: CHANGED }, `${what}, with the record`);
    // Without the record the format alone decides (a flipped mask may even move the ring):
    // it may accept the file, but never as one without snapshots, which starts fresh.
    let found;
    try {
      found = new BackupFile(copy).inspect('snapshot');
    } catch (err) {
      assert.match(err.code, /^ERR_BACKUP_(INVALID|DAMAGED)$/, `${what}, without the record: ${err.message}`);
      refusedWithoutRecord++;
      continue;
    }
    assert.ok(found.state === 'present' && found.slots !== undefined && found.slots.slots.length > 0, `${what}: accepted without a snapshot`);
  }
  assert.ok(refusedWithoutRecord > 0, 'some flips hit the fields that matter');
});

test('status shows a changed backup as damaged, with the reason, in both modes', async (t) => {
  const dir = tempDir(t);
  const file = await hostBackup(t, dir);
  if (file === undefined) return;
  const intact = await runHost(['status', file]);
  assert.match(intact.stdout, /^integrity record: verified \(size, and digest of the first 12288 bytes\)$/m);
  // Without the magic, the bytes would pass for a raw memory image.
  flipBit(file, 0, 0);
  for (const args of [['status', file], ['--snapshot=restore-v1', 'status', file]]) {
    const r = await runHost(args);
    assert.equal(r.code, 1, r.stdout + r.stderr);
    assert.equal(r.stderr, '');
    assert.match(r.stdout, new RegExp(`^backup: ${file}$`, 'm'));
    assert.match(r.stdout, /^state: damaged: changed since shm-restore wrote it: its first \d+ bytes no longer match the digest/m);
    assert.doesNotMatch(r.stdout, /raw memory image/);
  }
  const copy = await plainCopy(file, path.join(dir, 'copy'));
  flipBit(copy, 0, 0);
  writeInPlace(copy, WRITE_OFFSET, u64(2n ** 40n));
  const r = await runHost(['--snapshot=restore-v1', 'status', copy]);
  assert.equal(r.code, 1);
  assert.match(r.stdout, /^state: damaged: holds no valid snapshot though it has the snapshot magic/m);
  const plain = await runHost(['status', copy]);
  assert.equal(plain.code, 0, 'without --snapshot a host would restore it as it is');
  assert.match(plain.stdout, /^integrity record: none /m);
  assert.match(plain.stdout, /^snapshots: 0$/m);
});

test('a raw image is covered whole: a change anywhere is refused', async (t) => {
  const dir = tempDir(t);
  if ((await hostBackup(t, dir)) === undefined) return;
  const file = path.join(dir, 'raw');
  const r = await runHost([file, process.execPath, RAW, '--write', 'text', '--size', '65536', '--fill', '7']);
  assert.equal(r.code, 0, r.stderr);
  const size = fs.statSync(file).size;
  assert.match(attribute(file), new RegExp(`^v1 size=${size} region=${size} sha256-1m=[0-9a-f]{64}$`));
  flipBit(file, size - 1, 0);
  await expectRefusal(file, [], new RegExp(`its first ${size} bytes no longer match`));
  flipBit(file, size - 1, 0);
  const again = await runHost([file, 'true']);
  assert.equal(again.code, 0, again.stderr);
});

test('the digest is SHA-256 over the SHA-256 of each 1 MiB block, and follows the content, not the holes', async (t) => {
  const dir = tempDir(t);
  if ((await hostBackup(t, dir)) === undefined) return;
  const file = path.join(dir, 'sparse');
  const SIZE = 5 * 2 ** 20 + 123;
  const r = await runHost([file, process.execPath, RAW, '--write', 'text', '--size', String(SIZE)]);
  assert.equal(r.code, 0, r.stderr);
  const bytes = fs.readFileSync(file);
  const blocks = [];
  for (let at = 0; at < bytes.length; at += 2 ** 20) blocks.push(crypto.createHash('sha256').update(bytes.subarray(at, at + 2 ** 20)).digest());
  const digest = crypto.createHash('sha256').update(Buffer.concat(blocks)).digest('hex');
  assert.equal(attribute(file), `v1 size=${SIZE} region=${SIZE} sha256-1m=${digest}`);
  const sparse = fs.statSync(file).blocks;
  // The same bytes, the holes now written as zeros (in place: the record stays).
  const fd = fs.openSync(file, 'r+');
  fs.writeSync(fd, bytes, 0, bytes.length, 0);
  fs.closeSync(fd);
  assert.ok(fs.statSync(file).blocks > sparse, 'the holes are filled');
  const again = await runHost([file, 'true']);
  assert.equal(again.code, 0, again.stderr);
});

test('a snapshot file is covered up to its tail, whichever mode wrote it', async (t) => {
  const dir = tempDir(t);
  for (const args of [['--snapshot=restore-v1'], []]) {
    const file = await hostBackup(t, dir, `b${args.length}`, args);
    if (file === undefined) return;
    const { head } = readCounterBackup(file);
    const size = fs.statSync(file).size;
    assert.match(attribute(file), new RegExp(`^v1 size=${size} region=${head.tailStart} sha256-1m=[0-9a-f]{64}$`));
    // The last byte of the data ring is covered; the tail is the program's own.
    flipBit(file, head.tailStart - 1, 0);
    await expectRefusal(file, args, new RegExp(`its first ${head.tailStart} bytes no longer match`));
  }
});

test('a damaged record is refused: the size is decimal digits only, the record one of a known version', async (t) => {
  const dir = tempDir(t);
  const file = await hostBackup(t, dir);
  if (file === undefined) return;
  const good = attribute(file);
  const [, size, rest] = /^v1 size=(\d+)( .*)$/.exec(good);
  const hex = `0x${Number(size).toString(16)}`;
  // The host's own refusal of one of them; the rest through the same check, in-process.
  setAttribute(file, `v1 size=${hex}${rest}`);
  await expectRefusal(file, ['--snapshot=restore-v1'], /: its user\.shmfd\.check attribute is damaged: ".*" is not "v1 size=N region=M sha256-1m=HEX" \(to restore it anyway, drop the record: cp /);
  const refused = (value, problem) => {
    setAttribute(file, value);
    for (const format of /** @type {const} */ (['snapshot', 'raw'])) {
      assert.throws(() => new BackupFile(file).inspect(format), { code: 'ERR_BACKUP_DAMAGED', message: problem }, value);
    }
  };
  for (const value of [`${Number(size) / 1000}e3`, ` ${size}`, `${size} `, `+${size}`, `${size}.0`, '', '9'.repeat(17)]) {
    refused(`v1 size=${value}${rest}`, /attribute is damaged: ".*" (is not "v1 size=N region=M sha256-1m=HEX"|holds numbers beyond 2\^53)/);
  }
  refused(good.replace(/sha256-1m=[0-9a-f]{4}/, 'sha256-1m=ABCD'), /attribute is damaged/);
  refused(good.replace(/region=\d+/, `region=${Number(size) + 1}`), /attribute is damaged: it covers 65537 bytes of a 65536-byte file/);
  refused(good.replace(/^v1/, 'v2'), /: its user\.shmfd\.check attribute is of a version this shm-restore does not know \("v2 [^"]*"; written by a newer one\?\)/);
  setAttribute(file, good);
  const r = await runHost([file, 'true']);
  assert.equal(r.code, 0, r.stderr);
});

test('the way to restore a refused backup anyway needs nothing beyond coreutils, and works', async (t) => {
  const dir = tempDir(t);
  const file = await hostBackup(t, dir, 'state of the art');
  if (file === undefined) return;
  const good = readCounterBackup(file);
  // Cut short inside the tail: the snapshots are all still there.
  fs.truncateSync(file, good.size - 4096);
  const line = await expectRefusal(file, ['--snapshot=restore-v1'], /: is 61440 bytes, but shm-restore wrote 65536 bytes: it was cut short or extended since \(to restore it anyway, drop the record: /);
  assert.doesNotMatch(line, /setfattr/);
  const command = /drop the record: (.*)\)$/.exec(line)[1];
  const r = await run('sh', ['-c', command]);
  assert.equal(r.code, 0, r.stderr);
  const host = startHost(['--snapshot=restore-v1', file, process.execPath, COUNTER, '--commits', '1', '--exit']);
  assert.equal((await host.next()).recovered, good.counter);
  assert.equal((await host.exited).code, 0);
});

test('the final error after the backup directory was removed, or the backup replaced by a directory, says what is on disk', async (t) => {
  for (const damage of ['removed', 'directory']) {
    const dir = path.join(tempDir(t), 'state');
    fs.mkdirSync(dir);
    const file = path.join(dir, 'b');
    fs.writeFileSync(file, 'old');
    const host = startHost([file, process.execPath, COUNTER, '--commits', '0', '--report-offset']);
    await host.next();
    fs.rmSync(dir, { recursive: true });
    if (damage === 'directory') fs.mkdirSync(file, { recursive: true });
    host.child.kill('SIGTERM');
    const end = await host.exited;
    assert.equal(end.code, 125, end.stderr);
    const lines = end.stderr.trim().split('\n');
    assert.equal(lines.length, 1, end.stderr);
    assert.match(lines[0], /^shm-restore: error: the final write-back to .* failed: /);
    assert.doesNotMatch(lines[0], /previous one/);
    if (damage === 'removed') assert.match(lines[0], new RegExp(`; there is no backup: its directory ${dir} was removed, the newest state is lost$`));
    else assert.match(lines[0], new RegExp(`; there is no backup: ${file} is now a directory, the newest state is lost$`));
  }
});

test('restore-v1: a program that configures its memory but never commits leaves no backup without a snapshot; one with a record is restored', async (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, 'b');
  const host = startHost(['--snapshot=restore-v1', file, process.execPath, COUNTER, '--commits', '0', '--report-offset']);
  await host.next();
  host.child.kill('SIGTERM');
  const end = await host.exited;
  assert.equal(end.code, 0, end.stderr);
  assert.match(end.stderr, /warning: the memory holds no valid snapshot; nothing was written to /);
  assert.equal(fs.existsSync(file), false);
  assert.deepEqual(tempFiles(dir), []);

  // Without --snapshot the memory is written as it is; its record then vouches for it.
  const plain = startHost([file, process.execPath, COUNTER, '--commits', '0', '--report-offset']);
  await plain.next();
  plain.child.kill('SIGTERM');
  assert.equal((await plain.exited).code, 0);
  if (attribute(file) === undefined) return;
  assert.equal(readCounterBackup(file).valid, 0);
  const vouched = startHost(['--snapshot=restore-v1', file, process.execPath, COUNTER, '--commits', '1', '--exit']);
  const first = await vouched.next();
  assert.equal(first.recovered, 0);
  assert.equal(first.valid, 0);
  assert.equal((await vouched.exited).code, 0);
});
