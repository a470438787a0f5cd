// Helpers of the crash-consistency and systemd tests: the reference prime table, reading
// the state of examples/primes-snapshot.js out of a backup file or a live memfd, the
// processes below a pid, and a line watcher for a child's output.
import fs from 'node:fs';
import os from 'node:os';
import { MemoryFile } from 'shmfd';
import { SnapshotFile } from 'shmfd/snapshot';

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

/** The pids of the direct children of `pid` (all its threads), from /proc. */
export function childrenOf(pid) {
  const out = [];
  let tasks;
  try {
    tasks = fs.readdirSync(`/proc/${pid}/task`);
  } catch {
    return out;
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

/** Collects the lines a child writes, and lets a test wait for one that matches. */
export class LineWatcher {
  constructor(stream) {
    this.lines = [];
    this.waiters = [];
    this.ended = false;
    let rest = '';
    stream.setEncoding('utf8');
    stream.on('data', (chunk) => {
      const parts = (rest + chunk).split('\n');
      rest = parts.pop();
      for (const line of parts) this.#push(line);
    });
    stream.on('end', () => {
      if (rest !== '') this.#push(rest);
      rest = '';
      this.ended = true;
      for (const w of this.waiters.splice(0)) w.resolve(undefined);
    });
  }

  #push(line) {
    this.lines.push(line);
    for (const w of [...this.waiters]) {
      const m = w.pattern.exec(line);
      if (m) {
        this.waiters.splice(this.waiters.indexOf(w), 1);
        w.resolve(m);
      }
    }
  }

  /** The first line (seen so far or later) matching `pattern`; undefined if the stream ends first. */
  waitFor(pattern) {
    for (const line of this.lines) {
      const m = pattern.exec(line);
      if (m) return Promise.resolve(m);
    }
    if (this.ended) return Promise.resolve(undefined);
    return new Promise((resolve) => this.waiters.push({ pattern, resolve }));
  }

  /** Numbers captured by `pattern`'s first group on every line, in order. */
  numbers(pattern) {
    const out = [];
    for (const line of this.lines) {
      const m = pattern.exec(line);
      if (m) out.push(Number(m[1]));
    }
    return out;
  }
}
