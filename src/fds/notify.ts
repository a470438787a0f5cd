/**
 * A client of the service manager's notification socket (sd_notify(3)): readiness,
 * status, watchdog, and the file descriptor store (docs/fd-passing.md).
 * @module
 */
import { ShmfdError } from '../base/errors.js';
import type { Log } from '../base/log.js';
import { checkFdName, type Environment } from './listen-fds.js';
import * as sys from '../system/libc.js';

/** The largest notification datagram, as systemd reads it. */
export const MAX_MESSAGE_BYTES = 4096;

/** A notification: `KEY=VALUE` lines, given as an object or as ready-made text. */
export type NotifyState = string | Readonly<Record<string, string | number | bigint | boolean>>;

/**
 * Parses `NOTIFY_SOCKET`: `/path` or `@abstract`. As in libsystemd, an empty value is
 * invalid, not the same as an unset one: `sd_notify` returns -EINVAL for `""` as for `@`.
 * @throws ShmfdError `ERR_NOTIFY_UNSUPPORTED` for `vsock:` addresses, `ERR_NOTIFY_SOCKET_INVALID`
 *   for anything else that is not an address a unix datagram can be sent to (too long included)
 */
export function parseNotifySocket(value: string): string {
  const shown = `NOTIFY_SOCKET=${value === '' ? '""' : value}`;
  if (value.startsWith('vsock:')) {
    throw new ShmfdError('ERR_NOTIFY_UNSUPPORTED', `${shown}: vsock addresses are not supported`);
  }
  const invalid = (problem: string): ShmfdError => new ShmfdError('ERR_NOTIFY_SOCKET_INVALID', `${shown} ${problem}`);
  if (!(value.startsWith('/') || value.startsWith('@')) || value.length < 2) {
    throw invalid('is neither an absolute path nor an @abstract address (unset it to run without a service manager)');
  }
  const bytes = Buffer.byteLength(value.startsWith('@') ? value.slice(1) : value);
  if (bytes > sys.MAX_UNIX_ADDRESS_BYTES) {
    throw invalid(`is too long: ${bytes} bytes, a unix socket address holds at most ${sys.MAX_UNIX_ADDRESS_BYTES}`);
  }
  return value;
}

function encode(state: NotifyState): Buffer {
  let text: string;
  if (typeof state === 'string') {
    text = state;
  } else {
    text = Object.entries(state)
      .map(([key, value]) => {
        const v = typeof value === 'boolean' ? (value ? '1' : '0') : String(value);
        if (!/^[A-Z0-9_]+$/.test(key) || v.includes('\n')) {
          throw new ShmfdError('ERR_NOTIFY_MESSAGE', `invalid notification field ${JSON.stringify(`${key}=${v}`)}`);
        }
        return `${key}=${v}`;
      })
      .join('\n');
  }
  const bytes = Buffer.from(text);
  if (bytes.length === 0 || bytes.length > MAX_MESSAGE_BYTES) {
    throw new ShmfdError('ERR_NOTIFY_MESSAGE', `a notification must have 1..${MAX_MESSAGE_BYTES} bytes, not ${bytes.length}`);
  }
  return bytes;
}

/** Options of {@link Notifier.storeFds}. */
export interface StoreFdsOptions {
  /**
   * Let the manager poll the descriptors and drop them on EPOLLHUP/EPOLLERR (default true).
   * `false` sends `FDPOLL=0`, needed for descriptors that report hang-up while still useful.
   */
  poll?: boolean;
}

/**
 * Sends notifications to the service manager. One datagram per call; a manager that is
 * not listening makes the call throw (ECONNREFUSED, ENOENT), it never blocks for long.
 */
export class Notifier {
  /** The socket address, `/path` or `@abstract`. */
  readonly address: string;
  #fd: number | undefined;

  constructor(address: string) {
    this.address = parseNotifySocket(address);
  }

  /**
   * The notifier for `$NOTIFY_SOCKET`, or undefined when the process runs without a service
   * manager (the variable is unset). With `unsetEnv`, the variable is removed so children
   * don't notify in its name.
   * @throws ShmfdError the errors of {@link parseNotifySocket}, for an empty value too
   */
  static fromEnv(env: Environment = process.env, options: { unsetEnv?: boolean } = {}): Notifier | undefined {
    const value = env.NOTIFY_SOCKET;
    if (value === undefined) return undefined;
    const notifier = new Notifier(value);
    if (options.unsetEnv === true) delete env.NOTIFY_SOCKET;
    return notifier;
  }

