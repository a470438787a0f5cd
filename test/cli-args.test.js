// The command-line parser both CLIs share (src/cli/args.ts): options before the command,
// `--`, values in every spelling, repeated options, sizes with suffixes, and the one-line
// usage errors; --help, --version, --log-level and SHMFD_LOG in a real child process,
// since they write to its stdout and stderr.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { last, parseArgs, parseSize } from '../dist/cli/args.js';
import { cleanEnv, NODE, ROOT, run } from './helpers.js';

/** @type {import('../dist/cli/args.js').OptionSpec[]} */
const SPECS = [
  { name: 'size', short: 'S', value: true },
  { name: 'socket', short: 's', value: true },
  { name: 'help', short: 'h' },
  { name: 'no-pid' },
];

/** Asserts that `fn` throws the usage error `message` (ERR_INVALID_ARGUMENT). */
function throwsUsage(/** @type {() => unknown} */ fn, /** @type {string} */ message) {
  assert.throws(fn, { name: 'ShmfdError', code: 'ERR_INVALID_ARGUMENT', message });
}

test('options come first: the first argument that is not an option starts the command, whose options stay its own', () => {
  const parsed = parseArgs(['-h', '--size', '4096', 'ls', '-l', '--size', '1', '--', 'x'], SPECS, 'shm-fd');
  assert.deepEqual([...parsed.options], [
    ['help', ['']],
    ['size', ['4096']],
  ]);
  assert.deepEqual(parsed.rest, ['ls', '-l', '--size', '1', '--', 'x']);
  assert.deepEqual(parseArgs(['--no-pid', '--', '-h', 'a'], SPECS, 'shm-fd').rest, ['-h', 'a'], '-- ends the options');
  assert.deepEqual(parseArgs(['-', 'a'], SPECS, 'shm-fd').rest, ['-', 'a'], '- alone is a command, not an option');
  assert.deepEqual(parseArgs([], SPECS, 'shm-fd'), { options: new Map(), rest: [] });
});

test('a value in every spelling, and a repeated option keeps every value in order', () => {
  const parsed = parseArgs(['--socket', 'a', '--socket=b=c', '-s', 'd', '-se', '--socket='], SPECS, 'shm-fd');
  assert.deepEqual(parsed.options.get('socket'), ['a', 'b=c', 'd', 'e', '']);
  assert.equal(last(parsed, 'socket'), '');
  assert.equal(last(parsed, 'size'), undefined);
  assert.deepEqual(parseArgs(['--size', '--help'], SPECS, 'shm-fd').options.get('size'), ['--help'], 'the next argument is the value, whatever it looks like');
});

test('mistakes in the options are one usage error that names the option and points at the help', () => {
  throwsUsage(() => parseArgs(['--sise', '1'], SPECS, 'shm-fd'), 'unknown option --sise (see shm-fd --help)');
  throwsUsage(() => parseArgs(['-x'], SPECS, 'shm-restore'), 'unknown option -x (see shm-restore --help)');
  throwsUsage(() => parseArgs(['--help=yes'], SPECS, 'shm-fd'), 'option --help takes no value (see shm-fd --help)');
  throwsUsage(() => parseArgs(['-hx'], SPECS, 'shm-fd'), 'option --help takes no value (see shm-fd --help)');
  throwsUsage(() => parseArgs(['--size'], SPECS, 'shm-fd'), 'option --size needs a value (see shm-fd --help)');
  throwsUsage(() => parseArgs(['-S'], SPECS, 'shm-fd'), 'option --size needs a value (see shm-fd --help)');
});

