/**
 * The replica in JetStream: one stream per NAME (`SHMFD_NAME`, subjects `shmfd.NAME.>`)
 * holding the backup's bytes as data messages, a manifest published after them that names
 * the messages, the size and the SHA-256 of the whole backup, and fence markers.
 *
 * A state is committed when its manifest is stored: readers take the newest manifest and
 * the data messages it names, so a state whose manifest never arrived is invisible, never
 * torn. Every publish carries `Nats-Expected-Last-Sequence`, the stream sequence of the
 * writer's previous message: the stream refuses it once anything else was written, so a
 * host that a new holder fenced off (by a marker on `fence`) cannot write again.
 *
 * Deltas later fit the same frame: a manifest of another format may name data messages of
 * earlier states; readers refuse formats they do not know.
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
import type { ReplicaCredentials, ReplicaUrl } from './url.js';

/** The manifest format this code writes and reads. */
export const MANIFEST_FORMAT = 'shmfd-replica-1';

/** A committed state of the replica. */
export interface Manifest {
  format: typeof MANIFEST_FORMAT;
  /** Size of the backup in bytes. */
  size: number;
  /** SHA-256 of the whole backup (holes as zeros), hex. */
  sha256: string;
  /** Stream sequences of its data messages (none for a backup of zeros: then both are 0). */
  firstSeq: number;
  lastSeq: number;
  /** Number of data messages; a chunk of zeros is not sent. */
  chunks: number;
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
/** Data messages in flight at once while a state is sent. */
const WINDOW = 16;
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
  readonly #nc: NatsConnection;
  readonly #js: JetStreamClient;
  readonly #jsm: JetStreamManager;
  readonly #url: ReplicaUrl;

