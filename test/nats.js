// Real NATS JetStream servers for the replica tests: `nats-server -js` processes on free
// loopback ports with their store in a temporary directory, stopped when the test ends,
// and a client to look at what a replica holds.
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { connect } from '@nats-io/transport-node';
import { jetstreamManager } from '@nats-io/jetstream';
import assert from 'node:assert/strict';
import { assertOneErrorLine, freePort, start, tempDir, works } from './helpers.js';

/** The nats-server binary (Debian installs it in /usr/sbin), or undefined. */
export const NATS_SERVER = [...(process.env.PATH ?? '').split(':'), '/usr/sbin', '/usr/local/bin']
  .map((dir) => path.join(dir, 'nats-server'))
  .find((file) => fs.existsSync(file));

/**
 * `setpriv --pdeathsig KILL --`, which execs the server in place, when util-linux has it: a
 * test file that times out is killed by the runner, and the servers it started must not
 * outlive it (they did, holding their ports and stores in /dev/shm).
 */
const DIE_WITH_TEST = works('setpriv', ['--pdeathsig', 'KILL', '--', 'true']) ? ['setpriv', '--pdeathsig', 'KILL', '--'] : [];

/** For `test(..., natsSkip, ...)`: skips, with the reason, where nats-server is missing; a guard against hangs. */
export const natsSkip = { skip: NATS_SERVER === undefined && 'needs nats-server (Debian package nats-server, installed by .ci/run)', timeout: 180_000 };

/**
 * One nats-server with JetStream. `ready` resolves once it accepts clients (and, in a
 * cluster, once it knows the metadata leader); `stop(signal)` ends it, `restart()` starts
 * it again on the same port and store.
 * @param {import('node:test').TestContext} t
 * @param {string} dir its store directory
 * @param {{ port?: number, name?: string, cluster?: { port: number, routes: number[] }, jetstream?: false }} [options]
 */
export async function startNats(t, dir, options = {}) {
  // A port found free may be taken before the server binds it (by another test file's
  // connection): then the server is started on another one.
  for (let attempt = 1; ; attempt++) {
    try {
      return await startNatsOn(t, dir, options.port ?? (await freePort()), options);
    } catch (err) {
      if (options.port !== undefined || attempt === 5 || !/address already in use/.test(String(err))) throw err;
    }
  }
}

/**
 * {@link startNats} on `port`.
 * @param {import('node:test').TestContext} t
 * @param {string} dir
 * @param {number} port
 * @param {{ port?: number, name?: string, cluster?: { port: number, routes: number[] }, jetstream?: false }} options
 */
async function startNatsOn(t, dir, port, options) {
  const args = ['-a', '127.0.0.1', '-p', String(port)];
  if (options.jetstream !== false) args.push('-js', '-sd', storeDir(t, dir));
  if (options.cluster !== undefined) {
    args.push('-n', options.name ?? `n${port}`, '--cluster_name', 'shmfd', '--cluster', `nats://127.0.0.1:${options.cluster.port}`);
    args.push('--routes', options.cluster.routes.map((p) => `nats://127.0.0.1:${p}`).join(','));
  }
  // Set by stop(): a server ended on purpose is not reported.
  let stopping = false;
  const server = {
    port,
    address: `127.0.0.1:${port}`,
    /** @type {ReturnType<typeof start>} */
    process: undefined,
    async restart() {
      const [command, ...rest] = [...DIE_WITH_TEST, /** @type {string} */ (NATS_SERVER), ...args];
      const started = start(command, rest, { t });
      server.process = started;
      stopping = false;
      // A server that ends unasked is what a host that gets no answers would see (a host
      // once lost its connection to a fresh server, on Node 22 and 24): say so, with its
      // log. The helpers end what a test leaves with SIGKILL, which is not reported.
      void started.exited.then(({ code, signal }) => {
        if (!stopping && signal !== 'SIGKILL') process.stderr.write(`nats-server on port ${port} ended unasked (${signal ?? code}):\n${started.err.text}\n`);
      });
      const line = await started.err.waitFor(/Server is ready/);
      if (line === undefined) throw new Error(`nats-server on port ${port} did not start: ${started.err.text}`);
      if (options.cluster !== undefined) await untilMetaLeaderKnown(server, started);
    },
    /** @param {NodeJS.Signals} [signal] */
    async stop(signal = 'SIGKILL') {
      stopping = true;
      server.process.kill(signal);
      await server.process.exited;
    },
  };
  await server.restart();
  return server;
}

