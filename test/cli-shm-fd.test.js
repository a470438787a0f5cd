// Issue 2, "The shm-fd command": the real CLI, run as a child process, with programs that
// report what they see (test/fixtures/report-process.js) and the primes example.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import * as sys from '../dist/system/libc.js';
import {
  assertOneErrorLine,
  cleanEnv,
  commandExists,
  fixture,
  NODE,
  PRIMES,
  primeTotals,
  ROOT,
  run,
  runShmFd,
  SHM_FD,
  tempDir,
} from './helpers.js';

const REPORT = fixture('report-process.js');

function reportOf(result) {
  assert.equal(result.stderr, '', 'nothing on stderr');
  assert.equal(result.code, 0);
  return JSON.parse(result.stdout);
}

test('state persists between programs: two primes runs under one shm-fd print 100002 then 200002', async () => {
  const r = await runShmFd(['sh', '-c', '"$0" "$1"; "$0" "$1"', NODE, PRIMES], { env: cleanEnv() });
  assert.equal(r.stderr, '');
  assert.equal(r.code, 0);
  assert.deepEqual(primeTotals(r.stdout), [100002, 200002]);
});

test('the program gets the memfd at 3 with LISTEN_FDS=1, LISTEN_FDNAMES, and LISTEN_PID = its pid = shm-fd\'s pid', async () => {
  const r = await runShmFd([NODE, REPORT], { env: cleanEnv() });
  const seen = reportOf(r);
  assert.equal(seen.pid, r.pid, 'shm-fd replaced itself with the program (same pid)');
  assert.deepEqual(seen.env, { LISTEN_FDS: '1', LISTEN_FDNAMES: 'SHM_SHARED_FD', LISTEN_PID: String(r.pid) });
  assert.equal(seen.passed.length, 1);
  assert.equal(seen.passed[0].fd, 3);
  assert.equal(seen.passed[0].target, '/memfd:SHM_SHARED_FD (deleted)');
  assert.deepEqual(seen.shared, { fd: 3, isMemfd: true, size: 0, head: '' });
});

test('--no-pid leaves LISTEN_PID unset, also when the caller had set it', async () => {
  const seen = reportOf(await runShmFd(['--no-pid', NODE, REPORT], { env: cleanEnv() }));
  assert.deepEqual(seen.env, { LISTEN_FDS: '1', LISTEN_FDNAMES: 'SHM_SHARED_FD' });
  assert.equal(seen.shared.fd, 3);
});

test('descriptors passed by the parent are kept in order and the new memfd is appended with its name', async (t) => {
  const dir = tempDir(t);
  const files = ['first', 'second'].map((name) => {
    fs.writeFileSync(path.join(dir, name), name);
    return fs.openSync(path.join(dir, name), 'r');
  });
  t.after(() => files.forEach((fd) => fs.closeSync(fd)));
  const inodes = files.map((fd) => fs.fstatSync(fd).ino);

  const named = reportOf(
    await runShmFd([NODE, REPORT], { env: cleanEnv({ LISTEN_FDS: '2', LISTEN_FDNAMES: 'a:b' }), extraFds: files }),
  );
  assert.equal(named.env.LISTEN_FDS, '3');
  assert.equal(named.env.LISTEN_FDNAMES, 'a:b:SHM_SHARED_FD');
  assert.deepEqual(
    named.passed.map((p) => p.fd),
    [3, 4, 5],
  );
  assert.deepEqual(
    named.passed.slice(0, 2).map((p) => p.ino),
    inodes,
  );
  assert.equal(named.passed[2].target, '/memfd:SHM_SHARED_FD (deleted)');
  assert.equal(named.shared.fd, 5);

  // Without LISTEN_FDNAMES the passed ones are "unknown"; the counts stay equal.
  const unnamed = reportOf(await runShmFd([NODE, REPORT], { env: cleanEnv({ LISTEN_FDS: '2' }), extraFds: files }));
  assert.equal(unnamed.env.LISTEN_FDS, '3');
  assert.equal(unnamed.env.LISTEN_FDNAMES, 'unknown:unknown:SHM_SHARED_FD');
  assert.deepEqual(
    unnamed.passed.slice(0, 2).map((p) => p.ino),
    inodes,
  );
});

