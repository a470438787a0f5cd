// One host per backup, and no program without its host (issue 7, sections 2 and 3): a host
// holds an exclusive lock on .BACKUP.lock while it runs, a second host on the same backup
// is refused at start (exit 125, one line naming the holder) without touching anything,
// the kernel drops the lock when the holder dies, and the program dies with its host
// (setpriv --pdeathsig KILL), so no orphan keeps committing into memory nobody persists.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { childrenOf, cleanEnv, COUNTER, isStopped, processInfo, RAW, readCounterBackup, run, runHost, seededRandom, SHM_RESTORE, sleep, startHost, tempDir, tempFiles, waitFor, works } from './helpers.js';

const pdeathsig = works('setpriv', ['--pdeathsig', 'KILL', '--version']) || 'needs setpriv with --pdeathsig (util-linux 2.33 or later)';
const needsSetpriv = { skip: pdeathsig !== true && pdeathsig };

/** True while the process `info` describes runs (a zombie is dead; a reused pid is another process). */
function isRunning(pid, info) {
  const now = processInfo(pid);
  return now !== undefined && now.start === info.start && now.state !== 'Z' && now.state !== 'X';
}

/** The children of a process, each with its /proc info. */
function childrenWithInfo(pid) {
  return childrenOf(pid).flatMap((child) => {
    const info = processInfo(child);
    return info === undefined ? [] : [{ pid: child, info }];
  });
}

/**
 * SIGKILLs a host process alone and returns the children it had at that instant: it is
 * stopped first, so that it cannot start one between the look and the kill.
 */
async function killHostAlone(host) {
  const pid = host.child.pid;
  process.kill(pid, 'SIGSTOP');
  await waitFor(() => isStopped(pid), 'the host to stop');
  const children = childrenWithInfo(pid);
  process.kill(pid, 'SIGKILL');
  await host.exit;
  return children;
}

/** Waits until none of `processes` runs any more (generous: a loaded machine reaps slowly). */
async function waitUntilGone(processes, what) {
  try {
    await waitFor(() => processes.every(({ pid, info }) => !isRunning(pid, info)), what, 60_000);
  } catch (err) {
    for (const { pid, info } of processes) if (isRunning(pid, info)) process.kill(pid, 'SIGKILL');
    throw err;
  }
}

/**
 * Starts a host in its own process group, which its program joins: a host a failing test
 * leaves running is killed with its program when the test ends.
 */
function startGroup(t, args, options = {}) {
  return startHost(args, { ...options, detached: true, t });
}

/** The one line a refused host prints. */
function inUseLine(backup, pid) {
  return `shm-restore: error: backup ${backup} is in use by another shm-restore (pid ${pid}); one host per backup`;
}

const COMMITS = 20;

