// Issue 2, "Descriptor conventions": LISTEN_FDS / LISTEN_FDNAMES / LISTEN_PID /
// LISTEN_FDS_FIRST_FD with the semantics of docs/fd-passing.md, in this process (on real
// descriptors placed at high numbers) and through the real shm-fd command.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import { test } from 'node:test';
import { findListenFd, findPassedFd, readListenFds, SharedFd, ShmfdError } from 'shmfd';
import { checkFdName, listenEnv, listenPidTarget, withEnv } from '../dist/fds/listen-fds.js';
import * as sys from '../dist/system/libc.js';
import { assertOneErrorLine, cleanEnv, fixture, NODE, run, runShmFd } from './helpers.js';

function isShmfdError(code) {
  return (err) => err instanceof ShmfdError && err.code === code;
}

/** Places `count` fresh memfds at `first, first+1, ...` in this process; closed after the test. */
function placeFds(t, first, count) {
  for (let i = 0; i < count; i++) {
    const fd = sys.memfdCreate(`lf-${first + i}`);
    sys.dup2(fd, first + i, true);
    fs.closeSync(fd);
  }
  t.after(() => {
    for (let i = 0; i < count; i++) {
      if (sys.isOpen(first + i)) fs.closeSync(first + i);
    }
  });
}

const pid = String(process.pid);

test('no LISTEN_FDS: nothing passed, whatever else is set', () => {
  assert.deepEqual(readListenFds({ env: {} }), []);
  assert.deepEqual(readListenFds({ env: { LISTEN_FDNAMES: 'a', LISTEN_PID: pid } }), []);
});

test('LISTEN_FDS that is not a plain decimal number in range is ERR_LISTEN_FDS_INVALID', () => {
  for (const value of ['', 'x', '1x', '-1', '+1', ' 1', '1 ', '1.0', '0x1', '1e3', '99999999999999999999', '2147483648']) {
    assert.throws(
      () => readListenFds({ env: { LISTEN_FDS: value, LISTEN_PID: pid } }),
      isShmfdError('ERR_LISTEN_FDS_INVALID'),
      JSON.stringify(value),
    );
  }
});

test('LISTEN_FDS=0 means none (as libsystemd), with or without an empty LISTEN_FDNAMES', () => {
  assert.deepEqual(readListenFds({ env: { LISTEN_FDS: '0', LISTEN_PID: pid } }), []);
  assert.deepEqual(readListenFds({ env: { LISTEN_FDS: '0', LISTEN_FDNAMES: '', LISTEN_PID: pid } }), []);
  assert.throws(
    () => readListenFds({ env: { LISTEN_FDS: '0', LISTEN_FDNAMES: 'a', LISTEN_PID: pid } }),
    isShmfdError('ERR_LISTEN_FDNAMES_MISMATCH'),
  );
});

test('a huge LISTEN_FDS is an error at the first closed descriptor, not an out-of-memory abort', () => {
  assert.throws(
    () => readListenFds({ env: { LISTEN_FDS: '2000000000', LISTEN_FDS_FIRST_FD: '900', LISTEN_PID: pid } }),
    isShmfdError('ERR_FD_NOT_PASSED'),
  );
});

test('LISTEN_FDS_FIRST_FD moves the start; names are read in order, empty names count', (t) => {
  placeFds(t, 300, 3);
  const fds = readListenFds({
    env: { LISTEN_FDS: '3', LISTEN_FDNAMES: 'a::SHM_SHARED_FD', LISTEN_FDS_FIRST_FD: '300', LISTEN_PID: pid },
  });
  assert.deepEqual(fds, [
    { fd: 300, name: 'a' },
    { fd: 301, name: '' },
    { fd: 302, name: 'SHM_SHARED_FD' },
  ]);
  assert.deepEqual(findPassedFd(fds, 'SHM_SHARED_FD'), { fd: 302, name: 'SHM_SHARED_FD' });
  assert.equal(findPassedFd(fds, 'missing'), undefined);
  for (const value of ['x', '-3', '+300', ' 300', '99999999999', '0', '2']) {
    assert.throws(
      () => readListenFds({ env: { LISTEN_FDS: '1', LISTEN_FDS_FIRST_FD: value, LISTEN_PID: pid } }),
      isShmfdError('ERR_LISTEN_FDS_INVALID'),
      value,
    );
  }
});

