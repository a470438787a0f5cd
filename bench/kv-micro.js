#!/usr/bin/env node
// Micro-measurements of the key-value map's hot paths (not part of `npm test` or
// `npm run bench`): get, set + commit of one entry, set with a commit every 100, and the
// index rebuild of a restored copy. Before them, what a get costs before it reaches the
// map: one character of a random key read (iterations independent, so the CPU overlaps
// their cache misses), and a random key copied and hashed as the map does first (the work
// on the key waits for its miss, which no later iteration can overlap). Keys (16-byte strings) and values (100 bytes) are
// built before timing. Prints one line per figure: the median of 5 runs, in CPU time of this
// process (user + system), which a loaded machine distorts less than wall time.
// Usage: node bench/kv-micro.js [KEYS] [MAX_BYTES_MIB]  (defaults 1000000, 512)
import crypto from 'node:crypto';
import { ROOT, median } from './lib.js';

const { MemoryFile } = await import(`${ROOT}/dist/fds/memory-file.js`);
const { hashBytes } = await import(`${ROOT}/dist/state/kv-record.js`);
const { StateFile, keyValueMap } = await import(`${ROOT}/dist/index.js`);

const KEYS = Number(process.argv[2] ?? 1_000_000);
const MAX_BYTES = Number(process.argv[3] ?? 512) * 2 ** 20;
const keys = Array.from({ length: KEYS }, (_, i) => `key:${String(i).padStart(12, '0')}`);
const value = crypto.randomBytes(100);
const order = Uint32Array.from({ length: KEYS }, () => crypto.randomInt(KEYS));
const quiet = { error: () => {}, warn: () => {}, info: () => {}, debug: () => {} };
const decl = { m: keyValueMap({ maxBytes: MAX_BYTES }) };

/** Milliseconds of CPU time this process used so far. */
const cpu = () => { const u = process.cpuUsage(); return (u.user + u.system) / 1000; };

const file = MemoryFile.create('kv-micro');
const state = StateFile.open(file, decl, { log: quiet });
const { m } = state.structures;
let t = cpu();
for (let i = 0; i < KEYS; i++) {
  m.set(keys[i], value);
  if (i % 1000 === 999) state.commit();
}
state.commit();
console.log(`load ${KEYS} keys (commit every 1000): ${(((cpu() - t) * 1e6) / KEYS).toFixed(0)} ns/key, liveBytes ${m.liveBytes} of maxLiveBytes ${m.maxLiveBytes} (${(m.maxLiveBytes / MAX_BYTES * 100).toFixed(1)}% of maxBytes)`);

function timed(label, n, op) {
  const runs = [];
  for (let r = 0; r < 6; r++) {
    const t0 = cpu();
    for (let i = 0; i < n; i++) op(i);
    if (r > 0) runs.push(((cpu() - t0) * 1e6) / n);
  }
  console.log(`${label}: ${median(runs).toFixed(0)} ns/op (runs ${runs.map((x) => x.toFixed(0)).join(' ')})`);
}

let sink = 0;
const scratch = Buffer.alloc(64);
/** What the map does with an ASCII key before its index: copy it into bytes, hash them. */
const keyHash = (k) => {
  for (let i = 0; i < k.length; i++) scratch[i] = k.charCodeAt(i);
  return hashBytes(scratch, 0, k.length);
};
timed('random key: read its last character', 200_000, (i) => { sink += keys[order[i % KEYS]].charCodeAt(15); });
timed('random key: copy and hash it', 200_000, (i) => { sink += keyHash(keys[order[i % KEYS]]); });
timed('one of 1000 keys (in cache): copy and hash it', 200_000, (i) => { sink += keyHash(keys[order[i % 1000]]); });
timed('get (random existing key)', 200_000, (i) => { sink += m.get(keys[order[i % KEYS]]).length; });
timed('has (random existing key)', 200_000, (i) => { sink += m.has(keys[order[i % KEYS]]) ? 1 : 0; });
timed('set + commit (random existing key)', 100_000, (i) => { m.set(keys[order[i % KEYS]], value); state.commit(); });
timed('set, commit every 100', 200_000, (i) => { m.set(keys[order[i % KEYS]], value); if (i % 100 === 99) state.commit(); });
timed('delete + set back + commit', 50_000, (i) => { const k = keys[order[i % KEYS]]; m.delete(k); state.commit(); m.set(k, value); state.commit(); });
state.close();

// A restored copy in a new memfd rebuilds its index.
const copy = MemoryFile.create('kv-micro-copy', { size: file.size });
const from = file.map();
const to = copy.map();
to.bytes.set(from.bytes);
from.unmap();
to.unmap();
const rebuilds = [];
// The rebuild alone, as the map logs it: the open's CPU time also holds the collection
// V8 runs for the new 1 GiB view, over this process's heap of a million key strings.
const logged = [];
const timing = { ...quiet, info: (m) => { const ms = /index rebuilt, \d+ entries, in (\d+) ms/.exec(m); if (ms) logged.push(Number(ms[1])); } };
for (let r = 0; r < 3; r++) {
  const again = MemoryFile.create('kv-micro-again', { size: copy.size });
  const a = copy.map();
  const b = again.map();
  b.bytes.set(a.bytes);
  a.unmap();
  b.unmap();
  t = cpu();
  const s = StateFile.open(again, decl, { log: timing });
  const ms = cpu() - t;
  if (!s.structures.m.rebuilt || s.structures.m.size !== KEYS) throw new Error('expected a rebuild of every key');
  s.close();
  again.close();
  rebuilds.push(ms);
}
const window = KEYS * 136; // entryBytes(16, 100) per live record, at least
console.log(`rebuild of a restored copy: ${median(rebuilds).toFixed(0)} ms of CPU for the open (${(median(rebuilds) / (window / 2 ** 30)).toFixed(0)} ms per GiB of live entries; runs ${rebuilds.map((x) => x.toFixed(0)).join(' ')}); the rebuild as logged: ${median(logged)} ms (runs ${logged.join(' ')})`);
copy.close();
file.close();
if (sink === 0) console.log('');
