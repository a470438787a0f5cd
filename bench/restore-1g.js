// Restore + write-back of a 1 GiB state: `shm-restore BACKUP -- true` against the same work
// done with standard tools in the same run (`cp` into /dev/shm, `cp` back beside the
// backup, `sync` that file) and against a bare `cp` into /dev/shm. Once with a dense state
// (the whole tail filled with data, so every byte is really copied), once with a sparse
// one (10 MB used, the rest holes, which must stay holes).
//
// Needs about 3 GiB free in the bench directory ($SHMFD_BENCH_DIR, default the OS temp
// directory) and 2 GiB in /dev/shm; cleans up after itself.
import { spawnSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { ROOT, benchDir, bytes, met, ms, note, ratio, stats, table, timeSpawn, withSpread } from './lib.js';

const SIZE = 2 ** 30;
const SPARSE_USED = 10_000_000;
const REPS = Number(process.env.SHMFD_BENCH_RESTORE_RUNS ?? 7);
const SHM_RESTORE = path.join(ROOT, 'bin', 'shm-restore.js');
const SHM_COPY = `/dev/shm/shmfd-bench-${process.pid}`;

const { MemoryFile } = await import(`${ROOT}/dist/fds/memory-file.js`);
const { SnapshotFile } = await import(`${ROOT}/dist/snapshot/index.js`);

/** Free bytes for an unprivileged writer at `dir`. */
function freeBytes(dir) {
  const s = fs.statfsSync(dir);
  return s.bavail * s.bsize;
}

/**
 * Writes a valid snapshot file of SIZE bytes (entries 0x100, data 0x800, one committed
 * snapshot) whose tail holds `used` bytes of incompressible data from its start; the rest
 * is left as holes.
 */
function makeBackup(file, used) {
  const fd = fs.openSync(file, 'w+', 0o600);
  try {
    fs.ftruncateSync(fd, SIZE);
    const mapping = MemoryFile.fromFd(fd, 'backup').map();
    const writer = new SnapshotFile(mapping.bytes).configure({ entries: 0x100, data: 0x800 });
    writer.commit(new TextEncoder().encode('bench state'));
    const tail = writer.tail.subarray(0, Math.min(used, writer.tail.length));
    const block = Math.min(2 ** 20, tail.length);
    crypto.randomFillSync(tail.subarray(0, block));
    for (let at = block; at < tail.length; at += block) tail.copyWithin(at, 0, Math.min(block, tail.length - at));
    mapping.unmap();
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

function allocated(file) {
  try {
    return fs.statSync(file).blocks * 512;
  } catch {
    return 0;
  }
}

function run(command, args) {
  const r = spawnSync(command, args, { stdio: 'ignore' });
  if (r.status !== 0) throw new Error(`${command} ${args.join(' ')} failed`);
}

/** Same starting point for every command: the backup in the page cache, nothing dirty. */
function warm(file) {
  run('sh', ['-c', 'cat "$1" > /dev/null', 'warm', file]);
  run('sync', []);
}

function measure(label, backup) {
  const dir = path.dirname(backup);
  const copyBack = path.join(dir, 'backup.new');
  const tools = `cp "$1" "$2" && cp "$2" "$3" && sync "$3"`;
  // The same, plus what an atomic replacement adds: rename over the backup (which frees the
  // old one's blocks) and a sync of the directory.
  const toolsMv = `${tools} && mv "$3" "$1" && sync "$4"`;
  const commands = {
    ours: () => timeSpawn(process.execPath, [SHM_RESTORE, backup, '--', 'true']),
    oursV1: () => timeSpawn(process.execPath, [SHM_RESTORE, '--snapshot=restore-v1', backup, '--', 'true']),
    tools: () => timeSpawn('sh', ['-c', tools, 'tools', backup, SHM_COPY, copyBack]),
    toolsMv: () => timeSpawn('sh', ['-c', toolsMv, 'tools', backup, SHM_COPY, copyBack, dir]),
    cp: () => timeSpawn('cp', [backup, SHM_COPY]),
  };
  const times = Object.fromEntries(Object.keys(commands).map((k) => [k, []]));
  const after = {};
  for (let r = 0; r < REPS; r++) {
    // Rotate the order so no command always runs first after the previous one's clean-up.
    const names = Object.keys(commands);
    const order = names.slice(r % names.length).concat(names.slice(0, r % names.length));
    for (const name of order) {
      warm(backup);
      times[name].push(commands[name]());
      if (name === 'ours' || name === 'oursV1' || name === 'toolsMv') after[name] = allocated(backup);
      if (name === 'tools') after.tools = allocated(copyBack);
      fs.rmSync(SHM_COPY, { force: true });
      fs.rmSync(copyBack, { force: true });
    }
    note(`${label}: round ${r + 1}/${REPS}`);
  }
  return { times: Object.fromEntries(Object.entries(times).map(([k, v]) => [k, stats(v)])), after };
}

const base = benchDir();
const need = 3.2 * SIZE;
if (freeBytes(base) < need || freeBytes('/dev/shm') < 2.2 * SIZE) {
  console.log(`### Restore + write-back of 1 GiB\n\nSkipped: needs ${bytes(need)} free in ${base} and 2.2 GiB in /dev/shm.\n`);
  process.exit(0);
}
const dir = fs.mkdtempSync(path.join(base, 'shmfd-bench-'));
const cleanup = () => {
  fs.rmSync(dir, { recursive: true, force: true });
  fs.rmSync(SHM_COPY, { force: true });
};
process.on('SIGINT', () => {
  cleanup();
  process.exit(130);
});
process.on('SIGTERM', () => {
  cleanup();
  process.exit(143);
});

try {
  const results = {};
  for (const [label, used] of [
    ['dense', SIZE],
    ['sparse', SPARSE_USED],
  ]) {
    const backup = path.join(dir, `${label}.state`);
    note(`writing a ${label} 1 GiB snapshot file (${bytes(used)} of data) in ${dir}`);
    makeBackup(backup, used);
    results[label] = { ...measure(label, backup), allocatedBefore: allocated(backup) };
    fs.rmSync(backup, { force: true });
  }

  const rows = [];
  for (const [label, r] of Object.entries(results)) {
    const t = r.times;
    const f = (v) => ms(v);
    const name = label === 'dense' ? '1 GiB, dense' : '1 GiB, 10 MB used (sparse)';
    const dense = label === 'dense';
    /** A row: one measured command against the tools and a bare cp of the same run. */
    const row = (what, times, original, target) => [
      `${name}: ${what}`,
      withSpread(times, f),
      withSpread(t.tools, f),
      ratio(times.median / t.tools.median),
      withSpread(t.cp, f),
      ratio(times.median / t.cp.median),
      original,
      target ? '≤ 1.2× tools' : '—',
      target ? met(times.median <= 1.2 * t.tools.median) : '—',
    ];
    rows.push(row('`shm-restore B -- true`', t.ours, dense ? '1.95 s = 3.3× bare cp' : '—', true));
    rows.push(row('`shm-restore --snapshot=restore-v1 B -- true`', t.oursV1, '—', true));
    rows.push(row('tools + `mv B.new B && sync DIR` (same atomic replacement)', t.toolsMv, '—', false));
  }
  console.log('### Restore + write-back of a 1 GiB state\n');
  console.log(
    table(['figure', 'ours: median (min–max)', 'tools (same run)', 'ours / tools', 'bare cp (same run)', 'ours / bare cp', 'original', 'target', 'met?'], rows),
  );
  for (const [label, r] of Object.entries(results)) {
    const t = r.times;
    console.log(
      `\n${label}: against the same atomic replacement done with tools, ours is ${ratio(t.ours.median / t.toolsMv.median)} ` +
        `(restore-v1: ${ratio(t.oursV1.median / t.toolsMv.median)}).`,
    );
  }
  const s = results.sparse;
  console.log(
    `\n${REPS} runs of each command, order rotated every round; before each run the backup is read once (\`cat > /dev/null\`) ` +
      'and `sync` is called, untimed. Tools: `sh -c \'cp B /dev/shm/x && cp /dev/shm/x B.new && sync B.new\'`; ' +
      'bare cp: `cp B /dev/shm/x`; removing /dev/shm/x and B.new afterwards is not timed (ours frees its memfd inside its own time). ' +
      `Ours includes its Node start (~80 ms). Sparse state: ${bytes(s.allocatedBefore)} allocated before; after a run ours ` +
      `left ${bytes(s.after.ours)} allocated (restore-v1: ${bytes(s.after.oursV1)}), the tools ${bytes(s.after.tools)} (with mv: ${bytes(s.after.toolsMv)}): holes preserved.\n`,
  );
} finally {
  cleanup();
}
