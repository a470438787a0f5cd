// Incremental restore-v1 rounds (docs/restore.md, "Incremental rounds"): a program that
// marks its writes (StateFile.fromEnv) gets rounds that copy only the marked pages and
// write them into the backup in place through a journal.
// - after N in-place rounds, every valid snapshot of the backup names exactly the bytes of
//   the committed state it claims, decoded here from the format's bytes (head, slots,
//   payload, log records, cell copies), independently of src/;
// - a complete journal is replayed at start, an incomplete one or one of another file is
//   discarded, byte for byte; a round durable in the backup leaves its journal spent, so a
//   backup put back by hand (cp) after its host was killed between rounds gets no replay;
// - a host run as root gives the files it creates beside a service's backup (backup,
//   journal, lock) the backup's owner and group, and leaves a file already there alone;
// - a hard link made to the backup while rounds go in place keeps its bytes from the next
//   round on (that round copies whole), and the rounds after it go in place again; a
//   backup replaced or rewritten behind the host gets a whole copy, then rounds in place
//   whose backups name committed bytes;
// - SIGKILL of the program, of the host, and of the whole tree at random instants during
//   incremental rounds; after each, the backup (with its journal applied, as the next host
//   would) is checked as above, and the next run recovers at least that state;
// - a disk that fills up during incremental rounds, so that a round's writes into the
//   backup fail after its journal was made durable: the failures are reported once each,
//   the messages say the backup needs its journal and the exit that the newest state is
//   lost, and once space is free the backup (with its journal) is checked as above and
//   the next start applies the journal and restores it;
// - a disk with room for in-place rounds but not for the whole copy at exit: the round in
//   place after the program exited keeps its last commit, checked as above;
// - a disk with no room for a whole copy and a program that marks nothing: rounds compare
//   the memory with the backup and write what differs in place; SIGKILL of the whole tree
//   at random instants during them, each backup left checked as above and recovered.
//   SHMFD_KILLS=N sets the number of kills (npm run test:long: 201; a tenth of it, at least
//   6, for the rounds by comparison).
// Kill moments come from a seeded generator; replay with STATE_SEED=<seed>.
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { DIRTY_PAGES_NAME, DirtyPages } from 'shmfd';
import { fixture, isRoot, isStopped, journalRound, killBetweenRounds, killWithCompleteJournal, NODE, run, seededRandom, settledBackup, SHM_RESTORE, sleep, start, stopHostWhen, tempDir, waitFor, works } from './helpers.js';
import { CAPACITY, checkAllSnapshots, validSnapshots } from './state-check.js';
import { pattern } from './fixtures/marked-writer.js';

const PROGRAM = fixture('incremental-writer.js');
const SEED = process.env.STATE_SEED === undefined ? Date.now() % 1_000_000_007 : Number(process.env.STATE_SEED);
const KILLS = Number(process.env.SHMFD_KILLS ?? 6);
const rng = seededRandom(SEED);
console.log(`# restore-incremental seed ${SEED} (replay with STATE_SEED=${SEED})`);

const IN_PLACE = /snapshot persisted in place/;
/** The line of a host whose rounds found no room for a whole copy and went on in place. */
const WORKS_IN_PLACE = /^shm-restore: persisting snapshots works again: in place, the pages that differ from the backup \(no room for a whole copy\)$/m;

/** The lines of `watcher` from line `from` on matching `pattern`, once there are `count` of them (or the stream ended). */
async function waitForCount(watcher, pattern, count, from = 0) {
  let seen = 0;
  for (let i = from; seen < count; i++) {
    const line = await watcher.line(i);
    if (line === undefined) return seen;
    if (pattern.test(line)) seen++;
  }
  return seen;
}

function host(backup, extra = []) {
  return start(NODE, [SHM_RESTORE, '--snapshot=restore-v1', '--interval', '5', '--log-level', 'debug', backup, NODE, PROGRAM, String(CAPACITY), ...extra], { detached: true, guardMs: 60_000 });
}

test('after N in-place rounds, every snapshot of the backup names exactly the committed bytes; a clean exit leaves a whole file and no journal', async (t) => {
  const dir = tempDir(t, 'shmfd-incr-');
  const backup = path.join(dir, 'state');
  const tree = host(backup);
  t.after(() => tree.kill('SIGKILL'));
  assert.ok((await tree.out.waitFor(/^recovered 0$/)) !== undefined, tree.err.lines.join('\n'));
  assert.equal(await waitForCount(tree.err, IN_PLACE, 20), 20, `20 in-place rounds:\n${tree.err.lines.join('\n')}`);
  // The program keeps committing while the backup is read: settled between two reads of the journal.
  let settled;
  while ((settled = settledBackup(backup)) === undefined) await sleep(1);
  const { newest, checked } = checkAllSnapshots(fs.readFileSync(settled), 'after 20 in-place rounds');
  // The counters keep two copies, so at most the two newest commits are restorable; a
  // round during which the program commits again keeps only one of them.
  assert.ok(newest > 0 && checked >= 1, `snapshots checked: ${checked}, newest ${newest}`);
  assert.ok(fs.existsSync(path.join(dir, '.state.journal')), 'in-place rounds keep their journal beside the backup');
  tree.kill('SIGTERM');
  const { code } = await tree.exited;
  assert.equal(code, 0, tree.err.lines.join('\n'));
  assert.ok(!fs.existsSync(path.join(dir, '.state.journal')), 'the final write-back removed the journal');
  assert.ok(checkAllSnapshots(fs.readFileSync(backup), 'after a clean exit').newest >= newest);
  // A restart restores it, and its rounds are in place from the first one on.
  const again = host(backup);
  t.after(() => again.kill('SIGKILL'));
  const recovered = Number((await again.out.waitFor(/^recovered (\d+)$/))[1]);
  assert.ok(recovered >= newest);
  const firstRound = await again.err.waitFor(/snapshot persisted.*/);
  assert.match(firstRound?.[0] ?? '', IN_PLACE, `the first round after a restore is in place:\n${again.err.lines.join('\n')}`);
  again.kill('SIGTERM');
  assert.equal((await again.exited).code, 0);
});

