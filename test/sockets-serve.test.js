// Issue 4, readiness: serve() sends READY=1 once listening, RELOADING=1 + MONOTONIC_USEC
// then READY=1 on SIGHUP (Type=notify-reload), STOPPING=1 on SIGTERM, finishes the
// requests in flight (with Connection: close), closes idle keep-alive connections and
// exits 0. Under a service manager, shm-fd parks the sockets it opens in the fd store.
import assert from 'node:assert/strict';
import http from 'node:http';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { serve } from 'shmfd';
import * as sys from '../dist/system/libc.js';
import { cleanEnv, datagramReceiver, fixture, NODE, SHM_FD, start, tempDir, waitFor } from './helpers.js';

function startServer(t, args, env, extraFds = []) {
  const server = start(NODE, args, { env, extraFds, t });
  return { child: server.child, exited: server.exited.then(({ code, signal }) => ({ code, signal })), out: () => server.out.text, err: () => server.err.text };
}

/**
 * @param {number} port
 * @param {string} urlPath
 * @param {http.Agent | false} [agent]
 */
function get(port, urlPath, agent = false) {
  return new Promise((resolve, reject) => {
    http
      .get({ host: '127.0.0.1', port, path: urlPath, agent }, (res) => {
        const socket = res.socket;
        let body = '';
        res.on('data', (d) => (body += d));
        res.on('end', () => resolve({ status: res.statusCode, body, connection: res.headers.connection, socket }));
      })
      .on('error', reject);
  });
}

test('READY after listening, RELOADING+MONOTONIC_USEC then READY on SIGHUP, STOPPING on SIGTERM; in-flight requests finish', async (t) => {
  const dir = tempDir(t);
  const receiver = datagramReceiver(path.join(dir, 'notify'));
  t.after(() => receiver.close());
  const s = startServer(t, [fixture('sockets-serve.js')], cleanEnv({ NOTIFY_SOCKET: receiver.address }));
  const ready = (await receiver.next()).text;
  assert.equal(ready, 'READY=1\nSTATUS=serving');
  const port = Number((await waitFor(() => /ready http:\/\/127\.0\.0\.1:(\d+)/.exec(s.out()), 'ready'))[1]);
  assert.equal((await get(port, '/')).body, 'fast', 'READY came after the server listened');

  const before = process.hrtime.bigint() / 1000n;
  s.child.kill('SIGHUP');
  const reloading = (await receiver.next()).text;
  const m = /^RELOADING=1\nMONOTONIC_USEC=(\d+)$/.exec(reloading);
  assert.ok(m, reloading);
  assert.ok(BigInt(m[1]) >= before, 'MONOTONIC_USEC is CLOCK_MONOTONIC, taken at the reload');
  assert.equal((await receiver.next()).text, 'READY=1\nSTATUS=serving');
  await waitFor(() => s.out().includes('reloaded'), 'the reload');

  // An idle keep-alive connection and a request in flight when the stop comes.
  const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
  const idle = await get(port, '/', agent);
  const idleClosed = new Promise((resolve) => idle.socket.once('close', resolve));
  const slow = get(port, '/slow');
  await waitFor(() => s.out().includes('slow'), 'the slow request');
  s.child.kill('SIGTERM');
  assert.equal((await receiver.next()).text, 'STOPPING=1');
  const answer = await slow;
  assert.deepEqual([answer.status, answer.body, answer.connection], [200, 'slow done', 'close']);
  await idleClosed;
  agent.destroy();
  assert.deepEqual(await s.exited, { code: 0, signal: null });
  assert.match(s.out(), /stopped\n$/);
});

test('under a service manager shm-fd parks the sockets it opens in the fd store, named, before the memory file', async (t) => {
  const dir = tempDir(t);
  const receiver = datagramReceiver(path.join(dir, 'notify'));
  t.after(() => receiver.close());
  const s = startServer(
    t,
    [SHM_FD, '-s', 'http::0', '-s', 'api=udp::0', '--', NODE, fixture('sockets-serve.js')],
    cleanEnv({ NOTIFY_SOCKET: receiver.address, FDSTORE: '8' }),
  );
  const stored = [await receiver.next(), await receiver.next(), await receiver.next()];
  assert.deepEqual(stored.map((d) => d.text), ['FDSTORE=1\nFDNAME=http', 'FDSTORE=1\nFDNAME=api', 'FDSTORE=1\nFDNAME=SHM_SHARED_FD']);
  const http0 = sys.socketInfo(stored[0].fds[0]);
  assert.deepEqual([http0.family, http0.type, http0.listening], ['ipv4', 'stream', true]);
  assert.equal(sys.socketInfo(stored[1].fds[0]).type, 'datagram');
  assert.equal((await receiver.next()).text, 'READY=1\nSTATUS=serving');
  const port = /** @type {{port: number}} */ (http0.address).port;
  assert.equal((await get(port, '/')).body, 'fast');
  s.child.kill('SIGTERM');
  assert.equal((await receiver.next()).text, 'STOPPING=1');
  assert.deepEqual(await s.exited, { code: 0, signal: null });
  // The stored copy still listens: the next start would get it back and reuse it.
  assert.equal(sys.socketInfo(stored[0].fds[0]).listening, true);
  assert.doesNotMatch(s.err(), /warning/);
});

