/**
 * `--replica`: at start, take the lease, fence off any earlier holder, and make the local
 * backup the newer of itself and the replica's newest committed state; then hand back a
 * {@link Replicator} for the host's durable rounds. `status nats://...`: the replica's
 * newest state, read-only.
 * @module
 */
import fs from 'node:fs';
import type { Log } from '../base/log.js';
import type { Environment } from '../fds/listen-fds.js';
import { BackupFile, recordBackupCheck } from '../restore/backup.js';
import { replayJournal } from '../restore/journal.js';
import { BackupLock } from '../restore/lock.js';
import { syncDirectory } from '../restore/persist.js';
import { formatBytes, formatDuration } from '../restore/progress.js';
import type { RoundGate } from '../restore/snapshotter.js';
import { describeError, isSystemError } from '../system/libc.js';
import { ShmfdError } from '../base/errors.js';
import { heldMessage, Lease } from './lease.js';
import { readChunk, Replicator } from './replicator.js';
import type { NatsConnection } from '@nats-io/transport-node';
import { chunkCount, chunkDigest, setChunk, stateDigest, zeroTable, type ChunkTable } from './chunks.js';
import { connectReplica, isFenced, newWriter, ReplicaStore, type Committed, type Writer } from './store.js';
import { credentialsFromEnv, parseReplicaUrl, type ReplicaUrl } from './url.js';

/** How long a start waits for servers that do not answer (a cluster electing its leaders). */
const START_PATIENCE_MS = 30_000;

/** How long the warning of a start that gets no answer waits for a ping's. */
const PING_PATIENCE_MS = 2_000;

/** Fence markers tried at start before giving up on a stream that keeps moving. */
const FENCE_ATTEMPTS = 5;

/** Where the host's start came from. */
export interface ReplicaStart {
  /** Sends the host's durable backups; start it once the host runs. */
  replicator: Replicator;
  /** `replica` when the local backup was replaced by the replica's newer state. */
  source: 'replica' | 'local' | 'none';
}

/**
 * Prepares `--replica URL` for the backup at `backupPath`. Holds the backup's lock while
 * it may replace the backup, and releases it before returning (the host takes it).
 * @throws ShmfdError `ERR_REPLICA_URL`, `ERR_REPLICA_CREDENTIALS`, `ERR_REPLICA_UNREACHABLE`,
 *   `ERR_REPLICA_HELD`, `ERR_REPLICA_DAMAGED`, `ERR_BACKUP_IN_USE`, `ERR_BACKUP_ACCESS`
 */
export async function startReplica(text: string, backupPath: string, gate: RoundGate, env: Environment, log: Log): Promise<ReplicaStart> {
  const url = parseReplicaUrl(text);
  const nc = await connectReplica(url, credentialsFromEnv(env));
  const writer = newWriter();
  const backup = new BackupFile(backupPath);
  const deadline = Date.now() + START_PATIENCE_MS;
  // What the start was doing when the servers failed it: named in the warning and the error.
  const step = { now: '' };
  for (let warned = false; ; warned = true) {
    try {
      return await prepare(nc, url, writer, backup, gate, log, step);
    } catch (err) {
      // A cluster electing its leaders (a node just died) answers nothing for seconds.
      if (err instanceof ShmfdError || isSystemError(err) || noJetStream(err) || Date.now() > deadline) {
        await nc.close().catch(() => undefined);
        throw asReplicaError(err, url.text, step.now);
      }
      if (!warned) log.warn(`the replica ${url.text} does not answer yet, ${step.now} (${describeError(err)}; ${await pingNote(nc)}): trying again for up to ${START_PATIENCE_MS / 1000} s`);
      await new Promise((resolve) => setTimeout(resolve, 500));
    }
  }
}

