// The replicator against the host's rounds, driven step by step: a state read from a whole
// file while a round changes that file in place is committed only once no round runs, and
// then holds that round's chunks; a round in place afterwards sends only its chunk, as a
// delta of the first state. And a backup left torn by an interrupted round is sent only
// once its journal is applied. Real nats-server, real files, the real replicator (dist/).
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { StderrLog } from '../dist/base/log.js';
import { chunkDigest, setChunk, zeroTable } from '../dist/replica/chunks.js';
import { startReplica } from '../dist/replica/start.js';
import { connectReplica, newWriter, ReplicaStore } from '../dist/replica/store.js';
import { parseReplicaUrl } from '../dist/replica/url.js';
import { RoundGate } from '../dist/restore/snapshotter.js';
import { fixture, killWithCompleteJournal, NODE, SHM_RESTORE, start, tempDir, waitFor, writeInPlace } from './helpers.js';
import { natsSkip, replicaReader, stateDigest, startNats } from './nats.js';
import { CAPACITY, checkAllSnapshots } from './state-check.js';

// The chunk size of a state of 4 MiB (docs/replica.md).
const CHUNK = 8 * 1024;

test('a state read while a round changes the file in place is committed after that round, with its chunks; the next round sends one chunk', natsSkip, async (t) => {
  const dir = tempDir(t, 'shmfd-replica-rounds-');
  const server = await startNats(t, path.join(dir, 'js'));
  const reader = await replicaReader(t, [server.address]);
  const backup = path.join(dir, 'state');
  const bytes = Buffer.alloc(4 << 20);
  for (let i = 0; i < bytes.length; i += 4096) bytes.writeUInt32LE(i, i);
  fs.writeFileSync(backup, bytes);

  const gate = new RoundGate();
  // A round is running when the replicator starts: it may read the file, not commit it.
  gate.enter();
  const { replicator, source } = await startReplica(`nats://${server.address}/rounds`, backup, gate, process.env, new StderrLog('test', 'error'));
  t.after(() => {
    gate.leave();
    return replicator.stop(0);
  });
  assert.equal(source, 'local');
  replicator.start();
  // Every chunk read and sent: the replicator now waits for the round's end.
  await waitFor(async () => (await reader.streamState('rounds').catch(() => undefined))?.bytes >= bytes.length, 'every chunk read and sent', 120_000);
  // The round changes chunks 3 and 40 in place and reports them, then ends.
  writeInPlace(backup, 3 * CHUNK + 100, Buffer.from('round one'));
  writeInPlace(backup, 40 * CHUNK, Buffer.alloc(CHUNK, 7));
  replicator.offer({ path: backup, changed: [[3 * CHUNK + 100, 9], [40 * CHUNK, CHUNK]] });
  assert.equal(await reader.manifest('rounds'), undefined, 'nothing is committed while the round runs');
  gate.leave();

  const first = await waitFor(() => reader.manifest('rounds'), 'the first state', 120_000);
  const state = await reader.stateAt('rounds', first.seq);
  assert.ok(state.bytes.equals(fs.readFileSync(backup)), "the replica holds the round's state, its changed chunks included");
  assert.equal(first.digest, stateDigest(backup));
  assert.equal(first.base, 0, 'the first state is a base');
  assert.equal(first.chunkSize, CHUNK);

  // The next round changes one chunk in place: only it is sent, as a delta of the first state.
  gate.enter();
  writeInPlace(backup, 17 * CHUNK + 5, Buffer.from('round two'));
  replicator.offer({ path: backup, changed: [[17 * CHUNK + 5, 9]] });
  gate.leave();
  const second = await waitFor(async () => {
    const m = await reader.manifest('rounds');
    return m.seq !== first.seq ? m : undefined;
  }, 'the second state');
  assert.equal(second.base, first.seq);
  assert.deepEqual(second.chunks, [17, second.seq - 1, 1], 'the delta names the one chunk it sent, just before it');
  assert.ok((await reader.stateAt('rounds', second.seq)).bytes.equals(fs.readFileSync(backup)));
});

test('a replica started beside a backup with an interrupted round in its journal sends the backup with that round applied', natsSkip, async (t) => {
  const dir = tempDir(t, 'shmfd-replica-rounds-');
  const backup = path.join(dir, 'state');
  // Rounds in place, then the tree killed: the journal of the last round stays beside the backup.
  const writer = start(NODE, [SHM_RESTORE, '--snapshot=restore-v1', '--interval', '5', '--log-level', 'debug', backup, NODE, fixture('incremental-writer.js'), String(CAPACITY)], { detached: true, t });
  const round = await killWithCompleteJournal(writer, path.join(dir, '.state.journal'), /snapshot persisted in place/);
  const expected = fs.readFileSync(backup);
  for (const run of round.runs) run.data.copy(expected, run.offset);
  // As if the host had died in the middle of the round's in-place writes.
  const torn = fs.openSync(backup, 'r+');
  for (const run of round.runs) fs.writeSync(torn, Buffer.alloc(run.data.length, 0xee), 0, run.data.length, run.offset);
  fs.closeSync(torn);

  const server = await startNats(t, path.join(dir, 'js'));
  const reader = await replicaReader(t, [server.address]);
  // The replica's start, as shm-restore --replica runs it before the host: it decides which
  // state is newer and offers the local backup.
  const lines = [];
  const log = { error: (m) => lines.push(m), warn: (m) => lines.push(m), info: (m) => lines.push(m), debug: () => {} };
  const { replicator, source } = await startReplica(`nats://${server.address}/journal`, backup, new RoundGate(), process.env, log);
  t.after(() => replicator.stop(0));
  assert.equal(source, 'local');
  assert.match(lines.join('\n'), new RegExp(`applied the journal of round ${round.sequence}`));
  replicator.start();
  const committed = await waitFor(() => reader.manifest('journal'), 'the first replicated state', 120_000);
  assert.ok((await reader.stateAt('journal', committed.seq)).bytes.equals(expected), 'the replica holds the backup with the round applied, never the torn one');
  checkAllSnapshots(expected, 'the backup with its journal applied');
});

