// Issue 11: shm-restore --replica streams restore-v1 backups to a real NATS JetStream
// server, another host (another directory, no local backup) starts from the replica, and a
// lease fences the writers: a second host is refused with one line naming the holder, a
// dead holder's lease expires and another host takes over, and a paused holder that wakes
// after losing its lease writes nothing more, even when the new holder's lease lapsed meanwhile.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { assertOneErrorLine, COUNTER, fixture, NODE, readCounterBackup, runHost, SHM_RESTORE, start, startHost, tempDir, waitFor } from './helpers.js';
import { chunkSizeOf, natsSkip, replicaReader, stateDigest, startNats, startWhenLeaseFree } from './nats.js';
import { CAPACITY, checkAllSnapshots } from './state-check.js';

/** A directory per "host", and a server. */
async function setUp(t) {
  const dir = tempDir(t, 'shmfd-replica-');
  const server = await startNats(t, path.join(dir, 'js'));
  const reader = await replicaReader(t, [server.address]);
  const backup = (/** @type {string} */ host) => {
    fs.mkdirSync(path.join(dir, host), { recursive: true });
    return path.join(dir, host, 'state');
  };
  return { dir, server, reader, backup };
}

/** Starts a host with a replica running the counter fixture with `counterArgs`. */
function host(t, url, backup, counterArgs, extra = []) {
  return startHost(['--snapshot=restore-v1', '--interval', '20', '--log-level', 'info', ...extra, '--replica', url, backup, NODE, COUNTER, '--every', '2', ...counterArgs], {
    detached: true,
    t,
  });
}

/** Waits until the replica NAME holds exactly the local backup, whose counter is `counter`. */
function replicated(reader, name, backup, counter) {
  return waitFor(
    async () => readCounterBackup(backup)?.counter === counter && (await reader.manifest(name))?.digest === stateDigest(backup),
    `the backup with counter ${counter} to reach the replica`,
  );
}

