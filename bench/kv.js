// The shmfd key-value map against what a Node service uses instead, on the same data in
// one run: 1 M keys of 16-byte strings with 100-byte values, the map declared with
// `maxBytes` 1 GiB. Contenders, each in its own process:
//   shmfd     keyValueMap through the public API; a commit is atomic and survives the
//             process (the memfd), not a power loss until a backup persists it
//   JS Map    in the heap: the in-process limit, lost at restart
//   lmdb      the npm package (a devDependency), `noSync: true`: a commit survives the
//             process, not a power loss (the comparable setting); the set rows again with
//             lmdb's default durability (a sync per commit, overlappingSync) for context
//   Redis     Debian's redis-server on a free loopback port, started and stopped here with
//             `--save "" --appendonly no` (the recovery row writes an RDB with SAVE); our
//             RESP client (bench/resp.js), commands awaited one by one and pipelined.
//             Without redis-server the Redis columns are skipped with a message
//             (install it with `apt-get install -y redis-server`).
// Every figure is the time per operation: the median (min–max) of several timed runs
// after a warm-up, keys and values built before timing. Targets (issue: "Measured against
// what users pick instead"): get ≥ 3× lmdb's get, set + commit ≥ 10× lmdb's put in a
// transaction of its own and ≥ 100× an awaited Redis SET, memory per entry ≤
// 2 × (key + value) + 32 bytes.
//
//   npm run bench -- kv            full run (1 M keys, a few minutes)
//   npm run bench -- kv --quick    100 k keys, fewer and shorter runs
//   SHMFD_BENCH_KV_KEYS=N          another number of keys
import crypto from 'node:crypto';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { ROOT, benchDir, bytes, met, ms, note, ratio, runWorker, sig, stats, table, withSpread } from './lib.js';
import { haveRedis, startRedis } from './resp.js';

const QUICK = process.argv.includes('--quick');
const N = Number(process.env.SHMFD_BENCH_KV_KEYS ?? (QUICK ? 100_000 : 1_000_000));
const REPS = QUICK ? 3 : 5;
const REP_MS = QUICK ? 100 : 200;
const ITER_REPS = QUICK ? 2 : 3;
const OPEN_REPS = QUICK ? 3 : 5;
const RESTORE_REPS = 3;
const BATCH = 100;
const KEY_BYTES = 16;
const VALUE_BYTES = 100;
const MAP_BYTES = 2 ** 30;
const FIXTURE = path.join(ROOT, 'bench', 'fixtures', 'kv-open.js');

// ---------------------------------------------------------------- data, the same everywhere

/** Key i: 16 ASCII bytes. */
function makeKey(i) {
  return `key:${String(i).padStart(KEY_BYTES - 4, '0')}`;
}

/** A permutation of 0..n-1 (seeded, so every contender gets the same order). */
function permutation(n, seed) {
  const p = new Uint32Array(n);
  for (let i = 0; i < n; i++) p[i] = i;
  let s = seed >>> 0;
  for (let i = n - 1; i > 0; i--) {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = Math.imul(s ^ (s >>> 15), 1 | s);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    const j = ((t ^ (t >>> 14)) >>> 0) % (i + 1);
    const x = p[i];
    p[i] = p[j];
    p[j] = x;
  }
  return p;
}

function anonRss() {
  const status = fs.readFileSync('/proc/self/status', 'utf8');
  return Number(/RssAnon:\s+(\d+) kB/.exec(status)[1]) * 1024;
}

function settledAnonRss() {
  globalThis.gc?.();
  globalThis.gc?.();
  return anonRss();
}

/** Bytes of live JS objects and buffers after a GC (what RssAnon holds beyond heap slack). */
function liveHeap() {
  globalThis.gc?.();
  globalThis.gc?.();
  const m = process.memoryUsage();
  return m.heapUsed + m.external;
}

