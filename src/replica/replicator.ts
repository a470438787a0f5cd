/**
 * Sends each new durable backup to the replica in the background, never in the way of the
 * host: a state is sent when the previous one is done, and only what changed since the
 * replica's state travels, as chunks (see ./chunks.ts). When the servers are
 * unreachable or slow, local backups go on, one warning says so, and the replicator
 * retries with a growing pause until the newest state is sent (catch-up).
 *
 * What changed comes from the host's rounds. A round that changed the backup in place
 * names its ranges: their chunks are read at once, while no round writes the file, and
 * wait in memory (the newest read of a chunk wins). A round that wrote a new file (and the
 * first state) has every chunk compared with the replica's by digest, read while later
 * rounds may change that file in place; so the state is committed only at a moment when
 * no round writes, with the chunks those rounds changed read at their ends: what is sent
 * is always exactly the backup of one round.
 *
 * Before writing again after any failure, it renews its lease and writes a fence marker
 * after its own last message. A lease someone else took, or a stream someone else wrote
 * to, means this host was fenced off: it stops replicating at once, says so, and writes
 * nothing more.
 * @module
 */
import fs from 'node:fs';
import type { NatsConnection } from '@nats-io/transport-node';
import type { Log } from '../base/log.js';
import { readAt } from '../base/read-at.js';
import type { DurableBackup } from '../restore/host.js';
import { yieldToLoop } from '../restore/copy.js';
import { besideRounds, type RoundGate } from '../restore/snapshotter.js';
import { describeError } from '../system/libc.js';
import { chunkCount, chunkDigest, chunkSizeFor, copyTable, MESSAGE_BYTES, digestAt, resized, setChunk, zeroDigest, zeroTable, type ChunkTable } from './chunks.js';
import type { Lease } from './lease.js';
import { isFenced, ManifestTooLarge, type Committed, type ReplicaStore, type Writer } from './store.js';

const FIRST_PAUSE_MS = 250;
const LONGEST_PAUSE_MS = 15_000;
/** Chunks read at the ends of rounds and waiting to be sent, at most: beyond, the whole file is compared instead. */
const CAPTURE_LIMIT_BYTES = 64 * 1024 * 1024;
/** Commits between two looks at how much the stream holds beyond the state. */
const COMMITS_PER_GARBAGE_CHECK = 64;

/** A state waiting to be sent, or being sent. */
interface Pending {
  /** A new backup file, held open: every chunk is compared. */
  file?: { fd: number; ino: number };
  /** Where the state's file was, and which file it was. */
  path: string;
  ino: number;
  /** Chunks read at the ends of later rounds (in place): they win over the file's. */
  captured: Map<number, Buffer>;
  capturedBytes: number;
  size: number;
  durableAt: number;
}

/** Options of {@link Replicator}. */
export interface ReplicatorOptions {
  nc: NatsConnection;
  store: ReplicaStore;
  lease: Lease;
  writer: Writer;
  /** Sequence of this host's last message in the stream (its fence marker at start). */
  lastSeq: number;
  /** The replica's state, when the local backup is known to hold exactly it (the host started from it). */
  committed?: { committed: Committed; table: ChunkTable };
  /** The host's rounds: a state read from a whole file is committed between two of them. */
  gate: RoundGate;
  /** The replica's URL, for messages. */
  name: string;
  log: Log;
}

/** Streams durable backups to the replica until stopped or fenced off. */
export class Replicator {
  #o: ReplicatorOptions;
  #lastSeq: number;
  /** The replica's state as this host last committed (or found) it; undefined: send every chunk. */
  #table: ChunkTable | undefined;
  #manifestSeq: number | undefined;
  /** Messages of states never committed, removed after the next commit. */
  #garbage: number[] = [];
  #pending: Pending | undefined;
  /** The state whose file is being read: chunks changed in place meanwhile go to it too. */
  #reading: { state: Pending; late: Map<number, Buffer> | undefined } | undefined;
  #sending = false;
  /** Size of the backup at the last round offered. */
  #offeredSize: number | undefined;
  #wake: (() => void) | undefined;
  #stopped = false;
  #fencedOff = false;
  #failing = false;
  #mustResync = false;
  #rewrite = false;
  #commits = 0;
  /** Chunks the last committed state sent. */
  #sentChunks = 0;
  #pause = FIRST_PAUSE_MS;
  #renewTimer: NodeJS.Timeout | undefined;
  #renewedAt = Date.now();
  #renewing: Promise<boolean> | undefined;
  #loop: Promise<void> | undefined;
  #idle: (() => void) | undefined;
  /** The newest state this host committed to the replica (or found there at start). */
  lastCommitted: Committed | undefined;

