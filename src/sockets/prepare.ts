/**
 * The wrapper side, on every start: gives each `-s/--socket` spec a socket, reusing those
 * passed in (from systemd's fd store or a socket unit) where they fit, and parks the new
 * ones in the fd store for the next start.
 * @module
 */
import fs from 'node:fs';
import { ShmfdError } from '../base/errors.js';
import type { Log } from '../base/log.js';
import type { Environment, PassedFd } from '../fds/listen-fds.js';
import { storeInFdStore, type Notifier } from '../fds/notify.js';
import * as sys from '../system/libc.js';
import { openSocket, type OpenSocket } from './open.js';
import { describeSocket, type SocketSpec } from './spec.js';

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