test('30 start-up races of two hosts on one BACKUP: one runs undisturbed, the other is refused (125, one line naming the holder); the lock dies with its holder', async (t) => {
  const dir = tempDir(t);
  const backup = path.join(dir, 'state');
  const random = seededRandom(7).int;
  const args = ['--snapshot=restore-v1', '--interval', '1', backup, process.execPath, COUNTER, '--every', '2', '--commits', String(COMMITS)];
  let expected = 0;
  for (let race = 0; race < 30; race++) {
    // Both at once; or the second once the first runs its program; or once it persists
    // snapshots (its temporary files come and go then).
    const stagger = race % 3;
    const first = startGroup(t, args);
    const firstStart = first.next();
    firstStart.catch(() => undefined);
    if (stagger >= 1) await firstStart;
    if (stagger === 2) await waitFor(() => (readCounterBackup(backup)?.counter ?? 0) > expected, 'the first host to persist');
    const second = startGroup(t, args);
    const secondStart = second.next();
    secondStart.catch(() => undefined);
    const outcome = await Promise.race([
      first.exit.then(() => 'first'),
      second.exit.then(() => 'second'),
      Promise.all([firstStart, secondStart]).then(() => 'both'),
    ]);
    assert.notEqual(outcome, 'both', `race ${race}: both hosts run their program on ${backup}`);
    const [loser, winner, winnerStart] = outcome === 'first' ? [first, second, secondStart] : [second, first, firstStart];
    const refused = await loser.exited;
    assert.equal(refused.code, 125, `race ${race}: ${refused.stderr}`);
    assert.equal(refused.stderr, `${inUseLine(backup, winner.child.pid)}\n`, `race ${race}`);
    await assert.rejects(loser.next(), /exited/, 'the refused host never started its program');

    // The holder goes on: its program commits, and its snapshots reach the disk.
    const opening = await winnerStart;
    assert.equal(opening.recovered, expected, `race ${race}: the holder restored the last durable backup`);
    assert.equal((await winner.next()).committed, expected + COMMITS);
    await waitFor(() => readCounterBackup(backup)?.counter === expected + COMMITS, 'the last commit to be persisted');
    expected += COMMITS;
    if (random(0, 3) === 0) {
      // Killed alone: the lock goes with it, and the next race starts at once.
      const children = await killHostAlone(winner);
      if (pdeathsig !== true) process.kill(opening.pid, 'SIGKILL');
      await waitUntilGone(children, 'the program of the killed host to end');
    } else {
      winner.child.kill('SIGTERM');
      const end = await winner.exited;
      assert.equal(end.code, 143, end.stderr);
      assert.doesNotMatch(end.stderr, /error/, `race ${race}: no persist of the holder failed`);
      assert.deepEqual(tempFiles(dir), [], 'the leftovers of killed holders were removed, and the holder left none');
    }
    assert.equal(readCounterBackup(backup).counter, expected);
  }
});

test('SIGKILL of the host alone, at random instants: the program dies with it, and a new host starts at once from the last durable backup', needsSetpriv, async (t) => {
  const dir = tempDir(t);
  const backup = path.join(dir, 'state');
  const random = seededRandom(20261).int;
  const args = ['--snapshot=restore-v1', '--interval', '10', backup, process.execPath, COUNTER, '--every', '2'];
  const hosts = [];
  let durable = 0;
  let host = startGroup(t, args);
  for (let kill = 0; kill < 20; kill++) {
    hosts.push({ host, recovered: durable });
    if (kill % 2 === 0) {
      // Any instant: Node's start-up, the lock, the restore, the start of the program, or later.
      await sleep(random(0, 800));
    } else {
      // While the program commits, once something new is durable.
      await waitFor(() => (readCounterBackup(backup)?.counter ?? 0) > durable, 'a new durable snapshot', 30_000);
      await sleep(random(0, 100));
    }
    const children = await killHostAlone(host);
    const found = readCounterBackup(backup);
    assert.ok((found?.counter ?? 0) >= durable, `the durable counter never goes back (${durable} -> ${found?.counter})`);
    durable = found?.counter ?? 0;
    // At once: the kernel dropped the lock with the host, whatever its program is doing.
    host = startGroup(t, args);
    await waitUntilGone(children, `the program of killed host ${kill} to end with it`);
  }
  hosts.push({ host, recovered: durable });
  const last = await host.next();
  host.child.kill('SIGTERM');
  assert.equal((await host.exited).code, 143);
  assert.ok(durable > 0, 'snapshots were persisted between the kills');
  assert.deepEqual(tempFiles(dir), [], 'the temporary files of killed hosts were removed');

  // Every host that got to start its program began where the one before had left the disk.
  let started = 0;
  for (const [i, { host: h, recovered }] of hosts.entries()) {
    assert.equal(h.stderr, '', `host ${i} was not refused, and nothing failed`);
    const line = h === host ? last : await h.next().catch(() => undefined);
    if (line === undefined) continue;
    started++;
    assert.equal(line.recovered, recovered, `host ${i}`);
  }
  // Those killed once something was durable, and the last.
  assert.ok(started >= 11, `${started} of ${hosts.length} hosts started their program`);
});