/** Everything a contender's worker uses: keys, orders, values, the timing loop. */
function dataset() {
  const before = settledAnonRss();
  const keys = new Array(N);
  for (let i = 0; i < N; i++) keys[i] = makeKey(i);
  const keyStringBytes = settledAnonRss() - before;
  const insertOrder = permutation(N, 1);
  const readOrder = permutation(N, 2);
  const pool = crypto.randomBytes(1 << 16);
  /** The value of key i in generation g: 100 bytes of the pool (a view; every store copies it). */
  const value = (i, g) => {
    const at = (i * 131 + g * 7919) % (pool.length - VALUE_BYTES);
    return pool.subarray(at, at + VALUE_BYTES);
  };
  return { keys, keyStringBytes, insertOrder, readOrder, value };
}

/** CPU time of this process (all its threads) in ns. */
function cpuNs() {
  const u = process.cpuUsage();
  return (u.user + u.system) * 1000;
}

/**
 * Times `chunk(cursor)`, which does BATCH operations on the keys at cursor.. of an order:
 * one warm-up run, then REPS runs of REP_MS each (or `limit` operations). Returns ns per
 * operation for each run, in wall time and in CPU time of this process (which a loaded
 * machine inflates less), and where the cursor ended.
 */
async function timeOps(chunk, { start = 0, limit = Infinity } = {}) {
  let cursor = start;
  const run = async () => {
    let n = 0;
    const c0 = cpuNs();
    const t0 = performance.now();
    let now = t0;
    while (now - t0 < REP_MS && n + BATCH <= limit) {
      const r = chunk(cursor);
      if (r !== undefined) await r;
      cursor += BATCH;
      n += BATCH;
      now = performance.now();
    }
    return [((now - t0) * 1e6) / n, (cpuNs() - c0) / n];
  };
  await run();
  const runs = [];
  const cpu = [];
  for (let r = 0; r < REPS; r++) {
    globalThis.gc?.();
    const [wall, used] = await run();
    runs.push(wall);
    cpu.push(used);
  }
  return { runs, cpu, end: cursor };
}

/** Full iterations, ITER_REPS times: ns per entry, and the entries seen. */
async function timeIteration(iterate) {
  const runs = [];
  const cpu = [];
  let seen = 0;
  for (let r = 0; r < ITER_REPS; r++) {
    globalThis.gc?.();
    const c0 = cpuNs();
    const t0 = performance.now();
    seen = await iterate();
    runs.push(((performance.now() - t0) * 1e6) / seen);
    cpu.push((cpuNs() - c0) / seen);
  }
  return { runs, cpu, seen };
}

/** Runs the fixture in a new process; `fd` (optional) becomes its fd 3. */
function fixture(args, fd) {
  return new Promise((resolve, reject) => {
    const stdio = fd === undefined ? ['ignore', 'pipe', 'inherit'] : ['ignore', 'pipe', 'inherit', fd];
    const child = spawn(process.execPath, [FIXTURE, ...args], { stdio, cwd: ROOT });
    let out = '';
    child.stdout.setEncoding('utf8');
    child.stdout.on('data', (d) => (out += d));
    child.on('error', reject);
    child.on('exit', (code) => {
      if (code !== 0) reject(new Error(`kv-open.js ${args[0]} exited with ${code}`));
      else resolve(JSON.parse(out.trim().split('\n').pop()));
    });
  });
}

async function repeatFixture(args, fd, reps = OPEN_REPS) {
  const results = [];
  for (let r = 0; r < reps; r++) results.push(await fixture(args, fd));
  return results;
}

/** Copies `fd` (size bytes) into `file`, leaving holes where it reads as zeros. */
function writeSparse(fd, size, file) {
  const out = fs.openSync(file, 'w');
  const chunk = Buffer.alloc(1 << 20);
  const zero = Buffer.alloc(1 << 20);
  for (let pos = 0; pos < size; ) {
    const n = fs.readSync(fd, chunk, 0, Math.min(chunk.length, size - pos), pos);
    if (n === 0) break;
    if (n !== chunk.length || !chunk.equals(zero)) fs.writeSync(out, chunk, 0, n, pos);
    pos += n;
  }
  fs.ftruncateSync(out, size);
  fs.fsyncSync(out);
  fs.closeSync(out);
}