test('a passed SHM_SHARED_FD is reused, not re-created: its contents reach the program, the count stays', async (t) => {
  const memfd = sys.memfdCreate('from-the-parent');
  t.after(() => fs.closeSync(memfd));
  fs.writeSync(memfd, 'written by the parent');
  const other = fs.openSync('/dev/null', 'r');
  t.after(() => fs.closeSync(other));
  const seen = reportOf(
    await runShmFd([NODE, REPORT], {
      env: cleanEnv({ LISTEN_FDS: '2', LISTEN_FDNAMES: 'null:SHM_SHARED_FD' }),
      extraFds: [other, memfd],
    }),
  );
  assert.equal(seen.env.LISTEN_FDS, '2');
  assert.equal(seen.env.LISTEN_FDNAMES, 'null:SHM_SHARED_FD');
  assert.equal(seen.passed[1].ino, fs.fstatSync(memfd).ino);
  assert.equal(seen.passed[1].target, '/memfd:from-the-parent (deleted)');
  assert.equal(seen.shared.fd, 4);
  assert.equal(seen.shared.head, 'written by the parent');
});

test('state persists across shm-fd runs through a memfd the parent keeps (as the fd store does)', async (t) => {
  const memfd = sys.memfdCreate('kept-by-parent');
  t.after(() => fs.closeSync(memfd));
  const env = cleanEnv({ LISTEN_FDS: '1', LISTEN_FDNAMES: 'SHM_SHARED_FD' });
  const totals = [];
  for (let i = 0; i < 2; i++) {
    const r = await runShmFd([NODE, PRIMES], { env, extraFds: [memfd] });
    assert.equal(r.code, 0, r.stderr);
    totals.push(...primeTotals(r.stdout));
  }
  assert.deepEqual(totals, [100002, 200002]);
  assert.equal(fs.fstatSync(memfd).size, 100_000_000);
});

test('--name: the memory file is created and passed under that name', async () => {
  const seen = reportOf(await runShmFd(['--name', 'my-state', NODE, REPORT, '--name', 'my-state'], { env: cleanEnv() }));
  assert.equal(seen.env.LISTEN_FDNAMES, 'my-state');
  assert.equal(seen.passed[0].target, '/memfd:my-state (deleted)');
  assert.equal(seen.shared.fd, 3);
  const byEq = reportOf(await runShmFd(['--name=other', NODE, REPORT], { env: cleanEnv() }));
  assert.equal(byEq.env.LISTEN_FDNAMES, 'other');
  assert.equal(byEq.shared, null, 'the program looks for SHM_SHARED_FD, which is not there');

  const bad = await runShmFd(['--name', 'a:b', 'true'], { env: cleanEnv() });
  assert.equal(bad.code, 125);
  assertOneErrorLine(bad.stderr, /invalid descriptor name "a:b"/);
});

test('--size sizes a new file and grows (never shrinks) a passed one; a bad size is one line, exit 125', async (t) => {
  const seen = reportOf(await runShmFd(['--size', '1M', NODE, REPORT], { env: cleanEnv() }));
  assert.equal(seen.shared.size, 1 << 20);
  assert.equal(reportOf(await runShmFd(['--size=12345', NODE, REPORT], { env: cleanEnv() })).shared.size, 12345);

  const memfd = sys.memfdCreate('to-grow');
  sys.ftruncate(memfd, 4096);
  t.after(() => fs.closeSync(memfd));
  const env = cleanEnv({ LISTEN_FDS: '1', LISTEN_FDNAMES: 'SHM_SHARED_FD' });
  assert.equal(reportOf(await runShmFd(['--size', '8K', NODE, REPORT], { env, extraFds: [memfd] })).shared.size, 8192);
  assert.equal(reportOf(await runShmFd(['--size', '1K', NODE, REPORT], { env, extraFds: [memfd] })).shared.size, 8192);
  assert.equal(fs.fstatSync(memfd).size, 8192);

  for (const size of ['12x', '-1', '', '1.5M', '99999999999T', ' 5', '5 ', '1M\n', '0x10', '1e3']) {
    const r = await runShmFd(['--size', size, 'sh', '-c', 'echo ran'], { env: cleanEnv() });
    assert.equal(r.code, 125, JSON.stringify(size));
    assert.equal(r.stdout, '');
    assertOneErrorLine(r.stderr, /--size: invalid size/);
    assert.ok(r.stderr.endsWith(`--size: invalid size ${JSON.stringify(size)} (bytes, or with a suffix K, M, G, T)\n`), r.stderr);
  }
  // The help names the same suffixes, and each of them works.
  const help = await runShmFd(['--help'], { env: cleanEnv() });
  assert.match(help.stdout, /--size BYTES +size of a new file \(suffixes K, M, G, T\)/);
  for (const [suffix, bytes] of Object.entries({ '1K': 2 ** 10, '1m': 2 ** 20, '1GiB': 2 ** 30, '1TB': 2 ** 40 })) {
    const r = await runShmFd(['--size', suffix, 'sh', '-c', 'stat -L -c %s /proc/self/fd/3'], { env: cleanEnv() });
    assert.equal(r.code, 0, r.stderr);
    assert.equal(Number(r.stdout), bytes, suffix);
  }
  const missing = await runShmFd(['--size'], { env: cleanEnv() });
  assert.equal(missing.code, 125);
  assertOneErrorLine(missing.stderr, /--size needs a value/);
});

