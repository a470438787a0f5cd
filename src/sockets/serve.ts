/**
 * A service lifecycle around a program's servers: tells the service manager when the
 * program is ready, reloading and stopping, and stops gracefully (no request in flight is
 * cut). This module is also the package's light entry `shmfd/serve`: it loads nothing but
 * Node's own modules, so a program can take over its stop signals before it loads the
 * rest of shmfd (koffi and libc take most of a start-up), and a restarter's SIGTERM in
 * that time is a graceful stop instead of the end of the process.
 * @module
 */
import { ServiceLifecycle, type ServeOptions, type Service } from './lifecycle.js';

export type { Endpoint, ServeOptions, Service } from './lifecycle.js';

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
  const lifecycle = new ServiceLifecycle(options);
  return {
    ready: lifecycle.ready,
    stopped: lifecycle.stopped,
    get stopping() {
      return lifecycle.stopping;
    },
    stop: () => lifecycle.stop(),
    reload: () => lifecycle.reload(),
  };
}
