/**
 * The program side of passed sockets: listen on the socket a wrapper or systemd passed
 * (by name), or on an address of one's own when run alone, so the same program works in
 * every setting; and a service lifecycle that tells the service manager when the program
 * is ready, reloading and stopping, and stops gracefully (no request in flight is cut).
 * @module
 */
import dgram from 'node:dgram';
import http from 'node:http';
import https from 'node:https';
import net from 'node:net';
import tls from 'node:tls';
import { ShmfdError } from './errors.js';
import { findListenFd, NODE_SAFE_FIRST_FD, type Environment } from './listen-fds.js';
import { Notifier } from './notify.js';
import { SOCKET_BACKLOG } from './sockets.js';
import * as sys from './system.js';

/** A socket passed under a name, and what it is. */
export interface PassedSocket {
  fd: number;
  name: string;
  info: sys.SocketInfo;
}

/** Options of {@link findPassedSocket}. */
export interface FindPassedSocketOptions {
  /** The environment to read (default `process.env`). */
  env?: Environment;
}

/**
 * The socket passed under `name`, or undefined when there is none (no `LISTEN_FDS`, no such
 * name, or descriptors meant for another process).
 * @throws ShmfdError `ERR_NOT_A_SOCKET` when the descriptor of that name is no socket, and
 *   the errors of `readListenFds` for a malformed environment
 */
export function findPassedSocket(name: string, options: FindPassedSocketOptions = {}): PassedSocket | undefined {
  const env = options.env ?? process.env;
  const passed = findListenFd(name, { env });
  if (passed === undefined) return undefined;
  try {
    return { fd: passed.fd, name, info: sys.socketInfo(passed.fd) };
  } catch (err) {
    throw new ShmfdError('ERR_NOT_A_SOCKET', `the descriptor ${name} (fd ${passed.fd}) is not a socket`, { cause: err });
  }
}

/** Where to listen when no socket was passed: a port, a unix path, or `net.ListenOptions`. */
export type FallbackAddress = number | string | net.ListenOptions;

/** Options of {@link listenOn}. */
export interface ListenOnOptions {
  /** The descriptor name of the passed socket (default `http`). */
  name?: string;
  /** Where to listen when no socket of that name was passed; without it, that is an error. */
  fallback?: FallbackAddress;
  /** The environment to read (default `process.env`). */
  env?: Environment;
  /** Accept-queue length passed to listen(2) (default: Node's, 511). */
  backlog?: number;
}

/** Where a server listens, from {@link listenOn}. */
export interface Listening {
  /** True when the socket was passed in, false when the server bound the fallback itself. */
  passed: boolean;
  /** The passed descriptor, when `passed`. */
  fd: number | undefined;
  /** The descriptor name looked for. */
  name: string;
  /** For people: `http://127.0.0.1:8080`, `127.0.0.1:7000` or a unix path. */
  url: string;
}

function describeServer(server: net.Server, passed?: sys.SocketAddress): string {
  const address = server.address();
  // Node knows no address for a unix socket it adopted; the kernel does.
  if (address === null || address === '') return passed === undefined ? '' : sys.describeSocketAddress(passed);
  if (typeof address === 'string') return address;
  const host = address.family === 'IPv6' ? `[${address.address}]` : address.address;
  const scheme = server instanceof https.Server ? 'https://' : server instanceof http.Server ? 'http://' : '';
  return `${scheme}${host}:${address.port}`;
}

function whenListening(server: net.Server, start: () => void): Promise<void> {
  return new Promise((resolve, reject) => {
    const onError = (err: Error): void => {
      server.off('listening', onListening);
      reject(err);
    };
    const onListening = (): void => {
      server.off('error', onError);
      resolve();
    };
    server.once('error', onError);
    server.once('listening', onListening);
    start();
  });
}

/**
 * A passed stream socket that does not listen is a connection, not a server socket: Node
 * would call listen(2) on it and fail with a bare `EEXIST` or `EINVAL` later. The usual one
 * is the IPC channel node --watch and nodemon keep at fd 3 of their program, where the
 * wrapper's own descriptors were before Node hid them.
 */
function notListening(passed: PassedSocket): ShmfdError {
  const { family } = passed.info;
  const kind = family === 'unix' ? 'unix stream' : family === 'other' ? 'stream' : 'TCP';
  return new ShmfdError(
    'ERR_SOCKET_NOT_LISTENING',
    `the socket ${passed.name} (fd ${passed.fd}) is a ${kind} socket that is not listening: behind node --watch or nodemon, ` +
      `pass --first-fd ${NODE_SAFE_FIRST_FD} to shm-fd or shm-restore (Node keeps the descriptors below ${NODE_SAFE_FIRST_FD} from its program); ` +
      'otherwise pass a listening socket under that name',
  );
}

/**
 * Makes `server` (a `net.Server`, `http.Server`, `https.Server`...) listen on the stream
 * socket passed under `options.name`, or on `options.fallback` when none was passed.
 * @throws ShmfdError `ERR_SOCKET_KIND` when the passed socket is not a stream socket,
 *   `ERR_SOCKET_NOT_LISTENING` when it is one that does not listen (a connection),
 *   `ERR_FD_NOT_PASSED` when nothing was passed and there is no fallback; the server's
 *   listen errors (EADDRINUSE...) for the fallback
 */