test('a host in another directory continues from the replica after the first host is SIGKILLed', natsSkip, async (t) => {
  const { server, reader, backup } = await setUp(t);
  const url = `nats://${server.address}/takeover?lease=1`;
  const a = host(t, url, backup('a'), ['--commits', '300']);
  assert.equal((await a.next()).recovered, 0);
  assert.equal((await a.next()).committed, 300);
  await replicated(reader, 'takeover', backup('a'), 300);
  a.kill('SIGKILL');
  await a.exited;

  // b's directory holds an empty backup (nothing to start from) that its group may read:
  // the state fetched from the replica, and every backup after it, keep its permission bits.
  fs.writeFileSync(backup('b'), '');
  fs.chmodSync(backup('b'), 0o640);
  // The lease of the dead host expires; then the new host takes over with its state.
  const { host: b, first } = await startWhenLeaseFree(() => host(t, url, backup('b'), ['--commits', '5', '--exit']), a.pid);
  assert.equal(first.recovered, 300);
  assert.equal((await b.next()).committed, 305);
  const end = await b.exited;
  assert.equal(end.code, 0, end.stderr);
  assert.match(end.stderr, /starting from the replica nats:\/\/\S+: the replica's newest state is \S+ \S+ old \(65\.5 kB, from \S+ pid \d+\), no local backup/);
  assert.equal(readCounterBackup(backup('b')).counter, 305);
  assert.equal(fs.statSync(backup('b')).mode & 0o7777, 0o640);
  // Its final state is replicated too, and status reads it without any local file.
  const manifest = await reader.manifest('takeover');
  assert.equal(manifest.digest, stateDigest(backup('b')));
  assert.match(manifest.holder, new RegExp(` pid ${b.pid}$`));
  const status = await runHost(['status', `nats://${server.address}/takeover`]);
  assert.equal(status.code, 0, status.stderr);
  assert.match(status.stdout, new RegExp(`^state: committed at stream sequence ${manifest.seq} by \\S+ pid ${b.pid}$`, 'm'));
  assert.match(status.stdout, /^state age: \S+ \S+ \(durable since \d{4}-/m);
  assert.match(status.stdout, /^lease: free$/m);
});

test('a second host is refused with one line naming the holder, which goes on replicating', natsSkip, async (t) => {
  const { server, reader, backup } = await setUp(t);
  const url = `nats://${server.address}/refused?lease=5`;
  const a = host(t, url, backup('a'), ['--commits', '50']);
  await a.next();
  assert.equal((await a.next()).committed, 50);
  await replicated(reader, 'refused', backup('a'), 50);

  const b = await runHost(['--snapshot=restore-v1', '--replica', url, backup('b'), NODE, COUNTER], { timeoutMs: 60_000 });
  assert.equal(b.code, 125);
  assertOneErrorLine(b.stderr, new RegExp(`^shm-restore: error: the replica ${url.replace(/[?.]/g, '\\$&')} is held by \\S+ pid ${a.pid} \\(lease renewed`), 'shm-restore');
  assert.deepEqual(fs.readdirSync(path.dirname(backup('b'))), [], 'the refused host touched nothing');
  const status = await runHost(['status', `nats://${server.address}/refused`]);
  assert.match(status.stdout, new RegExp(`^lease: held by \\S+ pid ${a.pid} `, 'm'));

  // The holder was not disturbed: its last state still reaches the replica when it stops.
  a.kill('SIGTERM');
  const end = await a.exited;
  assert.equal(end.signal ?? end.code, 143, end.stderr);
  assert.doesNotMatch(end.stderr, /warning|error/);
  assert.equal((await reader.manifest('refused')).digest, stateDigest(backup('a')));
});

/**
 * Checks the lines a woken old holder logged: a state it reports committed was stored
 * before the new holder's first (at `fencedAt`). A holder stopped while its last message
 * was on the way reports that message's acknowledgement once it wakes; the replica took
 * it before the takeover, so the report is true and no fencing was broken.
 */
function assertNothingCommittedSince(lines, fencedAt) {
  for (const line of lines) {
    const committed = /replica \S+: committed \d+ bytes at sequence (\d+)/.exec(line);
    if (committed !== null) assert.ok(Number(committed[1]) < fencedAt, `the old holder committed after the takeover: ${line}`);
  }
}

test('a paused holder that wakes after losing its lease stops replicating and writes nothing', natsSkip, async (t) => {
  const { server, reader, backup } = await setUp(t);
  const url = `nats://${server.address}/paused?lease=1`;
  const a = host(t, url, backup('a'), [], ['--log-level', 'debug']);
  await a.next();
  await a.err.waitFor(/replica \S+: committed /);
  a.kill('SIGSTOP');

  const { host: b, first } = await startWhenLeaseFree(() => host(t, url, backup('b'), []), a.pid);
  assert.ok(first.recovered > 0, 'B starts from what A replicated');
  // B commits and replicates on its own.
  await waitFor(async () => (await reader.manifest('paused'))?.holder.endsWith(` pid ${b.pid}`), 'the new holder to commit a state');
  const fencedAt = (await reader.manifest('paused')).seq;

  const before = a.err.lines.length;
  a.kill('SIGCONT');
  await a.err.waitFor(/error: lost the lease of the replica \S+ to \S+ pid \d+: replication stopped, nothing more is written to it; local backups go on/);
  const lost = a.err.lines.findIndex((line) => /lost the lease/.test(line));
  assert.match(a.err.lines[lost], new RegExp(`to \\S+ pid ${b.pid}:`));
  // A goes on with local backups only; B goes on replicating; nothing A sent was stored.
  const localBefore = readCounterBackup(backup('a')).counter;
  await waitFor(() => readCounterBackup(backup('a')).counter > localBefore, 'A to keep its local backups');
  const next = (await reader.manifest('paused')).seq;
  await waitFor(async () => (await reader.manifest('paused')).seq > next, 'B to commit again');
  for (const m of await reader.messagesFrom('paused', fencedAt)) {
    if (m.subject.endsWith('.manifest')) assert.match(JSON.parse(m.text).holder, new RegExp(` pid ${b.pid}$`));
  }
  assertNothingCommittedSince(a.err.lines.slice(before), fencedAt);
  assert.doesNotMatch(b.err.text, /lost the lease|warning|error/);
});

test('a new holder whose lease lapsed gets it back from the woken old holder, which writes nothing', natsSkip, async (t) => {
  const { server, reader, backup } = await setUp(t);
  const url = `nats://${server.address}/lapsed?lease=1`;
  const a = host(t, url, backup('a'), [], ['--log-level', 'debug']);
  await a.next();
  await a.err.waitFor(/replica \S+: committed /);
  a.kill('SIGSTOP');
  const { host: b } = await startWhenLeaseFree(() => host(t, url, backup('b'), [], ['--log-level', 'debug']), a.pid);
  await waitFor(async () => (await reader.manifest('lapsed'))?.holder.endsWith(` pid ${b.pid}`), 'the new holder to commit a state');
  const fencedAt = (await reader.manifest('lapsed')).seq;
  // B stalls past its lease (as a slow renewal on a loaded machine would); A wakes, finds
  // the lease free, takes it, and then B's commits after its own last message.
  b.kill('SIGSTOP');
  await waitFor(async () => /^lease: free$/m.test((await runHost(['status', `nats://${server.address}/lapsed`])).stdout), "B's lease to lapse");
  const before = a.err.lines.length;
  a.kill('SIGCONT');
  const lost = await a.err.waitFor(/error: lost the lease of the replica \S+ to (\S+ pid \d+): /);
  assert.ok(lost, a.err.text);
  assert.match(lost[1], new RegExp(` pid ${b.pid}$`));
  b.kill('SIGCONT');
  // B takes its lease back and goes on replicating; A committed nothing after it woke.
  const next = (await reader.manifest('lapsed')).seq;
  await waitFor(async () => (await reader.manifest('lapsed')).seq > next, 'B to commit again');
  for (const m of await reader.messagesFrom('lapsed', fencedAt)) {
    if (m.subject.endsWith('.manifest')) assert.match(JSON.parse(m.text).holder, new RegExp(` pid ${b.pid}$`));
  }
  assertNothingCommittedSince(a.err.lines.slice(before), fencedAt);
  assert.doesNotMatch(b.err.text, /lost the lease|error/);
});

test('a host that stopped and starts again finds its state in the replica and sends only what changes', natsSkip, async (t) => {
  const { server, reader, backup } = await setUp(t);
  const url = `nats://${server.address}/again`;
  // 16 MiB of data: sending it all again would be 16 MiB.
  const args = ['--snapshot=restore-v1', '--log-level', 'debug', '--replica', url, backup('a'), NODE, COUNTER, '--size', String(16 * 2 ** 20), '--fill', '7', '--commits', '3', '--exit'];
  const first = await runHost(args, { timeoutMs: 120_000 });
  assert.equal(first.code, 0, first.stderr);
  assert.equal((await reader.manifest('again')).digest, stateDigest(backup('a')), 'the final state reached the replica');

  const again = await runHost(args, { timeoutMs: 120_000 });
  assert.equal(again.code, 0, again.stderr);
  assert.match(again.stderr, /starting from the local backup: .*; the replica holds the same state/);
  const sent = [...again.stderr.matchAll(/replica \S+: committed \d+ bytes at sequence \d+: (\d+) of \d+ chunks of (\d+) bytes sent/g)].map((m) => Number(m[1]) * Number(m[2]));
  assert.ok(sent.length > 0 && sent.every((bytes) => bytes < 2 ** 20), `only the chunks the commits changed are sent: ${sent.join(', ')} bytes`);
  assert.equal((await reader.manifest('again')).digest, stateDigest(backup('a')));
});

test('states sent while newer rounds end are whole: a host taking over starts from one', natsSkip, async (t) => {
  const { server, reader, backup } = await setUp(t);
  const url = `nats://${server.address}/overlap?lease=1`;
  // 16 MiB of data: each send spans several snapshot rounds, each of which offers a newer backup.
  const big = ['--size', String(16 * 2 ** 20), '--fill', '7'];
  const a = host(t, url, backup('a'), big, ['--log-level', 'debug']);
  await a.next();
  await waitFor(() => a.err.numbers(/replica \S+: committed (\d+) bytes/).length >= 3, 'three states sent');
  a.kill('SIGKILL');
  await a.exited;
  assert.doesNotMatch(a.err.text, /warning|error/);
  const sent = await reader.manifest('overlap');

  const { host: b, first } = await startWhenLeaseFree(() => host(t, url, backup('b'), [...big, '--commits', '1', '--exit']), a.pid);
  assert.ok(first.recovered > 0, 'B starts from a state A sent');
  const end = await b.exited;
  assert.equal(end.code, 0, end.stderr);
  assert.match(end.stderr, new RegExp(`starting from the replica .*\\(${(sent.size / 1e6).toFixed(1)} MB, from \\S+ pid ${a.pid}\\)`));
});

test('beside a replica, in-place rounds send only the chunks they change, and every replicated state is one the program committed', natsSkip, async (t) => {
  const { server, reader, backup } = await setUp(t);
  const url = `nats://${server.address}/delta?lease=1`;
  const args = ['--snapshot=restore-v1', '--interval', '5', '--log-level', 'debug', '--replica', url];
  const a = start(NODE, [SHM_RESTORE, ...args, backup('a'), NODE, fixture('incremental-writer.js'), String(CAPACITY)], { detached: true, t });
  // Each state the replica holds while rounds go on in place is checked from its bytes,
  // rebuilt here from the manifest format: it must be exactly a state the program committed.
  let checked = 0;
  let newest = 0;
  let lastSeq = 0;
  while (checked < 8) {
    const committed = await waitFor(async () => {
      if (a.ended() !== undefined) throw new Error('the host ended');
      const m = await reader.manifest('delta');
      return m !== undefined && m.seq !== lastSeq ? m : undefined;
    }, 'a new state in the replica', 120_000).catch((err) => {
      err.message += ` (${checked} checked, last at sequence ${lastSeq}); host log:\n${a.err.lines.slice(-30).join('\n')}`;
      throw err;
    });
    lastSeq = committed.seq;
    const state = await reader.stateAt('delta', committed.seq);
    if (state === undefined) continue; // replaced (and its messages removed) before it was read
    assert.equal(stateDigest(state.bytes), state.manifest.digest, 'the digest covers the bytes');
    const got = checkAllSnapshots(state.bytes, `the replicated state at sequence ${committed.seq}`);
    assert.ok(got.newest >= newest, 'replicated states only move forward');
    newest = got.newest;
    checked++;
  }
  const COMMITTED = /replica \S+: committed \d+ bytes at sequence \d+: (\d+) of (\d+) chunks of (\d+) bytes sent/;
  await waitFor(() => a.err.lines.filter((line) => COMMITTED.test(line)).length >= 40, '40 states replicated', 60_000);
  const sent = a.err.lines.flatMap((line) => {
    const m = COMMITTED.exec(line);
    return m === null ? [] : [{ sent: Number(m[1]), of: Number(m[2]), chunk: Number(m[3]) }];
  });
  assert.ok(a.err.lines.some((line) => /snapshot persisted in place/.test(line)), 'rounds ran in place beside the replica');
  assert.ok(sent.some((c) => c.sent * 8 < c.of), `some states sent less than an eighth of the chunks: ${JSON.stringify(sent.slice(0, 20))}`);
  // Replaced chunks are removed: the stream holds about one state, not every state sent.
  const held = await reader.streamState('delta');
  const file = fs.readFileSync(backup('a'));
  const chunk = sent[0].chunk;
  assert.equal(chunk, chunkSizeOf(file.length), 'the state is cut into chunks of the documented size');
  let live = 0;
  for (let at = 0; at < file.length; at += chunk) if (file.subarray(at, at + chunk).some((b) => b !== 0)) live++;
  const sentBytes = sent.reduce((n, c) => n + c.sent, 0) * chunk;
  assert.ok(sentBytes > 4 * live * chunk, `enough was sent to tell: ${sentBytes} bytes`);
  assert.ok(held.bytes < 2 * live * chunk + 65536, `the stream holds ${held.bytes} bytes for a state of ${live} chunks that are not zeros`);

  // The tree dies; another host, with no local backup, continues from the replica.
  a.kill('SIGKILL');
  await a.exited;
  const last = await reader.manifest('delta');
  const { host: b } = await startWhenLeaseFree(
    () => startHost([...args, backup('b'), NODE, fixture('incremental-writer.js'), String(CAPACITY), '16'], { detached: true, t }),
    a.pid,
  );
  const end = await b.exited;
  assert.equal(end.code, 0, end.stderr);
  assert.match(end.stderr, /starting from the replica /);
  const recovered = Number(/^recovered (\d+)$/m.exec(end.stdout)?.[1]);
  assert.ok(recovered >= newest, `B recovered commit ${recovered}, the replica held ${newest} or later`);
  checkAllSnapshots(fs.readFileSync(backup('b')), "B's backup");
  assert.ok((await reader.manifest('delta')).seq > last.seq, "B's last state reached the replica");
  assert.equal((await reader.manifest('delta')).digest, stateDigest(backup('b')));
});
