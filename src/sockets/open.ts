/**
 * Listening sockets for the wrappers, with systemfd's syntax: `[NAME=][KIND::]ADDR`, where
 * KIND is `tcp`, `http`, `https` (both tcp, logged as URLs), `udp` or `unix`. The wrapper
 * opens them before the program starts and passes them on as systemd-style descriptors,
 * so that a restarted program finds its socket still listening and no connection is
 * refused in between.
 *
 * Sockets are made with libc (socket/setsockopt/bind/listen) rather than with `net.Server`,
 * so that libuv never owns them: they are close-on-exec until placed, blocking (as systemd
 * passes them by default), and nobody else's handle to close.
 * @module
 */
import fs from 'node:fs';
import net from 'node:net';
import { ShmfdError } from '../base/errors.js';
import type { Log } from '../base/log.js';
import { checkFdName, type Environment, type PassedFd } from '../fds/listen-fds.js';
import { storeInFdStore, type Notifier } from '../fds/notify.js';
import * as sys from '../system/libc.js';

/** The socket kinds of systemfd. `http` and `https` are tcp listeners with a URL in the logs. */
export type SocketKind = 'tcp' | 'http' | 'https' | 'udp' | 'unix';

const KINDS: readonly SocketKind[] = ['tcp', 'http', 'https', 'udp', 'unix'];

/** The host a bare port binds to, as in systemfd: loopback only. */
export const DEFAULT_SOCKET_HOST = '127.0.0.1';

/**
 * The backlog asked for: systemd's default (SOMAXCONN); the kernel caps it at
 * net.core.somaxconn. While a program restarts, connections wait in this queue.
 */
export const SOCKET_BACKLOG = 4096;

/** A parsed `-s/--socket` value. */
export interface SocketSpec {
  /** The descriptor name (`LISTEN_FDNAMES`): `NAME=` or, by default, the kind. */
  name: string;
  kind: SocketKind;
  /** Where to bind; port 0 lets the kernel pick one. */
  address: sys.SocketAddress;
  /** The text as given, for messages. */
  text: string;
}

/** An open socket, ready to be passed. */
export interface OpenSocket {
  spec: SocketSpec;
  fd: number;
  /** The bound address (with the port the kernel picked for port 0). */
  address: sys.SocketAddress;
}

function specError(text: string, problem: string): ShmfdError {
  return new ShmfdError('ERR_SOCKET_SPEC', `invalid socket ${JSON.stringify(text)}: ${problem}`);
}

function parsePort(text: string, value: string): number {
  if (!/^[0-9]{1,5}$/.test(value) || Number(value) > 65535) {
    throw specError(text, `${JSON.stringify(value)} is not a port number (0..65535)`);
  }
  return Number(value);
}

/** `PORT`, `IPV4:PORT` or `[IPV6]:PORT`; undefined when `value` has none of these shapes. */
function parseInet(text: string, value: string): sys.SocketAddress | undefined {
  if (/^[0-9]+$/.test(value)) return { family: 'ipv4', address: DEFAULT_SOCKET_HOST, port: parsePort(text, value) };
  const v6 = /^\[([^\]]*)\]:([^:]*)$/.exec(value);
  if (v6 !== null) {
    const host = v6[1] as string;
    if (!net.isIPv6(host)) throw specError(text, `${JSON.stringify(host)} is not an IPv6 address`);
    return { family: 'ipv6', address: host, port: parsePort(text, v6[2] as string) };
  }
  const v4 = /^([^:[\]]*):([^:]*)$/.exec(value);
  if (v4 !== null) {
    const host = v4[1] as string;
    if (!net.isIPv4(host)) {
      throw specError(text, `${JSON.stringify(host)} is not an IP address (host names are not resolved; IPv6 goes in brackets: [::1]:8080)`);
    }
    return { family: 'ipv4', address: host, port: parsePort(text, v4[2] as string) };
  }
  return undefined;
}

/**
 * Parses `[NAME=][KIND::]ADDR` (systemfd's `[TYPE::]VALUE` plus a descriptor name):
 * - `tcp::8080`, `http::127.0.0.1:8080`, `https::[::1]:8443`, `udp::5353`: a bare port binds
 *   to 127.0.0.1, like systemfd; port 0 picks a free port;
 * - `unix::/run/app.sock` (stream; `unix::@name` for the abstract namespace);
 * - without KIND: a port or `HOST:PORT` is tcp, a value with a `/` is unix;
 * - `NAME=` sets the descriptor name (default: the kind), checked like every `LISTEN_FDNAMES`
 *   entry, and without `/` (text with a `/` before the `=` is a path).
 * @throws ShmfdError `ERR_SOCKET_SPEC`
 */
