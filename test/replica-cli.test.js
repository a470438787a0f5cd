// Issue 11: what `--replica` refuses before it touches anything: credentials on the
// command line, a malformed URL, --replica without --snapshot, servers that do not
// answer, and a server without JetStream; each one error line. And a program that never
// configures its memory, which gives nothing to replicate and nothing to warn about. The
// last two need a nats-server.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { assertOneErrorLine, COUNTER, freePort, NODE, runHost, tempDir } from './helpers.js';
import { natsSkip, startNats } from './nats.js';

test('credentials in the replica URL are refused, never sent anywhere', async (t) => {
  const dir = tempDir(t);
  const backup = path.join(dir, 'state');
  const r = await runHost(['--snapshot=restore-v1', '--replica', 'nats://alice:secret@127.0.0.1:4222/app', backup, NODE, COUNTER]);
  assert.equal(r.code, 125);
  assertOneErrorLine(r.stderr, /replica URL .*: credentials do not belong on the command line, .*NATS_CREDS/, 'shm-restore');
  assert.deepEqual(fs.readdirSync(dir), []);
});

test('a malformed replica URL is one line naming the problem', async (t) => {
  const backup = path.join(tempDir(t), 'state');
  /** @type {Array<[string, RegExp]>} */
  const cases = [
    ['nats://127.0.0.1/app', /"127\.0\.0\.1" is not HOST:PORT/],
    ['nats://127.0.0.1:4222/a.b', /the name "a\.b" must be 1 to 64 letters, digits, - or _/],
    ['nats://127.0.0.1:4222/app?lease=0', /lease=0: seconds from 1 to 3600/],
    ['nats://127.0.0.1:4222/app?ttl=3', /unknown parameter "ttl"/],
  ];
  for (const [url, problem] of cases) {
    const r = await runHost(['--snapshot=restore-v1', '--replica', url, backup, NODE, COUNTER]);
    assert.equal(r.code, 125, url);
    assertOneErrorLine(r.stderr, problem, 'shm-restore');
  }
});

test('--replica needs --snapshot=restore-v1', async (t) => {
  const r = await runHost(['--replica', 'nats://127.0.0.1:4222/app', path.join(tempDir(t), 'state'), NODE, COUNTER]);
  assert.equal(r.code, 125);
  assertOneErrorLine(r.stderr, /--replica needs --snapshot=restore-v1$/, 'shm-restore');
});

test('a replica whose server does not answer stops the start with one line; status says so too', async (t) => {
  const dir = tempDir(t);
  const port = await freePort();
  const r = await runHost(['--snapshot=restore-v1', '--replica', `nats://127.0.0.1:${port}/app`, path.join(dir, 'state'), NODE, COUNTER]);
  assert.equal(r.code, 125);
  assertOneErrorLine(r.stderr, new RegExp(`cannot connect to the replica nats://127\\.0\\.0\\.1:${port}/app: `), 'shm-restore');
  assert.deepEqual(fs.readdirSync(dir), []);
  const status = await runHost(['status', `nats://127.0.0.1:${port}/app`]);
  assert.equal(status.code, 1);
  assertOneErrorLine(status.stderr, /cannot connect to the replica/, 'shm-restore');
});

test('a server without JetStream stops the start at once with one line saying so; status too', natsSkip, async (t) => {
  const dir = tempDir(t);
  const server = await startNats(t, dir, { jetstream: false });
  const url = `nats://${server.address}/app`;
  const backupDir = path.join(dir, 'host');
  fs.mkdirSync(backupDir);
  // Waiting would not help: without the refusal the host retries for 30 s and then names
  // the client's error, which this line does not match.
  const r = await runHost(['--snapshot=restore-v1', '--replica', url, path.join(backupDir, 'state'), NODE, COUNTER]);
  assert.equal(r.code, 125);
  assertOneErrorLine(r.stderr, new RegExp(`cannot use the replica ${url.replace(/[.]/g, '\\.')}: its server has no JetStream \\(start nats-server with -js`), 'shm-restore');
  assert.deepEqual(fs.readdirSync(backupDir), []);
  const status = await runHost(['status', url]);
  assert.equal(status.code, 1);
  assertOneErrorLine(status.stderr, /its server has no JetStream/, 'shm-restore');
});

test('a program that never configures its memory: the host exits with its status and warns about nothing', natsSkip, async (t) => {
  const dir = tempDir(t);
  const server = await startNats(t, path.join(dir, 'js'));
  const r = await runHost(['--snapshot=restore-v1', '--replica', `nats://${server.address}/idle`, path.join(dir, 'state'), NODE, '-e', 'process.exitCode = 3']);
  assert.equal(r.code, 3, r.stderr);
  // Nothing was written, so nothing is offered to the replica (it used to warn that the
  // backup it was told about does not exist).
  assert.doesNotMatch(r.stderr, /warning|error/);
  assert.equal(fs.existsSync(path.join(dir, 'state')), false);
});
