// Issue 4, readiness: serve() sends READY=1 once listening, RELOADING=1 + MONOTONIC_USEC
// then READY=1 on SIGHUP (Type=notify-reload), STOPPING=1 on SIGTERM, finishes the
// requests in flight (with Connection: close), closes idle keep-alive connections and
// exits 0. Under a service manager, shm-fd parks the sockets it opens in the fd store.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import http from 'node:http';
import path from 'node:path';
import { test } from 'node:test';
import * as sys from '../dist/system.js';
import { cleanEnv, datagramReceiver, fixture, NODE, ROOT, SHM_FD, tempDir, waitFor } from './helpers.js';

function startServer(t, args, env) {
  const child = spawn(NODE, args, { cwd: ROOT, env, stdio: ['ignore', 'pipe', 'pipe'] });
  t.after(() => child.kill('SIGKILL'));
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (d) => (stdout += d));
  child.stderr.on('data', (d) => (stderr += d));
  const exited = new Promise((resolve) => child.on('close', (code, signal) => resolve({ code, signal })));
  return { child, exited, out: () => stdout, err: () => stderr };
}

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
  const s = startServer(t, [fixture('sockets-lifecycle.js')], cleanEnv({ NOTIFY_SOCKET: receiver.address }));
  const ready = (await receiver.next()).text;
  assert.equal(ready, 'READY=1\nSTATUS=serving');
  const port = Number((await waitFor(() => /ready http:\/\/127\.0\.0\.1:(\d+)/.exec(s.out()), 20_000, 'ready'))[1]);
  assert.equal((await get(port, '/')).body, 'fast', 'READY came after the server listened');

  const before = process.hrtime.bigint() / 1000n;
  s.child.kill('SIGHUP');
  const reloading = (await receiver.next()).text;
  const m = /^RELOADING=1\nMONOTONIC_USEC=(\d+)$/.exec(reloading);
  assert.ok(m, reloading);
  assert.ok(BigInt(m[1]) >= before, 'MONOTONIC_USEC is CLOCK_MONOTONIC, taken at the reload');
  assert.equal((await receiver.next()).text, 'READY=1\nSTATUS=serving');
  await waitFor(() => s.out().includes('reloaded'), 20_000, 'the reload');

  // An idle keep-alive connection and a request in flight when the stop comes.
  const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
  const idle = await get(port, '/', agent);
  const idleClosed = new Promise((resolve) => idle.socket.once('close', resolve));
  const slow = get(port, '/slow');
  await waitFor(() => s.out().includes('slow'), 20_000, 'the slow request');
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
    [SHM_FD, '-s', 'http::0', '-s', 'api=udp::0', '--', NODE, fixture('sockets-lifecycle.js')],
    cleanEnv({ NOTIFY_SOCKET: receiver.address, FDSTORE: '8' }),
  );
  const stored = [await receiver.next(), await receiver.next(), await receiver.next()];
  assert.deepEqual(stored.map((d) => d.text), ['FDSTORE=1\nFDNAME=http', 'FDSTORE=1\nFDNAME=api', 'FDSTORE=1\nFDNAME=SHM_SHARED_FD']);
  const http0 = sys.socketInfo(stored[0].fds[0]);
  assert.deepEqual([http0.family, http0.type, http0.listening], ['ipv4', 'stream', true]);
  assert.equal(sys.socketInfo(stored[1].fds[0]).type, 'datagram');
  assert.equal((await receiver.next()).text, 'READY=1\nSTATUS=serving');
  const port = http0.address.port;
  assert.equal((await get(port, '/')).body, 'fast');
  s.child.kill('SIGTERM');
  assert.equal((await receiver.next()).text, 'STOPPING=1');
  assert.deepEqual(await s.exited, { code: 0, signal: null });
  // The stored copy still listens: the next start would get it back and reuse it.
  assert.equal(sys.socketInfo(stored[0].fds[0]).listening, true);
  assert.doesNotMatch(s.err(), /warning/);
});