test('names are not unique: the first one with the name wins', (t) => {
  placeFds(t, 310, 2);
  const fds = readListenFds({ env: { LISTEN_FDS: '2', LISTEN_FDNAMES: 'x:x', LISTEN_FDS_FIRST_FD: '310' } });
  assert.equal(findPassedFd(fds, 'x').fd, 310);
});

test('LISTEN_FDNAMES absent: every descriptor is named unknown', (t) => {
  placeFds(t, 320, 2);
  assert.deepEqual(readListenFds({ env: { LISTEN_FDS: '2', LISTEN_FDS_FIRST_FD: '320', LISTEN_PID: pid } }), [
    { fd: 320, name: 'unknown' },
    { fd: 321, name: 'unknown' },
  ]);
});

test('LISTEN_FDNAMES with another count of names than LISTEN_FDS is ERR_LISTEN_FDNAMES_MISMATCH', (t) => {
  placeFds(t, 330, 2);
  for (const names of ['a', 'a:b:c', '', 'a:b:']) {
    assert.throws(
      () => readListenFds({ env: { LISTEN_FDS: '2', LISTEN_FDNAMES: names, LISTEN_FDS_FIRST_FD: '330' } }),
      isShmfdError('ERR_LISTEN_FDNAMES_MISMATCH'),
      names,
    );
  }
});

test('LISTEN_PID: malformed is an error, missing is accepted, another process means not ours', async (t) => {
  placeFds(t, 340, 1);
  const base = { LISTEN_FDS: '1', LISTEN_FDS_FIRST_FD: '340' };
  for (const value of ['', 'abc', '-1', '+12', ' 12', '0', '99999999999']) {
    assert.throws(
      () => readListenFds({ env: { ...base, LISTEN_PID: value } }),
      isShmfdError('ERR_LISTEN_FDS_INVALID'),
      JSON.stringify(value),
    );
  }
  assert.equal(readListenFds({ env: { ...base } }).length, 1, 'missing LISTEN_PID is accepted');
  assert.equal(readListenFds({ env: { ...base, LISTEN_PID: pid } }).length, 1);
  assert.equal(listenPidTarget({ LISTEN_PID: pid }), 'self');
  assert.equal(listenPidTarget({}), 'self');
  assert.equal(listenPidTarget({ LISTEN_PID: String(process.ppid) }), 'ancestor');

  // A live process that is not one of our ancestors: a child of ours.
  const other = spawn('sleep', ['30'], { stdio: 'ignore' });
  t.after(() => other.kill('SIGKILL'));
  await new Promise((resolve) => other.once('spawn', resolve));
  const env = { ...base, LISTEN_PID: String(other.pid) };
  assert.equal(listenPidTarget(env), 'other');
  assert.deepEqual(readListenFds({ env }), []);
  assert.equal(SharedFd.fromEnv({ env: { ...env, LISTEN_FDNAMES: 'SHM_SHARED_FD' } }), undefined);
  // Even malformed counts and names are not ours to judge then.
  assert.deepEqual(readListenFds({ env: { ...env, LISTEN_FDNAMES: 'a:b:c' } }), []);
  // pid 1 is every process's ancestor, but it hands nobody its own descriptors.
  assert.equal(listenPidTarget({ LISTEN_PID: '1' }), 'other');
});

test('LISTEN_PID naming an ancestor: its descriptors are taken when open; variables it left behind after closing them are ignored', (t) => {
  placeFds(t, 345, 1);
  const ancestor = { LISTEN_FDS_FIRST_FD: '345', LISTEN_PID: String(process.ppid) };
  assert.deepEqual(readListenFds({ env: { ...ancestor, LISTEN_FDS: '1', LISTEN_FDNAMES: 'x' } }), [{ fd: 345, name: 'x' }]);
  assert.deepEqual(readListenFds({ env: { ...ancestor, LISTEN_FDS: '2', LISTEN_FDNAMES: 'x:y' } }), [], '346 is not open');
  assert.throws(
    () => readListenFds({ env: { ...ancestor, LISTEN_PID: pid, LISTEN_FDS: '2', LISTEN_FDNAMES: 'x:y' } }),
    isShmfdError('ERR_FD_NOT_PASSED'),
    'meant for this very process: an error',
  );
});

