// Issue 4: every socket kind of -s/--socket is opened by the wrapper, passed in order
// (after the passed descriptors, before the memory file) under its name, and usable in the
// program through the library; bad specs and unusable addresses give one error line and 125.
import assert from 'node:assert/strict';
import dgram from 'node:dgram';
import fs from 'node:fs';
import http from 'node:http';
import https from 'node:https';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { parseSocketSpec } from '../dist/sockets/spec.js';
import { listenOn } from 'shmfd';
import * as sys from '../dist/system/libc.js';
import { assertOneErrorLine, cleanEnv, fixture, isRoot, NODE, ROOT, run, runShmFd, SHM_FD, SHM_RESTORE, start, tempDir } from './helpers.js';

const ECHO = fixture('sockets-echo.js');

const hasIpv6 = Object.values(os.networkInterfaces())
  .flat()
  .some((i) => i?.family === 'IPv6' && i.address === '::1');

/** Starts `shm-fd ARGS -- node sockets-echo.js ENDPOINTS` and waits for its report line. */
async function startEcho(t, wrapperArgs, endpoints, options = {}) {
  const echo = start(NODE, [options.wrapper ?? SHM_FD, ...wrapperArgs, '--', NODE, ECHO, ...endpoints], {
    env: options.env ?? cleanEnv(),
    extraFds: options.extraFds ?? [],
    t,
  });
  const first = await echo.out.line(0);
  if (first === undefined) throw new Error(`the wrapper ended early (${JSON.stringify(await echo.exited)}): ${echo.err.text}`);
  return { child: echo.child, report: JSON.parse(first), stderr: () => echo.err.text, exited: echo.exited.then(({ code, signal }) => ({ code, signal })) };
}

function streamEcho(connectOptions, text) {
  return new Promise((resolve, reject) => {
    const c = net.connect(connectOptions, () => c.write(text));
    let got = '';
    c.on('data', (d) => (got += d));
    c.on('end', () => resolve(got));
    c.on('error', reject);
  });
}

function udpEcho(port, text) {
  return new Promise((resolve, reject) => {
    const s = dgram.createSocket('udp4');
    s.on('message', (m) => {
      s.close();
      resolve(m.toString());
    });
    s.on('error', reject);
    s.send(text, port, '127.0.0.1');
  });
}

test('specs parse like systemfd: kinds, bare port on 127.0.0.1, HOST:PORT, [IPv6]:PORT, paths, NAME=', () => {
  /** @type {Array<[string, string, string, import('../dist/sockets/spec.js').SocketSpec['address']]>} */
  const cases = [
    ['tcp::8080', 'tcp', 'tcp', { family: 'ipv4', address: '127.0.0.1', port: 8080 }],
    ['http::0.0.0.0:80', 'http', 'http', { family: 'ipv4', address: '0.0.0.0', port: 80 }],
    ['https::[::1]:8443', 'https', 'https', { family: 'ipv6', address: '::1', port: 8443 }],
    ['udp::5353', 'udp', 'udp', { family: 'ipv4', address: '127.0.0.1', port: 5353 }],
    ['unix::/run/a=b.sock', 'unix', 'unix', { family: 'unix', path: '/run/a=b.sock' }],
    ['5000', 'tcp', 'tcp', { family: 'ipv4', address: '127.0.0.1', port: 5000 }],
    ['10.0.0.1:5000', 'tcp', 'tcp', { family: 'ipv4', address: '10.0.0.1', port: 5000 }],
    ['./app.sock', 'unix', 'unix', { family: 'unix', path: './app.sock' }],
    ['api=HTTP::9000', 'api', 'http', { family: 'ipv4', address: '127.0.0.1', port: 9000 }],
    ['=udp::1', '', 'udp', { family: 'ipv4', address: '127.0.0.1', port: 1 }],
  ];
  for (const [text, name, kind, address] of cases) {
    assert.deepEqual(parseSocketSpec(text), { name, kind, address, text }, text);
  }
  for (const bad of ['foo::1', 'tcp::65536', 'tcp::localhost:80', 'tcp::[::1]80', 'tcp::[nope]:1', 'unix::', 'what', 'a:b=tcp::1', `unix::/${'x'.repeat(120)}`]) {
    assert.throws(() => parseSocketSpec(bad), { code: 'ERR_SOCKET_SPEC' }, bad);
  }
});