test('a program that writes its own tail and marks it (DirtyPages) gets in-place rounds whose backups hold its bytes', async (t) => {
  const dir = tempDir(t, 'shmfd-incr-');
  const backup = path.join(dir, 'state');
  const args = ['--snapshot=restore-v1', '--interval', '5', '--log-level', 'debug', backup, NODE, fixture('marked-writer.js')];
  let durable = 0;
  for (let run = 0; run < 2; run++) {
    const tree = start(NODE, [SHM_RESTORE, ...args], { detached: true, guardMs: 60_000 });
    t.after(() => tree.kill('SIGKILL'));
    assert.equal((await tree.out.waitFor(/^names (.*)$/))?.[1], `SHM_SHARED_FD:${DIRTY_PAGES_NAME}`, 'the map comes after the memory');
    assert.ok(Number((await tree.out.waitFor(/^recovered (\d+)$/))?.[1]) >= durable, tree.err.lines.join('\n'));
    assert.equal(await waitForCount(tree.err, IN_PLACE, 10), 10, tree.err.lines.join('\n'));
    tree.kill('SIGKILL');
    await tree.exited;
    const bytes = fs.readFileSync(settledBackup(backup));
    const { tailStart, snapshots } = validSnapshots(bytes, `run ${run}`);
    assert.ok(snapshots.length > 0);
    for (const { i, payload } of snapshots) {
      const end = Number(payload.readBigUInt64LE(0));
      for (let p = 0; p < end; p++) {
        if (bytes[tailStart + p] !== pattern(p)) assert.fail(`run ${run}, slot ${i}: names ${end} bytes, byte ${p} is ${bytes[tailStart + p]}, not ${pattern(p)}`);
      }
      durable = Math.max(durable, end);
    }
  }
});

test('a host run as root gives the files it creates beside the backup the backup\'s owner, and no file that was there already', { skip: !isRoot && 'needs root' }, async (t) => {
  const dir = tempDir(t, 'shmfd-incr-');
  const backup = path.join(dir, 'state');
  // A service's backup (an empty one: a fresh start), owned by nobody, group nogroup.
  const service = { uid: 65534, gid: 65534 };
  fs.writeFileSync(backup, '', { mode: 0o640 });
  fs.chownSync(backup, service.uid, service.gid);
  // A file of root's with a second name where the host puts its journal: the host must
  // neither hand it to the service nor write into it.
  const rootsFile = path.join(dir, 'roots-file');
  fs.writeFileSync(rootsFile, 'root only', { mode: 0o600 });
  fs.linkSync(rootsFile, path.join(dir, '.state.journal'));
  const tree = host(backup);
  t.after(() => tree.kill('SIGKILL'));
  assert.equal(await waitForCount(tree.err, IN_PLACE, 3), 3, tree.err.lines.join('\n'));
  /** Owner and group of each file in the directory, and its permission bits. */
  const owners = () => Object.fromEntries(fs.readdirSync(dir).sort().flatMap((name) => {
    const s = fs.statSync(path.join(dir, name), { throwIfNoEntry: false });
    return s === undefined ? [] : [[name, `${s.uid}:${s.gid} ${(s.mode & 0o777).toString(8)}`]];
  }));
  const theService = `${service.uid}:${service.gid}`;
  // While rounds go in place: the backup (a whole copy first) and the journal (which a
  // round that copies the file whole removes again: read while it is there).
  const journal = await waitFor(() => owners()['.state.journal'], 'the journal of in-place rounds');
  assert.equal(journal, `${theService} 600`);
  const others = owners();
  delete others['.state.journal'];
  assert.deepEqual(others, { '.state.lock': `${theService} 600`, 'roots-file': '0:0 600', state: `${theService} 640` });
  tree.kill('SIGTERM');
  assert.equal((await tree.exited).code, 0, tree.err.lines.join('\n'));
  // The write-back at exit replaced the backup and removed the journal.
  assert.deepEqual(owners(), { '.state.lock': `${theService} 600`, 'roots-file': '0:0 600', state: `${theService} 640` });
  assert.equal(fs.readFileSync(rootsFile, 'utf8'), 'root only');
  // A lock file that is there already keeps its owner.
  fs.chownSync(path.join(dir, '.state.lock'), 0, 0);
  const again = await run(NODE, [SHM_RESTORE, '--snapshot=restore-v1', backup, 'true']);
  assert.equal(again.code, 0, again.stderr);
  assert.equal(owners()['.state.lock'], '0:0 600');
});

test('a backup removed while in-place rounds run is written again whole', async (t) => {
  const dir = tempDir(t, 'shmfd-incr-');
  const backup = path.join(dir, 'state');
  const tree = host(backup);
  t.after(() => tree.kill('SIGKILL'));
  assert.equal(await waitForCount(tree.err, IN_PLACE, 3), 3, tree.err.lines.join('\n'));
  fs.rmSync(backup);
  const from = tree.err.lines.length;
  for (let i = from; ; i++) {
    const line = await tree.err.line(i);
    assert.ok(line !== undefined, tree.err.lines.join('\n'));
    if (/snapshot persisted: /.test(line)) break;
  }
  let settled;
  while ((settled = settledBackup(backup)) === undefined) await sleep(1);
  assert.ok(checkAllSnapshots(fs.readFileSync(settled), 'the backup written again').newest > 0);
  tree.kill('SIGTERM');
  assert.equal((await tree.exited).code, 0);
});

test('a backup given a second name (a hard link) while rounds go in place: that name keeps its bytes from the next round on, and rounds go in place again', async (t) => {
  const dir = tempDir(t, 'shmfd-incr-');
  const backup = path.join(dir, 'state');
  const monday = path.join(dir, 'state.monday');
  const tree = host(backup);
  t.after(() => tree.kill('SIGKILL'));
  assert.equal(await waitForCount(tree.err, IN_PLACE, 3), 3, tree.err.lines.join('\n'));
  fs.linkSync(backup, monday);
  // Seen as a round begins, or by a round waiting for the disk when the link was made.
  const noticed = new RegExp(
    `^shm-restore: ${backup.replaceAll('.', '\\.')} (has 2 names \\(hard links\\): this round copies the memory whole, so that the other names keep what they hold \\(writing in place would change them too\\)` +
      '|got 2 names \\(hard links\\) while a round wrote it in place: the round is discarded, the next copies the memory whole, so that the other names keep what they hold)$',
  );
  assert.ok((await tree.err.waitFor(noticed)) !== undefined, tree.err.lines.join('\n'));
  // From here on nothing writes into the file both names had: the round that noticed
  // renames a whole copy over the backup's name, and later rounds write into that copy.
  const kept = fs.readFileSync(monday);
  assert.equal(await waitForCount(tree.err, IN_PLACE, 5, tree.err.lines.length), 5, tree.err.lines.join('\n'));
  assert.ok(fs.readFileSync(monday).equals(kept), 'the second name keeps its bytes while rounds go in place');
  assert.equal(fs.statSync(monday).nlink, 1);
  assert.ok(checkAllSnapshots(kept, 'the second name').newest > 0, 'and they are a whole backup');
  tree.kill('SIGTERM');
  assert.equal((await tree.exited).code, 0, tree.err.lines.join('\n'));
  assert.ok(fs.readFileSync(monday).equals(kept), 'the exit leaves it alone too');
  assert.ok(!fs.readFileSync(backup).equals(kept), 'while the backup moved on');
});

