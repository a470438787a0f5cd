/**
 * Sends each new durable backup to the replica in the background, never in the way of the
 * host: {@link Replicator.offer} only opens the file; a state is sent when the previous
 * one is done, and only the newest waiting state is kept. When the servers are
 * unreachable or slow, local backups go on, one warning says so, and the replicator
 * retries with a growing pause until the newest state is sent (catch-up).
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
import { describeError } from '../system/libc.js';
import type { Lease } from './lease.js';
import { isFenced, type Committed, type ReplicaStore, type Writer } from './store.js';

const FIRST_PAUSE_MS = 250;
const LONGEST_PAUSE_MS = 15_000;

/** A durable backup waiting to be sent, held open so a later round cannot change it. */
interface Pending {
  fd: number;
  size: number;
  durableAt: number;
  identity: string;
}

/** Options of {@link Replicator}. */
export interface ReplicatorOptions {
  nc: NatsConnection;
  store: ReplicaStore;
  lease: Lease;
  writer: Writer;
  /** Sequence of this host's last message in the stream (its fence marker at start). */
  lastSeq: number;
  /** Identity ({@link backupIdentity}) of a backup the replica already holds. */
  sent?: string;
  /** The replica's URL, for messages. */
  name: string;
  log: Log;
}

/** What makes two looks at a backup path the same state: the file and its mtime. */
export function backupIdentity(stat: fs.Stats): string {
  return `${stat.dev}:${stat.ino}:${stat.mtimeMs}:${stat.size}`;
}

/** Streams durable backups to the replica until stopped or fenced off. */
export class Replicator {
  #o: ReplicatorOptions;
  #lastSeq: number;
  #sent: string | undefined;
  #pending: Pending | undefined;
  #sending: Pending | undefined;
  #wake: (() => void) | undefined;
  #stopped = false;
  #fencedOff = false;
  #failing = false;
  #mustResync = false;
  #pause = FIRST_PAUSE_MS;
  #renewTimer: NodeJS.Timeout | undefined;
  #renewedAt = Date.now();
  #renewing: Promise<boolean> | undefined;
  #loop: Promise<void> | undefined;
  #abort = new AbortController();
  #idle: (() => void) | undefined;
  /** The newest state this host committed to the replica. */
  lastCommitted: Committed | undefined;

  constructor(options: ReplicatorOptions) {
    this.#o = options;
    this.#lastSeq = options.lastSeq;
    this.#sent = options.sent;
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
   * Queues the backup at `path` (opened now: the file there may be replaced as soon as
   * this returns). An older state still waiting is dropped: only the newest matters.
   */
  offer(path: string): void {
    if (this.#stopped || this.#fencedOff) return;
    let fd: number;
    try {
      fd = fs.openSync(path, 'r');
    } catch (err) {
      this.#o.log.warn(`cannot open ${path} to send it to the replica ${this.#o.name}: ${describeError(err)}`);
      return;
    }
    const stat = fs.fstatSync(fd);
    const identity = backupIdentity(stat);
    if (identity === this.#sent || identity === this.#pending?.identity || identity === this.#sending?.identity) {
      fs.closeSync(fd);
      return;
    }
    this.#drop();
    this.#pending = { fd, size: stat.size, durableAt: Math.round(stat.mtimeMs), identity };
    this.#wake?.();
  }

  /**
   * Sends what is still waiting, for at most `graceMs`, then stops, frees the lease if
   * this host still holds it, and closes the connection.
   * @returns true when the newest offered state was committed
   */
  async stop(graceMs: number): Promise<boolean> {
    const waiting = () => (this.#pending !== undefined || this.#sending !== undefined) && !this.#fencedOff;
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
    this.#abort.abort(new Error('the host is stopping'));
    this.#wake?.();
    this.#drop();
    await this.#loop;
    if (!this.#fencedOff && complete) await this.#o.lease.release().catch(() => undefined);
    await this.#o.nc.close().catch(() => undefined);
    return complete;
  }

  #drop(): void {
    if (this.#pending !== undefined) fs.closeSync(this.#pending.fd);
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
      // Taken out of #pending, so that a newer offer cannot close it while it is read.
      this.#pending = undefined;
      this.#sending = p;
      // Whether p went back to #pending, which then owns its descriptor.
      let requeued = false;
      try {
        if (this.#mustResync || Date.now() - this.#renewedAt > this.#o.lease.ttlMs) await this.#resync();
        if (this.#fencedOff || this.#stopped) break;
        const committed = await this.#o.store.send(this.#o.writer, this.#lastSeq, p.fd, p.size, p.durableAt, this.#abort.signal);
        this.#lastSeq = committed.seq;
        this.lastCommitted = committed;
        this.#sent = p.identity;
        if (this.#failing) this.#o.log.warn(`the replica ${this.#o.name} is reachable again: caught up with the newest backup`);
        this.#failing = false;
        this.#pause = FIRST_PAUSE_MS;
        this.#o.log.debug(`replica ${this.#o.name}: committed ${committed.manifest.size} bytes in ${committed.manifest.chunks} message(s) at sequence ${committed.seq}`);
        await this.#o.store.dropBefore(committed).catch((err: unknown) => this.#o.log.debug(`cannot drop old states of the replica: ${describeError(err)}`));
      } catch (err) {
        this.#mustResync = true;
        if (!this.#failing) {
          this.#o.log.warn(
            `cannot send the backup to the replica ${this.#o.name}: ${describeError(err)}; local backups go on, and the replica catches up once it can`,
          );
        } else {
          this.#o.log.debug(`replica ${this.#o.name}: ${describeError(err)}`);
        }
        this.#failing = true;
        // Unless a newer state came meanwhile, this one is sent again after the pause.
        this.#sending = undefined;
        if (this.#pending === undefined && !this.#stopped && !this.#fencedOff) {
          this.#pending = p;
          requeued = true;
        }
        await this.#sleep(this.#pause);
        this.#pause = Math.min(LONGEST_PAUSE_MS, this.#pause * 2);
      } finally {
        this.#sending = undefined;
        if (!requeued) fs.closeSync(p.fd);
      }
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