test('a stored socket that no longer fits --socket is replaced in the fd store too: FDSTOREREMOVE, then FDSTORE of the new one', async (t) => {
  const dir = tempDir(t);
  const receiver = datagramReceiver(path.join(dir, 'notify'));
  t.after(() => receiver.close());
  // The test plays the service manager: it gives back the http socket of the last start
  // (TCP), but the unit now says --socket http=unix::PATH.
  const held = sys.socket(sys.AF_INET, sys.SOCK_STREAM);
  t.after(() => sys.close(held));
  sys.bindSocket(held, { family: 'ipv4', address: '127.0.0.1', port: 0 });
  sys.listen(held, 16);
  const socketPath = path.join(dir, 'http.sock');
  const s = startServer(
    t,
    [SHM_FD, '-s', `http=unix::${socketPath}`, '--', NODE, fixture('sockets-serve.js')],
    cleanEnv({ NOTIFY_SOCKET: receiver.address, LISTEN_FDS: '1', LISTEN_FDNAMES: 'http' }),
    [held],
  );
  assert.equal((await receiver.next()).text, 'FDSTOREREMOVE=1\nFDNAME=http', 'the stale TCP socket leaves the store first');
  const stored = await receiver.next();
  assert.equal(stored.text, 'FDSTORE=1\nFDNAME=http');
  assert.equal(stored.fds.length, 1);
  const info = sys.socketInfo(stored.fds[0]);
  assert.deepEqual([info.family, info.listening, /** @type {{path: string}} */ (info.address).path], ['unix', true, socketPath]);
  assert.equal((await receiver.next()).text, 'FDSTORE=1\nFDNAME=SHM_SHARED_FD');
  assert.equal((await receiver.next()).text, 'READY=1\nSTATUS=serving');
  assert.ok(fs.statSync(socketPath).isSocket());
  // Without $FDSTORE the manager may predate it (systemd 252) or have no store: one warning each.
  const lines = s.err().split('\n').filter(Boolean);
  assert.equal(lines.filter((l) => /does not fit --socket http=unix::/.test(l)).length, 1, s.err());
  assert.equal(lines.filter((l) => /\$FDSTORE is not set: .*sockets are opened anew on every start/.test(l)).length, 1, s.err());
  s.child.kill('SIGTERM');
  assert.deepEqual(await s.exited, { code: 0, signal: null });
});

test('serve(): a listen that fails and is retried by the program does not end the process; READY=1 follows the retry', async (t) => {
  const dir = tempDir(t);
  const receiver = datagramReceiver(path.join(dir, 'notify'));
  t.after(() => receiver.close());
  const s = startServer(t, [fixture('serve-retry.js')], cleanEnv({ NOTIFY_SOCKET: receiver.address }));
  assert.equal((await receiver.next()).text, 'READY=1\nSTATUS=serving');
  const port = Number((await waitFor(() => /ready (\d+)/.exec(s.out()), 'ready'))[1]);
  assert.match(s.out(), /^first listen failed: EADDRINUSE\n/);
  assert.equal((await get(port, '/')).body, 'ok');
  s.child.kill('SIGTERM');
  assert.equal((await receiver.next()).text, 'STOPPING=1');
  assert.deepEqual(await s.exited, { code: 0, signal: null });
  assert.equal(s.err(), '');
});

test('serve(): the same stop signal twice within 250 ms is one stop (terminal + forwarding parent); a later one cuts what is left', async (t) => {
  const dir = tempDir(t);
  const start = async (receiver) => {
    const s = startServer(t, [fixture('sockets-serve.js')], cleanEnv(receiver === undefined ? {} : { NOTIFY_SOCKET: receiver.address }));
    const port = Number((await waitFor(() => /ready http:\/\/127\.0\.0\.1:(\d+)/.exec(s.out()), 'ready'))[1]);
    return { s, port };
  };
  // What shm-restore's forwarding adds to systemd's own, a few milliseconds later (two
  // kills back to back would merge into one pending signal). A test process scheduled so
  // late that its second kill came 150 ms or more after the first tries again.
  for (let attempt = 1; ; attempt++) {
    const twice = await start();
    const finished = get(twice.port, '/slow?ms=800').then(
      (r) => r.body,
      (err) => err.code,
    );
    await waitFor(() => twice.s.out().includes('slow'), 'the slow request');
    twice.s.child.kill('SIGTERM');
    const first = performance.now();
    await new Promise((resolve) => setTimeout(resolve, 60));
    twice.s.child.kill('SIGTERM');
    const gap = performance.now() - first;
    const body = await finished;
    const end = await twice.s.exited;
    if (body !== 'slow done' && gap >= 150 && attempt < 5) continue;
    assert.equal(body, 'slow done', `the request in flight was not cut (signals ${gap.toFixed(0)} ms apart)`);
    assert.deepEqual(end, { code: 0, signal: null });
    break;
  }

  const receiver = datagramReceiver(path.join(dir, 'notify'));
  t.after(() => receiver.close());
  const hurried = await start(receiver);
  assert.equal((await receiver.next()).text, 'READY=1\nSTATUS=serving');
  const cut = get(hurried.port, '/slow?ms=20000').then(
    () => 'answered',
    (err) => err.code,
  );
  await waitFor(() => hurried.s.out().includes('slow'), 'the slow request');
  hurried.s.child.kill('SIGTERM');
  assert.equal((await receiver.next()).text, 'STOPPING=1', 'the first stop was handled');
  await new Promise((resolve) => setTimeout(resolve, 400));
  hurried.s.child.kill('SIGTERM');
  assert.equal(await cut, 'ECONNRESET', 'a second stop request cuts the request in flight');
  assert.deepEqual(await hurried.s.exited, { code: 0, signal: null });
});

