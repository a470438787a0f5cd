// Atomic persistence (src/restore/persist.ts) with a real memfd and real files: the copy
// goes to a temporary file next to the backup (mode 0600, the backup untouched meanwhile),
// gets its integrity record and the permission bits of the backup it replaces, and replaces
// the backup by rename; a fix-up that refuses, a failing step or an abort leave the old
// backup as it was and no temporary file behind.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { MemoryFile } from 'shmfd';
import { BackupFile } from '../dist/restore/backup.js';
import { persistAtomically } from '../dist/restore/persist.js';
import { fingerprint, tempDir, tempFiles } from './helpers.js';

const MiB = 2 ** 20;

/**
 * A memfd of `size` bytes holding `text` at offset 0 and at 3 MiB, closed when `t` ends.
 * @param {import('node:test').TestContext} t
 */
function memoryWith(t, /** @type {string} */ text, size = 4 * MiB) {
  const memory = MemoryFile.create('persist-source', { size });
  t.after(() => memory.close());
  fs.writeSync(memory.fd, text, 0);
  fs.writeSync(memory.fd, text, 3 * MiB);
  return memory;
}

/** A directory with a backup file `state` holding `old`. */
function oldBackup(/** @type {import('node:test').TestContext} */ t, old = 'the old backup') {
  const dir = tempDir(t);
  const file = path.join(dir, 'state');
  fs.writeFileSync(file, old, { mode: 0o600 });
  return { dir, file, backup: new BackupFile(file) };
}

/** The inspection of a present backup (fails the test for a missing one). */
function present(/** @type {BackupFile} */ backup) {
  const found = backup.inspect('raw');
  assert.ok(found.state === 'present', `${backup.path} is there`);
  return found;
}

test('the new backup replaces the old one by rename, with the memory bytes, mode 0600 and a verified record', async (t) => {
  const { dir, file, backup } = oldBackup(t);
  const memory = memoryWith(t, 'new state');
  const before = fingerprint(file);
  let released = 0;
  const result = await persistAtomically(backup, memory.fd, memory.size, {
    fixup: (tempFd, size) => {
      // Between copy and rename: the copy is a temporary file of its own, the backup is as it was.
      const temps = tempFiles(dir);
      assert.equal(temps.length, 1);
      assert.ok(backup.isTempName(temps[0] ?? ''));
      const stat = fs.fstatSync(tempFd);
      assert.equal(stat.mode & 0o777, 0o600);
      assert.equal(stat.ino, fs.statSync(path.join(dir, temps[0] ?? '')).ino);
      assert.equal(size, 4 * MiB);
      assert.deepEqual(fingerprint(file), before, 'the backup is untouched until the rename');
      return true;
    },
    releaseSource: () => released++,
  });
  assert.ok(result !== undefined);
  assert.equal(result.size, 4 * MiB);
  assert.equal(result.copied, 2 * 4096, 'the two written pages');
  assert.equal(result.directorySyncError, undefined);
  assert.equal(released, 1);
  const after = fs.statSync(file);
  assert.notEqual(after.ino, before.ino, 'a new file took the name: renamed, not written over');
  assert.equal(after.mode & 0o777, 0o600);
  const bytes = fs.readFileSync(file);
  assert.equal(bytes.length, 4 * MiB);
  assert.equal(bytes.subarray(0, 9).toString(), 'new state');
  assert.equal(bytes.subarray(3 * MiB, 3 * MiB + 9).toString(), 'new state');
  assert.deepEqual(tempFiles(dir), []);
  const found = present(backup);
  assert.equal(found.size, 4 * MiB);
  assert.deepEqual(found.record && { size: found.record.size, region: found.record.region }, { size: 4 * MiB, region: 4 * MiB }, 'the record covers the whole raw file');
});

