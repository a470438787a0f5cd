// Issue 2, "notify": the sd_notify client against a real AF_UNIX datagram receiver bound
// in this process (path and @abstract addresses), and shm-fd parking its memory file in
// the "fd store" of that receiver.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { fdStoreCapacity, fdStoreWarning, keepWatchdogFed, MemoryFile, Notifier, ShmfdError } from 'shmfd';
import { MAX_MESSAGE_BYTES, parseNotifySocket, watchdogUsec } from '../dist/fds/notify.js';
import * as sys from '../dist/system/libc.js';
import {
  abstractAddress,
  assertOneErrorLine,
  cleanEnv,
  datagramReceiver,
  fixture,
  NODE,
  run,
  runShmFd,
  SHM_RESTORE,
  sleep,
  tempDir,
} from './helpers.js';


function isShmfdError(code) {
  return (err) => err instanceof ShmfdError && err.code === code;
}

/** A receiver at a fresh path and one at a fresh abstract address. */
function receivers(t) {
  const dir = tempDir(t);
  const list = [datagramReceiver(path.join(dir, 'notify.sock')), datagramReceiver(abstractAddress('notify'))];
  t.after(() => list.forEach((r) => r.close()));
  return list;
}

for (const kind of ['path', 'abstract']) {
  test(`shm-fd stores its new memory file with FDSTORE=1 + FDNAME at a ${kind} NOTIFY_SOCKET; the descriptor maps the program's memory`, async (t) => {
    const receiver = receivers(t)[kind === 'path' ? 0 : 1];
    const r = await runShmFd([NODE, fixture('report-process.js'), '--write', `written by the program (${kind})`], {
      env: cleanEnv({ NOTIFY_SOCKET: receiver.address, FDSTORE: '1' }),
    });
    assert.equal(r.stderr, '');
    assert.equal(r.code, 0);
    const seen = JSON.parse(r.stdout);
    const message = receiver.receive();
    assert.ok(message, 'a notification arrived');
    assert.equal(message.text, 'FDSTORE=1\nFDNAME=SHM_SHARED_FD');
    assert.equal(message.fds.length, 1);
    assert.equal(message.truncatedFds, false);
    assert.equal(receiver.receive(), undefined, 'exactly one notification');
    const stored = MemoryFile.fromFd(message.fds[0], 'stored');
    assert.equal(stored.isMemfd, true);
    assert.equal(fs.fstatSync(stored.fd).ino, seen.passed[0].ino, 'the stored file is the one the program got');
    const text = Buffer.from(stored.map({ length: 64 }).bytes).toString('latin1').replace(/\0+$/, '');
    assert.equal(text, `written by the program (${kind})`);
  });
}

test('shm-fd with --name stores under that name, and does not store a file it was passed', async (t) => {
  const [receiver] = receivers(t);
  const env = cleanEnv({ NOTIFY_SOCKET: receiver.address, FDSTORE: '4' });
  const named = await runShmFd(['--name', 'my-state', NODE, fixture('report-process.js'), '--name', 'my-state'], { env });
  assert.equal(named.code, 0, named.stderr);
  assert.equal(receiver.receive().text, 'FDSTORE=1\nFDNAME=my-state');

  // Passed in (as systemd does on a restart): already in the store, nothing to send.
  const memfd = sys.memfdCreate('passed');
  t.after(() => fs.closeSync(memfd));
  const passed = await runShmFd(['true'], {
    env: { ...env, LISTEN_FDS: '1', LISTEN_FDNAMES: 'SHM_SHARED_FD' },
    extraFds: [memfd],
  });
  assert.equal(passed.code, 0, passed.stderr);
  assert.equal(receiver.receive(), undefined);
});

test('shm-fd warns (one line) when $FDSTORE says the store is disabled, and still runs the program', async (t) => {
  const [receiver] = receivers(t);
  const r = await runShmFd(['sh', '-c', 'echo ran'], { env: cleanEnv({ NOTIFY_SOCKET: receiver.address }) });
  assert.equal(r.code, 0);
  assert.equal(r.stdout, 'ran\n');
  const lines = r.stderr.split('\n').filter(Boolean);
  assert.equal(lines.length, 1, r.stderr);
  assert.match(lines[0], /^shm-fd: warning: \$FDSTORE is not set: .*fd store is disabled.*FileDescriptorStoreMax=1/);
  assert.equal(receiver.receive().text, 'FDSTORE=1\nFDNAME=SHM_SHARED_FD');
});

