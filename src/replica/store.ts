/**
 * The replica in JetStream: one stream per NAME (`SHMFD_NAME`, subjects `shmfd.NAME.>`)
 * holding the backup's chunks (of a size that grows with the state's, see ./chunks.ts; a
 * data message holds up to {@link MESSAGE_BYTES} of consecutive ones), a manifest per state
 * naming the message of each chunk, and fence markers.
 *
 * A state is committed when its manifest is stored: readers take the newest manifest and
 * the data messages it names, so a state whose manifest never arrived is invisible, never
 * torn. A new state sends only the chunks that changed and names the others where earlier
 * states left them; its manifest lists the chunks that differ from a base manifest (one
 * that lists every chunk), so a reader needs at most two manifests. Every publish carries
 * `Nats-Expected-Last-Sequence`, the stream sequence of the writer's previous message: the
 * stream refuses it once anything else was written, so a host that a new holder fenced off
 * (by a marker on `fence`) cannot write again.
 * @module
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import { connect, credsAuthenticator, headers, tokenAuthenticator, usernamePasswordAuthenticator, type NatsConnection } from '@nats-io/transport-node';
import {
  JetStreamApiError,
  jetstream,
  jetstreamManager,
  StorageType,
  type JetStreamClient,
  type JetStreamManager,
  type PubAck,
  type StoredMsg,
} from '@nats-io/jetstream';
import { ShmfdError } from '../base/errors.js';
import { besideRounds } from '../restore/snapshotter.js';
import { applyRuns, chunkCount, chunkDigest, chunkLength, encodeRuns, MESSAGE_BYTES, readableChunkSize, setChunk, stateDigest, zeroTable, type ChunkTable } from './chunks.js';
import type { ReplicaCredentials, ReplicaUrl } from './url.js';

/** The manifest format this code writes and reads. */
export const MANIFEST_FORMAT = 'shmfd-replica-1';

/** A committed state of the replica. */
export interface Manifest {
  format: typeof MANIFEST_FORMAT;
  /** Size of the backup in bytes. */
  size: number;
  /** Bytes per chunk. */
  chunkSize: number;
  /** SHA-256 over the SHA-256 of each chunk in order (holes as zeros), hex: {@link stateDigest}. */
  digest: string;
  /** 0 when `chunks` lists every chunk; else the sequence of the base manifest whose chunks it changes. */
  base: number;
  /** Chunk messages as runs (see {@link encodeRuns}): every chunk of a base; the changed ones of a delta. */
  chunks: number[];
  /** Data messages the state names. */
  messages: number;
  /** When the backup sent was made durable (its mtime on the sending host), ms since the epoch. */
  durableAt: number;
  /** The host that committed it, `HOSTNAME pid PID`. */
  holder: string;
}

/** The newest manifest and its stream sequence. */
export interface Committed {
  manifest: Manifest;
  seq: number;
}

/** Who writes: the id in every message's `Shmfd-Holder` header and its description. */
export interface Writer {
  id: string;
  description: string;
}

/** JetStream's code for a publish whose expected last sequence did not hold. */
const WRONG_LAST_SEQUENCE = 10071;
const STREAM_NOT_FOUND = 10059;
/** Data messages in flight at once while a state is sent or read. */
const WINDOW = 32;
/** A base manifest is written again once a delta would list more than this part of the chunks. */
const DELTA_SHARE = 1 / 8;
const REQUEST_TIMEOUT_MS = 10_000;
const HOLDER_HEADER = 'Shmfd-Holder';
const OFFSET_HEADER = 'Shmfd-Offset';

/** True for a publish refused because something else was written first. */
export function isFenced(err: unknown): boolean {
  return err instanceof JetStreamApiError && err.code === WRONG_LAST_SEQUENCE;
}

/** True for JetStream's answer that a stream (or a bucket's) does not exist. */
export function isStreamNotFound(err: unknown): boolean {
  return err instanceof JetStreamApiError && err.code === STREAM_NOT_FOUND;
}

/** A new writer identity for this process. */
export function newWriter(): Writer {
  return { id: crypto.randomBytes(9).toString('base64url'), description: `${os.hostname()} pid ${process.pid}` };
}

/**
 * Connects to the servers of `url`.
 * @throws ShmfdError `ERR_REPLICA_UNREACHABLE`
 */
