// Issue 2, "Exec hygiene": shm-fd replaces itself with the program (execve, same pid) and
// nothing of Node leaks into it: descriptors, ignored or blocked signals, non-blocking
// stdio. Checked from inside real programs (docs/exec.md lists the rows).
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import * as sys from '../dist/system/libc.js';
import { cleanEnv, commandExists, fixture, NODE, PYTHON, run, runShmFd, SHM_FD, tempDir } from './helpers.js';

const EIGHT_MIB = 8 * 1024 * 1024;

/** Parses list-fds.py output into { fd: target }. */
function fdsOf(stdout) {
  return Object.fromEntries(
    stdout
      .trim()
      .split('\n')
      .map((line) => {
        const space = line.indexOf(' ');
        return [Number(line.slice(0, space)), line.slice(space + 1)];
      }),
  );
}

function statusField(status, name) {
  const match = new RegExp(`^${name}:\\s*([0-9a-f]+)$`, 'm').exec(status);
  assert.ok(match, `${name} in /proc/self/status`);
  return BigInt(`0x${match[1]}`);
}

const hasPython = fs.existsSync(PYTHON);

test('yes | head -1 under shm-fd prints y and ends: SIGPIPE is back to its default', async () => {
  const r = await runShmFd(['sh', '-c', 'yes | head -1'], { env: cleanEnv() });
  assert.equal(r.stdout, 'y\n');
  assert.equal(r.stderr, '', 'no "Broken pipe" error from yes: it was killed by SIGPIPE');
  assert.equal(r.code, 0);
  const statuses = await runShmFd(['bash', '-c', 'yes | head -1; echo "${PIPESTATUS[*]}"'], { env: cleanEnv() });
  assert.equal(statuses.stdout, 'y\n141 0\n', 'yes died of SIGPIPE (128 + 13)');
});

test('the program starts with an empty signal mask and no ignored or caught signal', async () => {
  const r = await runShmFd(['cat', '/proc/self/status'], { env: cleanEnv() });
  assert.equal(r.code, 0, r.stderr);
  assert.equal(statusField(r.stdout, 'SigBlk'), 0n, 'no blocked signal');
  assert.equal(statusField(r.stdout, 'SigIgn'), 0n, 'no ignored signal (Node ignores SIGPIPE and SIGXFSZ)');
  assert.equal(statusField(r.stdout, 'SigCgt'), 0n);
});

test('stdio is blocking again: an 8 MiB write to a slow pipe reader completes', async () => {
  // The wrapper is started with O_NONBLOCK stdio, as Node leaves pipes it wrote to.
  const slow = (child) => {
    child.stdout.pause();
    setTimeout(() => child.stdout.resume(), 300);
  };
  const r = await run(NODE, [fixture('shm-fd-nonblocking-stdio.js'), 'head', '-c', String(EIGHT_MIB), '/dev/zero'], {
    env: cleanEnv(),
    onSpawn: slow,
  });
  assert.equal(r.stderr, '', 'no EAGAIN from head');
  assert.equal(r.code, 0);
  assert.equal(r.stdout.length, EIGHT_MIB);

  const flags = await run(NODE, [fixture('shm-fd-nonblocking-stdio.js'), 'sh', '-c', 'cat /proc/self/fdinfo/0 /proc/self/fdinfo/1 /proc/self/fdinfo/2'], {
    env: cleanEnv(),
  });
  assert.equal(flags.code, 0, flags.stderr);
  const values = [...flags.stdout.matchAll(/^flags:\s*([0-7]+)$/gm)].map((m) => parseInt(m[1], 8));
  assert.equal(values.length, 3);
  for (const value of values) assert.equal(value & sys.O_NONBLOCK, 0, 'O_NONBLOCK cleared on 0, 1, 2');

  const direct = await runShmFd(['head', '-c', String(EIGHT_MIB), '/dev/zero'], { env: cleanEnv(), onSpawn: slow });
  assert.equal(direct.stderr, '');
  assert.equal(direct.stdout.length, EIGHT_MIB);
});

/**
 * The descriptors a program sees when started directly with the same stdio: whatever the
 * test runner itself inherited (and leaks to its children) is the caller's, not shm-fd's.
 */
