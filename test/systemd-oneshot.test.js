// Issue 2, "Real systemd": a Type=oneshot unit running `shm-fd node examples/primes.js`
// under a real, private `systemd --user` manager (test/systemd-sandbox.sh) keeps
// its memfd in the manager's fd store and continues the sieve across restarts.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { NODE, PRIMES, primeTotals, ROOT, run, SANDBOX, sandboxEnv, SHM_FD, systemdSkip, tempDir } from './helpers.js';

const skip = systemdSkip;

test('the systemd harness is part of the repository: a clone anywhere runs these tests (as root, with systemd)', () => {
  assert.ok(SANDBOX.startsWith(`${ROOT}${path.sep}`), `${SANDBOX} lies outside ${ROOT}`);
  assert.ok(fs.statSync(SANDBOX).mode & 0o100, `${SANDBOX} is executable`);
  assert.doesNotMatch(String(systemdSkip), /sandbox/, 'the tests are never skipped for want of the harness');
});

test('a oneshot unit under shm-fd continues its sieve across systemctl restart (fd store)', { skip }, async (t) => {
  const dir = tempDir(t, 'shmfd-systemd-');
  const units = path.join(dir, 'units');
  fs.mkdirSync(units);
  const out = path.join(dir, 'out.log');
  const err = path.join(dir, 'err.log');
  const unit = 'primes-oneshot.service';
  fs.writeFileSync(
    path.join(units, unit),
    `[Unit]
Description=primes under shm-fd (test)
DefaultDependencies=no

[Service]
Type=oneshot
RemainAfterExit=yes
FileDescriptorStoreMax=1
ExecStart=${NODE} ${SHM_FD} ${NODE} ${PRIMES}
StandardOutput=append:${out}
StandardError=append:${err}
`,
  );
  const script = path.join(dir, 'steps.sh');
  fs.writeFileSync(
    script,
    `set -eu
systemctl --user start ${unit}
systemctl --user restart ${unit}
systemctl --user restart ${unit}
systemctl --user show -p NFileDescriptorStore -p ActiveState -p SubState -p Result ${unit}
`,
  );
  const r = await run(SANDBOX, [units, 'bash', script], {
    env: sandboxEnv(path.join(dir, 'sandbox')),
    timeoutMs: 300_000,
  });
  const logs = () =>
    `stdout:\n${r.stdout}\nstderr:\n${r.stderr}\nunit stderr:\n${fs.existsSync(err) ? fs.readFileSync(err, 'utf8') : ''}`;
  assert.equal(r.code, 0, logs());
  assert.deepEqual(primeTotals(fs.readFileSync(out, 'utf8')), [100002, 200002, 300002], logs());
  assert.match(r.stdout, /^NFileDescriptorStore=1$/m, logs());
  assert.match(r.stdout, /^ActiveState=active$/m);
  assert.match(r.stdout, /^SubState=exited$/m);
  assert.match(r.stdout, /^Result=success$/m);
  // Only the $FDSTORE note of systemd < 254 may appear, never an error.
  assert.doesNotMatch(fs.existsSync(err) ? fs.readFileSync(err, 'utf8') : '', /error/i, logs());
});
