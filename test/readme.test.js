// The README's library examples are real, copy-pasteable programs: every JavaScript block
// of README.md runs as written, or its first line says what it needs, and then it runs
// with that. Three kinds, and every block is one of them:
// - "// Needs shm-fd or shm-restore ...: shm-fd node app.mjs": runs under shm-fd (twice in
//   a row on one memory file, as a program restarted by a wrapper would); run alone, it
//   stops with an error that names shm-fd, not with a TypeError deep in the example;
// - "// A server: runs until SIGTERM ...": under shm-fd -s, it answers on the passed
//   socket and stops with status 0 on SIGTERM;
// - anything else runs alone and exits 0; under a service manager, a block that notifies
//   is checked against a real notify socket.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import path from 'node:path';
import { test } from 'node:test';
import { cleanEnv, commandExists, datagramReceiver, NODE, ROOT, run, runShmFd, SHM_FD, SHM_RESTORE, start, tempDir, waitFor } from './helpers.js';

const NEEDS_MEMORY = /^\/\/ Needs shm-fd or shm-restore, which pass the memory file: shm-fd node app\.mjs$/;
const SERVER = /^\/\/ A server: runs until SIGTERM or Ctrl-C, on the socket passed as (\w+) or else on port \d+$/;

const blocks = [...fs.readFileSync(path.join(ROOT, 'README.md'), 'utf8').matchAll(/```js\n([\s\S]*?)```/g)].map((m) => m[1]);

test('the README has library examples to check', () => {
  assert.ok(blocks.length >= 5, `found ${blocks.length} js blocks`);
});

