// Helpers shared by the benchmarks: statistics, formatting, the machine description and
// timed child processes. Benchmarks print Markdown tables on stdout (pasted into
// BENCHMARKS.md) and progress notes on stderr.
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
// dist/ is what the CLIs run; run.js says so when it is missing, before any benchmark.
const PREAD = path.join(ROOT, 'dist', 'snapshot', 'pread.js');
const { readSlotState } = fs.existsSync(PREAD) ? await import(PREAD) : { readSlotState: undefined };

/** The median of `values` (mean of the two middle ones for an even count). */
export function median(values) {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  return sorted.length % 2 === 1 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
}

/** Median, minimum, maximum and count of `values`. */
export function stats(values) {
  return { median: median(values), min: Math.min(...values), max: Math.max(...values), n: values.length };
}

/** "12.3 (11.9–13.0)": the median and the range of the runs, formatted by `fmt`. */
export function withSpread(s, fmt) {
  return `${fmt(s.median)} (${fmt(s.min)}–${fmt(s.max)})`;
}

/** A number with three significant digits and an SI prefix: 66.0 M, 186 k, 0.75. */
export function si(value, unit = '') {
  const abs = Math.abs(value);
  const prefixes = [
    [1e9, ' G'],
    [1e6, ' M'],
    [1e3, ' k'],
  ];
  for (const [scale, prefix] of prefixes) {
    if (abs >= scale) return `${sig(value / scale)}${prefix}${unit}`;
  }
  return `${sig(value)}${unit === '' ? '' : ` ${unit}`}`;
}

/** Three significant digits, no exponent. */
export function sig(value) {
  const abs = Math.abs(value);
  if (abs === 0) return '0';
  if (abs >= 100) return value.toFixed(0);
  if (abs >= 10) return value.toFixed(1);
  if (abs >= 1) return value.toFixed(2);
  return value.toPrecision(2);
}

export function ms(value) {
  return `${sig(value)} ms`;
}

export function ratio(value) {
  return `${sig(value)}×`;
}

export function bytes(value) {
  const units = ['B', 'KiB', 'MiB', 'GiB'];
  let v = value;
  let u = 0;
  while (Math.abs(v) >= 1024 && u < units.length - 1) {
    v /= 1024;
    u++;
  }
  return `${sig(v)} ${units[u]}`;
}

/** A Markdown table. */
export function table(header, rows) {
  const line = (cells) => `| ${cells.join(' | ')} |`;
  return [line(header), line(header.map(() => '---')), ...rows.map(line)].join('\n');
}

/** Progress note on stderr (not part of the tables). */
export function note(text) {
  process.stderr.write(`  · ${text}\n`);
}

/** The facts that make a figure comparable: cores, Node, kernel, file systems. */
export function machine(dir = benchDir()) {
  const fsType = (p) => {
    try {
      return execFileSync('findmnt', ['-n', '-o', 'FSTYPE', '-T', p], { encoding: 'utf8' }).trim().split('\n')[0];
    } catch {
      return 'unknown';
    }
  };
  const cpu = os.cpus()[0]?.model ?? 'unknown';
  return {
    nproc: os.availableParallelism(),
    cpu,
    memory: bytes(os.totalmem()),
    node: process.version,
    kernel: os.release(),
    benchDir: dir,
    benchFs: fsType(dir),
    shmFs: fsType('/dev/shm'),
  };
}

/** Where benchmarks put their big files: $SHMFD_BENCH_DIR, else the OS temp directory. */
export function benchDir() {
  return process.env.SHMFD_BENCH_DIR ?? os.tmpdir();
}

/** Wall-clock milliseconds of one run of `command args` (stdio ignored); throws on failure. */
export function timeSpawn(command, args, options = {}) {
  const t0 = process.hrtime.bigint();
  const r = spawnSync(command, args, { stdio: ['ignore', 'ignore', 'pipe'], ...options });
  const t1 = process.hrtime.bigint();
  if (r.error !== undefined) throw r.error;
  if (r.status !== 0) throw new Error(`${command} ${args.join(' ')} exited ${r.status ?? r.signal}: ${String(r.stderr).trim()}`);
  return Number(t1 - t0) / 1e6;
}

/**
 * Runs `node FILE ARGS` in a fresh process (no warm-up or GC carried over from another
 * measurement) and returns the JSON object it prints as its last stdout line.
 */
export function runWorker(file, args, { timeoutMs = 120_000 } = {}) {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, ['--expose-gc', file, ...args], { stdio: ['ignore', 'pipe', 'inherit'] });
    let out = '';
    child.stdout.setEncoding('utf8');
    child.stdout.on('data', (d) => (out += d));
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.on('error', reject);
    child.on('exit', (code, signal) => {
      clearTimeout(timer);
      if (code !== 0) {
        reject(new Error(`worker ${path.basename(file)} ${args.join(' ')} ended ${signal ?? `with status ${code}`}`));
        return;
      }
      const lines = out.trim().split('\n');
      try {
        resolve(JSON.parse(lines[lines.length - 1]));
      } catch (err) {
        reject(new Error(`worker ${path.basename(file)} printed no result: ${err.message}`));
      }
    });
  });
}

/** Reads a whole file as text, or undefined when it cannot be read. */
export function readText(file) {
  try {
    return fs.readFileSync(file, 'utf8');
  } catch {
    return undefined;
  }
}

/** "yes" / "**no**". */
export function met(ok) {
  return ok ? 'yes' : '**no**';
}

/**
 * The newest durable snapshot of the backup: which version of the file it is (a rename
 * gives a new inode, an in-place round a new mtime; `mtime` in whole ms, as the replica's
 * manifest names it) and the commit time it holds: its
 * 8-byte payload (committer.js, replica.js), or the cell `clock` it names (big-state.js).
 */
export function newestDurable(backup, clock) {
  let fd;
  try {
    fd = fs.openSync(backup, 'r');
  } catch {
    return undefined;
  }
  try {
    const st = fs.fstatSync(fd);
    const id = `${st.ino}:${st.mtimeMs}`;
    const mtime = Math.round(st.mtimeMs);
    const state = readSlotState(fd, st.size);
    const newest = state?.slots[state.slots.length - 1];
    if (newest === undefined || (clock === undefined && newest.length !== 8)) return { id, mtime, time: undefined };
    const buf = Buffer.alloc(newest.length);
    for (let i = 0; i < newest.length; i++) fs.readSync(fd, buf, i, 1, state.head.dataStart + ((newest.offset + i) % state.head.data));
    if (clock === undefined) return { id, mtime, time: buf.readDoubleLE(0) };
    const end = Number(buf.readBigUInt64LE(24 + 16 * clock.index));
    const at = Buffer.alloc(8);
    fs.readSync(fd, at, 0, 8, state.head.tailStart + clock.offset + end - 8);
    const time = at.readDoubleLE(0);
    // The fill's records hold no time.
    return { id, mtime, time: time > 1e12 && time < 1e14 ? time : undefined };
  } catch {
    return undefined;
  } finally {
    fs.closeSync(fd);
  }
}

/** A free TCP port on 127.0.0.1: asked from the kernel (listen on port 0), then released. */
export async function freePort() {
  const server = net.createServer();
  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => resolve(undefined));
  });
  const { port } = server.address();
  await new Promise((resolve) => server.close(resolve));
  return port;
}
