#!/usr/bin/env node
// A streaming prime sieve whose table survives crashes: port of the original's
// `primes-snapshot`. Run it under the restore host, which mirrors the memory to a file:
//
//   shm-restore --snapshot=restore-v1 primes.state node examples/primes-snapshot.js [INTERVAL_MS] [LIMIT]
//
// Every INTERVAL_MS (default 1000) it sieves the next block of 100,000 numbers, appends the
// primes to the tail and commits a snapshot whose payload is the prime count; it stops once
// it holds LIMIT primes (default: when the tail is full), or cleanly on SIGTERM/SIGINT.
// At start it says where the host keeps the state (SHMFD_BACKUP) and how to remove it.
//
// Layout, the same as the original's so that either can continue the other's state:
// - the memory file is 100,000,000 bytes; a new one is configured with 0x100 slots and a
//   0x800-byte data ring, an existing one keeps its configuration;
// - the newest valid snapshot's payload is the prime count as an 8-byte big-endian number;
// - the primes are native-endian u64 values from the start of the tail, in order; the
//   words after the last counted prime are zero.
import { SharedFd } from 'shmfd';
import { SnapshotFile, ConfigureFile } from 'shmfd/snapshot';

// `... | head` closing the pipe ends the program quietly, as it would a C program; every
// commit so far is in the memory already.
process.stdout.on('error', (err) => {
  if (err.code === 'EPIPE') process.exit(0);
  throw err;
});

const SIZE = 100_000_000;
const BLOCK = 100_000;
const PAYLOAD = 8;

const fail = (message) => {
  console.error(`primes-snapshot: ${message}`);
  process.exit(1);
};

const parseArg = (text, name, fallback) => {
  if (text === undefined) return fallback;
  const value = Number(text);
  if (!/^\d+$/.test(text) || !Number.isSafeInteger(value)) fail(`${name} must be a non-negative integer, got '${text}'`);
  return value;
};

if (process.argv[2] === '--help' || process.argv[2] === '-h') {
  console.log('usage: primes-snapshot [INTERVAL_MS] [LIMIT]\nRun under: shm-restore --snapshot=restore-v1 BACKUP node examples/primes-snapshot.js');
  process.exit(0);
}
const interval = parseArg(process.argv[2], 'INTERVAL_MS', 1000);
const limit = parseArg(process.argv[3], 'LIMIT', Infinity);

let file;
try {
  file = SharedFd.fromEnv();
} catch (err) {
  fail(err.message);
}
if (file === undefined) {
  fail('no shared memory file passed; run it under the restore host: shm-restore --snapshot=restore-v1 BACKUP node examples/primes-snapshot.js');
}

// The backup is as large as the memory (sparse: only the written blocks take disk space)
// and outlives every run: say where it is, once, before the work starts.
const backup = process.env.SHMFD_BACKUP;
if (backup !== undefined) {
  const quoted = /^[\w@%+=:,./-]+$/.test(backup) ? backup : `'${backup.replace(/'/g, "'\\''")}'`;
  console.log(`the state is kept in ${backup} (a ${SIZE / 1e6} MB sparse file) between runs; to start over or clean up, stop this and run: rm ${quoted}`);
}

let writer;
let count;
try {
  file.grow(SIZE);
  ({ writer, count } = recover(new SnapshotFile(file.map().bytes)));
} catch (err) {
  fail(`${file.name}: ${err.message}`);
}

const table = writer.tailU64;
const capacity = table.length;
const payload = new Uint8Array(PAYLOAD);
const payloadView = new DataView(payload.buffer);
console.log(`recovered ${count} primes`);

// The original sieves blocks [P, P+100000), [P+100000, P+200000), ... where P is the last
// recovered prime (2 on a fresh start); the numbers up to P are already decided.
const lastPrime = count === 0 ? 0 : Number(table[count - 1]);
let blockStart = count === 0 ? 2 : lastPrime;
const basePrimes = [];
let baseLimit = 1;

