// Bad backups (issue 3, restore.md "never silently replaced"): a backup that cannot be
// read, is not a valid snapshot file, or cannot be replaced gets one clear error line that
// names the file and the problem, exit status 125, the program does not run, and the
// backup keeps its bytes, mtime, mode and inode.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { after, test } from 'node:test';
import * as sys from '../dist/system/libc.js';
import { COUNTER, fingerprint, isRoot, nobodySkip, readableCopy, run, runHost, SHM_RESTORE, tempDir, tempFiles, works } from './helpers.js';

/** A valid restore-v1 backup of 64 KiB with 3 snapshots, made by the real host. */
async function validBackup(dir) {
  const file = path.join(dir, 'good');
  const r = await runHost(['--snapshot=restore-v1', file, process.execPath, COUNTER, '--commits', '3', '--exit']);
  assert.equal(r.code, 0, r.stderr);
  return fs.readFileSync(file);
}

function withU64(bytes, offset, value) {
  const copy = Buffer.from(bytes);
  copy.writeBigUInt64LE(value, offset);
  return copy;
}

/** The host as another user runs it: a copy that user can read, wherever the checkout lies. */
const READABLE_BIN = nobodySkip() ? undefined : path.join(readableCopy({ after }), 'bin', 'shm-restore.js');

/** Runs the host on `backup` (as `options.wrap` makes another user run it) and checks the refusal. */
async function expectRefusal(backup, args, problem, options = {}) {
  const dir = path.dirname(backup);
  const marker = path.join(dir, 'program-ran');
  const before = fingerprint(backup);
  const argv = [...(options.wrap ?? []), process.execPath, options.wrap === undefined ? SHM_RESTORE : READABLE_BIN, ...args, backup, 'touch', marker];
  const r = await run(argv[0], argv.slice(1), { cwd: dir });
  assert.equal(r.code, 125, `${backup}: ${r.stdout}${r.stderr}`);
  const lines = r.stderr.trim().split('\n');
  assert.equal(lines.length, 1, r.stderr);
  assert.ok(lines[0].includes(options.names ?? backup), `the error names the file: ${lines[0]}`);
  assert.match(lines[0], problem);
  assert.equal(fs.existsSync(marker), false, 'the program must not run');
  assert.deepEqual(fingerprint(backup), before, 'the backup must be untouched');
  assert.deepEqual(tempFiles(dir), []);
}

test('restore-v1 refuses backups that are not valid snapshot files, and leaves them untouched', async (t) => {
  const dir = tempDir(t);
  const good = await validBackup(dir);
  const random = Buffer.alloc(65536);
  for (let i = 0; i < random.length; i++) random[i] = (i * 2654435761) >>> 24;
  /** @type {Array<[string, Uint8Array, RegExp]>} */
  const cases = [
    ['truncated-head', good.subarray(0, 2000), /too small|at least one page/],
    ['truncated', good.subarray(0, 5000), /not a valid snapshot file: .*needs at least 12288 bytes/],
    ['random', random, /not a snapshot file: its head lacks the snapshot magic/],
    ['wrong-magic', withU64(good, 0, 0x96c2a6f4b68519b2n), /lacks the snapshot magic/],
    ['entry-mask-too-big', withU64(good, 8, 0xffffffn), /not a valid snapshot file: .*beyond the end/],
    ['data-mask-too-big', withU64(good, 16, 0xfffffffn), /not a valid snapshot file: .*beyond the end/],
    ['entry-mask-not-power', withU64(good, 8, 5n), /not a valid snapshot file: entry_mask 0x5 is not of the form/],
  ];
  for (const [name, bytes, problem] of cases) {
    const file = path.join(dir, name);
    fs.writeFileSync(file, bytes);
    await expectRefusal(file, ['--snapshot=restore-v1'], problem);
  }
});

test('a backup cut short or extended after shm-restore wrote it is refused, in both modes (its size is recorded in user.shmfd.check)', async (t) => {
  const dir = tempDir(t);
  const good = await validBackup(dir);
  const written = path.join(dir, 'good');
  const fd = fs.openSync(written, 'r');
  const recorded = sys.getXattr(fd, 'user.shmfd.check');
  fs.closeSync(fd);
  const probe = fs.openSync(path.join(dir, 'probe'), 'w');
  const userAttributes = sys.setXattr(probe, 'user.probe', '1');
  fs.closeSync(probe);
  if (!userAttributes) {
    t.skip(`the file system of ${dir} keeps no user extended attributes`);
    return;
  }
  assert.match(recorded, new RegExp(`^v1 size=${good.length} `));
  // Cut inside the program's own data: the snapshot head and slots are all still there.
  fs.truncateSync(written, good.length - 4096);
  for (const args of [['--snapshot=restore-v1'], []]) {
    await expectRefusal(written, args, new RegExp(`: is ${good.length - 4096} bytes, but shm-restore wrote ${good.length} bytes: it was cut short or extended since \\(to restore it anyway, drop the record: cp `));
  }
  fs.truncateSync(written, good.length + 1);
  await expectRefusal(written, ['--snapshot=restore-v1'], /is \d+ bytes, but shm-restore wrote \d+ bytes/);
  // A copy without the attribute (cp, or a file of the Rust host) is not checked.
  const copy = path.join(dir, 'copy');
  fs.writeFileSync(copy, good.subarray(0, good.length - 4096));
  const r = await runHost(['--snapshot=restore-v1', copy, 'true']);
  assert.equal(r.code, 0, r.stderr);
});

