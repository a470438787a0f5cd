// Shared helpers of the tests: run the real CLIs as child processes, temp directories,
// a real AF_UNIX datagram receiver, and small assertions on error output.
import assert from 'node:assert/strict';
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import * as sys from '../dist/system/libc.js';

/** The repository root. */
export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
/** The node binary running the tests: children use the same one. */
export const NODE = process.execPath;
export const SHM_FD = path.join(ROOT, 'bin', 'shm-fd.js');
export const PRIMES = path.join(ROOT, 'examples', 'primes.js');
export const FIXTURES = path.join(ROOT, 'test', 'fixtures');
export const PYTHON = '/usr/bin/python3';

/** True when the tests run as root (needed by the systemd sandbox). */
export const isRoot = typeof process.getuid === 'function' && process.getuid() === 0;

/** The systemd test harness: a private `systemd --user` manager beside a command. */
export const SANDBOX = path.join(ROOT, 'test', 'systemd-sandbox.sh');

/** The environment of a run of {@link SANDBOX} keeping its files in `dir`. */
export function sandboxEnv(dir, timeoutSeconds = 100) {
  return { ...process.env, SANDBOX_DIR: dir, SANDBOX_TIMEOUT: String(timeoutSeconds), SANDBOX_NODE: NODE };
}

function accessible(file, mode) {
  try {
    fs.accessSync(file, mode);
    return true;
  } catch {
    return false;
  }
}

/** The cgroup hierarchies the sandbox's manager keeps its units in (see systemd-sandbox.sh). */
function cgroupHierarchies() {
  const CGROUP2_SUPER_MAGIC = 0x63677270;
  try {
    if (fs.statfsSync('/sys/fs/cgroup').type === CGROUP2_SUPER_MAGIC) return ['/sys/fs/cgroup'];
  } catch {
    return [];
  }
  return ['/sys/fs/cgroup/unified', '/sys/fs/cgroup/systemd'].filter((dir) => fs.existsSync(dir));
}

function systemdMissing() {
  if (!isRoot) return 'needs root: the systemd sandbox uses PID/mount namespaces and cgroups';
  if (!fs.existsSync('/usr/lib/systemd/systemd')) return 'needs systemd (/usr/lib/systemd/systemd)';
  if (!(process.env.PATH ?? '').split(':').some((dir) => accessible(path.join(dir, 'unshare'), fs.constants.X_OK))) return 'needs unshare (util-linux)';
  const hierarchies = cgroupHierarchies();
  if (hierarchies.length === 0 || !hierarchies.every((dir) => accessible(dir, fs.constants.W_OK))) return 'needs a writable cgroup file system under /sys/fs/cgroup';
  return false;
}

/** Why the systemd tests cannot run here, or false when they can (CI runs as root). */
export const systemdSkip = systemdMissing();

/** The command prefix that runs a command as nobody (uid and gid 65534, no groups). */
const AS_NOBODY = ['setpriv', '--reuid=65534', '--regid=65534', '--clear-groups'];

let nobodyReason;
/**
 * Why commands cannot run as nobody here, or false when they can: root is needed to
 * switch, nobody must be able to run NODE and to reach the temporary directory.
 */
export function nobodySkip() {
  if (nobodyReason !== undefined) return nobodyReason;
  if (!isRoot) return (nobodyReason = 'needs root to run a command as nobody');
  const probe = `require('fs').accessSync(require('os').tmpdir(), require('fs').constants.X_OK)`;
  const r = spawnSync(AS_NOBODY[0], [...AS_NOBODY.slice(1), NODE, '-e', probe], { encoding: 'utf8', cwd: '/' });
  if (r.error !== undefined) return (nobodyReason = `needs setpriv (util-linux) to run a command as nobody: ${r.error.message}`);
  nobodyReason = r.status === 0 ? false : `nobody cannot run ${NODE} or reach ${os.tmpdir()}: ${r.stderr.trim().split('\n')[0]}`;
  return nobodyReason;
}

