/**
 * What the two wrappers, `shm-fd` and `shm-restore`, share: the `--first-fd` and
 * `--socket` options, the warning about Node-based restarters, and the one-line error.
 * @module
 */
import path from 'node:path';
import { DEFAULT_FIRST_FD, NODE_SAFE_FIRST_FD, readListenFds, type Environment } from '../fds/listen-fds.js';
import type { Log } from '../base/log.js';
import { Notifier } from '../fds/notify.js';
import type { PreparedSockets } from '../sockets/prepare.js';
import { describeError, isSystemError } from '../system/libc.js';
import { usageError } from './args.js';

/** Parses `--first-fd K` (3..65535); the default is 3. */
export function parseFirstFd(text: string | undefined): number {
  if (text === undefined) return DEFAULT_FIRST_FD;
  if (!/^[0-9]+$/.test(text) || Number(text) < 3 || Number(text) > 65535) {
    throw usageError(`--first-fd: ${JSON.stringify(text)} is not a descriptor number from 3 to 65535`);
  }
  return Number(text);
}

/**
 * Warns when COMMAND is a Node process that restarts its program (node --watch, nodemon)
 * and the descriptors start below {@link NODE_SAFE_FIRST_FD}: they would not reach the
 * program, whose socket would then accept connections nobody answers.
 */
export function warnIfNodeRestarter(command: string, args: readonly string[], first: number, log: Log): void {
  const base = path.basename(command);
  const nodeWatcher =
    base === 'nodemon' || (/^node(js)?$/.test(base) && args.some((a) => a === '--watch' || a.startsWith('--watch-path')));
  if (nodeWatcher && first < NODE_SAFE_FIRST_FD) {
    log.warn(
      `${base} is a Node process that restarts its program: descriptors below ${NODE_SAFE_FIRST_FD} do not reach the program; use --first-fd ${NODE_SAFE_FIRST_FD}`,
    );
  }
}

/**
 * The `-s/--socket` values of a wrapper that also passes a memory file named `memoryName`:
 * parsed, then given sockets by `prepareSockets` from the descriptors passed to this
 * process (as `env` describes them), new ones parked in the fd store of the service manager
 * that `env` names. Without values the socket modules (and `node:net`) are not loaded: the
 * passed descriptors are all there is.
 * @throws ShmfdError `ERR_SOCKET_SPEC`, `ERR_SOCKET_OPEN`, and the errors of `readListenFds`
 */
export async function prepareSocketOptions(texts: readonly string[], memoryName: string, env: Environment, log: Log): Promise<PreparedSockets> {
  const sockets =
    texts.length === 0 ? undefined : await Promise.all([import('../sockets/spec.js'), import('../sockets/prepare.js')]);
  const specs = sockets === undefined ? [] : sockets[0].parseSocketSpecs(texts, memoryName);
  const notifier = Notifier.fromEnv(env);
  try {
    const passed = readListenFds({ env });
    if (sockets === undefined) return { passed, opened: [] };
    return sockets[1].prepareSockets(specs, passed, { notifier, env, log });
  } finally {
    notifier?.close();
  }
}

/**
 * The one line a wrapper prints for the error that ends it, naming the thing and the
 * problem: a failed system call is named with what it was called on.
 */
export function failureLine(err: unknown): string {
  if (!isSystemError(err)) return describeError(err);
  const target = typeof err.path === 'string' ? err.path : undefined;
  if (err.syscall === 'sendmsg') {
    return `cannot reach the service manager at NOTIFY_SOCKET${target === undefined ? '' : `=${target}`}: ${describeError(err)}`;
  }
  return `${err.syscall}${target === undefined ? '' : ` ${target}`}: ${describeError(err)}`;
}