  constructor(options: ReplicatorOptions) {
    this.#o = options;
    this.#lastSeq = options.lastSeq;
    this.#table = options.committed?.table;
    this.#manifestSeq = options.committed?.committed.seq;
    this.lastCommitted = options.committed?.committed;
    this.#offeredSize = options.committed?.table.size;
  }

  /** True once this host lost the lease: it writes nothing more. */
  get fencedOff(): boolean {
    return this.#fencedOff;
  }

  /** Starts sending and renewing the lease. */
  start(): void {
    const every = Math.max(100, Math.floor(this.#o.lease.ttlMs / 3));
    this.#renewTimer = setInterval(() => void this.#renew(), every);
    this.#renewTimer.unref();
    this.#loop = this.#run();
  }

  /**
   * Takes in a durable round of the host (called at its end, while no round writes the
   * backup): a new file is opened now (the path may name another one as soon as this
   * returns); the chunks of ranges changed in place are read now.
   */
  offer(durable: DurableBackup): void {
    if (this.#stopped || this.#fencedOff) return;
    let fd: number;
    try {
      fd = fs.openSync(durable.path, 'r');
    } catch (err) {
      this.#o.log.warn(`cannot open ${durable.path} to send it to the replica ${this.#o.name}: ${describeError(err)}`);
      return;
    }
    const stat = fs.fstatSync(fd);
    const at = { size: stat.size, durableAt: Math.round(stat.mtimeMs), path: durable.path, ino: stat.ino };
    const reading = this.#reading?.state.file?.ino === stat.ino ? this.#reading : undefined;
    // The file being read, if this is another, is not written any more: it stays as it is.
    if (reading === undefined) this.#reading = undefined;
    let captured: Map<number, Buffer> | undefined;
    if (durable.changed !== undefined) {
      try {
        captured = new Map();
        const chunkSize = chunkSizeFor(stat.size);
        for (const index of touchedChunks(durable.changed, stat.size, chunkSize)) captured.set(index, readChunk(fd, stat.size, chunkSize, index));
      } catch (err) {
        this.#o.log.debug(`cannot read the chunks a round changed in ${durable.path}: ${describeError(err)}; comparing the whole file instead`);
        captured = undefined;
      }
    }
    if (reading !== undefined) {
      Object.assign(reading.state, at);
      if (captured === undefined) {
        // Not known what changed in the file being read: the state read from it is dropped.
        reading.late = undefined;
      } else {
        for (const [index, bytes] of captured) reading.late?.set(index, bytes);
      }
    }
    // A round that changed the size in place is taken as a new file: the chunks at the old
    // and new ends are then compared too.
    const resized = captured !== undefined && stat.size !== this.#offeredSize;
    this.#offeredSize = stat.size;
    let p = this.#pending;
    if (captured === undefined || resized || (p !== undefined && p.capturedBytes > CAPTURE_LIMIT_BYTES && p.file === undefined)) {
      // Every chunk of this file is compared: it is this round's state.
      this.#drop();
      this.#pending = { file: { fd, ino: stat.ino }, captured: new Map(), capturedBytes: 0, ...at };
    } else {
      fs.closeSync(fd);
      p ??= this.#pending = { captured: new Map(), capturedBytes: 0, ...at };
      Object.assign(p, at);
      for (const [index, bytes] of captured) {
        p.capturedBytes += bytes.length - (p.captured.get(index)?.length ?? 0);
        p.captured.set(index, bytes);
      }
    }
    this.#wake?.();
  }

  /**
   * Sends what is still waiting, for at most `graceMs`, then stops, frees the lease if
   * this host still holds it, and closes the connection.
   * @returns true when the newest offered state was committed
   */
  async stop(graceMs: number): Promise<boolean> {
    const waiting = () => (this.#pending !== undefined || this.#sending) && !this.#fencedOff;
    if (waiting()) {
      const deadline = Date.now() + graceMs;
      while (waiting() && Date.now() < deadline) {
        await new Promise<void>((resolve) => {
          const timer = setTimeout(resolve, Math.min(100, Math.max(1, deadline - Date.now())));
          this.#idle = () => {
            clearTimeout(timer);
            resolve();
          };
        });
      }
    }
    const complete = !waiting() && !this.#fencedOff;
    if (waiting()) {
      this.#o.log.warn(`the replica ${this.#o.name} did not receive the newest state in time; it holds an older one`);
    }
    this.#stopped = true;
    clearInterval(this.#renewTimer);
    this.#wake?.();
    await this.#loop;
    this.#drop();
    if (!this.#fencedOff && complete) await this.#o.lease.release().catch(() => undefined);
    await this.#o.nc.close().catch(() => undefined);
    return complete;
  }

  #drop(): void {
    if (this.#pending?.file !== undefined) fs.closeSync(this.#pending.file.fd);
    this.#pending = undefined;
  }

  async #run(): Promise<void> {
    while (!this.#stopped && !this.#fencedOff) {
      const p = this.#pending;
      if (p === undefined) {
        this.#idle?.();
        await new Promise<void>((resolve) => (this.#wake = resolve));
        this.#wake = undefined;
        continue;
      }
      this.#pending = undefined;
      this.#sending = true;
      // Whether p went back to #pending, which then owns its file.
      let requeued = false;
      try {
        if (this.#mustResync || Date.now() - this.#renewedAt > this.#o.lease.ttlMs) await this.#resync();
        if (this.#fencedOff || this.#stopped) break;
        const committed = await this.#send(p);
        if (committed === undefined) continue;
        if (this.#failing) this.#o.log.warn(`the replica ${this.#o.name} is reachable again: caught up with the newest backup`);
        this.#failing = false;
        this.#pause = FIRST_PAUSE_MS;
        const m = committed.manifest;
        this.#o.log.debug(
          `replica ${this.#o.name}: committed ${m.size} bytes at sequence ${committed.seq}: ${this.#sentChunks} of ${chunkCount(m.size, m.chunkSize)} chunks of ${m.chunkSize} bytes sent, ` +
            `${m.messages} named (${m.base === 0 ? 'a base manifest' : `a delta of the manifest at ${m.base}`})`,
        );
      } catch (err) {
        if (this.#stopped) break;
        if (err instanceof ManifestTooLarge) this.#rewrite = true;
        this.#mustResync = true;
        if (!this.#failing) {
          this.#o.log.warn(
            `cannot send the backup to the replica ${this.#o.name}: ${describeError(err)}; local backups go on, and the replica catches up once it can`,
          );
        } else {
          this.#o.log.debug(`replica ${this.#o.name}: ${describeError(err)}`);
        }
        this.#failing = true;
        // What this state changed is not in the replica: it goes into the next one.
        requeued = this.#requeue(p);
        this.#reading = undefined;
        this.#sending = false;
        await this.#sleep(this.#pause);
        this.#pause = Math.min(LONGEST_PAUSE_MS, this.#pause * 2);
      } finally {
        this.#reading = undefined;
        this.#sending = false;
        if (!requeued && p.file !== undefined) fs.closeSync(p.file.fd);
      }
    }
  }

  /**
   * Puts a state that could not be sent back under the newer one waiting, if any.
   * @returns whether #pending now holds its file
   */
  #requeue(p: Pending): boolean {
    const newer = this.#pending;
    if (this.#stopped || this.#fencedOff) return false;
    if (newer === undefined) {
      this.#pending = p;
      return true;
    }
    // A newer file holds everything: every chunk of it is compared anyway.
    if (newer.file !== undefined) return false;
    // Else the newer state changed some chunks of the same file since: its reads win.
    for (const [index, bytes] of p.captured) {
      if (!newer.captured.has(index)) {
        newer.captured.set(index, bytes);
        newer.capturedBytes += bytes.length;
      }
    }
    newer.file = p.file;
    return p.file !== undefined;
  }

  /**
   * Sends the state `p`: the chunks that differ from the replica's, then its manifest.
   * @returns undefined when there was nothing to commit: the replica holds these bytes, or a newer state waiting supersedes it
   */
  async #send(p: Pending): Promise<Committed | undefined> {
    const previous = this.#rewrite ? undefined : this.#table;
    const sender = this.#o.store.sendState(this.#o.writer, this.#lastSeq);
    let table = previous === undefined ? zeroTable(p.size) : resized(copyTable(previous), p.size);
    // A table that starts from zeros names no chunk of the replica: a state of the chunks
    // its rounds changed would say the others are zeros. Every chunk of the file is read.
    const fromZeros = previous === undefined || previous.chunkSize !== table.chunkSize;
    if (fromZeros && p.file === undefined) {
      const file = this.#reopen(p);
      if (file === undefined) return undefined;
      p.file = file;
    }
    // The table starts as the replica's state (or zeros): a chunk whose digest it holds is there already.
    let changed = fromZeros || previous.size !== p.size;
    // Changed chunks gather into a run of consecutive ones, sent as one message when the
    // run breaks or is full. Chunks are put in increasing order, then the run is flushed.
    const perMessage = this.#o.store.chunksPerMessage(table.chunkSize);
    let run: { first: number; parts: Buffer[]; digests: Buffer[] } | undefined;
    const flush = async () => {
      const r = run;
      run = undefined;
      if (r === undefined) return;
      const seq = await sender.publish(r.first * table.chunkSize, r.parts.length === 1 ? r.parts[0]! : Buffer.concat(r.parts));
      r.digests.forEach((digest, k) => setChunk(table, r.first + k, seq, digest));
    };
    const put = async (index: number, bytes: Buffer, digest: Buffer) => {
      if (digestAt(table, index).equals(digest)) return;
      changed = true;
      if (digest.equals(zeroDigest(bytes.length))) {
        setChunk(table, index, 0, digest);
        return;
      }
      if (run !== undefined && (run.first + run.parts.length !== index || run.parts.length >= perMessage)) await flush();
      run ??= { first: index, parts: [], digests: [] };
      run.parts.push(bytes);
      run.digests.push(digest);
    };
    try {
      if (p.file !== undefined) {
        const reading: { state: Pending; late: Map<number, Buffer> | undefined } = { state: p, late: new Map() };
        this.#reading = reading;
        const file = p.file;
        const readSize = p.size;
        const readChunkSize = table.chunkSize;
        const n = chunkCount(readSize, readChunkSize);
        // Read and hashed a message's worth at a time: one read, and one CPU measurement
        // (getrusage) instead of two per 8 KiB chunk.
        const group = Math.max(1, Math.floor(MESSAGE_BYTES / readChunkSize));
        for (let first = 0; first < n; first += group) {
          if (this.#stopped) throw new Error('the host is stopping');
          const chunks = besideRounds(() => hashed(readChunks(file.fd, readSize, readChunkSize, first, Math.min(n, first + group))));
          for (let k = 0; k < chunks.length; k++) if (!p.captured.has(first + k)) await put(first + k, chunks[k]!.bytes, chunks[k]!.digest);
          // Reading from the page cache does not yield: let the host's rounds and signals in.
          await yieldToLoop();
        }
        await flush();
        // Now no round writes: chunks changed in place while the file was read were read
        // at the ends of those rounds; the others are as they were read.
        const settled = await this.#o.gate.quiet(() => {
          this.#reading = undefined;
          const late = reading.late;
          // A round that changed the size to one cut into other chunks: nothing read fits.
          if (late === undefined || chunkSizeFor(p.size) !== readChunkSize) return undefined;
          // A round that changed the size in place: the chunks from the old end on, read now.
          const now = chunkCount(p.size, readChunkSize);
          for (let index = Math.max(0, Math.min(n, now) - 1); p.size !== readSize && index < now; index++) {
            if (!late.has(index) && !p.captured.has(index)) late.set(index, readChunk(file.fd, p.size, readChunkSize, index));
          }
          return late;
        });
        if (settled === undefined) {
          // A round changed the file being read in a way not known: the newer state waiting compares it all again.
          this.#garbage.push(...(await sender.abandon()));
          this.#lastSeq = sender.lastSeq;
          return undefined;
        }
        table = resized(table, p.size);
        for (const [index, bytes] of settled) if (index < chunkCount(p.size, table.chunkSize)) p.captured.set(index, bytes);
      }
      const n = chunkCount(p.size, table.chunkSize);
      const indexes = [...p.captured.keys()].filter((index) => index < n).sort((a, b) => a - b);
      const captured = besideRounds(() => hashed(indexes.map((index) => p.captured.get(index)!)));
      for (let k = 0; k < indexes.length; k++) await put(indexes[k]!, captured[k]!.bytes, captured[k]!.digest);
      await flush();
      // The replica holds these bytes already (chunks read twice, at a round's end and for the state before).
      if (!changed && table.size === p.size) return undefined;
      const committed = await sender.commit(table, p.durableAt);
      this.#sentChunks = sender.published.length;
      this.#lastSeq = committed.seq;
      const before = this.#table === undefined || this.#manifestSeq === undefined ? undefined : { seqs: this.#table.seqs, manifestSeq: this.#manifestSeq };
      const garbage = this.#garbage.splice(0);
      this.#table = table;
      this.#manifestSeq = committed.seq;
      this.lastCommitted = committed;
      this.#rewrite = false;
      await this.#retire(committed, table, before, garbage);
      return committed;
    } catch (err) {
      this.#garbage.push(...sender.published);
      throw err;
    }
  }

  /**
   * The file of the state `p` (changed in place by its rounds), opened again to be read
   * whole; undefined when it was replaced or resized since: a newer state, offered with
   * its file, supersedes this one. The file holds this state's chunks or newer ones (of
   * rounds since, whose states follow): the chunks this state captured are dropped.
   */
  #reopen(p: Pending): { fd: number; ino: number } | undefined {
    const fd = fs.openSync(p.path, 'r');
    const stat = fs.fstatSync(fd);
    if (stat.ino !== p.ino || stat.size !== p.size) {
      fs.closeSync(fd);
      return undefined;
    }
    p.captured.clear();
    p.capturedBytes = 0;
    return { fd, ino: stat.ino };
  }

  /** Removes what the replica no longer needs; decides whether the next state sends every chunk again. */
  async #retire(committed: Committed, table: ChunkTable, before: { seqs: Float64Array; manifestSeq: number } | undefined, garbage: number[]): Promise<void> {
    const store = this.#o.store;
    try {
      await store.retire(committed, table.seqs, before, garbage);
      if (store.baseFragmented) this.#rewrite = true;
      if (++this.#commits % COMMITS_PER_GARBAGE_CHECK === 0 && (await store.storedBytes()) > 2 * table.size + CAPTURE_LIMIT_BYTES) this.#rewrite = true;
    } catch (err) {
      this.#o.log.debug(`cannot drop old states of the replica: ${describeError(err)}`);
    }
  }

  #sleep(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const timer = setTimeout(resolve, ms);
      const previous = this.#wake;
      this.#wake = () => {
        // A newer state does not cut the pause short; only stopping does.
        if (this.#stopped) {
          clearTimeout(timer);
          resolve();
        }
        previous?.();
      };
    });
  }

  /** Renews the lease; on the timer, and before writing again after a failure. */
  #renew(): Promise<boolean> {
    // One renewal at a time: while the servers are unreachable, each waits for its timeout.
    this.#renewing ??= this.#renewOnce().finally(() => (this.#renewing = undefined));
    return this.#renewing;
  }

