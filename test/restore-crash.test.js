// Issue 3, crash consistency: examples/primes-snapshot.js under
// `shm-restore --snapshot=restore-v1`, killed with real SIGKILLs at random moments, then
// restarted from the backup file. After every restart the recovered table must be exactly
// the first N primes, and N never falls below what the backup on disk held.
//
// The kill moments come from a seeded generator; replay a failure with CRASH_SEED=<seed>.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { checkLiveTable, childrenOf, firstPrimes, NODE, readPrimesState, ROOT, seededRandom, SHM_RESTORE, sleep, start, tempDir, waitFor } from './helpers.js';

const EXAMPLE = path.join(ROOT, 'examples', 'primes-snapshot.js');
const SEED = process.env.CRASH_SEED === undefined ? Date.now() % 1_000_000_007 : Number(process.env.CRASH_SEED);
const COMMIT_INTERVAL_MS = 5;
const SNAPSHOT_INTERVAL_MS = 20;
// Far more than the rounds below can reach: the program is always killed mid-run.
const LIMIT = 6_000_000;
const PROGRAM_KILLS = 20;
const TREE_KILLS = 20;
const ROUND_GUARD_MS = 30_000;

console.log(`# restore-crash seed ${SEED} (replay with CRASH_SEED=${SEED})`);
const rng = seededRandom(SEED);
const context = (round, what) => `seed ${SEED}, ${what} round ${round}`;

/** Starts the host running the example; `detached` puts host and program in a new process group. */
function startHost(backup, { detached = false } = {}) {
  const args = ['--snapshot=restore-v1', '--interval', String(SNAPSHOT_INTERVAL_MS), backup, NODE, EXAMPLE, String(COMMIT_INTERVAL_MS), String(LIMIT)];
  return start(NODE, [SHM_RESTORE, ...args], { detached, guardMs: ROUND_GUARD_MS });
}

/** The command line of a process, or '' once it is gone. */
function commandLine(pid) {
  try {
    return fs.readFileSync(`/proc/${pid}/cmdline`, 'latin1');
  } catch {
    return '';
  }
}

/**
 * The program's pid once the host has started it, or undefined when the host exited
 * first. The host has other, short-lived children (its setpriv check), and a child that
 * has not exec'd yet still shows the host's command line.
 */
async function programOf(run) {
  const program = () =>
    childrenOf(run.pid).find((child) => {
      const line = commandLine(child);
      return line.includes(EXAMPLE) && !line.includes(SHM_RESTORE);
    });
  const pid = await waitFor(() => program() ?? (run.ended() !== undefined && -1), 'the program to start', ROUND_GUARD_MS, 2);
  return pid === -1 ? undefined : pid;
}

/** True for the name of a host's temporary file next to primes.backup. */
const isTemporary = (name) => name.startsWith('.primes.backup.tmp-');

/** Resolves once a host's temporary file is in `dir`, or after `timeoutMs`. */
async function temporaryFileIn(dir, timeoutMs) {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline && !fs.readdirSync(dir).some(isTemporary)) await sleep(1);
}

/**
 * What the backup holds before a restart: a valid table, and never less than before.
 * @returns the count the next start must recover
 */
function checkBackup(backup, round, what, { atLeast }) {
  if (!fs.existsSync(backup)) {
    assert.equal(atLeast, 0, `${context(round, what)}: the backup disappeared`);
    return 0;
  }
  const state = readPrimesState(backup);
  assert.equal(state.wrongAt, -1, `${context(round, what)}: backup table wrong at index ${state.wrongAt} of ${state.count}`);
  assert.ok(state.count >= atLeast, `${context(round, what)}: backup went back from ${atLeast} to ${state.count} primes`);
  return state.count;
}

/**
 * Checks what the program recovered: the count the backup held, and (while it still runs)
 * a live table of exactly the first N primes, read through /proc/PID/fd/3.
 */
async function checkRecovery(run, expected, round, what, stats) {
  const line = await run.out.waitFor(/^recovered (\d+) primes$/);
  if (line === undefined) return; // killed before it got there
  const recovered = Number(line[1]);
  assert.equal(recovered, expected, `${context(round, what)}: recovered ${recovered} primes, the backup held ${expected}`);
  stats.recovered.push(recovered);
  const pid = childrenOf(run.pid)[0];
  if (pid === undefined) return;
  let wrongAt;
  try {
    wrongAt = checkLiveTable(`/proc/${pid}/fd/3`, recovered);
  } catch (err) {
    if (err.code === 'ENOENT' || err.code === 'ESRCH') return; // it was killed meanwhile
    throw err;
  }
  assert.equal(wrongAt, -1, `${context(round, what)}: live table wrong at index ${wrongAt} of ${recovered}`);
  stats.liveChecks++;
}

function report(t, what, stats) {
  const r = stats.recovered;
  t.diagnostic(
    `${what}: ${stats.kills} SIGKILLs (seed ${SEED}); recovered N from ${Math.min(...r)} to ${Math.max(...r)} ` +
      `over ${r.length} restarts, ${stats.liveChecks} live tables checked; final backup ${stats.final} primes` +
      (stats.midPersist === undefined ? '' : `; ${stats.midPersist} kills left a temporary file (hit a persistence round)`),
  );
}

test('the reference primes are right (the check below relies on them)', () => {
  const p = firstPrimes(100_000);
  assert.deepEqual([...p.subarray(0, 10)], [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]);
  assert.equal(p[9_591], 99_991, 'the 9592nd prime');
  assert.equal(p[99_999], 1_299_709, 'the 100000th prime');
});

