/**
 * The program side: the service lifecycle that `serve()` runs around a program's
 * endpoints, as one object with a method per event: ready, a stop signal, a reload, the
 * end. Loads nothing but Node's own modules until there is a service manager to notify.
 * @module
 */
import type dgram from 'node:dgram';
import net from 'node:net';
import type { Notifier } from '../fds/notify.js';
import { closeDatagram, isBound, StreamDrain } from './drain.js';

/** Something the service serves on: a stream server or a datagram socket. */
export type Endpoint = net.Server | dgram.Socket;

/** Options of `serve()`. */
export interface ServeOptions {
  /** What to wait for before `READY=1`, and to close on stop. */
  endpoints: readonly Endpoint[];
  /**
   * The service manager (default: the one `$NOTIFY_SOCKET` names, as `Notifier.fromEnv()`
   * reads it, with an invalid value reported to `onNotifyError`); `null` sends nothing.
   */
  notifier?: Notifier | null;
  /** `STATUS=` sent with `READY=1`. */
  status?: string;
  /**
   * Reloads the configuration on SIGHUP, between `RELOADING=1` (+ `MONOTONIC_USEC`) and
   * `READY=1`, as `Type=notify-reload` expects; a promise it returns is awaited, any other
   * result ignored. Without it SIGHUP keeps Node's default.
   */
  reload?: () => unknown;
  /**
   * Runs after every endpoint is closed, before the process exits (e.g. flush state); a
   * promise it returns is awaited, any other result (`() => server.close()`) ignored.
   */
  onStop?: () => unknown;
  /** Signals that stop the service gracefully (default SIGTERM and SIGINT). */
  signals?: readonly NodeJS.Signals[];
  /** How long requests in flight may take once stopping, before their connections are cut (default 10 s). */
  graceMs?: number;
  /** How long a connection accepted before the stop may take to send its first request (default 1 s). */
  firstRequestMs?: number;
  /** Exit with status 0 once stopped (default true). */
  exit?: boolean;
  /** Where failures to notify the manager go (default: one line on stderr). */
  onNotifyError?: (err: unknown) => void;
}

/** A running service; see `serve()`. */
export interface Service {
  /**
   * Resolves once every endpoint listens and `READY=1` was sent. It never rejects: a
   * failed listen reaches the program where it listens, which may try again.
   */
  readonly ready: Promise<void>;
  /** Resolves once the service stopped (before the exit). */
  readonly stopped: Promise<void>;
  /** True from the first stop request on. */
  readonly stopping: boolean;
  /** Stops gracefully (what the stop signals do). */
  stop(): Promise<void>;
  /** Reloads (what SIGHUP does when `reload` is set). */
  reload(): Promise<void>;
}

function endpointReady(endpoint: Endpoint): Promise<void> {
  if (endpoint instanceof net.Server) {
    if (endpoint.listening) return Promise.resolve();
  } else if (isBound(endpoint)) {
    return Promise.resolve();
  }
  // A listen error is the program's to handle where it listens (it may well retry
  // elsewhere): here it would only be an unhandled rejection that ends the process.
  return new Promise((resolve) => endpoint.once('listening', () => resolve()));
}

/** Stop signals this close to the first are the same event delivered twice. */
const DUPLICATE_SIGNAL_MS = 250;

/** The notifier `options` asks for: given, none (`null`), or the one `$NOTIFY_SOCKET` names. */
function notifierFor(options: ServeOptions, onNotifyError: (err: unknown) => void): Promise<Notifier | undefined> {
  const address = process.env.NOTIFY_SOCKET;
  if (options.notifier !== undefined || address === undefined) return Promise.resolve(options.notifier ?? undefined);
  // notify.js loads koffi: only when there is a manager to notify, and after serve() has
  // returned with the stop signals handled.
  return import('../fds/notify.js')
    .then((m) => m.Notifier.fromEnv({ NOTIFY_SOCKET: address }))
    .catch((err: unknown) => {
      onNotifyError(err);
      return undefined;
    });
}

/** One service's lifecycle; `serve()` hands out its {@link Service} face. */
export class ServiceLifecycle {
  readonly ready: Promise<void>;
  readonly stopped: Promise<void>;
  readonly #options: ServeOptions;
  readonly #onNotifyError: (err: unknown) => void;
  readonly #notifier: Promise<Notifier | undefined>;
  readonly #drains: StreamDrain[] = [];
  readonly #datagrams: dgram.Socket[] = [];
  readonly #graceMs: number;
  readonly #firstRequestMs: number;
  readonly #signals: readonly NodeJS.Signals[];
  /** The notifications sent so far, in order, each once the notifier is there; never rejects. */
  #sent: Promise<void> = Promise.resolve();
  #stopping: Promise<void> | undefined;
  #firstSignal: { signal: NodeJS.Signals; at: number } | undefined;
  #settle: { resolve: () => void; reject: (err: unknown) => void } | undefined;
  #reloading: Promise<void> = Promise.resolve();

