// A migration killed by SIGKILL at random instants, with real processes: version 1 of
// test/fixtures/state-migrate.js commits its state into a memfd the test holds, version 2
// migrates it slowly and is killed while it does. After every kill, every valid snapshot
// in the file is decoded here, on its own (payload, directory, log records and counter
// copies read from the bytes, without the library's state code): each names a complete
// version 1 state (one of its commits) or the complete migrated state, never a mix; the
// next start migrates again, or opens the migrated state. The same under
// shm-restore --snapshot=restore-v1, killing the whole tree: every backup persisted while
// the migration ran (restore-v1 persists only after a new commit: none but the migration's)
// and after the kill holds a complete old or new state, and the next start migrates it. Kill instants
// come from a seeded generator; replay with STATE_SEED=<seed>.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { test } from 'node:test';
import { MemoryFile } from 'shmfd';
import { SnapshotFile } from 'shmfd/snapshot';
import path from 'node:path';
import { cleanEnv, fixture, NODE, run, seededRandom, SHM_RESTORE, sleep, start, tempDir } from './helpers.js';
import { BATCH, RECORDS, migrated, record, totalsAfter, totalsV2 } from './fixtures/migrate-model.js';

const PROGRAM = fixture('state-migrate.js');
const SEED = process.env.STATE_SEED === undefined ? Date.now() % 1_000_000_007 : Number(process.env.STATE_SEED);
const rng = seededRandom(SEED);
console.log(`# state-migrate-process seed ${SEED} (replay with STATE_SEED=${SEED})`);

const PAGE = 4096;

function fnv1a64(bytes) {
  let hash = 0xcbf29ce484222325n;
  for (const b of bytes) hash = ((hash ^ BigInt(b)) * 0x100000001b3n) & 0xffffffffffffffffn;
  return hash;
}

/**
 * Decodes the state a valid snapshot names, from the file's bytes: its payload (magic,
 * structure count, directory hash, sequence, words, and the directory's tail offset when
 * the payload is 8 bytes longer), the directory it names, the records of every log and the
 * current copy of every counter set.
 */
function decodeSnapshot(tail, payload) {
  const p = Buffer.from(payload);
  assert.equal(p.readUInt32LE(0), 0x54534853, 'payload magic');
  const n = p.readUInt32LE(4);
  const plain = 24 + 16 * n;
  assert.ok(p.length === plain || p.length === plain + 8, `payload of ${p.length} bytes for ${n} structures`);
  const base = p.length === plain ? 0 : Number(p.readBigUInt64LE(plain));
  assert.equal(base % PAGE, 0);
  const dir = Buffer.from(tail.subarray(base, base + PAGE));
  assert.equal(dir.toString('latin1', 0, 8), 'shmstate', 'the named directory is there');
  assert.equal(dir.readUInt32LE(12), n);
  assert.equal(fnv1a64(dir.subarray(0, 32 + 64 * n)), p.readBigUInt64LE(8), 'the directory is the one the payload names');
  const state = { sequence: Number(p.readBigUInt64LE(16)), base, names: [], logs: {}, counters: {} };
  for (let i = 0; i < n; i++) {
    const at = 32 + 64 * i;
    const name = dir.toString('utf8', at + 40, at + 64).replace(/\0+$/, '');
    state.names.push(name);
    const kind = dir.readUInt32LE(at);
    const offset = Number(dir.readBigUInt64LE(at + 8));
    const w0 = Number(p.readBigUInt64LE(24 + 16 * i));
    const w1 = Number(p.readBigUInt64LE(32 + 16 * i));
    const region = Buffer.from(tail.subarray(offset, offset + Number(dir.readBigUInt64LE(at + 16))));
    if (kind === 1) {
      const records = [];
      for (let r = 0; r < w0; ) {
        const length = region.readUInt32LE(r);
        assert.equal(region.readUInt32LE(r + 4), ~length >>> 0, `log ${name}: record header at ${r}`);
        records.push(region.toString('utf8', r + 8, r + 8 + length));
        r += 8 + Math.ceil(length / 8) * 8;
      }
      assert.equal(records.length, w1, `log ${name}: the payload's record count`);
      state.logs[name] = records;
    } else if (kind === 3) {
      const copies = dir.readUInt32LE(at + 4);
      const count = Number(dir.readBigUInt64LE(at + 32));
      const stride = Math.ceil((count * 8) / 64) * 64;
      const copy = (w0 % copies) * stride;
      state.counters[name] = Array.from({ length: count }, (_, c) => region.readBigUInt64LE(copy + 8 * c));
    }
  }
  return state;
}

