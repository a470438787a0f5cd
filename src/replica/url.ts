/**
 * The replica's address, `nats://HOST:PORT[,HOST:PORT...]/NAME[?replicas=N&lease=SECONDS]`
 * (or `tls://...`), and the connection options NATS users expect, credentials taken from
 * the environment only: a command line is visible to every user of the machine.
 * @module
 */
import fs from 'node:fs';
import type { Environment } from '../fds/listen-fds.js';
import { ShmfdError } from '../base/errors.js';

/** Lease length when the URL names none, in milliseconds. */
export const DEFAULT_LEASE_MS = 10_000;

/** A parsed replica URL. */
export interface ReplicaUrl {
  /** `host:port` of each server given. */
  servers: string[];
  /** `tls://`: the connection must use TLS. */
  tls: boolean;
  /** The replica's name: its stream is `SHMFD_NAME`, its lease bucket `SHMFD_LEASE_NAME`. */
  name: string;
  /** Copies JetStream keeps of the stream and the lease (1, or 3 or 5 in a cluster). */
  replicas: number;
  /** How long a lease lasts without renewal (the lease bucket's max_age), in milliseconds. */
  leaseMs: number;
  /** The URL as given, for messages. */
  text: string;
}

const NAME = /^[A-Za-z0-9_-]{1,64}$/;

/** True for arguments that are replica URLs rather than file names. */
export function isReplicaUrl(text: string): boolean {
  return /^(nats|tls):\/\//.test(text);
}

/**
 * Parses a replica URL.
 * @throws ShmfdError `ERR_REPLICA_URL` for anything else, credentials in it included
 */
export function parseReplicaUrl(text: string): ReplicaUrl {
  const bad = (problem: string) =>
    new ShmfdError('ERR_REPLICA_URL', `replica URL ${JSON.stringify(text)}: ${problem} (expected nats://HOST:PORT/NAME)`);
  const m = /^(nats|tls):\/\/([^/?#]*)\/([^/?#]*)(?:\?([^#]*))?$/.exec(text);
  if (m === null) throw bad('not a replica URL');
  const [, scheme, authority, name, query] = m as unknown as [string, string, string, string, string | undefined];
  if (authority.includes('@')) {
    throw bad('credentials do not belong on the command line, where every user can read them; use NATS_CREDS, NATS_TOKEN_FILE, NATS_TOKEN or NATS_USER and NATS_PASSWORD');
  }
  const servers = authority.split(',');
  for (const server of servers) {
    if (!/^([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]):[0-9]{1,5}$/.test(server)) throw bad(`${JSON.stringify(server)} is not HOST:PORT`);
  }
  if (!NAME.test(name)) throw bad(`the name ${JSON.stringify(name)} must be 1 to 64 letters, digits, - or _`);
  let replicas = 1;
  let leaseMs = DEFAULT_LEASE_MS;
  for (const [key, value] of new URLSearchParams(query ?? '')) {
    if (key === 'replicas') {
      if (!/^[1-5]$/.test(value)) throw bad(`replicas=${value}: a number from 1 to 5`);
      replicas = Number(value);
    } else if (key === 'lease') {
      const seconds = Number(value);
      if (!/^[0-9]+(\.[0-9]+)?$/.test(value) || seconds < 1 || seconds > 3600) throw bad(`lease=${value}: seconds from 1 to 3600`);
      leaseMs = Math.round(seconds * 1000);
    } else {
      throw bad(`unknown parameter ${JSON.stringify(key)} (known: replicas, lease)`);
    }
  }
  return { servers, tls: scheme === 'tls', name, replicas, leaseMs, text };
}

/** Credentials and TLS files for the connection, by the NATS tools' variable names. */
export interface ReplicaCredentials {
  /** Contents of the `.creds` file named by `NATS_CREDS` (a user JWT and its NKey seed). */
  creds?: Uint8Array;
  /** From `NATS_TOKEN_FILE` (the file's first line), else `NATS_TOKEN`. */
  token?: string;
  user?: string;
  password?: string;
  /** `NATS_CA`, `NATS_CERT`, `NATS_KEY`: files for TLS (a client certificate needs both of the last two). */
  caFile?: string;
  certFile?: string;
  keyFile?: string;
}

/**
 * Reads the credentials the environment names.
 * @throws ShmfdError `ERR_REPLICA_CREDENTIALS` for a file that cannot be read, or an incomplete pair
 */
export function credentialsFromEnv(env: Environment): ReplicaCredentials {
  const read = (variable: string): Buffer => {
    const file = env[variable] as string;
    try {
      return fs.readFileSync(file);
    } catch (err) {
      throw new ShmfdError('ERR_REPLICA_CREDENTIALS', `${variable}=${file}: cannot read it: ${(err as Error).message}`, { cause: err });
    }
  };
  const has = (variable: string) => env[variable] !== undefined && env[variable] !== '';
  const found: ReplicaCredentials = {};
  if (has('NATS_CREDS')) found.creds = new Uint8Array(read('NATS_CREDS'));
  if (has('NATS_TOKEN_FILE')) found.token = read('NATS_TOKEN_FILE').toString('utf8').split('\n')[0]?.trim();
  else if (has('NATS_TOKEN')) found.token = env.NATS_TOKEN;
  if (has('NATS_USER') !== has('NATS_PASSWORD')) {
    throw new ShmfdError('ERR_REPLICA_CREDENTIALS', 'NATS_USER and NATS_PASSWORD go together: one is set without the other');
  }
  if (has('NATS_USER')) {
    found.user = env.NATS_USER;
    found.password = env.NATS_PASSWORD;
  }
  if (has('NATS_CERT') !== has('NATS_KEY')) {
    throw new ShmfdError('ERR_REPLICA_CREDENTIALS', 'NATS_CERT and NATS_KEY go together: one is set without the other');
  }
  for (const [variable, key] of [
    ['NATS_CA', 'caFile'],
    ['NATS_CERT', 'certFile'],
    ['NATS_KEY', 'keyFile'],
  ] as const) {
    if (has(variable)) {
      read(variable);
      found[key] = env[variable];
    }
  }
  return found;
}
