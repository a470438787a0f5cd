// shm-restore's life cycle (issue 3, restore.md): fresh starts, restoring through the
// backup on disk, exit statuses, signal forwarding, atomic write-back and temp-file hygiene.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { cleanEnv, COUNTER, datagramReceiver, fingerprint, isDead, isRoot, isStopped, RAW, readCounterBackup, run, runHost, SHM_RESTORE, startHost, tempDir, tempFiles, waitFor, works } from './helpers.js';

test('fresh start with a missing backup: the program gets an empty memory; the backup is written at exit, mode 0600', async (t) => {
  const dir = tempDir(t);
  const backup = path.join(dir, 'state');
  const r = await runHost([backup, process.execPath, RAW, '--write', 'hello']);
  assert.equal(r.code, 0, r.stderr);
  assert.deepEqual(JSON.parse(r.stdout), { size: 0, text: '' });
  assert.equal(fs.statSync(backup).mode & 0o777, 0o600);
  assert.equal(fs.statSync(backup).size, 4096);
  assert.equal(fs.readFileSync(backup).subarray(0, 5).toString(), 'hello');
  assert.deepEqual(tempFiles(dir), []);
});

test('fresh start with an empty backup file, in both modes', async (t) => {
  const dir = tempDir(t);
  const raw = path.join(dir, 'raw');
  fs.writeFileSync(raw, '');
  const r = await runHost([raw, process.execPath, RAW, '--write', 'x']);
  assert.equal(r.code, 0, r.stderr);
  assert.deepEqual(JSON.parse(r.stdout), { size: 0, text: '' });
  assert.equal(fs.readFileSync(raw).subarray(0, 1).toString(), 'x');

  const snap = path.join(dir, 'snap');
  fs.writeFileSync(snap, '', { mode: 0o600 });
  const s = await runHost(['--snapshot=restore-v1', snap, process.execPath, COUNTER, '--commits', '2', '--exit']);
  assert.equal(s.code, 0, s.stderr);
  assert.equal(JSON.parse(s.stdout.split('\n')[0]).recovered, 0);
  assert.equal(readCounterBackup(snap).counter, 2);
  assert.deepEqual(tempFiles(dir), []);
});

test('restore: what run 1 wrote is what run 2 finds, through the backup on disk (raw and restore-v1)', async (t) => {
  const dir = tempDir(t);
  const raw = path.join(dir, 'raw');
  assert.equal((await runHost([raw, process.execPath, RAW, '--write', 'first run', '--size', '1048576'])).code, 0);
  const second = await runHost([raw, process.execPath, RAW]);
  assert.equal(second.code, 0, second.stderr);
  assert.deepEqual(JSON.parse(second.stdout), { size: 1048576, text: 'first run' });

  const snap = path.join(dir, 'snap');
  const one = await runHost(['--snapshot=restore-v1', snap, process.execPath, COUNTER, '--commits', '5', '--exit']);
  assert.equal(one.code, 0, one.stderr);
  const two = await runHost(['--snapshot=restore-v1', snap, process.execPath, COUNTER, '--commits', '5', '--exit']);
  assert.equal(two.code, 0, two.stderr);
  assert.equal(JSON.parse(two.stdout.split('\n')[0]).recovered, 5);
  assert.equal(readCounterBackup(snap).counter, 10);
});

test("exit status: the program's code; 128+N for signal N; a SIGKILLed program is a failure (137), and its memory is still written back", async (t) => {
  const dir = tempDir(t);
  const backup = path.join(dir, 'b');
  assert.equal((await runHost([backup, process.execPath, RAW, '--code', '7'])).code, 7);
  assert.equal((await runHost([backup, process.execPath, RAW, '--signal', 'SIGUSR2'])).code, 140);
  const killed = await runHost([backup, process.execPath, RAW, '--write', 'before the kill', '--signal', 'SIGKILL']);
  assert.equal(killed.code, 137);
  assert.equal(fs.readFileSync(backup).subarray(0, 15).toString(), 'before the kill');
  assert.deepEqual(tempFiles(dir), []);
});

test('SIGTERM to the host is forwarded; the host waits for the program, writes back, and exits 143', async (t) => {
  const dir = tempDir(t);
  const backup = path.join(dir, 'b');
  const marker = path.join(dir, 'marker');
  const host = startHost(['--snapshot=restore-v1', backup, process.execPath, COUNTER, '--commits', '4', '--marker', marker]);
  assert.equal((await host.next()).recovered, 0);
  assert.equal((await host.next()).committed, 4);
  host.child.kill('SIGTERM');
  const end = await host.exited;
  assert.equal(end.code, 143, end.stderr);
  assert.equal(fs.readFileSync(marker, 'utf8'), 'SIGTERM');
  assert.equal(readCounterBackup(backup).counter, 4);
  assert.deepEqual(tempFiles(dir), []);
});