/** The installed packages the CLIs load: the dependencies, theirs, and so on. */
function runtimePackages(manifest = path.join(ROOT, 'package.json'), found = new Set()) {
  const { dependencies = {}, optionalDependencies = {} } = JSON.parse(fs.readFileSync(manifest, 'utf8'));
  for (const name of Object.keys({ ...dependencies, ...optionalDependencies })) {
    const dir = path.join('node_modules', name);
    if (found.has(dir) || !fs.existsSync(path.join(ROOT, dir, 'package.json'))) continue;
    found.add(dir);
    runtimePackages(path.join(ROOT, dir, 'package.json'), found);
  }
  return found;
}

/**
 * A copy of what the CLIs run (bin/, dist/, package.json and the runtime packages: koffi
 * and its native part) that every user may read, in a new temporary directory removed
 * when `t` ends: the path to give another user, since the checkout itself may lie where
 * that user cannot read (a clone under /root, or in a `mktemp -d` directory). Returns the
 * root of the copy.
 */
export function readableCopy(t) {
  const copy = tempDir(t, 'shmfd-copy-');
  for (const part of ['package.json', 'bin', 'dist', ...runtimePackages()]) {
    fs.cpSync(path.join(ROOT, part), path.join(copy, part), { recursive: true });
  }
  // The checkout's own modes may shut others out (a clone made with umask 077).
  const open = (file) => {
    const stat = fs.statSync(file);
    fs.chmodSync(file, stat.isDirectory() || (stat.mode & 0o111) !== 0 ? 0o755 : 0o644);
    if (stat.isDirectory()) for (const name of fs.readdirSync(file)) open(path.join(file, name));
  };
  open(copy);
  return copy;
}

/** Path of a fixture in test/fixtures. */
export function fixture(name) {
  return path.join(FIXTURES, name);
}

/**
 * Runs a program and collects its output.
 * @param {string} command
 * @param {string[]} args
 * @param {object} [options]
 * @param {Record<string, string | undefined>} [options.env] the whole environment (default: process.env)
 * @param {Array<number | 'pipe' | 'ignore' | 'inherit' | null>} [options.extraFds] stdio entries 3, 4, ...
 * @param {string | Buffer} [options.input] written to stdin, which is then closed
 * @param {number} [options.timeoutMs] SIGKILL after this long (a guard against hangs, not an assertion)
 * @param {(child: import('node:child_process').ChildProcess) => void} [options.onSpawn]
 * @returns {Promise<{code: number | null, signal: string | null, stdout: string, stderr: string, pid: number}>}
 */
export function run(command, args, options = {}) {
  const env = Object.fromEntries(Object.entries(options.env ?? process.env).filter(([, v]) => v !== undefined));
  const child = spawn(command, args, {
    cwd: options.cwd ?? ROOT,
    env,
    stdio: ['pipe', 'pipe', 'pipe', ...(options.extraFds ?? [])],
  });
  const stdout = [];
  const stderr = [];
  child.stdout.on('data', (d) => stdout.push(d));
  child.stderr.on('data', (d) => stderr.push(d));
  child.stdin.on('error', () => {});
  child.stdin.end(options.input ?? '');
  const timer = setTimeout(() => child.kill('SIGKILL'), options.timeoutMs ?? 30_000);
  options.onSpawn?.(child);
  return new Promise((resolve, reject) => {
    child.on('error', reject);
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      resolve({
        code,
        signal,
        stdout: Buffer.concat(stdout).toString(),
        stderr: Buffer.concat(stderr).toString(),
        pid: child.pid,
      });
    });
  });
}

/** Runs `node bin/shm-fd.js ARGS...`. */
export function runShmFd(args, options = {}) {
  return run(NODE, [SHM_FD, ...args], options);
}

