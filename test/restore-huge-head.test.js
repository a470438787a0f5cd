// Heads that ask for absurd regions (issue 7, "unbounded reads from a damaged head"): a
// sparse 64 GiB backup with a valid head whose entry_mask claims 2^26 or more slots made
// `status` read a 1 GiB sequence region (2^26) or die of Node's internal range errors
// (2^27 and up). They are refused from the head page alone: one line, nothing read or
// allocated in proportion to the mask, the program never runs, the backup is untouched.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { HEAD, MAGIC, MAX_ENTRIES, PAGE } from '../dist/snapshot/format.js';
import { assertOneErrorLine, run, runHost, SHM_RESTORE, tempDir, tempFiles } from './helpers.js';

const SIZE = 64 * 2 ** 30;

/** A sparse file of SIZE bytes whose only data is a configured head page and one 1-byte snapshot. */
function sparseBackup(dir, name, entries) {
  const file = path.join(dir, name);
  const head = Buffer.alloc(PAGE);
  head.writeBigUInt64LE(MAGIC, HEAD.version);
  head.writeBigUInt64LE(BigInt(entries) - 1n, HEAD.entryMask);
  head.writeBigUInt64LE(0x7ffn, HEAD.dataMask);
  head.writeBigUInt64LE(1n, HEAD.writeOffset);
  fs.writeFileSync(file, head);
  // Slot 0 = (offset 0, length 1): a snapshot file without one is refused as damaged.
  const slot = Buffer.alloc(16);
  slot.writeBigUInt64LE(1n, 8);
  const fd = fs.openSync(file, 'r+');
  fs.writeSync(fd, slot, 0, 16, PAGE);
  fs.closeSync(fd);
  fs.truncateSync(file, SIZE);
  return file;
}

/** What must not change: size, mtime, inode, and the head page (the rest is a hole). */
function fingerprint(file) {
  const stat = fs.statSync(file);
  const fd = fs.openSync(file, 'r');
  const head = Buffer.alloc(PAGE);
  fs.readSync(fd, head, 0, PAGE, 0);
  fs.closeSync(fd);
  return { size: stat.size, mtimeMs: stat.mtimeMs, ino: stat.ino, blocks: stat.blocks, head: head.toString('hex') };
}

test('status and a run refuse a 64 GiB backup whose head claims 2^26 to 2^40 slots at once, with one line saying what is wrong', async (t) => {
  const dir = tempDir(t);
  /** @type {Array<[number, string]>} */
  const cases = [
    ...[26, 27, 31].map((k) => /** @type {[number, string]} */ ([k, `entry_mask 0x${(2 ** k - 1).toString(16)} describes ${2 ** k} slots, above the ${MAX_ENTRIES} this implementation reads`])),
    [40, `entries 0x${(2 ** 40).toString(16)} and data 0x800 need regions beyond the end of the ${SIZE}-byte file`],
  ];
  for (const [k, text] of cases) {
    const file = sparseBackup(dir, `big-${k}`, 2 ** k);
    const before = fingerprint(file);
    const problem = new RegExp(`^shm-restore: error: backup ${file}: not a valid snapshot file: ${text}$`);

    // status exits 1 for an invalid backup (its documented answer); the host 125.
    const status = await runHost(['--snapshot=restore-v1', 'status', file]);
    assert.equal(status.code, 1, `2^${k}: ${status.stdout}${status.stderr}`);
    assertOneErrorLine(status.stderr, problem, 'shm-restore');

    const marker = path.join(dir, 'program-ran');
    const host = await run(process.execPath, [SHM_RESTORE, '--snapshot=restore-v1', file, 'touch', marker]);
    assert.equal(host.code, 125, `2^${k}: ${host.stderr}`);
    assertOneErrorLine(host.stderr, problem, 'shm-restore');
    assert.equal(fs.existsSync(marker), false, 'the program must not run');
    assert.deepEqual(fingerprint(file), before, 'the backup must be untouched');
    assert.deepEqual(tempFiles(dir), []);

    // Without --snapshot the file is not read as a snapshot file; it must not be read as one of 2^k slots either.
    const raw = await runHost(['status', file]);
    assert.doesNotMatch(`${raw.stdout}${raw.stderr}`, /out of range|RangeError|state: snapshot file/, `2^${k}`);
    fs.rmSync(file);
  }
});

test(`a 64 GiB backup with MAX_ENTRIES (${MAX_ENTRIES}) slots, the largest accepted, is read`, async (t) => {
  const dir = tempDir(t);
  const file = sparseBackup(dir, 'widest', MAX_ENTRIES);
  const r = await runHost(['--snapshot=restore-v1', 'status', file]);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stdout, new RegExp(`^state: snapshot file \\(${MAX_ENTRIES} slots, 2048-byte data ring, write offset 1\\)$`, 'm'));
  assert.match(r.stdout, /^snapshots: 1/m);
});