  constructor(options: ServeOptions) {
    this.#options = options;
    this.#onNotifyError =
      options.onNotifyError ??
      ((err: unknown) => process.stderr.write(`shmfd: cannot notify the service manager: ${(err as Error).message}\n`));
    this.#notifier = notifierFor(options, this.#onNotifyError);
    for (const e of options.endpoints) {
      if (e instanceof net.Server) this.#drains.push(new StreamDrain(e));
      else this.#datagrams.push(e);
    }
    this.#graceMs = options.graceMs ?? 10_000;
    this.#firstRequestMs = options.firstRequestMs ?? 1_000;
    this.#signals = options.signals ?? ['SIGTERM', 'SIGINT'];
    this.stopped = new Promise<void>((resolve, reject) => {
      this.#settle = { resolve, reject };
    });
    // Failures also reach whoever awaits stop(); an unobserved `stopped` must not crash.
    this.stopped.catch(() => undefined);
    this.ready = Promise.all(options.endpoints.map(endpointReady)).then(() => {
      if (this.#stopping === undefined) return this.#send((n) => n.ready(options.status));
    });
    for (const signal of this.#signals) process.on(signal, this.#onSignal);
    if (options.reload !== undefined) process.on('SIGHUP', this.#onHangup);
  }

  /** True from the first stop request on. */
  get stopping(): boolean {
    return this.#stopping !== undefined;
  }

  /** Stops gracefully; asked again, cuts the connections that are left. */
  stop(): Promise<void> {
    if (this.#stopping !== undefined) {
      for (const d of this.#drains) d.hurry();
      return this.#stopping;
    }
    void this.#send((n) => n.stopping());
    const stopping = this.#shutDown();
    this.#stopping = stopping;
    stopping.then(this.#settle?.resolve, this.#settle?.reject);
    if (this.#options.exit !== false) this.#exitAfter(stopping);
    return stopping;
  }

  /** Reloads between `RELOADING=1` and `READY=1`, one reload at a time, none once stopping. */
  reload(): Promise<void> {
    const run = this.#options.reload;
    if (run === undefined) return Promise.resolve();
    this.#reloading = this.#reloading.then(async () => {
      if (this.#stopping !== undefined) return;
      await this.#send((n) => n.reloading());
      let status: string | undefined;
      try {
        await run();
      } catch (err) {
        status = `reload failed: ${(err as Error).message}`;
      }
      await this.#send((n) => n.ready(status ?? this.#options.status));
    });
    return this.#reloading;
  }

  /** Drains and closes the endpoints, runs `onStop`, lets go of the notifier (and of the signals when `exit` is false). */
  async #shutDown(): Promise<void> {
    await Promise.all([...this.#drains.map((d) => d.drain(this.#graceMs, this.#firstRequestMs)), ...this.#datagrams.map(closeDatagram)]);
    await this.#options.onStop?.();
    // When the process ends with the stop, the handlers stay until it is gone: a stop
    // signal forwarded late (a parent relaying the group's) would otherwise kill it.
    if (this.#options.exit === false) this.#releaseSignals();
    await this.#sent;
    (await this.#notifier)?.close();
  }

  #exitAfter(stopping: Promise<void>): void {
    void stopping.then(
      () => {
        // Ctrl-C: end by SIGINT again (our handlers are gone), so that a shell loop
        // around the program stops too, as it does for any program Ctrl-C ends.
        if (this.#firstSignal?.signal === 'SIGINT') {
          this.#releaseSignals();
          process.kill(process.pid, 'SIGINT');
        } else {
          process.exit(0);
        }
      },
      (err: unknown) => {
        process.stderr.write(`shmfd: stopping failed: ${(err as Error).message}\n`);
        process.exit(1);
      },
    );
  }

  #releaseSignals(): void {
    for (const signal of this.#signals) process.off(signal, this.#onSignal);
    if (this.#options.reload !== undefined) process.off('SIGHUP', this.#onHangup);
  }

  #send(what: (n: Notifier) => void): Promise<void> {
    this.#sent = this.#sent.then(async () => {
      const n = await this.#notifier;
      if (n === undefined) return;
      try {
        what(n);
      } catch (err) {
        this.#onNotifyError(err);
      }
    });
    return this.#sent;
  }

  // The same stop signal often arrives twice within milliseconds: from the terminal (or
  // systemd's control-group kill) and again from a parent that forwards it, such as
  // shm-restore. Only a signal after that window means "hurry".
  readonly #onSignal = (signal: NodeJS.Signals): void => {
    const now = performance.now();
    if (this.#firstSignal !== undefined && now - this.#firstSignal.at < DUPLICATE_SIGNAL_MS) return;
    this.#firstSignal ??= { signal, at: now };
    void this.stop();
  };

  readonly #onHangup = (): void => {
    void this.reload();
  };
}