async function baselineFds(extraFds) {
  const r = await run(PYTHON, [fixture('list-fds.py')], { env: cleanEnv(), extraFds });
  assert.equal(r.code, 0, r.stderr);
  return fdsOf(r.stdout);
}

test('a program started with only stdio open sees exactly 0, 1, 2 and the memfd', { skip: !hasPython && 'needs /usr/bin/python3' }, async () => {
  const baseline = await baselineFds();
  const r = await runShmFd([fixture('list-fds.py')], { env: cleanEnv() });
  assert.equal(r.stderr, '');
  assert.equal(r.code, 0);
  const fds = fdsOf(r.stdout);
  const expected = { ...baseline, 3: '/memfd:SHM_SHARED_FD (deleted)' };
  for (const fd of [0, 1, 2]) delete expected[fd];
  for (const fd of [0, 1, 2]) delete fds[fd];
  assert.deepEqual(fds, expected, r.stdout);
  assert.deepEqual(Object.keys(baseline).map(Number).filter((fd) => fd >= 3 && fd <= 40), [], 'the test runner itself holds no descriptor 3..40');
});

test('the caller\'s descriptors pass through where Node leaves them apart; in the range Node marks, only by the documented ways', { skip: !hasPython && 'needs /usr/bin/python3' }, async (t) => {
  const stray = fs.openSync('/dev/null', 'r');
  const passed = sys.memfdCreate('exec-passed');
  t.after(() => [stray, passed].forEach((fd) => fs.closeSync(fd)));
  const inheritedByRunner = Object.keys(await baselineFds()).map(Number).filter((fd) => fd > 40);
  const at = (fds) => {
    const extraFds = new Array(38).fill('ignore');
    for (const fd of fds) extraFds[fd - 3] = stray;
    return extraFds;
  };
  // No LISTEN_FDS: fds 7, 16-18 and 40 are the caller's own business, like `prog 7<file` in
  // a shell. Node marks 7 close-on-exec at start (below 16), and 16-18 too (the run of open
  // descriptors right after 15), so they look like its own; 40 it leaves alone.
  const plain = fdsOf((await runShmFd([fixture('list-fds.py')], { env: cleanEnv(), extraFds: at([7, 16, 17, 18, 40]) })).stdout);
  assert.deepEqual(Object.keys(plain).map(Number), [0, 1, 2, 3, 40, ...inheritedByRunner]);
  assert.equal(plain[3], '/memfd:SHM_SHARED_FD (deleted)');
  assert.equal(plain[40], '/dev/null');

  // docs/exec.md: above a closed 16 nothing is marked; the command can move it back down.
  const above = fdsOf((await runShmFd([fixture('list-fds.py')], { env: cleanEnv(), extraFds: at([17, 40]) })).stdout);
  assert.deepEqual(Object.keys(above).map(Number), [0, 1, 2, 3, 17, 40, ...inheritedByRunner]);
  const moved = await runShmFd(['bash', '-c', `exec ${PYTHON} ${fixture('list-fds.py')} 7<&20 20<&-`], { env: cleanEnv(), extraFds: at([20]) });
  assert.equal(moved.code, 0, moved.stderr);
  assert.deepEqual(Object.keys(fdsOf(moved.stdout)).map(Number), [0, 1, 2, 3, 7, ...inheritedByRunner]);
  assert.equal(fdsOf(moved.stdout)[7], '/dev/null');

  // Declared descriptors stay in place and the memfd is appended after them.
  const declared = at([40]);
  declared[0] = passed;
  const r = await runShmFd([fixture('list-fds.py')], {
    env: cleanEnv({ LISTEN_FDS: '1', LISTEN_FDNAMES: 'mine' }),
    extraFds: declared,
  });
  assert.equal(r.code, 0, r.stderr);
  const fds = fdsOf(r.stdout);
  assert.deepEqual(Object.keys(fds).map(Number), [0, 1, 2, 3, 4, 40, ...inheritedByRunner]);
  assert.equal(fds[3], '/memfd:exec-passed (deleted)');
  assert.equal(fds[4], '/memfd:SHM_SHARED_FD (deleted)');
});

