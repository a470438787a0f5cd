// restore-v1 on a 100 MB state: `shm-restore --snapshot=restore-v1` runs
// bench/fixtures/committer.js, which commits its commit time every 10 ms (or, idle,
// nothing). Over a window of WINDOW seconds this samples, from outside:
// - CPU of the host process alone, and of its child (the program), from /proc/PID/stat;
// - bytes the host wrote to disk, from /proc/PID/io write_bytes, and how many backups it
//   made durable (every rename gives the backup a new inode);
// - every 100 ms, the age of the newest durable snapshot: the newest valid slot of the
//   backup on disk holds the time the program committed it.
// Baseline in the same run: persisting the same 100 MB with standard tools,
// `cp /dev/shm/state DIR/copy && sync DIR/copy` (CPU and wall time per copy).
import { spawn, spawnSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { ROOT, benchDir, bytes, met, ms, note, ratio, sig, stats, table, withSpread } from './lib.js';

const SIZE = 100_000_000;
const WINDOW_MS = Number(process.env.SHMFD_BENCH_WINDOW_MS ?? 10_000);
const REPS = Number(process.env.SHMFD_BENCH_V1_RUNS ?? 3);
const SAMPLE_MS = 100;
const SHM_RESTORE = path.join(ROOT, 'bin', 'shm-restore.js');
const COMMITTER = path.join(ROOT, 'bench', 'fixtures', 'committer.js');
const CLK_TCK = Number(spawnSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).stdout.trim() || 100);

const { readSlotState } = await import(`${ROOT}/dist/snapshot/pread.js`);
const { DEFAULT_INTERVAL_MS } = await import(`${ROOT}/dist/restore/snapshotter.js`);

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** utime + stime of a process in seconds, or undefined once it is gone. */
function cpuSeconds(pid) {
  const text = readProc(`/proc/${pid}/stat`);
  if (text === undefined) return undefined;
  // Fields after the command name, which may contain spaces, start after the last ')'.
  const fields = text.slice(text.lastIndexOf(')') + 2).split(' ');
  return (Number(fields[11]) + Number(fields[12])) / CLK_TCK;
}

function writeBytes(pid) {
  const text = readProc(`/proc/${pid}/io`);
  const m = text === undefined ? undefined : /^write_bytes: (\d+)$/m.exec(text);
  return m === undefined || m === null ? undefined : Number(m[1]);
}

function readProc(file) {
  try {
    return fs.readFileSync(file, 'utf8');
  } catch {
    return undefined;
  }
}

/** The pids of the children of `pid` (all its threads). */
function childrenOf(pid) {
  const out = [];
  let tasks = [];
  try {
    tasks = fs.readdirSync(`/proc/${pid}/task`);
  } catch {
    return out;
  }
  for (const tid of tasks) {
    const text = readProc(`/proc/${pid}/task/${tid}/children`);
    if (text !== undefined) out.push(...text.trim().split(/\s+/).filter(Boolean).map(Number));
  }
  return out;
}

/** The newest durable snapshot of the backup: its inode and its payload (commit time). */
function newestDurable(backup) {
  let fd;
  try {
    fd = fs.openSync(backup, 'r');
  } catch {
    return undefined;
  }
  try {
    const st = fs.fstatSync(fd);
    const state = readSlotState(fd, st.size);
    const newest = state?.slots[state.slots.length - 1];
    if (newest === undefined || newest.length !== 8) return { ino: st.ino, time: undefined };
    const buf = Buffer.alloc(8);
    fs.readSync(fd, buf, 0, 8, state.head.dataStart + (newest.offset % state.head.data));
    return { ino: st.ino, time: buf.readDoubleLE(0) };
  } catch {
    return undefined;
  } finally {
    fs.closeSync(fd);
  }
}

/** The host of the scenario running, to stop on SIGTERM/SIGINT. */
let running;