test('shm-fd: an unreachable NOTIFY_SOCKET is one error line and exit 125, the program does not run', async (t) => {
  const dir = tempDir(t);
  // Bound once, then closed: the path exists but nobody listens (ECONNREFUSED).
  const gone = datagramReceiver(path.join(dir, 'gone.sock'));
  gone.close();
  /** @type {Array<[string, RegExp]>} */
  const cases = [
    [path.join(dir, 'missing.sock'), /NOTIFY_SOCKET.*ENOENT/],
    [path.join(dir, 'gone.sock'), /NOTIFY_SOCKET.*ECONNREFUSED/],
    [abstractAddress('nobody'), /NOTIFY_SOCKET.*ECONNREFUSED/],
  ];
  for (const [address, pattern] of cases) {
    const r = await runShmFd(['sh', '-c', 'echo ran'], { env: cleanEnv({ NOTIFY_SOCKET: address, FDSTORE: '1' }) });
    assert.equal(r.code, 125, address);
    assert.equal(r.stdout, '');
    assertOneErrorLine(r.stderr, pattern);
  }
});

test('a vsock, malformed, empty or over-long NOTIFY_SOCKET is one clear line from both wrappers, exit 125, nothing run', async (t) => {
  const backup = path.join(tempDir(t), 'backup');
  /** @type {Array<[string, RegExp]>} */
  const cases = [
    ['vsock:2:1234', /^NOTIFY_SOCKET=vsock:2:1234: vsock addresses are not supported$/],
    ['garbage', /^NOTIFY_SOCKET=garbage is neither an absolute path nor an @abstract address \(unset it to run without a service manager\)$/],
    // libsystemd's sd_notify: -EINVAL for "" as for "@" (only an unset variable means no manager).
    ['', /^NOTIFY_SOCKET="" is neither an absolute path nor an @abstract address \(unset it/],
    ['@', /^NOTIFY_SOCKET=@ is neither/],
    ['relative/path', /neither/],
    [`@${'a'.repeat(108)}`, /^NOTIFY_SOCKET=@a+ is too long: 108 bytes, a unix socket address holds at most 107$/],
    [`/${'b'.repeat(107)}`, /^NOTIFY_SOCKET=\/b+ is too long: 108 bytes, a unix socket address holds at most 107$/],
  ];
  for (const [value, pattern] of cases) {
    const env = cleanEnv({ NOTIFY_SOCKET: value, FDSTORE: '1' });
    const r = await runShmFd(['sh', '-c', 'echo ran'], { env });
    assert.equal(r.code, 125, value);
    assert.equal(r.stdout, '');
    assertOneErrorLine(r.stderr, new RegExp(pattern.source.replace('^', '^shm-fd: error: ')));
    const host = await run(NODE, [SHM_RESTORE, backup, 'sh', '-c', 'echo ran'], { env });
    assert.equal(host.code, 125, value);
    assert.equal(host.stdout, '');
    assertOneErrorLine(host.stderr, new RegExp(pattern.source.replace('^', '^shm-restore: error: ')), 'shm-restore');
    assert.equal(fs.existsSync(backup), false);
  }
  assert.throws(() => parseNotifySocket('vsock:1:2'), isShmfdError('ERR_NOTIFY_UNSUPPORTED'));
  assert.throws(() => parseNotifySocket('x'), isShmfdError('ERR_NOTIFY_SOCKET_INVALID'));
  assert.throws(() => parseNotifySocket(`@${'a'.repeat(108)}`), isShmfdError('ERR_NOTIFY_SOCKET_INVALID'));
  assert.equal(parseNotifySocket(`@${'a'.repeat(107)}`), `@${'a'.repeat(107)}`);
  assert.equal(parseNotifySocket(`/${'b'.repeat(106)}`), `/${'b'.repeat(106)}`);
  assert.equal(parseNotifySocket('@a'), '@a');
  assert.equal(Notifier.fromEnv({}), undefined);
  assert.throws(() => Notifier.fromEnv({ NOTIFY_SOCKET: '' }), isShmfdError('ERR_NOTIFY_SOCKET_INVALID'));
  const env = { NOTIFY_SOCKET: '/run/x' };
  assert.equal(Notifier.fromEnv(env, { unsetEnv: true }).address, '/run/x');
  assert.deepEqual(env, {});
});

for (const kind of ['path', 'abstract']) {
  test(`Notifier sends each message as one datagram to a ${kind} address`, async (t) => {
    const receiver = receivers(t)[kind === 'path' ? 0 : 1];
    const notifier = new Notifier(receiver.address);
    t.after(() => notifier.close());
    const next = () => receiver.receive()?.text;

    notifier.ready();
    assert.equal(next(), 'READY=1');
    notifier.ready('serving');
    assert.equal(next(), 'READY=1\nSTATUS=serving');
    const before = process.hrtime.bigint() / 1000n;
    notifier.reloading('reloading config');
    const after = process.hrtime.bigint() / 1000n;
    const reloading = /^RELOADING=1\nMONOTONIC_USEC=(\d+)\nSTATUS=reloading config$/.exec(next());
    assert.ok(reloading, 'RELOADING=1 with MONOTONIC_USEC');
    assert.ok(BigInt(reloading[1]) >= before && BigInt(reloading[1]) <= after, 'MONOTONIC_USEC is CLOCK_MONOTONIC');
    notifier.stopping();
    assert.equal(next(), 'STOPPING=1');
    notifier.status('3 clients');
    assert.equal(next(), 'STATUS=3 clients');
    notifier.watchdog();
    assert.equal(next(), 'WATCHDOG=1');
    notifier.extendTimeout(5_000_000);
    assert.equal(next(), 'EXTEND_TIMEOUT_USEC=5000000');
    notifier.mainPid(1234);
    assert.equal(next(), 'MAINPID=1234');
    notifier.removeStoredFds('SHM_SHARED_FD');
    assert.equal(next(), 'FDSTOREREMOVE=1\nFDNAME=SHM_SHARED_FD');
    notifier.notify('CUSTOM=1\nOTHER=x');
    assert.equal(next(), 'CUSTOM=1\nOTHER=x');
    notifier.notify({ A: true, B: false, C: 7n });
    assert.equal(next(), 'A=1\nB=0\nC=7');

    const file = MemoryFile.create('notify-fdpoll', { size: 4096 });
    t.after(() => file.close());
    notifier.storeFds('pipe-like', [file.fd], { poll: false });
    const stored = receiver.receive();
    assert.equal(stored.text, 'FDSTORE=1\nFDNAME=pipe-like\nFDPOLL=0');
    assert.equal(stored.fds.length, 1);
    assert.equal(fs.fstatSync(stored.fds[0]).ino, fs.fstatSync(file.fd).ino);
    notifier.storeFds('two', [file.fd, file.fd]);
    const two = receiver.receive();
    assert.equal(two.text, 'FDSTORE=1\nFDNAME=two');
    assert.equal(two.fds.length, 2);
    assert.equal(next(), undefined);
  });
}

test('Notifier refuses bad messages before sending: size limit, field syntax, names, descriptor count', (t) => {
  const [receiver] = receivers(t);
  const notifier = new Notifier(receiver.address);
  t.after(() => notifier.close());
  notifier.notify(`STATUS=${'x'.repeat(MAX_MESSAGE_BYTES - 'STATUS='.length)}`);
  assert.equal(receiver.receive().text.length, MAX_MESSAGE_BYTES, 'exactly 4096 bytes is allowed');
  const refused = [
    () => notifier.notify(`STATUS=${'x'.repeat(MAX_MESSAGE_BYTES)}`),
    () => notifier.notify(''),
    () => notifier.notify({}),
    () => notifier.notify({ lower: 1 }),
    () => notifier.notify({ STATUS: 'two\nlines' }),
    () => notifier.status('a\nREADY=1'),
    () => notifier.notify({ READY: 1 }, new Array(254).fill(0)),
  ];
  for (const attempt of refused) assert.throws(attempt, isShmfdError('ERR_NOTIFY_MESSAGE'), String(attempt));
  assert.throws(() => notifier.storeFds('a:b', []), isShmfdError('ERR_LISTEN_FDNAME_INVALID'));
  assert.throws(() => notifier.removeStoredFds('x'.repeat(256)), isShmfdError('ERR_LISTEN_FDNAME_INVALID'));
  assert.equal(receiver.receive(), undefined, 'nothing was sent');
});

test('Notifier: a receiver that is gone makes the call throw instead of blocking', (t) => {
  const dir = tempDir(t);
  const notifier = new Notifier(path.join(dir, 'none.sock'));
  t.after(() => notifier.close());
  assert.throws(() => notifier.ready(), { code: 'ENOENT', syscall: 'sendmsg' });
});

test('fdStoreCapacity, fdStoreWarning and watchdogUsec read $FDSTORE, $WATCHDOG_USEC and $WATCHDOG_PID', () => {
  assert.equal(fdStoreCapacity({}), 0);
  assert.equal(fdStoreCapacity({ FDSTORE: '0' }), 0);
  assert.equal(fdStoreCapacity({ FDSTORE: 'x' }), 0);
  assert.equal(fdStoreCapacity({ FDSTORE: '3' }), 3);
  assert.equal(fdStoreWarning('x is lost', { FDSTORE: '3' }), undefined);
  assert.match(fdStoreWarning('x is lost', {}), /^\$FDSTORE is not set: unless the service manager predates it \(systemd < 254\), .* and x is lost$/);
  assert.equal(fdStoreWarning('x is lost', { FDSTORE: '0' }), `$FDSTORE is "0": the service manager's fd store is disabled and x is lost`);
  assert.equal(watchdogUsec({}), undefined);
  assert.equal(watchdogUsec({ WATCHDOG_USEC: '0' }), undefined);
  assert.equal(watchdogUsec({ WATCHDOG_USEC: '2000000' }), 2_000_000);
  assert.equal(watchdogUsec({ WATCHDOG_USEC: '2000000', WATCHDOG_PID: String(process.pid) }), 2_000_000);
  assert.equal(watchdogUsec({ WATCHDOG_USEC: '2000000', WATCHDOG_PID: String(process.pid + 1) }), undefined);
});

test('keepWatchdogFed pings at once and then at half of WATCHDOG_USEC until stopped', async (t) => {
  const [receiver] = receivers(t);
  const notifier = new Notifier(receiver.address);
  t.after(() => notifier.close());
  assert.equal(keepWatchdogFed(notifier, {}), undefined, 'no watchdog configured');
  assert.equal(receiver.receive(), undefined);

  const keeper = keepWatchdogFed(notifier, { WATCHDOG_USEC: '40000' });
  assert.equal(keeper.intervalMs, 20);
  assert.equal(receiver.receive().text, 'WATCHDOG=1', 'the first ping is immediate');
  assert.equal((await receiver.next()).text, 'WATCHDOG=1');
  assert.equal((await receiver.next()).text, 'WATCHDOG=1');
  keeper.stop();
  while (receiver.receive() !== undefined);
  await sleep(5 * keeper.intervalMs);
  assert.equal(receiver.receive(), undefined, 'no ping after stop()');
});

test('storeInFdStore: nothing without a manager; else one warning, FDSTORE per entry, FDSTOREREMOVE first to replace', async (t) => {
  const { storeInFdStore } = await import('../dist/fds/notify.js');
  const file = MemoryFile.create('store-entry', { size: 4096 });
  t.after(() => file.close());
  const lines = [];
  const log = { error: (m) => lines.push(`error ${m}`), warn: (m) => lines.push(`warn ${m}`), info: (m) => lines.push(`info ${m}`), debug() {} };
  const entries = [{ name: 'mem', fds: [file.fd] }, { name: 'web', fds: [file.fd], replace: true }];

  assert.equal(storeInFdStore(entries, { consequence: 'x is lost', env: {}, log }), false);
  assert.deepEqual(lines, [], 'no manager, nothing said');

  const [receiver] = receivers(t);
  assert.equal(storeInFdStore(entries, { consequence: 'x is lost', env: { NOTIFY_SOCKET: receiver.address }, log, label: (n) => `thing ${n}` }), true);
  assert.equal(lines.length, 3, lines.join('\n'));
  assert.match(lines[0], /^warn \$FDSTORE is not set: .* its fd store is disabled and x is lost$/);
  assert.deepEqual(lines.slice(1), [`info stored thing mem in the fd store of ${receiver.address}`, `info stored thing web in the fd store of ${receiver.address}`]);
  const texts = [];
  for (let m = receiver.receive(); m !== undefined; m = receiver.receive()) texts.push(`${m.text} (${m.fds.length} fd)`);
  assert.deepEqual(texts, ['FDSTORE=1\nFDNAME=mem (1 fd)', 'FDSTOREREMOVE=1\nFDNAME=web (0 fd)', 'FDSTORE=1\nFDNAME=web (1 fd)']);

  // A notifier that is passed in stays open for its owner; an enabled store is no warning.
  const notifier = new Notifier(receiver.address);
  t.after(() => notifier.close());
  lines.length = 0;
  storeInFdStore([{ name: 'mem', fds: [file.fd] }], { consequence: 'x is lost', env: { FDSTORE: '2' }, notifier, log });
  assert.deepEqual(lines, [`info stored mem in the fd store of ${receiver.address}`]);
  notifier.status('still open');
  assert.equal(receiver.receive().text, 'FDSTORE=1\nFDNAME=mem');
  assert.equal(receiver.receive().text, 'STATUS=still open');

  const unreachable = { NOTIFY_SOCKET: path.join(tempDir(t), 'nobody.sock'), FDSTORE: '1' };
  assert.throws(() => storeInFdStore(entries, { consequence: 'x is lost', env: unreachable }), { code: 'ENOENT', syscall: 'sendmsg' });
});