/**
 * Checks every valid snapshot of the file: version 1's after one of its commits, or the
 * complete migrated state. @returns the newest snapshot's state
 */
function checkFile(file, what) {
  const bytes = fs.readFileSync(typeof file === 'string' ? file : `/proc/self/fd/${file.fd}`);
  const discovery = new SnapshotFile(bytes).recover();
  assert.ok(discovery, `${what}: a configured snapshot file`);
  const tail = bytes.subarray(discovery.head.tailStart);
  const valid = discovery.valid();
  assert.ok(valid.length > 0, `${what}: a valid snapshot`);
  let newest;
  for (const s of valid) {
    const state = decodeSnapshot(tail, discovery.read(s));
    const where = `${what}, seed ${SEED}, snapshot at ${s.offset} (sequence ${state.sequence})`;
    if (state.names.join() === 'events,totals,kv') {
      // Version 1 committed every BATCH records.
      const m = state.sequence * BATCH;
      assert.equal(state.base, 0, where);
      assert.deepEqual(state.logs.events, Array.from({ length: m }, (_, i) => record(i)), `${where}: version 1's records`);
      assert.deepEqual(state.counters.totals, totalsAfter(m), `${where}: version 1's counters`);
    } else {
      assert.equal(state.names.join(), 'gauge,events,totals,kv', where);
      assert.ok(state.base > 0, where);
      assert.ok(state.sequence >= RECORDS / BATCH + 1, `${where}: the migration follows version 1's commits`);
      assert.deepEqual(state.logs.events, Array.from({ length: RECORDS }, (_, i) => migrated(i)), `${where}: every record migrated`);
      assert.deepEqual(state.counters.totals, totalsV2(), `${where}: the migrated counters`);
    }
    newest = state;
  }
  return newest;
}

async function runToEnd(memory, version, env) {
  const p = start(NODE, [PROGRAM, version], { env, extraFds: [memory.fd] });
  const end = await p.exited;
  assert.equal(end.code, 0, `version ${version}: ${end.stdout}\n${end.stderr}`);
  return end.stdout;
}

test('SIGKILL during a long migration: every valid snapshot names a complete old or new state; the next start migrates again', async (t) => {
  const env = cleanEnv({ LISTEN_FDS: '1', LISTEN_FDNAMES: 'SHM_SHARED_FD' });
  const stats = { kills: 0, keptOld: 0, completedBeforeKill: 0, files: 0 };
  let memory = MemoryFile.create('state-migrate-kill');
  const fresh = async () => {
    memory.close();
    memory = MemoryFile.create('state-migrate-kill');
    stats.files++;
    assert.match(await runToEnd(memory, '1', env), new RegExp(`^v1 ${RECORDS / BATCH}$`, 'm'));
    assert.equal(checkFile(memory, 'version 1').sequence, RECORDS / BATCH);
  };
  t.after(() => memory.close());
  await fresh();
  // Eight rounds, more while fewer than two kills have landed inside the migration (it
  // lasts at least 0.5 s: odd rounds kill within 0.4 s of its start, unless the machine
  // delays the kill), at most 30.
  for (let round = 1; round <= 8 || (stats.keptOld < 2 && round <= 30); round++) {
    const p = start(NODE, [PROGRAM, '2'], { env, extraFds: [memory.fd] });
    const began = await p.out.waitFor(/^(migrating|opened \d+)$/);
    assert.equal(began?.[1], 'migrating', `round ${round}: version 2 migrates the old state again: ${p.err.lines.join('\n')}`);
    await Promise.race([sleep(rng.int(0, round % 2 === 1 ? 400 : 900)), p.exited]);
    p.kill('SIGKILL');
    const end = await p.exited;
    assert.ok(!p.out.lines.some((l) => l.startsWith('problem')), `round ${round}: ${p.out.lines.join('\n')}`);
    const newest = checkFile(memory, `round ${round}`);
    if (end.signal === 'SIGKILL') stats.kills++;
    if (newest.names.includes('gauge')) {
      // Migrated: a restart opens it without migrating, then the next round starts over.
      if (end.signal !== 'SIGKILL') stats.completedBeforeKill++;
      assert.match(await runToEnd(memory, '2', env), new RegExp(`^opened ${newest.sequence}$`, 'm'), `round ${round}`);
      await fresh();
    } else {
      stats.keptOld++;
      assert.equal(newest.sequence, RECORDS / BATCH, `round ${round}: the old state is the newest committed one`);
    }
  }
  // A start that is not killed completes the migration, and the next one opens it.
  const out = await runToEnd(memory, '2', env);
  assert.match(out, new RegExp(`^migrated ${RECORDS / BATCH + 1}$`, 'm'), out);
  assert.equal(checkFile(memory, 'after a complete migration').sequence, RECORDS / BATCH + 1);
  assert.match(await runToEnd(memory, '2', env), new RegExp(`^opened ${RECORDS / BATCH + 1}$`, 'm'));
  t.diagnostic(`seed ${SEED}: ${stats.kills} kills during the run, ${stats.keptOld} left the old state, ${stats.files} version 1 files`);
  assert.ok(stats.keptOld >= 2, 'kills landed inside the migration');
});

