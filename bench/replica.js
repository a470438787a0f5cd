// --replica on the 100 MB and 1 GiB states of the restore-v1 benchmark, against a
// nats-server -js started here (its store in the bench directory). `shm-restore
// --snapshot=restore-v1` runs, for WINDOW seconds, once without and once with --replica:
// - 100 MB: bench/fixtures/committer.js marked (a commit every 10 ms after touching and
//   marking 16 random 4 KiB pages: 6.25 MiB/s of scattered change, incremental rounds);
// - 1 GiB: bench/fixtures/big-state.js (an append log filled to 90 %, then ~1 MB/s of
//   appends and map updates, incremental rounds), filled once before both runs.
// Measured from outside:
// - host CPU (the shm-restore process alone, /proc/PID/stat), and the server's;
// - bytes the server received per second (its monitoring endpoint, /varz in_bytes),
//   against the program's rate of change;
// - every 100 ms, the age of the replica's newest state: now minus the commit time held
//   by the backup it was sent from (backups sampled every 25 ms; one not seen counts from
//   when it became durable, a lower bound);
// - then, 3 times, the time from starting a host in an empty directory to its program's
//   first line (state fetched from the replica, checked, made durable, restored), against
//   copying the same data messages out of JetStream with the NATS client alone
//   (bench/fixtures/nats-copy.js, direct gets, file synced) in the same run.
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import { connect } from '@nats-io/transport-node';
import { jetstreamManager } from '@nats-io/jetstream';
import { Kvm } from '@nats-io/kv';
import { ROOT, benchDir, bytes, freePort, met, ms, newestDurable, note, ratio, sig, stats, table, withSpread } from './lib.js';

const BIG_STATE = path.join(ROOT, 'bench', 'fixtures', 'big-state.js');
/** The 1 GiB state's change, as in the restore-v1 benchmark's large states. */
const BIG_CHANGE = 1_000_000;
const BIG_CAPACITY = 2 ** 30 - 2 ** 26 - 2 ** 20;
const STATES = [
  // 16 pages of 4 KiB touched per commit, a commit every 10 ms.
  { size: 100_000_000, what: 'dense, marked', program: () => [COMMITTER, 'marked', '100000000'], change: 16 * 4096 * 100 },
  { size: 2 ** 30, what: 'log + map', program: () => [BIG_STATE, String(BIG_CAPACITY), String(Math.floor((BIG_CAPACITY * 0.9) / 2 ** 16) * 2 ** 16), String(BIG_CHANGE)], change: BIG_CHANGE, big: true },
];
const WINDOW_MS = Number(process.env.SHMFD_BENCH_WINDOW_MS ?? 10_000);
/** restore-v1 paces a 1 GiB state to a round every several seconds: a longer window sees a few. */
const windowFor = (size) => (size > 2 ** 29 ? 3 * WINDOW_MS : WINDOW_MS);
const STARTS = 3;
const SHM_RESTORE = path.join(ROOT, 'bin', 'shm-restore.js');
const COMMITTER = path.join(ROOT, 'bench', 'fixtures', 'committer.js');
const NATS_COPY = path.join(ROOT, 'bench', 'fixtures', 'nats-copy.js');
const CLK_TCK = Number(spawnSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).stdout.trim() || 100);
const NATS_SERVER = ['/usr/sbin/nats-server', '/usr/bin/nats-server', '/usr/local/bin/nats-server'].find((f) => fs.existsSync(f));

const sleep = (t) => new Promise((resolve) => setTimeout(resolve, t));

function cpuSeconds(pid) {
  try {
    const text = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    const fields = text.slice(text.lastIndexOf(')') + 2).split(' ');
    return (Number(fields[11]) + Number(fields[12])) / CLK_TCK;
  } catch {
    return undefined;
  }
}

function varz(port) {
  return new Promise((resolve, reject) => {
    http
      .get(`http://127.0.0.1:${port}/varz`, (res) => {
        let body = '';
        res.on('data', (d) => (body += d));
        res.on('end', () => resolve(JSON.parse(body)));
      })
      .on('error', reject);
  });
}

function startHost(args, dir) {
  const host = spawn(process.execPath, [SHM_RESTORE, ...args], { stdio: ['ignore', 'pipe', 'pipe'], cwd: dir, detached: true });
  let out = '';
  let err = '';
  host.stdout.on('data', (d) => (out += d));
  host.stderr.on('data', (d) => (err += d));
  const exited = new Promise((resolve) => host.on('exit', (code, signal) => resolve(code ?? signal)));
  return { host, exited, out: () => out, err: () => err };
}