/**
 * A host on `dir/state` with in-place rounds, running on, and an older copy of its backup at
 * `dir/older` (taken after 3 rounds, followed by 10 more whose pages it lacks and no mark
 * names again).
 * @param {import('node:test').TestContext} t
 */
async function hostWithOlderCopy(t) {
  const dir = tempDir(t, 'shmfd-incr-');
  const backup = path.join(dir, 'state');
  const older = path.join(dir, 'older');
  const tree = host(backup);
  t.after(() => tree.kill('SIGKILL'));
  const program = Number((await tree.out.waitFor(/^pid (\d+)$/))?.[1]);
  assert.equal(await waitForCount(tree.err, IN_PLACE, 3), 3, tree.err.lines.join('\n'));
  let settled;
  while ((settled = settledBackup(backup)) === undefined) await sleep(1);
  fs.renameSync(settled, older);
  assert.equal(await waitForCount(tree.err, IN_PLACE, 10, tree.err.lines.length), 10, tree.err.lines.join('\n'));
  return { dir, backup, older, tree, program };
}

/**
 * {@link hostWithOlderCopy}, with its program stopped once the round that persisted its last
 * commit ended (one more round may still write what the program wrote after that round
 * took its marks).
 * @param {import('node:test').TestContext} t
 */
async function olderCopyBetweenRounds(t) {
  const { backup, older, tree, program } = await hostWithOlderCopy(t);
  process.kill(program, 'SIGSTOP');
  await waitFor(() => isStopped(program), 'the program to stop');
  const memory = fs.readFileSync(`/proc/${program}/fd/3`);
  const newest = Math.max(...validSnapshots(memory, 'the memory').snapshots.map((s) => s.offset));
  assert.ok((await tree.err.waitFor(new RegExp(`snapshot persisted( in place)?: .*, newest at ${newest};`))) !== undefined, tree.err.lines.join('\n'));
  return { backup, older, tree, program };
}

/** How a round that found the backup changed during it says so: discarded, the next copies whole. */
const DURING_A_ROUND = 'while a round wrote it in place \\(replaced, or written by another process\\): the round is discarded, the next copies the memory whole';
/** The line of a host that found BACKUP (at a path ending in `/state`) changed, as a round begins or during one: both lead to the same whole copy. */
const CHANGED = new RegExp(`^shm-restore: \\S+/state changed (since this host last wrote it \\(replaced, removed, or written by another process\\): this round copies the memory whole|${DURING_A_ROUND})$`);

test('a backup replaced (mv) or rewritten (cp) behind the host while rounds go in place: the next round copies the memory whole, and the backup names committed bytes', async (t) => {
  for (const how of ['mv', 'cp']) {
    const { backup, older, tree, program } = await olderCopyBetweenRounds(t);
    const from = tree.err.lines.length;
    if (how === 'mv') fs.renameSync(older, backup);
    else fs.copyFileSync(older, backup);
    process.kill(program, 'SIGCONT');
    // Seen as a round begins, or by the round the program's last writes make, if it was waiting for the disk.
    assert.ok((await tree.err.waitFor(CHANGED)) !== undefined, `${how}:\n${tree.err.lines.join('\n')}`);
    assert.equal(await waitForCount(tree.err, IN_PLACE, 5, from), 5, tree.err.lines.join('\n'));
    tree.kill('SIGKILL');
    await tree.exited;
    const { newest: commit, checked } = checkAllSnapshots(fs.readFileSync(settledBackup(backup)), `after ${how} and 5 rounds in place`);
    assert.ok(commit > 0 && checked > 0, `${how}: newest ${commit}, checked ${checked}`);
  }
});

/** The syscalls in which Node's main thread waits for its event loop, by architecture. */
const EPOLL_WAITS = /** @type {Record<string, number[]>} */ ({ x64: [232, 281, 441], arm64: [22, 441] })[process.arch];

test('a backup rewritten (cp) while a round in place waits for the disk: the round is discarded, the next copies whole, and the backup names committed bytes', { skip: EPOLL_WAITS === undefined && 'knows the epoll syscalls of x64 and arm64 only' }, async (t) => {
  const { dir, backup, older, tree } = await hostWithOlderCopy(t);
  const journalPath = path.join(dir, '.state.journal');
  // The host stopped inside a round (its journal complete, not yet spent) while its main
  // thread waits for the event loop: for the journal's fdatasync or the backup's fsync.
  const waitsForTheDisk = () => EPOLL_WAITS?.includes(Number(fs.readFileSync(`/proc/${tree.pid}/syscall`, 'utf8').split(' ')[0])) === true;
  await stopHostWhen(tree, () => journalRound(journalPath) !== undefined && waitsForTheDisk(), () => journalRound(journalPath));
  const from = tree.err.lines.length;
  fs.copyFileSync(older, backup);
  process.kill(tree.pid, 'SIGCONT');
  assert.ok((await tree.err.waitFor(new RegExp(`^shm-restore: \\S+/state changed ${DURING_A_ROUND}$`))) !== undefined, tree.err.lines.join('\n'));
  assert.equal(await waitForCount(tree.err, IN_PLACE, 5, from), 5, tree.err.lines.join('\n'));
  tree.kill('SIGKILL');
  await tree.exited;
  const { newest, checked } = checkAllSnapshots(fs.readFileSync(settledBackup(backup)), 'after a cp during a round and 5 rounds in place');
  assert.ok(newest > 0 && checked > 0, `newest ${newest}, checked ${checked}`);
});

/** A backup with in-place rounds, its host killed after one: returns the backup's bytes and the (applied) journal's. */
async function killedAfterRounds(dir) {
  const backup = path.join(dir, 'state');
  const journalPath = path.join(dir, '.state.journal');
  const round = await killWithCompleteJournal(host(backup), journalPath, IN_PLACE, 5);
  return { backup, journalPath, journal: fs.readFileSync(journalPath), round };
}