/** process.env without the variables that would change what shm-fd and the programs see. */
export function cleanEnv(updates = {}) {
  const env = { ...process.env };
  for (const key of Object.keys(env)) {
    if (/^(LISTEN_|NOTIFY_SOCKET$|FDSTORE$|WATCHDOG_|SHMFD_LOG$|NODE_OPTIONS$|NODE_TEST_CONTEXT$)/.test(key)) {
      delete env[key];
    }
  }
  for (const [key, value] of Object.entries(updates)) {
    if (value === undefined) delete env[key];
    else env[key] = value;
  }
  return env;
}

/** A new temporary directory, removed when the test `t` ends. */
export function tempDir(t, prefix = 'shmfd-test-') {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/**
 * Asserts that `stderr` is exactly one line of the form `PROGRAM: error: ...` matching
 * `pattern`, with nothing of a Node stack trace.
 */
export function assertOneErrorLine(stderr, pattern, program = 'shm-fd') {
  const lines = stderr.split('\n').filter((l) => l !== '');
  assert.equal(lines.length, 1, `expected one line on stderr, got:\n${stderr}`);
  assert.match(lines[0], new RegExp(`^${program}: error: `));
  assert.match(lines[0], pattern);
  assert.doesNotMatch(stderr, /\n\s+at |node:internal|Error:/);
}

/**
 * A datagram socket bound to `address` (`/path` or `@abstract`), non-blocking, for
 * receiving notifications. `receive()` returns the next datagram or undefined when none
 * is queued; `close()` closes the socket and every descriptor received.
 */
export function datagramReceiver(address) {
  const fd = sys.socket(sys.AF_UNIX, sys.SOCK_DGRAM);
  sys.bindSocket(fd, { family: 'unix', path: address });
  sys.setNonBlocking(fd, true);
  const received = [];
  return {
    fd,
    address,
    receive() {
      try {
        const message = sys.receiveDatagram(fd);
        received.push(...message.fds);
        return { text: message.data.toString(), fds: message.fds, truncatedFds: message.truncatedFds };
      } catch (err) {
        if (sys.isSystemError(err, 'EAGAIN')) return undefined;
        throw err;
      }
    },
    /** Waits (polling) until a datagram arrives; throws after `timeoutMs`. */
    async next(timeoutMs = 10_000) {
      const deadline = Date.now() + timeoutMs;
      for (;;) {
        const message = this.receive();
        if (message !== undefined) return message;
        if (Date.now() > deadline) throw new Error(`no datagram on ${address} within ${timeoutMs} ms`);
        await sleep(10);
      }
    },
    close() {
      for (const received_fd of received) {
        try {
          fs.closeSync(received_fd);
        } catch {
          // already closed by the test
        }
      }
      fs.closeSync(fd);
    },
  };
}

/** Whether the shell finds `name` (a test that needs it is skipped, with the reason, when not). */
export function commandExists(name) {
  try {
    execFileSync('sh', ['-c', `command -v ${name}`], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

export function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/**
 * Polls `check` every `intervalMs` until it returns a truthy value; throws after
 * `timeoutMs` (a guard, not an assertion on speed).
 */
export async function waitFor(check, timeoutMs = 20_000, what = 'condition', intervalMs = 20) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(intervalMs);
  }
}

/** A unique abstract socket address for this test process. */
export function abstractAddress(tag) {
  return `@shmfd-test-${tag}-${process.pid}-${Math.random().toString(36).slice(2)}`;
}

/** The `generated N more primes, total T` totals printed by examples/primes.js, in order. */
export function primeTotals(stdout) {
  return [...stdout.matchAll(/^generated \d+ more primes, total (\d+)$/gm)].map((m) => Number(m[1]));
}

/** A seeded pseudo-random source (mulberry32): `next()` in [0, 1), `int(lo, hi)` in [lo, hi]. */
export function seededRandom(seed) {
  let a = seed >>> 0;
  const next = () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  return { next, int: (lo, hi) => lo + Math.floor(next() * (hi - lo + 1)) };
}