test('SIGKILL of the whole tree during a migration under restore-v1: every backup holds a complete old or new state', async (t) => {
  const backup = path.join(tempDir(t, 'shmfd-migrate-'), 'state.backup');
  const first = await run(NODE, [SHM_RESTORE, backup, NODE, PROGRAM, '1'], { env: cleanEnv() });
  assert.equal(first.code, 0, first.stderr);
  assert.equal(checkFile(backup, 'version 1\'s backup').sequence, RECORDS / BATCH);
  const stats = { backupsSeen: 0, keptOld: 0 };
  let lastSeen = '';
  const checkBackup = (what) => {
    // A freed inode number is handed out again: the change time tells the files apart.
    const stat = fs.statSync(backup, { bigint: true });
    const seen = `${stat.ino}:${stat.ctimeNs}`;
    if (seen === lastSeen) return undefined;
    lastSeen = seen;
    stats.backupsSeen++;
    return checkFile(backup, what);
  };
  let migratedAt = 0;
  for (let round = 1; round <= 4 && migratedAt === 0; round++) {
    const tree = start(NODE, [SHM_RESTORE, '--snapshot=restore-v1', '--interval', '5', backup, NODE, PROGRAM, '2'], { detached: true, guardMs: 60_000 });
    const began = await tree.out.waitFor(/^(migrating|opened \d+)$/);
    assert.equal(began?.[1], 'migrating', `round ${round}: the restored old state is migrated again: ${tree.err.lines.join('\n')}`);
    // The migration takes about 0.5 s: most kills land inside it.
    const until = Date.now() + rng.int(0, 400);
    while (Date.now() < until && tree.child.exitCode === null) {
      checkBackup(`round ${round}, a backup persisted during the migration`);
      await sleep(3);
    }
    tree.kill('SIGKILL');
    await tree.exited;
    assert.ok(!tree.out.lines.some((l) => l.startsWith('problem')), tree.out.lines.join('\n'));
    const newest = checkBackup(`round ${round}, after the kill`) ?? checkFile(backup, `round ${round}, after the kill`);
    if (newest.names.includes('gauge')) migratedAt = newest.sequence;
    else stats.keptOld++;
  }
  // Unkilled, the next start finishes the migration (or opens it), and the backup holds it.
  const last = await run(NODE, [SHM_RESTORE, '--snapshot=restore-v1', backup, NODE, PROGRAM, '2'], { env: cleanEnv() });
  assert.equal(last.code, 0, last.stderr);
  assert.match(last.stdout, new RegExp(`^(migrated|opened) ${RECORDS / BATCH + 1}$`, 'm'));
  assert.equal(checkFile(backup, 'the final backup').sequence, RECORDS / BATCH + 1);
  t.diagnostic(`seed ${SEED}: ${stats.backupsSeen} backups checked, ${stats.keptOld} kills left the old state`);
  assert.ok(stats.keptOld >= 1, 'a kill landed inside the migration, and the restored old state was migrated again');
});