// ---------------------------------------------------------------- contenders

async function shmfdWorker(d) {
  const { MemoryFile, StateFile, keyValueMap } = await import('shmfd');
  const { keys, insertOrder: ins, readOrder: rd, value } = d;
  const declarations = { kv: keyValueMap({ maxBytes: MAP_BYTES }) };
  const lines = [];
  const log = { error: (m) => lines.push(m), warn: (m) => lines.push(m), info: (m) => lines.push(m), debug: () => {} };
  const file = MemoryFile.create('kv-bench');
  let state = StateFile.open(file, declarations, { log });
  let kv = state.structures.kv;
  const pages = () => fs.fstatSync(file.fd).blocks * 512;
  const anon0 = settledAnonRss();
  const live0 = liveHeap();
  const pages0 = pages();

  const t0 = performance.now();
  for (let i = 0; i < N; i++) {
    kv.set(keys[ins[i]], value(ins[i], 0));
    if ((i + 1) % BATCH === 0) state.commit();
  }
  state.commit();
  const loadNs = ((performance.now() - t0) * 1e6) / N;
  const memory = { stateBytes: (pages() - pages0) / N, heapBytes: (settledAnonRss() - anon0) / N, liveHeapBytes: (liveHeap() - live0) / N, live: kv.liveBytes / N };

  let sink = 0;
  const get = await timeOps((c) => {
    for (let j = 0; j < BATCH; j++) sink += kv.get(keys[rd[(c + j) % N]]).length;
  });
  const iterate = await timeIteration(() => {
    let n = 0;
    for (const [, v] of kv) n += v.length > 0 ? 1 : 0;
    return n;
  });
  let g = 1;
  const setCommit = await timeOps((c) => {
    g++;
    for (let j = 0; j < BATCH; j++) {
      const i = rd[(c + j) % N];
      kv.set(keys[i], value(i, g));
      state.commit();
    }
  });
  const setBatch = await timeOps((c) => {
    g++;
    for (let j = 0; j < BATCH; j++) {
      const i = rd[(c + j) % N];
      kv.set(keys[i], value(i, g));
    }
    state.commit();
  });
  const window = kv.liveBytes;

  // Restart on the same memfd: another process opens it while this one has it closed.
  state.close();
  const probe = keys[rd[0]];
  const reattach = await repeatFixture(['shmfd-reattach', String(MAP_BYTES), probe], file.fd);
  const backup = path.join(d.dir, 'shmfd.backup');
  writeSparse(file.fd, file.size, backup);
  const restore = await repeatFixture(['shmfd-restore', String(MAP_BYTES), probe, backup], undefined, RESTORE_REPS);
  fs.rmSync(backup);
  const r0 = performance.now();
  state = StateFile.open(file, declarations, { log });
  const reopenMs = performance.now() - r0;
  kv = state.structures.kv;
  const reopenRebuilt = kv.rebuilt;

  const del = await timeOps((c) => {
    for (let j = 0; j < BATCH; j++) kv.delete(keys[ins[c + j]]);
    state.commit();
  }, { limit: deleteLimit() });
  if (sink === 0) throw new Error('no values read');
  state.close();
  file.close();
  return {
    columns: { shmfd: { load: [loadNs], ...both({ get, iterate, setCommit, setBatch, delete: del }) } },
    memory,
    reattach,
    restore,
    reopenMs,
    reopenRebuilt,
    window,
    rebuildLog: restore[0]?.log ?? [],
  };
}