test('a host killed before setpriv set the parent-death signal leaves no program behind', needsSetpriv, async (t) => {
  const dir = tempDir(t);
  const real = spawnSync('sh', ['-c', 'command -v setpriv'], { encoding: 'utf8' }).stdout.trim();
  // A setpriv that answers the host's check, then waits (for the test) before the real one
  // runs: the host is killed in that window, between the fork and the prctl.
  const bin = path.join(dir, 'bin');
  fs.mkdirSync(bin);
  const fifo = path.join(dir, 'go');
  assert.equal(spawnSync('mkfifo', [fifo]).status, 0);
  const waiting = path.join(dir, 'waiting');
  fs.writeFileSync(
    path.join(bin, 'setpriv'),
    // The fifo is opened (read-write: no wait for a writer) before the test is told, so
    // the test's write never finds it without a reader.
    `#!/bin/sh\n[ "$3" = --version ] && exec ${real} "$@"\nexec 3<> ${fifo}\necho $$ > ${waiting}.new && mv ${waiting}.new ${waiting}\nread go <&3\nexec 3<&-\nexec ${real} "$@"\n`,
    { mode: 0o755 },
  );
  const ran = path.join(dir, 'ran');
  const host = startGroup(t, [path.join(dir, 'state'), 'sh', '-c', `echo ran > ${ran}; exec sleep 600`], {
    env: cleanEnv({ PATH: `${bin}:${process.env.PATH}` }),
  });
  const pid = Number(await waitFor(() => fs.existsSync(waiting) && fs.readFileSync(waiting, 'utf8'), 'the child to wait before setpriv'));
  const child = { pid, info: processInfo(pid) };
  t.after(() => isRunning(child.pid, child.info) && process.kill(child.pid, 'SIGKILL'));
  host.child.kill('SIGKILL');
  await host.exit;
  const fd = fs.openSync(fifo, fs.constants.O_WRONLY | fs.constants.O_NONBLOCK);
  fs.writeSync(fd, 'go\n');
  fs.closeSync(fd);
  await waitUntilGone([child], 'the orphaned child to end');
  assert.equal(fs.existsSync(ran), false, 'the program never started without its host');
});

