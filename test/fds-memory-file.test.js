// Issue 2, "Shared memory": the memory file (memfd) and its mappings, on real descriptors.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { MemoryFile, Seal, ShmfdError } from 'shmfd';
import * as sys from '../dist/system/libc.js';
import { passedOrNewMemoryFile } from '../dist/fds/shared-fd.js';
import { fixture, NODE, run, tempDir } from './helpers.js';

const GiB = 2 ** 30;

function isShmfdError(code) {
  return (err) => err instanceof ShmfdError && err.code === code;
}

test('create: a named, close-on-exec memfd of the given size, sealed against shrinking', (t) => {
  const file = MemoryFile.create('mf-create', { size: 8192 });
  t.after(() => file.close());
  assert.equal(file.size, 8192);
  assert.equal(file.isMemfd, true);
  assert.equal(file.name, 'mf-create');
  assert.equal(fs.readlinkSync(`/proc/self/fd/${file.fd}`), '/memfd:mf-create (deleted)');
  assert.equal(sys.getFdFlags(file.fd) & sys.FD_CLOEXEC, sys.FD_CLOEXEC);
  assert.equal(file.seals & Seal.SHRINK, Seal.SHRINK);
  assert.equal(file.seals & Seal.SEAL, 0, 'more seals can still be added');
});

test('grow never shrinks; resize below the size fails with EPERM once sealed', (t) => {
  const file = MemoryFile.create('mf-grow', { size: 4096 });
  t.after(() => file.close());
  assert.equal(file.grow(100), 4096);
  assert.equal(file.size, 4096);
  assert.equal(file.grow(10_000), 10_000);
  assert.equal(file.size, 10_000);
  file.resize(20_000);
  assert.equal(file.size, 20_000);
  assert.throws(() => file.resize(4096), { code: 'EPERM', syscall: 'ftruncate' });
  assert.equal(file.size, 20_000, 'the refused shrink left the size alone');
  assert.throws(() => file.grow(-1), isShmfdError('ERR_INVALID_ARGUMENT'));
  assert.throws(() => file.resize(1.5), isShmfdError('ERR_INVALID_ARGUMENT'));
});

test('sealShrink: false leaves the file shrinkable; seal() adds seals later', (t) => {
  const file = MemoryFile.create('mf-unsealed', { size: 8192, sealShrink: false });
  t.after(() => file.close());
  assert.equal(file.seals, 0);
  file.resize(4096);
  assert.equal(file.size, 4096);
  file.seal(Seal.SHRINK | Seal.GROW);
  assert.equal(file.seals, Seal.SHRINK | Seal.GROW);
  assert.throws(() => file.resize(8192), { code: 'EPERM' });
  assert.throws(() => file.resize(0), { code: 'EPERM' });
});

test('fromFd adopts a memfd (isMemfd) and a regular file (not a memfd, no seals)', (t) => {
  const memfd = sys.memfdCreate('mf-adopt');
  sys.ftruncate(memfd, 4096);
  const adopted = MemoryFile.fromFd(memfd, 'adopted');
  t.after(() => adopted.close());
  assert.equal(adopted.isMemfd, true);
  assert.equal(adopted.name, 'adopted');
  assert.equal(adopted.size, 4096);
  assert.equal(MemoryFile.fromFd(memfd).name, `fd${memfd}`);

  const dir = tempDir(t);
  const filePath = path.join(dir, 'state.bin');
  fs.writeFileSync(filePath, Buffer.alloc(8192, 7));
  const regular = MemoryFile.fromFd(fs.openSync(filePath, 'r+'), 'disk');
  t.after(() => regular.close());
  assert.equal(regular.isMemfd, false);
  assert.equal(regular.size, 8192);
  assert.equal(regular.seals, 0);
  const mapping = regular.map();
  assert.equal(mapping.bytes[8191], 7);
  mapping.bytes[0] = 42;
  mapping.unmap();
  assert.equal(fs.readFileSync(filePath)[0], 42, 'the mapping is shared with the file');
});