export async function connectReplica(url: ReplicaUrl, credentials: ReplicaCredentials): Promise<NatsConnection> {
  const { creds, token, user, password, caFile, certFile, keyFile } = credentials;
  const authenticator =
    creds !== undefined
      ? credsAuthenticator(creds)
      : token !== undefined
        ? tokenAuthenticator(token)
        : user !== undefined && password !== undefined
          ? usernamePasswordAuthenticator(user, password)
          : undefined;
  const wantsTls = url.tls || caFile !== undefined || certFile !== undefined;
  try {
    return await connect({
      servers: url.servers,
      authenticator,
      tls: wantsTls ? { caFile, certFile, keyFile } : undefined,
      name: `shm-restore ${url.name}`,
      timeout: REQUEST_TIMEOUT_MS,
      // Never give up: the host outlives outages, and the client reconnects by itself.
      maxReconnectAttempts: -1,
      reconnectTimeWait: 500,
    });
  } catch (err) {
    throw new ShmfdError('ERR_REPLICA_UNREACHABLE', `cannot connect to the replica ${url.text}: ${(err as Error).message}`, { cause: err });
  }
}

/** The replica's stream, read and written through one connection. */
export class ReplicaStore {
  readonly stream: string;
  readonly #subjects: { all: string; data: string; manifest: string; fence: string };
  readonly #js: JetStreamClient;
  readonly #jsm: JetStreamManager;
  readonly #nc: NatsConnection;
  readonly #url: ReplicaUrl;
  /** The base manifest this writer's deltas change. */
  #base: { seq: number; seqs: Float64Array; chunkSize: number } | undefined;
  #baseFragmented = false;
  /** Everything before this sequence was purged by this writer. */
  #purgedBelow = 0;
  /** The base manifest of the last state retired: removed once a newer base replaces it. */
  #retiredBase: number | undefined;
  /** The stream was seen with its store: created by this writer, or holding a message. */
  #storeSeen = false;

  private constructor(nc: NatsConnection, jsm: JetStreamManager, url: ReplicaUrl) {
    this.#jsm = jsm;
    this.#nc = nc;
    this.#js = jetstream(nc, { timeout: REQUEST_TIMEOUT_MS });
    this.#url = url;
    this.stream = `SHMFD_${url.name}`;
    const base = `shmfd.${url.name}`;
    this.#subjects = { all: `${base}.>`, data: `${base}.data`, manifest: `${base}.manifest`, fence: `${base}.fence` };
  }

