// shm-restore's command line (issue 3): help, version, usage errors, the status command,
// and what the program is given (descriptors, LISTEN_* variables, NOTIFY_SOCKET).
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import * as sys from '../dist/system/libc.js';
import { cleanEnv, COUNTER, ENV, RAW, ROOT, run, runHost, SHM_FD, SHM_RESTORE, tempDir, tempFiles } from './helpers.js';

const pkg = JSON.parse(fs.readFileSync(new URL('../package.json', import.meta.url), 'utf8'));

test('--help prints the usage with both argument orders and the status command; --version the version', async () => {
  const help = await runHost(['--help']);
  assert.equal(help.code, 0);
  assert.match(help.stdout, /^Usage: shm-restore \[OPTIONS\] BACKUP \[--\] COMMAND/);
  assert.match(help.stdout, /status BACKUP/);
  assert.match(help.stdout, /--snapshot=MODE/);
  assert.equal(help.stderr, '');
  const version = await runHost(['-V']);
  assert.equal(version.code, 0);
  assert.equal(version.stdout, `shm-restore ${pkg.version}\n`);
});

test('usage errors: one line on stderr, exit 125, no backup created', async (t) => {
  const dir = tempDir(t);
  const backup = path.join(dir, 'b');
  /** @type {Array<[string[], RegExp]>} */
  const cases = [
    [[], /no BACKUP given \(see shm-restore --help\)$/],
    [[backup], /no COMMAND given \(see shm-restore --help\)$/],
    [[backup, '--'], /no COMMAND given \(see shm-restore --help\)$/],
    [['--snapshot=restore-v2', backup, 'true'], /--snapshot: unknown mode "restore-v2"/],
    [['--interval', '0', '--snapshot=restore-v1', backup, 'true'], /--interval: "0" is not a number/],
    [['--interval=abc', backup, 'true'], /--interval: "abc"/],
    [['--bogus', backup, 'true'], /unknown option --bogus \(see shm-restore --help\)$/],
    [['-x', backup, 'true'], /unknown option -x \(see shm-restore --help\)$/],
    [['--no-pid=1', backup, 'true'], /option --no-pid takes no value \(see shm-restore --help\)$/],
    [['--interval'], /option --interval needs a value \(see shm-restore --help\)$/],
    [['--status', backup, 'true'], /--status takes no COMMAND \(see shm-restore --help\)$/],
    [['--log-level', 'loud', backup, 'true'], /--log-level: unknown level/],
    [['--name', 'a:b', backup, 'true'], /invalid descriptor name "a:b"/],
  ];
  for (const [args, pattern] of cases) {
    const r = await runHost(args);
    assert.equal(r.code, 125, `${args.join(' ')}: ${r.stderr}`);
    assert.match(r.stderr.trimEnd(), pattern);
    assert.equal(r.stderr.trim().split('\n').length, 1, r.stderr);
  }
  assert.deepEqual(fs.readdirSync(dir), []);
});

test('a command that is not found exits 127 before anything is restored or written', async (t) => {
  const dir = tempDir(t);
  const backup = path.join(dir, 'b');
  fs.writeFileSync(backup, 'raw state');
  const before = fs.statSync(backup).mtimeMs;
  const r = await runHost([backup, 'no-such-command-shmfd']);
  assert.equal(r.code, 127);
  assert.match(r.stderr, /no-such-command-shmfd: command not found/);
  assert.equal(fs.readFileSync(backup, 'utf8'), 'raw state');
  assert.equal(fs.statSync(backup).mtimeMs, before);
  assert.deepEqual(tempFiles(dir), []);
});

test('the program gets the memory at fd 3, LISTEN_FDS/LISTEN_FDNAMES, and LISTEN_PID = its own pid (original order, no --)', async (t) => {
  const dir = tempDir(t);
  const r = await runHost([path.join(dir, 'b'), process.execPath, ENV]);
  assert.equal(r.code, 0, r.stderr);
  const info = JSON.parse(r.stdout);
  assert.equal(info.env.LISTEN_FDS, '1');
  assert.equal(info.env.LISTEN_FDNAMES, 'SHM_SHARED_FD');
  assert.equal(info.env.LISTEN_PID, String(info.pid));
  assert.equal(info.env.LISTEN_FDS_FIRST_FD, undefined);
  assert.equal(info.env.SHMFD_BACKUP, path.join(dir, 'b'));
  assert.match(info.fds[3], /^\/memfd:SHM_SHARED_FD/);
  assert.equal(r.stderr, '', 'quiet by default');
});