  /** Sends one notification, with descriptors attached when given. */
  notify(state: NotifyState, fds: readonly number[] = []): void {
    const message = encode(state);
    if (fds.length > sys.MAX_FDS_PER_MESSAGE) {
      throw new ShmfdError('ERR_NOTIFY_MESSAGE', `at most ${sys.MAX_FDS_PER_MESSAGE} descriptors per notification`);
    }
    this.#fd ??= sys.socket(sys.AF_UNIX, sys.SOCK_DGRAM);
    sys.sendDatagram(this.#fd, this.address, message, fds);
  }

  /** `READY=1`, with a status line when given. */
  ready(status?: string): void {
    this.notify(status === undefined ? { READY: 1 } : { READY: 1, STATUS: status });
  }

  /** `RELOADING=1` with `MONOTONIC_USEC` (required by `Type=notify-reload`). */
  reloading(status?: string): void {
    const state: Record<string, string | number | bigint> = { RELOADING: 1, MONOTONIC_USEC: monotonicUsec() };
    if (status !== undefined) state.STATUS = status;
    this.notify(state);
  }

  /** `STOPPING=1`. */
  stopping(status?: string): void {
    this.notify(status === undefined ? { STOPPING: 1 } : { STOPPING: 1, STATUS: status });
  }

  /** `STATUS=text`: a one-line status shown by `systemctl status`. */
  status(text: string): void {
    this.notify({ STATUS: text });
  }

  /** `WATCHDOG=1`: keep-alive ping. */
  watchdog(): void {
    this.notify({ WATCHDOG: 1 });
  }

  /** `EXTEND_TIMEOUT_USEC`: ask for more time to start, reload or stop. */
  extendTimeout(usec: number | bigint): void {
    this.notify({ EXTEND_TIMEOUT_USEC: BigInt(usec) });
  }

  /** `MAINPID=pid`: name another process as the service's main process. */
  mainPid(pid: number): void {
    this.notify({ MAINPID: pid });
  }

  /**
   * `FDSTORE=1` + `FDNAME=name`: parks descriptors in the manager's store, from where they
   * come back in `LISTEN_FDS`/`LISTEN_FDNAMES` when the service starts again. Check
   * {@link fdStoreCapacity} first: a store that is not enabled drops them silently.
   */
  storeFds(name: string, fds: readonly number[], options: StoreFdsOptions = {}): void {
    const state: Record<string, string | number> = { FDSTORE: 1, FDNAME: checkFdName(name) };
    if (options.poll === false) state.FDPOLL = 0;
    this.notify(state, fds);
  }

  /** `FDSTOREREMOVE=1` + `FDNAME=name`: drops every stored descriptor of that name. */
  removeStoredFds(name: string): void {
    this.notify({ FDSTOREREMOVE: 1, FDNAME: checkFdName(name) });
  }

  /** Closes the sending socket (reopened on the next notification). */
  close(): void {
    if (this.#fd !== undefined) sys.close(this.#fd);
    this.#fd = undefined;
  }
}

function monotonicUsec(): bigint {
  // process.hrtime is CLOCK_MONOTONIC on Linux, the clock systemd compares against.
  return process.hrtime.bigint() / 1000n;
}

/**
 * The capacity of the service manager's descriptor store (`$FDSTORE`), or 0 when the store
 * is disabled (`FileDescriptorStoreMax=0`, the default) or the manager does not say.
 */
export function fdStoreCapacity(env: Environment = process.env): number {
  const n = Number(env.FDSTORE);
  return Number.isSafeInteger(n) && n > 0 ? n : 0;
}

/**
 * The warning to give before storing descriptors when `$FDSTORE` does not show an enabled
 * store, or undefined when it does. systemd sets `$FDSTORE` only from version 254 on, so
 * on older managers (Debian 12 has 252) the store may well be enabled: the line says so.
 * @param consequence what is lost if the store is disabled, and what to set
 */
export function fdStoreWarning(consequence: string, env: Environment = process.env): string | undefined {
  if (fdStoreCapacity(env) > 0) return undefined;
  if (env.FDSTORE !== undefined && env.FDSTORE !== '') {
    return `$FDSTORE is ${JSON.stringify(env.FDSTORE)}: the service manager's fd store is disabled and ${consequence}`;
  }
  return `$FDSTORE is not set: unless the service manager predates it (systemd < 254), its fd store is disabled and ${consequence}`;
}

/** Descriptors to park in the fd store under one name; see {@link storeInFdStore}. */
export interface FdStoreEntry {
  name: string;
  fds: readonly number[];
  /**
   * Drop what the store holds under the name first (`FDSTOREREMOVE=1`): the store keeps
   * every descriptor ever sent under a name, so replacing one means sending them all again.
   */
  replace?: boolean;
}

/** Options of {@link storeInFdStore}. */
export interface StoreInFdStoreOptions {
  /** What is lost if the store is disabled, and what to set: the end of the {@link fdStoreWarning}. */
  consequence: string;
  /** Names the manager (`NOTIFY_SOCKET`) and its store's capacity (`FDSTORE`) (default `process.env`). */
  env?: Environment;
  /** Send with this notifier, left open, instead of one for the manager `env` names. */
  notifier?: Notifier;
  /** Where the warning and one line per stored name go. */
  log?: Log;
  /** How the log names what is stored under a name (default: the name itself). */
  label?: (name: string) => string;
}

/**
 * Hands descriptors to the service manager's fd store, from where they come back in
 * `LISTEN_FDS` when the service starts again: warns first when `$FDSTORE` does not show an
 * enabled store, then sends each entry. Without a manager (`NOTIFY_SOCKET` unset) it sends
 * nothing and returns false.
 * @throws ShmfdError the errors of {@link parseNotifySocket}; SystemError when the manager
 *   cannot be reached (ENOENT, ECONNREFUSED)
 */
export function storeInFdStore(entries: readonly FdStoreEntry[], options: StoreInFdStoreOptions): boolean {
  const env = options.env ?? process.env;
  const notifier = options.notifier ?? Notifier.fromEnv(env);
  if (notifier === undefined) return false;
  try {
    const warning = fdStoreWarning(options.consequence, env);
    if (warning !== undefined) options.log?.warn(warning);
    for (const { name, fds, replace } of entries) {
      if (replace === true) notifier.removeStoredFds(name);
      notifier.storeFds(name, fds);
      options.log?.info(`stored ${options.label?.(name) ?? name} in the fd store of ${notifier.address}`);
    }
  } finally {
    if (options.notifier === undefined) notifier.close();
  }
  return true;
}

/**
 * The watchdog interval in microseconds (`$WATCHDOG_USEC`), when the manager expects pings
 * from this process (`$WATCHDOG_PID` absent or equal to its pid), else undefined.
 */
export function watchdogUsec(env: Environment = process.env, pid: number = process.pid): number | undefined {
  const usec = Number(env.WATCHDOG_USEC);
  if (!Number.isSafeInteger(usec) || usec <= 0) return undefined;
  if (env.WATCHDOG_PID !== undefined && Number(env.WATCHDOG_PID) !== pid) return undefined;
  return usec;
}

/** A running watchdog keep-alive; see {@link keepWatchdogFed}. */
export interface WatchdogKeeper {
  /** The ping interval in milliseconds. */
  readonly intervalMs: number;
  stop(): void;
}

/**
 * Sends `WATCHDOG=1` at half the interval the manager asks for, as sd_watchdog_enabled(3)
 * recommends. Returns undefined when no watchdog is configured. The timer does not keep
 * the event loop alive, and a loop that is stuck stops the pings, which is the point.
 */
export function keepWatchdogFed(notifier: Notifier, env: Environment = process.env): WatchdogKeeper | undefined {
  const usec = watchdogUsec(env);
  if (usec === undefined) return undefined;
  const intervalMs = Math.max(1, Math.floor(usec / 2000));
  notifier.watchdog();
  const timer = setInterval(() => notifier.watchdog(), intervalMs);
  timer.unref();
  return { intervalMs, stop: () => clearInterval(timer) };
}