export function parseSocketSpec(text: string): SocketSpec {
  let rest = text;
  let name: string | undefined;
  // A name holds no ':' and (here) no '/', so an '=' after either belongs to the address
  // (a path such as /srv/a=b.sock).
  const named = /^([^:=/]*)=(.*)$/s.exec(text);
  if (named !== null) {
    name = named[1] as string;
    rest = named[2] as string;
    try {
      checkFdName(name);
    } catch (err) {
      throw specError(text, (err as Error).message);
    }
  }
  const kinded = /^([a-zA-Z]+)::(.*)$/s.exec(rest);
  let kind: SocketKind;
  let value: string;
  if (kinded !== null) {
    const given = (kinded[1] as string).toLowerCase();
    if (!(KINDS as readonly string[]).includes(given)) {
      throw specError(text, `unknown socket kind ${JSON.stringify(kinded[1])} (use ${KINDS.join(', ')})`);
    }
    kind = given as SocketKind;
    value = kinded[2] as string;
  } else {
    value = rest;
    if (parseInet(text, value) !== undefined) kind = 'tcp';
    else if (value.includes('/')) kind = 'unix';
    else throw specError(text, 'give a port, HOST:PORT or a path, or an explicit kind (tcp::, http::, https::, udp::, unix::)');
  }
  if (value === '') throw specError(text, 'the address is empty');
  let address: sys.SocketAddress;
  if (kind === 'unix') {
    const bytes = Buffer.byteLength(value);
    if (bytes > sys.MAX_UNIX_ADDRESS_BYTES) throw specError(text, `a unix socket path has at most ${sys.MAX_UNIX_ADDRESS_BYTES} bytes, not ${bytes}`);
    if (value.includes('\0')) throw specError(text, 'a unix socket path cannot contain NUL');
    address = { family: 'unix', path: value };
  } else {
    const inet = parseInet(text, value);
    if (inet === undefined) throw specError(text, `${JSON.stringify(value)} is not PORT, IP:PORT or [IPV6]:PORT`);
    address = inet;
  }
  return { name: name ?? kind, kind, address, text };
}

/**
 * How a socket is shown in logs: a URL for http/https, else the address and the kind;
 * with `name`, the descriptor name too (`http://127.0.0.1:8080 (socket http)`,
 * `127.0.0.1:7000 (tcp socket raw)`).
 */