test('fromFd refuses a pipe, a socket, a directory and a device with ERR_NOT_A_MEMORY_FILE', (t) => {
  const dir = tempDir(t);
  const fifo = path.join(dir, 'fifo');
  execFileSync('mkfifo', [fifo]);
  const candidates = {
    pipe: fs.openSync(fifo, 'r+'), // O_RDWR on a FIFO opens without waiting for a peer
    socket: sys.socket(sys.AF_UNIX, sys.SOCK_DGRAM),
    directory: fs.openSync(dir, 'r'),
    device: fs.openSync('/dev/null', 'r'),
  };
  t.after(() => Object.values(candidates).forEach((fd) => fs.closeSync(fd)));
  for (const [kind, fd] of Object.entries(candidates)) {
    assert.throws(
      () => MemoryFile.fromFd(fd, kind),
      (/** @type {Error} */ err) => isShmfdError('ERR_NOT_A_MEMORY_FILE')(err) && err.message.includes(`descriptor ${fd} (${kind})`),
      kind,
    );
  }
});

test('fromFd on a closed descriptor fails with EBADF', () => {
  const fd = sys.memfdCreate('mf-closed');
  fs.closeSync(fd);
  assert.throws(() => MemoryFile.fromFd(fd), { code: 'EBADF' });
});

test('after close() every method throws ERR_MEMORY_FILE_CLOSED and leaves a file that got the same number alone', (t) => {
  const dir = tempDir(t);
  const file = MemoryFile.create('mf-closed', { size: 4096 });
  file.close();
  const victimPath = path.join(dir, 'victim');
  fs.writeFileSync(victimPath, 'victim data');
  const victim = fs.openSync(victimPath, 'r+');
  t.after(() => fs.closeSync(victim));
  assert.equal(victim, file.fd, 'the kernel hands out the lowest free number again');
  const closed = isShmfdError('ERR_MEMORY_FILE_CLOSED');
  assert.throws(() => file.size, closed);
  assert.throws(() => file.grow(1 << 20), closed);
  assert.throws(() => file.resize(1 << 20), closed);
  assert.throws(() => file.map(), closed);
  assert.throws(() => file.seal(Seal.GROW), closed);
  assert.throws(() => file.seals, closed);
  assert.equal(fs.readFileSync(victimPath, 'utf8'), 'victim data');
  file.close(); // twice is fine
});

test('create: names up to 255 characters (the descriptor name limit) are accepted', (t) => {
  const name = 'n'.repeat(255);
  const file = MemoryFile.create(name, { size: 4096 });
  t.after(() => file.close());
  assert.equal(file.name, name);
  assert.equal(fs.readlinkSync(`/proc/self/fd/${file.fd}`), `/memfd:${'n'.repeat(249)} (deleted)`);
});

test('passedOrNewMemoryFile: the passed file of that name, grown and never shrunk; else a new sealed one', (t) => {
  const given = MemoryFile.create('mf-passed', { size: 8192 });
  t.after(() => given.close());
  const passed = [{ fd: 1, name: 'other' }, { fd: given.fd, name: 'mf-passed' }];

  const found = passedOrNewMemoryFile(passed, 'mf-passed', { size: 16384 });
  assert.equal(found.created, false);
  assert.equal(found.file.fd, given.fd, 'the passed descriptor itself');
  assert.equal(given.size, 16384, 'grown to the size asked for');
  assert.equal(passedOrNewMemoryFile(passed, 'mf-passed', { size: 4096 }).file.size, 16384, 'never shrunk');

  const made = passedOrNewMemoryFile(passed, 'mf-new', { size: 4096 });
  t.after(() => made.file.close());
  assert.equal(made.created, true);
  assert.equal(made.file.size, 4096);
  assert.equal(fs.readlinkSync(`/proc/self/fd/${made.file.fd}`), '/memfd:mf-new (deleted)');
  assert.equal(made.file.seals & Seal.SHRINK, Seal.SHRINK);

  const socket = sys.socket(sys.AF_UNIX, sys.SOCK_DGRAM);
  t.after(() => sys.close(socket));
  assert.throws(() => passedOrNewMemoryFile([{ fd: socket, name: 'sock' }], 'sock'), isShmfdError('ERR_NOT_A_MEMORY_FILE'));
});