async function mapWorker(d) {
  const { keys, insertOrder: ins, readOrder: rd, value } = d;
  const anon0 = settledAnonRss();
  const live0 = liveHeap();
  const map = new Map();
  const t0 = performance.now();
  for (let i = 0; i < N; i++) map.set(keys[ins[i]], value(ins[i], 0).slice());
  const loadNs = ((performance.now() - t0) * 1e6) / N;
  const memory = { heapBytes: (settledAnonRss() - anon0) / N, liveHeapBytes: (liveHeap() - live0) / N, keyStringBytes: d.keyStringBytes / N };
  let sink = 0;
  const get = await timeOps((c) => {
    for (let j = 0; j < BATCH; j++) sink += map.get(keys[rd[(c + j) % N]]).length;
  });
  const iterate = await timeIteration(() => {
    let n = 0;
    for (const [, v] of map) n += v.length > 0 ? 1 : 0;
    return n;
  });
  let g = 1;
  const set = async () => timeOps((c) => {
    g++;
    for (let j = 0; j < BATCH; j++) {
      const i = rd[(c + j) % N];
      map.set(keys[i], value(i, g).slice());
    }
  });
  const setCommit = await set();
  const setBatch = await set();
  const del = await timeOps((c) => {
    for (let j = 0; j < BATCH; j++) map.delete(keys[ins[c + j]]);
  }, { limit: deleteLimit() });
  if (sink === 0) throw new Error('no values read');
  return {
    columns: { map: { load: [loadNs], ...both({ get, iterate, setCommit, setBatch, delete: del }) } },
    memory,
  };
}

async function lmdbWorker(d) {
  const { open } = await import('lmdb');
  const { keys, insertOrder: ins, readOrder: rd, value } = d;
  const dir = path.join(d.dir, 'lmdb');
  const options = { path: dir, encoding: 'binary', compression: false };
  let db = open({ ...options, noSync: true });
  const anon0 = settledAnonRss();
  const t0 = performance.now();
  for (let i = 0; i < N; i += BATCH) {
    db.transactionSync(() => {
      for (let j = i; j < Math.min(N, i + BATCH); j++) db.putSync(keys[ins[j]], value(ins[j], 0));
    });
  }
  const loadNs = ((performance.now() - t0) * 1e6) / N;
  const dataFile = path.join(dir, 'data.mdb');
  const memory = { fileBytes: (fs.statSync(dataFile).blocks * 512) / N, heapBytes: (settledAnonRss() - anon0) / N };
  let sink = 0;
  const get = await timeOps((c) => {
    for (let j = 0; j < BATCH; j++) sink += db.get(keys[rd[(c + j) % N]]).length;
  });
  const iterate = await timeIteration(() => {
    let n = 0;
    for (const { value: v } of db.getRange()) n += v.length > 0 ? 1 : 0;
    return n;
  });
  let g = 1;
  const sets = async () => ({
    setCommit: await timeOps((c) => {
      g++;
      for (let j = 0; j < BATCH; j++) {
        const i = rd[(c + j) % N];
        db.putSync(keys[i], value(i, g));
      }
    }),
    setBatch: await timeOps((c) => {
      g++;
      db.transactionSync(() => {
        for (let j = 0; j < BATCH; j++) {
          const i = rd[(c + j) % N];
          db.putSync(keys[i], value(i, g));
        }
      });
    }),
  });
  const noSync = await sets();
  await db.close();

  const probe = keys[rd[0]];
  const reattach = await repeatFixture(['lmdb', dir, probe]);
  const backup = path.join(d.dir, 'lmdb.backup');
  fs.copyFileSync(dataFile, backup);
  const restore = [];
  for (let r = 0; r < RESTORE_REPS; r++) {
    const target = path.join(d.dir, `lmdb-restored-${r}`);
    restore.push(await fixture(['lmdb-restore', target, probe, backup]));
    fs.rmSync(target, { recursive: true, force: true });
  }
  fs.rmSync(backup);

  db = open(options);
  const synced = await sets();
  await db.close();
  db = open({ ...options, noSync: true });
  const del = await timeOps((c) => {
    db.transactionSync(() => {
      for (let j = 0; j < BATCH; j++) db.removeSync(keys[ins[c + j]]);
    });
  }, { limit: deleteLimit() });
  await db.close();
  if (sink === 0) throw new Error('no values read');
  return {
    columns: {
      lmdb: { load: [loadNs], ...both({ get, iterate, setCommit: noSync.setCommit, setBatch: noSync.setBatch, delete: del }) },
      lmdbSync: { setCommit: synced.setCommit.runs, setBatch: synced.setBatch.runs },
    },
    memory,
    reattach,
    restore,
  };
}