test("Node's own descriptors do not pass: what a program opened after importing shmfd, and --inspect's", { skip: !hasPython && 'needs /usr/bin/python3' }, async () => {
  const baseline = await baselineFds();
  const beyondStdio = (fds) => Object.fromEntries(Object.entries(fds).filter(([fd]) => Number(fd) > 2));
  const library = await run(NODE, [fixture('exec-after-open.js'), PYTHON, fixture('list-fds.py')], { env: cleanEnv() });
  assert.equal(library.code, 0, library.stderr);
  assert.deepEqual(beyondStdio(fdsOf(library.stdout)), beyondStdio(baseline), 'neither /etc/hostname nor the server socket');

  const inspected = await runShmFd([fixture('list-fds.py')], { env: cleanEnv({ NODE_OPTIONS: '--inspect=127.0.0.1:0' }) });
  assert.equal(inspected.code, 0, inspected.stderr);
  assert.match(inspected.stderr, /Debugger listening/, 'the inspector did listen');
  // Neither the inspector's socket nor the /dev/null its thread opens.
  assert.deepEqual(beyondStdio(fdsOf(inspected.stdout)), { ...beyondStdio(baseline), 3: '/memfd:SHM_SHARED_FD (deleted)' });
});

test("make -j: a recipe marked recursive ('+') passes the jobserver's pipe through shm-fd; other recipes pass nothing at its numbers", { skip: (!hasPython || !commandExists('make')) && 'needs /usr/bin/python3 and make' }, async (t) => {
  const dir = tempDir(t);
  const list = `${PYTHON} ${fixture('list-fds.py')}`;
  const shmFd = `${NODE} ${SHM_FD} --first-fd 17`;
  // make hands its jobserver pipe only to recursive recipes, but names it in MAKEFLAGS for all.
  fs.writeFileSync(
    path.join(dir, 'Makefile'),
    ['recursive:', `\t+@${list}`, 'recursive-shm-fd:', `\t+@${shmFd} ${list}`, 'plain:', `\t@${list}`, 'plain-shm-fd:', `\t@${shmFd} ${list}`, ''].join('\n'),
  );
  // GNU make 4.4 passes a named fifo by default (--jobserver-auth=fifo:PATH): ask for the pipe.
  const version = await run('make', ['--version']);
  const style = /^GNU Make (4\.[0-3]|3\.)/.test(version.stdout) ? [] : ['--jobserver-style=pipe'];
  const made = async (target) => {
    const r = await run('make', [...style, '-s', '-j2', '-C', dir, target], { env: cleanEnv({ MAKEFLAGS: undefined, MFLAGS: undefined }) });
    assert.equal(r.code, 0, r.stderr);
    // Each run has its own stdio and jobserver pipe: inode numbers become 1, 2, ... in order.
    const inodes = new Map();
    const fds = fdsOf(r.stdout);
    for (const [fd, target] of Object.entries(fds)) {
      fds[fd] = target.replace(/\[(\d+)\]$/, (_, ino) => `[#${inodes.get(ino) ?? inodes.set(ino, inodes.size + 1).get(ino)}]`);
    }
    return fds;
  };
  const memfd = { 17: '/memfd:SHM_SHARED_FD (deleted)' };
  const recursive = await made('recursive');
  const targets = Object.values(recursive);
  const bothEnds = targets.filter((target) => target.startsWith('pipe:') && targets.indexOf(target) !== targets.lastIndexOf(target));
  assert.equal(bothEnds.length, 2, 'make passed both ends of its jobserver pipe to the recursive recipe');
  assert.deepEqual(await made('recursive-shm-fd'), { ...recursive, ...memfd }, 'the same descriptors as without shm-fd, and the memfd');
  const plain = await made('plain');
  assert.deepEqual(await made('plain-shm-fd'), { ...plain, ...memfd }, "not Node's own descriptors at the numbers MAKEFLAGS names");
});