test('typed arrays over a mapping work with Atomics and share the file', (t) => {
  const file = MemoryFile.create('mf-atomics', { size: 4096 });
  t.after(() => file.close());
  const mapping = file.map();
  assert.equal(mapping.length, 4096);
  assert.equal(mapping.offset, 0);
  assert.equal(mapping.mapped, true);
  const big = mapping.array(BigUint64Array);
  assert.equal(big.length, 512);
  assert.equal(Atomics.add(big, 1, 5n), 0n);
  assert.equal(Atomics.compareExchange(big, 1, 5n, 9n), 5n);
  assert.equal(Atomics.load(big, 1), 9n);
  const ints = mapping.array(Int32Array, 64, 4);
  assert.equal(ints.length, 4);
  Atomics.store(ints, 3, -2);
  // A second mapping of the same file sees the writes of the first.
  const other = file.map({ offset: 64, length: 16 });
  assert.equal(new DataView(other.buffer, other.bytes.byteOffset).getInt32(12, true), -2);
  assert.equal(file.map({ length: 16 }).array(BigUint64Array)[1], 9n);
  // array() checks its range and alignment instead of letting a RangeError escape.
  assert.throws(() => mapping.array(BigUint64Array, 4), isShmfdError('ERR_MAPPING_RANGE'));
  assert.throws(() => mapping.array(Int32Array, 0, 1025), isShmfdError('ERR_MAPPING_RANGE'));
  assert.throws(() => mapping.array(Int32Array, -4), isShmfdError('ERR_MAPPING_RANGE'));
});

test('after unmap() a stale view reads zeros without crashing, and the file keeps its data', (t) => {
  const file = MemoryFile.create('mf-unmap', { size: 8192 });
  t.after(() => file.close());
  const mapping = file.map();
  const view = mapping.array(BigUint64Array);
  view[0] = 0x1234n;
  view[1023] = 77n;
  mapping.unmap();
  assert.equal(mapping.mapped, false);
  mapping.unmap(); // a second unmap is harmless
  assert.equal(view[0], 0n);
  assert.equal(view[1023], 0n);
  view[5] = 99n; // writes land in private scratch memory, not in the file
  assert.equal(view[5], 99n);
  const again = file.map().array(BigUint64Array);
  assert.equal(again[0], 0x1234n);
  assert.equal(again[1023], 77n);
  assert.equal(again[5], 0n);
});

test('closing the file keeps mappings valid until unmapped', () => {
  const file = MemoryFile.create('mf-close', { size: 4096 });
  const mapping = file.map();
  mapping.bytes[10] = 10;
  file.close();
  file.close(); // idempotent
  assert.equal(mapping.bytes[10], 10);
  mapping.unmap();
  assert.equal(mapping.bytes[10], 0);
});

test('mapping beyond the end, or nothing, is ERR_MAPPING_RANGE (never SIGBUS)', (t) => {
  const file = MemoryFile.create('mf-range', { size: 4096 });
  t.after(() => file.close());
  for (const options of [
    { length: 4097 },
    { offset: 4096 },
    { offset: 4000, length: 97 },
    { offset: -1, length: 10 },
    { length: 0 },
    { offset: 1.5, length: 10 },
  ]) {
    assert.throws(() => file.map(options), isShmfdError('ERR_MAPPING_RANGE'), JSON.stringify(options));
  }
  const empty = MemoryFile.create('mf-empty');
  t.after(() => empty.close());
  assert.throws(() => empty.map(), isShmfdError('ERR_MAPPING_RANGE'));
});

