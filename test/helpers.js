// Shared helpers of the tests: run programs (the real CLIs among them) as child processes
// and capture their output, wait for an event, temp directories, a real AF_UNIX datagram
// receiver, assertions on error output, and readers of the backups the fixtures write.
import assert from 'node:assert/strict';
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { after } from 'node:test';
import { fileURLToPath } from 'node:url';
import * as sys from '../dist/system/libc.js';
import { MemoryFile } from 'shmfd';
import { SnapshotFile } from 'shmfd/snapshot';

/** The repository root. */
export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
/** The node binary running the tests: children use the same one. */
export const NODE = process.execPath;
export const SHM_FD = path.join(ROOT, 'bin', 'shm-fd.js');
export const SHM_RESTORE = path.join(ROOT, 'bin', 'shm-restore.js');
export const PRIMES = path.join(ROOT, 'examples', 'primes.js');
export const FIXTURES = path.join(ROOT, 'test', 'fixtures');
export const PYTHON = '/usr/bin/python3';
/** The programs the shm-restore tests run: see the comments at the top of each. */
export const COUNTER = path.join(FIXTURES, 'restore-counter.js');
export const RAW = path.join(FIXTURES, 'restore-raw.js');
export const ENV = path.join(FIXTURES, 'restore-env.js');

/** Every process {@link start} started that has not ended yet: its kill function, its exit, its test. */
const running = new Map();

// A test file must end once its tests have: a process or handle left over (a test that
// timed out while its body went on starting hosts, say) would otherwise keep it alive, and
// the whole run would wait for it forever. So, in a test file, whatever is still running
// after the last test is killed, and a file still alive a minute later says what holds it
// and fails instead of hanging. (Fixture programs that import this module are not test files.)
if (/\.test\.js$/.test(process.argv[1] ?? '')) {
  after(() => {
    for (const { kill } of running.values()) kill('SIGKILL');
    setTimeout(() => {
      console.error(`# ${path.basename(process.argv[1])}: still running a minute after its last test, held by ${process.getActiveResourcesInfo().join(', ')}`);
      process.exit(1);
    }, 60_000).unref();
  });
}

/** True when the tests run as root (needed by the systemd sandbox). */
export const isRoot = typeof process.getuid === 'function' && process.getuid() === 0;

/** The systemd test harness: a private `systemd --user` manager beside a command. */
export const SANDBOX = path.join(ROOT, 'test', 'systemd-sandbox.sh');

