/**
 * The wrapper side, first step: `-s/--socket` values in systemfd's syntax,
 * `[NAME=][KIND::]ADDR`, where KIND is `tcp`, `http`, `https` (both tcp, logged as URLs),
 * `udp` or `unix`, parsed into what to open; and how such a socket is named in logs.
 * @module
 */
import net from 'node:net';
import { ShmfdError } from '../base/errors.js';
import { checkFdName } from '../fds/listen-fds.js';
import * as sys from '../system/libc.js';

/** The socket kinds of systemfd. `http` and `https` are tcp listeners with a URL in the logs. */
export type SocketKind = 'tcp' | 'http' | 'https' | 'udp' | 'unix';

const KINDS: readonly SocketKind[] = ['tcp', 'http', 'https', 'udp', 'unix'];

/** The host a bare port binds to, as in systemfd: loopback only. */
export const DEFAULT_SOCKET_HOST = '127.0.0.1';

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