test("MAKEFLAGS naming a pipe nobody handed down: Node's own pipe at those numbers does not pass", { skip: !hasPython && 'needs /usr/bin/python3' }, async () => {
  // The numbers of a pipe whose both ends a Node process opens for itself at start.
  const own = await run(NODE, ['-e', `const fs = require('fs'); const seen = {};
    for (const fd of fs.readdirSync('/proc/self/fd')) { try { (seen[fs.readlinkSync('/proc/self/fd/' + fd)] ??= []).push(fd) } catch {} }
    console.log(Object.entries(seen).find(([t, fds]) => t.startsWith('pipe:') && fds.length === 2)[1].join(','))`]);
  assert.equal(own.code, 0, own.stderr);
  const [read, write] = own.stdout.trim().split(',').map(Number);
  const baseline = await baselineFds();
  const r = await runShmFd(['--first-fd', '17', fixture('list-fds.py')], { env: cleanEnv({ MAKEFLAGS: ` -j2 --jobserver-auth=${read},${write}` }) });
  assert.equal(r.code, 0, r.stderr);
  const fds = fdsOf(r.stdout);
  for (const fd of [0, 1, 2]) delete fds[fd];
  for (const fd of [0, 1, 2]) delete baseline[fd];
  assert.deepEqual(fds, { ...baseline, 17: '/memfd:SHM_SHARED_FD (deleted)' }, `nothing at ${read} and ${write}`);
});

test('arguments and environment that are not UTF-8 reach the program byte for byte', async () => {
  // Node decodes them with U+FFFD for each bad byte; a shell builds them from escapes here.
  const hexOf = async (script) => {
    const r = await run('sh', ['-c', `${script} | od -An -tx1`, 'sh', NODE, SHM_FD], { env: cleanEnv() });
    assert.equal(r.code, 0, r.stderr);
    return r.stdout.trim().split(/\s+/).join(' ');
  };
  const args = `"$1" "$2" printf '%s|' "$(printf '\\377\\376-arg')" "$(printf '\\376')" ok`;
  assert.equal(await hexOf(args), 'ff fe 2d 61 72 67 7c fe 7c 6f 6b 7c');
  const env = `WEIRD="$(printf 'caf\\351')" "$1" "$2" sh -c 'printf %s "$WEIRD"'`;
  assert.equal(await hexOf(env), '63 61 66 e9');
});

test('same process: the exit status, the pid and a signal are those of the program', async () => {
  const exit7 = await runShmFd(['sh', '-c', 'exit 7'], { env: cleanEnv() });
  assert.equal(exit7.code, 7);
  assert.equal(exit7.stderr, '');

  const pid = await runShmFd(['sh', '-c', 'echo $$'], { env: cleanEnv() });
  assert.equal(pid.stdout, `${pid.pid}\n`);

  const selfKilled = await runShmFd(['sh', '-c', 'kill -TERM $$'], { env: cleanEnv() });
  assert.equal(selfKilled.signal, 'SIGTERM');

  // A signal sent to shm-fd's pid reaches the program, as with any exec wrapper.
  const killed = await runShmFd(['sh', '-c', 'echo started; exec sleep 30'], {
    env: cleanEnv(),
    onSpawn: (child) => child.stdout.once('data', () => child.kill('SIGINT')),
  });
  assert.equal(killed.stdout, 'started\n');
  assert.equal(killed.signal, 'SIGINT', 'SIGINT is not ignored by the program');
});

test('stdin passes through to the program', async () => {
  const r = await runShmFd(['cat'], { env: cleanEnv(), input: 'through stdin\n' });
  assert.equal(r.stdout, 'through stdin\n');
  assert.equal(r.code, 0);
});

test('a descriptor to place that is not open: EBADF from the kernel, thrown before anything changed', async () => {
  const exec = new URL('../dist/exec/exec.js', import.meta.url).href;
  const script = `const { execReplace } = await import(${JSON.stringify(exec)});
try {
  execReplace({ command: '/bin/true', args: [], env: {}, fds: [{ from: 900, to: 3 }] });
} catch (err) {
  console.log(err.name, err.code, err.syscall);
}
console.log('still here');`;
  const r = await run(NODE, ['--input-type=module', '-e', script], { env: cleanEnv() });
  assert.equal(r.stdout, 'SystemError EBADF fcntl\nstill here\n');
  assert.equal(r.code, 0);
});