test('every kind is opened, passed in order before the memory file, named, and usable in the program', async (t) => {
  const dir = tempDir(t);
  const unixPath = path.join(dir, 'echo.sock');
  const specs = ['-s', 'http::0', '-s', 'secure=https::0', '-s', 'raw=tcp::0', '-s', 'udp::0', '-s', `unix::${unixPath}`];
  const endpoints = ['http:stream', 'secure:stream', 'raw:stream', 'udp:datagram', 'unix:stream'];
  if (hasIpv6) {
    specs.push('-s', 'v6=tcp::[::1]:0');
    endpoints.push('v6:stream');
  }
  const { report, child, exited } = await startEcho(t, specs, endpoints);
  const names = report.passed.map((p) => p.name);
  assert.deepEqual(names, [...endpoints.map((e) => e.split(':')[0]), 'SHM_SHARED_FD']);
  assert.deepEqual(report.passed.map((p) => p.fd), names.map((_, i) => 3 + i));
  assert.equal(report.env.LISTEN_PID, String(report.pid), 'shm-fd execs the program: LISTEN_PID is its own pid');
  for (const p of report.passed.slice(0, -1)) assert.match(p.target, /^socket:\[\d+\]$/);
  assert.match(report.passed.at(-1).target, /^\/memfd:SHM_SHARED_FD/);

  const l = report.listening;
  for (const name of ['http', 'secure', 'raw']) {
    assert.deepEqual({ ...l[name].info, address: { ...l[name].info.address, port: 0 } }, {
      family: 'ipv4', type: 'stream', listening: true, address: { family: 'ipv4', address: '127.0.0.1', port: 0 },
    });
    assert.equal(await streamEcho({ port: l[name].info.address.port, host: '127.0.0.1' }, 'ping'), `${name}:ping`);
    assert.equal(l[name].url, `127.0.0.1:${l[name].info.address.port}`, 'a net.Server: no scheme');
  }
  assert.equal(l.udp.info.type, 'datagram');
  assert.equal(await udpEcho(l.udp.address.port, 'ping'), 'udp:ping');
  assert.deepEqual(l.unix.info.address, { family: 'unix', path: unixPath });
  assert.equal(l.unix.url, unixPath);
  assert.equal(await streamEcho({ path: unixPath }, 'ping'), 'unix:ping');
  if (hasIpv6) {
    assert.equal(l.v6.info.family, 'ipv6');
    assert.equal(l.v6.url, `[::1]:${l.v6.info.address.port}`);
    assert.equal(await streamEcho({ port: l.v6.info.address.port, host: '::1' }, 'ping'), 'v6:ping');
  } else {
    t.diagnostic('no IPv6 loopback: the [::1] case was skipped');
  }
  child.kill('SIGTERM');
  assert.deepEqual(await exited, { code: 0, signal: null }, 'SIGTERM stops the program gracefully with status 0');
});

test('--first-fd K places every descriptor from K, the passed ones too, and sets LISTEN_FDS_FIRST_FD', async (t) => {
  const fd = fs.openSync('/dev/null', 'r');
  t.after(() => fs.closeSync(fd));
  const env = cleanEnv({ LISTEN_FDS: '1', LISTEN_FDNAMES: 'given' });
  const { report } = await startEcho(t, ['--first-fd', '20', '-s', 'http::0'], ['http:stream'], { env, extraFds: [fd] });
  assert.deepEqual(report.passed.map((p) => [p.fd, p.name]), [[20, 'given'], [21, 'http'], [22, 'SHM_SHARED_FD']]);
  assert.equal(report.passed[0].target, '/dev/null');
  assert.equal(report.env.LISTEN_FDS_FIRST_FD, '20');
  assert.equal(await streamEcho({ port: report.listening.http.info.address.port, host: '127.0.0.1' }, 'x'), 'http:x');
});

