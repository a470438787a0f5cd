// Start-up of the wrappers (issue 10): a command loads what it needs and no more. koffi
// (its native library) only when a command calls into libc, and shm-fd node:net only with
// -s/--socket (shm-restore has it anyway: node:child_process loads it).
// Each case runs the CLI's main() in a fresh Node process and then looks at what that
// process loaded; the same look is shown to see koffi and node:net when they are loaded.
import assert from 'node:assert/strict';
import path from 'node:path';
import { test } from 'node:test';
import { cleanEnv, NODE, ROOT, run, tempDir } from './helpers.js';

const KOFFI = /[/\\]koffi[^/\\]*\.node$/;

/** Runs `main(args)` of dist/cli/`cli`.js in a fresh process; its exit status and what it loaded. */
async function loadedByCli(cli, args) {
  const script = [
    `const { main } = await import(${JSON.stringify(path.join(ROOT, 'dist', 'cli', `${cli}.js`))});`,
    `const code = await main(${JSON.stringify(args)});`,
    `const builtins = process.moduleLoadList.filter((m) => m.startsWith('NativeModule ')).map((m) => m.slice('NativeModule '.length));`,
    `const koffi = process.report.getReport().sharedObjects.some((s) => ${KOFFI}.test(s));`,
    `console.log('\\n' + JSON.stringify({ code, koffi, net: builtins.includes('net') }));`,
  ].join('\n');
  const r = await run(NODE, ['--input-type=module', '-e', script], { env: cleanEnv() });
  assert.equal(r.code, 0, r.stderr);
  return { ...JSON.parse(r.stdout.trim().split('\n').at(-1)), stderr: r.stderr };
}

test('--help and --version load no koffi (nor node:net for shm-fd)', async () => {
  for (const option of ['--help', '--version']) {
    assert.deepEqual(await loadedByCli('shm-fd', [option]), { code: 0, koffi: false, net: false, stderr: '' }, `shm-fd ${option}`);
    const restore = await loadedByCli('shm-restore', [option]);
    assert.deepEqual({ code: restore.code, koffi: restore.koffi }, { code: 0, koffi: false }, `shm-restore ${option}`);
  }
});

test('shm-fd loads koffi for its memory file, and node:net only with --socket', async (t) => {
  const dir = tempDir(t);
  // A command that is not found ends shm-fd (127) after the memory file and the sockets are made.
  const missing = path.join(dir, 'no-such-command');
  const plain = await loadedByCli('shm-fd', ['--name', 'startup', missing]);
  assert.deepEqual({ code: plain.code, koffi: plain.koffi, net: plain.net }, { code: 127, koffi: true, net: false });
  const socket = await loadedByCli('shm-fd', ['-s', `unix::${path.join(dir, 'sock')}`, missing]);
  assert.deepEqual({ code: socket.code, koffi: socket.koffi, net: socket.net }, { code: 127, koffi: true, net: true });
});