test('command not found is 127, not executable is 126, each with one error line', async (t) => {
  const dir = tempDir(t);
  const notExecutable = path.join(dir, 'script.sh');
  fs.writeFileSync(notExecutable, '#!/bin/sh\necho ran\n', { mode: 0o644 });
  /** @type {Array<[string[], number, RegExp, Record<string, string>]>} */
  const cases = [
    [['no-such-command-shmfd'], 127, /no-such-command-shmfd: command not found/, {}],
    [[path.join(dir, 'missing')], 127, /command not found/, {}],
    [['echo hi; true'], 127, /command not found/, {}], // never through a shell
    [[dir], 126, /cannot execute .*: is a directory$/, {}], // as in a shell
    [[notExecutable], 126, /cannot execute .*script\.sh: permission denied \(EACCES\)$/, {}],
    [['script.sh'], 126, /permission denied \(EACCES\)/, { PATH: dir }],
  ];
  for (const [args, code, pattern, env] of cases) {
    const r = await runShmFd(args, { env: cleanEnv(env) });
    assert.equal(r.code, code, `${args}: ${r.stderr}`);
    assert.equal(r.stdout, '');
    assertOneErrorLine(r.stderr, pattern);
  }
});

test('like execvp: a match that cannot be executed does not hide a later one in PATH; a script without #! runs with /bin/sh', async (t) => {
  const dir = tempDir(t);
  const first = path.join(dir, 'first');
  const second = path.join(dir, 'second');
  fs.mkdirSync(path.join(first, 'tool'), { recursive: true }); // a directory named like the command
  fs.mkdirSync(second);
  fs.writeFileSync(path.join(second, 'tool'), 'echo "no shebang: $1 $LISTEN_FDNAMES"\n', { mode: 0o755 });
  const r = await runShmFd(['tool', 'arg'], { env: cleanEnv({ PATH: `${first}:${second}:/usr/bin:/bin` }) });
  assert.equal(r.stderr, '');
  assert.equal(r.code, 0);
  assert.equal(r.stdout, 'no shebang: arg SHM_SHARED_FD\n');
});

test('--first-fd near the open-file limit: what fits runs, what does not is one error line before anything changed', async () => {
  const shmFd = (first) =>
    run('sh', ['-c', `ulimit -n 64; exec "$@"`, 'sh', NODE, SHM_FD, '--first-fd', String(first), 'sh', '-c', 'echo "$LISTEN_FDS_FIRST_FD"'], { env: cleanEnv() });
  const fits = await shmFd(62);
  assert.equal(fits.code, 0, fits.stderr);
  assert.equal(fits.stdout, '62\n');
  const over = await shmFd(63);
  assert.equal(over.code, 125);
  assertOneErrorLine(over.stderr, /--first-fd 63: descriptor 64 is above the limit of open files \(ulimit -n\)/);
});

test('LISTEN_* variables a parent shell left behind (its LISTEN_PID, nothing open) do not stop shm-fd', async () => {
  const script = 'export LISTEN_FDS=1 LISTEN_FDNAMES=http LISTEN_PID=$$; "$@"; true';
  const r = await run('sh', ['-c', script, 'sh', NODE, SHM_FD, 'sh', '-c', 'echo "$LISTEN_FDS $LISTEN_FDNAMES"'], { env: cleanEnv() });
  assert.equal(r.stderr, '');
  assert.equal(r.stdout, '1 SHM_SHARED_FD\n');
});

test('COMMAND is looked up in PATH and gets its arguments verbatim; options after it are its own', async (t) => {
  const dir = tempDir(t);
  fs.writeFileSync(path.join(dir, 'hello'), '#!/bin/sh\nprintf "%s|" "$@"\n', { mode: 0o755 });
  const r = await runShmFd(['hello', 'a b', '$HOME', '*', '--name', 'x', '--'], {
    env: cleanEnv({ PATH: `${dir}:/usr/bin:/bin` }),
  });
  assert.equal(r.stderr, '');
  assert.equal(r.code, 0);
  assert.equal(r.stdout, 'a b|$HOME|*|--name|x|--|');
  const dashed = await runShmFd(['--', 'sh', '-c', 'echo "$LISTEN_FDNAMES"'], { env: cleanEnv() });
  assert.equal(dashed.stdout, 'SHM_SHARED_FD\n');
});