/** `shm-restore status` of `backup`, read-only. */
function statusOf(backup) {
  return run(NODE, [SHM_RESTORE, '--snapshot=restore-v1', 'status', backup]);
}

/** Runs the host with `true`: it replays or discards the journal, restores, and writes the memory back whole. */
async function startAndExit(backup) {
  const r = await run(NODE, [SHM_RESTORE, '--snapshot=restore-v1', '--log-level', 'info', backup, 'true']);
  assert.equal(r.code, 0, r.stderr);
  return r.stderr;
}

test('a complete journal is replayed at start: the pages its round had not written yet are written', async (t) => {
  const dir = tempDir(t, 'shmfd-incr-');
  const { backup, journalPath, round } = await killedAfterRounds(dir);
  const expected = fs.readFileSync(backup);
  for (const run of round.runs) run.data.copy(expected, run.offset);
  // A crash in the middle of the in-place writes: the round's pages are not all there yet.
  const torn = fs.openSync(backup, 'r+');
  for (const run of round.runs) fs.writeSync(torn, Buffer.alloc(run.data.length, 0xee), 0, run.data.length, run.offset);
  fs.closeSync(torn);
  // status describes what the next start restores, not the torn file (which it would call
  // damaged, with a way out that drops the journal: a new inode).
  const status = await statusOf(backup);
  assert.equal(status.code, 0, status.stdout);
  assert.match(status.stdout, new RegExp(`^journal: .*\\.state\\.journal: round ${round.sequence}, complete; a host applies it at start \\(the facts below are of the backup with it applied\\)$`, 'm'), status.stdout);
  const stderr = await startAndExit(backup);
  assert.match(stderr, new RegExp(`applied the journal of round ${round.sequence}`));
  assert.ok(fs.readFileSync(backup).equals(expected), 'the backup is the round, complete');
  assert.ok(!fs.existsSync(journalPath), 'the journal is removed once applied');
  checkAllSnapshots(expected, 'the replayed backup');
  const after = await statusOf(backup);
  /** The lines of what the backup holds; its blocks on disk and its age change with the write-back. */
  const holds = (/** @type {string} */ out) => out.split('\n').filter((l) => /^(backup size|integrity record|state|snapshots|newest snapshot size):/.test(l)).map((l) => l.replace(/, [^,]* on disk$/, ''));
  assert.equal(holds(status.stdout).length, 5, status.stdout);
  assert.deepEqual(holds(status.stdout), holds(after.stdout), `before the start:\n${status.stdout}\nafter it:\n${after.stdout}`);
});

