/**
 * A service lifecycle around a program's servers: tells the service manager when the
 * program is ready, reloading and stopping, and stops gracefully (no request in flight is
 * cut). This module is also the package's light entry `shmfd/serve`: it loads nothing but
 * Node's own modules, so a program can take over its stop signals before it loads the
 * rest of shmfd (koffi and libc take most of a start-up), and a restarter's SIGTERM in
 * that time is a graceful stop instead of the end of the process.
 * @module
 */
import type dgram from 'node:dgram';
import type http from 'node:http';
import net from 'node:net';
import type tls from 'node:tls';
import type { Notifier } from '../fds/notify.js';

/** Something the service serves on: a stream server or a datagram socket. */
export type Endpoint = net.Server | dgram.Socket;

/** Options of {@link serve}. */
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
   * `READY=1`, as `Type=notify-reload` expects. Without it SIGHUP keeps Node's default.
   */
  reload?: () => void | Promise<void>;
  /** Runs after every endpoint is closed, before the process exits (e.g. flush state). */
  onStop?: () => void | Promise<void>;
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

/** A running service; see {@link serve}. */
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

// http, https and tls servers are told by what they have, not by instanceof: that would
// load node:https and node:tls, before the stop signals are handled, in programs that
// use neither.
function isHttpServer(server: net.Server): server is http.Server {
  return typeof (server as Partial<http.Server>).closeAllConnections === 'function';
}

function isTlsServer(server: net.Server): server is tls.Server {
  return typeof (server as Partial<tls.Server>).addContext === 'function';
}

interface ConnectionState {
  requests: number;
  active: number;
}

/**
 * How long a keep-alive connection that is idle at the stop may still bring its next
 * request (answered with `Connection: close`): a busy client sends it at once, an idle one
 * is closed after this. Closing it at once would reset a request already on its way, which
 * the handler would even have run.
 */
const IDLE_KEEP_ALIVE_MS = 200;

/** After the grace period, how long to wait for the cut connections to close before giving up on them. */
const CLOSE_WAIT_MS = 1_000;

/**
 * Graceful stop of one stream server. `http.Server#close` in Node 19+ also cuts connections
 * that have not sent a request yet, which includes connections accepted an instant before
 * the stop whose request is on its way: their clients would see a reset. Instead: stop
 * accepting (the socket stays open in the wrapper, the fd store or a sibling, so new
 * connections wait for the next program); let every request in flight finish, answered
 * with `Connection: close` where its headers are not out yet; give keep-alive connections
 * a moment for one more request, and fresh ones a moment for their first, answered the
 * same way; cut what is left after the grace period.
 */
class StreamStopper {
  readonly #server: net.Server;
  readonly #http: boolean;
  readonly #raw = new Set<net.Socket>();
  readonly #states = new Map<net.Socket, ConnectionState>();
  readonly #responses = new Set<http.ServerResponse>();
  #stopping = false;