test('the new backup keeps the permission bits of the one it replaces, as they are then; a first one is 0600', async (t) => {
  const { dir, file, backup } = oldBackup(t);
  const memory = memoryWith(t, 'x', 8192);
  fs.chmodSync(file, 0o640);
  await persistAtomically(backup, memory.fd, memory.size);
  assert.equal(fs.statSync(file).mode & 0o7777, 0o640);
  // Changed between two copies, as by a chmod while the host runs: the next copy keeps it.
  fs.chmodSync(file, 0o2604);
  await persistAtomically(backup, memory.fd, memory.size);
  assert.equal(fs.statSync(file).mode & 0o7777, 0o2604);
  const first = new BackupFile(path.join(dir, 'first'));
  await persistAtomically(first, memory.fd, memory.size);
  assert.equal(fs.statSync(first.path).mode & 0o7777, 0o600);
});

test('a fix-up that refuses the copy: undefined, the old backup stays as it was, no temporary file', async (t) => {
  const { dir, file, backup } = oldBackup(t);
  const before = fingerprint(file);
  const memory = memoryWith(t, 'refused');
  assert.equal(await persistAtomically(backup, memory.fd, memory.size, { fixup: () => false }), undefined);
  assert.deepEqual(fingerprint(file), before);
  assert.deepEqual(tempFiles(dir), []);
});

test('a failing step or an abort: the error or the reason, the old backup as it was, no temporary file', async (t) => {
  const { dir, file, backup } = oldBackup(t);
  const before = fingerprint(file);
  const memory = memoryWith(t, 'never persisted');
  const failure = new Error('the fix-up failed');
  const late = new AbortController();
  /** @type {Array<[string, import('../dist/restore/persist.js').PersistOptions]>} */
  const failing = [
    [
      'a throwing fix-up',
      {
        fixup: () => {
          throw failure;
        },
      },
    ],
    ['an abort before the copy', { signal: AbortSignal.abort(failure) }],
    ['an abort after the copy, before the rename', { signal: late.signal, releaseSource: () => late.abort(failure) }],
  ];
  for (const [what, options] of failing) {
    await assert.rejects(persistAtomically(backup, memory.fd, memory.size, options), (err) => err === failure, what);
    assert.deepEqual(fingerprint(file), before, what);
    assert.deepEqual(tempFiles(dir), [], what);
  }
  // A failing system call in the copy: a FIFO cannot be seeked.
  const fifo = path.join(tempDir(t), 'fifo');
  assert.equal(spawnSync('mkfifo', [fifo]).status, 0);
  const pipe = fs.openSync(fifo, 'r+');
  t.after(() => fs.closeSync(pipe));
  await assert.rejects(persistAtomically(backup, pipe, 4096), { code: 'ESPIPE' }, 'a source that cannot be copied');
  assert.deepEqual(fingerprint(file), before);
  assert.deepEqual(tempFiles(dir), []);
});

test('a backup that does not exist yet is created; one behind a symbolic link is replaced where the link points', async (t) => {
  const dir = tempDir(t);
  const memory = memoryWith(t, 'first');
  const fresh = new BackupFile(path.join(dir, 'fresh'));
  await persistAtomically(fresh, memory.fd, memory.size);
  assert.equal(fs.readFileSync(fresh.path).subarray(0, 5).toString(), 'first');
  fs.mkdirSync(path.join(dir, 'real'));
  fs.writeFileSync(path.join(dir, 'real', 'state'), 'old');
  fs.symlinkSync(path.join('real', 'state'), path.join(dir, 'link'));
  const linked = new BackupFile(path.join(dir, 'link'));
  await persistAtomically(linked, memory.fd, memory.size);
  assert.ok(fs.lstatSync(path.join(dir, 'link')).isSymbolicLink(), 'the link is kept');
  assert.equal(fs.readFileSync(path.join(dir, 'real', 'state')).subarray(0, 5).toString(), 'first');
  assert.deepEqual([...tempFiles(dir), ...tempFiles(path.join(dir, 'real'))], []);
});