test('the snapshot demo says at start where its backup is (SHMFD_BACKUP, after symbolic links) and how to remove it; the command it gives does', async (t) => {
  const dir = tempDir(t);
  const target = path.join(dir, "the user's state");
  const link = path.join(dir, 'link');
  fs.writeFileSync(target, ''); // empty: a fresh start
  fs.symlinkSync(target, link);
  const example = path.join(ROOT, 'examples', 'primes-snapshot.js');
  const r = await runHost(['--snapshot=restore-v1', link, process.execPath, example, '0', '1']);
  assert.equal(r.code, 0, r.stderr);
  const [first, second] = r.stdout.split('\n');
  const removal = `rm '${dir}/the user'\\''s state'`;
  assert.equal(first, `the state is kept in ${target} (a 100 MB sparse file) between runs; to start over or clean up, stop this and run: ${removal}`);
  assert.equal(second, 'recovered 0 primes');
  assert.equal(fs.statSync(target).size, 100_000_000);
  const rm = await run('/bin/sh', ['-c', first.slice(first.indexOf(': rm ') + 2)]);
  assert.equal(rm.code, 0, rm.stderr);
  assert.equal(fs.existsSync(target), false);
});

test('--name renames the descriptor; --no-pid leaves LISTEN_PID unset; COMMAND is not interpreted by a shell', async (t) => {
  const dir = tempDir(t);
  const r = await runHost(['--name', 'state', '--no-pid', path.join(dir, 'b'), '--', process.execPath, ENV, '$HOME; echo x']);
  assert.equal(r.code, 0, r.stderr);
  const info = JSON.parse(r.stdout);
  assert.equal(info.env.LISTEN_FDNAMES, 'state');
  assert.equal(info.env.LISTEN_PID, undefined);
  assert.match(info.fds[3], /^\/memfd:state/);
  // The shell trick for LISTEN_PID passes arguments through "$@" untouched, too.
  const echo = await runHost([path.join(dir, 'c'), 'echo', '$HOME', '*', '"q"']);
  assert.equal(echo.stdout, '$HOME * "q"\n');
});

test('descriptors passed in are passed on first, in order, and the new memory file is appended', async (t) => {
  const dir = tempDir(t);
  const r = await run(process.execPath, [SHM_FD, '--name', 'other', process.execPath, SHM_RESTORE, path.join(dir, 'b'), process.execPath, ENV]);
  assert.equal(r.code, 0, r.stderr);
  const info = JSON.parse(r.stdout);
  assert.equal(info.env.LISTEN_FDS, '2');
  assert.equal(info.env.LISTEN_FDNAMES, 'other:SHM_SHARED_FD');
  assert.match(info.fds[3], /^\/memfd:other/);
  assert.match(info.fds[4], /^\/memfd:SHM_SHARED_FD/);
  assert.equal(info.env.LISTEN_PID, String(info.pid));
});

test('a memory file passed in under the name is used as it is (newer than the backup), then written back', async (t) => {
  const dir = tempDir(t);
  const backup = path.join(dir, 'b');
  fs.writeFileSync(backup, 'old state on disk');
  // shm-fd creates an empty memory file and execs shm-restore with it.
  const r = await run(process.execPath, [SHM_FD, process.execPath, SHM_RESTORE, backup, process.execPath, RAW, '--write', 'new state']);
  assert.equal(r.code, 0, r.stderr);
  assert.deepEqual(JSON.parse(r.stdout), { size: 0, text: '' }, 'the backup was not copied over the passed memory');
  assert.equal(fs.readFileSync(backup).subarray(0, 9).toString(), 'new state');
});

