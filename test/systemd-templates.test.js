// Issue 3, systemd: the two unit templates of docs/systemd.md, instantiated for this
// checkout, in a real private `systemd --user` manager (test/systemd-sandbox.sh).
// Each test walks a unit through the events of the docs' table (restart, SIGKILL, stop +
// start, and a "reboot": a new manager over the same state directory) and checks what
// survived. The manager here is systemd 252; the >= 254 rows come from the man pages.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { NODE, readPrimesState, ROOT, run, SANDBOX, sandboxEnv, systemdSkip, tempDir } from './helpers.js';

const DRIVER = path.join(ROOT, 'test', 'fixtures', 'systemd-templates-driver.js');
const skip = systemdSkip;

/**
 * The template with NODE and SHMFD filled in, as `envsubst '${NODE} ${SHMFD}'` does in
 * docs/systemd.md, and the output sent to files (the sandbox has no journal for it).
 */
function instantiate(template, out, err, extra = '') {
  const text = fs.readFileSync(path.join(ROOT, 'docs', template), 'utf8');
  const filled = text.replaceAll('${NODE}', NODE).replaceAll('${SHMFD}', ROOT);
  try {
    const viaEnvsubst = execFileSync('envsubst', ['${NODE} ${SHMFD}'], { input: text, env: { ...process.env, NODE, SHMFD: ROOT }, encoding: 'utf8' });
    assert.equal(viaEnvsubst, filled, 'envsubst fills in the template the same way');
  } catch (e) {
    if (e.code !== 'ENOENT') throw e;
  }
  assert.doesNotMatch(filled, /\$\{/, 'no variable is left');
  // [Service] is the template's last section.
  return `${filled}StandardOutput=append:${out}\nStandardError=append:${err}\n${extra}`;
}

/** Runs the driver for `scenario` in a sandbox over `sandboxDir`; returns its observations. */
async function drive(t, dir, sandboxDir, unitFile, unitText, scenario, extra = []) {
  const units = path.join(dir, `units-${scenario}`);
  fs.mkdirSync(units, { recursive: true });
  fs.writeFileSync(path.join(units, unitFile), unitText);
  const result = path.join(dir, `${scenario}.json`);
  const r = await run(SANDBOX, [units, NODE, DRIVER, scenario, unitFile, path.join(dir, 'out.log'), path.join(dir, 'err.log'), result, ...extra], {
    env: sandboxEnv(sandboxDir),
    timeoutMs: 300_000,
  });
  const observed = fs.existsSync(result) ? JSON.parse(fs.readFileSync(result, 'utf8')) : { steps: [] };
  const logs = () =>
    `sandbox exit ${r.code}\n${r.stdout}${r.stderr}\ndriver: ${observed.error ?? 'ok'}\n` +
    `program output (tail):\n${tail(path.join(dir, 'out.log'))}\nunit stderr (tail):\n${tail(path.join(dir, 'err.log'))}\n` +
    `manager log (tail):\n${tail(path.join(sandboxDir, 'manager.log'))}`;
  assert.equal(observed.error, undefined, logs());
  assert.equal(r.code, 0, logs());
  const step = (name) => {
    const s = observed.steps.find((x) => x.step === name);
    assert.ok(s !== undefined, `no step ${name}: ${logs()}`);
    return s;
  };
  return { step, logs };
}

function tail(file, n = 15) {
  return fs.existsSync(file) ? fs.readFileSync(file, 'utf8').split('\n').slice(-n).join('\n') : '(none)';
}

test('oneshot template: the sieve continues across restart (fd store); stop + start and a new manager start over (252)', { skip }, async (t) => {
  const dir = tempDir(t, 'shmfd-units-');
  const sandboxDir = path.join(dir, 'sandbox');
  const unit = 'shmfd-primes.service';
  const text = instantiate('systemd.oneshot.template', path.join(dir, 'out.log'), path.join(dir, 'err.log'));

  const first = await drive(t, dir, sandboxDir, unit, text, 'oneshot');
  const start = first.step('start');
  const restart = first.step('restart');
  const again = first.step('restart-again');
  assert.equal(start.unit.NFileDescriptorStore, '1', `shm-fd parked the memfd in the fd store\n${first.logs()}`);
  assert.equal(start.unit.ActiveState, 'active');
  assert.equal(start.unit.SubState, 'exited', 'RemainAfterExit=yes keeps the finished run active');
  assert.ok(restart.total > start.total && again.total > restart.total, `restart continues the table: ${start.total}, ${restart.total}, ${again.total}`);
  assert.equal(again.unit.NFileDescriptorStore, '1');
  // systemd 252 ignores FileDescriptorStorePreserve= and empties the store on stop.
  assert.equal(first.step('stop').unit.NFileDescriptorStore, '0', 'stop empties the fd store on 252');
  assert.equal(first.step('start-after-stop').total, start.total, 'after stop + start the sieve starts over (252)');

  const rebooted = await drive(t, dir, sandboxDir, unit, text, 'oneshot-after-reboot');
  assert.equal(rebooted.step('start-after-reboot').total, start.total, 'a new manager (reboot) starts over: the memory was never on disk');
  t.diagnostic(`oneshot totals: start ${start.total}, restart ${restart.total}, ${again.total}; after stop ${first.step('start-after-stop').total}`);
});

test('exec template under shm-restore: progress survives restart, SIGKILL, stop + start and a new manager (252)', { skip }, async (t) => {
  const dir = tempDir(t, 'shmfd-units-');
  const sandboxDir = path.join(dir, 'sandbox');
  const unit = 'shmfd-primes-snapshot.service';
  // %S: $XDG_CONFIG_HOME for user managers on 252 (systemd.unit(5)), $XDG_STATE_HOME later.
  const backups = ['config', 'state'].map((d) => path.join(sandboxDir, d, 'shmfd-primes-snapshot', 'primes.backup'));
  // Info logs tell where the memory came from: the fd store or the backup.
  const text = instantiate('systemd.service.template', path.join(dir, 'out.log'), path.join(dir, 'err.log'), 'Environment=SHMFD_LOG=info\n');
  const fromStore = (s) => s.log.some((l) => /passed in/.test(l)) && !s.log.some((l) => /restored .* from /.test(l));
  const fromBackup = (s) => s.log.some((l) => /restored .* from /.test(l)) && !s.log.some((l) => /passed in/.test(l));

  const first = await drive(t, dir, sandboxDir, unit, text, 'exec', [backups.join(':')]);
  const start = first.step('start');
  assert.equal(start.recovered, 0, 'a first start begins with an empty table');
  assert.equal(start.unit.NFileDescriptorStore, '1', `shm-restore parked the memfd in the fd store\n${first.logs()}`);
  assert.equal(start.unit.ActiveState, 'active');

  for (const name of ['restart', 'kill-main', 'kill-all']) {
    const s = first.step(name);
    assert.ok(s.recovered >= s.before, `${name}: recovered ${s.recovered} primes, ${s.before} were committed before\n${first.logs()}`);
    assert.equal(s.unit.NFileDescriptorStore, '1', `${name}: the memfd is still in the fd store`);
    assert.equal(s.unit.ActiveState, 'active', `${name}: the service is running again`);
    assert.ok(fromStore(s), `${name}: the host took the memfd from the fd store:\n${s.log.join('\n')}`);
  }
  assert.equal(first.step('kill-main').unit.NRestarts, '1', 'Restart=on-failure brought the SIGKILLed service back');
  assert.equal(first.step('kill-all').unit.NRestarts, '2');

  const stop = first.step('stop');
  assert.equal(stop.unit.ActiveState, 'inactive');
  assert.equal(stop.unit.Result, 'success', 'a stop is clean: the program ends on SIGTERM and the host writes back');
  assert.equal(stop.unit.NFileDescriptorStore, '0', 'stop empties the fd store on 252');
  assert.equal(stop.backup.wrongAt, -1, 'the backup holds the first N primes');
  assert.ok(stop.backup.count >= stop.before, `the write-back at stop holds ${stop.backup.count} primes, ${stop.before} were committed`);
  const again = first.step('start-after-stop');
  assert.equal(again.recovered, stop.backup.count, 'after stop + start the state comes back from the backup file');
  assert.ok(fromBackup(again), `stop + start: the host restored the backup:\n${again.log.join('\n')}`);

  const finalStop = first.step('final-stop');
  assert.equal(finalStop.backup.wrongAt, -1);
  assert.ok(finalStop.backup.count >= finalStop.before);

  // A "reboot": a new manager, an empty fd store, only the state directory is left.
  const rebooted = await drive(t, dir, sandboxDir, unit, text, 'exec-after-reboot', [backups.join(':')]);
  const after = rebooted.step('start-after-reboot');
  assert.equal(after.recovered, finalStop.backup.count, 'after a reboot the state comes back from the backup file');
  assert.ok(fromBackup(after), `reboot: the host restored the backup:\n${after.log.join('\n')}`);
  t.diagnostic(
    `exec: start ${start.recovered}; ` +
      ['restart', 'kill-main', 'kill-all', 'start-after-stop'].map((n) => `${n} ${first.step(n).before} -> ${first.step(n).recovered}`).join('; ') +
      `; stop wrote ${stop.backup.count}; reboot ${finalStop.backup.count} -> ${after.recovered}`,
  );
  assert.equal(readPrimesState(finalStop.backup.path).wrongAt, -1);
  const stderr = fs.readFileSync(path.join(dir, 'err.log'), 'utf8');
  assert.doesNotMatch(stderr, /error/i, 'no errors from the host or the program');
  const unexpected = fs
    .readFileSync(path.join(dir, 'out.log'), 'utf8')
    .split('\n')
    .filter((l) => l !== '' && !/^(recovered|committed) \d+ primes$|^stopped by SIGTERM at \d+ primes$|^the state is kept in .* between runs; /.test(l));
  assert.deepEqual(unexpected, [], 'only the expected program output');
});
