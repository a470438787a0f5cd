// Commits per second on a memfd-backed snapshot file, against the memcpy floor
// (`Uint8Array.set` of the same payload into a ring of the same size, same run) and the
// original's figures; and recovering 4096 valid slots.
//
//   node bench/commits.js            all measurements, each in its own process
//   node bench/commits.js --worker MODE SIZE   one measurement, prints JSON (internal)
import crypto from 'node:crypto';
import { fileURLToPath } from 'node:url';
import { ROOT, note, ratio, runWorker, si, sig, stats, table, met, withSpread } from './lib.js';

const ENTRIES = 0x1000;
/** Ring size: sixteen 64 KiB payloads. */
const DATA = 0x10_0000;
const FILE_SIZE = 4 * DATA;
/** Timed repetitions per measurement (median reported) and the length of each. */
const REPS = 7;
const REP_MS = 300;
const WARMUP_MS = 300;

const SIZES = [
  { name: '8 B', size: 8, original: 66e6, target: 0.5 },
  { name: '64 B', size: 64, original: 11e6, target: undefined },
  { name: '4 KiB', size: 4096, original: 186e3, target: 5 },
  { name: '64 KiB', size: 65536, original: 11.8e3, target: 5 },
];
/** The original's recovery of 4096 valid slots, measured beside ours on 2026-12-01. */
const ORIGINAL_RECOVER_US = 9.1;

async function openSnapshotFile() {
  const { MemoryFile } = await import(`${ROOT}/dist/fds/memory-file.js`);
  const { SnapshotFile } = await import(`${ROOT}/dist/snapshot/index.js`);
  const file = MemoryFile.create('bench-commits', { size: FILE_SIZE });
  const bytes = file.map().bytes;
  return { file, bytes, SnapshotFile };
}

/**
 * Calls `op` in batches of `batch` until `ms` have passed; returns operations per second.
 * The clock is read once per batch so that it costs nothing next to the operations.
 */
function rate(op, batch, ms) {
  let count = 0;
  const t0 = performance.now();
  const until = t0 + ms;
  let now = t0;
  while (now < until) {
    for (let i = 0; i < batch; i++) op();
    count += batch;
    now = performance.now();
  }
  return (count * 1000) / (now - t0);
}

function measureRate(op, size) {
  const batch = Math.max(4, Math.floor(200_000 / Math.max(8, size)));
  rate(op, batch, WARMUP_MS);
  const runs = [];
  for (let r = 0; r < REPS; r++) {
    globalThis.gc?.();
    runs.push(rate(op, batch, REP_MS));
  }
  return runs;
}

async function worker(mode, size) {
  const payload = crypto.randomBytes(size);
  if (mode === 'baseline') {
    // What a commit must at least do: copy the payload into a ring of the same size.
    const ring = new Uint8Array(DATA);
    let pos = 0;
    const op = () => {
      const first = DATA - pos;
      if (size <= first) ring.set(payload, pos);
      else {
        ring.set(payload.subarray(0, first), pos);
        ring.set(payload.subarray(first), 0);
      }
      pos = (pos + size) % DATA;
    };
    return { runs: measureRate(op, size), checksum: ring[0] };
  }
  const { bytes, SnapshotFile } = await openSnapshotFile();
  const writer = new SnapshotFile(bytes).configure({ entries: ENTRIES, data: DATA });
  if (mode === 'commit') {
    return { runs: measureRate(() => writer.commit(payload), size), writeOffset: writer.writeOffset };
  }
  if (mode === 'commitWith') {
    const step = () => 0;
    return { runs: measureRate(() => writer.commitWith(payload, step), size), writeOffset: writer.writeOffset };
  }
  if (mode === 'recover' || mode === 'recover-newest' || mode === 'recover-baseline') {
    for (let i = 0; i < ENTRIES; i++) writer.commit(payload);
    const file = new SnapshotFile(bytes);
    const found = file.recover();
    const count = found?.valid().length;
    if (count !== ENTRIES) throw new Error(`expected ${ENTRIES} valid slots, recovered ${count}`);
    // Per recovery: open the file, discover its configuration, list the valid slots. The
    // baseline copies the sequence region those slots live in (64 KiB), the memcpy floor.
    const region = bytes.subarray(4096, 4096 + ENTRIES * 16);
    const copy = new Uint8Array(region.length);
    // recover-newest: what resuming needs, the newest snapshot (every slot is still
    // validated and ordered; only the other 4095 objects are not built).
    const ops = {
      recover: () => new SnapshotFile(bytes).recover().valid().length,
      'recover-newest': () => new SnapshotFile(bytes).recover().newest().offset,
      'recover-baseline': () => copy.set(region),
    };
    // CPU time beside wall time: on this shared machine the wall clock also counts waiting.
    const cpu0 = process.cpuUsage();
    let calls = 0;
    const op = ops[mode];
    const counted = () => {
      calls++;
      return op();
    };
    const runs = measureRate(counted, 1 << 14).map((r) => 1e6 / r);
    const cpu = process.cpuUsage(cpu0);
    return { runsUs: runs, cpuUs: (cpu.user + cpu.system) / calls, count };
  }
  throw new Error(`unknown mode ${mode}`);
}