  /** Opens the stream of `url` over `nc`; `create` makes it when it does not exist yet. */
  static async open(nc: NatsConnection, url: ReplicaUrl, create: boolean): Promise<ReplicaStore> {
    const jsm = await jetstreamManager(nc, { timeout: REQUEST_TIMEOUT_MS });
    const store = new ReplicaStore(nc, jsm, url);
    if (create && (await store.#info()) === undefined) {
      await jsm.streams.add({
        name: store.stream,
        subjects: [store.#subjects.all],
        storage: StorageType.File,
        num_replicas: url.replicas,
        allow_direct: true,
      });
      store.#storeSeen = true;
    }
    return store;
  }

  async #info() {
    try {
      return await this.#jsm.streams.info(this.stream);
    } catch (err) {
      if (isStreamNotFound(err)) return undefined;
      throw err;
    }
  }

  /** Sequence of the stream's last message (0 for none). */
  async lastSeq(): Promise<number> {
    return (await this.#info())?.state.last_seq ?? 0;
  }

  /** The newest committed state, or undefined when there is none (or no stream). */
  async committed(): Promise<Committed | undefined> {
    let stored;
    try {
      stored = await this.#get({ last_by_subj: this.#subjects.manifest });
    } catch (err) {
      if (isStreamNotFound(err) || (err instanceof JetStreamApiError && err.status === 404)) return undefined;
      throw err;
    }
    if (stored === null) return undefined;
    return { manifest: parseManifest(stored.string(), this.#url), seq: stored.seq };
  }

  /**
   * Who wrote the message at `seq`: its writer id, and the writer's description, which
   * fence markers and manifests carry (a data chunk's, by its writer's last one of those).
   */
  async writerAt(seq: number): Promise<{ id: string; description?: string } | undefined> {
    const stored = await this.#get({ seq }).catch(() => null);
    const id = stored?.header?.get(HOLDER_HEADER);
    if (stored === null || stored === undefined || !id) return undefined;
    const described = stored.subject === this.#subjects.data ? await this.#lastDescribing(id) : stored;
    if (described === undefined) return { id };
    try {
      const { holder } = described.json<{ holder?: unknown }>();
      return typeof holder === 'string' ? { id, description: holder } : { id };
    } catch {
      return { id };
    }
  }

  /** The newest manifest or fence marker of writer `id` (one of the two survives the trimming). */
  async #lastDescribing(id: string): Promise<StoredMsg | undefined> {
    for (const subject of [this.#subjects.manifest, this.#subjects.fence]) {
      const stored = await this.#get({ last_by_subj: subject }).catch(() => null);
      if (stored !== null && stored.header?.get(HOLDER_HEADER) === id) return stored;
    }
    return undefined;
  }

  #publish(subject: string, payload: Uint8Array | string, writer: Writer, after: number, offset?: number): Promise<PubAck> {
    const h = headers();
    h.set(HOLDER_HEADER, writer.id);
    if (offset !== undefined) h.set(OFFSET_HEADER, String(offset));
    return this.#js.publish(subject, payload, { headers: h, expect: { lastSequence: after }, timeout: REQUEST_TIMEOUT_MS });
  }

  /**
   * Writes a fence marker after sequence `after`: once it is stored, every write of an
   * earlier holder is refused.
   * @returns its sequence
   * @throws the publish's error; {@link isFenced} when something else was written after `after`
   */
  async fence(writer: Writer, after: number): Promise<number> {
    const ack = await this.#publish(this.#subjects.fence, JSON.stringify({ holder: writer.description, at: Date.now() }), writer, after);
    return ack.seq;
  }

  /** Starts a new state after sequence `after`: its changed chunks, then its manifest. */
  sendState(writer: Writer, after: number): StateSender {
    return new StateSender(this, writer, after);
  }

  /** Consecutive chunks of `chunkSize` bytes one data message may hold: {@link MESSAGE_BYTES} of them, fewer if the server's max_payload is smaller. */
  chunksPerMessage(chunkSize: number): number {
    return Math.max(1, Math.floor(Math.min(MESSAGE_BYTES, (this.#nc.info?.max_payload ?? 1024 * 1024) - 4096) / chunkSize));
  }

  /** @internal Publishes consecutive chunks from byte `offset` of the state on (`bytes`) after sequence `after`. */
  publishChunks(writer: Writer, after: number, offset: number, bytes: Uint8Array): Promise<PubAck> {
    // Published while local rounds await their I/O: not their cost. (The client copies the
    // message into its buffer here; the socket write follows in a microtask.)
    return besideRounds(() => this.#publish(this.#subjects.data, bytes, writer, after, offset));
  }

  /**
   * @internal Publishes the manifest of `table` after sequence `after`: a delta of the
   * current base when few chunks differ from it, else a new base.
   */
  async publishManifest(writer: Writer, after: number, table: ChunkTable, durableAt: number): Promise<Committed> {
    const { manifest, base } = besideRounds(() => this.#manifestOf(writer, table, durableAt));
    const text = JSON.stringify(manifest);
    const room = (this.#nc.info?.max_payload ?? 1024 * 1024) - 4096;
    // A base whose chunks lie scattered over many states lists a run per chunk.
    if (text.length > room) throw new ManifestTooLarge(`a manifest of ${text.length} bytes does not fit the server's max_payload; the next state sends every chunk`);
    const ack = await besideRounds(() => this.#publish(this.#subjects.manifest, text, writer, after));
    if (base === 0) {
      this.#base = { seq: ack.seq, seqs: table.seqs.slice(), chunkSize: table.chunkSize };
      this.#baseFragmented = text.length > room / 2;
    }
    return { manifest, seq: ack.seq };
  }

  #manifestOf(writer: Writer, table: ChunkTable, durableAt: number): { manifest: Manifest; base: number } {
    const n = chunkCount(table.size, table.chunkSize);
    let base = 0;
    let chunks: number[] | undefined;
    // A delta names chunks by index: only of a base cut into the same chunks.
    if (this.#base !== undefined && this.#base.chunkSize === table.chunkSize) {
      const from = this.#base.seqs;
      let differing = Math.max(0, n - from.length);
      for (let i = 0; i < Math.min(n, from.length); i++) if (table.seqs[i] !== from[i]) differing++;
      if (differing <= Math.max(64, n * DELTA_SHARE)) {
        base = this.#base.seq;
        chunks = encodeRuns(table.seqs, from);
      }
    }
    chunks ??= encodeRuns(table.seqs);
    let messages = 0;
    for (let i = 0; i < n; i++) if (table.seqs[i] !== 0) messages++;
    const manifest: Manifest = {
      format: MANIFEST_FORMAT,
      size: table.size,
      chunkSize: table.chunkSize,
      digest: stateDigest(table),
      base,
      chunks,
      messages,
      durableAt,
      holder: writer.description,
    };
    return { manifest, base };
  }

  /** Whether the base manifest lists so many runs that the next state should send every chunk again (then a base is one run). */
  get baseFragmented(): boolean {
    return this.#baseFragmented;
  }

  /** Bytes the stream holds (every state's messages not yet removed). */
  async storedBytes(): Promise<number> {
    return (await this.#info())?.state.bytes ?? 0;
  }

  /**
   * Removes what the state `committed` (whose chunks are at `seqs`) no longer needs: the
   * messages of chunks it replaced (`previous`: the state before it), the manifest before
   * it, `garbage` (messages of states never committed), and everything older than its
   * oldest message. Safe for a host that was fenced off meanwhile: a later holder's state
   * never names a message that this state replaced.
   */
  async retire(committed: Committed, seqs: Float64Array, previous: { seqs: Float64Array; manifestSeq: number } | undefined, garbage: number[]): Promise<void> {
    const keepBase = committed.manifest.base === 0 ? committed.seq : committed.manifest.base;
    let oldest = Math.min(keepBase, committed.seq);
    for (const seq of seqs) if (seq !== 0 && seq < oldest) oldest = seq;
    const doomed = garbage.filter((seq) => seq >= oldest);
    if (previous !== undefined) {
      // A message holds up to MESSAGE_BYTES of consecutive chunks: it goes once none of the
      // chunks around one it held names it any more (looked at where a chunk changed only).
      // After a change of chunk size every chunk was sent again: nothing old is named.
      const span = Math.max(1, MESSAGE_BYTES / committed.manifest.chunkSize) - 1;
      for (let i = 0; i < previous.seqs.length; i++) {
        const seq = previous.seqs[i]!;
        if (seq < oldest || seq === seqs[i] || doomed.includes(seq)) continue;
        let named = false;
        for (let j = Math.max(0, i - span); j <= Math.min(seqs.length - 1, i + span) && !named; j++) named = seqs[j] === seq;
        if (!named) doomed.push(seq);
      }
      if (previous.manifestSeq >= oldest && previous.manifestSeq !== keepBase && previous.manifestSeq !== committed.seq) doomed.push(previous.manifestSeq);
    }
    if (this.#retiredBase !== undefined && this.#retiredBase !== keepBase && this.#retiredBase >= oldest) doomed.push(this.#retiredBase);
    this.#retiredBase = keepBase;
    for (let i = 0; i < doomed.length; i += WINDOW) {
      await Promise.all(doomed.slice(i, i + WINDOW).map((seq) => this.#jsm.streams.deleteMessage(this.stream, seq, false).catch(() => false)));
    }
    // Most deltas keep the oldest message (a chunk unchanged since the base): nothing to purge.
    if (oldest > this.#purgedBelow) {
      await this.#jsm.streams.purge(this.stream, { filter: this.#subjects.all, seq: oldest });
      this.#purgedBelow = oldest;
    }
  }

  /**
   * Makes the state `committed` (whose chunks are at `seqs`) the base that the next
   * manifests change: a host starting from the replica continues its manifests.
   */
  adopt(committed: Committed, seqs: Float64Array): void {
    // A delta's base is not at hand: the next manifest is a new base (it costs no data).
    this.#base = committed.manifest.base === 0 ? { seq: committed.seq, seqs: seqs.slice(), chunkSize: committed.manifest.chunkSize } : undefined;
    this.#retiredBase = committed.manifest.base === 0 ? committed.seq : committed.manifest.base;
  }

  /**
   * Where each chunk of the state `committed` is: its manifest applied to its base's.
   * @throws ShmfdError `ERR_REPLICA_DAMAGED` for a manifest that does not fit its base
   */
  async chunkSeqs(committed: Committed): Promise<Float64Array> {
    const { manifest } = committed;
    const seqs = new Float64Array(chunkCount(manifest.size, manifest.chunkSize));
    if (manifest.base !== 0) {
      const base = await this.#get({ seq: manifest.base }).catch(() => null);
      if (base === null || base.subject !== this.#subjects.manifest) throw new MissingMessage(committed, `misses its base manifest at sequence ${manifest.base}`);
      const parsed = parseManifest(base.string(), this.#url);
      const own = new Float64Array(chunkCount(parsed.size, parsed.chunkSize));
      if (parsed.base !== 0 || parsed.chunkSize !== manifest.chunkSize || !applyRuns(own, parsed.chunks)) throw this.#damaged(committed, 'names a base manifest that is not one');
      seqs.set(own.subarray(0, seqs.length));
    }
    if (!applyRuns(seqs, manifest.chunks)) throw this.#damaged(committed, 'lists chunks beyond its size');
    return seqs;
  }

  #damaged(committed: Committed, problem: string): ShmfdError {
    return new ShmfdError('ERR_REPLICA_DAMAGED', `the replica ${this.#url.text} is damaged: the state committed at sequence ${committed.seq} ${problem}`);
  }

  /**
   * Writes the state `committed` names into `fd` (which must be empty) and checks its
   * digest. A message removed meanwhile by a newer state's holder makes it read the newest
   * state instead.
   * @returns the state it wrote, as a table of its chunks
   * @throws ShmfdError `ERR_REPLICA_DAMAGED` when messages are missing or the digest differs
   */
  async receive(committed: Committed, fd: number): Promise<{ committed: Committed; table: ChunkTable }> {
    for (let attempt = 1; ; attempt++) {
      try {
        return { committed, table: await this.#receiveOnce(committed, fd) };
      } catch (err) {
        if (!(err instanceof MissingMessage)) throw err;
        const newest = await this.committed();
        if (attempt === 3 || newest === undefined || newest.seq === committed.seq) throw this.#damaged(err.committed, err.problem);
        committed = newest;
      }
    }
  }

  async #receiveOnce(committed: Committed, fd: number): Promise<ChunkTable> {
    const { manifest } = committed;
    const seqs = await this.chunkSeqs(committed);
    fs.ftruncateSync(fd, 0);
    fs.ftruncateSync(fd, manifest.size);
    const chunkSize = manifest.chunkSize;
    const table = zeroTable(manifest.size, chunkSize);
    // Each message once, with the chunks the state takes from it.
    const byMessage = new Map<number, number[]>();
    for (let i = 0; i < seqs.length; i++) {
      if (seqs[i] === 0) continue;
      const chunks = byMessage.get(seqs[i]!);
      if (chunks === undefined) byMessage.set(seqs[i]!, [i]);
      else chunks.push(i);
    }
    const wanted = [...byMessage.keys()];
    // A window of gets in flight all along, each message written as soon as its turn comes.
    // Refilled half a window at a time: gets asked together leave in one socket write (one
    // at a time, a write each took 1.1 s of CPU for 11,561 messages here).
    const inFlight: Promise<StoredMsg | null>[] = [];
    let asked = 0;
    for (const seq of wanted) {
      if (inFlight.length <= WINDOW / 2) while (asked < wanted.length && inFlight.length < WINDOW) inFlight.push(this.#dataMessage(wanted[asked++]!));
      const m = await inFlight.shift();
      if (m === null || m === undefined) throw new MissingMessage(committed, `misses the data message at sequence ${seq}`);
      const offset = Number(m.header?.get(OFFSET_HEADER));
      const chunks = byMessage.get(seq)!;
      for (const i of chunks) {
        const at = i * chunkSize - offset;
        const length = chunkLength(manifest.size, chunkSize, i);
        if (m.subject !== this.#subjects.data || !Number.isSafeInteger(offset) || at < 0 || at + length > m.data.length) {
          throw this.#damaged(committed, `names the message at sequence ${seq} for chunk ${i}, which it does not hold`);
        }
        setChunk(table, i, seq, chunkDigest(m.data.subarray(at, at + length)));
      }
      // Consecutive chunks lie together in the message as in the file: one write each run.
      for (let k = 0; k < chunks.length; ) {
        let end = k + 1;
        while (end < chunks.length && chunks[end] === chunks[end - 1]! + 1) end++;
        const from = chunks[k]! * chunkSize;
        const to = Math.min(manifest.size, chunks[end - 1]! * chunkSize + chunkSize);
        writeFully(fd, m.data.subarray(from - offset, to - offset), from);
        k = end;
      }
    }
    if (stateDigest(table) !== manifest.digest) throw this.#damaged(committed, 'does not match its digest');
    return table;
  }

  /**
   * The message at `seq`: a direct get (answered by any server holding the stream, no
   * consumer to place), or, from a server that has not applied it yet, from the leader.
   */
  async #dataMessage(seq: number): Promise<StoredMsg | null> {
    const direct = await this.#jsm.direct.getMessage(this.stream, { seq }).catch(() => null);
    return direct ?? this.#get({ seq }).catch(() => null);
  }

  /**
   * The message `query` names, asked of the stream's leader (null when there is none).
   * Asked only once the stream was seen with its store: nats-server 2.9.10 to 2.9.14 (2.9.10
   * is Debian 12's) lists a new stream before it has one, and a get that arrives in between
   * crashes the server, as a reader polling while a host created the stream did. Its info is
   * safe then, and shows no messages.
   */
  async #get(query: { seq: number } | { last_by_subj: string }): Promise<StoredMsg | null> {
    if (!this.#storeSeen) {
      const info = await this.#info();
      if (info === undefined || info.state.last_seq === 0) return null;
      this.#storeSeen = true;
    }
    return this.#jsm.streams.getMessage(this.stream, query);
  }
}

/** A base manifest too large to publish: its chunks lie scattered over too many states. */
export class ManifestTooLarge extends Error {}

/** A message a state names is gone: removed by a newer state's holder, or lost. */
class MissingMessage extends Error {
  constructor(
    readonly committed: Committed,
    readonly problem: string,
  ) {
    super(problem);
  }
}

/**
 * One state being sent: {@link publish} each chunk that changed (a window of them in
 * flight), then {@link commit} the table of all of them. Nothing is visible to readers
 * until the commit's manifest is stored.
 */
export class StateSender {
  readonly #store: ReplicaStore;
  readonly #writer: Writer;
  #seq: number;
  #inFlight: Promise<unknown>[] = [];
  #failure: unknown;
  /** Sequences of the chunks published so far. */
  readonly published: number[] = [];

  /** Sequence of this writer's last message once all its publishes are stored. */
  get lastSeq(): number {
    return this.#seq;
  }

  constructor(store: ReplicaStore, writer: Writer, after: number) {
    this.#store = store;
    this.#writer = writer;
    this.#seq = after;
  }

  /**
   * Publishes consecutive chunks from byte `offset` of the state on, at most
   * {@link ReplicaStore.chunksPerMessage} (`bytes` must not change until the commit).
   * @returns the stream sequence the message gets once stored
   * @throws the first failed publish's error
   */
  async publish(offset: number, bytes: Uint8Array): Promise<number> {
    if (this.#failure !== undefined) throw this.#failure;
    const seq = ++this.#seq;
    this.published.push(seq);
    this.#inFlight.push(
      this.#store.publishChunks(this.#writer, seq - 1, offset, bytes).catch((err: unknown) => {
        this.#failure ??= err;
      }),
    );
    if (this.#inFlight.length >= WINDOW) await this.#inFlight.shift();
    if (this.#failure !== undefined) throw this.#failure;
    return seq;
  }

  /**
   * Waits for the chunks in flight, and commits nothing.
   * @returns the sequences of the chunks published, which no state names
   */
  async abandon(): Promise<number[]> {
    await Promise.all(this.#inFlight.splice(0));
    return this.published;
  }

  /**
   * Waits for every chunk, then stores the manifest of `table` (every chunk's message).
   * @throws the first failed publish's error (nothing is committed then)
   */
  async commit(table: ChunkTable, durableAt: number): Promise<Committed> {
    await Promise.all(this.#inFlight.splice(0));
    if (this.#failure !== undefined) throw this.#failure;
    return this.#store.publishManifest(this.#writer, this.#seq, table, durableAt);
  }
}

function parseManifest(text: string, url: ReplicaUrl): Manifest {
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch {
    value = undefined;
  }
  const m = value as Partial<Manifest> | undefined;
  const valid =
    m?.format === MANIFEST_FORMAT &&
    Number.isSafeInteger(m.size) &&
    readableChunkSize(m.chunkSize) &&
    typeof m.digest === 'string' &&
    Number.isSafeInteger(m.base) &&
    Array.isArray(m.chunks) &&
    typeof m.durableAt === 'number' &&
    typeof m.holder === 'string';
  if (!valid) {
    const what = typeof m?.format === 'string' && m.format !== MANIFEST_FORMAT ? `format ${JSON.stringify(m.format)}, which this version does not know` : 'no valid manifest';
    throw new ShmfdError('ERR_REPLICA_DAMAGED', `the replica ${url.text} holds ${what}`);
  }
  return m as Manifest;
}

function writeFully(fd: number, data: Uint8Array, position: number): void {
  let done = 0;
  while (done < data.length) done += fs.writeSync(fd, data, done, data.length - done, position + done);
}