test('serve(): stop() while the server is still starting closes it once it listens (exit: false)', { timeout: 10_000 }, async () => {
  const server = http.createServer((req, res) => res.end('late'));
  const service = serve({ endpoints: [server], exit: false, notifier: null, signals: [] });
  await service.stop();
  server.listen(0, '127.0.0.1');
  await new Promise((resolve) => server.once('close', resolve));
  assert.equal(server.listening, false, 'a stopped service does not serve');
});

test('serve(): SIGINT stops gracefully, then ends the process by SIGINT, as a shell loop expects of Ctrl-C', async (t) => {
  const s = startServer(t, [fixture('sockets-serve.js')], cleanEnv());
  await waitFor(() => /ready /.test(s.out()), 'ready');
  s.child.kill('SIGINT');
  assert.deepEqual(await s.exited, { code: null, signal: 'SIGINT' });
  assert.match(s.out(), /stopped\n$/, 'after the graceful stop');
});

// Issue 7: a restarter's SIGTERM can come at any instant of a start-up, and loading shmfd
// (koffi, libc) takes most of it. serve() from shmfd/serve loads nothing of that, so a
// program calls it first and a stop during the rest of the start-up is graceful.
/** @type {Array<[NodeJS.Signals, {code: number | null, signal: NodeJS.Signals | null}]>} */
const stops = [
  ['SIGTERM', { code: 0, signal: null }],
  ['SIGINT', { code: null, signal: 'SIGINT' }],
];
for (const [signal, ending] of stops) {
  test(`serve() from shmfd/serve, called first: a ${signal} while the rest of shmfd loads is a graceful stop`, async (t) => {
    const dir = tempDir(t);
    const receiver = datagramReceiver(path.join(dir, 'notify'));
    t.after(() => receiver.close());
    const s = startServer(t, [fixture('serve-early.js')], cleanEnv({ NOTIFY_SOCKET: receiver.address }));
    const line = await waitFor(() => /serving, koffi loaded: (\w+)/.exec(s.out()), 'serve()');
    assert.equal(line[1], 'no', 'the stop signals were handled before koffi was loaded');
    s.child.kill(signal);
    assert.deepEqual(await s.exited, ending, s.err());
    assert.match(s.out(), /stopped\n$/, 'onStop ran: the stop was the graceful one');
    // READY=1 only if the server came to listen before the signal was handled.
    const sent = [];
    for (let m = receiver.receive(); m !== undefined; m = receiver.receive()) sent.push(m.text);
    assert.equal(sent.at(-1), 'STOPPING=1', `the manager heard of the stop before the exit: ${JSON.stringify(sent)}`);
    assert.equal(s.err(), '');
  });
}

test('serve(): a stop signal that arrives while the process exits after a graceful stop does not kill it', async (t) => {
  const s = startServer(t, [fixture('serve-early.js'), 'late-signal'], cleanEnv());
  await waitFor(() => /listening /.exec(s.out()), 'listening');
  s.child.kill('SIGTERM');
  assert.deepEqual(await s.exited, { code: 0, signal: null }, s.err());
  assert.match(s.out(), /stopped\n$/);
});

test('importing shmfd or shmfd/serve installs no signal handler: SIGTERM keeps its default', async (t) => {
  const program = "await import('shmfd'); await import('shmfd/serve'); process.stdout.write('imported\\n'); setInterval(() => {}, 60_000);";
  const s = startServer(t, ['--input-type=module', '-e', program], cleanEnv());
  await waitFor(() => s.out().includes('imported'), 'the imports');
  s.child.kill('SIGTERM');
  assert.deepEqual(await s.exited, { code: null, signal: 'SIGTERM' });
});

test('serve(): an invalid NOTIFY_SOCKET is one line on stderr, the service runs and stops as usual', async (t) => {
  const s = startServer(t, [fixture('serve-early.js')], cleanEnv({ NOTIFY_SOCKET: 'relative/path' }));
  const port = Number((await waitFor(() => /listening http:\/\/127\.0\.0\.1:(\d+)/.exec(s.out()), 'listening'))[1]);
  assert.equal((await get(port, '/')).body, 'ok');
  s.child.kill('SIGTERM');
  assert.deepEqual(await s.exited, { code: 0, signal: null });
  assert.match(s.err(), /^shmfd: cannot notify the service manager: .*NOTIFY_SOCKET=relative\/path.*\n$/);
});