test('under a service manager: the new memory file goes to the fd store (FDSTORE=1, FDNAME); NOTIFY_SOCKET stays set for the program', async (t) => {
  const dir = tempDir(t);
  const address = path.join(dir, 'notify.sock');
  const sock = sys.socket(sys.AF_UNIX, sys.SOCK_DGRAM);
  sys.bindSocket(sock, { family: 'unix', path: address });
  sys.setNonBlocking(sock, true);
  try {
    const r = await runHost([path.join(dir, 'b'), process.execPath, ENV], { env: cleanEnv({ NOTIFY_SOCKET: address }) });
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stderr, /warning: \$FDSTORE is not set: .*fd store is disabled and SHM_SHARED_FD will not survive a restart of the service, only the backup will/);
    assert.equal(JSON.parse(r.stdout).env.NOTIFY_SOCKET, address);
    const message = sys.receiveDatagram(sock);
    assert.equal(message.data.toString(), 'FDSTORE=1\nFDNAME=SHM_SHARED_FD');
    assert.equal(message.fds.length, 1);
    assert.match(fs.readlinkSync(`/proc/self/fd/${message.fds[0]}`), /^\/memfd:SHM_SHARED_FD/);
    for (const fd of message.fds) sys.close(fd);

    const quiet = await runHost([path.join(dir, 'c'), 'true'], { env: cleanEnv({ NOTIFY_SOCKET: address, FDSTORE: '4' }) });
    assert.equal(quiet.code, 0);
    assert.equal(quiet.stderr, '', 'no warning when the store is enabled');
    for (const fd of sys.receiveDatagram(sock).fds) sys.close(fd);
  } finally {
    sys.close(sock);
  }
});

test('status: size, snapshot count, size and age of the newest snapshot, one fact per line; 1 for a missing or invalid backup', async (t) => {
  const dir = tempDir(t);
  const backup = path.join(dir, 'b');
  const missing = await runHost(['status', backup]);
  assert.equal(missing.code, 1);
  assert.match(missing.stdout, /^state: missing/m);

  const made = await runHost(['--snapshot=restore-v1', backup, process.execPath, COUNTER, '--commits', '3', '--exit']);
  assert.equal(made.code, 0, made.stderr);
  for (const args of [['status', backup], ['--status', backup], ['--snapshot=restore-v1', 'status', backup]]) {
    const r = await runHost(args);
    assert.equal(r.code, 0, r.stderr);
    const facts = Object.fromEntries(r.stdout.trim().split('\n').map((l) => [l.slice(0, l.indexOf(':')), l.slice(l.indexOf(':') + 2)]));
    assert.equal(facts.backup, backup);
    assert.match(facts['backup size'], /^65536 bytes/);
    assert.equal(facts.snapshots, '3');
    assert.match(facts['newest snapshot size'], /^8 bytes/);
    assert.match(facts['newest snapshot age'], /^[0-9.]+ (ms|s|min)/);
  }

  fs.rmSync(backup); // a new file: one overwritten in place keeps the size shm-restore recorded, and is refused
  fs.writeFileSync(backup, Buffer.alloc(8192, 7));
  const raw = await runHost(['status', backup]);
  assert.equal(raw.code, 0, 'a raw image is a valid backup without --snapshot');
  assert.match(raw.stdout, /^state: raw memory image/m);
  const invalid = await runHost(['--snapshot=restore-v1', 'status', backup]);
  assert.equal(invalid.code, 1);
  assert.match(invalid.stderr, /not a snapshot file/);
  assert.equal(invalid.stderr.trim().split('\n').length, 1);
});

test('childDescriptors/childStdio: passed, then added, then the created memory; placed from the first fd on', async () => {
  const { childDescriptors, childStdio } = await import('../dist/restore/child.js');
  const list = childDescriptors([{ fd: 3, name: 'a' }], [{ fd: 9, name: 'sock' }], { fd: 12, name: 'SHM_SHARED_FD' });
  assert.deepEqual(list.map((d) => d.name), ['a', 'sock', 'SHM_SHARED_FD']);
  assert.deepEqual(childStdio(list), ['inherit', 'inherit', 'inherit', 3, 9, 12]);
  assert.deepEqual(childStdio(list, 5), ['inherit', 'inherit', 'inherit', 'ignore', 'ignore', 3, 9, 12]);
  assert.throws(() => childStdio(list, 2), /first passed descriptor must be 3 or more/);
  assert.deepEqual(childDescriptors([{ fd: 3, name: 'SHM_SHARED_FD' }], [], undefined).map((d) => d.fd), [3]);
});

test('shm-restore warns, as shm-fd does, when a Node restarter (nodemon, node --watch) would not pass the descriptors on', async (t) => {
  const dir = tempDir(t);
  const nodemon = path.join(dir, 'nodemon');
  fs.writeFileSync(nodemon, '#!/bin/sh\nexit 0\n', { mode: 0o755 });
  const low = await runHost([path.join(dir, 'b'), nodemon]);
  assert.equal(low.code, 0, low.stderr);
  assert.match(low.stderr, /warning: nodemon is a Node process that restarts its program: descriptors below 17 do not reach the program; use --first-fd 17/);
  const safe = await runHost(['--first-fd', '17', path.join(dir, 'b'), nodemon]);
  assert.equal(safe.stderr, '');
});