test('sizes: bytes, or a binary suffix K, M, G, T (with an optional B or iB, any case); nothing else', () => {
  /** @type {Array<[string, number]>} */
  const good = [
    ['0', 0],
    ['4096', 4096],
    ['64K', 64 * 2 ** 10],
    ['64k', 64 * 2 ** 10],
    ['1m', 2 ** 20],
    ['100MB', 100 * 2 ** 20],
    ['1GiB', 2 ** 30],
    ['1tib', 2 ** 40],
    ['8191T', 8191 * 2 ** 40],
  ];
  for (const [text, bytes] of good) assert.equal(parseSize('--size', text), bytes, text);
  for (const text of ['', ' 1', '1 ', '1.5M', '-1', '+1', '1P', '1KiBs', '1iB', 'K', '0x10', '1e3', '9007199254740992', '8192T']) {
    throwsUsage(() => parseSize('--size', text), `--size: invalid size ${JSON.stringify(text)} (bytes, or with a suffix K, M, G, T)`);
  }
});

/**
 * Runs `commonOptions` on ARGS in a child process, with a log at the default level.
 * @param {string[]} args
 * @param {Record<string, string | undefined>} [env]
 */
function common(args, env = {}) {
  const program = `
    import { commonOptions, parseArgs } from ${JSON.stringify(path.join(ROOT, 'dist', 'cli', 'args.js'))};
    import { StderrLog } from ${JSON.stringify(path.join(ROOT, 'dist', 'base', 'log.js'))};
    const log = new StderrLog('prog');
    const specs = [{ name: 'help' }, { name: 'version' }, { name: 'log-level', value: true }];
    try {
      const status = commonOptions(parseArgs(${JSON.stringify(args)}, specs, 'prog'), 'prog', 'usage: prog [OPTIONS]', log);
      log.info('info is shown');
      console.log('status', status);
    } catch (err) {
      console.log('error', err.code, err.message);
    }`;
  return run(NODE, ['--input-type=module', '-e', program], { env: cleanEnv(env) });
}

test('--help and --version answer on stdout and return 0; --log-level sets the level, a bad one is a usage error', async () => {
  const version = JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8')).version;
  assert.deepEqual(await common(['--help']).then((r) => [r.stdout, r.stderr]), ['usage: prog [OPTIONS]\nstatus 0\n', '']);
  assert.deepEqual(await common(['--version']).then((r) => [r.stdout, r.stderr]), [`prog ${version}\nstatus 0\n`, '']);
  const info = await common(['--log-level', 'info']);
  assert.deepEqual([info.stdout, info.stderr], ['status undefined\n', 'prog: info is shown\n']);
  const quiet = await common([]);
  assert.deepEqual([quiet.stdout, quiet.stderr], ['status undefined\n', ''], 'warn by default: info is not shown');
  const bad = await common(['--log-level', 'loud']);
  assert.equal(bad.stdout, 'error ERR_INVALID_ARGUMENT --log-level: unknown level "loud"\n');
});

test('SHMFD_LOG sets the level when --log-level is not given; a bad value is a warning, not a failure', async () => {
  const info = await common([], { SHMFD_LOG: 'info' });
  assert.deepEqual([info.stdout, info.stderr], ['status undefined\n', 'prog: info is shown\n']);
  const option = await common(['--log-level', 'warn'], { SHMFD_LOG: 'info' });
  assert.equal(option.stderr, '', '--log-level wins over SHMFD_LOG');
  const bad = await common([], { SHMFD_LOG: 'loud' });
  assert.equal(bad.stdout, 'status undefined\n');
  assert.equal(bad.stderr, 'prog: warning: SHMFD_LOG: unknown level "loud", ignored (silent, error, warn, info or debug)\n');
});

test('an answer to a reader that went away (`| true`) is no failure', async () => {
  const answer = `import(${JSON.stringify(path.join(ROOT, 'dist', 'cli', 'args.js'))}).then((a) => a.printAnswer('x'.repeat(1 << 20)))`;
  const r = await run('bash', ['-c', '"$0" -e "$1" | true; echo "status ${PIPESTATUS[0]}"', NODE, answer]);
  assert.equal(r.stdout, 'status 0\n');
  assert.equal(r.stderr, '');
});
