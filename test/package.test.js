// The package as users get it: what `npm pack` ships (the LICENSE included), and an
// install that leaves no dependency install script unreviewed (npm >= 11.16 warns about
// each one on every `npm ci`).
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { cleanEnv, ROOT, run } from './helpers.js';

const pkg = JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8'));

test('npm pack ships the MIT LICENSE, README, the commands, dist and the examples, and no sources or tests', async () => {
  const r = await run('npm', ['pack', '--dry-run', '--json', '--ignore-scripts'], { env: cleanEnv() });
  assert.equal(r.code, 0, r.stderr);
  const files = JSON.parse(r.stdout)[0].files.map((f) => f.path);
  for (const file of ['LICENSE', 'README.md', 'package.json', 'bin/shm-fd.js', 'bin/shm-restore.js', 'dist/index.js', 'examples/primes-snapshot.js']) {
    assert.ok(files.includes(file), `${file} is in the tarball`);
  }
  assert.deepEqual(files.filter((f) => /^(src|test)\//.test(f)), []);
  assert.equal(pkg.license, 'MIT');
  assert.match(fs.readFileSync(path.join(ROOT, 'LICENSE'), 'utf8'), /^MIT License\n\nCopyright \(c\) 2026 the shmfd authors\n/);
});

test('every installed dependency with an install script is covered by allowScripts (npm ci prints no install-scripts warning)', async (t) => {
  const r = await run('npm', ['install-scripts', 'ls', '--json'], { env: cleanEnv() });
  if (r.code !== 0 && /unknown command/i.test(r.stdout + r.stderr)) {
    t.skip('needs npm >= 11.16 (npm install-scripts)');
    return;
  }
  assert.equal(r.code, 0, r.stderr);
  assert.deepEqual(JSON.parse(r.stdout), { allowScripts: [] }, r.stdout);
  // koffi's install script only checks that the prebuilt binary of @koromix/koffi-<platform> loads.
  assert.equal(pkg.allowScripts?.koffi, false);
});