test('a SIGKILLed program is reported as a failure (128 + 9), and its committed state is kept', async (t) => {
  const dir = tempDir(t, 'shmfd-crash-');
  const backup = path.join(dir, 'primes.backup');
  const first = startHost(backup);
  await first.out.waitFor(/^committed \d+ primes$/);
  const program = await programOf(first);
  assert.ok(program !== undefined, 'the host started the program');
  process.kill(program, 'SIGKILL');
  const { code, signal } = await first.exited;
  assert.equal(signal, null, 'the host itself was not killed');
  assert.equal(code, 137, `host exit status after its program was SIGKILLed: ${first.err.lines.join('\n')}`);
  const committed = Math.max(...first.out.numbers(/^committed (\d+) primes$/));
  const state = readPrimesState(backup);
  assert.equal(state.wrongAt, -1);
  assert.ok(state.count >= committed, `the write-back after the crash holds ${state.count} primes, ${committed} were committed`);
});

test('SIGKILL of the program at random moments, restarted from the backup each time', async (t) => {
  const dir = tempDir(t, 'shmfd-crash-');
  const backup = path.join(dir, 'primes.backup');
  const what = 'program-kill';
  const stats = { kills: 0, recovered: [], liveChecks: 0, final: 0 };
  let durable = 0;
  for (let round = 1; round <= PROGRAM_KILLS; round++) {
    durable = checkBackup(backup, round, what, { atLeast: durable });
    const run = startHost(backup);
    const recovery = checkRecovery(run, durable, round, what, stats);
    const program = await programOf(run);
    assert.ok(program !== undefined, `${context(round, what)}: the host exited before starting the program: ${run.err.lines.join('\n')}`);
    if (round % 2 === 1) {
      // Anywhere from the program's start-up (recovery, configuration) to well into its commits.
      await Promise.race([sleep(rng.int(0, 600)), run.exited]);
    } else {
      // Among its commits, from its first one on (so the kills make progress, however slow).
      await run.out.waitFor(/^committed \d+ primes$/);
      await Promise.race([sleep(rng.int(0, 300)), run.exited]);
    }
    try {
      process.kill(program, 'SIGKILL');
      stats.kills++;
    } catch (err) {
      if (err.code !== 'ESRCH') throw err;
    }
    const { code, signal } = await run.exited;
    await recovery;
    assert.equal(signal, null, `${context(round, what)}: the host was killed (guard timeout?)`);
    if (code === 0 && run.out.lines.some((l) => l.startsWith('reached the limit'))) break;
    assert.equal(code, 137, `${context(round, what)}: host exit status ${code}; stderr:\n${run.err.lines.join('\n')}`);
    // The host writes the quiescent memory back after its program died: every commit the
    // program reported must be in the backup.
    const committed = Math.max(durable, ...run.out.numbers(/^committed (\d+) primes$/));
    durable = checkBackup(backup, round, what, { atLeast: committed });
  }
  stats.final = durable;
  report(t, what, stats);
  assert.ok(stats.kills >= PROGRAM_KILLS - 2, `most rounds killed a running program (${stats.kills})`);
  assert.ok(durable > 0, 'the program made progress across the kills');
});

test('SIGKILL of the whole process tree (host and program) at random moments, restarted each time', async (t) => {
  const dir = tempDir(t, 'shmfd-crash-');
  const backup = path.join(dir, 'primes.backup');
  const what = 'tree-kill';
  const stats = { kills: 0, recovered: [], liveChecks: 0, final: 0, midPersist: 0 };
  let durable = 0;
  for (let round = 1; round <= TREE_KILLS; round++) {
    durable = checkBackup(backup, round, what, { atLeast: durable });
    // A temporary file left behind means the kill hit a persistence round.
    if (fs.readdirSync(dir).some(isTemporary)) stats.midPersist++;
    const run = startHost(backup, { detached: true });
    const recovery = checkRecovery(run, durable, round, what, stats);
    if (round % 2 === 1) {
      // Host start-up, restore, the program's start, commits and persistence rounds.
      await Promise.race([sleep(rng.int(0, 1200)), run.exited]);
    } else {
      // Aimed at a persistence round: once its temporary file shows up, a little later.
      await Promise.race([temporaryFileIn(dir, 3000), run.exited]);
      await sleep(rng.int(0, 4));
    }
    try {
      process.kill(-run.pid, 'SIGKILL');
      stats.kills++;
    } catch (err) {
      if (err.code !== 'ESRCH') throw err;
    }
    const { signal } = await run.exited;
    await recovery;
    assert.equal(signal, 'SIGKILL', `${context(round, what)}: the host ended on its own: ${run.err.lines.join('\n')}`);
  }
  durable = checkBackup(backup, TREE_KILLS + 1, what, { atLeast: durable });
  if (fs.readdirSync(dir).some(isTemporary)) stats.midPersist++;

  // A last run that ends cleanly: it recovers what the backup held, removes what killed
  // hosts left behind, and writes everything back.
  const last = startHost(backup, { detached: true });
  await checkRecovery(last, durable, TREE_KILLS + 1, what, stats);
  await last.out.waitFor(/^committed \d+ primes$/);
  last.child.kill('SIGTERM');
  const { code } = await last.exited;
  assert.equal(code, 0, `the program stops cleanly on a forwarded SIGTERM: ${last.err.lines.join('\n')}`);
  const committed = Math.max(...last.out.numbers(/^committed (\d+) primes$/));
  stats.final = checkBackup(backup, TREE_KILLS + 2, what, { atLeast: committed });
  assert.deepEqual(fs.readdirSync(dir).sort(), ['.primes.backup.lock', 'primes.backup'], 'no temporary files are left behind');
  report(t, what, stats);
  assert.ok(stats.kills >= TREE_KILLS - 2, `most rounds killed a running tree (${stats.kills})`);
});