async function scenario(dir, state, url, jsm, monitorPort, serverPid) {
  const { size } = state;
  const backup = path.join(dir, 'state');
  const args = ['--snapshot=restore-v1', ...(url === undefined ? [] : ['--replica', url]), backup, '--', process.execPath, ...state.program()];
  const h = startHost(args, dir);
  try {
    // The 1 GiB state's first replicated state is all of it.
    const deadline = Date.now() + 600_000;
    let clock;
    while (!h.out().includes('ready') || newestDurable(backup, clock)?.time === undefined || (url !== undefined && (await manifest(jsm)) === undefined)) {
      if (Date.now() > deadline) throw new Error(`no first ${url === undefined ? 'backup' : 'replicated state'} within 600 s: ${h.err()}`);
      if (h.host.exitCode !== null) throw new Error(`the host ended: ${h.err()}`);
      const m = /^clock (\d+) (\d+)$/m.exec(h.out());
      if (m !== null) clock = { index: Number(m[1]), offset: Number(m[2]) };
      await sleep(50);
    }
    await sleep(1000);
    const commitTimes = new Map();
    const start = { t: performance.now(), host: cpuSeconds(h.host.pid), server: cpuSeconds(serverPid), in: (await varz(monitorPort)).in_bytes };
    const ages = [];
    const localAges = [];
    let unseen = 0;
    let lastAgeSample = 0;
    const end = start.t + windowFor(size);
    while (performance.now() < end) {
      await sleep(25);
      const d = newestDurable(backup, clock);
      if (d?.time !== undefined) commitTimes.set(d.mtime, d.time);
      const sample = performance.now() - lastAgeSample >= 100;
      if (sample) {
        lastAgeSample = performance.now();
        if (d?.time !== undefined) localAges.push(Date.now() - d.time);
      }
      if (url !== undefined && sample) {
        const m = await manifest(jsm);
        if (m !== undefined) {
          const time = commitTimes.get(m.durableAt);
          if (time === undefined) unseen++;
          ages.push(Date.now() - (time ?? m.durableAt));
        }
      }
    }
    const seconds = (performance.now() - start.t) / 1000;
    return {
      hostCpu: (cpuSeconds(h.host.pid) - start.host) / seconds,
      serverCpu: (cpuSeconds(serverPid) - start.server) / seconds,
      inRate: ((await varz(monitorPort)).in_bytes - start.in) / seconds,
      ages,
      localAges,
      unseen,
    };
  } finally {
    h.host.kill('SIGTERM');
    await h.exited;
  }
}

let NAME = 'bench';
async function manifest(jsm) {
  // Not before the stream holds a message: nats-server 2.9.10 crashes on a get that arrives
  // while the host is creating the stream (docs/replica.md, "Server features used").
  const info = await jsm.streams.info(`SHMFD_${NAME}`).catch(() => undefined);
  if (info === undefined || info.state.last_seq === 0) return undefined;
  const m = await jsm.streams.getMessage(`SHMFD_${NAME}`, { last_by_subj: `shmfd.${NAME}.manifest` }).catch(() => null);
  return m === null ? undefined : m.json();
}

/** Wall ms from starting a host in an empty directory to its program's first line. */
async function startFromReplica(dir, url, kv) {
  fs.rmSync(dir, { recursive: true, force: true });
  fs.mkdirSync(dir);
  const t0 = performance.now();
  const h = startHost(['--snapshot=restore-v1', '--log-level', 'info', '--replica', url, path.join(dir, 'state'), '--', 'sh', '-c', 'echo ready; exec sleep 1000'], dir);
  while (!h.out().includes('ready')) {
    if (h.host.exitCode !== null) throw new Error(`the host ended: ${h.err()}`);
    await sleep(5);
  }
  const wall = performance.now() - t0;
  if (!/starting from the replica/.test(h.err())) throw new Error(`did not start from the replica: ${h.err()}`);
  // Killed, not stopped: a stop would send the state back. Free its lease as an operator would.
  process.kill(-h.host.pid, 'SIGKILL');
  await h.exited;
  await kv.delete('holder');
  return wall;
}

function copyOut(port, file) {
  const t0 = performance.now();
  const r = spawnSync(process.execPath, [NATS_COPY, `127.0.0.1:${port}`, NAME, file], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`nats-copy failed: ${r.stderr}`);
  const wall = performance.now() - t0;
  fs.rmSync(file, { force: true });
  return wall;
}

if (NATS_SERVER === undefined) {
  console.log('### --replica\n\nSkipped: needs nats-server (Debian package nats-server).\n');
  process.exit(0);
}
const dir = fs.mkdtempSync(path.join(benchDir(), 'shmfd-bench-replica-'));
const port = await freePort();
const monitorPort = await freePort();
const server = spawn(NATS_SERVER, ['-js', '-a', '127.0.0.1', '-p', String(port), '-m', String(monitorPort), '-sd', path.join(dir, 'js')], { stdio: 'ignore' });
const cleanup = () => {
  server.kill('SIGKILL');
  fs.rmSync(dir, { recursive: true, force: true });
};
for (const signal of ['SIGINT', 'SIGTERM']) {
  process.on(signal, () => {
    cleanup();
    process.exit(1);
  });
}