test('a passed socket of the same name that fits is reused (the fd store case); one that does not is replaced in place', async (t) => {
  // The test plays systemd's fd store: a listening socket named http at fd 3.
  const held = sys.socket(sys.AF_INET, sys.SOCK_STREAM);
  t.after(() => sys.close(held));
  sys.bindSocket(held, { family: 'ipv4', address: '127.0.0.1', port: 0 });
  sys.listen(held, 16);
  const port = /** @type {{port: number}} */ (sys.socketInfo(held).address).port;
  const inode = fs.statSync(`/proc/self/fd/${held}`).ino;
  const env = cleanEnv({ LISTEN_FDS: '1', LISTEN_FDNAMES: 'http' });

  const same = await startEcho(t, ['--log-level', 'info', '-s', `http::${port}`], ['http:stream'], { env, extraFds: [held] });
  assert.deepEqual(same.report.passed.map((p) => p.name), ['http', 'SHM_SHARED_FD'], 'no second http socket');
  assert.equal(same.report.passed[0].target, `socket:[${inode}]`, 'the very socket that was passed');
  assert.match(same.stderr(), /using the passed socket http \(fd 3\)/);
  same.child.kill('SIGTERM');
  await same.exited;

  const other = await startEcho(t, ['-s', 'http::0', '-s', 'http::127.0.0.1:0'], ['http:stream'], { env, extraFds: [held] });
  // port 0 fits any port: the passed one is reused for the first spec, the second is new.
  assert.equal(other.report.passed[0].target, `socket:[${inode}]`);
  assert.deepEqual(other.report.passed.map((p) => p.name), ['http', 'http', 'SHM_SHARED_FD']);
  assert.notEqual(other.report.passed[1].target, `socket:[${inode}]`);
  other.child.kill('SIGTERM');
  await other.exited;

  const moved = await startEcho(t, ['-s', `http=unix::${path.join(tempDir(t), 's.sock')}`], ['http:stream'], { env, extraFds: [held] });
  assert.deepEqual(moved.report.passed.map((p) => [p.fd, p.name]), [[3, 'http'], [4, 'SHM_SHARED_FD']]);
  assert.notEqual(moved.report.passed[0].target, `socket:[${inode}]`, 'replaced by a new socket at the same number');
  assert.equal(moved.report.listening.http.info.family, 'unix');
  assert.match(moved.stderr(), /warning: the passed socket http \(fd 3\) does not fit --socket/);
});

test('a passed socket that holds the very port the spec now wants on another host is let go first, then replaced', { skip: !fs.existsSync('/usr/bin/python3') && 'needs python3' }, async () => {
  const probe = net.createServer().listen(0, '127.0.0.1');
  await new Promise((r) => probe.once('listening', r));
  const port = /** @type {import('node:net').AddressInfo} */ (probe.address()).port;
  await new Promise((r) => probe.close(r));
  // python3 plays the fd store: the socket of the last start, on 127.0.0.1:PORT, at fd 3;
  // nobody else holds it. The unit now says -s http::0.0.0.0:PORT.
  const store = `import os, socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('127.0.0.1', ${port}))
s.listen()
fd = s.detach()
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.set_inheritable(3, True)
os.execv(sys.argv[1], sys.argv[1:])`;
  const report = `import('${path.join(ROOT, 'dist', 'system', 'libc.js')}').then((s) => console.log(JSON.stringify(s.socketInfo(3).address)))`;
  const r = await run('/usr/bin/python3', ['-c', store, NODE, SHM_FD, '-s', `http::0.0.0.0:${port}`, '--', NODE, '-e', report], {
    env: cleanEnv({ LISTEN_FDS: '1', LISTEN_FDNAMES: 'http' }),
  });
  assert.equal(r.code, 0, r.stderr);
  assert.deepEqual(JSON.parse(r.stdout), { family: 'ipv4', address: '0.0.0.0', port });
  assert.match(r.stderr, /warning: the passed socket http \(fd 3\) does not fit --socket http::0\.0\.0\.0:\d+: replaced by the new one/);
});

