// The progress line of long copies (src/restore/progress.ts): byte and duration formats,
// and a line drawn only on a terminal (a real pseudo-terminal here), only when enabled,
// only once an operation has run for a second, and removed when it is done.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { formatBytes, formatDuration, Progress } from '../dist/restore/progress.js';
import { NODE, PYTHON, ROOT, run, tempDir } from './helpers.js';

test('byte counts in decimal units, one decimal from a kB on', () => {
  /** @type {Array<[number, string]>} */
  const cases = [
    [0, '0 B'],
    [999, '999 B'],
    [1000, '1.0 kB'],
    [1234, '1.2 kB'],
    [999_949, '999.9 kB'],
    [1_000_000, '1.0 MB'],
    [12_345_678, '12.3 MB'],
    [5e9, '5.0 GB'],
    [2.5e12, '2.5 TB'],
    [7e15, '7000.0 TB'],
  ];
  for (const [bytes, text] of cases) assert.equal(formatBytes(bytes), text, String(bytes));
});

test('durations: ms with a decimal below 10 ms, whole ms, seconds, minutes, hours', () => {
  /** @type {Array<[number, string]>} */
  const cases = [
    [0.25, '0.3 ms'],
    [9.94, '9.9 ms'],
    [10, '10 ms'],
    [850.4, '850 ms'],
    [1000, '1.0 s'],
    [2400, '2.4 s'],
    [59_949, '59.9 s'],
    [60_000, '1 min 0 s'],
    [185_000, '3 min 5 s'],
    [3_599_000, '59 min 59 s'],
    [3_600_000, '1 h 0 min'],
    [7_530_000, '2 h 5 min'],
  ];
  for (const [ms, text] of cases) assert.equal(formatDuration(ms), text, String(ms));
});

test('no progress line where stderr is no terminal (a pipe, a file), nor when it is disabled', (t) => {
  const file = path.join(tempDir(t), 'log');
  const fd = fs.openSync(file, 'w');
  t.after(() => fs.closeSync(fd));
  assert.equal(Progress.start('copying', true, fd), undefined, 'a file');
  const fifo = path.join(tempDir(t), 'fifo');
  assert.equal(spawnSync('mkfifo', [fifo]).status, 0);
  const pipe = fs.openSync(fifo, 'r+'); // both ends at once, so the open does not wait
  t.after(() => fs.closeSync(pipe));
  assert.equal(Progress.start('copying', true, pipe), undefined, 'a pipe');
  assert.equal(fs.readFileSync(file, 'utf8'), '');
});

/**
 * Runs `program` (an ES module) with its stderr on a new pseudo-terminal and returns
 * what the terminal received; stdout stays a pipe.
 * @param {string} program
 */
async function onTerminal(program) {
  const relay = [
    'import os, subprocess, sys',
    'master, slave = os.openpty()',
    'child = subprocess.Popen(sys.argv[1:], stderr=slave)',
    'os.close(slave)',
    'seen = b""',
    'while True:',
    '    try:',
    '        data = os.read(master, 65536)',
    '    except OSError:',
    '        break',
    '    if not data:',
    '        break',
    '    seen += data',
    'child.wait()',
    'sys.stderr.buffer.write(seen)',
    'sys.exit(child.returncode)',
  ].join('\n');
  const r = await run(PYTHON, ['-c', relay, NODE, '--input-type=module', '-e', program]);
  assert.equal(r.code, 0, r.stderr);
  return r;
}

const IMPORT = `import { Progress } from ${JSON.stringify(path.join(ROOT, 'dist', 'restore', 'progress.js'))};`;

test('on a terminal: nothing during the first second, then the line with percent, bytes and rate, removed when done', async () => {
  const program = `${IMPORT}
    const progress = Progress.start('shm-restore: copying');
    console.log(progress === undefined ? 'none' : 'started');
    progress.update(10, 100);
    console.log('early update done');
    const started = performance.now();
    await new Promise((resolve) => setTimeout(resolve, 1100));
    console.log(performance.now() - started >= 1000 ? 'a second passed' : 'too early');
    progress.update(2_500_000, 10_000_000);
    progress.done();
    progress.done(); // nothing left to remove
    console.log(Progress.start('disabled', false) === undefined ? 'disabled: none' : 'disabled: started');`;
  const r = await onTerminal(program);
  assert.equal(r.stdout, 'started\nearly update done\na second passed\ndisabled: none\n');
  const erase = '\r\x1b[K';
  assert.ok(r.stderr.startsWith(erase) && r.stderr.endsWith(erase), `drawn and erased: ${JSON.stringify(r.stderr)}`);
  assert.match(r.stderr.slice(erase.length, -erase.length), /^shm-restore: copying: 25% \(2\.5 MB of 10\.0 MB, [0-9.]+ (kB|MB)\/s\)$/);
});

test('on a terminal, an operation done within its first second leaves nothing on it', async () => {
  const r = await onTerminal(`${IMPORT}
    const progress = Progress.start('quick');
    progress.update(50, 100);
    progress.update(100, 100);
    progress.done();
    console.log('done');`);
  assert.equal(r.stdout, 'done\n');
  assert.equal(r.stderr, '');
});