test('the host never exits before the program: a program that handles SIGTERM and exits 3 later gives status 3', async (t) => {
  const dir = tempDir(t);
  const marker = path.join(dir, 'marker');
  const script = `trap 'sleep 0.3; echo handled > "${marker}"; exit 3' TERM; echo started; while :; do sleep 0.05; done`;
  const host = startHost([path.join(dir, 'b'), 'sh', '-c', script]);
  assert.equal((await host.next()).line, 'started');
  host.child.kill('SIGTERM');
  const end = await host.exited;
  assert.equal(end.code, 3, end.stderr);
  assert.equal(fs.readFileSync(marker, 'utf8'), 'handled\n');
});

test('a host starting up removes temporary files a killed host left, and nothing else', async (t) => {
  const dir = tempDir(t);
  const backup = path.join(dir, 'b');
  fs.writeFileSync(path.join(dir, '.b.tmp-0123abcd'), 'partial copy');
  fs.writeFileSync(path.join(dir, '.b.tmp-notes'), 'not ours');
  fs.writeFileSync(path.join(dir, '.other.tmp-0123abcd'), 'another backup');
  const r = await runHost([backup, 'true']);
  assert.equal(r.code, 0, r.stderr);
  assert.deepEqual(fs.readdirSync(dir).sort(), ['.b.lock', '.b.tmp-notes', '.other.tmp-0123abcd', 'b']);
});

test('the backup keeps its permission bits across write-backs; a symbolic link is followed, not replaced', async (t) => {
  const dir = tempDir(t);
  const target = path.join(dir, 'real');
  fs.writeFileSync(target, 'v1', { mode: 0o640 });
  fs.chmodSync(target, 0o640);
  const link = path.join(dir, 'link');
  fs.symlinkSync(target, link);
  const r = await runHost([link, process.execPath, RAW, '--write', 'v2']);
  assert.equal(r.code, 0, r.stderr);
  assert.equal(JSON.parse(r.stdout).text, 'v1');
  assert.ok(fs.lstatSync(link).isSymbolicLink());
  assert.equal(fs.statSync(target).mode & 0o777, 0o640);
  assert.equal(fs.readFileSync(target).subarray(0, 2).toString(), 'v2');
});

const canMount = isRoot && works('unshare', ['-m', 'true']);

test('a full disk at write-back: one error line, non-zero status, the old backup stays, no temporary file left', { skip: !canMount && 'needs root and unshare -m to mount a small tmpfs' }, async (t) => {
  const dir = tempDir(t);
  // Everything runs inside a private mount namespace with a 1 MiB tmpfs as the backup's directory.
  const script = `
    set -e
    mount -t tmpfs -o size=1m tmpfs "$1"
    printf 'old state' > "$1/b"
    set +e
    "$2" "$3" "$1/b" "$2" "$4" --write 'too big' --size 4194304 --fill 1
    echo "status=$?"
    "$2" "$3" --snapshot=restore-v1 --interval 20 "$1/s" "$2" "$5" --size 4194304 --fill 1 --commits 20 --exit
    echo "snapshot-status=$?"
    echo "content=$(head -c 9 "$1/b")"
    echo "files=$(LC_ALL=C ls -A "$1" | tr '\\n' ' ')"
  `;
  const r = await run('unshare', ['-m', 'sh', '-c', script, 'sh', dir, process.execPath, SHM_RESTORE, RAW, COUNTER]);
  const out = r.stdout;
  assert.match(out, /^status=125$/m, r.stderr);
  assert.match(out, /^content=old state$/m);
  assert.match(out, /^snapshot-status=125$/m);
  assert.match(out, /^files=\.b\.lock \.s\.lock b $/m, 'no temporary files, and no backup from a failed write (the lock files stay)');
  const errors = r.stderr.split('\n').filter((l) => l.startsWith('shm-restore:'));
  assert.equal(errors.filter((l) => l.includes(`${dir}/b`)).length, 1, r.stderr);
  assert.match(r.stderr, new RegExp(`final write-back to ${dir}/b failed: no space left on device \\(ENOSPC\\)`));
  // The snapshot rounds failed too; the error is reported once, not once per round.
  assert.equal(r.stderr.split('\n').filter((l) => l.includes('cannot persist a snapshot')).length, 1, r.stderr);
});

