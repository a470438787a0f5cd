// Start-up cost of the wrappers: `shm-fd true` and `shm-restore BACKUP -- true` against
// `true` and `node -e 0`, and `shm-fd node -e 0` against `node -e 0`, on the Node that runs
// this (run it with each line's node). The commands run interleaved, one at a time, so the
// machine's load drifts over all of them alike.
import fs from 'node:fs';
import path from 'node:path';
import { ROOT, benchDir, ms, note, ratio, sig, stats, table, timeSpawn, withSpread } from './lib.js';

const RUNS = Number(process.env.SHMFD_BENCH_STARTUP_RUNS ?? 30);
const SHM_FD = path.join(ROOT, 'bin', 'shm-fd.js');
const SHM_RESTORE = path.join(ROOT, 'bin', 'shm-restore.js');
const node = process.execPath;
// bin/ starts with `#!/usr/bin/env node`: the node found first on PATH must be the one
// measured (run with another line's binary, the wrappers ran on the machine's Node).
process.env.PATH = `${path.dirname(node)}:${process.env.PATH ?? ''}`;
const dir = fs.mkdtempSync(path.join(benchDir(), 'shmfd-bench-startup-'));
process.on('exit', () => fs.rmSync(dir, { recursive: true, force: true }));
const BACKUP = path.join(dir, 'state');

// Each import on top of an empty ES module that turns the compile cache on as the commands do.
const CACHE = JSON.stringify(path.join(ROOT, 'dist', 'cli', 'compile-cache.js'));
const esm = (code) => [node, ['--input-type=module', '-e', `import ${CACHE};\n${code}`]];
const dist = (file) => `await import(${JSON.stringify(path.join(ROOT, 'dist', file))});`;
// koffi as the commands load it: its native module and libc, at the first libc call.
const requireKoffi = `(await import(${JSON.stringify(path.join(ROOT, 'dist', 'system', 'libc.js'))})).kernelPageSize();`;
const COMMANDS = {
  true: ['true', []],
  'node -e 0': [node, ['-e', '0']],
  'shm-fd true': [SHM_FD, ['true']],
  'shm-restore BACKUP -- true': [SHM_RESTORE, [BACKUP, '--', 'true']],
  'shm-fd node -e 0': [SHM_FD, [node, '-e', '0']],
  'shm-fd --version': [SHM_FD, ['--version']],
  // Where the wrapper's time goes.
  'esm: nothing': esm(''),
  'esm: require koffi': esm(requireKoffi),
  "esm: shm-fd true's modules": esm(dist('cli/shm-fd.js') + dist('exec/exec.js')),
  "esm: shm-fd true's modules and koffi": esm(dist('cli/shm-fd.js') + dist('exec/exec.js') + requireKoffi),
  "esm: shm-restore's modules and koffi": esm(dist('cli/shm-restore.js') + requireKoffi),
};

const times = Object.fromEntries(Object.keys(COMMANDS).map((k) => [k, []]));
// One untimed round loads the files into the page cache.
for (const [command, args] of Object.values(COMMANDS)) timeSpawn(command, args);
note(`${RUNS} interleaved runs of ${Object.keys(COMMANDS).length} commands`);
for (let r = 0; r < RUNS; r++) {
  for (const [name, [command, args]] of Object.entries(COMMANDS)) times[name].push(timeSpawn(command, args));
}
const s = Object.fromEntries(Object.entries(times).map(([k, v]) => [k, stats(v)]));
const f = (v) => ms(v);
const over = (a, b) => s[a].median - s[b].median;

/** A row: `name` timed against `base`, as a ratio and a difference. */
const row = (name, base, original = '—', target = '—') => [
  `\`${name}\``,
  withSpread(s[name], f),
  base === undefined ? '—' : `\`${base}\``,
  base === undefined ? '—' : `${ratio(s[name].median / s[base].median)} (+${ms(over(name, base))})`,
  original,
  target,
];
const rows = [
  row('true'),
  row('node -e 0', 'true', '61–65 ms (absolute)'),
  row('shm-fd true', 'true', '+0.75 ms over `true`'),
  row('shm-fd true', 'node -e 0', '—', '≤ 1.1×'),
  row('shm-restore BACKUP -- true', 'node -e 0', '—', '≤ 1.1×'),
  row('shm-fd node -e 0', 'node -e 0'),
  row('shm-fd --version', 'node -e 0'),
];
const steps = [
  ["Node's start as an ES module (bin/ is one) over `node -e 0`", 'esm: nothing', 'node -e 0'],
  ['koffi (its native module and libc, at the first libc call)', 'esm: require koffi', 'esm: nothing'],
  ["shm-fd's modules (without koffi)", "esm: shm-fd true's modules", 'esm: nothing'],
  ['the work: parsing, the memfd, the exec (shm-fd true − its modules and koffi)', 'shm-fd true', "esm: shm-fd true's modules and koffi"],
  ["shm-restore's modules (without koffi)", "esm: shm-restore's modules and koffi", 'esm: require koffi'],
  [
    "shm-restore's work: the restore, the setpriv probe, the child (setpriv, sh, true), the write-back with fsync",
    'shm-restore BACKUP -- true',
    "esm: shm-restore's modules and koffi",
  ],
].map(([what, a, b]) => [what, ms(over(a, b))]);
console.log(`### Start-up of the wrappers (Node ${process.version})\n`);
console.log(table(['command', 'wall time: median (min–max)', 'baseline (same run)', 'ratio (difference)', 'original', 'target'], rows));
console.log(
  `\n${RUNS} runs of each, interleaved, timed from a Node parent with \`spawnSync\` (the spawn itself is in every figure, ` +
    `so \`true\` is the floor); BACKUP is a new file of the default size in ${benchDir()} before the first run, ` +
    `restored and written back (with fsync) by every run after it. Over \`node -e 0\`: \`shm-fd true\` ` +
    `${sig(over('shm-fd true', 'node -e 0'))} ms, \`shm-restore BACKUP -- true\` ${sig(over('shm-restore BACKUP -- true', 'node -e 0'))} ms.\n`,
);
console.log('Where the time goes (same run; differences of medians, each import measured on top of an empty ES module):\n');
console.log(table(['step', 'cost'], steps));
console.log('');