test('the lock file: .BACKUP.lock beside the backup, mode 0600, holds the pid, never deleted; the program does not hold it; status names the host', async (t) => {
  const dir = tempDir(t);
  const backup = path.join(dir, 'state');
  const lock = path.join(dir, '.state.lock');
  const host = startGroup(t, ['--log-level', 'info', '--snapshot=restore-v1', backup, process.execPath, COUNTER, '--commits', '2']);
  const { pid } = await host.next();
  assert.equal(fs.statSync(lock).mode & 0o777, 0o600);
  assert.equal(fs.readFileSync(lock, 'utf8'), `${host.child.pid}\n`);
  const held = fs.readdirSync(`/proc/${pid}/fd`).map((fd) => fs.readlinkSync(`/proc/${pid}/fd/${fd}`));
  assert.ok(!held.includes(lock), `the program holds no descriptor of the lock file: ${held}`);
  // setpriv and the shell exec: the program is the host's own child, with LISTEN_PID = its pid.
  assert.equal(/^PPid:\s+(\d+)$/m.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'))[1], String(host.child.pid));
  assert.match(fs.readFileSync(`/proc/${pid}/environ`, 'latin1'), new RegExp(`(^|\\0)LISTEN_PID=${pid}\\0`));

  const status = await runHost(['status', backup]);
  assert.match(status.stdout, new RegExp(`^host: running, pid ${host.child.pid}$`, 'm'));
  const second = await runHost([backup, 'touch', path.join(dir, 'ran')]);
  assert.equal(second.code, 125);
  assert.equal(second.stderr, `${inUseLine(backup, host.child.pid)}\n`);
  assert.equal(fs.existsSync(path.join(dir, 'ran')), false);

  host.child.kill('SIGTERM');
  const end = await host.exited;
  assert.equal(end.code, 143, end.stderr);
  assert.match(end.stderr, new RegExp(`forwarding it to the program \\(pid ${pid}\\)`), 'signals go to the program itself');
  assert.ok(fs.existsSync(lock), 'the lock file stays');
  assert.match((await runHost(['status', backup])).stdout, /^host: none$/m);
  // A symbolic link to the backup shares its lock.
  const link = path.join(dir, 'link');
  fs.symlinkSync(backup, link);
  const again = startGroup(t, [link, process.execPath, COUNTER, '--commits', '0']);
  await again.next();
  const refused = await runHost([backup, 'true']);
  assert.equal(refused.stderr, `${inUseLine(backup, again.child.pid)}\n`);
  again.child.kill('SIGTERM');
  assert.equal((await again.exited).code, 143);
});

test('a lock file that is not a regular file of ours is refused with one line, and left alone', async (t) => {
  const dir = tempDir(t);
  const target = path.join(dir, 'precious');
  fs.writeFileSync(target, 'not to be overwritten');
  /** @type {Array<[string, (lock: string) => void, RegExp]>} */
  const cases = [
    ['dir', (lock) => fs.mkdirSync(lock), /cannot open its lock file .*: illegal operation on a directory \(EISDIR\)$/],
    ['link', (lock) => fs.symlinkSync(target, lock), /cannot open its lock file .*: too many symbolic links encountered \(ELOOP\)$/],
    ['fifo', (lock) => assert.equal(spawnSync('mkfifo', [lock]).status, 0), /its lock file .* is not a regular file$/],
  ];
  for (const [name, make, problem] of cases) {
    const backup = path.join(dir, name);
    make(path.join(dir, `.${name}.lock`));
    const r = await runHost([backup, 'touch', path.join(dir, 'ran')]);
    assert.equal(r.code, 125, r.stderr);
    assert.equal(r.stderr.trim().split('\n').length, 1, r.stderr);
    assert.match(r.stderr, new RegExp(`^shm-restore: error: backup ${backup}: `));
    assert.match(r.stderr.trim(), problem);
  }
  assert.equal(fs.readFileSync(target, 'utf8'), 'not to be overwritten');
  assert.equal(fs.existsSync(path.join(dir, 'ran')), false);
});

test('a lock file with another name (a hard link: cp -al of the directory) still locks the backup, and is not written', async (t) => {
  const dir = tempDir(t);
  const backup = path.join(dir, 'state');
  const other = path.join(dir, 'other');
  fs.writeFileSync(other, 'not to be overwritten');
  fs.linkSync(other, path.join(dir, '.state.lock'));
  const host = startGroup(t, [backup, process.execPath, COUNTER, '--commits', '0']);
  await host.next();
  const second = await runHost([backup, 'touch', path.join(dir, 'ran')]);
  assert.equal(second.stderr, `${inUseLine(backup, host.child.pid)}\n`);
  assert.equal(fs.existsSync(path.join(dir, 'ran')), false);
  host.child.kill('SIGTERM');
  assert.equal((await host.exited).code, 143);
  assert.equal(fs.readFileSync(other, 'utf8'), 'not to be overwritten');
});

test('without a setpriv that has --pdeathsig, the program still runs, after one warning line', async (t) => {
  const dir = tempDir(t);
  const old = path.join(dir, 'old');
  fs.mkdirSync(old);
  fs.writeFileSync(path.join(old, 'setpriv'), `#!/bin/sh\necho "setpriv: unrecognized option '--pdeathsig'" >&2\nexit 1\n`, { mode: 0o755 });
  const warning = `shm-restore: warning: no setpriv with --pdeathsig (util-linux 2.33 or later) in PATH: if shm-restore is killed, ${process.execPath} keeps running and nothing it does is persisted; install util-linux\n`;
  for (const PATH of [path.join(dir, 'nothing'), old]) {
    for (const pid of [[], ['--no-pid']]) {
      const r = await run(process.execPath, [SHM_RESTORE, ...pid, path.join(dir, 'state'), process.execPath, RAW, '--write', 'ran'], { env: cleanEnv({ PATH }) });
      assert.equal(r.code, 0, r.stderr);
      assert.equal(r.stderr, warning);
    }
  }
  assert.equal(fs.readFileSync(path.join(dir, 'state')).subarray(0, 3).toString(), 'ran');
});