/**
 * Where a server keeps its JetStream store: in tmpfs when the machine has room there, so
 * that the file store's fsyncs do not wait behind other tests syncing gigabytes to disk
 * (a server then took more than 30 s to answer); else `dir`. The store outlives the
 * server's process either way, which is what the restart tests need.
 * @param {import('node:test').TestContext} t
 * @param {string} dir
 */
function storeDir(t, dir) {
  let free = 0;
  try {
    const stat = fs.statfsSync('/dev/shm');
    free = stat.bavail * stat.bsize;
  } catch {
    // no /dev/shm
  }
  return free < 2 ** 31 ? dir : tempDir(t, 'shmfd-nats-', '/dev/shm');
}

/**
 * Waits until a clustered server knows its cluster's metadata leader: until then its
 * JetStream API answers with an error, or not at all. Asked, not read from its log: a
 * server that joins after the others elected a leader logs no line about it (nats-server
 * 2.9), and waiting for one hung a test until its timeout.
 * @param {{ port: number, address: string }} server
 * @param {ReturnType<typeof start>} started its process
 */
async function untilMetaLeaderKnown(server, started) {
  const nc = await connect({ servers: server.address, maxReconnectAttempts: -1, reconnectTimeWait: 200 });
  try {
    for (let asked = 1; ; asked++) {
      const answer = await nc.request('$JS.API.INFO', '', { timeout: 2000 }).then((m) => m.json()).catch((err) => ({ error: String(err) }));
      if (answer.error === undefined) return;
      if (started.ended() !== undefined) throw new Error(`nats-server on port ${server.port} ended: ${started.err.text}`);
      // Elections take a few seconds, and longer on a loaded machine: a deadline here would
      // only repeat the test's own.
      if (asked % 30 === 0) process.stderr.write(`nats-server on port ${server.port}: no metadata leader yet (${JSON.stringify(answer.error)})\n`);
      await new Promise((resolve) => setTimeout(resolve, 200));
    }
  } finally {
    await nc.close();
  }
}

/** Three clustered nats-servers on loopback, for streams with three replicas. */
export async function startCluster(t, dir) {
  const ports = [await freePort(), await freePort(), await freePort()];
  const routes = [await freePort(), await freePort(), await freePort()];
  return Promise.all(
    ports.map((port, i) => startNats(t, path.join(dir, `n${i + 1}`), { port, name: `n${i + 1}`, cluster: { port: routes[i], routes } })),
  );
}

/**
 * A client that reads what the replica NAME holds.
 * @param {import('node:test').TestContext} t
 * @param {string[]} servers host:port of the servers
 */