test('usage errors are one line and exit 125; --help and --version exit 0', async () => {
  /** @type {Array<[string[], RegExp]>} */
  const cases = [
    [[], /no COMMAND given \(see shm-fd --help\)$/],
    [['--bogus', 'true'], /unknown option --bogus \(see shm-fd --help\)$/],
    [['-x', 'true'], /unknown option -x \(see shm-fd --help\)$/],
    [['--no-pid=1', 'true'], /option --no-pid takes no value \(see shm-fd --help\)$/],
    [['--name'], /option --name needs a value \(see shm-fd --help\)$/],
    [['--log-level', 'loud', 'true'], /--log-level: unknown level "loud"/],
  ];
  for (const [args, pattern] of cases) {
    const r = await runShmFd(args, { env: cleanEnv() });
    assert.equal(r.code, 125, JSON.stringify(args));
    assertOneErrorLine(r.stderr, pattern);
  }
  const version = JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8')).version;
  for (const flag of ['--version', '-V']) {
    const r = await runShmFd([flag], { env: cleanEnv() });
    assert.equal(r.code, 0);
    assert.equal(r.stdout, `shm-fd ${version}\n`);
    assert.equal(r.stderr, '');
  }
  for (const flag of ['--help', '-h']) {
    const r = await runShmFd([flag], { env: cleanEnv() });
    assert.equal(r.code, 0);
    assert.match(r.stdout, /^Usage: shm-fd /);
    assert.match(r.stdout, /--name NAME/);
    assert.match(r.stdout, /--size BYTES/);
    assert.match(r.stdout, /--no-pid/);
    assert.equal(r.stderr, '');
  }
});

test('--log-level info reports what shm-fd did, on stderr only', async () => {
  const r = await runShmFd(['--log-level', 'info', '--size', '4K', 'true'], { env: cleanEnv() });
  assert.equal(r.code, 0);
  assert.equal(r.stdout, '');
  assert.match(r.stderr, /^shm-fd: created memory file SHM_SHARED_FD \(4096 bytes\)$/m);
  const quiet = await runShmFd(['true'], { env: cleanEnv({ SHMFD_LOG: 'info' }) });
  assert.match(quiet.stderr, /created memory file/);
  // A mistyped SHMFD_LOG (say in a unit's Environment=) warns and runs the program anyway.
  const typo = await runShmFd(['sh', '-c', 'echo ran'], { env: cleanEnv({ SHMFD_LOG: 'verbose' }) });
  assert.equal(typo.code, 0);
  assert.equal(typo.stdout, 'ran\n');
  assert.equal(typo.stderr, 'shm-fd: warning: SHMFD_LOG: unknown level "verbose", ignored (silent, error, warn, info or debug)\n');
});

test('shm-fd watch -n 0.1 PROGRAM: every run continues where the last one stopped', async (t) => {
  if (!commandExists('watch') || !commandExists('script')) {
    t.skip('needs watch (procps) and script (util-linux)');
    return;
  }
  const dir = tempDir(t);
  const out = path.join(dir, 'runs.txt');
  const quote = (s) => `'${s.replace(/'/g, "'\\''")}'`;
  // watch needs a terminal: script gives it a pseudo-terminal. The fixture ends watch on
  // its third run; timeout is only a guard against a hang. It must be --foreground: a
  // plain timeout moves itself into its own process group, which is a background group on
  // the pseudo-terminal unless the shell that script starts happens to exec it (in CI it did
  // not): watch then stops on SIGTTOU before its first run, and again on the SIGTERM.
  const command = ['timeout', '--foreground', '-k', '5', '60', NODE, SHM_FD, 'watch', '-n', '0.1', NODE, fixture('watch-run.js'), out, '3']
    .map(quote)
    .join(' ');
  const r = await run('script', ['-qec', command, '/dev/null'], {
    env: cleanEnv({ TERM: 'dumb', SHELL: '/bin/sh' }),
    timeoutMs: 90_000,
  });
  assert.notEqual(r.code, 124, 'watch was ended by the fixture, not by the timeout');
  const runs = fs.readFileSync(out, 'utf8').split('\n').filter(Boolean);
  assert.deepEqual(runs.slice(0, 3), ['1', '2', '3'], `runs: ${runs.join(',')}`);
});
