/**
 * The lease that makes one host at a time the writer of a replica: the key `holder` in
 * the JetStream key-value bucket `SHMFD_LEASE_NAME`, whose max_age is the lease's length.
 * It is taken by creating the key (refused while it exists) and renewed by updating it at
 * the revision this host wrote (refused once anyone else wrote it); a holder that stops
 * renewing loses the key when max_age passes, and the next host can create it.
 * @module
 */
import type { NatsConnection } from '@nats-io/transport-node';
import { Kvm, type KV } from '@nats-io/kv';
import { ShmfdError } from '../base/errors.js';
import { isFenced, isStreamNotFound, type Writer } from './store.js';
import type { ReplicaUrl } from './url.js';

const KEY = 'holder';

/** What the lease's value says. */
export interface LeaseHolder {
  /** Writer id (the `Shmfd-Holder` header of its messages). */
  id: string;
  /** `HOSTNAME pid PID`. */
  description: string;
}

/** The current holder, when there is one. */
export interface LeaseState {
  holder: LeaseHolder;
  /** When it last took or renewed the lease, ms since the epoch (server time). */
  renewedAt: number;
  revision: number;
}

/** The outcome of {@link Lease.renew}. */
export type RenewOutcome = 'renewed' | 'expired' | { takenBy: LeaseState };

/** The lease of one replica, seen by one writer. */
export class Lease {
  readonly #kv: KV;
  readonly #writer: Writer;
  readonly #url: ReplicaUrl;
  #revision = 0;
  /** The bucket's max_age: how long the lease lasts without renewal, in ms. */
  readonly ttlMs: number;

  private constructor(kv: KV, ttlMs: number, writer: Writer, url: ReplicaUrl) {
    this.#kv = kv;
    this.ttlMs = ttlMs;
    this.#writer = writer;
    this.#url = url;
  }

  /**
   * Opens the lease bucket of `url`; `create` makes it, with the URL's lease length and
   * replicas, when it does not exist (an existing bucket keeps its own length).
   * @returns undefined when it does not exist and `create` is false
   */
  static async open(nc: NatsConnection, url: ReplicaUrl, writer: Writer, create: boolean): Promise<Lease | undefined> {
    const kvm = new Kvm(nc);
    const bucket = `SHMFD_LEASE_${url.name}`;
    // An existing bucket is used as it is: its max_age, not the URL's, is the lease.
    let kv: KV = await kvm.open(bucket);
    let status = await kv.status().catch((err: unknown) => {
      if (isStreamNotFound(err)) return undefined;
      throw err;
    });
    if (status === undefined) {
      if (!create) return undefined;
      kv = await kvm.create(bucket, { ttl: url.leaseMs, history: 1, replicas: url.replicas });
      status = await kv.status();
    }
    return new Lease(kv, status.ttl, writer, url);
  }

  /** The current holder, or undefined when the lease is free. */
  async state(): Promise<LeaseState | undefined> {
    const entry = await this.#kv.get(KEY);
    if (entry === null || entry.operation !== 'PUT') return undefined;
    let holder: LeaseHolder;
    try {
      holder = entry.json<LeaseHolder>();
    } catch {
      holder = { id: '', description: 'an unknown holder' };
    }
    return { holder, renewedAt: entry.created.getTime(), revision: entry.revision };
  }

  #value(): string {
    return JSON.stringify({ id: this.#writer.id, description: this.#writer.description } satisfies LeaseHolder);
  }

  /**
   * Takes the free lease.
   * @throws ShmfdError `ERR_REPLICA_HELD` naming the holder while another host holds it
   */
  async take(): Promise<void> {
    try {
      this.#revision = await this.#kv.create(KEY, this.#value());
    } catch (err) {
      if (!isFenced(err)) throw err;
      const state = await this.state();
      if (state === undefined) return this.take();
      if (state.holder.id === this.#writer.id) {
        // Ours already (an earlier attempt whose answer was lost).
        this.#revision = state.revision;
        return;
      }
      throw new ShmfdError('ERR_REPLICA_HELD', heldMessage(this.#url, state, this.ttlMs));
    }
  }

  /** Renews the lease at the revision this host wrote last. */
  async renew(): Promise<RenewOutcome> {
    try {
      this.#revision = await this.#kv.update(KEY, this.#value(), this.#revision);
      return 'renewed';
    } catch (err) {
      if (!isFenced(err)) throw err;
      const state = await this.state();
      if (state === undefined) return 'expired';
      if (state.holder.id === this.#writer.id) {
        // Our own update whose answer was lost: it is ours at its revision.
        this.#revision = state.revision;
        return 'renewed';
      }
      return { takenBy: state };
    }
  }

  /** Frees the lease if this host still holds it, so that another host can take over at once. */
  async release(): Promise<void> {
    await this.#kv.delete(KEY, { previousSeq: this.#revision });
  }
}

/** The one line that refuses a second host. */
export function heldMessage(url: ReplicaUrl, state: LeaseState, ttlMs: number): string {
  const ago = Math.max(0, Date.now() - state.renewedAt);
  const left = Math.max(0, ttlMs - ago);
  return (
    `the replica ${url.text} is held by ${state.holder.description} (lease renewed ${seconds(ago)} ago; ` +
    `if that host is gone it expires in ${seconds(left)}, then another host can take over)`
  );
}

function seconds(ms: number): string {
  return `${(ms / 1000).toFixed(1)} s`;
}