async function prepare(nc: NatsConnection, url: ReplicaUrl, writer: Writer, backup: BackupFile, gate: RoundGate, log: Log, step: { now: string }): Promise<ReplicaStart> {
  step.now = 'opening its stream';
  const store = await ReplicaStore.open(nc, url, true);
  step.now = 'opening its lease';
  const lease = (await Lease.open(nc, url, writer, true)) as Lease;
  step.now = 'taking its lease';
  // A refused host touches nothing, not even the lock file.
  await lease.take();
  let source: ReplicaStart['source'];
  let lastSeq: number;
  let fetched: { committed: Committed; table: ChunkTable } | undefined;
  try {
    const lock = BackupLock.acquire(backup);
    try {
      // The local backup is compared, and maybe sent, as the host will restore it: whole.
      await replayJournal(backup, log);
      // From here on, whatever an earlier holder still sends is refused.
      step.now = 'fencing off earlier holders';
      lastSeq = await fence(store, writer);
      step.now = 'reading its newest state';
      const committed = await store.committed();
      const newer = await newerOfTwo(backup, committed, store, url.text, log);
      source = newer.source;
      fetched = newer.fetched;
    } finally {
      lock.release();
    }
  } catch (err) {
    if (err instanceof ShmfdError || isSystemError(err)) await lease.release().catch(() => undefined);
    throw err;
  }
  // The backup holds the replica's state (fetched, or the same): the next states change it.
  if (fetched !== undefined) store.adopt(fetched.committed, fetched.table.seqs);
  const replicator = new Replicator({ nc, store, lease, writer, lastSeq, committed: fetched, gate, name: url.text, log });
  // A local backup newer than the replica is sent first: the replica catches up at once.
  if (source === 'local' && fetched === undefined) replicator.offer({ path: backup.path });
  return { replicator, source };
}

/**
 * Whether the connection itself answers (a protocol ping) while JetStream does not: tells a
 * stalled link from a server whose JetStream is busy or electing, in the warning.
 */
async function pingNote(nc: NatsConnection): Promise<string> {
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<undefined>((resolve) => (timer = setTimeout(() => resolve(undefined), PING_PATIENCE_MS)));
  try {
    const rtt = await Promise.race([nc.rtt(), late]);
    return rtt === undefined ? `the server does not answer a ping within ${PING_PATIENCE_MS / 1000} s either` : `the server answers a ping in ${Math.round(rtt)} ms`;
  } catch (err) {
    return `a ping fails too (${describeError(err)})`;
  } finally {
    clearTimeout(timer);
  }
}

/**
 * Whether the server answered that JetStream is off (no one serves its API, or the account
 * has none): a setting, which waiting does not change. A cluster electing its leaders
 * still serves the API and answers with other errors.
 */
function noJetStream(err: unknown): boolean {
  return err instanceof Error && err.name === 'JetStreamNotEnabled';
}

/** Our own errors as they are; a failed request to the servers as `ERR_REPLICA_UNREACHABLE`. */
function asReplicaError(err: unknown, name: string, step: string): unknown {
  if (err instanceof ShmfdError || isSystemError(err)) return err;
  if (noJetStream(err)) {
    return new ShmfdError('ERR_REPLICA_UNREACHABLE', `cannot use the replica ${name}: its server has no JetStream (start nats-server with -js, or enable JetStream for the account)`, { cause: err });
  }
  return new ShmfdError('ERR_REPLICA_UNREACHABLE', `cannot use the replica ${name}, ${step}: ${describeError(err)}`, { cause: err });
}

async function fence(store: ReplicaStore, writer: Writer): Promise<number> {
  for (let attempt = 1; ; attempt++) {
    try {
      return await store.fence(writer, await store.lastSeq());
    } catch (err) {
      // An earlier holder wrote between our look and our marker: look again.
      if (!isFenced(err) || attempt === FENCE_ATTEMPTS) throw err;
    }
  }
}

async function newerOfTwo(
  backup: BackupFile,
  committed: Committed | undefined,
  store: ReplicaStore,
  name: string,
  log: Log,
): Promise<{ source: ReplicaStart['source']; fetched?: { committed: Committed; table: ChunkTable } }> {
  let local: fs.Stats | undefined;
  try {
    local = fs.statSync(backup.path);
    if (local.size === 0) local = undefined;
  } catch {
    local = undefined;
  }
  const now = Date.now();
  const localText = local === undefined ? 'no local backup' : `the local backup ${backup.path} is ${formatDuration(now - local.mtimeMs)} old`;
  if (committed === undefined) {
    log.info(`the replica ${name} holds no state yet; ${localText}`);
    return { source: local === undefined ? 'none' : 'local' };
  }
  const { manifest } = committed;
  const replicaText = `the replica's newest state is ${formatDuration(Math.max(0, now - manifest.durableAt))} old (${formatBytes(manifest.size)}, from ${manifest.holder})`;
  if (local !== undefined && Math.round(local.mtimeMs) >= manifest.durableAt) {
    // A host that stopped and starts again: the replica holds its state, chunks and all.
    const same = Math.round(local.mtimeMs) === manifest.durableAt && local.size === manifest.size ? await heldAlready(backup, committed, store) : undefined;
    log.info(`starting from the local backup: ${localText}, ${replicaText}${same === undefined ? '' : '; the replica holds the same state'}`);
    return { source: 'local', fetched: same };
  }
  const started = performance.now();
  const fetched = await download(backup, committed, store);
  log.info(
    `starting from the replica ${name}: ${replicaText}, ${localText}; fetched in ${formatDuration(performance.now() - started)}`,
  );
  return { source: 'replica', fetched };
}

