/**
 * The program side, at a stop: draining a server's connections so that no request in
 * flight is cut, and closing datagram sockets. Loads nothing but Node's own modules (it
 * is part of the light entry `shmfd/serve`).
 * @module
 */
import type dgram from 'node:dgram';
import type http from 'node:http';
import net from 'node:net';
import type tls from 'node:tls';

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
export class StreamDrain {
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

  /** Stops accepting and resolves once the connections are done, or were cut after `graceMs`. */
  drain(graceMs: number, firstRequestMs: number): Promise<void> {
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
    // closed (connections accepted before the drain began, of a plain net.Server) is
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
    // Also those accepted before the drain was set up, which #raw never saw.
    if (isHttpServer(this.#server)) this.#server.closeAllConnections();
  }

  /** A second stop signal: no more waiting. */
  hurry(): void {
    this.#cutAll();
  }
}

/** True once a datagram socket is bound (dgram has no property for it). */
export function isBound(socket: dgram.Socket): boolean {
  try {
    socket.address();
    return true;
  } catch {
    return false;
  }
}

/** Closes a datagram socket; one never bound has nothing to close. */
export function closeDatagram(socket: dgram.Socket): Promise<void> {
  return new Promise((resolve) => (isBound(socket) ? socket.close(() => resolve()) : resolve()));
}