/** The environment of a run of {@link SANDBOX} keeping its files in `dir`. */
export function sandboxEnv(dir, timeoutSeconds = 240) {
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
 * @typedef {object} RunOptions
 * @property {Record<string, string | undefined>} [env] the whole environment (default: {@link cleanEnv}())
 * @property {string} [cwd] default: the repository root
 * @property {Array<number | 'pipe' | 'ignore' | 'inherit' | null>} [extraFds] stdio entries 3, 4, ...
 * @property {string | Buffer} [input] written to stdin, which is then closed
 * @property {number} [timeoutMs] SIGKILL after this long (a guard against hangs, not an assertion)
 * @property {(child: import('node:child_process').ChildProcess) => void} [onSpawn]
 */

/** @typedef {{code: number | null, signal: NodeJS.Signals | null, stdout: string, stderr: string}} Ended */

/** @typedef {Ended & {pid: number}} RunResult */

/**
 * Runs a program to its end and collects its output.
 * @param {string} command
 * @param {readonly string[]} args
 * @param {RunOptions} [options]
 * @returns {Promise<RunResult>}
 */
export async function run(command, args, options = {}) {
  const started = start(command, args, { ...options, input: options.input ?? '', guardMs: options.timeoutMs ?? 120_000 });
  options.onSpawn?.(started.child);
  return { ...(await started.exited), pid: started.pid };
}

/**
 * @typedef {object} StartOptions
 * @property {Record<string, string | undefined>} [env] the whole environment (default: {@link cleanEnv}())
 * @property {string} [cwd] default: the repository root
 * @property {Array<number | 'pipe' | 'ignore' | 'inherit' | null>} [extraFds] stdio entries 3, 4, ...
 * @property {string | Buffer} [input] written to stdin, which is then closed (default: stdin is /dev/null)
 * @property {boolean} [detached] in a new process group, which {@link Started.kill} signals whole
 * @property {import('node:test').TestContext} [t] the process (its group when detached) is SIGKILLed when `t` ends
 *   (passes, fails or times out); starting one for a test that has ended throws
 * @property {number} [guardMs] SIGKILL after this long (a guard against hangs, not an assertion)
 */

/**
 * @typedef {object} Started
 * @property {import('node:child_process').ChildProcessByStdio<import('node:stream').Writable | null, import('node:stream').Readable, import('node:stream').Readable>} child
 * @property {number} pid
 * @property {LineWatcher} out its stdout
 * @property {LineWatcher} err its stderr
 * @property {Promise<{code: number | null, signal: NodeJS.Signals | null}>} exit the process ended (a program it left may still hold its output)
 * @property {Promise<Ended>} exited the process ended and its output is closed: how, and all it wrote
 * @property {() => Ended | undefined} ended how it ended, or undefined while it runs
 * @property {(signal?: NodeJS.Signals) => void} kill signals it (its group when detached) while it runs
 */

/**
 * Starts a program in the background, capturing its stdout and stderr line by line.
 * @param {string} command
 * @param {readonly string[]} args
 * @param {StartOptions} [options]
 * @returns {Started}
 */
export function start(command, args, options = {}) {
  // The body of a test that timed out goes on running: it must not start what nothing would stop.
  if (options.t?.signal.aborted) throw new Error(`not starting ${path.basename(command)}: its test has ended`);
  const env = Object.fromEntries(Object.entries(options.env ?? cleanEnv()).filter(([, v]) => v !== undefined));
  const detached = options.detached === true;
  const child = spawn(command, args, {
    cwd: options.cwd ?? ROOT,
    env,
    stdio: [options.input === undefined ? 'ignore' : 'pipe', 'pipe', 'pipe', ...(options.extraFds ?? [])],
    detached,
  });
  if (child.stdin !== null) {
    child.stdin.on('error', () => {});
    child.stdin.end(options.input);
  }
  const out = new LineWatcher(child.stdout);
  const err = new LineWatcher(child.stderr);
  /** @type {Ended | undefined} */
  let ended;
  const exit = new Promise((resolve) => child.on('exit', (code, signal) => resolve({ code, signal })));
  /** @type {Promise<Ended>} */
  const exited = new Promise((resolve, reject) => {
    child.on('error', reject);
    child.on('close', (code, signal) => {
      ended = { code, signal, stdout: out.text, stderr: err.text };
      resolve(ended);
    });
  });
  const kill = (/** @type {NodeJS.Signals} */ signal = 'SIGKILL') => {
    // Only while it runs: the id of an ended process or an empty group may be another's by then.
    if (child.exitCode !== null || child.signalCode !== null || child.pid === undefined) return;
    try {
      if (detached) process.kill(-child.pid, signal);
      else child.kill(signal);
    } catch {
      // already gone
    }
  };
  if (options.guardMs !== undefined) {
    const guard = setTimeout(() => kill('SIGKILL'), options.guardMs);
    exited.finally(() => clearTimeout(guard)).catch(() => {});
  }
  if (child.pid !== undefined) {
    running.set(child.pid, { kill, exit, t: options.t });
    child.on('exit', () => running.delete(child.pid));
  }
  // The test's signal aborts when it ends, before its after hooks: also when it timed out.
  // Dropped once the child has ended, so a test may start any number of processes.
  const onAbort = () => kill('SIGKILL');
  options.t?.signal.addEventListener('abort', onAbort, { once: true });
  child.on('exit', () => options.t?.signal.removeEventListener('abort', onAbort));
  return { child, pid: child.pid ?? -1, out, err, exit, exited, ended: () => ended, kill };
}

/** Runs `node bin/shm-fd.js ARGS...` to its end. */
export function runShmFd(/** @type {readonly string[]} */ args, /** @type {RunOptions} */ options = {}) {
  return run(NODE, [SHM_FD, ...args], options);
}

/** Runs `node bin/shm-restore.js ARGS...` to its end. */
export function runHost(/** @type {readonly string[]} */ args, /** @type {RunOptions} */ options = {}) {
  return run(NODE, [SHM_RESTORE, ...args], options);
}

/**
 * Starts `shm-restore ARGS` in the background. `next()` is the next line of the program's
 * stdout, parsed as JSON (`{line}` when it is not JSON); it rejects when the host's output
 * ends first.
 * @param {readonly string[]} args
 * @param {StartOptions} [options]
 */
export function startHost(args, options = {}) {
  const started = start(NODE, [SHM_RESTORE, ...args], options);
  let read = 0;
  return {
    ...started,
    get stderr() {
      return started.err.text;
    },
    /** @returns {Promise<any>} */
    async next() {
      const line = await started.out.line(read++);
      if (line === undefined) {
        const end = await started.exited;
        throw new Error(`the host exited (${end.code ?? end.signal}) before the program printed a line: ${started.err.text}`);
      }
      try {
        return JSON.parse(line);
      } catch {
        return { line };
      }
    },
  };
}

/** Collects the lines a stream carries, and lets a test wait for one. */
export class LineWatcher {
  /** @type {string[]} the complete lines so far */
  lines = [];
  /** Everything the stream carried so far, the last partial line included. */
  text = '';
  ended = false;
  /** @type {Array<() => void>} */
  #waiters = [];

  /** @param {import('node:stream').Readable} stream */
  constructor(stream) {
    let rest = '';
    stream.setEncoding('utf8');
    stream.on('data', (/** @type {string} */ chunk) => {
      this.text += chunk;
      // Only the new chunk is split: joining it to a long partial line first made 8 MiB
      // without a newline cost O(n^2), and a loaded machine hit the run's guard.
      const parts = chunk.split('\n');
      const last = parts.pop() ?? '';
      if (parts.length === 0) {
        rest += last;
      } else {
        parts[0] = rest + parts[0];
        rest = last;
        for (const line of parts) this.lines.push(line);
      }
      this.#wake();
    });
    stream.on('end', () => {
      if (rest !== '') this.lines.push(rest);
      rest = '';
      this.ended = true;
      this.#wake();
    });
  }

  #wake() {
    for (const waiter of this.#waiters.splice(0)) waiter();
  }

  /**
   * The line number `index` (from 0), once it is there; undefined if the stream ends first.
   * @param {number} index
   * @returns {Promise<string | undefined>}
   */
  async line(index) {
    while (index >= this.lines.length && !this.ended) await new Promise((resolve) => this.#waiters.push(() => resolve(undefined)));
    return this.lines[index];
  }

  /**
   * The first line (seen so far or later) matching `pattern`; undefined if the stream ends first.
   * @param {RegExp} pattern
   * @returns {Promise<RegExpExecArray | undefined>}
   */
  async waitFor(pattern) {
    for (let i = 0; ; i++) {
      const line = await this.line(i);
      if (line === undefined) return undefined;
      const match = pattern.exec(line);
      if (match) return match;
    }
  }

  /**
   * Numbers captured by `pattern`'s first group on every line, in order.
   * @param {RegExp} pattern
   */
  numbers(pattern) {
    const out = [];
    for (const line of this.lines) {
      const m = pattern.exec(line);
      if (m) out.push(Number(m[1]));
    }
    return out;
  }
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

/** Changes bytes of `file` in place (as an in-place round does): the inode, and so its extended attributes, stay. */
export function writeInPlace(file, position, bytes) {
  const fd = fs.openSync(file, 'r+');
  try {
    fs.writeSync(fd, bytes, 0, bytes.length, position);
  } finally {
    fs.closeSync(fd);
  }
}

/** A new temporary directory, removed when the test `t` ends (once its processes have); in `parent` if given. */
export function tempDir(t, prefix = 'shmfd-test-', parent = os.tmpdir()) {
  const dir = fs.mkdtempSync(path.join(parent, prefix));
  t.after(async () => {
    // The test's processes die first: one that has not died yet could still create a file
    // in the directory while it is being removed. (A test's abort signal fires after its
    // after hooks when it passes, before them when it times out.)
    const mine = [...running.values()].filter((p) => p.t === t);
    for (const p of mine) p.kill('SIGKILL');
    await Promise.all(mine.map((p) => p.exit));
    fs.rmSync(dir, { recursive: true, force: true });
  });
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
    next(timeoutMs = 60_000) {
      return waitFor(() => this.receive(), `a datagram on ${address}`, timeoutMs, 10);
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
 * Polls `check` every `intervalMs` until it returns (or resolves to) a truthy value, and
 * returns that; throws after `timeoutMs` (a guard, not an assertion on speed).
 * @template T
 * @param {() => T | Promise<T>} check
 * @param {string} what what is awaited, for the error
 * @returns {Promise<T>}
 */
export async function waitFor(check, what, timeoutMs = 60_000, intervalMs = 20) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(intervalMs);
  }
}

/**
 * Calls `check(copy)` once for each version of the restore-v1 backup `file` while
 * `running()` holds, `copy` being {@link settledBackup}'s copy of it: each atomic rename
 * and each in-place round is a new version (a freed inode number is handed out again, so
 * the change time tells them apart). A version replaced before it could be read is skipped.
 * @param {string} file
 * @param {() => boolean} running
 * @param {(file: string) => void} check
 */
export async function eachVersion(file, running, check) {
  let last = '';
  while (running()) {
    let id = '';
    try {
      const stat = fs.statSync(file, { bigint: true });
      id = `${stat.ino}:${stat.ctimeNs}`;
    } catch {
      // not there yet
    }
    if (id !== '' && id !== last) {
      last = id;
      try {
        const copy = settledBackup(file);
        if (copy !== undefined) check(copy);
      } catch (err) {
        if (/** @type {NodeJS.ErrnoException} */ (err).code !== 'ENOENT') throw err;
      }
    }
    await sleep(3);
  }
}

/**
 * The last commit a state fixture reported (its "committed N" lines), 0 for none.
 * @param {{ numbers: (re: RegExp) => number[] }} watcher its stdout
 */
export function lastCommitted(watcher) {
  return Math.max(0, ...watcher.numbers(/^committed (\d+)$/));
}

/**
 * Runs the state program `NODE ...args` on the memfd `memoryFd` (at fd 3) `rounds` times and
 * SIGKILLs it each time, a random 5–150 ms after it recovered (every other run only once it
 * reported a commit, so that the runs make progress however slow): each run must recover
 * what the last check found, and after each kill the memfd must hold a committed state at
 * least as new as the last one it reported (`check`).
 * @param {{ rounds: number, memoryFd: number, args: string[], rng: ReturnType<typeof seededRandom>,
 *   check: (file: string, what: string, atLeast: number) => number }} o
 *   `check` asserts on the file `file` (the memfd) and returns the commit it holds
 * @returns {Promise<{ midStream: number, durable: number }>} how many kills hit a running writer
 */
export async function killWriterRounds({ rounds, memoryFd, args, rng, check }) {
  const env = cleanEnv({ LISTEN_FDS: '1', LISTEN_FDNAMES: 'SHM_SHARED_FD' });
  let durable = 0;
  let midStream = 0;
  for (let round = 1; round <= rounds; round++) {
    const { child, out, err, exited } = start(NODE, args, { env, extraFds: [memoryFd] });
    const recovered = await out.waitFor(/^recovered (\d+)$/);
    assert.ok(recovered !== undefined, `round ${round}: the program started: ${err.lines.join('\n')}`);
    assert.equal(Number(recovered[1]), durable, `round ${round}: the program recovered what the last check found`);
    if (round % 2 === 0) await out.waitFor(/^committed \d+$/);
    await Promise.race([sleep(rng.int(5, 150)), exited]);
    child.kill('SIGKILL');
    const { signal } = await exited;
    assert.ok(!out.lines.some((l) => l.startsWith('problem')), `round ${round}: ${out.lines.join('\n')}`);
    if (signal === 'SIGKILL') midStream++;
    durable = check(`/proc/self/fd/${memoryFd}`, `round ${round}`, Math.max(durable, lastCommitted(out)));
  }
  return { midStream, durable };
}

/**
 * Runs a restore-v1 tree `rounds` times and kills it whole (SIGKILL of its group) each time:
 * each run must recover what the backup held; while it runs, every version of the backup
 * must restore to a committed state no older than the last (`check`), for a random 150–700
 * ms, and every other run until a newer one shows up (at most 60 s); after each kill the
 * backup, its journal applied, is checked too.
 * @param {{ rounds: number, backup: string, seed: number, rng: ReturnType<typeof seededRandom>,
 *   startTree: () => ReturnType<typeof start>, check: (file: string, what: string, atLeast: number) => number }} o
 *   `check` asserts on the backup copy `file` and returns the commit it holds
 * @returns {Promise<{ kills: number, backupsSeen: number, grewWhileRunning: number, durable: number }>}
 */
export async function killTreeRounds({ rounds, backup, seed, rng, startTree, check }) {
  const stats = { kills: 0, backupsSeen: 0, grewWhileRunning: 0, durable: 0 };
  for (let round = 1; round <= rounds; round++) {
    const tree = startTree();
    const recovered = await tree.out.waitFor(/^recovered (\d+)$/);
    if (recovered !== undefined) assert.equal(Number(recovered[1]), stats.durable, `seed ${seed}, round ${round}: the program recovered what the backup held`);
    const until = Date.now() + rng.int(150, 700);
    const mustGrow = round % 2 === 0;
    const startDurable = stats.durable;
    const guard = Date.now() + 60_000;
    const running = () => {
      if (Date.now() > guard) throw new Error(`seed ${seed}, round ${round}: no newer backup within 60 s`);
      return Date.now() < until || (mustGrow && stats.durable === startDurable);
    };
    await eachVersion(backup, running, (file) => {
      stats.durable = check(file, `round ${round}, a backup persisted while the program ran`, stats.durable);
      stats.backupsSeen++;
    });
    if (stats.durable > startDurable) stats.grewWhileRunning++;
    try {
      process.kill(-tree.pid, 'SIGKILL');
      stats.kills++;
    } catch (e) {
      if (/** @type {NodeJS.ErrnoException} */ (e).code !== 'ESRCH') throw e;
    }
    await tree.exited;
    assert.ok(!tree.out.lines.some((l) => l.startsWith('problem')), tree.out.lines.join('\n'));
    if (fs.existsSync(backup)) stats.durable = check(/** @type {string} */ (settledBackup(backup)), `round ${round}, after the kill`, stats.durable);
  }
  return stats;
}

/**
 * The round in a restore-v1 journal (`.NAME.journal` beside backup NAME), decoded from the
 * layout docs/restore.md gives, independently of src/: undefined when there is none or it
 * is incomplete (its SHA-256 does not match), as a host starting up would discard it.
 * @param {Buffer | undefined} bytes
 */
export function decodeJournal(bytes) {
  if (bytes === undefined || bytes.length < 96 || bytes.toString('latin1', 0, 8) !== 'shmfdjnl' || bytes.readUInt32LE(8) !== 1) return undefined;
  const total = Number(bytes.readBigUInt64LE(48));
  if (total > bytes.length || total < 96) return undefined;
  const sum = crypto.createHash('sha256').update(bytes.subarray(0, total - 32)).digest();
  if (!sum.equals(bytes.subarray(total - 32, total))) return undefined;
  const count = bytes.readUInt32LE(12);
  const recordLength = bytes.readUInt32LE(56);
  let table = 64 + Math.ceil(recordLength / 8) * 8;
  let data = table + 16 * count;
  const runs = [];
  for (let i = 0; i < count; i++, table += 16) {
    const length = Number(bytes.readBigUInt64LE(table + 8));
    runs.push({ offset: Number(bytes.readBigUInt64LE(table)), data: bytes.subarray(data, data + length) });
    data += length;
  }
  return {
    sequence: Number(bytes.readBigUInt64LE(16)),
    inode: bytes.readBigUInt64LE(24),
    baseSize: Number(bytes.readBigUInt64LE(32)),
    size: Number(bytes.readBigUInt64LE(40)),
    record: bytes.toString('utf8', 64, 64 + recordLength),
    runs,
  };
}

/**
 * What a host starting now would restore from the restore-v1 backup `file`, which a running
 * host may be writing in place: a copy of it (`settled.NAME` beside it) with its complete
 * journal applied, read between two identical reads of the journal so that the backup's
 * bytes are those of one round. Undefined when the journal changed while reading (the
 * caller reads again later); throws ENOENT when there is no backup.
 * @param {string} file
 * @param {string} [into] the directory of the copy, when not the backup's (a full disk)
 * @returns {string | undefined}
 */
export function settledBackup(file, into = path.dirname(file)) {
  const journalPath = path.join(path.dirname(file), `.${path.basename(file)}.journal`);
  const readJournal = () => {
    try {
      return fs.readFileSync(journalPath);
    } catch (err) {
      if (/** @type {NodeJS.ErrnoException} */ (err).code === 'ENOENT') return undefined;
      throw err;
    }
  };
  const before = readJournal();
  const fd = fs.openSync(file, 'r');
  let bytes;
  let inode;
  try {
    inode = fs.fstatSync(fd, { bigint: true }).ino;
    bytes = fs.readFileSync(fd);
  } finally {
    fs.closeSync(fd);
  }
  const after = readJournal();
  if ((before === undefined) !== (after === undefined) || (before !== undefined && !before.equals(/** @type {Buffer} */ (after)))) return undefined;
  const round = decodeJournal(before);
  if (round !== undefined && round.inode === inode && (bytes.length === round.baseSize || bytes.length === round.size)) {
    const out = Buffer.alloc(round.size);
    bytes.copy(out, 0, 0, Math.min(bytes.length, round.size));
    for (const run of round.runs) run.data.copy(out, run.offset);
    bytes = out;
  }
  const copy = path.join(into, `settled.${path.basename(file)}`);
  fs.writeFileSync(copy, bytes);
  return copy;
}

/** True once `pid` is gone or a zombie (its reaper may take its time). */
export function isDead(pid) {
  return (processInfo(pid)?.state ?? 'Z') === 'Z';
}

/** True once `pid` is stopped: kill(2) returns before SIGSTOP has taken effect. */
export function isStopped(pid) {
  return /^[Tt]$/.test(processInfo(pid)?.state ?? '');
}

/** The round in the journal at `journalPath` that a start would replay; undefined for none (or a spent one). */
export function journalRound(journalPath) {
  return decodeJournal(fs.existsSync(journalPath) ? fs.readFileSync(journalPath) : undefined);
}

/**
 * Stops the host of the detached `tree` (SIGSTOP to it alone: a program the caller stopped
 * stays so) at an instant `holds()` is true, once `ready()` is (awaited first, when given);
 * otherwise it lets the host go on and looks again.
 * @param {{ pid: number }} tree
 * @param {() => boolean} holds
 * @param {() => unknown} [ready]
 */
export async function stopHostWhen(tree, holds, ready) {
  for (;;) {
    if (ready !== undefined) await waitFor(ready, 'the host to be ready to stop', 60_000, 1);
    process.kill(tree.pid, 'SIGSTOP');
    await waitFor(() => isStopped(tree.pid), 'the host to stop', 60_000, 1);
    if (holds()) return;
    process.kill(tree.pid, 'SIGCONT');
    await sleep(1);
  }
}

/**
 * SIGKILLs the detached host `tree`, after its `count`-th line matching `roundLine` (an
 * in-place round), at an instant its journal `journalPath` holds a complete round: from the
 * journal's writes until its round is durable in the backup, when the host marks it spent.
 * Returns that round, decoded.
 */
export async function killWithCompleteJournal(tree, journalPath, roundLine, count = 1) {
  for (let i = 0, seen = 0; seen < count; i++) {
    const line = await tree.err.line(i);
    if (line === undefined) throw new Error(`the host ended before an in-place round:\n${tree.err.lines.join('\n')}`);
    if (roundLine.test(line)) seen++;
  }
  /** @type {ReturnType<typeof decodeJournal>} */
  let round;
  await stopHostWhen(tree, () => (round = journalRound(journalPath)) !== undefined, () => journalRound(journalPath));
  tree.kill('SIGKILL');
  await tree.exited;
  if (round === undefined) throw new Error('stopHostWhen returned without a complete journal');
  return round;
}

/** SIGKILLs the detached host `tree` between two of its rounds: at an instant its journal `journalPath` holds no round to replay. */
export async function killBetweenRounds(tree, journalPath) {
  await stopHostWhen(tree, () => journalRound(journalPath) === undefined);
  tree.kill('SIGKILL');
  await tree.exited;
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

/** The pids of the children of `pid` (of all its threads), from /proc. */
export function childrenOf(/** @type {number} */ pid) {
  /** @type {number[]} */
  const out = [];
  let tasks;
  try {
    tasks = fs.readdirSync(`/proc/${pid}/task`);
  } catch {
    return out;
  }
  if (!fs.existsSync(`/proc/${pid}/task/${pid}/children`)) {
    // A kernel without CONFIG_PROC_CHILDREN: every process's parent.
    return fs.readdirSync('/proc').filter((entry) => /^\d+$/.test(entry) && processInfo(Number(entry))?.parent === pid).map(Number);
  }
  for (const task of tasks) {
    try {
      const text = fs.readFileSync(`/proc/${pid}/task/${task}/children`, 'utf8').trim();
      if (text !== '') out.push(...text.split(/\s+/).map(Number));
    } catch {
      // the thread ended meanwhile
    }
  }
  return out;
}

/**
 * State, parent and start time of a process, from /proc/PID/stat; undefined when it is gone.
 * @returns {{state: string, parent: number, start: string} | undefined}
 */
export function processInfo(/** @type {number} */ pid) {
  let stat;
  try {
    stat = fs.readFileSync(`/proc/${pid}/stat`, 'latin1');
  } catch {
    return undefined;
  }
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return { state: fields[0] ?? '', parent: Number(fields[1]), start: fields[19] ?? '' };
}

// Readers of the snapshot files of examples/primes-snapshot.js.
if (os.endianness() !== 'LE') throw new Error('these helpers read u64 tables as little-endian u32 pairs');

let reference = new Uint32Array(0);

/**
 * The first `n` primes, computed here (odd-only sieve), independent of the example's sieve.
 * Cached and extended on demand.
 */
export function firstPrimes(n) {
  if (n <= reference.length) return reference.subarray(0, n);
  // p_n < n (ln n + ln ln n) for n >= 6.
  const bound = n < 6 ? 15 : Math.ceil(n * (Math.log(n) + Math.log(Math.log(n))));
  const half = Math.floor((bound - 1) / 2); // index i stands for 2i + 1
  const composite = new Uint8Array(half + 1);
  for (let i = 1; (2 * i + 1) * (2 * i + 1) <= bound; i++) {
    if (composite[i] === 1) continue;
    const p = 2 * i + 1;
    for (let j = (p * p - 1) / 2; j <= half; j += p) composite[j] = 1;
  }
  const out = new Uint32Array(n);
  let k = 0;
  out[k++] = 2;
  for (let i = 1; i <= half && k < n; i++) if (composite[i] === 0) out[k++] = 2 * i + 1;
  if (k < n) throw new Error(`prime bound ${bound} too small for ${n} primes`);
  reference = out;
  return out;
}

/**
 * Index of the first of `count` u64 words at `byteOffset` of `bytes` that is not the
 * matching prime, or -1 when they are exactly the first `count` primes.
 */
export function firstWrongPrime(bytes, byteOffset, count) {
  const words = new Uint32Array(bytes.buffer, bytes.byteOffset + byteOffset, count * 2);
  const expected = firstPrimes(count);
  for (let i = 0; i < count; i++) {
    if (words[2 * i] !== expected[i] || words[2 * i + 1] !== 0) return i;
  }
  return -1;
}

/**
 * Calls `use(bytes, found, size)` with the snapshot file `file` (a backup, or a live memfd
 * through /proc/PID/fd/N) mapped read-only: `found` is its `FileDiscovery`, undefined for
 * an empty or unconfigured file (then `bytes` may be undefined too).
 */
function withSnapshotFile(file, use) {
  const memory = MemoryFile.fromFd(fs.openSync(file, 'r'), file);
  try {
    const size = memory.size;
    if (size === 0) return use(undefined, undefined, size);
    const mapping = memory.map({ readOnly: true });
    try {
      return use(mapping.bytes, new SnapshotFile(mapping.bytes).recover(), size);
    } finally {
      mapping.unmap();
    }
  } finally {
    memory.close();
  }
}

/**
 * Reads a primes-snapshot state out of a snapshot file with the snapshot API: the newest
 * valid snapshot's prime count, and whether the table holds exactly that many first primes.
 * @returns {{configured: boolean, snapshots: number, count: number, wrongAt: number, size: number}}
 *   `count` 0 and `snapshots` 0 for an empty or unconfigured file
 */
export function readPrimesState(file) {
  return withSnapshotFile(file, (bytes, found, size) => {
    const none = { configured: found !== undefined, snapshots: 0, count: 0, wrongAt: -1, size };
    const valid = found?.valid() ?? [];
    const newest = valid[valid.length - 1];
    if (newest === undefined) return none;
    if (newest.length !== 8) throw new Error(`${file}: newest snapshot has ${newest.length} bytes, not 8`);
    const payload = found.read(newest);
    const count = Number(new DataView(payload.buffer, payload.byteOffset, 8).getBigUint64(0, false));
    return { ...none, snapshots: valid.length, count, wrongAt: firstWrongPrime(bytes, found.head.tailStart, count) };
  });
}

/**
 * Whether the `count` first u64 words of the tail of the snapshot file `file` are the first
 * `count` primes (-1), or the index of the first wrong one. Reads only the table: for a live
 * memfd whose slots keep changing.
 */
export function checkLiveTable(file, count) {
  return withSnapshotFile(file, (bytes, found) => {
    if (found === undefined) throw new Error(`${file} is not a configured snapshot file`);
    return firstWrongPrime(bytes, found.head.tailStart, count);
  });
}

// Readers of the backups of shm-restore.

/**
 * Reads a backup as a snapshot file: { size, valid, counter } where counter is the
 * restore-counter value of its newest snapshot; undefined when the file is missing.
 * Throws for a file that is not a valid snapshot file.
 */
export function readCounterBackup(file) {
  let buf;
  try {
    buf = fs.readFileSync(file);
  } catch (err) {
    if (err.code === 'ENOENT') return undefined;
    throw err;
  }
  const bytes = new Uint8Array(buf.length);
  bytes.set(buf);
  const found = SnapshotFile.open(bytes).recover();
  if (found === undefined) throw new Error(`${file} is not configured as a snapshot file`);
  const valid = found.valid();
  const newest = found.newest();
  const counter = newest === undefined ? undefined : Number(Buffer.from(found.read(newest)).readBigUInt64BE(0));
  return { size: buf.length, valid: valid.length, counter, head: found.head, bytes };
}

/** Names of temporary files of shm-restore in `dir`. */
export function tempFiles(dir) {
  return fs.readdirSync(dir).filter((name) => /^\..*\.tmp-[0-9a-f]+$/.test(name));
}

/** True when `command` runs here (e.g. `unshare -m true` needs privileges). */
export function works(command, args) {
  const r = spawnSync(command, args, { stdio: 'ignore' });
  return r.status === 0;
}

/** Content, mtime and mode of a file, to check it was left untouched. */
export function fingerprint(file) {
  const stat = fs.statSync(file);
  const content = stat.isFile() ? crypto.createHash('sha256').update(fs.readFileSync(file)).digest('hex') : null;
  return { content, mtimeMs: stat.mtimeMs, mode: stat.mode, ino: stat.ino };
}

/** A free TCP port on 127.0.0.1: asked from the kernel (listen on port 0), then released. */
export async function freePort() {
  const server = net.createServer();
  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => resolve(undefined));
  });
  const { port } = /** @type {net.AddressInfo} */ (server.address());
  await new Promise((resolve) => server.close(resolve));
  return port;
}
