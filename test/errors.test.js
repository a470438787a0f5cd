// The two kinds of errors a program matches on (docs/errors.md): `ShmfdError`s from
// shmfd's own checks and `SystemError`s from the kernel, both with a stable `code`, as the
// package exports them.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { isSystemError, MemoryFile, Seal, ShmfdError, SystemError } from 'shmfd';
import { ROOT, tempDir } from './helpers.js';

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

test('every error code is documented where docs/errors.md says, raised somewhere, and no other is documented', () => {
  // The codes users match on are the union type ShmfdErrorCode; each belongs in one table:
  // ERR_SNAPSHOT_* in docs/snapshot.md, ERR_STATE_* in docs/state.md, the rest in
  // docs/errors.md. A code in a table is a row that starts with it.
  const source = (file) => fs.readFileSync(path.join(ROOT, file), 'utf8');
  const codes = new Set([...source('src/base/errors.ts').matchAll(/\| '(ERR_[A-Z_]+)'/g)].map((m) => m[1]));
  assert.ok(codes.size > 40, `the union ShmfdErrorCode was read (${codes.size} codes)`);
  const tableOf = (code) => (code.startsWith('ERR_SNAPSHOT_') ? 'docs/snapshot.md' : code.startsWith('ERR_STATE_') ? 'docs/state.md' : 'docs/errors.md');
  const rows = (file) => new Set([...source(file).matchAll(/^\| `(ERR_[A-Z_]+)` \|/gm)].map((m) => m[1]));
  const tables = new Map(['docs/errors.md', 'docs/snapshot.md', 'docs/state.md'].map((file) => [file, rows(file)]));
  for (const code of codes) assert.ok(tables.get(tableOf(code))?.has(code), `${code} has a row in ${tableOf(code)}`);
  for (const [file, documented] of tables) {
    for (const code of documented) assert.ok(codes.has(code) && tableOf(code) === file, `${file} documents ${code}, which is not one of its codes`);
  }
  // Raised somewhere: a code no module uses is a promise nothing keeps.
  const modules = fs.readdirSync(path.join(ROOT, 'src'), { recursive: true, encoding: 'utf8' }).filter((f) => f.endsWith('.ts') && f !== path.join('base', 'errors.ts'));
  const used = new Set(modules.flatMap((f) => [...source(path.join('src', f)).matchAll(/'(ERR_[A-Z_]+)'/g)].map((m) => m[1])));
  for (const code of codes) assert.ok(used.has(code), `${code} is raised by a module of src/`);
});