test('a replica cut into chunks of another size (an earlier version) is read, and a round in place then sends the whole state in its own chunks', natsSkip, async (t) => {
  const dir = tempDir(t, 'shmfd-replica-rounds-');
  const server = await startNats(t, path.join(dir, 'js'));
  const reader = await replicaReader(t, [server.address]);
  const url = `nats://${server.address}/older`;
  const backup = path.join(dir, 'state');
  const bytes = Buffer.alloc(4 << 20);
  for (let i = 0; i < bytes.length / 2; i += 4096) bytes.writeUInt32LE(i + 1, i);
  fs.writeFileSync(backup, bytes);
  const durableAt = Math.round(fs.statSync(backup).mtimeMs);

  // The state as an earlier version sent it: 64 KiB chunks, one message each, through the
  // store itself, so that the messages are what a host writes.
  const OLD_CHUNK = 64 * 1024;
  const nc = await connectReplica(parseReplicaUrl(url), {});
  const store = await ReplicaStore.open(nc, parseReplicaUrl(url), true);
  const sender = store.sendState(newWriter(), 0);
  const table = zeroTable(bytes.length, OLD_CHUNK);
  for (let i = 0; i < bytes.length / OLD_CHUNK; i++) {
    const chunk = bytes.subarray(i * OLD_CHUNK, (i + 1) * OLD_CHUNK);
    setChunk(table, i, chunk.some((b) => b !== 0) ? await sender.publish(i * OLD_CHUNK, chunk) : 0, chunkDigest(chunk));
  }
  const old = await sender.commit(table, durableAt);
  await nc.close();
  assert.equal(old.manifest.chunkSize, OLD_CHUNK);
  assert.equal(old.manifest.digest, stateDigest(bytes, OLD_CHUNK));

  // A new host reads it.
  const elsewhere = path.join(dir, 'elsewhere');
  fs.mkdirSync(elsewhere);
  const quiet = new StderrLog('test', 'error');
  const fresh = await startReplica(url, path.join(elsewhere, 'state'), new RoundGate(), process.env, quiet);
  assert.equal(fresh.source, 'replica');
  assert.ok(fs.readFileSync(path.join(elsewhere, 'state')).equals(bytes), 'the state written with other chunks is restored exactly');
  await fresh.replicator.stop(0);

  // The host of the backup: it holds the replica's state, so it sends nothing at start; its
  // first round in place changes one page, and the replica then gets the whole state in the
  // chunks of its own size: not that page alone over a table of zeros.
  const gate = new RoundGate();
  const { replicator, source } = await startReplica(url, backup, gate, process.env, quiet);
  t.after(() => replicator.stop(0));
  assert.equal(source, 'local');
  replicator.start();
  gate.enter();
  writeInPlace(backup, 100 * 4096 + 8, Buffer.from('changed in place'));
  replicator.offer({ path: backup, changed: [[100 * 4096 + 8, 16]] });
  gate.leave();
  const next = await waitFor(async () => {
    const m = await reader.manifest('older');
    return m !== undefined && m.seq > old.seq ? m : undefined;
  }, 'the state of the round', 120_000);
  assert.equal(next.chunkSize, CHUNK);
  assert.equal(next.base, 0, 'chunks of another size make a new base');
  const state = await reader.stateAt('older', next.seq);
  assert.ok(state.bytes.equals(fs.readFileSync(backup)), 'the replica holds the whole state of the round');
  assert.equal(next.digest, stateDigest(backup, CHUNK));
});

test('a host reading the replica while another creates its stream does not bring nats-server down', natsSkip, async (t) => {
  // nats-server 2.9.10 (Debian 12's) lists a new stream before it has a store, and crashes on
  // a message get that arrives in between: a host reading its replica while another host
  // creates it, as happened here. Each stream is read without pause while it is created.
  const dir = tempDir(t, 'shmfd-replica-rounds-');
  const server = await startNats(t, path.join(dir, 'js'));
  const creator = await connectReplica(parseReplicaUrl(`nats://${server.address}/x`), {});
  const reader = await connectReplica(parseReplicaUrl(`nats://${server.address}/x`), {});
  t.after(() => Promise.all([creator.close(), reader.close()]));
  let reads = 0;
  for (let i = 0; i < 40; i++) {
    const url = parseReplicaUrl(`nats://${server.address}/race${i}`);
    let created = false;
    // Settled either way: a creation that fails must end the reads, then fail the test.
    const creating = ReplicaStore.open(creator, url, true).finally(() => {
      created = true;
    });
    const store = await ReplicaStore.open(reader, url, false);
    while (!created) {
      assert.equal(await store.committed(), undefined, 'a stream being created holds no state');
      reads++;
    }
    await creating;
  }
  assert.equal(server.process.ended(), undefined, 'the server still runs');
  t.diagnostic(`${reads} reads while 40 streams were created`);
});
