// Retained logs across real processes: test/fixtures/log-retention.js appends to two
// retained logs forever (log-retention-model.js), so any state found afterwards must be
// exactly the state after some commit k, and k must be at least the last commit it reported.
// - SIGKILL of the writer at random instants, recovered from the very same memfd, while the
//   rings wrap again and again;
// - SIGKILL of the whole tree (shm-restore --snapshot=restore-v1 and the program) at random
//   instants: every backup on disk, also the ones persisted while the program ran, restores
//   to a committed state, and never to an older one than before.
// Kill instants come from a seeded generator; replay with STATE_SEED=<seed>.
import assert from 'node:assert/strict';
import path from 'node:path';
import { test } from 'node:test';
import { MemoryFile } from 'shmfd';
import { fixture, killTreeRounds, killWriterRounds, NODE, seededRandom, SHM_RESTORE, start, tempDir } from './helpers.js';
import { recoverFrom } from './fixtures/log-retention-model.js';

const PROGRAM = fixture('log-retention.js');
const SEED = process.env.STATE_SEED === undefined ? Date.now() % 1_000_000_007 : Number(process.env.STATE_SEED);
const rng = seededRandom(SEED);
console.log(`# state-retention-process seed ${SEED} (replay with STATE_SEED=${SEED})`);


function checkRecovered(found, what, { atLeast }) {
  assert.equal(found.problem, undefined, `seed ${SEED}, ${what}: recovered state is not the one after commit ${found.sequence}: ${found.problem}`);
  assert.ok(found.sequence >= atLeast, `seed ${SEED}, ${what}: recovered commit ${found.sequence}, but ${atLeast} had been committed`);
  return found;
}

test('SIGKILL of a writer appending to retained logs forever: the memfd always holds exactly a committed state, at least the last one reported', async (t) => {
  // The test holds the memfd itself and passes it at fd 3, so nothing but the program
  // touches it; a kill leaves it exactly as the program's stores left it.
  const memory = MemoryFile.create('log-retention-kill');
  t.after(() => memory.close());
  const rounds = 10;
  let records = 0;
  const check = (file, what, atLeast) => {
    const found = checkRecovered(recoverFrom(file), what, { atLeast });
    records = found.records;
    return found.sequence;
  };
  const { midStream, durable } = await killWriterRounds({ rounds, memoryFd: memory.fd, args: [PROGRAM, '0'], rng, check });
  t.diagnostic(`seed ${SEED}: ${midStream} of ${rounds} kills hit a running writer; final commit ${durable}, ${records} records appended to each log`);
  assert.ok(midStream >= rounds - 1, 'the kills hit a running writer');
  // A record takes 116 bytes on average: the 2 KiB ring wrapped many times (the five rounds
  // that wait for a reported commit alone append 320 commits, 213 records).
  assert.ok(records * 116 > 10 * 2048, `the rings wrapped many times (${records} records)`);
});

function startTree(backup) {
  return start(NODE, [SHM_RESTORE, '--snapshot=restore-v1', '--interval', '5', backup, NODE, PROGRAM, '2'], { detached: true, guardMs: 30_000 });
}

test('SIGKILL of the whole tree under shm-restore --snapshot=restore-v1 while retained logs wrap: every backup restores to a committed state, never an older one', async (t) => {
  const dir = tempDir(t, 'shmfd-retention-');
  const backup = path.join(dir, 'state.backup');
  // Every version of the backup (each an atomic rename) must restore to a committed state,
  // and they never go back.
  let records = 0;
  const check = (file, what, atLeast) => {
    const found = checkRecovered(recoverFrom(file), what, { atLeast });
    records = found.records;
    return found.sequence;
  };
  const stats = await killTreeRounds({ rounds: 8, backup, seed: SEED, rng, startTree: () => startTree(backup), check });
  const { durable } = stats;
  t.diagnostic(`seed ${SEED}: ${stats.kills} tree kills, ${stats.backupsSeen} backups checked while running, durable state grew during ${stats.grewWhileRunning} runs; final commit ${durable}, ${records} records per log`);
  assert.ok(stats.grewWhileRunning >= 2, 'restore-v1 persisted new states while the program ran');
  assert.ok(records * 116 > 2 * 2048, `the 2 KiB ring wrapped (${records} records)`);
});
