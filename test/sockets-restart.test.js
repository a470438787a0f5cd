// Issue 4: while a load generator sends requests continuously and the server is restarted
// many times, no request is refused or reset, and the count in shared memory equals the
// number of requests answered. The socket stays open in the restarter (a shell loop, or
// node --watch), the memory file too.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import { test } from 'node:test';
import { cleanEnv, NODE, ROOT, SHM_FD, tempDir, waitFor } from './helpers.js';

const COUNTER = path.join(ROOT, 'examples', 'http-counter.js');

/** Starts a wrapper in its own process group; resolves with the port it logged. */
async function startWrapped(t, args) {
  const child = spawn(NODE, [SHM_FD, '--log-level', 'info', ...args], {
    cwd: ROOT,
    env: cleanEnv(),
    stdio: ['ignore', 'pipe', 'pipe'],
    detached: true,
  });
  let stderr = '';
  child.stderr.on('data', (d) => (stderr += d));
  child.stdout.resume();
  const exited = new Promise((resolve) => child.on('close', (code, signal) => resolve({ code, signal })));
  // The whole group: the restarter and the server it runs.
  const killGroup = (signal) => {
    try {
      process.kill(-child.pid, signal);
    } catch {
      // already gone
    }
  };
  t.after(() => killGroup('SIGKILL'));
  const match = await waitFor(() => /listening on http:\/\/127\.0\.0\.1:(\d+) \(socket http\)/.exec(stderr), 20_000, 'the socket');
  return { port: Number(match[1]), stderr: () => stderr, killGroup, exited };
}

/**
 * Sends requests, `concurrency` at a time, until stopped or `limit` are sent: each on a new
 * connection, or (`keepAlive`) reusing connections as browsers and Node's default agent do.
 */
function loadGenerator(port, { concurrency = 4, limit = 50_000, keepAlive = false } = {}) {
  const agent = keepAlive ? new http.Agent({ keepAlive: true, maxSockets: concurrency }) : false;
  const results = { sent: 0, answered: 0, maxCount: 0, errors: [], pids: new Set(), lastPid: 0 };
  let running = true;
  const one = () =>
    new Promise((resolve) => {
      results.sent++;
      const req = http.get({ host: '127.0.0.1', port, path: '/', agent }, (res) => {
        let body = '';
        res.on('data', (d) => (body += d));
        res.on('end', () => {
          try {
            const { count, pid } = JSON.parse(body);
            results.answered++;
            results.maxCount = Math.max(results.maxCount, count);
            results.pids.add(pid);
            results.lastPid = pid;
          } catch {
            results.errors.push(`bad body ${JSON.stringify(body)}`);
          }
          resolve();
        });
        res.on('error', (err) => {
          results.errors.push(`response: ${err.code ?? err.message}`);
          resolve();
        });
      });
      req.on('error', (err) => {
        results.errors.push(err.code ?? err.message);
        resolve();
      });
    });
  const worker = async () => {
    while (running && results.sent < limit) await one();
  };
  const done = Promise.all(Array.from({ length: concurrency }, worker));
  return {
    results,
    async stop() {
      running = false;
      await done;
      if (agent) agent.destroy();
      return results;
    },
  };
}

/** Restarts `times` times with `restart(pid)`; each restart is done when another pid answers. */
async function restartUnderLoad(load, times, restart) {
  await waitFor(() => load.results.answered > 0, 20_000, 'a first answer');
  for (let i = 0; i < times; i++) {
    const before = load.results.lastPid;
    const seen = load.results.pids.size;
    await restart(before, i);
    await waitFor(() => load.results.pids.size > seen && load.results.lastPid !== before, 30_000, `restart ${i + 1}`);
    // Some answers from the new process before the next restart.
    const answered = load.results.answered;
    await waitFor(() => load.results.answered >= answered + 20, 20_000, 'answers after a restart');
  }
}

test('a shell restart loop: 10 graceful restarts under load, nothing refused or reset, count == answered', async (t) => {
  const w = await startWrapped(t, ['-s', 'http::0', '--', 'sh', '-c', `while :; do "${NODE}" "${COUNTER}" || exit $?; done`]);
  const load = loadGenerator(w.port);
  await restartUnderLoad(load, 10, (pid) => process.kill(pid, 'SIGTERM'));
  const r = await load.stop();
  t.diagnostic(`sent ${r.sent}, answered ${r.answered}, failed ${r.errors.length}, processes ${r.pids.size}`);
  assert.deepEqual(r.errors, [], 'no request refused, reset or cut');
  assert.equal(r.answered, r.sent);
  assert.equal(r.maxCount, r.answered, 'the count in shared memory went on across every restart');
  assert.equal(r.pids.size, 11);
  w.killGroup('SIGTERM');
});

test('keep-alive clients across 10 graceful restarts: nothing reset, every counted request answered', async (t) => {
  const w = await startWrapped(t, ['-s', 'http::0', '--', 'sh', '-c', `while :; do "${NODE}" "${COUNTER}" || exit $?; done`]);
  const load = loadGenerator(w.port, { concurrency: 8, keepAlive: true });
  await restartUnderLoad(load, 10, (pid) => process.kill(pid, 'SIGTERM'));
  const r = await load.stop();
  t.diagnostic(`keep-alive: sent ${r.sent}, answered ${r.answered}, failed ${r.errors.length}, processes ${r.pids.size}`);
  assert.deepEqual(r.errors, [], 'no request reset on a reused connection');
  assert.equal(r.answered, r.sent);
  assert.equal(r.maxCount, r.answered, 'no request counted without being answered');
  w.killGroup('SIGTERM');
});

test('node --watch (the dev loop recipe, --first-fd 17): restarts on file changes keep the socket and the count', async (t) => {
  const dir = tempDir(t);
  const trigger = path.join(dir, 'trigger');
  fs.writeFileSync(trigger, '0');
  const w = await startWrapped(t, ['--first-fd', '17', '-s', 'http::0', '--', NODE, `--watch-path=${dir}`, COUNTER]);
  assert.doesNotMatch(w.stderr(), /warning/);
  const load = loadGenerator(w.port);
  await restartUnderLoad(load, 4, async (_pid, i) => {
    fs.writeFileSync(trigger, String(i + 1));
  });
  const r = await load.stop();
  t.diagnostic(`sent ${r.sent}, answered ${r.answered}, failed ${r.errors.length}, processes ${r.pids.size}`);
  assert.deepEqual(r.errors, []);
  assert.equal(r.answered, r.sent);
  assert.equal(r.maxCount, r.answered);
  assert.ok(r.pids.size >= 5, `at least 5 processes answered, not ${r.pids.size}`);
  w.killGroup('SIGTERM');
});

test('node --watch with descriptors below 17: shm-fd warns that they would not reach the program', async (t) => {
  const dir = tempDir(t);
  const child = spawn(NODE, [SHM_FD, '-s', 'http::0', '--', NODE, `--watch-path=${dir}`, '-e', 'process.exit(0)'], {
    cwd: ROOT,
    env: cleanEnv(),
    stdio: ['ignore', 'ignore', 'pipe'],
    detached: true,
  });
  t.after(() => {
    try {
      process.kill(-child.pid, 'SIGKILL');
    } catch {
      // gone
    }
  });
  let stderr = '';
  child.stderr.on('data', (d) => (stderr += d));
  await waitFor(() => stderr.includes('\n'), 20_000, 'the warning');
  assert.match(stderr, /^shm-fd: warning: node is a Node process that restarts its program: descriptors below 17 do not reach the program; use --first-fd 17$/m);
});