test('a 5 GiB sparse file: one mapping is refused, windows with {offset, length} work', (t) => {
  const file = MemoryFile.create('mf-huge', { size: 5 * GiB });
  t.after(() => file.close());
  assert.equal(file.size, 5 * GiB);
  assert.throws(() => file.map(), (/** @type {Error} */ err) => isShmfdError('ERR_MAPPING_RANGE')(err) && /windows/.test(err.message));
  assert.throws(() => file.map({ offset: 4096, length: 4 * GiB + 1 }), isShmfdError('ERR_MAPPING_RANGE'));
  // An unaligned offset adds its page remainder to the mapping: 4 GiB from offset 1 is too much.
  assert.throws(() => file.map({ offset: 1, length: 4 * GiB }), isShmfdError('ERR_MAPPING_RANGE'));

  const tail = file.map({ offset: 5 * GiB - 4096, length: 4096 });
  tail.bytes[4095] = 0xab;
  const unaligned = file.map({ offset: 4 * GiB + 123, length: 1000 });
  assert.equal(unaligned.offset, 4 * GiB + 123);
  unaligned.bytes.set([1, 2, 3], 0);
  unaligned.bytes[999] = 0xcd;
  assert.throws(() => unaligned.array(BigUint64Array), isShmfdError('ERR_MAPPING_RANGE'));
  assert.equal(unaligned.array(BigUint64Array, 5, 1).length, 1, 'file offset 4 GiB + 128 is aligned');

  // Another window over the same bytes sees them.
  const page = file.map({ offset: 4 * GiB, length: 8192 });
  assert.deepEqual([...page.bytes.subarray(123, 126)], [1, 2, 3]);
  assert.equal(page.bytes[123 + 999], 0xcd);
  assert.equal(file.map({ offset: 5 * GiB - 1, length: 1 }).bytes[0], 0xab);
  for (const m of [tail, unaligned, page]) m.unmap();
});

test('a second process mapping the same descriptor sees our writes, we see its writes, Atomics add up exactly', async (t) => {
  const file = MemoryFile.create('mf-two-processes', { size: 4096 });
  t.after(() => file.close());
  const table = file.map({ length: 64 }).array(BigInt64Array);
  const COUNT = 1_000_000;
  Atomics.store(table, 3, 0xbeefn);
  const done = run(NODE, [fixture('atomic-adder.js'), String(COUNT)], { extraFds: [file.fd] });
  // Wait until the child has mapped the file, then start both loops together.
  const deadline = Date.now() + 60_000;
  while (Atomics.load(table, 0) === 0n) {
    if (Date.now() > deadline) break;
    await new Promise((resolve) => setImmediate(resolve));
  }
  assert.equal(Atomics.load(table, 0), 1n, 'the child mapped the file');
  Atomics.store(table, 1, 1n);
  for (let i = 0; i < COUNT; i++) Atomics.add(table, 2, 1n);
  const child = await done;
  assert.equal(child.stderr, '');
  assert.equal(child.code, 0);
  assert.equal(child.stdout, `parent marker ${0xbeef}\n`, 'the child read what the parent wrote');
  assert.equal(Atomics.load(table, 4), 0x600dn, 'the parent reads what the child wrote');
  assert.equal(Atomics.load(table, 2), BigInt(2 * COUNT));
});

test('populate allocates the pages of a range in one call without changing a byte; a hint elsewhere', (t) => {
  const file = MemoryFile.create('populate', { size: 1 << 20 });
  t.after(() => file.close());
  const allocated = () => fs.fstatSync(file.fd).blocks * 512;
  const mapping = file.map();
  mapping.bytes[5000] = 7;
  const before = allocated();
  assert.equal(before, 4096);
  // From byte 4100 for 64 KiB: pages 1 to 17 (page 1 already holds byte 5000).
  const done = mapping.populate(4100, 65536);
  if (done) assert.equal(allocated(), 17 * 4096);
  else assert.equal(allocated(), before); // a kernel before 5.14
  assert.equal(mapping.bytes[5000], 7);
  assert.ok(mapping.bytes.subarray(0, 80_000).every((b, i) => b === (i === 5000 ? 7 : 0)));
  assert.equal(mapping.populate(-1, 10), false);
  assert.equal(mapping.populate(0, 0), false);
  assert.equal(mapping.populate(1 << 20, 10), false);
  const readOnly = file.map({ readOnly: true });
  assert.equal(readOnly.populate(0, 4096), false);
  readOnly.unmap();
  mapping.unmap();
  assert.equal(mapping.populate(0, 4096), false);
});