test('findListenFd checks only the descriptor it looks up: a program that closed another passed one can still find the rest', (t) => {
  placeFds(t, 355, 2);
  const env = { LISTEN_FDS: '2', LISTEN_FDNAMES: 'SHM_SHARED_FD:http', LISTEN_FDS_FIRST_FD: '355', LISTEN_PID: pid };
  assert.deepEqual(findListenFd('http', { env }), { fd: 356, name: 'http' });
  fs.closeSync(355); // the program is done with its memory file
  assert.throws(() => readListenFds({ env }), isShmfdError('ERR_FD_NOT_PASSED'), 'the strict reader still says so');
  assert.deepEqual(findListenFd('http', { env }), { fd: 356, name: 'http' });
  assert.equal(findListenFd('other', { env }), undefined);
  assert.throws(() => findListenFd('SHM_SHARED_FD', { env }), (/** @type {Error} */ err) => isShmfdError('ERR_FD_NOT_PASSED')(err) && /355 \(SHM_SHARED_FD\) is not open/.test(err.message));
  assert.throws(() => SharedFd.fromEnv({ env }), isShmfdError('ERR_FD_NOT_PASSED'));
});

test('a descriptor in the range that is not open is ERR_FD_NOT_PASSED', (t) => {
  placeFds(t, 350, 1);
  assert.throws(
    () => readListenFds({ env: { LISTEN_FDS: '2', LISTEN_FDNAMES: 'a:b', LISTEN_FDS_FIRST_FD: '350' } }),
    (/** @type {Error} */ err) => isShmfdError('ERR_FD_NOT_PASSED')(err) && /351 \(b\)/.test(err.message),
  );
});

test('readListenFds marks the descriptors close-on-exec (unless told not to) and can unset the variables', (t) => {
  placeFds(t, 360, 2);
  sys.setCloexec(360, false);
  sys.setCloexec(361, false);
  const env = { LISTEN_FDS: '2', LISTEN_FDS_FIRST_FD: '360', LISTEN_PID: pid, LISTEN_FDNAMES: 'a:b', OTHER: 'kept' };
  readListenFds({ env, cloexec: false });
  assert.equal(sys.getFdFlags(360) & sys.FD_CLOEXEC, 0);
  readListenFds({ env, unsetEnv: true });
  assert.equal(sys.getFdFlags(360) & sys.FD_CLOEXEC, sys.FD_CLOEXEC);
  assert.equal(sys.getFdFlags(361) & sys.FD_CLOEXEC, sys.FD_CLOEXEC);
  assert.deepEqual(env, { OTHER: 'kept' });
});

test('SharedFd.fromEnv: the memory file by name, undefined when absent, an error when unusable', (t) => {
  placeFds(t, 370, 2);
  const env = { LISTEN_FDS: '2', LISTEN_FDNAMES: 'other:SHM_SHARED_FD', LISTEN_FDS_FIRST_FD: '370', LISTEN_PID: pid };
  const file = SharedFd.fromEnv({ env });
  assert.equal(file.fd, 371);
  assert.equal(file.isMemfd, true);
  assert.equal(SharedFd.fromEnv({ env, name: 'other' }).fd, 370);
  assert.equal(SharedFd.fromEnv({ env, name: 'nope' }), undefined);
  assert.equal(SharedFd.fromEnv({ env: {} }), undefined);

  const sock = sys.socket(sys.AF_UNIX, sys.SOCK_DGRAM);
  sys.dup2(sock, 372, true);
  fs.closeSync(sock);
  t.after(() => fs.closeSync(372));
  assert.throws(
    () => SharedFd.fromEnv({ env: { LISTEN_FDS: '1', LISTEN_FDNAMES: 'SHM_SHARED_FD', LISTEN_FDS_FIRST_FD: '372' } }),
    isShmfdError('ERR_NOT_A_MEMORY_FILE'),
  );
  assert.throws(() => SharedFd.fromEnv({ env: { LISTEN_FDS: '+1' } }), isShmfdError('ERR_LISTEN_FDS_INVALID'));
});

