// The package as users get it: what `npm pack` ships (the LICENSE included), an install
// that leaves no dependency install script unreviewed (npm >= 11.16 warns about each one
// on every `npm ci`), and its entries: each exports exactly the names docs/api.md lists,
// every exported value is used by a test, and each loads no more than docs/api.md says.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';
import ts from 'typescript';
import { cleanEnv, NODE, ROOT, run } from './helpers.js';

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

/** `shmfd`, `shmfd/serve`...: the entries package.json exports, with their files. */
const ENTRIES = Object.entries(pkg.exports)
  .filter(([key]) => key !== './package.json')
  .map(([key, target]) => ({ name: key === '.' ? pkg.name : `${pkg.name}/${key.slice(2)}`, types: target.types, js: target.default }));

const API_DOC = fs.readFileSync(path.join(ROOT, 'docs', 'api.md'), 'utf8');

/** The rows of docs/api.md by entry: `## \`shmfd/x\`` headings, then `| \`name\` | kind | ... |` rows. */
function documented() {
  const entries = new Map();
  let rows;
  for (const line of API_DOC.split('\n')) {
    const heading = /^## `([^`]+)`$/.exec(line);
    if (heading) entries.set(heading[1], (rows = []));
    else if (line.startsWith('## ')) rows = undefined;
    const row = /^\| `([A-Za-z_$][\w$]*)` \| (\w+) \| (.+) \|$/.exec(line);
    if (row && rows) rows.push({ name: row[1], kind: row[2], text: row[3] });
  }
  return entries;
}

let declarations;

/** Every name the entry's declarations export, values and types (what TypeScript users see). */
function declaredNames(entry) {
  declarations ??= ts.createProgram(
    ENTRIES.map((e) => path.join(ROOT, e.types)),
    { module: ts.ModuleKind.NodeNext, moduleResolution: ts.ModuleResolutionKind.NodeNext, strict: true },
  );
  const checker = declarations.getTypeChecker();
  const file = declarations.getSourceFile(path.join(ROOT, entry.types));
  return checker.getExportsOfModule(checker.getSymbolAtLocation(file)).map((symbol) => symbol.name);
}

const sorted = (names) => [...names].sort();

test('docs/api.md documents each entry of package.json, and each exports exactly the names listed there', async () => {
  const docs = documented();
  assert.deepEqual(sorted(docs.keys()), sorted(ENTRIES.map((e) => e.name)));
  for (const entry of ENTRIES) {
    const rows = docs.get(entry.name);
    const values = Object.keys(await import(entry.name));
    const names = declaredNames(entry);
    assert.deepEqual(sorted(names), sorted(rows.map((r) => r.name)), `${entry.name}: the names in docs/api.md`);
    const types = names.filter((name) => !values.includes(name));
    assert.deepEqual(sorted(rows.filter((r) => r.kind === 'type').map((r) => r.name)), sorted(types), `${entry.name}: the type-only names`);
    for (const row of rows) {
      assert.ok(['class', 'function', 'object', 'constant', 'type'].includes(row.kind), `${entry.name} ${row.name}: kind ${row.kind}`);
      assert.match(row.text, /\(\[[^\]]+\]\([^)]+\)\)$/, `${entry.name} ${row.name}: ends with a link to where it is described`);
    }
  }
});

test("docs/api.md's links lead to existing files and headings", () => {
  const slug = (heading) => heading.toLowerCase().replace(/[^\p{L}\p{N} _-]/gu, '').replace(/ /g, '-');
  for (const [, target] of API_DOC.matchAll(/\]\(([^)]+)\)/g)) {
    const [file, anchor] = target.split('#');
    const text = fs.readFileSync(path.join(ROOT, 'docs', file), 'utf8');
    if (anchor === undefined) continue;
    const headings = [...text.matchAll(/^#+ (.+)$/gm)].map((m) => slug(m[1]));
    assert.ok(headings.includes(anchor), `${target}: no such heading`);
  }
});

/**
 * The test sources under `dir`, this file excepted.
 * @param {string} dir
 * @returns {Generator<string>}
 */
function* testSources(dir) {
  for (const entry of fs.readdirSync(dir, { withFileTypes: true })) {
    const full = path.join(dir, entry.name);
    if (entry.isDirectory()) yield* testSources(full);
    else if (entry.name.endsWith('.js') && full !== fileURLToPath(import.meta.url)) yield full;
  }
}

test('every value an entry exports is imported by name and used in a test', async () => {
  const files = [...testSources(path.join(ROOT, 'test'))].map((file) => fs.readFileSync(file, 'utf8'));
  for (const entry of ENTRIES) {
    const pattern = new RegExp(String.raw`import\s*\{([^}]*)\}\s*from\s*'${entry.name}'`, 'g');
    const used = new Set();
    for (const text of files) {
      for (const [, list] of text.matchAll(pattern)) {
        for (const name of list.split(',').map((n) => n.trim()).filter(Boolean)) {
          if (text.match(new RegExp(String.raw`\b${name}\b`, 'g')).length > 1) used.add(name);
        }
      }
    }
    const unused = Object.keys(await import(entry.name)).filter((name) => !used.has(name));
    assert.deepEqual(unused, [], `${entry.name}: values no test imports from '${entry.name}' and uses`);
  }
});