test('bad specs, ports in use, unusable unix paths: one error line, status 125, nothing touched', async (t) => {
  const dir = tempDir(t);
  const busy = net.createServer().listen(0, '127.0.0.1');
  await new Promise((r) => busy.once('listening', r));
  t.after(() => busy.close());
  const plain = path.join(dir, 'plain');
  fs.writeFileSync(plain, 'keep me');
  const live = net.createServer().listen(path.join(dir, 'live.sock'));
  await new Promise((r) => live.once('listening', r));
  t.after(() => live.close());
  let unwritable;
  if (isRoot) {
    unwritable = '/sys/shmfd-test.sock'; // sysfs refuses new files even to root
  } else {
    fs.mkdirSync(path.join(dir, 'ro'), { mode: 0o555 });
    unwritable = path.join(dir, 'ro', 's.sock');
  }
  /** @type {Array<[string[], RegExp]>} */
  const cases = [
    [['-s', 'ftp::21'], /invalid socket "ftp::21": unknown socket kind "ftp"/],
    [['-s', 'tcp::99999'], /"99999" is not a port number/],
    [['-s', 'tcp::example.com:80'], /"example.com" is not an IP address/],
    [['-s', 'no:pe=tcp::1'], /invalid socket "no:pe=tcp::1"/],
    [['-s', 'SHM_SHARED_FD=tcp::0'], /SHM_SHARED_FD is the memory file's name/],
    [['-s', `http::${/** @type {import('node:net').AddressInfo} */ (busy.address()).port}`], /socket http::\d+: cannot bind 127\.0\.0\.1:\d+: the address is already in use \(EADDRINUSE\)/],
    [['-s', 'tcp::192.0.2.1:80'], /the address is not available on this machine \(EADDRNOTAVAIL\)/],
    [['-s', `unix::${plain}`], /exists and is not a socket \(left untouched\)/],
    [['-s', `unix::${path.join(dir, 'live.sock')}`], /a server is listening on/],
    [['-s', `unix::${unwritable}`], /cannot bind .*(permission denied|operation not permitted)/],
    [['-s', `unix::${path.join(dir, 'missing', 's.sock')}`], /the directory does not exist \(ENOENT\)/],
    [['--first-fd', '2', '-s', 'tcp::0'], /--first-fd: "2" is not a descriptor number/],
    [['--first-fd', '65000', '-s', 'tcp::0'], /descriptor 6500\d is above the limit of open files/],
  ];
  for (const [args, pattern] of cases) {
    const r = await runShmFd([...args, 'true'], { env: cleanEnv() });
    assert.equal(r.code, 125, `${args.join(' ')}: ${r.stderr}`);
    assertOneErrorLine(r.stderr, pattern);
  }
  assert.equal(fs.readFileSync(plain, 'utf8'), 'keep me');
  const connected = await new Promise((resolve) => {
    const c = net.connect({ path: path.join(dir, 'live.sock') }, () => {
      c.destroy();
      resolve(true);
    });
    c.on('error', () => resolve(false));
  });
  assert.ok(connected, 'the live socket was left alone and still accepts');
});

test('a stale unix socket file (nobody accepting) is replaced', async (t) => {
  const dir = tempDir(t);
  const stale = path.join(dir, 'stale.sock');
  const fd = sys.socket(sys.AF_UNIX, sys.SOCK_STREAM);
  sys.bindSocket(fd, { family: 'unix', path: stale });
  sys.close(fd); // the file stays, nobody listens
  assert.ok(fs.lstatSync(stale).isSocket());
  const { report } = await startEcho(t, ['-s', `unix::${stale}`], ['unix:stream']);
  assert.equal(await streamEcho({ path: stale }, 'hi'), 'unix:hi');
  assert.equal(report.listening.unix.info.listening, true);
});

test('shm-restore takes -s and --first-fd too: sockets before the memory file, from K', async (t) => {
  const backup = path.join(tempDir(t), 'state');
  const { report, child, exited } = await startEcho(
    t,
    ['--first-fd', '18', '-s', 'http::0', '-s', 'udp::0', backup],
    ['http:stream', 'udp:datagram'],
    { wrapper: SHM_RESTORE },
  );
  assert.deepEqual(report.passed.map((p) => [p.fd, p.name]), [[18, 'http'], [19, 'udp'], [20, 'SHM_SHARED_FD']]);
  assert.equal(await streamEcho({ port: report.listening.http.info.address.port, host: '127.0.0.1' }, 'r'), 'http:r');
  assert.equal(await udpEcho(report.listening.udp.address.port, 'r'), 'udp:r');
  child.kill('SIGTERM');
  assert.equal((await exited).code, 0);
});

test('listenOn refuses a passed stream socket that does not listen (node --watch\'s IPC channel at fd 3, a TCP connection) at once, saying what it is and what to do', async (t) => {
  // The program a restarter runs when --first-fd 17 was forgotten: the variables name fd 3,
  // where the program's own IPC channel now is.
  const program = `
    import net from 'node:net';
    import { listenOn } from ${JSON.stringify(path.join(ROOT, 'dist', 'index.js'))};
    try {
      await listenOn(net.createServer(), { name: 'http', fallback: { port: 0 } });
      console.log(JSON.stringify({ listened: true }));
    } catch (err) {
      console.log(JSON.stringify({ code: err.code, message: err.message }));
    }
    process.exit(0);`;
  const env = cleanEnv({ LISTEN_FDS: '1', LISTEN_FDNAMES: 'http' });
  const runWithFd3 = (fd3) => run(NODE, ['--input-type=module', '-e', program], { env, extraFds: [fd3] });
  const advice = 'behind node --watch or nodemon, pass --first-fd 17 to shm-fd or shm-restore (Node keeps the descriptors below 17 from its program); otherwise pass a listening socket under that name';

  const ipc = await runWithFd3('ipc');
  assert.equal(ipc.code, 0, ipc.stderr);
  assert.deepEqual(JSON.parse(ipc.stdout), {
    code: 'ERR_SOCKET_NOT_LISTENING',
    message: `the socket http (fd 3) is a unix stream socket that is not listening: ${advice}`,
  });

  const server = net.createServer((c) => c.on('error', () => {})).listen(0, '127.0.0.1');
  await new Promise((r) => server.once('listening', r));
  t.after(() => server.close());
  const client = net.connect(/** @type {import('node:net').AddressInfo} */ (server.address()).port, '127.0.0.1');
  await new Promise((r) => client.once('connect', r));
  t.after(() => client.destroy());
  const tcp = await runWithFd3(client);
  assert.equal(tcp.code, 0, tcp.stderr);
  assert.deepEqual(JSON.parse(tcp.stdout), {
    code: 'ERR_SOCKET_NOT_LISTENING',
    message: `the socket http (fd 3) is a TCP socket that is not listening: ${advice}`,
  });
});

test('listenOn names where it listens: a URL for http and https servers, host:port for others', async (t) => {
  /** @type {Array<[http.Server | https.Server | net.Server, string]>} */
  const servers = [
    [http.createServer(), 'http://127.0.0.1:'],
    [https.createServer(), 'https://127.0.0.1:'],
    [net.createServer(), '127.0.0.1:'],
  ];
  for (const [server, prefix] of servers) {
    t.after(() => server.close());
    const where = await listenOn(server, { env: {}, fallback: { port: 0, host: '127.0.0.1' } });
    assert.equal(where.passed, false);
    const address = /** @type {net.AddressInfo} */ (server.address());
    assert.equal(where.url, `${prefix}${address.port}`);
  }
});