export function describeSocket(kind: SocketKind, address: sys.SocketAddress, name?: string): string {
  const url = kind === 'http' || kind === 'https';
  const where = sys.describeSocketAddress(address, url ? kind : undefined);
  const socket = name === undefined ? '' : `socket ${name}`;
  if (url) return `${where}${socket === '' ? '' : ` (${socket})`}`;
  return `${where} (${kind === 'unix' ? 'unix stream' : kind}${socket === '' ? '' : ` ${socket}`})`;
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

/**
 * True when `fd` is a socket that fits `spec`: same family and type, listening for stream
 * kinds, bound to the same address (any port when the spec asks for port 0). A wrapper
 * restarted by systemd finds its sockets in the fd store and reuses those that fit.
 */
export function socketFitsSpec(fd: number, spec: SocketSpec): boolean {
  let info: sys.SocketInfo;
  try {
    info = sys.socketInfo(fd);
  } catch {
    return false;
  }
  const wanted = spec.address;
  const type = spec.kind === 'udp' ? 'datagram' : 'stream';
  if (info.family !== wanted.family || info.type !== type || info.address === undefined) return false;
  if (type === 'stream' && !info.listening) return false;
  const actual = info.address;
  if (wanted.family === 'unix' || actual.family === 'unix') {
    return wanted.family === 'unix' && actual.family === 'unix' && wanted.path === actual.path;
  }
  const port = wanted.port === 0 ? actual.port : wanted.port;
  return sys.encodeSocketAddress({ ...wanted, port }).equals(sys.encodeSocketAddress(actual));
}

/** Options of {@link prepareSockets}. */
export interface PrepareSocketsOptions {
  /** The service manager: new sockets are parked in its fd store (`FDSTORE=1`). */
  notifier?: Notifier | undefined;
  /** Tells whether the fd store is enabled (`FDSTORE`) (default `process.env`). */
  env?: Environment;
  /** Where it reports what it did. */
  log?: Log;
}

/** The outcome of {@link prepareSockets}. */
export interface PreparedSockets {
  /**
   * The passed descriptors, to pass on as they are: those that fit a spec were reused, and
   * those of a spec's name that did not fit now hold the new socket, at the same number.
   */
  passed: PassedFd[];
  /** Newly opened sockets, to append after `passed`. */
  opened: PassedFd[];
}

/**
 * Gives every spec a socket: a passed descriptor of the same name that fits it (from
 * systemd's fd store or a socket unit) is reused where it is; a passed one of that name
 * that does not fit (the address changed) is replaced in place, with a warning; otherwise
 * a socket is opened, to be appended. Under a service manager, sockets opened here are
 * parked in the fd store, so that the next start of the service gets them back and no
 * connection is refused in between.
 * On failure, every socket opened so far is closed and the error is thrown.
 */
export function prepareSockets(
  specs: readonly SocketSpec[],
  passed: readonly PassedFd[],
  options: PrepareSocketsOptions = {},
): PreparedSockets {
  const log = options.log;
  const claimed = new Set<PassedFd>();
  const misfits: { passed: PassedFd; open: OpenSocket }[] = [];
  const opened: OpenSocket[] = [];
  const names = [...new Set(specs.map((s) => s.name))];
  try {
    for (const name of names) {
      const candidates = passed.filter((p) => p.name === name);
      const group = specs.filter((s) => s.name === name);
      const unfit: SocketSpec[] = [];
      for (const spec of group) {
        const fit = candidates.find((c) => !claimed.has(c) && socketFitsSpec(c.fd, spec));
        if (fit === undefined) {
          unfit.push(spec);
          continue;
        }
        claimed.add(fit);
        log?.info(`using the passed socket ${name} (fd ${fit.fd}) for ${spec.text}`);
      }
      for (const spec of unfit) {
        const misfit = candidates.find((c) => !claimed.has(c));
        let open: OpenSocket;
        try {
          open = openSocket(spec);
        } catch (err) {
          // The stale socket may hold the very port (127.0.0.1:P, now 0.0.0.0:P): it is
          // given up anyway, so let go of it first, here and in the fd store, and bind again.
          // Its number stays reserved (on /dev/null) for the new socket.
          if (misfit === undefined || !(err instanceof ShmfdError && sys.isSystemError(err.cause, 'EADDRINUSE'))) throw err;
          options.notifier?.removeStoredFds(name);
          const placeholder = fs.openSync('/dev/null', 'r');
          sys.dup2(placeholder, misfit.fd, true);
          fs.closeSync(placeholder);
          open = openSocket(spec);
        }
        log?.info(`listening on ${describeSocket(spec.kind, open.address, name)}`);
        if (misfit === undefined) {
          opened.push(open);
          continue;
        }
        claimed.add(misfit);
        misfits.push({ passed: misfit, open });
        log?.warn(`the passed socket ${name} (fd ${misfit.fd}) does not fit --socket ${spec.text}: replaced by the new one`);
      }
    }
  } catch (err) {
    for (const o of [...opened, ...misfits.map((m) => m.open)]) sys.close(o.fd);
    throw err;
  }
  // Same number, same position in LISTEN_FDNAMES: whoever reads the passed ones again sees the new socket.
  for (const m of misfits) {
    sys.dup2(m.open.fd, m.passed.fd, true);
    sys.close(m.open.fd);
  }
  if (options.notifier !== undefined && opened.length + misfits.length > 0) {
    const entries = names
      .map((name) => {
        const fresh = opened.filter((o) => o.spec.name === name).map((o) => o.fd);
        // A replaced socket's name is stored anew, with the passed sockets it still has.
        const replace = misfits.some((m) => m.passed.name === name);
        return { name, replace, fds: replace ? [...[...claimed].filter((c) => c.name === name).map((c) => c.fd), ...fresh] : fresh };
      })
      .filter((entry) => entry.fds.length > 0);
    storeInFdStore(entries, {
      consequence: 'sockets are opened anew on every start (connections are refused meanwhile); set FileDescriptorStoreMax= to 2 or more',
      notifier: options.notifier,
      env: options.env,
      log,
      label: (name) => `socket ${name}`,
    });
  }
  return { passed: [...passed], opened: opened.map((o) => ({ fd: o.fd, name: o.spec.name })) };
}

/**
 * The `-s/--socket` values of a wrapper that also passes a descriptor named `reserved` (its
 * memory file), parsed; no socket may take that name.
 * @throws ShmfdError `ERR_SOCKET_SPEC`
 */
export function parseSocketSpecs(texts: readonly string[], reserved: string): SocketSpec[] {
  const specs = texts.map(parseSocketSpec);
  const taken = specs.find((s) => s.name === reserved);
  if (taken !== undefined) throw specError(taken.text, `${reserved} is the memory file's name`);
  return specs;
}
