// The key-value map across real processes: test/fixtures/kv-sequence.js commits the
// deterministic sequence of kv-model.js into a 64 KiB map (its ring is reclaimed every few
// hundred commits), and checks on every start that it recovered exactly the map after its
// sequence number.
// - SIGKILL of the writer at random moments, reopened on the very same memfd; a clean stop
//   leaves an index the next process uses as it is; a copy in a new memfd rebuilds it;
// - SIGKILL of the whole tree under shm-restore --snapshot=restore-v1: every backup,
//   also those persisted while the program ran, restores to a committed map.
// Kill moments come from a seeded generator; replay with STATE_SEED=<seed>.
import assert from 'node:assert/strict';
import path from 'node:path';
import { test } from 'node:test';
import { MemoryFile } from 'shmfd';
import { cleanEnv, fixture, NODE, seededRandom, SHM_RESTORE, eachVersion, settledBackup, sleep, start as startProcess, tempDir } from './helpers.js';
import { expectedAt, recoverCopy } from './fixtures/kv-model.js';

const PROGRAM = fixture('kv-sequence.js');
const SEED = process.env.STATE_SEED === undefined ? Date.now() % 1_000_000_007 : Number(process.env.STATE_SEED);
const rng = seededRandom(SEED);
console.log(`# state-kv-process seed ${SEED} (replay with STATE_SEED=${SEED})`);

const lastCommitted = (watcher) => Math.max(0, ...watcher.numbers(/^committed (\d+)$/));

/** The writer on `memory`, passed as its fd 3. */
function start(/** @type {MemoryFile} */ memory) {
  const env = cleanEnv({ LISTEN_FDS: '1', LISTEN_FDNAMES: 'SHM_SHARED_FD' });
  return startProcess(NODE, [PROGRAM], { env, extraFds: [memory.fd] });
}

async function recovered(run, what) {
  const m = await run.out.waitFor(/^recovered (\d+) rebuilt (true|false)$/);
  assert.ok(m !== undefined, `seed ${SEED}, ${what}: the program did not start: ${run.err.lines.join('\n')}`);
  const problem = run.out.lines.find((l) => l.startsWith('problem'));
  assert.equal(problem, undefined, `seed ${SEED}, ${what}: ${problem}`);
  return { sequence: Number(m[1]), rebuilt: m[2] === 'true' };
}

test('SIGKILL of a map writer at random moments: the same memfd holds a committed map; a clean stop keeps the index, a copy rebuilds it', async (t) => {
  const memory = MemoryFile.create('kv-kill');
  t.after(() => memory.close());
  let durable = 0;
  let rebuilds = 0;
  const rounds = 10;
  for (let round = 1; round <= rounds; round++) {
    const run = start(memory);
    const found = await recovered(run, `round ${round}`);
    assert.ok(found.sequence >= durable, `seed ${SEED}, round ${round}: recovered commit ${found.sequence}, but ${durable} had been committed`);
    if (found.rebuilt) rebuilds++;
    // Every other kill comes after a commit was reported, so the rounds make progress however slow.
    if (round % 2 === 0) await run.out.waitFor(/^committed \d+$/);
    await Promise.race([sleep(rng.int(5, 150)), run.exited]);
    run.child.kill('SIGKILL');
    const { signal } = await run.exited;
    assert.equal(signal, 'SIGKILL', `round ${round}: ${run.err.lines.join('\n')}`);
    durable = Math.max(found.sequence, lastCommitted(run.out));
  }
  // A clean stop: the next process on the same memfd uses the index as it is.
  const stopping = start(memory);
  const before = await recovered(stopping, 'before the clean stop');
  assert.ok(before.sequence >= durable);
  await stopping.out.waitFor(/^committed \d+$/);
  stopping.child.kill('SIGTERM');
  const { code } = await stopping.exited;
  assert.equal(code, 0, stopping.err.lines.join('\n'));
  const stoppedAt = Number((await stopping.out.waitFor(/^stopped at (\d+)$/))[1]);
  const again = start(memory);
  const reattached = await recovered(again, 'after the clean stop');
  again.child.kill('SIGKILL');
  await again.exited;
  assert.equal(reattached.sequence, stoppedAt, 'a clean stop keeps every commit');
  assert.equal(reattached.rebuilt, false, 'reattaching to the same memfd after a clean stop does not rebuild the index');
  // The same bytes in a new memfd (a restored backup): the copied index is not trusted.
  const copy = recoverCopy(`/proc/self/fd/${memory.fd}`);
  assert.equal(copy.problem, undefined, copy.problem);
  assert.equal(copy.rebuilt, true, 'a copy in a new memfd rebuilds its index from the ring');
  const { written } = expectedAt(copy.sequence);
  t.diagnostic(`seed ${SEED}: final commit ${copy.sequence}, ${written} record bytes written through a 64 KiB map, ${rebuilds} of ${rounds} restarts after a kill rebuilt the index`);
  assert.ok(written > 4 * (1 << 16), 'the ring was reclaimed several times');
});

/** The writer under shm-restore, in a process group of its own. */
function startTree(/** @type {string} */ backup, /** @type {import('node:test').TestContext} */ t) {
  return startProcess(NODE, [SHM_RESTORE, '--snapshot=restore-v1', '--interval', '5', backup, NODE, PROGRAM, '2'], { detached: true, guardMs: 90_000, t });
}

function checkBackup(backup, what, atLeast) {
  const found = recoverCopy(backup);
  assert.equal(found.problem, undefined, `seed ${SEED}, ${what}: ${found.problem}`);
  assert.ok(found.sequence >= atLeast, `seed ${SEED}, ${what}: commit ${found.sequence}, older than ${atLeast}`);
  return found.sequence;
}

test('SIGKILL of the whole tree under shm-restore --snapshot=restore-v1: every backup of a map restores to a committed map', async (t) => {
  const dir = tempDir(t, 'shmfd-kv-');
  const backup = path.join(dir, 'kv.backup');
  let durable = 0;
  let seen = 0;
  for (let round = 1; round <= 5; round++) {
    const tree = startTree(backup, t);
    const m = await tree.out.waitFor(/^recovered (\d+) rebuilt/);
    assert.ok(m !== undefined, `round ${round}: ${tree.err.lines.join('\n')}`);
    assert.equal(Number(m[1]), durable, `seed ${SEED}, round ${round}: the program recovered what the backup held`);
    const startDurable = durable;
    const until = Date.now() + rng.int(300, 900);
    const guard = Date.now() + 60_000;
    // Run until the time is up and a backup newer than the last one was checked; the last
    // round also until the backups have seen the ring come round (a slow machine commits
    // less in the same time).
    const running = () => {
      if (Date.now() > guard) throw new Error(`seed ${SEED}, round ${round}: no newer backup within 60 s`);
      return Date.now() < until || durable === startDurable || (round === 5 && expectedAt(durable).written <= 1 << 16);
    };
    await eachVersion(backup, running, (file) => {
      durable = checkBackup(file, `round ${round}, a backup persisted while the program ran`, durable);
      seen++;
    });
    tree.kill('SIGKILL');
    await tree.exited;
    assert.ok(!tree.out.lines.some((l) => l.startsWith('problem')), tree.out.lines.join('\n'));
    durable = checkBackup(settledBackup(backup), `round ${round}, after the kill`, durable);
  }
  t.diagnostic(`seed ${SEED}: ${seen} backups checked while running; final commit ${durable}, ${expectedAt(durable).written} record bytes written`);
  assert.ok(expectedAt(durable).written > 1 << 16, 'the ring came round and was reclaimed while backups were taken');
});
