// The state structures across real processes: test/fixtures/state-sequence.js commits a
// deterministic sequence (state-model.js), so any state found afterwards must be exactly
// the state after some commit k, and k must be at least the last commit it reported.
// - round trips through shm-restore's backup;
// - SIGKILL of the writer at random moments, recovered from the very same memfd;
// - SIGKILL of the whole tree (shm-restore --snapshot=restore-v1 and the program) at
//   random moments: every backup on disk, also the ones persisted while the program ran,
//   restores to a committed state, and never to an older one than before.
// Kill moments come from a seeded generator; replay with STATE_SEED=<seed>.
import assert from 'node:assert/strict';
import path from 'node:path';
import { test } from 'node:test';
import { MemoryFile } from 'shmfd';
import { cleanEnv, fixture, killTreeRounds, killWriterRounds, lastCommitted, NODE, run, seededRandom, SHM_RESTORE, start, tempDir } from './helpers.js';
import { recoverFrom } from './fixtures/state-model.js';

const PROGRAM = fixture('state-sequence.js');
const SEED = process.env.STATE_SEED === undefined ? Date.now() % 1_000_000_007 : Number(process.env.STATE_SEED);
const rng = seededRandom(SEED);
console.log(`# state-process seed ${SEED} (replay with STATE_SEED=${SEED})`);


function checkRecovered(found, what, { atLeast }) {
  assert.equal(found.problem, undefined, `seed ${SEED}, ${what}: recovered state is not the one after commit ${found.sequence}: ${found.problem}`);
  assert.ok(found.sequence >= atLeast, `seed ${SEED}, ${what}: recovered commit ${found.sequence}, but ${atLeast} had been committed`);
  return found.sequence;
}

test('a state round-trips across processes through the backup of shm-restore', async (t) => {
  const dir = tempDir(t, 'shmfd-state-');
  const backup = path.join(dir, 'state.backup');
  const first = await run(NODE, [SHM_RESTORE, backup, NODE, PROGRAM, '40', '1'], { env: cleanEnv() });
  assert.equal(first.code, 0, first.stderr);
  assert.match(first.stdout, /^recovered 0$/m);
  assert.equal(checkRecovered(recoverFrom(backup), 'first run', { atLeast: 40 }), 40);
  const second = await run(NODE, [SHM_RESTORE, backup, NODE, PROGRAM, '25', '1'], { env: cleanEnv() });
  assert.equal(second.code, 0, second.stderr);
  assert.match(second.stdout, /^recovered 40$/m, 'the second process recovered the first one\'s state (and checked it)');
  assert.equal(checkRecovered(recoverFrom(backup), 'second run', { atLeast: 65 }), 65);
});

test('SIGKILL of the writer at random moments: the memfd always holds exactly a committed state, at least the last one reported', async (t) => {
  // The test holds the memfd itself and passes it at fd 3, so nothing but the program
  // touches it; a kill leaves it exactly as the program's stores left it.
  const memory = MemoryFile.create('state-kill');
  t.after(() => memory.close());
  const capacity = 1 << 26; // room for every commit the rounds can reach: the log never fills
  const rounds = 10;
  const check = (file, what, atLeast) => checkRecovered(recoverFrom(file, capacity), what, { atLeast });
  const { midStream, durable } = await killWriterRounds({ rounds, memoryFd: memory.fd, args: [PROGRAM, '0', '0', String(capacity)], rng, check });
  t.diagnostic(`seed ${SEED}: ${midStream} of ${rounds} kills hit a running writer; final commit ${durable}`);
  assert.ok(midStream >= rounds - 1, 'the kills hit a running writer');
  assert.ok(durable > 0);
});

function startTree(backup) {
  return start(NODE, [SHM_RESTORE, '--snapshot=restore-v1', '--interval', '5', backup, NODE, PROGRAM, '0', '2'], { detached: true, guardMs: 30_000 });
}

test('SIGKILL of the whole tree under shm-restore --snapshot=restore-v1: every backup restores to a committed state, never an older one', async (t) => {
  const dir = tempDir(t, 'shmfd-state-');
  const backup = path.join(dir, 'state.backup');
  // Every version of the backup (persisted by restore-v1 rounds, each an atomic rename)
  // must restore to a committed state, and they never go back.
  const check = (file, what, atLeast) => checkRecovered(recoverFrom(file), what, { atLeast });
  const stats = await killTreeRounds({ rounds: 10, backup, seed: SEED, rng, startTree: () => startTree(backup), check });
  const { durable } = stats;
  // A last run that ends cleanly keeps everything it reported.
  const last = startTree(backup);
  assert.equal(Number((await last.out.waitFor(/^recovered (\d+)$/))[1]), durable);
  await last.out.waitFor(/^committed \d+$/);
  last.child.kill('SIGTERM');
  const { code } = await last.exited;
  assert.equal(code, 0, last.err.lines.join('\n'));
  const final = checkRecovered(recoverFrom(backup), 'after a clean stop', { atLeast: lastCommitted(last.out) });
  t.diagnostic(`seed ${SEED}: ${stats.kills} tree kills, ${stats.backupsSeen} backups checked while running, durable state grew during ${stats.grewWhileRunning} runs; final commit ${final}`);
  assert.ok(stats.grewWhileRunning >= 2, 'restore-v1 persisted new states while the program ran');
});