async function redisWorker(d) {
  const { keys, insertOrder: ins, readOrder: rd, value } = d;
  const dir = path.join(d.dir, 'redis');
  fs.mkdirSync(dir);
  const server = await startRedis(dir);
  const restored = [];
  try {
    const { client } = server;
    const info = async (section, field) => Number(new RegExp(`${field}:(\\d+)`).exec((await client.send(['INFO', section])).toString())[1]);
    const serverRss = () => Number(/VmRSS:\s+(\d+) kB/.exec(fs.readFileSync(`/proc/${server.pid}/status`, 'utf8'))[1]) * 1024;
    const used0 = await info('memory', 'used_memory');
    const rss0 = serverRss();
    const t0 = performance.now();
    const LOAD_BATCH = 1000;
    for (let i = 0; i < N; i += LOAD_BATCH) {
      const commands = [];
      for (let j = i; j < Math.min(N, i + LOAD_BATCH); j++) commands.push(['SET', keys[ins[j]], value(ins[j], 0)]);
      await client.pipeline(commands);
    }
    const loadNs = ((performance.now() - t0) * 1e6) / N;
    const memory = { usedBytes: ((await info('memory', 'used_memory')) - used0) / N, rssBytes: (serverRss() - rss0) / N };
    if ((await client.send(['DBSIZE'])) !== N) throw new Error('redis: not every key was stored');

    let sink = 0;
    const awaited = {};
    const pipelined = {};
    awaited.get = await timeOps(async (c) => {
      for (let j = 0; j < BATCH; j++) sink += (await client.send(['GET', keys[rd[(c + j) % N]]])).length;
    });
    pipelined.get = await timeOps(async (c) => {
      const replies = await client.pipeline(Array.from({ length: BATCH }, (_, j) => ['GET', keys[rd[(c + j) % N]]]));
      for (const r of replies) sink += r.length;
    });
    awaited.iterate = await timeIteration(async () => {
      let cursor = '0';
      let n = 0;
      do {
        const [next, found] = await client.send(['SCAN', cursor, 'COUNT', '1000']);
        cursor = next.toString();
        if (found.length > 0) for (const v of await client.send(['MGET', ...found])) n += v.length > 0 ? 1 : 0;
      } while (cursor !== '0');
      return n;
    });
    let g = 1;
    awaited.setCommit = await timeOps(async (c) => {
      g++;
      for (let j = 0; j < BATCH; j++) {
        const i = rd[(c + j) % N];
        await client.send(['SET', keys[i], value(i, g)]);
      }
    });
    pipelined.setBatch = await timeOps(async (c) => {
      g++;
      await client.pipeline(Array.from({ length: BATCH }, (_, j) => {
        const i = rd[(c + j) % N];
        return ['SET', keys[i], value(i, g)];
      }));
    });

    const probe = keys[rd[0]];
    const reattach = await repeatFixture(['redis', String(server.port), probe]);
    const s0 = performance.now();
    await client.send(['SAVE']);
    const saveMs = performance.now() - s0;
    const restore = [];
    for (let r = 0; r < RESTORE_REPS; r++) {
      const again = await startRedis(dir);
      restored.push(again);
      const got = await again.client.send(['GET', probe]);
      const size = await again.client.send(['DBSIZE']);
      if (got?.length !== VALUE_BYTES || size !== N) throw new Error('redis: the restarted server lacks the data');
      restore.push({ copyMs: 0, openMs: again.readyMs, size });
      await again.stop();
      restored.pop();
    }

    const limit = deleteLimit(2);
    const delAwaited = await timeOps(async (c) => {
      for (let j = 0; j < BATCH; j++) await client.send(['DEL', keys[ins[c + j]]]);
    }, { limit });
    const delPipelined = await timeOps(async (c) => {
      await client.pipeline(Array.from({ length: BATCH }, (_, j) => ['DEL', keys[ins[c + j]]]));
    }, { start: delAwaited.end, limit });
    if (sink === 0) throw new Error('no values read');
    return {
      columns: {
        redis: { get: awaited.get.runs, iterate: awaited.iterate.runs, setCommit: awaited.setCommit.runs, delete: delAwaited.runs },
        redisPipelined: { load: [loadNs], get: pipelined.get.runs, setBatch: pipelined.setBatch.runs, delete: delPipelined.runs },
      },
      memory,
      reattach,
      restore,
      saveMs,
    };
  } finally {
    for (const s of restored) await s.stop();
    await server.stop();
  }
}

