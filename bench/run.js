// Runs the benchmarks, each in its own process with a time limit, and prints their
// Markdown tables (the figures in BENCHMARKS.md come from this output).
//
//   npm run bench                   all of them (a few minutes)
//   npm run bench -- commits        one or more by name
//   npm run bench -- --list         the names
//   npm run bench -- kv --quick     other --flags go to every selected benchmark
//
// Environment: SHMFD_BENCH_DIR (where the big files go; default the OS temp directory),
// SHMFD_BENCH_STARTUP_RUNS, SHMFD_BENCH_RESTORE_RUNS, SHMFD_BENCH_V1_RUNS,
// SHMFD_BENCH_WINDOW_MS (see the benchmark files).
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { ROOT, machine } from './lib.js';

const BENCHMARKS = {
  startup: { file: 'startup.js', limitS: 300, about: 'start-up of shm-fd and shm-restore against true and node -e 0' },
  commits: { file: 'commits.js', limitS: 240, about: 'commits per second (8 B to 64 KiB), commitWith, recovering 4096 slots' },
  'restore-1g': { file: 'restore-1g.js', limitS: 900, about: 'restore + write-back of a 1 GiB state (dense and sparse) against cp/sync' },
  'restore-v1': { file: 'restore-v1.js', limitS: 1500, about: 'restore-v1 on 100 MB, 1 GiB and 4 GiB states (whole copies and incremental rounds): host CPU, disk writes, snapshot age; restore after 1,000 incremental rounds' },
  state: { file: 'state.js', limitS: 180, about: 'state structures: appends, commits, counters, cell updates, recovery' },
  replica: { file: 'replica.js', limitS: 1500, about: '--replica on 100 MB and 1 GiB: CPU, bytes sent, replica age, start from the replica' },
  kv: { file: 'kv.js', limitS: 600, about: 'key-value map against a JS Map, lmdb and Redis (--quick: 100 k keys)' },
};

const argv = process.argv.slice(2);
const args = argv.filter((a) => !a.startsWith('--') || a === '--list' || a === '--help');
const flags = argv.filter((a) => !args.includes(a));
if (args.includes('--list') || args.includes('--help') || args.includes('-h')) {
  console.log('usage: node bench/run.js [NAME...] [--FLAG...] (flags go to every benchmark run; kv takes --quick)\n');
  for (const [name, b] of Object.entries(BENCHMARKS)) console.log(`  ${name.padEnd(11)} ${b.about} (limit ${b.limitS} s)`);
  process.exit(0);
}
const unknown = args.filter((a) => !(a in BENCHMARKS));
if (unknown.length > 0) {
  console.error(`bench: unknown benchmark ${unknown.join(', ')} (known: ${Object.keys(BENCHMARKS).join(', ')})`);
  process.exit(2);
}
if (!fs.existsSync(path.join(ROOT, 'dist', 'index.js'))) {
  console.error('bench: dist/ is missing: run `npm run build` first');
  process.exit(2);
}
const selected = args.length === 0 ? Object.keys(BENCHMARKS) : args;

const m = machine();
console.log('## Machine\n');
console.log(
  `nproc ${m.nproc} (${m.cpu}), ${m.memory} RAM, Node ${m.node}, Linux ${m.kernel}, ` +
    `bench files in ${m.benchDir} (${m.benchFs}), /dev/shm (${m.shmFs}); load average at start ${loadAverage()}.\n`,
);

/** Runs one benchmark in its own process group, so a time-out ends its helpers too. */
function runOne(name) {
  const b = BENCHMARKS[name];
  process.stderr.write(`bench: ${name} (limit ${b.limitS} s)\n`);
  const started = Date.now();
  return new Promise((resolve) => {
    const child = spawn(process.execPath, ['--expose-gc', path.join(ROOT, 'bench', b.file), ...flags], { stdio: 'inherit', detached: true });
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      process.stderr.write(`bench: ${name} exceeded ${b.limitS} s: stopping it\n`);
      signalGroup(child.pid, 'SIGTERM');
      setTimeout(() => signalGroup(child.pid, 'SIGKILL'), 5000).unref();
    }, b.limitS * 1000);
    child.on('exit', (code, signal) => {
      clearTimeout(timer);
      const ok = code === 0 && !timedOut;
      process.stderr.write(`bench: ${name} ${ok ? 'done' : `FAILED (${signal ?? `status ${code}`})`} in ${((Date.now() - started) / 1000).toFixed(0)} s\n`);
      resolve(ok);
    });
  });
}

function signalGroup(pid, signal) {
  try {
    process.kill(-pid, signal);
  } catch {
    // Already gone.
  }
}

function loadAverage() {
  try {
    return fs.readFileSync('/proc/loadavg', 'utf8').split(' ').slice(0, 3).join(' ');
  } catch {
    return 'unknown';
  }
}

let failed = 0;
for (const name of selected) if (!(await runOne(name))) failed++;
console.log(`_Load average at the end: ${loadAverage()}._`);
process.exitCode = failed === 0 ? 0 : 1;
