// Issue 4 under a real, private `systemd --user` manager (test/systemd-sandbox.sh):
// - a .socket unit + a Type=notify .service running `shm-fd node examples/http-counter.js`
//   with an fd store keeps the count across `systemctl restart`, and no connection is
//   refused or reset while it restarts (the socket unit holds the socket);
// - the same without a socket unit, with `shm-fd -s http::PORT`: shm-fd parks the socket
//   in the fd store and reuses it on restart; and with `shm-restore -s`, which stays the
//   main process (so the unit needs NotifyAccess=all, as docs/sockets.md says);
// - a Type=notify service is active only after READY=1.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import readline from 'node:readline';
import { test } from 'node:test';
import { fixture, freePort, NODE, ROOT, SANDBOX, sandboxEnv, SHM_FD, SHM_RESTORE, systemdSkip, tempDir, waitFor } from './helpers.js';


const COUNTER = path.join(ROOT, 'examples', 'http-counter.js');
const skip = systemdSkip;

/** Starts the sandbox with the relay; `sh(...)` runs a command next to the manager. */
async function sandbox(t, dir, units) {
  const unitDir = path.join(dir, 'units');
  fs.mkdirSync(unitDir);
  for (const [name, text] of Object.entries(units)) fs.writeFileSync(path.join(unitDir, name), text);
  const child = spawn(SANDBOX, [unitDir, NODE, fixture('sockets-systemctl-relay.js')], {
    env: sandboxEnv(path.join(dir, 'sandbox'), 240),
    stdio: ['pipe', 'pipe', 'pipe'],
  });
  let stderr = '';
  child.stderr.on('data', (d) => (stderr += d));
  const lines = readline.createInterface({ input: child.stdout })[Symbol.asyncIterator]();
  const exited = new Promise((resolve) => child.on('close', (code) => resolve(code)));
  // SIGTERM: the harness then ends its namespace and removes its cgroups.
  t.after(() => child.kill('SIGTERM'));
  const first = await lines.next();
  assert.ok(!first.done, `the sandbox did not start: ${stderr}`);
  const sh = async (...command) => {
    child.stdin.write(`${JSON.stringify(command)}\n`);
    const next = await lines.next();
    assert.ok(!next.done, `the sandbox ended: ${stderr}`);
    return JSON.parse(next.value);
  };
  const systemctl = (...args) => sh('systemctl', '--user', ...args);
  const close = async () => {
    child.stdin.end();
    return exited;
  };
  return { sh, systemctl, close, log: () => `${stderr}\n${fs.readFileSync(path.join(dir, 'sandbox', 'manager.log'), 'utf8')}` };
}

function request(port) {
  return new Promise((resolve, reject) => {
    http
      .get({ host: '127.0.0.1', port, agent: false }, (res) => {
        let body = '';
        res.on('data', (d) => (body += d));
        res.on('end', () => resolve(JSON.parse(body)));
        res.on('error', reject);
      })
      .on('error', reject);
  });
}

/** Requests in a loop (2 at a time) until stopped; collects answers and failures. */
function load(port) {
  const r = { sent: 0, answered: 0, maxCount: 0, errors: [], pids: new Set() };
  let running = true;
  const worker = async () => {
    while (running && r.sent < 50_000) {
      r.sent++;
      try {
        const { count, pid } = await request(port);
        r.answered++;
        r.maxCount = Math.max(r.maxCount, count);
        r.pids.add(pid);
      } catch (err) {
        r.errors.push(err.code ?? err.message);
      }
    }
  };
  const done = Promise.all([worker(), worker()]);
  return { r, stop: async () => ((running = false), await done, r) };
}

const SERVICE_COMMON = `Type=notify
FileDescriptorStoreMax=4
TimeoutStopSec=20
`;

async function restartsUnderLoad(t, sb, unit, port, times) {
  const l = load(port);
  await waitFor(() => l.r.answered > 0, 'a first answer');
  for (let i = 0; i < times; i++) {
    const answered = l.r.answered;
    const res = await sb.systemctl('restart', unit);
    assert.equal(res.code, 0, `restart ${i + 1}: ${res.stderr}\n${sb.log()}`);
    await waitFor(() => l.r.answered >= answered + 10, 'answers after a restart');
  }
  const r = await l.stop();
  t.diagnostic(`${unit}: ${times} restarts, sent ${r.sent}, answered ${r.answered}, failed ${r.errors.length}, processes ${r.pids.size}`);
  assert.deepEqual(r.errors, [], 'no connection refused or reset while restarting');
  assert.equal(r.answered, r.sent);
  assert.equal(r.maxCount, r.answered, 'the count lived in the fd store across every restart');
  assert.equal(r.pids.size, times + 1);
}

