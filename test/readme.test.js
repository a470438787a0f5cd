// The README's library examples are real, copy-pasteable programs: each self-contained
// JavaScript block of README.md runs under shm-fd (twice in a row on one memory file, as
// a program restarted by a wrapper would) and exits 0. A block that needs a context the
// README leaves to the reader (a request handler) is named in SKIP with the reason.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { cleanEnv, NODE, ROOT, runShmFd } from './helpers.js';

const SKIP = [{ marker: 'createServer(handler)', why: 'needs a request handler of the reader\'s' }];

const blocks = [...fs.readFileSync(path.join(ROOT, 'README.md'), 'utf8').matchAll(/```js\n([\s\S]*?)```/g)].map((m) => m[1]);

test('the README has library examples to check', () => {
  assert.ok(blocks.length >= 4, `found ${blocks.length} js blocks`);
});

blocks.forEach((code, i) => {
  const skipped = SKIP.find((s) => code.includes(s.marker));
  const first = code.split('\n').find((line) => line.trim() !== '') ?? '';
  test(`README example ${i + 1} (${first.trim()}) runs twice under shm-fd`, { skip: skipped?.why ?? false }, async (t) => {
    // Inside the package, so that `import ... from 'shmfd'` resolves to this checkout.
    const dir = fs.mkdtempSync(path.join(ROOT, 'test', '.readme-'));
    t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
    const file = path.join(dir, `example-${i + 1}.mjs`);
    fs.writeFileSync(file, code);
    const q = (s) => `'${s.replace(/'/g, "'\\''")}'`;
    const r = await runShmFd(['sh', '-c', `${q(NODE)} ${q(file)} && ${q(NODE)} ${q(file)}`], { env: cleanEnv() });
    assert.equal(r.code, 0, `exit ${r.code}\n${r.stderr}`);
    assert.equal(r.stderr, '');
  });
});