/** Writes the block inside the package, so that `import ... from 'shmfd'` resolves to this checkout. */
function writeExample(t, code, i) {
  const dir = fs.mkdtempSync(path.join(ROOT, 'test', '.readme-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  const file = path.join(dir, 'app.mjs');
  fs.writeFileSync(file, code);
  return { dir, file, name: `README example ${i + 1}` };
}

const q = (s) => `'${s.replace(/'/g, "'\\''")}'`;

blocks.forEach((code, i) => {
  const first = code.split('\n')[0];
  const title = `README example ${i + 1} (${first.trim()})`;

  if (NEEDS_MEMORY.test(first)) {
    test(`${title}: runs twice under shm-fd; alone, it says it needs shm-fd`, async (t) => {
      const { file } = writeExample(t, code, i);
      const r = await runShmFd(['sh', '-c', `${q(NODE)} ${q(file)} && ${q(NODE)} ${q(file)}`], { env: cleanEnv() });
      assert.equal(r.code, 0, `exit ${r.code}\n${r.stderr}`);
      assert.equal(r.stderr, '');
      const alone = await run(NODE, [file], { env: cleanEnv() });
      assert.notEqual(alone.code, 0);
      assert.match(alone.stderr, /Error: .*run (me|the program) under shm-(fd|restore)/);
      assert.doesNotMatch(alone.stderr, /TypeError|ReferenceError|Cannot read properties/);
    });
    return;
  }

  if (code.includes('listenOn(')) {
    test(`${title}: says it is a server; answers on the socket shm-fd passes and stops with 0 on SIGTERM`, async (t) => {
      const match = SERVER.exec(first);
      assert.ok(match, `the first line says that it serves, on which socket: ${first}`);
      const { file } = writeExample(t, code, i);
      const socket = path.join(tempDir(t), 'app.sock');
      const wrapper = start(NODE, [SHM_FD, '-s', `${match[1]}=unix::${socket}`, NODE, file], { t });
      // The wrapper's socket queues connections at once; the answer shows the example serves.
      await waitFor(() => fs.existsSync(socket), 'the passed socket');
      const body = await new Promise((resolve, reject) => {
        http.get({ socketPath: socket, path: '/' }, (res) => {
          let text = '';
          res.on('data', (d) => (text += d));
          res.on('end', () => resolve(text));
        }).on('error', reject);
      });
      assert.equal(body, 'hello\n');
      wrapper.kill('SIGTERM');
      const end = await wrapper.exited;
      assert.deepEqual([end.code, end.signal], [0, null], end.stderr);
      assert.equal(wrapper.err.text, '');
    });
    return;
  }

  test(`${title}: runs alone, as written`, async (t) => {
    const { file } = writeExample(t, code, i);
    const r = await run(NODE, [file], { env: cleanEnv() });
    assert.equal(r.code, 0, `exit ${r.code}\n${r.stderr}`);
    assert.equal(r.stderr, '');
    if (!code.includes('Notifier.fromEnv()')) return;
    // Under a service manager with an fd store and a watchdog: what it sends arrives.
    const receiver = datagramReceiver(path.join(tempDir(t), 'notify.sock'));
    t.after(() => receiver.close());
    const notified = await run(NODE, [file], {
      env: cleanEnv({ NOTIFY_SOCKET: receiver.address, FDSTORE: '4', WATCHDOG_USEC: '10000000' }),
    });
    assert.equal(notified.code, 0, notified.stderr);
    const messages = [];
    for (let m = receiver.receive(); m !== undefined; m = receiver.receive()) messages.push(m);
    assert.deepEqual(
      messages.map((m) => [m.text, m.fds.length]),
      [
        ['READY=1\nSTATUS=serving', 0],
        ['FDSTORE=1\nFDNAME=cache', 1],
        ['WATCHDOG=1', 0],
      ],
    );
  });
});

// The shell recipe of examples/kv-server.js: the server line as written (on a free port and
// a temporary backup), then every line of the next block, each printing exactly what its
// comment says (nothing without one); after Ctrl-C (SIGINT to the process group) and a
// restart, the value is still there.
const SERVER_LINE = 'shm-restore --snapshot=restore-v1 -s http::8080 /tmp/kv.state -- node examples/kv-server.js';

test('README kv-server recipe: runs as written, and the map survives Ctrl-C and a restart', { skip: !commandExists('curl') && 'needs curl' }, async (t) => {
  const shellBlocks = [...fs.readFileSync(path.join(ROOT, 'README.md'), 'utf8').matchAll(/```sh\n([\s\S]*?)```/g)].map((m) => m[1]);
  const at = shellBlocks.findIndex((b) => b === `${SERVER_LINE}\n`);
  assert.ok(at >= 0 && at + 1 < shellBlocks.length, `a block of its own: ${SERVER_LINE}, then one of curl commands`);
  const port = await new Promise((resolve, reject) => {
    const probe = net.createServer().listen(0, '127.0.0.1', () => {
      const { port: free } = /** @type {net.AddressInfo} */ (probe.address());
      probe.close(() => resolve(free));
    });
    probe.on('error', reject);
  });
  const backup = path.join(tempDir(t), 'kv.state');
  const args = SERVER_LINE.split(' ').flatMap((word) => {
    if (word === 'shm-restore') return [SHM_RESTORE];
    if (word === 'node') return [NODE];
    return [word.replace('8080', String(port)).replace('/tmp/kv.state', backup)];
  });
  const startServer = async () => {
    const host = start(NODE, args, { t, detached: true });
    // The host's socket queues connections once it listens; the program answers them.
    await waitFor(
      () =>
        new Promise((resolve) => {
          const c = net.connect(port, '127.0.0.1', () => resolve(true));
          c.on('connect', () => c.destroy());
          c.on('error', () => resolve(false));
        }),
      `port ${port}`,
    );
    return host;
  };
  const lines = shellBlocks[at + 1].trimEnd().split('\n').map((line) => {
    const m = /^(.*?)\s+# (.*)$/.exec(line);
    return { command: (m ? m[1] : line).replaceAll(':8080/', `:${port}/`), prints: m ? `${m[2]}\n` : '' };
  });
  const runLine = async ({ command, prints }) => {
    const r = await run('sh', ['-c', command], { env: cleanEnv() });
    assert.equal(r.code, 0, `${command}: ${r.stderr}`);
    assert.equal(r.stdout, prints, command);
  };

  const first = await startServer();
  for (const line of lines) await runLine(line);
  first.kill('SIGINT');
  const stopped = await first.exited;
  assert.equal(stopped.code, 130, `Ctrl-C: ${stopped.stderr}`);
  assert.equal(stopped.stderr, '');

  const again = await startServer();
  const greeting = lines.find((l) => /\/kv\/greeting$/.test(l.command) && l.prints !== '');
  assert.ok(greeting, 'the block reads greeting back');
  await runLine(greeting);
  // To the host alone, as systemd's KillMode=mixed does: it forwards the signal once.
  again.child.kill('SIGTERM');
  const end = await again.exited;
  assert.deepEqual([end.code, end.signal, end.stderr], [0, null, '']);
});
