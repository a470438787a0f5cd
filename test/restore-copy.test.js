// The sparse copy of shm-restore (src/restore/copy.ts), between a real memfd and a real
// file: only the data extents are copied and the holes stay holes, the destination gets
// the asked size, the descriptors' offsets stay where they were, progress is reported
// per chunk, and an abort stops the copy between chunks.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { MemoryFile } from 'shmfd';
import { CHUNK, copySparse, dataExtents } from '../dist/restore/copy.js';
import { seededRandom, tempDir } from './helpers.js';

const PAGE = 4096;
const MiB = 2 ** 20;

/**
 * A memfd of `size` bytes with `pieces` written at their offsets, closed when `t` ends.
 * @param {import('node:test').TestContext} t
 * @param {number} size
 * @param {Array<[number, Uint8Array]>} pieces
 */
function memoryWith(t, size, pieces) {
  const memory = MemoryFile.create('copy-source', { size });
  t.after(() => memory.close());
  for (const [offset, bytes] of pieces) fs.writeSync(memory.fd, bytes, 0, bytes.length, offset);
  return memory;
}

/** A new empty file in a temporary directory, opened read-write. */
function destination(/** @type {import('node:test').TestContext} */ t) {
  const file = path.join(tempDir(t), 'copy');
  const fd = fs.openSync(file, 'w+');
  t.after(() => fs.closeSync(fd));
  return { file, fd };
}

/** `length` seeded random bytes (no run of zeros a hole could stand for). */
function randomBytes(/** @type {number} */ seed, /** @type {number} */ length) {
  const random = seededRandom(seed);
  return Uint8Array.from({ length }, () => random.int(1, 255));
}

test('data extents: the written pages of a memfd, in order, within the size asked for', (t) => {
  const memory = memoryWith(t, 64 * MiB, [
    [0, randomBytes(1, 10)],
    [5 * MiB + 100, randomBytes(2, 2 * PAGE)],
    [40 * MiB, randomBytes(3, 1)],
  ]);
  assert.deepEqual(dataExtents(memory.fd, 64 * MiB), [
    [0, PAGE],
    [5 * MiB, 5 * MiB + 3 * PAGE],
    [40 * MiB, 40 * MiB + PAGE],
  ]);
  assert.deepEqual(dataExtents(memory.fd, 5 * MiB + PAGE), [
    [0, PAGE],
    [5 * MiB, 5 * MiB + PAGE],
  ], 'an extent is cut at the size');
  assert.deepEqual(dataExtents(memoryWith(t, 8 * MiB, []).fd, 8 * MiB), [], 'nothing written: no extent');
});

test('a sparse copy: the same bytes, the asked size, holes kept as holes, only the extents copied', async (t) => {
  const size = 256 * MiB;
  const pieces = /** @type {Array<[number, Uint8Array]>} */ ([
    [0, randomBytes(4, 3 * PAGE)],
    [100 * MiB + 12345, randomBytes(5, 70_000)],
    [200 * MiB - 7, randomBytes(6, 7)], // then a hole up to the end: the size comes from the truncate
  ]);
  const memory = memoryWith(t, size, pieces);
  const dest = destination(t);
  const { copied } = await copySparse(memory.fd, dest.fd, size);
  const extents = dataExtents(memory.fd, size);
  assert.equal(copied, extents.reduce((sum, [start, end]) => sum + end - start, 0), 'copied the extents, nothing else');
  const stat = fs.fstatSync(dest.fd);
  assert.equal(stat.size, size);
  assert.ok(stat.blocks * 512 <= copied + 16 * PAGE, `holes stay holes: ${stat.blocks * 512} bytes allocated for ${copied} copied`);
  const copy = fs.readFileSync(dest.file);
  for (const [offset, bytes] of pieces) assert.deepEqual(copy.subarray(offset, offset + bytes.length), Buffer.from(bytes), `the piece at ${offset}`);
  assert.equal(Buffer.compare(copy, fs.readFileSync(`/proc/self/fd/${memory.fd}`)), 0, 'byte for byte the same');
});

test('a copy of the first SIZE bytes of a longer source; the offsets of both descriptors stay where they were', async (t) => {
  const memory = memoryWith(t, 4 * MiB, [[0, randomBytes(7, 3 * MiB)]]);
  const dest = destination(t);
  const head = Buffer.alloc(10);
  fs.readSync(memory.fd, head, 0, 10, null); // the source's offset is now 10, as a program's may be
  fs.writeSync(dest.fd, 'xyz', null); // the destination's offset is now 3
  await copySparse(memory.fd, dest.fd, MiB + 1);
  assert.equal(fs.fstatSync(dest.fd).size, MiB + 1);
  assert.deepEqual(fs.readFileSync(dest.file), fs.readFileSync(`/proc/self/fd/${memory.fd}`).subarray(0, MiB + 1));
  const next = Buffer.alloc(5);
  fs.readSync(memory.fd, next, 0, 5, null);
  assert.deepEqual(next, fs.readFileSync(`/proc/self/fd/${memory.fd}`).subarray(10, 15), "the source's offset did not move");
  fs.writeSync(dest.fd, 'Q', null);
  assert.equal(fs.readFileSync(dest.file).subarray(3, 4).toString(), 'Q', "the destination's offset did not move");
});

test('progress after every chunk, up to the total; an abort between chunks throws its reason', async (t) => {
  const size = 3 * CHUNK + PAGE;
  const memory = memoryWith(t, size, [
    [0, randomBytes(8, 2 * CHUNK + 5)],
    [3 * CHUNK, randomBytes(9, 1)],
  ]);
  const total = 2 * CHUNK + PAGE + PAGE;
  /** @type {Array<[number, number]>} */
  const calls = [];
  await copySparse(memory.fd, destination(t).fd, size, { progress: (copied, all) => calls.push([copied, all]) });
  assert.deepEqual(calls, [
    [CHUNK, total],
    [2 * CHUNK, total],
    [2 * CHUNK + PAGE, total],
    [total, total],
  ]);

  const controller = new AbortController();
  const reason = new Error('stop here');
  const dest = destination(t);
  let chunks = 0;
  const copy = copySparse(memory.fd, dest.fd, size, {
    signal: controller.signal,
    progress: () => {
      chunks++;
      controller.abort(reason);
    },
  });
  await assert.rejects(copy, (err) => err === reason);
  assert.equal(chunks, 1, 'no chunk after the abort');
  assert.equal(fs.fstatSync(dest.fd).blocks * 512 <= CHUNK + 16 * PAGE, true, 'the rest was not copied');

  const aborted = new AbortController();
  aborted.abort(reason);
  await assert.rejects(copySparse(memory.fd, destination(t).fd, size, { signal: aborted.signal }), (err) => err === reason, 'aborted before the start');
});