/** The wall-time runs of each figure as `row`, the CPU-time runs as `rowCpu`. */
function both(figures) {
  const out = {};
  for (const [row, f] of Object.entries(figures)) {
    out[row] = f.runs;
    out[`${row}Cpu`] = f.cpu;
  }
  return out;
}

/** Deletes per timed run, when `parts` timings share the keys: together they never run out. */
function deleteLimit(parts = 1) {
  return Math.max(BATCH, Math.floor(N / ((REPS + 1) * parts) / BATCH) * BATCH);
}

const WORKERS = { shmfd: shmfdWorker, map: mapWorker, lmdb: lmdbWorker, redis: redisWorker };

// ---------------------------------------------------------------- report

const COLUMNS = [
  ['shmfd', 'shmfd map'],
  ['map', 'JS `Map`'],
  ['lmdb', 'lmdb `noSync`'],
  ['lmdbSync', 'lmdb default sync'],
  ['redis', 'Redis, awaited'],
  ['redisPipelined', 'Redis, pipelined'],
];

const ROWS = [
  ['get', 'get (a copy of the value)'],
  ['setCommit', 'set + commit, one entry per commit (lmdb: `putSync`; Redis: SET)'],
  ['setBatch', 'set, commit every 100 (lmdb: 100 `putSync` in `transactionSync`; Redis: 100 SETs pipelined)'],
  ['delete', 'delete, commit every 100 (Redis: DEL)'],
  ['iterate', `full iteration, per entry (Redis: SCAN 1000 + MGET)`],
  ['load', `insert ${N.toLocaleString('en')} new keys, commit every 100 (Redis: pipelines of 1000)`],
];

function time(ns) {
  if (ns >= 1e6) return `${sig(ns / 1e6)} ms`;
  if (ns >= 1e3) return `${sig(ns / 1e3)} µs`;
  return `${sig(ns)} ns`;
}

function cell(runs) {
  if (runs === undefined) return '—';
  const s = stats(runs);
  return runs.length === 1 ? time(s.median) : withSpread(s, time);
}

function openCell(results, field) {
  if (results === undefined) return '—';
  return withSpread(stats(results.map((r) => r[field])), ms);
}