/** The modules of dist/ an entry loads by static imports, and the `node:` modules among their imports. */
function staticGraph(file) {
  const modules = new Set();
  const builtins = new Set();
  const visit = (module) => {
    if (modules.has(module)) return;
    modules.add(module);
    const text = fs.readFileSync(path.join(ROOT, module), 'utf8');
    // tsc emits each static import and re-export as one statement starting a line.
    for (const [, target] of text.matchAll(/^(?:import|export)\s[\w$*\s{},]*?['"]([^'"]+)['"];$/gm)) {
      if (target.startsWith('.')) visit(path.posix.join(path.posix.dirname(module), target));
      else builtins.add(target);
    }
  };
  visit(path.posix.normalize(file));
  return { modules, builtins };
}

const HEAVY = ['node:child_process', 'node:http', 'node:https', 'node:tls', 'node:dgram'];

test('the main entry reaches neither the descriptor scan of exec/ nor child_process, http, https, tls or dgram', () => {
  const main = ENTRIES.find((e) => e.name === 'shmfd');
  const { modules, builtins } = staticGraph(main.js);
  assert.ok(modules.has('dist/fds/memory-file.js') && modules.has('dist/sockets/adopt.js'), [...modules].join(' '));
  assert.deepEqual([...modules].filter((m) => m.startsWith('dist/exec/') || m.startsWith('dist/restore/') || m.startsWith('dist/cli/')), []);
  assert.deepEqual([...builtins].filter((b) => HEAVY.includes(b)), []);
  // The check itself sees what the commands load.
  const cli = staticGraph('./dist/cli/shm-restore.js');
  assert.ok(cli.modules.has('dist/exec/caller-fds.js'));
});

test('shmfd/snapshot imports nothing outside the package: no koffi, no Node module', () => {
  const snapshot = ENTRIES.find((e) => e.name === 'shmfd/snapshot');
  const { modules, builtins } = staticGraph(snapshot.js);
  assert.ok(modules.has('dist/snapshot/writer.js'));
  assert.deepEqual([...builtins], []);
  assert.deepEqual([...modules].filter((m) => !/^dist\/(snapshot|base)\//.test(m)), []);
});

/**
 * What a fresh Node process has loaded after importing `specifier` (and running `then`, code
 * that sees the module as `m`): Node's modules, the shared objects (koffi's native part),
 * and the files of CommonJS modules.
 */
async function loadedBy(specifier, then = '') {
  const script = [
    `const m = await import(${JSON.stringify(specifier)});`,
    then,
    `const builtins = process.moduleLoadList.filter((m) => m.startsWith('NativeModule ')).map((m) => m.slice('NativeModule '.length));`,
    `const cjs = Object.keys((await import('node:module')).createRequire(import.meta.url).cache);`,
    `console.log(JSON.stringify({ builtins, shared: process.report.getReport().sharedObjects, cjs }));`,
  ].join('\n');
  const r = await run(NODE, ['--input-type=module', '-e', script], { env: cleanEnv() });
  assert.equal(r.code, 0, r.stderr);
  return JSON.parse(r.stdout);
}

const KOFFI = /[/\\]koffi[^/\\]*\.node$/;

test('importing shmfd loads neither koffi nor child_process, http, https, tls or dgram; koffi comes with the first call into libc', async () => {
  const main = await loadedBy('shmfd');
  assert.deepEqual(main.shared.filter((s) => KOFFI.test(s)), []);
  for (const name of HEAVY.map((b) => b.slice('node:'.length))) assert.ok(!main.builtins.includes(name), `${name} is loaded`);
  // The same look sees koffi once a memory file is made, and node:http when it is loaded.
  const used = await loadedBy('shmfd', "m.MemoryFile.create('x', { size: 4096 }).close();");
  assert.ok(used.shared.some((s) => KOFFI.test(s)), 'koffi is seen loaded');
  // Its native module alone: koffi's JavaScript entry (platform and libc detection, wrappers
  // of deprecated aliases) was most of koffi's load (BENCHMARKS.md §6, reattach).
  assert.deepEqual(used.cjs.filter((f) => /[/\\]koffi[/\\].*\.c?js$/.test(f)), [], "koffi's JavaScript entry is not loaded");
  assert.ok((await loadedBy('node:http')).builtins.includes('http'));
});

test('importing shmfd/snapshot or shmfd/serve loads no koffi', async () => {
  for (const specifier of ['shmfd/snapshot', 'shmfd/serve']) {
    const loaded = await loadedBy(specifier);
    assert.deepEqual(loaded.shared.filter((s) => KOFFI.test(s)), [], specifier);
    for (const name of HEAVY.map((b) => b.slice('node:'.length))) assert.ok(!loaded.builtins.includes(name), `${specifier}: ${name} is loaded`);
  }
});
