/**
 * The program side of passed sockets: listen on the socket a wrapper or systemd passed
 * (by name), or on an address of one's own when run alone, so the same program works in
 * every setting. The service lifecycle around them, `serve()`, is in serve.ts.
 * @module
 */
import type dgram from 'node:dgram';
import net from 'node:net';
import { ShmfdError } from '../base/errors.js';
import { findListenFd, NODE_SAFE_FIRST_FD, type Environment } from '../fds/listen-fds.js';
import { SOCKET_BACKLOG } from './open.js';
import { DEFAULT_SOCKET_HOST } from './spec.js';
import * as sys from '../system/libc.js';

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

async function describeServer(server: net.Server, passed?: sys.SocketAddress): Promise<string> {
  const address = server.address();
  // Node knows no address for a unix socket it adopted; the kernel does.
  if (address === null || address === '') return passed === undefined ? '' : sys.describeSocketAddress(passed);
  if (typeof address === 'string') return address;
  // Loaded here, not at the top: importing shmfd for a memory file must not load HTTP.
  const [{ default: http }, { default: https }] = await Promise.all([import('node:http'), import('node:https')]);
  const scheme = server instanceof https.Server ? 'https' : server instanceof http.Server ? 'http' : undefined;
  const family = address.family === 'IPv6' ? 'ipv6' : 'ipv4';
  return sys.describeSocketAddress({ family, address: address.address, port: address.port }, scheme);
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
    return { passed: true, fd: passed.fd, name, url: await describeServer(server, passed.info.address) };
  }
  const fallback = options.fallback;
  if (fallback === undefined) {
    throw new ShmfdError('ERR_FD_NOT_PASSED', `no socket named ${name} was passed and no address to listen on was given`);
  }
  const listenOptions: net.ListenOptions =
    typeof fallback === 'number' ? { port: fallback } : typeof fallback === 'string' ? { path: fallback } : fallback;
  await whenListening(server, () => server.listen(backlog === undefined ? listenOptions : { backlog, ...listenOptions }));
  return { passed: false, fd: undefined, name, url: await describeServer(server) };
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
  // Loaded here, not at the top, for the same reason as node:http above.
  const { createSocket } = await import('node:dgram');
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
    socket = createSocket(family === 'ipv6' ? 'udp6' : 'udp4');
    bind = (done) => socket.bind({ fd: passed.fd }, done);
  } else {
    const fallback = options.fallback;
    if (fallback === undefined) {
      throw new ShmfdError('ERR_FD_NOT_PASSED', `no socket named ${name} was passed and no address to bind was given`);
    }
    const address = fallback.address ?? DEFAULT_SOCKET_HOST;
    socket = createSocket(fallback.type ?? (net.isIPv6(address) ? 'udp6' : 'udp4'));
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