/** The local backup as a table of the replica's chunks, when it is the state `committed`: then nothing needs sending. */
async function heldAlready(backup: BackupFile, committed: Committed, store: ReplicaStore): Promise<{ committed: Committed; table: ChunkTable } | undefined> {
  const fd = fs.openSync(backup.path, 'r');
  let table: ChunkTable;
  try {
    const size = fs.fstatSync(fd).size;
    // In the replica's chunks, which an earlier version may have cut otherwise.
    const chunkSize = committed.manifest.chunkSize;
    table = zeroTable(size, chunkSize);
    for (let index = 0; index < chunkCount(size, chunkSize); index++) setChunk(table, index, 0, chunkDigest(readChunk(fd, size, chunkSize, index)));
  } finally {
    fs.closeSync(fd);
  }
  if (stateDigest(table) !== committed.manifest.digest) return undefined;
  table.seqs = await store.chunkSeqs(committed);
  return { committed, table };
}

/** Replaces the backup by the replica's state: temporary file, verified, synced, renamed. */
async function download(backup: BackupFile, committed: Committed, store: ReplicaStore): Promise<{ committed: Committed; table: ChunkTable }> {
  const temp = backup.tempPath();
  const handle = await fs.promises.open(temp, fs.constants.O_RDWR | fs.constants.O_CREAT | fs.constants.O_EXCL, 0o600);
  let renamed = false;
  try {
    const received = await store.receive(committed, handle.fd);
    await recordBackupCheck(handle.fd, received.committed.manifest.size);
    await backup.giveAttributes(handle);
    // Its mtime is when the state became durable on the host that sent it: the next start
    // compares ages, and status reports them, from that.
    const when = new Date(received.committed.manifest.durableAt);
    await handle.utimes(when, when);
    await handle.sync();
    await fs.promises.rename(temp, backup.path);
    renamed = true;
    await syncDirectory(backup.dir);
    return received;
  } finally {
    await handle.close().catch(() => undefined);
    if (!renamed) await fs.promises.unlink(temp).catch(() => undefined);
  }
}

/** The lines of `shm-restore status nats://...`, and whether the replica holds a state. */
export async function replicaStatus(text: string, env: Environment): Promise<{ ok: boolean; lines: string[] }> {
  const url = parseReplicaUrl(text);
  const nc = await connectReplica(url, credentialsFromEnv(env));
  try {
    const lines = [`replica: ${url.text}`];
    const store = await ReplicaStore.open(nc, url, false);
    const committed = await store.committed();
    const lease = await Lease.open(nc, url, newWriter(), false);
    const holder = await lease?.state();
    if (committed === undefined) {
      lines.push('state: none committed yet');
    } else {
      const m = committed.manifest;
      lines.push(
        `state: committed at stream sequence ${committed.seq} by ${m.holder}`,
        `state size: ${m.size} bytes (${formatBytes(m.size)}) in ${m.messages} data message(s) of ${formatBytes(m.chunkSize)}, digest ${m.digest}`,
        `state age: ${formatDuration(Math.max(0, Date.now() - m.durableAt))} (durable since ${new Date(m.durableAt).toISOString()})`,
      );
    }
    lines.push(holder === undefined || lease === undefined ? 'lease: free' : `lease: ${heldMessage(url, holder, lease.ttlMs).replace(/^the replica \S+ is /, '')}`);
    return { ok: committed !== undefined, lines };
  } catch (err) {
    throw asReplicaError(err, url.text, 'reading its state and lease');
  } finally {
    await nc.close().catch(() => undefined);
  }
}