test('the backup on disk is replaced, never rewritten in place (a new inode each time)', async (t) => {
  const dir = tempDir(t);
  const backup = path.join(dir, 'b');
  await runHost([backup, process.execPath, RAW, '--write', 'one']);
  const first = fingerprint(backup);
  await runHost([backup, process.execPath, RAW, '--write', 'two']);
  assert.notEqual(fingerprint(backup).ino, first.ino);
});

/** Bytes the memory file of process `pid` holds so far: the pages allocated in its memfd. */
function restoredBytes(pid) {
  for (const fd of fs.readdirSync(`/proc/${pid}/fd`)) {
    const target = fs.readlinkSync(`/proc/${pid}/fd/${fd}`, { encoding: 'utf8' });
    if (target.startsWith('/memfd:')) return fs.statSync(`/proc/${pid}/fd/${fd}`).blocks * 512;
  }
  return 0;
}

test('a signal during the restore ends the host without running the program, exit 128+N', async (t) => {
  const dir = tempDir(t);
  const backup = path.join(dir, 'b');
  // 256 MiB of data take a while to restore; the signal arrives during the copy.
  const fd = fs.openSync(backup, 'w');
  const chunk = Buffer.alloc(16 * 2 ** 20, 1);
  for (let i = 0; i < 16; i++) fs.writeSync(fd, chunk);
  fs.closeSync(fd);
  const before = fingerprint(backup);
  // Under a service manager: a partly restored memory must not reach the fd store, where
  // it would win over the (good) backup at the next start.
  const receiver = datagramReceiver(path.join(dir, 'notify'));
  t.after(() => receiver.close());
  // The copy takes a tenth of a second from the page cache: the host is stopped as soon as
  // it says it restores, and the signal sent only if the copy is still under way (a test
  // process scheduled late may find it done: then the run is not counted, and tried again).
  let end;
  let marker;
  for (let attempt = 1; end === undefined; attempt++) {
    assert.ok(attempt <= 20, 'the host was stopped during the copy in one of 20 tries');
    marker = path.join(dir, `ran-${attempt}`);
    const host = startHost(['--log-level', 'debug', backup, 'touch', marker], { env: cleanEnv({ NOTIFY_SOCKET: receiver.address, FDSTORE: '1' }) });
    await waitFor(() => host.stderr.includes('restoring'), 'the restore to start', 60_000, 1);
    host.child.kill('SIGSTOP');
    // Stopped, or ended already: a run so late is not counted either.
    const pid = host.child.pid;
    await waitFor(() => isStopped(pid) || isDead(pid), 'the host to stop', 60_000, 1);
    const copying = !isDead(pid) && restoredBytes(pid) < 16 * chunk.length;
    host.child.kill(copying ? 'SIGTERM' : 'SIGKILL');
    host.child.kill('SIGCONT');
    const ended = await host.exited;
    if (copying) end = ended;
    else while (receiver.receive() !== undefined);
  }
  assert.equal(end.code, 143, end.stderr);
  assert.match(end.stderr, /received SIGTERM before the program started/);
  assert.doesNotMatch(end.stderr, /restored .* in /, 'the signal came during the copy');
  assert.equal(receiver.receive(), undefined, 'nothing was sent to the fd store');
  assert.equal(fs.existsSync(marker), false);
  assert.deepEqual(fingerprint(backup), before);
  assert.deepEqual(tempFiles(dir), []);
});

test('the program gets its memory file at offset 0, and snapshot rounds never move its file offset', async (t) => {
  const dir = tempDir(t);
  const backup = path.join(dir, 'b');
  fs.writeFileSync(backup, Buffer.alloc(3 * 4096, 7));
  // The descriptor is shared with the host: read(2) from it starts where the host left the offset.
  const raw = await run('sh', ['-c', `exec ${JSON.stringify(process.execPath)} ${JSON.stringify(SHM_RESTORE)} ${JSON.stringify(backup)} sh -c 'grep ^pos: /proc/self/fdinfo/3; wc -c <&3'`]);
  assert.equal(raw.code, 0, raw.stderr);
  assert.deepEqual(raw.stdout.trim().split(/\s+/), ['pos:', '0', '12288']);

  const live = path.join(dir, 'live');
  const host = startHost(['--snapshot=restore-v1', '--interval', '20', '--log-level', 'debug', live, process.execPath, COUNTER, '--commits', '3', '--report-offset']);
  const first = await host.next();
  assert.equal(first.offset, 0);
  await waitFor(() => /snapshot persisted/.test(host.stderr), 'a persisted round', 60_000);
  host.child.kill('SIGTERM');
  const end = await host.exited;
  assert.equal(end.code, 0, end.stderr);
  let last = await host.next();
  while (last.offset === undefined) last = await host.next(); // skip {"committed": 3}
  assert.equal(last.offset, 0, 'the rounds seeked on their own file descriptions');
});
