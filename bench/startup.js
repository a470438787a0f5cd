// Start-up cost of the `shm-fd` wrapper: `shm-fd true` against `true` and `node -e 0`, and
// `shm-fd node -e 0` against `node -e 0`. The commands run interleaved, one at a time, so
// the machine's load drifts over all of them alike.
import path from 'node:path';
import { ROOT, ms, note, ratio, sig, stats, table, timeSpawn, withSpread } from './lib.js';

const RUNS = Number(process.env.SHMFD_BENCH_STARTUP_RUNS ?? 30);
const SHM_FD = path.join(ROOT, 'bin', 'shm-fd.js');
const node = process.execPath;

const esm = (code) => [node, ['--input-type=module', '-e', code]];
const COMMANDS = {
  true: ['true', []],
  'node -e 0': [node, ['-e', '0']],
  'shm-fd true': [SHM_FD, ['true']],
  'shm-fd node -e 0': [SHM_FD, [node, '-e', '0']],
  // Where the wrapper's time goes: each import on top of an empty ES module.
  'esm: nothing': esm(''),
  'esm: import koffi': esm(`import ${JSON.stringify(path.join(ROOT, 'node_modules', 'koffi', 'index.js'))};`),
  'esm: import dist/system/libc.js': esm(`import ${JSON.stringify(path.join(ROOT, 'dist', 'system', 'libc.js'))};`),
  'esm: import dist/cli/shm-fd.js': esm(`import ${JSON.stringify(path.join(ROOT, 'dist', 'cli', 'shm-fd.js'))};`),
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
  row('shm-fd true', 'true', '+0.75 ms over `true`', "none (floor: Node's start)"),
  row('shm-fd true', 'node -e 0'),
  row('shm-fd node -e 0', 'node -e 0'),
];
const steps = [
  ['koffi (the FFI and its native library)', 'esm: import koffi', 'esm: nothing'],
  ['binding the libc functions (src/system/libc.ts)', 'esm: import dist/system/libc.js', 'esm: import koffi'],
  ["the CLI's other modules", 'esm: import dist/cli/shm-fd.js', 'esm: import dist/system/libc.js'],
  ['parsing, the memfd, the exec (shm-fd true − imports − `true`)', 'shm-fd true', 'esm: import dist/cli/shm-fd.js'],
].map(([what, a, b]) => [what, ms(over(a, b))]);
console.log('### Start-up of the wrapper\n');
console.log(table(['command', 'wall time: median (min–max)', 'baseline (same run)', 'ratio (difference)', 'original', 'target'], rows));
console.log(
  `\n${RUNS} runs of each, interleaved, timed from a Node parent with \`spawnSync\` (the spawn itself is in every figure, ` +
    `so \`true\` is the floor). The wrapper's own cost is its Node start plus loading koffi and the exec: ` +
    `${sig(over('shm-fd true', 'node -e 0'))} ms over \`node -e 0\`.\n`,
);
console.log('Where the wrapper\'s time goes (same run; differences of medians, each import measured on top of an empty ES module):\n');
console.log(table(['step', 'cost'], steps));
console.log('');