async function main() {
  const self = fileURLToPath(import.meta.url);
  const rows = [];
  const results = {};
  for (const s of SIZES) {
    note(`commits of ${s.name}`);
    const base = await runWorker(self, ['--worker', 'baseline', String(s.size)]);
    const ours = await runWorker(self, ['--worker', 'commit', String(s.size)]);
    const b = stats(base.runs);
    const o = stats(ours.runs);
    const vsOriginal = o.median / s.original;
    results[s.name] = { ours: o, baseline: b };
    rows.push([
      `commit ${s.name}/s`,
      withSpread(o, (v) => si(v)),
      withSpread(b, (v) => si(v)),
      ratio(o.median / b.median),
      si(s.original),
      ratio(vsOriginal),
      s.target === undefined ? '—' : `≥ ${s.target}× original`,
      s.target === undefined ? '—' : met(vsOriginal >= s.target),
    ]);
    if (s.size >= 4096) rows[rows.length - 1][1] += ` = ${sig((o.median * s.size) / 1e9)} GB/s`;
  }
  note('commitWith of 8 B');
  {
    const base = await runWorker(self, ['--worker', 'baseline', '8']);
    const ours = await runWorker(self, ['--worker', 'commitWith', '8']);
    const b = stats(base.runs);
    const o = stats(ours.runs);
    rows.push([
      'commitWith 8 B/s (empty step)',
      withSpread(o, (v) => si(v)),
      withSpread(b, (v) => si(v)),
      ratio(o.median / b.median),
      '—',
      '—',
      '—',
      '—',
    ]);
  }
  note('recovering 4096 valid slots');
  {
    const base = await runWorker(self, ['--worker', 'recover-baseline', '8']);
    const b = stats(base.runsUs);
    for (const [mode, what] of [
      ['recover', 'recover + valid(): list of'],
      ['recover-newest', 'recover + newest() of'],
    ]) {
      const ours = await runWorker(self, ['--worker', mode, '8']);
      const o = stats(ours.runsUs);
      rows.push([
        `${what} ${ours.count} valid slots`,
        `${withSpread(o, (v) => `${sig(v)} µs`)}; CPU ${sig(ours.cpuUs)} µs`,
        `${withSpread(b, (v) => `${sig(v)} µs`)} (copy of the 64 KiB slot region)`,
        ratio(o.median / b.median),
        `${ORIGINAL_RECOVER_US} µs`,
        ratio(o.median / ORIGINAL_RECOVER_US),
        '≤ 2× original',
        `CPU: ${met(ours.cpuUs <= 2 * ORIGINAL_RECOVER_US)}; wall: ${met(o.median <= 2 * ORIGINAL_RECOVER_US)}`,
      ]);
    }
  }
  console.log(`### Commits (entries 0x${ENTRIES.toString(16)}, data ${DATA / 1024} KiB, memfd of ${FILE_SIZE / 2 ** 20} MiB)\n`);
  console.log(
    table(['figure', 'ours: median (min–max)', 'baseline, same run', 'ours / baseline', 'original', 'ours / original', 'target', 'met?'], rows),
  );
  console.log(
    `\n${REPS} timed runs of ${REP_MS} ms each after ${WARMUP_MS} ms of warm-up, every row in its own process. ` +
      'Baseline: `Uint8Array.set` of the same payload into a plain 1 MiB ring (the memcpy floor); ' +
      'for recovery, `Uint8Array.set` of the 64 KiB slot region into a buffer. ' +
      'Recovery rows: µs per call (wall), then CPU time per call over all timed runs (`process.cpuUsage`).\n',
  );
  return results;
}

if (process.argv[2] === '--worker') {
  const result = await worker(process.argv[3], Number(process.argv[4]));
  console.log(JSON.stringify(result));
} else {
  await main();
}