test('listenEnv / withEnv describe descriptors for a child; checkFdName enforces the name rules', () => {
  assert.deepEqual(listenEnv(['a', '', 'SHM_SHARED_FD'], { pid: 42 }), {
    LISTEN_FDS: '3',
    LISTEN_FDNAMES: 'a::SHM_SHARED_FD',
    LISTEN_PID: '42',
    LISTEN_FDS_FIRST_FD: undefined,
  });
  const next = withEnv(
    { LISTEN_PID: '1', LISTEN_FDS_FIRST_FD: '9', KEEP: 'x' },
    listenEnv(['a'], { pid: undefined, first: 4 }),
  );
  assert.deepEqual(next, { LISTEN_FDS: '1', LISTEN_FDNAMES: 'a', LISTEN_FDS_FIRST_FD: '4', KEEP: 'x' });
  assert.equal(checkFdName(''), '');
  assert.equal(checkFdName(' ~'.repeat(127) + 'x'), ' ~'.repeat(127) + 'x');
  for (const bad of ['a:b', 'tab\there', 'é', 'x'.repeat(256), 'new\nline']) {
    assert.throws(() => checkFdName(bad), isShmfdError('ERR_LISTEN_FDNAME_INVALID'), JSON.stringify(bad));
  }
  assert.throws(() => listenEnv(['a:b'], { pid: 1 }), isShmfdError('ERR_LISTEN_FDNAME_INVALID'));
});

// ---------------------------------------------------------------- through the real CLI

test('shm-fd: every malformed LISTEN_* is one error line and exit 125', async () => {
  const cases = [
    [{ LISTEN_FDS: 'x' }, /LISTEN_FDS=x is not a decimal number/],
    [{ LISTEN_FDS: '-1' }, /LISTEN_FDS=-1/],
    [{ LISTEN_FDS: '+1' }, /LISTEN_FDS=\+1/],
    [{ LISTEN_FDS: ' 1' }, /LISTEN_FDS= 1/],
    [{ LISTEN_FDS: '99999999999999999999' }, /out of range/],
    [{ LISTEN_FDS: '2000000000' }, /LISTEN_FDS=2000000000 but descriptor 3 \(unknown\) (is not open|was not passed)/],
    [{ LISTEN_FDS: '1', LISTEN_PID: 'abc' }, /LISTEN_PID=abc/],
    [{ LISTEN_FDS: '1', LISTEN_FDS_FIRST_FD: 'x' }, /LISTEN_FDS_FIRST_FD=x/],
    [{ LISTEN_FDS: '1', LISTEN_FDNAMES: 'a:b', LISTEN_FDS_FIRST_FD: '60' }, /LISTEN_FDNAMES has 2 names but LISTEN_FDS=1/],
    [{ LISTEN_FDS: '1', LISTEN_FDS_FIRST_FD: '60' }, /descriptor 60 \(unknown\) is not open/],
  ];
  const results = await Promise.all(cases.map(([env]) => runShmFd(['true'], { env: cleanEnv(env) })));
  results.forEach((r, i) => {
    const [env, pattern] = cases[i];
    assert.equal(r.code, 125, `${JSON.stringify(env)}: ${r.stderr}`);
    assert.equal(r.stdout, '');
    assertOneErrorLine(r.stderr, pattern);
  });
});