export async function replicaReader(t, servers) {
  const nc = await connect({ servers, maxReconnectAttempts: -1, reconnectTimeWait: 200 });
  t.after(() => nc.close());
  const jsm = await jetstreamManager(nc);
  return {
    /**
     * The newest committed manifest of NAME and its sequence, or undefined.
     * @param {string} name
     */
    async manifest(name) {
      // Not asked before the stream holds a message: nats-server 2.9.10 crashes on a get
      // that arrives while the stream is being created (its store not made yet).
      const info = await jsm.streams.info(`SHMFD_${name}`).catch(() => undefined);
      if (info === undefined || info.state.last_seq === 0) return undefined;
      const stored = await jsm.streams.getMessage(`SHMFD_${name}`, { last_by_subj: `shmfd.${name}.manifest` }).catch(() => null);
      return stored === null ? undefined : { seq: stored.seq, ...stored.json() };
    },
    /**
     * What NAME's stream holds: messages, bytes, first and last sequence.
     * @param {string} name
     */
    async streamState(name) {
      return (await jsm.streams.info(`SHMFD_${name}`)).state;
    },
    /**
     * The bytes of the state whose manifest is at `seq` in NAME, rebuilt here from the
     * manifest format (docs/replica.md): its base's chunk runs, its own on top, each chunk
     * taken from its message. Undefined when a message it names is gone (a newer state
     * replaced it).
     * @param {string} name
     * @param {number} seq
     */
    async stateAt(name, seq) {
      const stream = `SHMFD_${name}`;
      const get = (s) => jsm.streams.getMessage(stream, { seq: s }).catch(() => null);
      const m = await get(seq);
      if (m === null) return undefined;
      const manifest = m.json();
      const seqs = new Array(Math.ceil(manifest.size / manifest.chunkSize)).fill(0);
      const apply = (runs) => {
        for (let r = 0; r < runs.length; r += 3) for (let i = 0; i < runs[r + 2]; i++) seqs[runs[r] + i] = runs[r + 1];
      };
      if (manifest.base !== 0) {
        const base = await get(manifest.base);
        if (base === null) return undefined;
        apply(base.json().chunks);
      }
      apply(manifest.chunks);
      // A message holds consecutive chunks from the offset in its header on.
      const bytes = Buffer.alloc(manifest.size);
      const messages = new Map();
      for (let i = 0; i < seqs.length; i++) {
        if (seqs[i] === 0) continue;
        if (!messages.has(seqs[i])) messages.set(seqs[i], await get(seqs[i]));
        const m = messages.get(seqs[i]);
        if (m === null) return undefined;
        const at = i * manifest.chunkSize - Number(m.header.get('Shmfd-Offset'));
        const length = Math.min(manifest.chunkSize, manifest.size - i * manifest.chunkSize);
        assert.ok(at >= 0 && at + length <= m.data.length, `the message at ${seqs[i]} holds chunk ${i}`);
        bytes.set(m.data.subarray(at, at + length), i * manifest.chunkSize);
      }
      return { manifest, bytes };
    },
    /**
     * Every message NAME's stream still holds from sequence `from` on: subject, sequence, writer id.
     * @param {string} name
     * @param {number} from
     */
    async messagesFrom(name, from) {
      const info = await jsm.streams.info(`SHMFD_${name}`);
      const out = [];
      for (let seq = Math.max(from, info.state.first_seq); seq <= info.state.last_seq; seq++) {
        const m = await jsm.streams.getMessage(`SHMFD_${name}`, { seq }).catch(() => null);
        if (m !== null) out.push({ seq, subject: m.subject, writer: m.header?.get('Shmfd-Holder'), text: m.subject.endsWith('.data') ? '' : m.string() });
      }
      return out;
    },
  };
}

/**
 * The chunk size of a replicated state of `size` bytes, as docs/replica.md gives it: the
 * smallest power of two from 8 KiB that cuts it into at most 16 Ki chunks, at most 64 KiB.
 * @param {number} size
 */
export function chunkSizeOf(size) {
  let chunk = 8192;
  while (chunk < 65536 && Math.ceil(size / chunk) > 16384) chunk *= 2;
  return chunk;
}

/**
 * The digest a replica's manifest gives a state, computed here from a file (or its bytes):
 * SHA-256 over the SHA-256 of each chunk of it in order (the last one shorter).
 * @param {string | Buffer} file
 * @param {number} [chunk] bytes per chunk (by default the documented size for the state's)
 */
export function stateDigest(file, chunk) {
  const bytes = Buffer.isBuffer(file) ? file : fs.readFileSync(file);
  const size = chunk ?? chunkSizeOf(bytes.length);
  const all = crypto.createHash('sha256');
  for (let at = 0; at < bytes.length; at += size) all.update(crypto.createHash('sha256').update(bytes.subarray(at, at + size)).digest());
  return all.digest('hex');
}

/**
 * Starts hosts with `startHost()` until one gets the replica's lease and its program prints
 * its first line; each host refused meanwhile must say, in one line, that `holderPid` holds it.
 * @template {{ next: () => Promise<any>, exited: Promise<{ code: number | null, stderr: string }> }} H
 * @param {() => H} startHost
 * @param {number} holderPid
 * @returns {Promise<{ host: H, first: any }>}
 */
export async function startWhenLeaseFree(startHost, holderPid) {
  for (;;) {
    const host = startHost();
    try {
      return { host, first: await host.next() };
    } catch {
      const end = await host.exited;
      assert.equal(end.code, 125, end.stderr);
      assertOneErrorLine(end.stderr, new RegExp(`is held by \\S+ pid ${holderPid} \\(lease renewed`), 'shm-restore');
    }
  }
}
