// Cost of the state structures (docs/state.md): appends, commits, counter adds, cell
// updates, and recovering a large log, against an in-process baseline of the same run
// (`Uint8Array.set` of the same bytes, the copy every operation must at least do). Every
// figure is measured in its own process: the median of 5 timed runs after a warm-up (300 ms
// each, or 1 M appends to a fresh log for the appends, since a log fills up).
import crypto from 'node:crypto';
import { fileURLToPath } from 'node:url';
import { ROOT, note, ratio, runWorker, si, sig, stats, table, withSpread } from './lib.js';

const REPS = 5;
const REP_MS = 300;
const CAPACITY = 96 * 2 ** 20;

function rate(op, batch, ms) {
  let count = 0;
  const t0 = performance.now();
  let now = t0;
  while (now < t0 + ms) {
    for (let i = 0; i < batch; i++) op();
    count += batch;
    now = performance.now();
  }
  return (count * 1000) / (now - t0);
}

function measure(op, batch = 1000) {
  rate(op, batch, REP_MS);
  const runs = [];
  for (let r = 0; r < REPS; r++) {
    globalThis.gc?.();
    runs.push(rate(op, batch, REP_MS));
  }
  return runs;
}

async function open(declarations) {
  const { MemoryFile } = await import(`${ROOT}/dist/fds/memory-file.js`);
  const { StateFile } = await import(`${ROOT}/dist/index.js`);
  const file = MemoryFile.create('bench-state', { size: CAPACITY + 16 * 2 ** 20 });
  return { state: StateFile.open(file, declarations), file, StateFile };
}

async function worker(mode) {
  const { appendLog, counterSet, versionedCell } = await import(`${ROOT}/dist/index.js`);
  const record = crypto.randomBytes(64);
  if (mode === 'baseline') {
    const ring = new Uint8Array(2 ** 20);
    let pos = 0;
    return { runs: measure(() => { ring.set(record, pos); pos = (pos + 64) & (ring.length - 1); }) };
  }
  if (mode === 'append' || mode === 'append-commit') {
    // A log fills up, so every run appends a fixed number of records to a fresh one.
    const commit = mode === 'append-commit';
    const n = 1_000_000;
    const runs = [];
    for (let r = 0; r <= REPS; r++) {
      const { state, file } = await open({ log: appendLog(CAPACITY) });
      const { log } = state.structures;
      globalThis.gc?.();
      const t = performance.now();
      for (let k = 0; k < n; k++) {
        log.append(record);
        if (commit) state.commit();
      }
      const rateNow = (n * 1000) / (performance.now() - t);
      if (r > 0) runs.push(rateNow); // the first run warms up
      file.close();
    }
    return { runs };
  }
  if (mode === 'counter-commit' || mode === 'counter-batch') {
    const { state } = await open({ counters: counterSet(4) });
    const { counters } = state.structures;
    let i = 0;
    const op = mode === 'counter-commit'
      ? () => { counters.add(0, 1n); state.commit(); }
      : () => { counters.add(0, 1n); if (++i % 100 === 0) state.commit(); };
    return { runs: measure(op) };
  }
  if (mode === 'cell') {
    const { state } = await open({ cell: versionedCell(Float64Array, 8) });
    const { cell } = state.structures;
    let x = 0;
    return { runs: measure(() => cell.update((v) => { v[0] = x++; v[7] = x; })) };
  }
  if (mode === 'recover') {
    const { state, file, StateFile } = await open({ log: appendLog(CAPACITY) });
    const { log } = state.structures;
    for (let i = 0; i < 1_000_000; i++) log.append(record);
    state.commit();
    const times = [];
    for (let r = 0; r < REPS; r++) {
      const t = performance.now();
      StateFile.open(file, { log: appendLog(CAPACITY) });
      times.push(performance.now() - t);
    }
    return { times };
  }
  throw new Error(`unknown mode ${mode}`);
}

async function main() {
  const self = fileURLToPath(import.meta.url);
  note('baseline and structures, one process each');
  const base = stats((await runWorker(self, ['--worker', 'baseline'])).runs);
  const figures = [
    ['`append` of a 64-byte record (no commit)', 'append'],
    ['`append` 64 B + `commit` after each', 'append-commit'],
    ['`counters.add` + `commit` after each', 'counter-commit'],
    ['`counters.add`, `commit` every 100 adds', 'counter-batch'],
    ['`cell.update` of 8 × f64 (invalidation + copy + commit)', 'cell'],
  ];
  const rows = [];
  for (const [label, mode] of figures) {
    const s = stats((await runWorker(self, ['--worker', mode])).runs);
    rows.push([label, withSpread(s, (v) => `${si(v)}/s`), `${sig(1e9 / s.median)} ns`, ratio(s.median / base.median)]);
  }
  const recover = stats((await runWorker(self, ['--worker', 'recover'])).times);
  rows.push(['open + recover a log of 1 M committed 64-byte records', '—', `${sig(recover.median)} ms`, '—']);
  console.log('### State structures\n');
  console.log(table(['operation', 'rate: median (min–max)', 'time per operation', 'vs `Uint8Array.set` of 64 B (same run)'], rows));
  console.log(`\nBaseline, same run: \`Uint8Array.set\` of a 64-byte record into a 1 MiB ring, ${si(base.median)}/s. ${REPS} timed runs per row after a warm-up (${REP_MS} ms each; appends: 1 M records into a fresh 96 MiB log), every row in its own process.\n`);
}

if (process.argv[2] === '--worker') {
  const result = await worker(process.argv[3]);
  console.log(JSON.stringify(result));
} else {
  await main();
}
