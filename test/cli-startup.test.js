// Start-up of the wrappers (issue 10): a command loads what it needs and no more. koffi
// (its native library) only when a command calls into libc, and shm-fd node:net only with
// -s/--socket (shm-restore has it anyway: node:child_process loads it).
// Each case runs the CLI's main() in a fresh Node process and then looks at what that
// process loaded; the same look is shown to see koffi and node:net when they are loaded.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import module from 'node:module';
import path from 'node:path';
import { test } from 'node:test';
import { COMPILE_CACHE_DIR } from '../dist/cli/compile-cache.js';
import { cleanEnv, NODE, ROOT, run, SHM_FD, SHM_RESTORE, tempDir } from './helpers.js';

const KOFFI = /[/\\]koffi[^/\\]*\.node$/;

/**
 * Runs `main(args)` of dist/cli/`cli`.js in a fresh process; its exit status, whether koffi's
 * native library was loaded, and whether node:net was loaded by the command (Node 24 loads
 * it at its own start: then it counts as not loaded by the command).
 */
async function loadedByCli(cli, args) {
  const script = [
    `const builtins = () => process.moduleLoadList.filter((m) => m.startsWith('NativeModule ')).map((m) => m.slice('NativeModule '.length));`,
    `const before = builtins();`,
    `const { main } = await import(${JSON.stringify(path.join(ROOT, 'dist', 'cli', `${cli}.js`))});`,
    `const code = await main(${JSON.stringify(args)});`,
    `const net = builtins().includes('net') && !before.includes('net');`,
    // The report itself may load node:net (Node 24 does, with stderr a pipe): after the look.
    `const koffi = process.report.getReport().sharedObjects.some((s) => ${KOFFI}.test(s));`,
    `console.log('\\n' + JSON.stringify({ code, koffi, net }));`,
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

/**
 * Whether the first libc call (koffi, as the system layer loads it) loads node:net in a
 * process started as {@link loadedByCli} starts one. koffi's own entry did on Node 22 and
 * 24 (its node:util loads it when stderr is a pipe); its native module alone does not.
 */
async function koffiLoadsNet() {
  const script = [
    `const before = process.moduleLoadList.includes('NativeModule net');`,
    `(await import(${JSON.stringify(path.join(ROOT, 'dist', 'system', 'libc.js'))})).kernelPageSize();`,
    `console.log(!before && process.moduleLoadList.includes('NativeModule net'));`,
  ].join('\n');
  const r = await run(NODE, ['--input-type=module', '-e', script], { env: cleanEnv() });
  assert.equal(r.code, 0, r.stderr);
  return JSON.parse(r.stdout);
}

test('shm-fd loads koffi for its memory file, and node:net (beyond what koffi loads) only with --socket', async (t) => {
  const dir = tempDir(t);
  // A command that is not found ends shm-fd (127) after the memory file and the sockets are made.
  const missing = path.join(dir, 'no-such-command');
  const plain = await loadedByCli('shm-fd', ['--name', 'startup', missing]);
  assert.deepEqual({ code: plain.code, koffi: plain.koffi, net: plain.net }, { code: 127, koffi: true, net: await koffiLoadsNet() });
  const socket = await loadedByCli('shm-fd', ['-s', `unix::${path.join(dir, 'sock')}`, missing]);
  assert.deepEqual({ code: socket.code, koffi: socket.koffi, net: socket.net }, { code: 127, koffi: true, net: true });
});

// Not in @types/node 20.
const hasFlushCompileCache = typeof (/** @type {{ flushCompileCache?: unknown }} */ (module)).flushCompileCache === 'function';

/** The files of Node's compile cache under `dir` (Node puts them in one directory per Node version). */
function cacheFiles(dir) {
  if (!fs.existsSync(dir)) return [];
  // Commands of other test files write entries meanwhile (a temporary file, renamed).
  return fs
    .readdirSync(dir, { recursive: true, withFileTypes: true })
    .filter((e) => e.isFile())
    .map((e) => path.relative(dir, path.join(e.parentPath ?? e.path, e.name)));
}

test(
  "the commands keep Node's compile cache beside the package, or where NODE_COMPILE_CACHE says; shm-fd writes it before its exec",
  { skip: !hasFlushCompileCache && 'Node 22.10 or later (module.flushCompileCache)' },
  async (t) => {
    const show = ['sh', '-c', 'echo "${NODE_COMPILE_CACHE-unset}"'];
    // The cache beside the package is shared with every command the other test files run
    // meanwhile (removing it under them broke a host's start on Node 24): it is looked at,
    // never removed.
    const fd = await run(NODE, [SHM_FD, ...show], { env: cleanEnv({ NODE_COMPILE_CACHE: undefined }) });
    assert.deepEqual([fd.code, fd.stderr, fd.stdout], [0, '', 'unset\n'], 'the program gets no NODE_COMPILE_CACHE');
    assert.notDeepEqual(cacheFiles(COMPILE_CACHE_DIR), [], `a cache in ${COMPILE_CACHE_DIR}`);

    const dir = tempDir(t);
    const restore = await run(NODE, [SHM_RESTORE, path.join(dir, 'state'), '--', ...show], { env: cleanEnv({ NODE_COMPILE_CACHE: path.join(dir, 'cache') }) });
    assert.deepEqual([restore.code, restore.stderr, restore.stdout], [0, '', `${path.join(dir, 'cache')}\n`]);
    assert.notDeepEqual(cacheFiles(path.join(dir, 'cache')), []);
  },
);