  private constructor(nc: NatsConnection, jsm: JetStreamManager, url: ReplicaUrl) {
    this.#nc = nc;
    this.#jsm = jsm;
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
      stored = await this.#jsm.streams.getMessage(this.stream, { last_by_subj: this.#subjects.manifest });
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
    const stored = await this.#jsm.streams.getMessage(this.stream, { seq }).catch(() => null);
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
      const stored = await this.#jsm.streams.getMessage(this.stream, { last_by_subj: subject }).catch(() => null);
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

  /**
   * Sends the first `size` bytes of `fd` as a new state after sequence `after`: the
   * non-zero chunks, then the manifest.
   * @returns the manifest's sequence and its content
   * @throws the first failing publish's error (nothing is committed then)
   */
  async send(writer: Writer, after: number, fd: number, size: number, durableAt: number, signal?: AbortSignal): Promise<Committed> {
    const chunk = this.chunkSize();
    const hash = crypto.createHash('sha256');
    const inFlight: Promise<PubAck>[] = [];
    let seq = after;
    let firstSeq = 0;
    let failure: unknown;
    const settle = async (keep: number) => {
      while (inFlight.length > keep) {
        await (inFlight.shift() as Promise<PubAck>).catch((err: unknown) => {
          failure ??= err;
        });
      }
    };
    for (let offset = 0; offset < size && failure === undefined; offset += chunk) {
      signal?.throwIfAborted();
      // Read, hashed and published while local rounds await their I/O: not their cost.
      const published = besideRounds(() => {
        const bytes = readFully(fd, Math.min(chunk, size - offset), offset);
        hash.update(bytes);
        if (isZero(bytes)) return false;
        if (firstSeq === 0) firstSeq = seq + 1;
        inFlight.push(this.#publish(this.#subjects.data, bytes, writer, seq++, offset));
        // The client writes to its socket in a microtask, after this section; a flush
        // writes now, so that this cost too is counted here.
        this.#nc.flush().catch(() => undefined);
        return true;
      });
      if (published) await settle(WINDOW - 1);
    }
    await settle(0);
    if (failure !== undefined) throw failure;
    const manifest: Manifest = {
      format: MANIFEST_FORMAT,
      size,
      sha256: hash.digest('hex'),
      firstSeq,
      lastSeq: firstSeq === 0 ? 0 : seq,
      chunks: firstSeq === 0 ? 0 : seq - firstSeq + 1,
      durableAt,
      holder: writer.description,
    };
    const ack = await this.#publish(this.#subjects.manifest, JSON.stringify(manifest), writer, seq);
    return { manifest, seq: ack.seq };
  }

  /**
   * Drops everything before `committed`'s first message: earlier states, fence markers,
   * and data of states never committed. Safe for a host that was fenced off meanwhile:
   * whatever a later holder wrote comes after its own commit.
   */
  async dropBefore(committed: Committed): Promise<void> {
    const seq = committed.manifest.firstSeq === 0 ? committed.seq : committed.manifest.firstSeq;
    await this.#jsm.streams.purge(this.stream, { filter: this.#subjects.all, seq });
  }

  /**
   * Writes the state `committed` names into `fd` (which must be empty) and checks its digest.
   * @throws ShmfdError `ERR_REPLICA_DAMAGED` when messages are missing or the digest differs
   */
  async receive(committed: Committed, fd: number): Promise<void> {
    const { manifest } = committed;
    const damaged = (problem: string) =>
      new ShmfdError('ERR_REPLICA_DAMAGED', `the replica ${this.#url.text} is damaged: the state committed at sequence ${committed.seq} ${problem}`);
    fs.ftruncateSync(fd, manifest.size);
    const hash = crypto.createHash('sha256');
    const zeros = ZEROS;
    let hashed = 0;
    const hashZerosTo = (end: number) => {
      while (hashed < end) {
        const n = Math.min(zeros.length, end - hashed);
        hash.update(zeros.subarray(0, n));
        hashed += n;
      }
    };
    if (manifest.chunks !== manifest.lastSeq - manifest.firstSeq + 1) throw damaged(`names ${manifest.chunks} data messages in sequences ${manifest.firstSeq} to ${manifest.lastSeq}`);
    for (let seq = manifest.firstSeq; manifest.chunks > 0 && seq <= manifest.lastSeq; seq += WINDOW) {
      const batch: Promise<StoredMsg | null>[] = [];
      for (let s = seq; s <= Math.min(manifest.lastSeq, seq + WINDOW - 1); s++) batch.push(this.#dataMessage(s));
      for (const m of await Promise.all(batch)) {
        const offset = Number(m?.header?.get(OFFSET_HEADER));
        if (m === null || m.subject !== this.#subjects.data) throw damaged('misses some of its data messages');
        if (!Number.isSafeInteger(offset) || offset < hashed || offset + m.data.length > manifest.size) throw damaged(`has a data message at a wrong offset (${offset})`);
        hashZerosTo(offset);
        hash.update(m.data);
        hashed += m.data.length;
        writeFully(fd, m.data, offset);
      }
    }
    hashZerosTo(manifest.size);
    if (hash.digest('hex') !== manifest.sha256) throw damaged('does not match its SHA-256');
  }

  /**
   * The message at `seq`: a direct get (answered by any server holding the stream, no
   * consumer to place), or, from a server that has not applied it yet, from the leader.
   */
  async #dataMessage(seq: number): Promise<StoredMsg | null> {
    const direct = await this.#jsm.direct.getMessage(this.stream, { seq }).catch(() => null);
    return direct ?? this.#jsm.streams.getMessage(this.stream, { seq }).catch(() => null);
  }

  /** Bytes per data message: within the server's max_payload, with room for headers. */
  chunkSize(): number {
    return Math.min(512 * 1024, (this.#nc.info?.max_payload ?? 1024 * 1024) - 4096);
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
  if (m?.format !== MANIFEST_FORMAT || typeof m.size !== 'number' || typeof m.sha256 !== 'string' || typeof m.durableAt !== 'number') {
    const what = typeof m?.format === 'string' ? `format ${JSON.stringify(m.format)}, which this version does not know` : 'no valid manifest';
    throw new ShmfdError('ERR_REPLICA_DAMAGED', `the replica ${url.text} holds ${what}`);
  }
  return m as Manifest;
}

function readFully(fd: number, length: number, position: number): Buffer {
  const buf = Buffer.allocUnsafe(length);
  let done = 0;
  while (done < length) {
    const n = fs.readSync(fd, buf, done, length - done, position + done);
    if (n === 0) {
      buf.fill(0, done);
      break;
    }
    done += n;
  }
  return buf;
}

function writeFully(fd: number, data: Uint8Array, position: number): void {
  let done = 0;
  while (done < data.length) done += fs.writeSync(fd, data, done, data.length - done, position + done);
}

const ZEROS = Buffer.alloc(512 * 1024);

function isZero(bytes: Buffer): boolean {
  return bytes.length <= ZEROS.length && bytes.equals(ZEROS.subarray(0, bytes.length));
}