async function main() {
  const self = fileURLToPath(import.meta.url);
  const dir = fs.mkdtempSync(path.join(benchDir(), 'shmfd-kv-'));
  const args = (name) => ['--worker', name, dir, ...(QUICK ? ['--quick'] : [])];
  const results = {};
  try {
    for (const name of ['shmfd', 'map', 'lmdb']) {
      note(`${name}: ${N} keys`);
      results[name] = await runWorker(self, args(name), { timeoutMs: 600_000 });
    }
    if (await haveRedis()) {
      note(`redis: ${N} keys`);
      results.redis = await runWorker(self, args('redis'), { timeoutMs: 600_000 });
    } else {
      note('redis-server not found: the Redis columns are skipped (install it with `apt-get install -y redis-server`)');
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
  const columns = Object.assign({}, ...Object.values(results).map((r) => r.columns));
  const med = (col, row) => (columns[col]?.[row] === undefined ? undefined : stats(columns[col][row]).median);

  console.log('### Key-value map against a JS Map, lmdb and Redis\n');
  console.log(table(['time per operation: median (min–max)', ...COLUMNS.map(([, label]) => label)],
    ROWS.map(([row, label]) => [label, ...COLUMNS.map(([col]) => cell(columns[col]?.[row]))])));
  const s = results.shmfd;
  console.log(`\n${N.toLocaleString('en')} keys of ${KEY_BYTES} bytes (\`key:000000000042\`), values of ${VALUE_BYTES} bytes; inserted in one seeded random order, read and overwritten in another. ` +
    `${REPS} timed runs of ${REP_MS} ms per cell after a warm-up run, ${BATCH} operations between clock reads; iteration: ${ITER_REPS} full passes; deletes at most ${deleteLimit().toLocaleString('en')} per run. ` +
    'The shmfd map is declared with `maxBytes` 1 GiB (JS `Map`: no commit, the set rows are plain `set`s of a copy). ' +
    `lmdb ${'`noSync: true`'} (compression off, binary values) survives a crash of the process but not of the machine, like a shmfd commit before the backup persists it; "default sync" is lmdb's default (a sync per transaction, overlappingSync). ` +
    'Redis: redis-server on 127.0.0.1 with `--save "" --appendonly no`, one connection, our RESP client.' +
    (results.redis === undefined ? ' **redis-server was not installed: no Redis figures** (`apt-get install -y redis-server`).' : '') + '\n');

  const inProcess = COLUMNS.slice(0, 3);
  console.log(table(['CPU time of the process per operation: median (min–max)', ...inProcess.map(([, label]) => label)],
    ROWS.filter(([row]) => row !== 'load').map(([row, label]) => [label, ...inProcess.map(([col]) => cell(columns[col]?.[`${row}Cpu`]))])));
  console.log('\nThe same runs, in CPU time (user + system, all threads) of the process instead of wall time: the in-process contenders do all their work in it, and time the process waits for a core on a loaded machine is left out.\n');

  const open = [
    ['reattach after a restart: a new process opens the same store and reads one key (its native module loaded)',
      openCell(s.reattach, 'openMs') + ` (index kept: ${s.reattach.every((r) => !r.rebuilt) ? 'yes' : '**no**'})`,
      'lost at restart',
      openCell(results.lmdb.reattach, 'openMs'),
      results.redis === undefined ? '—' : `${openCell(results.redis.reattach, 'openMs')} (connect + GET; the data stays in the server)`],
    ['the same from before the import of the store\'s module',
      openCell(s.reattach, 'startMs') + ' (koffi loaded by the first libc call)',
      '—',
      openCell(results.lmdb.reattach, 'startMs') + ' (its native module loaded by the import)',
      results.redis === undefined ? '—' : openCell(results.redis.reattach, 'startMs')],
    ['recovery from a backup: copy into a new store', openCell(s.restore, 'copyMs') + ' (sparse copy into a new memfd)', '—', openCell(results.lmdb.restore, 'copyMs') + ' (copy of data.mdb)', '—'],
    ['recovery from a backup: open it and read one key', openCell(s.restore, 'openMs') + ` (index rebuilt: ${s.restore.every((r) => r.rebuilt) ? 'yes' : '**no**'})`, '—', openCell(results.lmdb.restore, 'openMs'),
      results.redis === undefined ? '—' : `${openCell(results.redis.restore, 'openMs')} (redis-server start + RDB load + GET; SAVE took ${ms(results.redis.saveMs)})`],
    ['memory per entry', `${sig(s.memory.stateBytes + s.memory.liveHeapBytes)} B (memfd pages ${sig(s.memory.stateBytes)} + live JS heap ${sig(s.memory.liveHeapBytes)}; ring record ${sig(s.memory.live)}); process RssAnon grew ${sig(s.memory.heapBytes)}`,
      `${sig(results.map.memory.liveHeapBytes + results.map.memory.keyStringBytes)} B (live JS heap ${sig(results.map.memory.liveHeapBytes)} + key strings ${sig(results.map.memory.keyStringBytes)}); RssAnon grew ${sig(results.map.memory.heapBytes)}`,
      `${sig(results.lmdb.memory.fileBytes + results.lmdb.memory.heapBytes)} B (data.mdb ${sig(results.lmdb.memory.fileBytes)} + process heap ${sig(results.lmdb.memory.heapBytes)})`,
      results.redis === undefined ? '—' : `${sig(results.redis.memory.rssBytes)} B server RSS (used_memory ${sig(results.redis.memory.usedBytes)})`],
  ];
  console.log(table(['restart and memory', 'shmfd map', 'JS `Map`', 'lmdb `noSync`', 'Redis'], open));
  console.log(`\nReattach: ${OPEN_REPS} runs, recovery: ${RESTORE_REPS} runs, timed inside a new process (its Node start not included); the first row starts the clock once the store's native module is loaded, as lmdb's import does (shmfd: after a first libc call, \`file.seals\`), the second before the import. shmfd: the window after the runs above holds ${bytes(s.window)} of live entries; ` +
    `in-process reopen before the deletes: ${ms(s.reopenMs)} (index ${s.reopenRebuilt ? 'rebuilt' : 'kept'}). Recovery: the backup is the memory file written to a file (holes kept), copied by the new process into a new memfd, whose index is therefore rebuilt` +
    (s.rebuildLog.length > 0 ? ` (it logs: "${s.rebuildLog.join('" / "')}")` : '') + '. ' +
    `Memory: growth over the load of ${N.toLocaleString('en')} entries (memfd pages from \`fstat\`; live JS heap = heapUsed + external after a GC; RssAnon also keeps the heap's free space after the load's garbage; key strings: RssAnon growth when the bench built them; lmdb: blocks of data.mdb, which lives in the page cache when used; Redis: the server's VmRSS) divided by the entries; key + value = ${KEY_BYTES + VALUE_BYTES} bytes.\n`);

  const goalMemory = 2 * (KEY_BYTES + VALUE_BYTES) + 32;
  const targets = [];
  const vs = (label, row, other, otherRow, want) => {
    const ours = med('shmfd', row);
    const theirs = med(other, otherRow);
    if (ours === undefined || theirs === undefined) {
      targets.push([label, 'not measured', '—', '—']);
      return;
    }
    const x = theirs / ours;
    const oursCpu = med('shmfd', `${row}Cpu`);
    const theirsCpu = med(other, `${otherRow}Cpu`);
    const cpu = theirsCpu === undefined ? '—' : `${time(oursCpu)} vs ${time(theirsCpu)} = ${ratio(theirsCpu / oursCpu)}`;
    targets.push([label, `${time(ours)} vs ${time(theirs)} = ${ratio(x)}`, cpu, want === undefined ? '—' : met(x >= want)]);
  };
  vs('get ≥ 3× lmdb `noSync` get', 'get', 'lmdb', 'get', 3);
  vs('set + commit ≥ 10× lmdb `noSync` `putSync` (own transaction)', 'setCommit', 'lmdb', 'setCommit', 10);
  vs('(context) set + commit against lmdb default sync `putSync`', 'setCommit', 'lmdbSync', 'setCommit', undefined);
  vs('set + commit ≥ 100× an awaited Redis SET', 'setCommit', 'redis', 'setCommit', 100);
  const perEntry = s.memory.stateBytes + s.memory.liveHeapBytes;
  targets.push([`memory per entry ≤ 2 × (key + value) + 32 = ${goalMemory} B`, `${sig(perEntry)} B (memfd pages + live JS heap)`,
    `with RssAnon growth instead of live heap: ${sig(s.memory.stateBytes + s.memory.heapBytes)} B`, met(perEntry <= goalMemory)]);
  const reattach = stats(s.reattach.map((r) => r.openMs)).median;
  targets.push(['reattach of a 1 GiB map (index kept) < 20 ms', `${ms(reattach)} (from before the import: ${ms(stats(s.reattach.map((r) => r.startMs)).median)})`, '—', met(reattach < 20)]);
  console.log(table(['target', 'measured: wall time (medians)', 'CPU time of the process (medians)', 'met? (wall time)'], targets));
  console.log('');
}

if (process.argv[2] === '--worker') {
  const [, name, dir] = process.argv.slice(2);
  const d = { ...dataset(), dir };
  const result = await WORKERS[name](d);
  console.log(JSON.stringify(result));
  process.exit(0);
} else {
  await main();
}
