// Issue 11: the replica never blocks the host and loses nothing when JetStream fails. A
// server SIGKILLed while a host replicates: local backups go on, one warning, and once the
// server is back the replica catches up. A three-node cluster with three replicas: a node
// SIGKILLed during replication, the replica goes on. In both, the host's last state is in
// the replica, and a host in another directory starts from it.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { COUNTER, NODE, readCounterBackup, startHost, tempDir, waitFor } from './helpers.js';
import { natsSkip, replicaReader, stateDigest, startCluster, startNats, startWhenLeaseFree } from './nats.js';

function host(t, url, backup, counterArgs) {
  return startHost(['--snapshot=restore-v1', '--interval', '20', '--log-level', 'info', '--replica', url, backup, NODE, COUNTER, '--every', '2', ...counterArgs], {
    detached: true,
    t,
  });
}

function backupIn(dir, name) {
  fs.mkdirSync(path.join(dir, name), { recursive: true });
  return path.join(dir, name, 'state');
}

/** Stops the host, checks that its last state reached the replica, and starts from it in another directory. */
async function lastStateSurvives(t, a, url, reader, name, dir) {
  a.kill('SIGTERM');
  const end = await a.exited;
  assert.equal(end.signal ?? end.code, 143, end.stderr);
  const final = readCounterBackup(backupIn(dir, 'a')).counter;
  await waitFor(async () => (await reader.manifest(name).catch(() => undefined))?.digest === stateDigest(backupIn(dir, 'a')), 'the last state in the replica');
  const { host: b, first } = await startWhenLeaseFree(() => host(t, url, backupIn(dir, 'b'), ['--commits', '1', '--exit']), a.pid);
  assert.equal(first.recovered, final, 'the new host starts from the last state');
  const bEnd = await b.exited;
  assert.equal(bEnd.code, 0, bEnd.stderr);
  return end.stderr;
}

test('a server killed and restarted while a host replicates: local backups go on and the replica catches up', natsSkip, async (t) => {
  const dir = tempDir(t, 'shmfd-replica-');
  const server = await startNats(t, path.join(dir, 'js'));
  const reader = await replicaReader(t, [server.address]);
  const url = `nats://${server.address}/outage?lease=1`;
  const a = host(t, url, backupIn(dir, 'a'), []);
  await a.next();
  await waitFor(() => reader.manifest('outage'), 'a first replicated state');

  await server.stop('SIGKILL');
  await a.err.waitFor(/warning: cannot send the backup to the replica \S+: .*; local backups go on, and the replica catches up once it can/);
  const during = readCounterBackup(backupIn(dir, 'a')).counter;
  await waitFor(() => readCounterBackup(backupIn(dir, 'a')).counter > during, 'local backups to go on without the server');

  await server.restart();
  await a.err.waitFor(/the replica \S+ is reachable again: caught up with the newest backup/);
  const stderr = await lastStateSurvives(t, a, url, reader, 'outage', dir);
  assert.equal(stderr.match(/cannot send the backup/g)?.length, 1, `one warning for the outage:\n${stderr}`);
  assert.doesNotMatch(stderr, /lost the lease/);
});

// A cluster's elections can take long on a loaded machine: each step below has its own
// deadline, and the test the file's. Should it still time out, the step it was in and the
// host's log are printed (it did once, on Node 24 within the whole suite, and not since).
test('a three-node cluster with three replicas loses a node during replication, and nothing is lost', { ...natsSkip, timeout: 600_000 }, async (t) => {
  let step = 'starting the cluster';
  /** @type {ReturnType<typeof host> | undefined} */
  let a;
  // The signal also fires when the test has ended well: only a test cut short prints.
  t.signal.addEventListener('abort', () => step !== 'done' && process.stderr.write(`three-node cluster test stopped while ${step}; host log:\n${a?.stderr ?? '(not started)'}\n`));
  const dir = tempDir(t, 'shmfd-replica-');
  const nodes = await startCluster(t, dir);
  step = 'connecting the reader';
  const reader = await replicaReader(t, [nodes[1].address, nodes[2].address]);
  const url = `nats://${nodes.map((n) => n.address).join(',')}/cluster?replicas=3&lease=2`;
  step = "waiting for the host's program";
  a = host(t, url, backupIn(dir, 'a'), []);
  await a.next();
  step = 'waiting for a first replicated state';
  const before = await waitFor(() => reader.manifest('cluster').catch(() => undefined), 'a first replicated state');

  await nodes[0].stop('SIGKILL');
  step = 'waiting for a state committed after the node died';
  await waitFor(async () => ((await reader.manifest('cluster').catch(() => undefined))?.seq ?? 0) > before.seq, 'a state committed after the node died', 60_000);
  step = 'stopping the host and starting another from the replica';
  const stderr = await lastStateSurvives(t, a, url, reader, 'cluster', dir);
  assert.doesNotMatch(stderr, /lost the lease/);
  step = 'done';
});