  constructor(server: net.Server) {
    this.#server = server;
    this.#http = isHttpServer(server);
    server.on('connection', (socket: net.Socket) => {
      this.#raw.add(socket);
      socket.once('close', () => this.#raw.delete(socket));
    });
    if (!this.#http) return;
    const event = isTlsServer(server) ? 'secureConnection' : 'connection';
    server.on(event, (socket: net.Socket) => {
      this.#states.set(socket, { requests: 0, active: 0 });
      socket.once('close', () => this.#states.delete(socket));
    });
    server.prependListener('request', (req: http.IncomingMessage, res: http.ServerResponse) => {
      const socket = req.socket;
      const state = this.#states.get(socket);
      if (state !== undefined) {
        state.requests++;
        state.active++;
      }
      this.#responses.add(res);
      if (this.#stopping) res.shouldKeepAlive = false;
      res.once('close', () => {
        this.#responses.delete(res);
        if (state !== undefined) state.active--;
        // A response that went out with keep-alive before the stop: its client may reuse
        // the connection once more (Node closes those answered with Connection: close).
        if (this.#stopping && res.shouldKeepAlive && (state === undefined || state.active === 0)) {
          setTimeout(() => this.#destroyIfIdle(socket), IDLE_KEEP_ALIVE_MS).unref();
        }
      });
    });
  }

  stop(graceMs: number, firstRequestMs: number): Promise<void> {
    this.#stopping = true;
    const closed = new Promise<void>((resolve) => {
      // net.Server's close: stop accepting and wait for the connections, cutting none.
      if (this.#server.listening) {
        net.Server.prototype.close.call(this.#server, () => resolve());
      } else {
        // Stopped while still starting: whatever listens later is closed at once.
        this.#server.once('listening', () => net.Server.prototype.close.call(this.#server));
        resolve();
      }
    });
    const timers: NodeJS.Timeout[] = [];
    if (this.#http) {
      for (const res of this.#responses) if (!res.headersSent) res.shouldKeepAlive = false;
      for (const [socket, state] of this.#states) {
        if (state.active > 0) continue;
        timers.push(setTimeout(() => this.#destroyIfIdle(socket), state.requests > 0 ? IDLE_KEEP_ALIVE_MS : firstRequestMs));
      }
    }
    // After the grace period what is left is cut; a server that still does not report
    // closed (connections accepted before serve() was called, of a plain net.Server) is
    // given up on.
    const givenUp = new Promise<void>((resolve) => {
      timers.push(
        setTimeout(() => {
          this.#cutAll();
          timers.push(setTimeout(resolve, CLOSE_WAIT_MS));
        }, graceMs),
      );
    });
    return Promise.race([closed, givenUp]).finally(() => timers.forEach(clearTimeout));
  }

  #destroyIfIdle(socket: net.Socket): void {
    const state = this.#states.get(socket);
    if (state !== undefined && state.active === 0) socket.destroy();
  }

  #cutAll(): void {
    for (const socket of this.#raw) socket.destroy();
    // Also those accepted before serve() was called, which #raw never saw.
    if (isHttpServer(this.#server)) this.#server.closeAllConnections();
  }

  /** A second stop signal: no more waiting. */
  hurry(): void {
    this.#cutAll();
  }
}

function isBound(socket: dgram.Socket): boolean {
  try {
    socket.address();
    return true;
  } catch {
    return false;
  }
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

/**
 * Runs the service lifecycle around `options.endpoints`:
 * - `READY=1` (with `STATUS=` when given) once every endpoint listens;
 * - on SIGTERM/SIGINT: `STOPPING=1`, stop accepting, finish the requests in flight
 *   (HTTP servers answer them with `Connection: close`), close the endpoints, run
 *   `onStop`, exit 0 (after SIGINT: end by SIGINT, as a shell expects of Ctrl-C); a
 *   second signal cuts the remaining connections (one within 250 ms of the first counts
 *   as the same signal delivered twice, e.g. by the terminal and a forwarding parent);
 * - with `reload`: on SIGHUP `RELOADING=1` + `MONOTONIC_USEC`, the reload, `READY=1`
 *   (`Type=notify-reload`).
 * Without a service manager nothing is sent and the rest works the same.
 *
 * The stop signals are handled from the moment serve() returns, also before the endpoints
 * listen: a stop then ends the program as above, and an endpoint that listens later is
 * closed at once. Call it first, from `shmfd/serve`, before `await import('shmfd')` and
 * the rest of the program's start-up.
 */
export function serve(options: ServeOptions): Service {
  const onNotifyError =
    options.onNotifyError ??
    ((err: unknown) => process.stderr.write(`shmfd: cannot notify the service manager: ${(err as Error).message}\n`));
  // notify.js loads koffi: only when there is a manager to notify, and after serve() has
  // returned with the stop signals handled.
  const address = process.env.NOTIFY_SOCKET;
  const notifier: Promise<Notifier | undefined> =
    options.notifier !== undefined || address === undefined
      ? Promise.resolve(options.notifier ?? undefined)
      : import('../fds/notify.js')
          .then((m) => m.Notifier.fromEnv({ NOTIFY_SOCKET: address }))
          .catch((err: unknown) => {
            onNotifyError(err);
            return undefined;
          });
  // In order, each once the notifier is there; never rejects.
  let sent: Promise<void> = Promise.resolve();
  const send = (what: (n: Notifier) => void): Promise<void> => {
    sent = sent.then(async () => {
      const n = await notifier;
      if (n === undefined) return;
      try {
        what(n);
      } catch (err) {
        onNotifyError(err);
      }
    });
    return sent;
  };
  const stoppers: StreamStopper[] = [];
  const datagrams: dgram.Socket[] = [];
  for (const e of options.endpoints) {
    if (e instanceof net.Server) stoppers.push(new StreamStopper(e));
    else datagrams.push(e);
  }
  const graceMs = options.graceMs ?? 10_000;
  const firstRequestMs = options.firstRequestMs ?? 1_000;
  const signals = options.signals ?? ['SIGTERM', 'SIGINT'];

  let stopping: Promise<void> | undefined;
  let firstSignal: { signal: NodeJS.Signals; at: number } | undefined;
  let settle: { resolve: () => void; reject: (err: unknown) => void } | undefined;
  const stopped = new Promise<void>((resolve, reject) => {
    settle = { resolve, reject };
  });
  // Failures also reach whoever awaits stop(); an unobserved `stopped` must not crash.
  stopped.catch(() => undefined);
  let reloading: Promise<void> = Promise.resolve();

  const ready = Promise.all(options.endpoints.map(endpointReady)).then(() => {
    if (stopping === undefined) return send((n) => n.ready(options.status));
  });

  const stop = (): Promise<void> => {
    if (stopping !== undefined) {
      for (const s of stoppers) s.hurry();
      return stopping;
    }
    void send((n) => n.stopping());
    stopping = (async () => {
      await Promise.all([
        ...stoppers.map((s) => s.stop(graceMs, firstRequestMs)),
        ...datagrams.map((d) => new Promise<void>((resolve) => (isBound(d) ? d.close(() => resolve()) : resolve()))),
      ]);
      await options.onStop?.();
      for (const signal of signals) process.off(signal, onSignal);
      if (options.reload !== undefined) process.off('SIGHUP', onHangup);
      await sent;
      (await notifier)?.close();
    })();
    stopping.then(settle?.resolve, settle?.reject);
    if (options.exit !== false) {
      void stopping.then(
        () => {
          // Ctrl-C: end by SIGINT again (our handlers are gone), so that a shell loop
          // around the program stops too, as it does for any program Ctrl-C ends.
          if (firstSignal?.signal === 'SIGINT') process.kill(process.pid, 'SIGINT');
          else process.exit(0);
        },
        (err: unknown) => {
          process.stderr.write(`shmfd: stopping failed: ${(err as Error).message}\n`);
          process.exit(1);
        },
      );
    }
    return stopping;
  };

  const reload = (): Promise<void> => {
    const run = options.reload;
    if (run === undefined) return Promise.resolve();
    reloading = reloading.then(async () => {
      if (stopping !== undefined) return;
      await send((n) => n.reloading());
      let status: string | undefined;
      try {
        await run();
      } catch (err) {
        status = `reload failed: ${(err as Error).message}`;
      }
      await send((n) => n.ready(status ?? options.status));
    });
    return reloading;
  };

  // The same stop signal often arrives twice within milliseconds: from the terminal (or
  // systemd's control-group kill) and again from a parent that forwards it, such as
  // shm-restore. Only a signal after that window means "hurry".
  const onSignal = (signal: NodeJS.Signals): void => {
    const now = performance.now();
    if (firstSignal !== undefined && now - firstSignal.at < DUPLICATE_SIGNAL_MS) return;
    firstSignal ??= { signal, at: now };
    void stop();
  };
  const onHangup = (): void => {
    void reload();
  };
  for (const signal of signals) process.on(signal, onSignal);
  if (options.reload !== undefined) process.on('SIGHUP', onHangup);

  return {
    ready,
    stopped,
    get stopping() {
      return stopping !== undefined;
    },
    stop,
    reload,
  };
}