  async #renewOnce(): Promise<boolean> {
    if (this.#stopped || this.#fencedOff) return false;
    let outcome;
    try {
      outcome = await this.#o.lease.renew();
    } catch (err) {
      this.#o.log.debug(`cannot renew the lease of the replica ${this.#o.name}: ${describeError(err)}`);
      return false;
    }
    if (outcome === 'renewed') {
      this.#renewedAt = Date.now();
      return true;
    }
    if (outcome === 'expired') {
      // Nobody took it: take it again, and write on only if nobody wrote meanwhile (resync).
      try {
        await this.#o.lease.take();
        this.#renewedAt = Date.now();
        this.#mustResync = true;
        return true;
      } catch (err) {
        this.#o.log.debug(`cannot take the lease of the replica ${this.#o.name} again: ${describeError(err)}`);
        const state = await this.#o.lease.state().catch(() => undefined);
        if (state !== undefined && state.holder.id !== this.#o.writer.id) this.#fenceOff(state.holder.description);
        return false;
      }
    }
    this.#fenceOff(outcome.takenBy.holder.description);
    return false;
  }

  /** Makes sure the lease is this host's and the stream holds nothing after its own last message. */
  async #resync(): Promise<void> {
    if (!(await this.#renew())) throw new Error('the lease could not be renewed');
    for (;;) {
      try {
        this.#lastSeq = await this.#o.store.fence(this.#o.writer, this.#lastSeq);
        this.#mustResync = false;
        return;
      } catch (err) {
        if (!isFenced(err)) throw err;
      }
      // Something follows our last known message: ours (an answer lost in an outage), or another host's.
      const last = await this.#o.store.lastSeq();
      const writer = await this.#o.store.writerAt(last);
      if (writer?.id !== this.#o.writer.id) {
        const state = await this.#o.lease.state().catch(() => undefined);
        if (state?.holder.id === this.#o.writer.id) {
          // The new holder's lease lapsed (a slow renewal) and this host took it again on
          // waking: hand it back, or the host that goes on writing would be fenced off too.
          await this.#o.lease.release().catch(() => undefined);
        }
        const other = state !== undefined && state.holder.id !== this.#o.writer.id ? state.holder.description : writer?.description;
        this.#fenceOff(other ?? 'another host');
        return;
      }
      this.#lastSeq = last;
    }
  }

  #fenceOff(holder: string): void {
    if (this.#fencedOff) return;
    this.#fencedOff = true;
    clearInterval(this.#renewTimer);
    this.#drop();
    this.#wake?.();
    this.#o.log.error(
      `lost the lease of the replica ${this.#o.name} to ${holder}: replication stopped, nothing more is written to it; local backups go on`,
    );
  }
}

/** Indexes of the chunks of `chunkSize` bytes that ranges `[offset, length]` touch, within `size` bytes. */
function touchedChunks(changed: readonly (readonly [number, number])[], size: number, chunkSize: number): Set<number> {
  const out = new Set<number>();
  const n = chunkCount(size, chunkSize);
  for (const [offset, length] of changed) {
    const last = Math.min(n - 1, Math.floor((offset + length - 1) / chunkSize));
    for (let index = Math.floor(offset / chunkSize); index <= last; index++) out.add(index);
  }
  return out;
}

/** Chunk `index` (of `chunkSize` bytes) of the first `size` bytes of `fd` (zeros past its end). */
export function readChunk(fd: number, size: number, chunkSize: number, index: number): Buffer {
  return readChunks(fd, size, chunkSize, index, index + 1)[0]!;
}

/** Chunks `first` to `end` (excluded) of the first `size` bytes of `fd`, read at once (zeros past its end). */
export function readChunks(fd: number, size: number, chunkSize: number, first: number, end: number): Buffer[] {
  const from = first * chunkSize;
  const length = Math.min(size, end * chunkSize) - from;
  const buf = Buffer.allocUnsafe(length);
  buf.fill(0, readAt(fd, buf, length, from));
  const chunks: Buffer[] = [];
  for (let at = 0; at < length; at += chunkSize) chunks.push(buf.subarray(at, Math.min(length, at + chunkSize)));
  return chunks;
}

/** Each chunk with its digest. */
function hashed(chunks: Buffer[]): { bytes: Buffer; digest: Buffer }[] {
  return chunks.map((bytes) => ({ bytes, digest: chunkDigest(bytes) }));
}