try {
  let nc;
  for (let i = 0; nc === undefined; i++) {
    nc = await connect({ servers: `127.0.0.1:${port}` }).catch(async (e) => {
      if (i > 100) throw e;
      await sleep(50);
      return undefined;
    });
  }
  const jsm = await jetstreamManager(nc);
  const rows = [];
  const startRows = [];
  for (const state of STATES) {
    const { size, change } = state;
    NAME = `bench${size}`;
    const url = `nats://127.0.0.1:${port}/${NAME}`;
    const hostDir = path.join(dir, 'a');
    fs.mkdirSync(hostDir, { recursive: true });
    const backup = path.join(hostDir, 'state');
    const fill = () => {
      if (state.big !== true) return fs.rmSync(backup, { force: true });
      note(`${bytes(size)}: filling the log`);
      fs.rmSync(backup, { force: true });
      const filled = spawnSync(process.execPath, [SHM_RESTORE, backup, '--', process.execPath, ...state.program(), '--fill-only'], { stdio: ['ignore', 'ignore', 'inherit'] });
      if (filled.status !== 0) throw new Error(`filling the ${bytes(size)} state failed: ${filled.status}`);
    };
    fill();
    note(`${bytes(size)}: without --replica (${windowFor(size) / 1000} s)`);
    const without = await scenario(hostDir, state, undefined, jsm, monitorPort, server.pid);
    fill();
    note(`${bytes(size)}: with --replica (${windowFor(size) / 1000} s)`);
    const withReplica = await scenario(hostDir, state, url, jsm, monitorPort, server.pid);
    const age = stats(withReplica.ages);
    const pct = (v) => `${sig(v * 100)} %`;
    rows.push([
      `${bytes(size)} (${state.what})`,
      pct(without.hostCpu),
      pct(withReplica.hostCpu),
      pct(withReplica.serverCpu),
      `${bytes(withReplica.inRate)}/s`,
      `${bytes(change)}/s (${ratio(withReplica.inRate / change)})`,
      `${ms(age.median)}; max ${ms(age.max)} (${age.n} samples, ${withReplica.unseen} lower bounds)`,
      `${ms(stats(withReplica.localAges).median)}; without replica ${ms(stats(without.localAges).median)}`,
      `median age < 1 s: ${met(age.median < 1000)}`,
    ]);
    const kv = await new Kvm(nc).open(`SHMFD_LEASE_${NAME}`);
    // A host whose last state was still being sent at its stop leaves its lease to expire.
    await kv.delete('holder');
    const starts = [];
    const copies = [];
    for (let r = 0; r < STARTS; r++) {
      note(`${bytes(size)}: start from the replica, run ${r + 1}/${STARTS}`);
      starts.push(await startFromReplica(path.join(dir, 'b'), url, kv));
      copies.push(copyOut(port, path.join(dir, 'copy')));
    }
    const s = stats(starts);
    const c = stats(copies);
    startRows.push([bytes(size), withSpread(s, ms), withSpread(c, ms), ratio(s.median / c.median), `≤ 1.5×: ${met(s.median / c.median <= 1.5)}`]);
    fs.rmSync(hostDir, { recursive: true, force: true });
    await jsm.streams.delete(`SHMFD_${NAME}`);
  }
  await nc.close();
  console.log('### --replica: cost and age of the replicated state\n');
  console.log(
    table(
      ['state', 'host CPU without replica', 'host CPU with replica', 'nats-server CPU', 'bytes sent', "program's rate of change (sent ÷ change)", 'age of the newest replicated state: median; max', 'age of the newest local backup: median', 'target met?'],
      rows,
    ),
  );
  console.log(`\nOne run of ${WINDOW_MS / 1000} s per row (${(3 * WINDOW_MS) / 1000} s for 1 GiB) after set-up and 1 s of settling; CPU in % of one core. A state sends the chunks (8 KiB at 100 MB, 64 KiB at 1 GiB) that changed since the replica's previous one; the first (all of it) is sent before the window.\n`);
  console.log('### --replica: start on a new host from the replica\n');
  console.log(table(['state', 'shm-restore start to first line: median (min–max)', 'NATS client copy out of JetStream + fsync', 'ratio', 'target met?'], startRows));
  console.log(`\n${STARTS} runs each, alternating; the start includes connecting, taking the lease, fetching, checking the digest, syncing, renaming, and restoring into memory.\n`);
} finally {
  cleanup();
}
