// The system layer's own contracts: what the kernel decides and what the layer reports.
// Everything else in it is exercised through the modules that use it.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import { test } from 'node:test';
import * as sys from '../dist/system/libc.js';
import { fdCloseOnExec } from '../dist/system/proc.js';

const isShmfdError = (code) => (err) => err.name === 'ShmfdError' && err.code === code;
const isSystemError = (code, syscall) => (err) => err.name === 'SystemError' && err.code === code && err.syscall === syscall;

/** A unique abstract name of exactly `bytes` bytes after the `@`. */
function abstractOfLength(bytes) {
  const unique = `shmfd-test-${process.pid}-${Math.random().toString(36).slice(2)}-`;
  return `@${unique.padEnd(bytes, 'x')}`;
}

function datagramPair(t) {
  const address = abstractOfLength(40);
  const receiver = sys.socket(sys.AF_UNIX, sys.SOCK_DGRAM);
  const sender = sys.socket(sys.AF_UNIX, sys.SOCK_DGRAM);
  t.after(() => {
    sys.close(receiver);
    sys.close(sender);
  });
  sys.bindSocket(receiver, { family: 'unix', path: address });
  return { address, receiver, sender };
}

test('kernelPageSize() is the page size the kernel reports', () => {
  assert.equal(sys.kernelPageSize(), Number(execFileSync('getconf', ['PAGESIZE'], { encoding: 'utf8' })));
});

test('a unix address of 107 bytes is bound; one of 108 is refused by the kernel (EINVAL from bind)', (t) => {
  const fits = sys.socket(sys.AF_UNIX, sys.SOCK_DGRAM);
  const over = sys.socket(sys.AF_UNIX, sys.SOCK_DGRAM);
  t.after(() => {
    sys.close(fits);
    sys.close(over);
  });
  const longest = abstractOfLength(sys.MAX_UNIX_ADDRESS_BYTES);
  sys.bindSocket(fits, { family: 'unix', path: longest });
  assert.deepEqual(sys.socketInfo(fits).address, { family: 'unix', path: longest });
  const tooLong = abstractOfLength(sys.MAX_UNIX_ADDRESS_BYTES + 1);
  assert.throws(() => sys.bindSocket(over, { family: 'unix', path: tooLong }), { name: 'SystemError', code: 'EINVAL', syscall: 'bind', path: tooLong });
});

test('an IP address that does not parse is ERR_INVALID_ARGUMENT, not an invented errno', () => {
  assert.throws(() => sys.encodeSocketAddress({ family: 'ipv4', address: '300.1.2.3', port: 80 }), isShmfdError('ERR_INVALID_ARGUMENT'));
  assert.throws(() => sys.encodeSocketAddress({ family: 'ipv6', address: '::g', port: 80 }), isShmfdError('ERR_INVALID_ARGUMENT'));
});

test('a datagram carries its payload and descriptors; they arrive close-on-exec, naming the same files', (t) => {
  const { address, receiver, sender } = datagramPair(t);
  const files = ['a', 'b', 'c'].map((name) => sys.memfdCreate(`system-test-${name}`));
  t.after(() => files.forEach((fd) => sys.close(fd)));
  assert.equal(sys.sendDatagram(sender, address, Buffer.from('hello'), files), 5);
  const message = sys.receiveDatagram(receiver);
  t.after(() => message.fds.forEach((fd) => sys.close(fd)));
  assert.equal(message.data.toString(), 'hello');
  assert.equal(message.truncatedFds, false);
  assert.deepEqual(
    message.fds.map((fd) => fs.fstatSync(fd).ino),
    files.map((fd) => fs.fstatSync(fd).ino),
  );
  for (const fd of message.fds) assert.equal(sys.getFdFlags(fd) & sys.FD_CLOEXEC, sys.FD_CLOEXEC);
});

test('descriptors beyond the room given are dropped and reported as truncated', (t) => {
  const { address, receiver, sender } = datagramPair(t);
  const file = sys.memfdCreate('system-test-truncated');
  t.after(() => sys.close(file));
  sys.sendDatagram(sender, address, Buffer.from('x'), [file, file, file, file]);
  const message = sys.receiveDatagram(receiver, 16, 1);
  message.fds.forEach((fd) => sys.close(fd));
  assert.equal(message.data.toString(), 'x');
  assert.equal(message.truncatedFds, true);
  assert.ok(message.fds.length >= 1 && message.fds.length < 4, `received ${message.fds.length} descriptors`);
});

test(`${sys.MAX_FDS_PER_MESSAGE} descriptors go in one message; one more is refused by the kernel (EINVAL from sendmsg)`, (t) => {
  const { address, receiver, sender } = datagramPair(t);
  const file = sys.memfdCreate('system-test-many');
  t.after(() => sys.close(file));
  sys.sendDatagram(sender, address, Buffer.from('many'), new Array(sys.MAX_FDS_PER_MESSAGE).fill(file));
  const message = sys.receiveDatagram(receiver);
  message.fds.forEach((fd) => sys.close(fd));
  assert.equal(message.fds.length, sys.MAX_FDS_PER_MESSAGE);
  assert.equal(message.truncatedFds, false);
  assert.throws(
    () => sys.sendDatagram(sender, address, Buffer.from('too many'), new Array(sys.MAX_FDS_PER_MESSAGE + 1).fill(file)),
    isSystemError('EINVAL', 'sendmsg'),
  );
});

test('describeError: a system error as its description and code, other errors by their message', () => {
  let ebadf;
  try {
    sys.ftruncate(999_999, 0);
  } catch (err) {
    ebadf = err;
  }
  assert.equal(sys.describeError(ebadf), 'bad file descriptor (EBADF)');
  let enoent;
  try {
    fs.readFileSync('/nonexistent-shmfd-test');
  } catch (err) {
    enoent = err;
  }
  assert.equal(sys.describeError(enoent), 'no such file or directory (ENOENT)', "node:fs's errors alike");
  assert.equal(sys.describeError(new sys.SystemError('flock', 37)), 'no locks available (ENOLCK)', 'an errno libuv has no name for');
  let invalid;
  try {
    sys.encodeSocketAddress({ family: 'ipv4', address: 'nope', port: 1 });
  } catch (err) {
    invalid = err;
  }
  assert.equal(sys.describeError(invalid), '"nope" is not an IPv4 address');
  assert.equal(sys.describeError(new Error('plain')), 'plain');
  assert.equal(sys.describeError(new TypeError('odd')), 'TypeError: odd');
  assert.equal(sys.describeError('text'), 'text');
});

test('fdCloseOnExec reads the close-on-exec flag from /proc as fcntl sets it; undefined once closed', () => {
  const fd = fs.openSync('/dev/null', 'r');
  try {
    assert.equal(fdCloseOnExec(fd), true, 'Node opens with O_CLOEXEC');
    sys.setCloexec(fd, false);
    assert.equal(fdCloseOnExec(fd), false);
    sys.setCloexec(fd, true);
    assert.equal(fdCloseOnExec(fd), true);
  } finally {
    fs.closeSync(fd);
  }
  assert.equal(fdCloseOnExec(fd), undefined);
});
