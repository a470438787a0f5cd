// The two kinds of errors a program matches on (docs/errors.md): `ShmfdError`s from
// shmfd's own checks and `SystemError`s from the kernel, both with a stable `code`, as the
// package exports them.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { isSystemError, MemoryFile, Seal, ShmfdError, SystemError } from 'shmfd';
import { tempDir } from './helpers.js';

test("a check of shmfd's own throws a ShmfdError with its ERR_ code, which is no SystemError", (t) => {
  const file = MemoryFile.create('errors-own', { size: 4096 });
  t.after(() => file.close());
  assert.throws(
    () => file.map({ length: 8192 }),
    (err) => err instanceof ShmfdError && err.code === 'ERR_MAPPING_RANGE' && !isSystemError(err),
  );
});

test('a refusal of the kernel throws a SystemError with the errno code and the system call', (t) => {
  const file = MemoryFile.create('errors-kernel', { size: 4096 });
  t.after(() => file.close());
  file.seal(Seal.SEAL); // no seal may be added after this one: fcntl(F_ADD_SEALS) says EPERM
  assert.throws(
    () => file.seal(Seal.GROW),
    (err) =>
      err instanceof SystemError &&
      err.code === 'EPERM' &&
      err.errno === 1 &&
      err.syscall === 'fcntl' &&
      isSystemError(err, 'EPERM') &&
      !isSystemError(err, 'EBADF'),
  );
});

test("isSystemError also matches node:fs's errors, by code", (t) => {
  const missing = path.join(tempDir(t), 'missing');
  assert.throws(
    () => fs.readFileSync(missing),
    (err) => !(err instanceof SystemError) && isSystemError(err) && isSystemError(err, 'ENOENT') && !isSystemError(err, 'EPERM'),
  );
  assert.equal(isSystemError(new Error('plain')), false);
});