test('shm-fd: LISTEN_FDS_FIRST_FD is honoured, and a missing descriptor in its range is ERR_FD_NOT_PASSED', async (t) => {
  const memfd = sys.memfdCreate('lf-cli-first');
  t.after(() => fs.closeSync(memfd));
  // stdio entries 3..49 closed, the memfd at 50
  const extraFds = [...new Array(47).fill('ignore'), memfd];
  const ok = await runShmFd([NODE, fixture('report-process.js'), '--name', 'a'], {
    env: cleanEnv({ LISTEN_FDS: '1', LISTEN_FDNAMES: 'a', LISTEN_FDS_FIRST_FD: '50' }),
    extraFds,
  });
  assert.equal(ok.stderr, '');
  assert.equal(ok.code, 0);
  const seen = JSON.parse(ok.stdout);
  // The program gets the passed descriptor first, at 3 (where shm-fd places them), then the new one.
  assert.equal(seen.env.LISTEN_FDNAMES, 'a:SHM_SHARED_FD');
  assert.equal(seen.env.LISTEN_FDS_FIRST_FD, undefined);
  assert.equal(seen.passed[0].ino, fs.fstatSync(memfd).ino);
  assert.equal(seen.shared.fd, 3);

  const missing = await runShmFd(['true'], {
    env: cleanEnv({ LISTEN_FDS: '2', LISTEN_FDNAMES: 'a:b', LISTEN_FDS_FIRST_FD: '50' }),
    extraFds,
  });
  assert.equal(missing.code, 125);
  assertOneErrorLine(missing.stderr, /LISTEN_FDS=2 but descriptor 51 \(b\) is not open/);
});

test('shm-fd: LISTEN_PID of an unrelated process means the descriptors are not ours', async (t) => {
  const other = spawn('sleep', ['30'], { stdio: 'ignore' });
  t.after(() => other.kill('SIGKILL'));
  await new Promise((resolve) => other.once('spawn', resolve));
  const memfd = sys.memfdCreate('lf-cli-other');
  t.after(() => fs.closeSync(memfd));
  const r = await runShmFd([NODE, fixture('report-process.js')], {
    // Malformed names too: they are none of our business when the descriptors are not ours.
    env: cleanEnv({ LISTEN_FDS: '1', LISTEN_FDNAMES: 'SHM_SHARED_FD', LISTEN_PID: String(other.pid) }),
    extraFds: [memfd],
  });
  assert.equal(r.stderr, '');
  assert.equal(r.code, 0);
  const seen = JSON.parse(r.stdout);
  assert.equal(seen.env.LISTEN_FDS, '1');
  assert.equal(seen.env.LISTEN_PID, String(seen.pid));
  assert.notEqual(seen.passed[0].ino, fs.fstatSync(memfd).ino, 'a new memory file, not the passed one');
});

test('shm-fd: LISTEN_FDS claiming descriptors nobody passed does not hand Node\'s event loop to the program', async () => {
  // Nothing is passed at fd 3, so inside shm-fd fd 3 is libuv's epoll descriptor.
  const r = await runShmFd(['true'], { env: cleanEnv({ LISTEN_FDS: '2' }) });
  assert.equal(r.code, 125);
  assertOneErrorLine(r.stderr, /LISTEN_FDS=2 but descriptor 3 \(unknown\) was not passed/);
  // Every anonymous kernel object a Node process opens at start (epoll, eventfd, io_uring
  // since Node 22) is its own, whatever its kind.
  const own = await run(NODE, ['-e', `for (const fd of require('fs').readdirSync('/proc/self/fd')) {
    try { if (require('fs').readlinkSync('/proc/self/fd/' + fd).startsWith('anon_inode:') && fd < 10) console.log(fd) } catch {} }`]);
  const anonymous = own.stdout.trim().split('\n').map(Number);
  assert.ok(anonymous.length >= 2, own.stdout);
  for (const fd of anonymous) {
    const claimed = await runShmFd(['true'], { env: cleanEnv({ LISTEN_FDS: '1', LISTEN_FDS_FIRST_FD: String(fd) }) });
    assert.equal(claimed.code, 125, `fd ${fd}: ${claimed.stderr}`);
    assertOneErrorLine(claimed.stderr, new RegExp(`LISTEN_FDS=1 but descriptor ${fd} \\(unknown\\) was not passed: it is Node's own anon_inode:`));
  }
});
