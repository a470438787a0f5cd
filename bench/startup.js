// Start-up cost of the `shm-fd` wrapper: `shm-fd true` against `true` and `node -e 0`, and
// `shm-fd node -e 0` against `node -e 0`. The commands run interleaved, one at a time, so
// the machine's load drifts over all of them alike.
import path from 'node:path';
import { ROOT, ms, note, ratio, sig, stats, table, timeSpawn, withSpread } from './lib.js';

const RUNS = Number(process.env.SHMFD_BENCH_STARTUP_RUNS ?? 30);
const SHM_FD = path.join(ROOT, 'bin', 'shm-fd.js');
const node = process.execPath;

const COMMANDS = {
  true: ['true', []],
  'node -e 0': [node, ['-e', '0']],
  'shm-fd true': [SHM_FD, ['true']],
  'shm-fd node -e 0': [SHM_FD, [node, '-e', '0']],
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

const rows = [
  ['`true`', withSpread(s.true, f), '—', '—', '—', '—'],
  ['`node -e 0`', withSpread(s['node -e 0'], f), '`true`', ratio(s['node -e 0'].median / s.true.median), '61–65 ms (absolute)', '—'],
  [
    '`shm-fd true`',
    withSpread(s['shm-fd true'], f),
    '`true`',
    `${ratio(s['shm-fd true'].median / s.true.median)} (+${ms(over('shm-fd true', 'true'))})`,
    '+0.75 ms over `true`',
    'none (floor: Node\'s start)',
  ],
  [
    '`shm-fd true`',
    withSpread(s['shm-fd true'], f),
    '`node -e 0`',
    `${ratio(s['shm-fd true'].median / s['node -e 0'].median)} (+${ms(over('shm-fd true', 'node -e 0'))})`,
    '—',
    '—',
  ],
  [
    '`shm-fd node -e 0`',
    withSpread(s['shm-fd node -e 0'], f),
    '`node -e 0`',
    `${ratio(s['shm-fd node -e 0'].median / s['node -e 0'].median)} (+${ms(over('shm-fd node -e 0', 'node -e 0'))})`,
    '—',
    '—',
  ],
];
console.log('### Start-up of the wrapper\n');
console.log(table(['command', 'wall time: median (min–max)', 'baseline (same run)', 'ratio (difference)', 'original', 'target'], rows));
console.log(
  `\n${RUNS} runs of each, interleaved, timed from a Node parent with \`spawnSync\` (the spawn itself is in every figure, ` +
    `so \`true\` is the floor). The wrapper's own cost is its Node start plus loading koffi and the exec: ` +
    `${sig(over('shm-fd true', 'node -e 0'))} ms over \`node -e 0\`.\n`,
);