test('a backup put back by hand (cp, same inode) after its host was killed between rounds: no round of the old host is replayed into it', async (t) => {
  const { backup, older, tree } = await olderCopyBetweenRounds(t);
  const olderCommit = checkAllSnapshots(fs.readFileSync(older), 'the older copy').newest;
  // Pages the program wrote after the last round took its marks make one more round.
  await killBetweenRounds(tree, path.join(path.dirname(backup), '.state.journal'));
  // Written into the backup's inode, which keeps the record of the state it held.
  fs.copyFileSync(older, backup);
  const refused = await run(NODE, [SHM_RESTORE, '--snapshot=restore-v1', '--log-level', 'info', backup, 'true']);
  assert.equal(refused.code, 125, refused.stderr);
  assert.doesNotMatch(refused.stderr, /applied the journal/);
  assert.match(refused.stderr, /^shm-restore: error: backup \S+\/state: changed since shm-restore wrote it: .* \(to restore it anyway, drop the record: cp /m);
  assert.ok(fs.readFileSync(backup).equals(fs.readFileSync(older)), 'nothing written into it');
  // As the line says: a copy without the record, moved over it.
  fs.copyFileSync(older, `${backup}.unchecked`);
  fs.renameSync(`${backup}.unchecked`, backup);
  const stderr = await startAndExit(backup);
  assert.doesNotMatch(stderr, /applied the journal/);
  const { newest: commit } = checkAllSnapshots(fs.readFileSync(backup), 'the backup put back, restored and written back');
  assert.equal(commit, olderCommit, 'the state put back, nothing else');
});

test('an incomplete journal, or one of another file, is discarded at start and the backup is left as it was', async (t) => {
  const dir = tempDir(t, 'shmfd-incr-');
  const { backup, journalPath, journal, round } = await killedAfterRounds(dir);
  // The kill may have cut the round's in-place writes between the head and its record: a
  // state only the journal repairs. A host applies it first, as it would.
  assert.match(await startAndExit(backup), /applied the journal/);
  // Other bytes where the round writes in the tail (the record does not cover it): a
  // replay would show. The backup's bytes are rewritten in place, inode and record kept.
  const before = fs.readFileSync(backup);
  for (const r of round.runs.slice(1)) before.fill(0xee, r.offset, r.offset + r.data.length);
  assert.ok(round.runs.length > 1, 'the round wrote tail pages');
  fs.writeFileSync(backup, before);
  // The journal is written over in place: what follows its own length is an older round's.
  const total = Number(journal.readBigUInt64LE(48));
  /** @type {[string, RegExp, Buffer | undefined][]} */
  const cases = [
    ['cut short', /incomplete/, journal.subarray(0, total - 100)],
    ['a byte of its data flipped', /incomplete/, (() => { const j = Buffer.from(journal); j[total - 40] ^= 1; return j; })()],
    ['of another file', /another file/, undefined],
  ];
  for (const [what, reason, given] of cases) {
    // Same round, another inode: as left by a crash after a whole copy replaced the backup.
    // Another than the backup's now: the write-backs of the cases before replaced it, and
    // a new file may get any number, the journal's + 1 among them.
    const bytes =
      given ??
      (() => {
        const j = Buffer.from(journal.subarray(0, total - 32));
        j.writeBigUInt64LE(BigInt(fs.statSync(backup).ino) + 1n, 24);
        return Buffer.concat([j, Buffer.from(crypto.createHash('sha256').update(j).digest())]);
      })();
    fs.writeFileSync(journalPath, bytes);
    const status = await statusOf(backup);
    assert.match(status.stdout, new RegExp(`^journal: .*${reason.source}.*; a host discards it at start$`, 'm'), `${what}:\n${status.stdout}`);
    const stderr = await startAndExit(backup);
    assert.match(stderr, /discarded the journal/, what);
    assert.match(stderr, reason, what);
    assert.ok(!fs.existsSync(journalPath), `${what}: the journal is removed`);
    assert.ok(fs.readFileSync(backup).equals(before), `${what}: the backup is unchanged`);
  }
});

test('status and a start agree on a complete journal whose round does not match the record it sets: damaged, refused once applied', async (t) => {
  const dir = tempDir(t, 'shmfd-incr-');
  const { backup, journalPath, journal } = await killedAfterRounds(dir);
  // Another digest in the record text (at byte 64, after its length), the checksum made anew.
  const total = Number(journal.readBigUInt64LE(48));
  const forged = Buffer.from(journal.subarray(0, total - 32));
  const last = 64 + forged.readUInt32LE(56) - 1;
  forged[last] = forged[last] === 0x30 ? 0x31 : 0x30;
  fs.writeFileSync(journalPath, Buffer.concat([forged, crypto.createHash('sha256').update(forged).digest()]));
  const status = await statusOf(backup);
  assert.equal(status.code, 1, status.stdout);
  assert.match(status.stdout, /^state: damaged: its journal's round does not match the user\.shmfd\.check record it sets/m, status.stdout);
  const started = await run(NODE, [SHM_RESTORE, '--snapshot=restore-v1', '--log-level', 'info', backup, 'true']);
  assert.equal(started.code, 125, started.stderr);
  assert.match(started.stderr, /applied the journal/);
  assert.match(started.stderr, /^shm-restore: error: backup \S+: changed since shm-restore wrote it/m);
});

/**
 * `kills` runs of the writer under a host on one backup in `dir`, each ended by a SIGKILL of
 * the program, the host or the whole tree, in turn, at a random instant during in-place
 * rounds; after each, the backup (with its journal applied, as the next host does) must
 * name committed states, never older ones, and the next run must recover at least that.
 */
async function killChain(dir, kills, stats) {
  const backup = path.join(dir, 'state');
  const journalPath = path.join(dir, '.state.journal');
  const targets = ['program', 'host', 'tree'];
  let durable = 0;
  for (let kill = 0; kill < kills; kill++) {
    const target = targets[kill % 3];
    const tree = host(backup);
    const pid = Number((await tree.out.waitFor(/^pid (\d+)$/))?.[1]);
    const recovered = await tree.out.waitFor(/^recovered (\d+)$/);
    assert.ok(recovered !== undefined, `seed ${SEED}, kill ${kill}: ${tree.err.lines.join('\n')}`);
    assert.ok(Number(recovered[1]) >= durable, `seed ${SEED}, kill ${kill}: recovered ${recovered[1]}, but the backup held ${durable}`);
    // At least one in-place round, then a random instant within the next ones.
    await waitForCount(tree.err, IN_PLACE, 1 + rng.int(0, 3));
    await sleep(rng.int(0, 12));
    if (target === 'program') process.kill(pid, 'SIGKILL');
    else if (target === 'host') process.kill(tree.pid, 'SIGKILL');
    else tree.kill('SIGKILL');
    stats[target]++;
    const ended = await tree.exited;
    assert.ok(!tree.out.lines.some((l) => l.startsWith('problem')), tree.out.lines.join('\n'));
    if (target === 'program') assert.equal(ended.code, 137, `seed ${SEED}: the host reports the program's SIGKILL after writing it back:\n${ended.stderr}`);
    if (journalRound(journalPath) !== undefined) stats.journaled++;
    const { newest } = checkAllSnapshots(fs.readFileSync(settledBackup(backup)), `seed ${SEED}, kill ${kill} (${target})`);
    assert.ok(newest >= durable, `seed ${SEED}, kill ${kill}: the backup went back from ${durable} to ${newest}`);
    durable = newest;
  }
  return durable;
}

test(`SIGKILL of the program, the host, or the whole tree during in-place rounds (${KILLS} kills): every backup names committed states, and the next run recovers it`, async (t) => {
  // The long mode runs three backups side by side: the runs mostly wait for processes to start.
  const chains = KILLS > 50 ? 3 : 1;
  const stats = { program: 0, host: 0, tree: 0, journaled: 0 };
  const finals = await Promise.all(
    Array.from({ length: chains }, (_, i) => killChain(tempDir(t, `shmfd-incr-${i}-`), Math.ceil(KILLS / chains), stats)),
  );
  t.diagnostic(`seed ${SEED}: ${JSON.stringify(stats)}; final commits ${finals.join(', ')}`);
  assert.ok(finals.every((f) => f > 0));
});

const canMount = isRoot && works('unshare', ['-m', 'true']);

/**
 * Runs incremental-writer.js under a host (rounds every `interval` ms, debug log) whose
 * backup lies on a 24 MiB tmpfs of its own, in a private mount namespace: once a round ran
 * in place (with `unmarked`, once a round persisted: the program is then handed the memory
 * alone, not the dirty-page map, and marks nothing), the shell commands `fill` take the
 * disk's space (in files named `filler*`; `$program` is the program's pid), and once the
 * shell condition `stopWhen` holds (or after 60 s) the host is stopped with SIGTERM (with
 * `kill: 'KILL'`, the whole tree is killed). A copy `fill` makes at `$1/at-fill` is
 * checked too. Then the space is freed, the backup
 * checked where it lies (the journal names its inode) by check-settled-backup.js, and
 * restored by a new host whose program commits 8 times.
 * @returns the statuses of the host, the check and the new host on stdout
 *   (`host-status=N` ...), and `read(name)` for their output files: out, err, check,
 *   check-at-fill, out2, err2
 */
async function onFullDisk(/** @type {import('node:test').TestContext} */ t, interval, fill, stopWhen, { unmarked = false, kill = 'TERM' } = {}) {
  const dir = tempDir(t, 'shmfd-incr-full-');
  fs.mkdirSync(path.join(dir, 'disk'));
  // The host passes the memory first, then the map: the program is told of the first only.
  const program = unmarked ? `sh -c 'LISTEN_FDS=1 LISTEN_FDNAMES=SHM_SHARED_FD exec "$0" "$@"'` : '';
  const script = `
    set -e
    mount -t tmpfs -o size=24m tmpfs "$1/disk"
    setsid "$2" "$3" --snapshot=restore-v1 --interval ${interval} --log-level debug "$1/disk/state" ${program} "$2" "$4" "$5" > "$1/out" 2> "$1/err" &
    host=$!
    i=0; until grep -q "${unmarked ? 'snapshot persisted:' : 'persisted in place'}" "$1/err"; do sleep 0.02; i=$((i+1)); [ $i -lt 3000 ] || break; done
    program=$(sed -n 's/^pid //p' "$1/out")
    ${fill}
    i=0; until ${stopWhen}; do sleep 0.02; i=$((i+1)); [ $i -lt 3000 ] || break; done
    kill -${kill} ${kill === 'KILL' ? '-$host' : '$host'}
    set +e
    wait $host
    echo "host-status=$?"
    [ -e "$1/disk/.state.journal" ] && echo journal-left=yes || echo journal-left=no
    rm -f "$1/disk"/filler*
    "$2" "$6" "$1/disk/state" > "$1/check" 2>&1
    echo "check-status=$?"
    if [ -e "$1/at-fill" ]; then "$2" "$6" "$1/at-fill" > "$1/check-at-fill" 2>&1; echo "check-at-fill-status=$?"; fi
    "$2" "$3" --snapshot=restore-v1 --log-level info "$1/disk/state" "$2" "$4" "$5" 8 > "$1/out2" 2> "$1/err2"
    echo "again-status=$?"
  `;
  const r = await run('unshare', ['-m', 'sh', '-c', script, 'sh', dir, NODE, SHM_RESTORE, PROGRAM, String(CAPACITY), fixture('check-settled-backup.js')]);
  return { stdout: r.stdout, stderr: r.stderr, read: (/** @type {string} */ name) => fs.readFileSync(path.join(dir, name), 'utf8') };
}

/** Shell: 2 MiB of allocated room past the journal's end (bytes after its length mean nothing). */
const JOURNAL_ROOM = 'dd if=/dev/zero of="$1/disk/.state.journal" bs=1M count=2 oflag=append conv=notrunc 2>/dev/null';

/**
 * Shell, for `onFullDisk`: with the program stopped (the state /proc shows, not only the
 * signal sent), and once the backup holds its last commit (its head page is the memory's:
 * no round copies any more), every page of the
 * backup gets allocated (fallocate keeps its bytes), the journal its room, and files the
 * rest of the space: writes in place still work, a whole copy does not. (A whole copy that
 * succeeded after the journal got its room would remove the journal.)
 */
const NO_ROOM_FOR_A_COPY = `
    kill -STOP $program
    until grep -q "^State:[[:space:]]*T" /proc/$program/status; do sleep 0.01; done
    i=0; until cmp -s -n 4096 /proc/$program/fd/3 "$1/disk/state"; do sleep 0.02; i=$((i+1)); [ $i -lt 3000 ] || break; done
    fallocate -l $(stat -c %s "$1/disk/state") "$1/disk/state"
    ${JOURNAL_ROOM}
    dd if=/dev/zero of="$1/disk/filler" bs=64k 2>/dev/null || true
    dd if=/dev/zero of="$1/disk/filler-4k" bs=4k 2>/dev/null || true
    kill -CONT $program`;

/**
 * Asserts, from what `onFullDisk` returned, that the backup (checked independently of src/)
 * holds exactly commit `stopped`, and that the next host restored it.
 * @param {Awaited<ReturnType<typeof onFullDisk>>} r
 * @param {number} stopped
 */
function assertBackupHolds(r, stopped) {
  const { read } = r;
  assert.match(r.stdout, /^check-status=0$/m, read('check'));
  assert.equal(JSON.parse(read('check')).newest, stopped, read('check'));
  assert.match(r.stdout, /^again-status=0$/m, read('err2'));
  assert.equal(Number(/^recovered (\d+)$/m.exec(read('out2'))?.[1]), stopped, read('out2'));
  assert.doesNotMatch(read('out2'), /^problem/m);
}

test('a disk that fills up during in-place rounds: each failure one error line, the exit says what is lost, the torn backup restores with its journal', { skip: !canMount && 'needs root and unshare -m to mount a small tmpfs' }, async (t) => {
  // The next rounds' journals fit in their room, but their writes into pages the backup has
  // not allocated yet fail: the backup is torn until its journal is applied, the hardest case.
  const r = await onFullDisk(t, 5, `${JOURNAL_ROOM}; dd if=/dev/zero of="$1/disk/filler" bs=64k 2>/dev/null || true`, 'grep -q "cannot persist" "$1/err"');
  const { read } = r;
  const err = read('err');
  assert.match(err, IN_PLACE, `in-place rounds ran before the disk filled:\n${err}`);
  const failures = err.split('\n').filter((l) => l.includes('cannot persist a snapshot'));
  assert.ok(failures.length > 0, `a round failed on the full disk:\n${err}`);
  const torn = 'the backup on disk is the previous one once its journal .*/\\.state\\.journal is applied, as the next start does \\(a copy of the backup alone is not a state\\)';
  assert.match(failures[0], new RegExp(`^shm-restore: error: cannot persist a snapshot to .*: no space left on device \\(ENOSPC\\); ${torn}$`));
  // Each failure is an error line once; the same one again is a debug line.
  const message = (/** @type {string} */ line) => line.replace(/^shm-restore: \w+: /, '');
  const errors = failures.filter((l) => l.includes(': error: ')).map(message);
  assert.equal(new Set(errors).size, errors.length, errors.join('\n'));
  assert.ok(failures.every((l) => errors.includes(message(l))), failures.join('\n'));
  // The program stopped cleanly; the host could not write the memory back, and says so.
  assert.match(r.stdout, /^host-status=125$/m, r.stderr);
  assert.match(err, new RegExp(`error: the final write-back to .* failed: no space left on device \\(ENOSPC\\); ${torn}, the newest state is lost$`, 'm'));
  // What is left on disk, with its journal applied, names committed states only...
  assert.match(r.stdout, /^check-status=0$/m, read('check'));
  const { newest } = JSON.parse(read('check'));
  assert.ok(newest > 0, read('check'));
  // ...and the next host applies the journal, then restores at least the newest of them.
  assert.match(r.stdout, /^again-status=0$/m, read('err2'));
  assert.match(read('err2'), /applied the journal of round \d+ to /);
  const recovered = Number(/^recovered (\d+)$/m.exec(read('out2'))?.[1]);
  assert.ok(recovered >= newest, `recovered ${recovered}, the backup held ${newest}`);
  assert.doesNotMatch(read('out2'), /^problem/m);
});

test('a disk with no room for the final whole copy: the round in place at exit keeps the newest state', { skip: !canMount && 'needs root and unshare -m to mount a small tmpfs' }, async (t) => {
  // Once rounds run in place, the disk is left with no room for a copy: in-place rounds
  // still work, the whole copy at exit does not. Rounds every 200 ms: the program commits
  // every 2 ms, so the last round before its exit is older than its last commit.
  const fill = `${NO_ROOM_FOR_A_COPY}; full=$(grep -c "persisted in place" "$1/err")`;
  const r = await onFullDisk(t, 200, fill, '[ $(grep -c "persisted in place" "$1/err") -ge $((full + 2)) ]');
  const { read } = r;
  const err = read('err');
  // Filling the disk allocated the backup's holes (fallocate), a change the host did not
  // make: the next round copies the memory whole, which finds no room, and the rounds after
  // it write in place, by comparison once, then by the marks again.
  const lines = err.split('\n');
  // Noticed as the next round begins, or by a round that was waiting for the disk meanwhile.
  const changed = lines.findIndex((l) => CHANGED.test(l));
  assert.ok(changed > 0, err);
  const failed = lines.filter((l) => l.includes('cannot persist'));
  assert.deepEqual(failed, [lines[changed + 1]], err);
  assert.match(failed[0] ?? '', /^shm-restore: error: cannot persist a snapshot to \S+\/disk\/state: no space left on device \(ENOSPC\); the backup on disk is the previous one$/);
  assert.match(err, WORKS_IN_PLACE);
  const after = lines.slice(lines.findIndex((l) => WORKS_IN_PLACE.test(l)));
  assert.ok(after.filter((l) => IN_PLACE.test(l)).length >= 3, `in-place rounds go on on the full disk:\n${err}`);
  // The program stopped cleanly at its last commit; the whole copy found no room, which the
  // host reports, and says that nothing is lost.
  const stopped = Number(/^stopped at (\d+)$/m.exec(read('out'))?.[1]);
  assert.ok(stopped > 0, read('out'));
  assert.match(r.stdout, /^host-status=125$/m, r.stderr);
  const errors = lines.filter((l) => l.includes(': error: '));
  assert.equal(errors.length, 2, err);
  assert.match(errors[1], /^shm-restore: error: the final write-back to \S+\/disk\/state failed: no space left on device \(ENOSPC\); the backup on disk holds the newest state, written in place after the program exited$/);
  assertBackupHolds(r, stopped);
});

test('a disk with no room for a whole copy, a program that marks nothing: rounds go on in place with the pages that differ, the exit too', { skip: !canMount && 'needs root and unshare -m to mount a small tmpfs' }, async (t) => {
  // The program's rounds copy the memory whole. Once one persisted, the disk is left with
  // no room for a copy, only the journal's 2 MiB (as a disk too full for a copy may still
  // have): a copy fails, the rounds after it compare the memory with the backup and write
  // what differs in place, and the host is stopped after two of them; the program has
  // committed since the last (it commits every 2 ms, rounds run every 200 ms).
  const r = await onFullDisk(t, 200, NO_ROOM_FOR_A_COPY, '[ $(grep -c "persisted in place" "$1/err") -ge 2 ]', { unmarked: true });
  const { read } = r;
  const err = read('err');
  const exited = err.indexOf('sh exited with status 0');
  assert.ok(exited > 0, err);
  assert.match(err, /error: cannot persist a snapshot to \S+: no space left on device \(ENOSPC\); the backup on disk is the previous one$/m, 'a whole copy failed on the full disk');
  assert.match(err.slice(0, exited), WORKS_IN_PLACE, 'rounds went on in place');
  assert.match(err.slice(exited), IN_PLACE, 'and one more after the program exited');
  const stopped = Number(/^stopped at (\d+)$/m.exec(read('out'))?.[1]);
  assert.ok(stopped > 0, read('out'));
  assert.match(r.stdout, /^host-status=125$/m, r.stderr);
  assert.match(err, /^shm-restore: error: the final write-back to \S+\/disk\/state failed: no space left on device \(ENOSPC\); the backup on disk holds the newest state, written in place after the program exited$/m);
  assertBackupHolds(r, stopped);
});

test('a disk with no room for a whole copy, a program that marks nothing: a SIGKILL of the tree keeps what the rounds in place wrote', { skip: !canMount && 'needs root and unshare -m to mount a small tmpfs' }, async (t) => {
  // As above; the backup as the disk filled is copied aside, and the tree is killed after
  // two rounds in place.
  const fill = `${NO_ROOM_FOR_A_COPY}; cp "$1/disk/state" "$1/at-fill"`;
  const r = await onFullDisk(t, 200, fill, '[ $(grep -c "persisted in place" "$1/err") -ge 2 ]', { unmarked: true, kill: 'KILL' });
  const { read } = r;
  assert.match(read('err'), WORKS_IN_PLACE);
  assert.match(r.stdout, /^host-status=137$/m, r.stderr);
  // Both backups, checked independently of src/ (the journal applied), name committed states
  // only, and the one the rounds in place left is newer than the one before them...
  assert.match(r.stdout, /^check-at-fill-status=0$/m, read('check-at-fill'));
  assert.match(r.stdout, /^check-status=0$/m, read('check'));
  const atFill = JSON.parse(read('check-at-fill')).newest;
  const { newest } = JSON.parse(read('check'));
  assert.ok(newest > atFill, `the backup holds commit ${newest}, against ${atFill} when the disk filled`);
  // ...and the next host restores it.
  assert.match(r.stdout, /^again-status=0$/m, read('err2'));
  const recovered = Number(/^recovered (\d+)$/m.exec(read('out2'))?.[1]);
  assert.ok(recovered >= newest, `recovered ${recovered}, the backup held ${newest}`);
  assert.doesNotMatch(read('out2'), /^problem/m);
});

test('a disk with no room for a whole copy, a program that marks nothing: once room is back, rounds copy whole again and the exit leaves no journal', { skip: !canMount && 'needs root and unshare -m to mount a small tmpfs' }, async (t) => {
  // As above; after two rounds in place the filler is removed, and the host is stopped
  // after the next whole copy.
  const stopWhen = `[ $(grep -c "persisted in place" "$1/err") -ge 2 ] && rm -f "$1/disk/filler" && [ $(grep -c "snapshot persisted:" "$1/err") -gt $(cat "$1/whole") ]`;
  const fill = `${NO_ROOM_FOR_A_COPY}; grep -c "snapshot persisted:" "$1/err" > "$1/whole"`;
  const r = await onFullDisk(t, 200, fill, stopWhen, { unmarked: true });
  const { read } = r;
  const err = read('err');
  const back = err.lastIndexOf('persisted in place');
  assert.ok(back > 0 && /snapshot persisted: /.test(err.slice(back)), `a whole copy after the rounds in place:\n${err}`);
  assert.match(r.stdout, /^host-status=0$/m, err);
  assert.match(err, /^shm-restore: wrote back /m);
  assert.match(r.stdout, /^journal-left=no$/m, 'the exit wrote the backup whole and removed its journal');
  assert.match(r.stdout, /^check-status=0$/m, read('check'));
  assert.equal(JSON.parse(read('check')).newest, Number(/^stopped at (\d+)$/m.exec(read('out'))?.[1]), read('check'));
});

/** Kills of the chain below: a tenth of the long mode's, at least 6. */
const COMPARISON_KILLS = Math.max(6, Math.ceil(KILLS / 10));

test(`SIGKILL of the whole tree at random instants while rounds go in place by comparison (${COMPARISON_KILLS} kills): every backup names committed states, and the next run recovers it`, { skip: !canMount && 'needs root and unshare -m to mount a small tmpfs' }, async (t) => {
  // A program that marks nothing, on a disk left without room for a whole copy (as above):
  // each run's rounds compare the memory with the backup and write what differs in place.
  // Each run is killed whole at a random instant after its first such round; the next
  // starts from what is left (a leftover copy is removed, the journal applied). The journal
  // removed at a start frees its room: the program's wrapper allocates every page of the
  // restored memory (fill-holes.js), so that a whole copy still needs more room than that.
  const dir = tempDir(t, 'shmfd-incr-compare-');
  fs.mkdirSync(path.join(dir, 'disk'));
  const delays = Array.from({ length: COMPARISON_KILLS }, () => (rng.int(0, 300) / 1000).toFixed(3));
  const script = `
    mount -t tmpfs -o size=24m tmpfs "$1/disk"
    k=0
    for delay in ${delays.join(' ')} last; do
      k=$((k+1))
      if [ $delay = last ]; then commits=8; else commits=; fi
      setsid "$2" "$3" --snapshot=restore-v1 --interval 20 --log-level debug "$1/disk/state" sh -c '"$0" "$1" && shift && LISTEN_FDS=1 LISTEN_FDNAMES=SHM_SHARED_FD exec "$0" "$@"' "$2" "$7" "$4" "$5" $commits > "$1/out-$k" 2> "$1/err-$k" &
      host=$!
      if [ $delay = last ]; then wait $host; echo "run-$k status=$? recovered=$(sed -n 's/^recovered //p' "$1/out-$k")"; break; fi
      if [ $k = 1 ]; then
        i=0; until grep -q "snapshot persisted:" "$1/err-$k"; do sleep 0.02; i=$((i+1)); [ $i -lt 3000 ] || break; done
        program=$(sed -n 's/^pid //p' "$1/out-$k")
        ${NO_ROOM_FOR_A_COPY}
      fi
      i=0; until grep -q "persisted in place" "$1/err-$k"; do sleep 0.02; i=$((i+1)); [ $i -lt 3000 ] || break; done
      sleep $delay
      kill -KILL -$host
      wait $host
      "$2" "$6" "$1/disk/state" "$1" > "$1/check-$k" 2>&1
      checked=$?
      echo "run-$k status=$checked recovered=$(sed -n 's/^recovered //p' "$1/out-$k") in-place=$(grep -c "persisted in place" "$1/err-$k") check=$(cat "$1/check-$k" | tr '\n' ' ')"
      [ $checked = 0 ] || break
    done
  `;
  const r = await run('unshare', ['-m', 'sh', '-c', script, 'sh', dir, NODE, SHM_RESTORE, PROGRAM, String(CAPACITY), fixture('check-settled-backup.js'), fixture('fill-holes.js')], { timeoutMs: 600_000 });
  const runs = [...r.stdout.matchAll(/^run-(\d+) status=(\d+) recovered=(\d*)(?: in-place=(\d+) check=(.*))?$/gm)];
  const log = (/** @type {number} */ k) => `seed ${SEED}, run ${k}:\n${r.stdout}${r.stderr}${fs.existsSync(path.join(dir, `err-${k}`)) ? fs.readFileSync(path.join(dir, `err-${k}`), 'utf8') : ''}`;
  let newest = 0;
  for (const [, k, status, recovered, inPlace, check] of runs) {
    assert.ok(Number(recovered) >= newest, `${log(Number(k))}\nrecovered ${recovered}, but the backup held ${newest}`);
    if (check === undefined) {
      // The last run commits 8 times and exits; its whole copy at exit finds no room either.
      assert.equal(status, '125', log(Number(k)));
      assert.match(fs.readFileSync(path.join(dir, `err-${k}`), 'utf8'), /error: the final write-back to .* failed: no space left on device \(ENOSPC\); the backup on disk holds the newest state, written in place after the program exited$/m);
      break;
    }
    assert.equal(status, '0', `the backup after the kill is checked (independently of src/): ${log(Number(k))}`);
    assert.ok(Number(inPlace) > 0, log(Number(k)));
    const checked = JSON.parse(check).newest;
    assert.ok(checked >= newest, `${log(Number(k))}\nthe backup went back from ${newest} to ${checked}`);
    newest = checked;
  }
  assert.equal(runs.length, COMPARISON_KILLS + 1, log(runs.length + 1));
  assert.match(fs.readFileSync(path.join(dir, 'err-2'), 'utf8'), WORKS_IN_PLACE, 'a run after a kill also found no room for a copy and went on in place');
  t.diagnostic(`seed ${SEED}: ${COMPARISON_KILLS} kills, final commit checked ${newest}`);
});

test('DirtyPages.mark sets exactly the pages of each range, and take moves them out once', () => {
  const random = seededRandom(7);
  const map = DirtyPages.create();
  try {
    const pages = 4096;
    for (let i = 0; i < 2000; i++) {
      const offset = Math.floor(random.next() * 4096 * (pages - 200));
      const length = 1 + Math.floor(random.next() * 4096 * (random.next() < 0.5 ? 2 : 150));
      map.mark(offset, length);
      const taken = new Uint32Array(pages / 32);
      const first = Math.floor(offset / 4096);
      const last = Math.floor((offset + length - 1) / 4096);
      assert.equal(map.take(pages, taken), last - first + 1, `range ${offset}+${length}`);
      for (let page = 0; page < pages; page++) {
        const set = (taken[page >>> 5] >>> (page & 31)) & 1;
        if (set !== (page >= first && page <= last ? 1 : 0)) assert.fail(`range ${offset}+${length}: page ${page} is ${set ? '' : 'not '}marked`);
      }
      assert.equal(map.take(pages, new Uint32Array(pages / 32)), 0, 'taken bits are cleared');
    }
  } finally {
    map.close();
  }
});