test('without --snapshot the same bytes are a raw image and are accepted', async (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, 'raw');
  fs.writeFileSync(file, Buffer.alloc(5000, 0xee));
  const r = await runHost([file, 'true']);
  assert.equal(r.code, 0, r.stderr);
  assert.equal(fs.readFileSync(file).length, 5000);
});

test('a directory as backup is refused in both modes', async (t) => {
  const dir = tempDir(t);
  const backup = path.join(dir, 'state');
  fs.mkdirSync(backup);
  fs.writeFileSync(path.join(backup, 'inside'), 'x');
  for (const args of [[], ['--snapshot=restore-v1']]) await expectRefusal(backup, args, /: is a directory$/);
  assert.deepEqual(fs.readdirSync(backup), ['inside']);
});

test('an unreadable backup is refused (EACCES)', { skip: nobodySkip() && `root bypasses file permissions: ${nobodySkip()}` }, async (t) => {
  const dir = tempDir(t);
  fs.chmodSync(dir, 0o755);
  fs.chownSync(dir, 65534, 65534); // nobody may write there: only the backup is out of reach
  const backup = path.join(dir, 'secret');
  fs.writeFileSync(backup, 'state', { mode: 0o600 });
  const asNobody = ['setpriv', '--reuid=65534', '--regid=65534', '--clear-groups'];
  for (const args of [[], ['--snapshot=restore-v1']]) {
    await expectRefusal(backup, args, /cannot open it: permission denied \(EACCES\)$/, { wrap: asNobody });
  }
});

test('a backup whose directory does not let a replacement be written is refused (EACCES as nobody)', { skip: nobodySkip() }, async (t) => {
  const dir = tempDir(t);
  fs.chmodSync(dir, 0o755);
  const backup = path.join(dir, 'state');
  fs.writeFileSync(backup, 'readable but not replaceable', { mode: 0o644 });
  const asNobody = ['setpriv', '--reuid=65534', '--regid=65534', '--clear-groups'];
  await expectRefusal(backup, [], /cannot create its lock file .*\/\.state\.lock: permission denied \(EACCES\)$/, { wrap: asNobody });
  // A lock file left by an earlier run, in a directory that has since become read-only.
  fs.writeFileSync(path.join(dir, '.state.lock'), '');
  fs.chownSync(path.join(dir, '.state.lock'), 65534, 65534);
  await expectRefusal(backup, [], /cannot create a temporary file in .*: permission denied \(EACCES\)$/, { wrap: asNobody });
});

const unshare = isRoot && works('unshare', ['-m', 'true']);

test('a backup in a read-only directory (a read-only mount) is refused, in both modes', { skip: !unshare && 'root bypasses directory permissions: needs root and unshare -m for a read-only bind mount' }, async (t) => {
  const dir = tempDir(t);
  const good = await validBackup(dir);
  const backup = path.join(dir, 'state');
  fs.writeFileSync(backup, good);
  const before = fingerprint(backup);
  // Inside a private mount namespace, the directory is bind-mounted read-only over itself.
  const script = `
    mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" || exit 99
    shift
    "$@"
  `;
  for (const args of [[], ['--snapshot=restore-v1']]) {
    const r = await run('unshare', ['-m', 'sh', '-c', script, 'sh', dir, process.execPath, SHM_RESTORE, ...args, backup, 'touch', path.join(dir, 'ran')]);
    assert.equal(r.code, 125, r.stderr);
    const lines = r.stderr.trim().split('\n');
    assert.equal(lines.length, 1, r.stderr);
    assert.match(lines[0], new RegExp(`backup ${backup}: cannot create its lock file ${dir}/\\.state\\.lock: read-only file system \\(EROFS\\)$`));
  }
  assert.deepEqual(fingerprint(backup), before);
  assert.equal(fs.existsSync(path.join(dir, 'ran')), false);
});
