/**
 * The wrapper side: opens the listening sockets that `-s/--socket` specs describe, before
 * the program starts, to pass them on as systemd-style descriptors, so that a restarted
 * program finds its socket still listening and no connection is refused in between.
 *
 * Sockets are made with libc (socket/setsockopt/bind/listen) rather than with `net.Server`,
 * so that libuv never owns them: they are close-on-exec until placed, blocking (as systemd
 * passes them by default), and nobody else's handle to close.
 * @module
 */
import fs from 'node:fs';
import { ShmfdError } from '../base/errors.js';
import * as sys from '../system/libc.js';
import type { SocketSpec } from './spec.js';

/**
 * The backlog asked for: systemd's default (SOMAXCONN); the kernel caps it at
 * net.core.somaxconn. While a program restarts, connections wait in this queue.
 */
export const SOCKET_BACKLOG = 4096;

/** An open socket, ready to be passed. */
export interface OpenSocket {
  spec: SocketSpec;
  fd: number;
  /** The bound address (with the port the kernel picked for port 0). */
  address: sys.SocketAddress;
}

const MESSAGES: Record<string, string> = {
  EADDRINUSE: 'the address is already in use',
  EACCES: 'permission denied',
  EADDRNOTAVAIL: 'the address is not available on this machine',
  EAFNOSUPPORT: 'the address family is not supported (is IPv6 disabled?)',
  ENOENT: 'the directory does not exist',
  EROFS: 'the file system is read-only',
  ENOTDIR: 'a component of the path is not a directory',
  EPERM: 'operation not permitted',
};

function openError(spec: SocketSpec, what: string, err: unknown): ShmfdError {
  const message = sys.isSystemError(err) ? MESSAGES[err.code] : undefined;
  const problem = message === undefined ? sys.describeError(err) : `${message} (${(err as { code: string }).code})`;
  return new ShmfdError('ERR_SOCKET_OPEN', `socket ${spec.text}: cannot ${what}: ${problem}`, { cause: err });
}

/**
 * Makes room for a unix socket at `path`: nothing there is fine; a socket file nobody
 * accepts on (left by a server that died) is removed; a live socket or anything that is
 * not a socket is an error, and is never touched.
 */
function clearStaleUnixSocket(spec: SocketSpec, path: string): void {
  let stat: fs.Stats;
  try {
    stat = fs.lstatSync(path);
  } catch (err) {
    if (sys.isSystemError(err, 'ENOENT')) return;
    throw openError(spec, `inspect ${path}`, err);
  }
  if (!stat.isSocket()) {
    throw new ShmfdError('ERR_SOCKET_OPEN', `socket ${spec.text}: ${path} exists and is not a socket (left untouched)`);
  }
  const probe = sys.socket(sys.AF_UNIX, sys.SOCK_STREAM, true);
  let refused = false;
  try {
    sys.connectSocket(probe, { family: 'unix', path });
  } catch (err) {
    refused = sys.isSystemError(err, 'ECONNREFUSED');
    // A full backlog answers EAGAIN: somebody is listening.
    if (!refused && !sys.isSystemError(err, 'EAGAIN')) throw openError(spec, `probe ${path}`, err);
  } finally {
    sys.close(probe);
  }
  if (!refused) throw new ShmfdError('ERR_SOCKET_OPEN', `socket ${spec.text}: a server is listening on ${path}`);
  try {
    fs.unlinkSync(path);
  } catch (err) {
    if (!sys.isSystemError(err, 'ENOENT')) throw openError(spec, `remove the stale socket ${path}`, err);
  }
}

/**
 * Opens the socket a spec describes: bound, listening for stream kinds (SO_REUSEADDR for
 * tcp), close-on-exec until it is placed for the program.
 * @throws ShmfdError `ERR_SOCKET_OPEN` with one line naming the socket and the problem
 */
export function openSocket(spec: SocketSpec): OpenSocket {
  const { address } = spec;
  const domain = address.family === 'unix' ? sys.AF_UNIX : address.family === 'ipv6' ? sys.AF_INET6 : sys.AF_INET;
  const type = spec.kind === 'udp' ? sys.SOCK_DGRAM : sys.SOCK_STREAM;
  if (address.family === 'unix' && !address.path.startsWith('@')) clearStaleUnixSocket(spec, address.path);
  let fd: number;
  try {
    fd = sys.socket(domain, type);
  } catch (err) {
    throw openError(spec, 'create the socket', err);
  }
  try {
    // Not for udp: there it would let a second program bind the same port unnoticed.
    if (type === sys.SOCK_STREAM && address.family !== 'unix') sys.setReuseAddress(fd);
    try {
      sys.bindSocket(fd, address);
    } catch (err) {
      throw openError(spec, `bind ${sys.describeSocketAddress(address)}`, err);
    }
    if (type === sys.SOCK_STREAM) sys.listen(fd, SOCKET_BACKLOG);
    return { spec, fd, address: sys.socketInfo(fd).address ?? address };
  } catch (err) {
    sys.close(fd);
    if (err instanceof ShmfdError) throw err;
    throw openError(spec, 'set the socket up', err);
  }
}