test('socket unit + Type=notify service with fd store: count kept across restarts, nothing refused', { skip }, async (t) => {
  const dir = tempDir(t, 'shmfd-systemd-');
  const port = await freePort();
  const port2 = await freePort();
  const port3 = await freePort();
  const backup = path.join(dir, 'counter.backup');
  const sb = await sandbox(t, dir, {
    'counter.socket': `[Unit]
Description=http-counter socket (test)
DefaultDependencies=no
StartLimitIntervalSec=0

[Socket]
ListenStream=127.0.0.1:${port}
FileDescriptorName=http
Service=counter.service
`,
    'counter.service': `[Unit]
Description=http-counter behind a socket unit (test)
DefaultDependencies=no
StartLimitIntervalSec=0
Requires=counter.socket
After=counter.socket

[Service]
${SERVICE_COMMON}ExecStart=${NODE} ${SHM_FD} ${NODE} ${COUNTER}
`,
    'counter-s.service': `[Unit]
Description=http-counter with shm-fd -s and the fd store (test)
DefaultDependencies=no
StartLimitIntervalSec=0

[Service]
${SERVICE_COMMON}ExecStart=${NODE} ${SHM_FD} --log-level info -s http::${port2} ${NODE} ${COUNTER}
`,
    'counter-r.service': `[Unit]
Description=http-counter under shm-restore -s with the fd store (test)
DefaultDependencies=no
StartLimitIntervalSec=0

[Service]
${SERVICE_COMMON}NotifyAccess=all
ExecStart=${NODE} ${SHM_RESTORE} -s http::${port3} ${backup} ${NODE} ${COUNTER}
`,
  });
  const started = await sb.systemctl('start', 'counter.socket', 'counter.service', 'counter-s.service', 'counter-r.service');
  assert.equal(started.code, 0, `${started.stderr}\n${sb.log()}`);

  await restartsUnderLoad(t, sb, 'counter.service', port, 5);
  const shown = await sb.systemctl('show', '-p', 'NFileDescriptorStore', '-p', 'ActiveState', 'counter.service');
  assert.match(shown.stdout, /^NFileDescriptorStore=1$/m, 'only the memory file is stored: the socket unit holds the socket');
  assert.match(shown.stdout, /^ActiveState=active$/m);

  await restartsUnderLoad(t, sb, 'counter-s.service', port2, 5);
  const shown2 = await sb.systemctl('show', '-p', 'NFileDescriptorStore', 'counter-s.service');
  assert.match(shown2.stdout, /^NFileDescriptorStore=2$/m, 'the socket and the memory file are stored');

  await restartsUnderLoad(t, sb, 'counter-r.service', port3, 3);
  const shown3 = await sb.systemctl('show', '-p', 'NFileDescriptorStore', 'counter-r.service');
  assert.match(shown3.stdout, /^NFileDescriptorStore=2$/m, 'shm-restore stored the socket and the memory file');
  assert.ok(fs.statSync(backup).size > 0, 'and wrote the memory back at each restart');
  assert.equal(await sb.close(), 0, sb.log());
});

test('a Type=notify service is activating until READY=1, active after', { skip }, async (t) => {
  const dir = tempDir(t, 'shmfd-systemd-');
  const gate = path.join(dir, 'gate');
  fs.mkdirSync(gate);
  const sb = await sandbox(t, dir, {
    'gated.service': `[Unit]
Description=readiness after a gate (test)
DefaultDependencies=no
StartLimitIntervalSec=0

[Service]
Type=notify
Environment=GATE_DIR=${gate}
ExecStart=${NODE} ${SHM_FD} ${NODE} ${fixture('sockets-gated-ready.js')}
`,
  });
  const state = path.join(gate, 'state');
  assert.equal((await sb.systemctl('start', '--no-block', 'gated.service')).code, 0);
  await waitFor(() => fs.existsSync(state) && fs.readFileSync(state, 'utf8') === 'waiting', 'the service to wait');
  const before = await sb.systemctl('show', '-p', 'ActiveState', '-p', 'SubState', 'gated.service');
  assert.match(before.stdout, /^ActiveState=activating$/m, before.stdout);
  assert.match(before.stdout, /^SubState=start$/m);
  fs.writeFileSync(path.join(gate, 'open'), '');
  for (;;) {
    const now = await sb.systemctl('show', '-p', 'ActiveState', 'gated.service');
    if (/^ActiveState=active$/m.test(now.stdout)) break;
    assert.match(now.stdout, /^ActiveState=activating$/m, now.stdout);
    await new Promise((r) => setTimeout(r, 50));
  }
  assert.equal(fs.readFileSync(state, 'utf8'), 'ready-sent');
  assert.equal(await sb.close(), 0, sb.log());
});