/** Extends `basePrimes` to every prime <= `bound` (simple sieve, redone on growth). */
function ensureBasePrimes(bound) {
  if (bound <= baseLimit) return;
  const next = Math.max(bound, baseLimit * 2);
  const composite = new Uint8Array(next + 1);
  basePrimes.length = 0;
  for (let i = 2; i <= next; i++) {
    if (composite[i] === 1) continue;
    basePrimes.push(i);
    for (let j = i * i; j <= next; j += i) composite[j] = 1;
  }
  baseLimit = next;
}

const marks = new Uint8Array(BLOCK);

/** The primes in [lo, hi), ascending (segmented sieve of Eratosthenes). */
function sieve(lo, hi) {
  const found = [];
  if (hi <= lo) return found;
  const length = hi - lo;
  marks.fill(0, 0, length);
  ensureBasePrimes(Math.floor(Math.sqrt(hi - 1)) + 1);
  for (const p of basePrimes) {
    if (p * p >= hi) break;
    for (let j = Math.max(p * p, Math.ceil(lo / p) * p) - lo; j < length; j += p) marks[j] = 1;
  }
  for (let i = 0; i < length; i++) if (marks[i] === 0 && lo + i >= 2) found.push(lo + i);
  return found;
}

function step() {
  const lo = Math.max(blockStart, lastPrime + 1);
  const hi = blockStart + BLOCK;
  payloadView.setBigUint64(0, BigInt(count), false);
  const result = writer.commitWith(payload, (tx) => {
    const primes = sieve(lo, hi);
    const tail = tx.tailU64;
    let n = count;
    for (const p of primes) {
      if (n >= capacity) break;
      tail[n++] = BigInt(p);
    }
    payloadView.setBigUint64(0, BigInt(n), false);
    tx.replace(payload);
    return n;
  });
  if (result === undefined) fail('the snapshot was not committed');
  count = result.value;
  blockStart = hi;
  console.log(`committed ${count} primes`);
}

let timer;
const run = () => {
  if (count >= Math.min(limit, capacity)) {
    console.log(count >= capacity ? `the table is full: ${count} primes` : `reached the limit: ${count} primes`);
    process.exit(0);
  }
  step();
  timer = setTimeout(run, interval);
};
// Every commit is complete when a signal handler runs: stopping here loses nothing.
for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => {
    clearTimeout(timer);
    console.log(`stopped by ${signal} at ${count} primes`);
    process.exit(0);
  });
}
run();

/**
 * Recovers the configuration and the newest snapshot, configures a new file like the
 * original does, and clears the table after the recovered primes: an interrupted step may
 * have appended primes that no snapshot counts.
 */
function recover(snapshots) {
  const config = new ConfigureFile();
  const found = snapshots.recover(config);
  const newest = found?.newest();
  config.orInsertWith((c) => {
    c.entries = 0x100;
    c.data = 0x800;
  });
  const w = snapshots.configure(config);
  let n = 0;
  if (newest !== undefined) {
    if (newest.length !== PAYLOAD) throw new Error(`the newest snapshot has ${newest.length} bytes, not the ${PAYLOAD}-byte prime count`);
    const bytes = w.read(newest);
    n = Number(new DataView(bytes.buffer, bytes.byteOffset, PAYLOAD).getBigUint64(0, false));
  }
  const words = w.tailU64;
  if (n > words.length) throw new Error(`the newest snapshot counts ${n} primes; the tail holds at most ${words.length}`);
  if (n > 0 && words[n - 1] === 0n) throw new Error(`the newest snapshot counts ${n} primes, but the table has a zero at ${n - 1}`);
  clearAfter(w.tail, n * 8);
  return { writer: w, count: n };
}

/**
 * Zeroes the tail from byte `from` to the end of its non-zero prefix. Primes are only ever
 * appended, so everything after the first zero word was never written: leaving it alone
 * keeps untouched pages unallocated.
 */
function clearAfter(tail, from) {
  const words = new Uint32Array(tail.buffer, tail.byteOffset, Math.floor(tail.length / 4));
  let end = from / 4;
  while (end + 1 < words.length && (words[end] !== 0 || words[end + 1] !== 0)) end += 2;
  tail.fill(0, from, end * 4);
}