export async function listenOn(server: net.Server, options: ListenOnOptions = {}): Promise<Listening> {
  const name = options.name ?? 'http';
  const passed = findPassedSocket(name, { env: options.env });
  const backlog = options.backlog;
  if (passed !== undefined) {
    if (passed.info.type !== 'stream') {
      throw new ShmfdError(
        'ERR_SOCKET_KIND',
        `the socket ${name} (fd ${passed.fd}) is a ${passed.info.type} socket, not a stream socket to listen on`,
      );
    }
    if (!passed.info.listening) throw notListening(passed);
    // Node adopts the descriptor (uv_tcp_open/uv_pipe_open) and calls listen(2) again,
    // which on an already listening socket only sets the backlog: keep the wrapper's deep
    // queue (Node's default is 511), which holds the connections of a restart.
    await whenListening(server, () => server.listen({ fd: passed.fd, backlog: backlog ?? SOCKET_BACKLOG }));
    return { passed: true, fd: passed.fd, name, url: describeServer(server, passed.info.address) };
  }
  const fallback = options.fallback;
  if (fallback === undefined) {
    throw new ShmfdError('ERR_FD_NOT_PASSED', `no socket named ${name} was passed and no address to listen on was given`);
  }
  const listenOptions: net.ListenOptions =
    typeof fallback === 'number' ? { port: fallback } : typeof fallback === 'string' ? { path: fallback } : fallback;
  await whenListening(server, () => server.listen(backlog === undefined ? listenOptions : { backlog, ...listenOptions }));
  return { passed: false, fd: undefined, name, url: describeServer(server) };
}

/** Options of {@link openDatagram}. */
export interface OpenDatagramOptions {
  /** The descriptor name of the passed socket (default `udp`). */
  name?: string;
  /** Where to bind when no socket of that name was passed; without it, that is an error. */
  fallback?: { port: number; address?: string; type?: dgram.SocketType };
  /** The environment to read (default `process.env`). */
  env?: Environment;
}

/**
 * A bound `dgram.Socket` on the UDP socket passed under `options.name` (adopted with
 * `socket.bind({fd})`), or bound to `options.fallback`. Node's dgram has no unix datagram
 * sockets, so a passed `AF_UNIX` datagram socket is an error.
 * @throws ShmfdError `ERR_SOCKET_KIND`, `ERR_FD_NOT_PASSED`; bind errors for the fallback
 */
export async function openDatagram(options: OpenDatagramOptions = {}): Promise<dgram.Socket> {
  const name = options.name ?? 'udp';
  const passed = findPassedSocket(name, { env: options.env });
  let socket: dgram.Socket;
  let bind: (done: () => void) => void;
  if (passed !== undefined) {
    const { family, type } = passed.info;
    if (type !== 'datagram' || (family !== 'ipv4' && family !== 'ipv6')) {
      throw new ShmfdError(
        'ERR_SOCKET_KIND',
        `the socket ${name} (fd ${passed.fd}) is a ${family} ${type} socket; node:dgram takes only UDP sockets`,
      );
    }
    socket = dgram.createSocket(family === 'ipv6' ? 'udp6' : 'udp4');
    bind = (done) => socket.bind({ fd: passed.fd }, done);
  } else {
    const fallback = options.fallback;
    if (fallback === undefined) {
      throw new ShmfdError('ERR_FD_NOT_PASSED', `no socket named ${name} was passed and no address to bind was given`);
    }
    const address = fallback.address ?? '127.0.0.1';
    socket = dgram.createSocket(fallback.type ?? (net.isIPv6(address) ? 'udp6' : 'udp4'));
    bind = (done) => socket.bind({ port: fallback.port, address }, done);
  }
  await new Promise<void>((resolve, reject) => {
    socket.once('error', reject);
    bind(() => {
      socket.off('error', reject);
      resolve();
    });
  });
  return socket;
}

// ---------------------------------------------------------------- lifecycle

/** Something the service serves on: a stream server or a datagram socket. */
export type Endpoint = net.Server | dgram.Socket;

/** Options of {@link serve}. */
export interface ServeOptions {
  /** What to wait for before `READY=1`, and to close on stop. */
  endpoints: readonly Endpoint[];
  /** The service manager (default `Notifier.fromEnv()`); `null` sends nothing. */
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
    this.#http = server instanceof http.Server || server instanceof https.Server;
    server.on('connection', (socket: net.Socket) => {
      this.#raw.add(socket);
      socket.once('close', () => this.#raw.delete(socket));
    });
    if (!this.#http) return;
    const event = server instanceof tls.Server ? 'secureConnection' : 'connection';
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
    if (this.#server instanceof http.Server || this.#server instanceof https.Server) this.#server.closeAllConnections();
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
 */
export function serve(options: ServeOptions): Service {
  const notifier = options.notifier === undefined ? Notifier.fromEnv() : (options.notifier ?? undefined);
  const onNotifyError =
    options.onNotifyError ??
    ((err: unknown) => process.stderr.write(`shmfd: cannot notify the service manager: ${(err as Error).message}\n`));
  const send = (what: (n: Notifier) => void): void => {
    if (notifier === undefined) return;
    try {
      what(notifier);
    } catch (err) {
      onNotifyError(err);
    }
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
    if (stopping === undefined) send((n) => n.ready(options.status));
  });

  const stop = (): Promise<void> => {
    if (stopping !== undefined) {
      for (const s of stoppers) s.hurry();
      return stopping;
    }
    send((n) => n.stopping());
    stopping = (async () => {
      await Promise.all([
        ...stoppers.map((s) => s.stop(graceMs, firstRequestMs)),
        ...datagrams.map((d) => new Promise<void>((resolve) => (isBound(d) ? d.close(() => resolve()) : resolve()))),
      ]);
      await options.onStop?.();
      for (const signal of signals) process.off(signal, onSignal);
      if (options.reload !== undefined) process.off('SIGHUP', onHangup);
      notifier?.close();
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
      send((n) => n.reloading());
      let status: string | undefined;
      try {
        await run();
      } catch (err) {
        status = `reload failed: ${(err as Error).message}`;
      }
      send((n) => n.ready(status ?? options.status));
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