async function scenario(dir, { mode, interval, fresh }) {
  const backup = path.join(dir, 'state');
  if (fresh) fs.rmSync(backup, { force: true });
  const args = ['--snapshot=restore-v1'];
  if (interval !== undefined) args.push('--interval', String(interval));
  const host = spawn(process.execPath, [SHM_RESTORE, ...args, backup, '--', process.execPath, COMMITTER, mode, String(SIZE)], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  running = host;
  const exited = new Promise((resolve) => host.on('exit', (code, signal) => resolve(code ?? signal)));
  let out = '';
  host.stdout.on('data', (d) => (out += d));
  try {
    // Set-up: the program is ready and, when active, a first backup is durable.
    const deadline = Date.now() + 60_000;
    while (!out.includes('ready') || (mode === 'active' && newestDurable(backup)?.time === undefined)) {
      if (Date.now() > deadline) throw new Error(`restore-v1 ${mode}: no first backup within 60 s`);
      await sleep(20);
    }
    await sleep(1000);
    const child = childrenOf(host.pid)[0];
    const start = {
      t: performance.now(),
      host: cpuSeconds(host.pid),
      child: cpuSeconds(child),
      write: writeBytes(host.pid),
      ino: newestDurable(backup)?.ino,
    };
    const ages = [];
    let backups = 0;
    let lastIno = start.ino;
    const end = start.t + WINDOW_MS;
    while (performance.now() < end) {
      await sleep(SAMPLE_MS);
      const d = newestDurable(backup);
      if (d === undefined) continue;
      if (d.ino !== lastIno) {
        backups++;
        lastIno = d.ino;
      }
      if (d.time !== undefined) ages.push(performance.timeOrigin + performance.now() - d.time);
    }
    const seconds = (performance.now() - start.t) / 1000;
    const result = {
      hostCpu: (cpuSeconds(host.pid) - start.host) / seconds,
      childCpu: (cpuSeconds(child) - start.child) / seconds,
      writeRate: (writeBytes(host.pid) - start.write) / seconds,
      backupRate: backups / seconds,
      backups,
      seconds,
      ages,
    };
    return result;
  } finally {
    host.kill('SIGTERM');
    const status = await exited;
    running = undefined;
    if (status !== 0 && status !== 'SIGTERM') note(`shm-restore ended with ${status}`);
  }
}

/** CPU seconds (user + sys of the children) and wall ms of one shell command. */
function timedShell(script, ...args) {
  const t0 = performance.now();
  const r = spawnSync('sh', ['-c', `${script}; times`, 'sh', ...args], { encoding: 'utf8' });
  const wall = performance.now() - t0;
  if (r.status !== 0) throw new Error(`sh -c ${script} failed: ${r.stderr}`);
  // `times` prints the shell's own times, then its children's: "0m0.012s 0m0.345s".
  const lines = r.stdout.trim().split('\n');
  const toS = (t) => {
    const m = /^(\d+)m([\d.]+)s$/.exec(t);
    return Number(m[1]) * 60 + Number(m[2]);
  };
  const [u, s] = lines[lines.length - 1].split(/\s+/).map(toS);
  return { cpu: u + s, wall };
}

function toolsBaseline(dir) {
  const shm = `/dev/shm/shmfd-bench-v1-${process.pid}`;
  const fd = fs.openSync(shm, 'w', 0o600);
  try {
    const block = crypto.randomBytes(2 ** 20);
    for (let at = 0; at < SIZE; at += block.length) fs.writeSync(fd, block, 0, Math.min(block.length, SIZE - at));
  } finally {
    fs.closeSync(fd);
  }
  const copy = path.join(dir, 'copy');
  const runs = [];
  try {
    for (let r = 0; r < 5; r++) {
      runs.push(timedShell('cp "$1" "$2" && sync "$2"', shm, copy));
      fs.rmSync(copy, { force: true });
    }
  } finally {
    fs.rmSync(shm, { force: true });
    fs.rmSync(copy, { force: true });
  }
  return { cpu: stats(runs.map((r) => r.cpu)), wall: stats(runs.map((r) => r.wall)) };
}

const dir = fs.mkdtempSync(path.join(benchDir(), 'shmfd-bench-v1-'));
const cleanup = () => fs.rmSync(dir, { recursive: true, force: true });
for (const signal of ['SIGINT', 'SIGTERM']) {
  process.on(signal, () => {
    running?.kill('SIGKILL');
    cleanup();
    process.exit(1);
  });
}

try {
  note('baseline: cp of 100 MB from /dev/shm to disk + sync');
  const tools = toolsBaseline(dir);
  const scenarios = [
    { label: `active, default interval (${DEFAULT_INTERVAL_MS} ms)`, mode: 'active', interval: undefined, fresh: true },
    { label: 'active, --interval 100', mode: 'active', interval: 100, fresh: true },
    { label: 'active, --interval 1000', mode: 'active', interval: 1000, fresh: true },
    // Restores the backup the last active run left, and commits nothing.
    { label: `idle, default interval (${DEFAULT_INTERVAL_MS} ms)`, mode: 'idle', interval: undefined, fresh: false },
  ];
  const results = scenarios.map(() => []);
  for (let r = 0; r < REPS; r++) {
    for (const [i, s] of scenarios.entries()) {
      note(`restore-v1 ${s.label}: run ${r + 1}/${REPS} (${WINDOW_MS / 1000} s)`);
      results[i].push(await scenario(dir, s));
    }
  }
  const pct = (v) => `${sig(v * 100)} %`;
  const rate = (v) => `${bytes(v)}/s`;
  const rows = [];
  for (const [i, s] of scenarios.entries()) {
    const runs = results[i];
    const host = stats(runs.map((r) => r.hostCpu));
    const child = stats(runs.map((r) => r.childCpu));
    const write = stats(runs.map((r) => r.writeRate));
    const backupRate = stats(runs.map((r) => r.backupRate));
    const backups = runs.reduce((sum, r) => sum + r.backups, 0);
    const hostCpuSeconds = runs.reduce((sum, r) => sum + r.hostCpu * r.seconds, 0);
    const perBackup = backups === 0 ? undefined : hostCpuSeconds / backups;
    const allAges = runs.flatMap((r) => r.ages);
    const idle = s.mode === 'idle';
    const age = idle || allAges.length === 0 ? undefined : { median: stats(runs.map((r) => stats(r.ages).median)), max: Math.max(...allAges) };
    rows.push([
      s.label,
      withSpread(host, pct),
      withSpread(child, pct),
      withSpread(write, rate),
      `${sig(backupRate.median)}/s (${backups} in ${runs.length} runs)`,
      perBackup === undefined ? '—' : `${ms(perBackup * 1000)} = ${ratio(perBackup / tools.cpu.median)}`,
      age === undefined ? '— (nothing new to persist)' : `${withSpread(age.median, ms)}; max ${ms(age.max)}`,
      idle
        ? `no copies, ~0 CPU: ${met(backups === 0 && host.median < 0.01)}`
        : `CPU < 10 %: ${met(host.max < 0.1)}; median age < 1 s: ${met(age !== undefined && age.median.max < 1000)}; max age < 1 s: ${met(age !== undefined && age.max < 1000)}`,
    ]);
  }
  console.log(`### restore-v1 with a ${SIZE / 1e6} MB state\n`);
  console.log(
    table(
      [
        'program, host interval',
        'host CPU (% of a core)',
        'program CPU',
        'host disk writes',
        'backups made durable',
        'host CPU per backup = × tools',
        'age of newest durable snapshot: median (min–max of runs); max',
        'targets met?',
      ],
      rows,
    ),
  );
  console.log(
    `\nBaseline, same run: \`cp /dev/shm/state DIR/copy && sync DIR/copy\` of the same 100 MB takes ` +
      `${withSpread(tools.cpu, (v) => ms(v * 1000))} of CPU and ${withSpread(tools.wall, ms)} of wall time (5 runs). ` +
      `Original: a backup every 175–220 ms, 52–65 % of a core, 470–630 MB/s of disk writes. Targets: host CPU well under 10 % ` +
      `of a core, age under 1 s; idle: no copies and near-zero CPU. ${REPS} runs of ${WINDOW_MS / 1000} s per row (after set-up ` +
      `and 1 s of settling), the age sampled every ${SAMPLE_MS} ms; CPU from /proc/PID/stat (host alone; the program separately), ` +
      'disk writes from /proc/PID/io write_bytes of the host.\n',
  );
} finally {
  cleanup();
}
