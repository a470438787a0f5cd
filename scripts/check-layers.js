#!/usr/bin/env node
// Fails (exit 1) when a module under src/ imports from a layer it may not use (an import
// that runs back up, or sideways between peers), when src/ modules import each other in a
// cycle, when a module belongs to no layer, or when koffi is used outside the system layer.
// Type-only and dynamic imports count: they tie modules together as much as the others.
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import ts from 'typescript';

/*
 * The layers, bottom first. A module belongs to the layer that names it in `modules`, or
 * else to the first one naming a folder (ending in `/`, relative to src/) that holds it; it may import modules of
 * its own layer and of the layers in `uses`, which are all further up this table, so data
 * flows one way. The modules of an `alone` layer (the programs) do not import each other.
 */
const LAYERS = [
  { name: 'base', modules: ['base/'], uses: [] },
  { name: 'system', modules: ['system/'], uses: ['base'] },
  { name: 'fds', modules: ['fds/'], uses: ['base', 'system'] },
  { name: 'exec', modules: ['exec/'], uses: ['base', 'system', 'fds'] },
  { name: 'sockets', modules: ['sockets/'], uses: ['base', 'system', 'fds'] },
  { name: 'snapshot', modules: ['snapshot/'], uses: ['base'] },
  { name: 'restore', modules: ['restore/'], uses: ['base', 'system', 'fds', 'exec', 'snapshot'] },
  { name: 'state', modules: ['state/'], uses: ['base', 'fds', 'snapshot'] },
  { name: 'replica', modules: ['replica/'], uses: ['base', 'system', 'fds', 'restore'] },
  { name: 'cli-shared', modules: ['cli/'], uses: ['base', 'system', 'fds', 'exec', 'sockets', 'snapshot', 'restore', 'replica'] },
  { name: 'cli', modules: ['cli/shm-fd.ts', 'cli/shm-restore.ts'], uses: ['base', 'system', 'fds', 'exec', 'sockets', 'snapshot', 'restore', 'replica', 'cli-shared'], alone: true },
  // The main entry: what programs use. The other entries are modules of their layers
  // (shmfd/serve is sockets/serve.ts, shmfd/snapshot is snapshot/index.ts), so their rows hold them.
  { name: 'entry', modules: ['index.ts'], uses: ['base', 'system', 'fds', 'sockets', 'state'] },
];

/** The only layer that may load the foreign-function interface. */
const KOFFI_LAYER = 'system';

const root = path.join(path.dirname(fileURLToPath(import.meta.url)), '..');
const src = path.join(root, 'src');
const problems = [];

const rank = new Map(LAYERS.map((layer, i) => [layer.name, i]));
for (const [i, layer] of LAYERS.entries()) {
  for (const used of layer.uses) {
    if (!((rank.get(used) ?? Infinity) < i)) problems.push(`layer table: ${layer.name} uses ${used}, which is not below it`);
  }
}

function layerOf(module) {
  return (
    LAYERS.find((layer) => layer.modules.includes(module)) ??
    LAYERS.find((layer) => layer.modules.some((m) => m.endsWith('/') && module.startsWith(m)))
  );
}

function sources(dir) {
  return fs
    .readdirSync(dir, { withFileTypes: true })
    .flatMap((entry) => {
      const full = path.join(dir, entry.name);
      if (entry.isDirectory()) return sources(full);
      return entry.name.endsWith('.ts') && !entry.name.endsWith('.d.ts') ? [full] : [];
    })
    .sort();
}

/** src-relative module names this module imports (`./x.js` resolves to `x.ts`), and whether it imports koffi. */
function importsOf(module) {
  const text = fs.readFileSync(path.join(src, module), 'utf8');
  const { importedFiles } = ts.preProcessFile(text, true, true);
  const local = [];
  let koffi = false;
  for (const { fileName } of importedFiles) {
    if (fileName === 'koffi') koffi = true;
    if (!fileName.startsWith('.')) continue;
    const target = path.relative(src, path.resolve(path.dirname(path.join(src, module)), fileName)).replace(/\.js$/, '.ts');
    local.push(target.split(path.sep).join('/'));
  }
  return { local: [...new Set(local)], koffi };
}

const modules = sources(src).map((file) => path.relative(src, file).split(path.sep).join('/'));
const graph = new Map();
for (const module of modules) {
  const layer = layerOf(module);
  const { local, koffi } = importsOf(module);
  graph.set(module, local);
  if (layer === undefined) {
    problems.push(`${module}: in no layer of scripts/check-layers.js`);
    continue;
  }
  if (koffi && layer.name !== KOFFI_LAYER) problems.push(`${module}: imports koffi outside the ${KOFFI_LAYER} layer`);
  for (const target of local) {
    if (!modules.includes(target)) {
      problems.push(`${module}: imports ${target}, which is not a module of src/`);
      continue;
    }
    const targetLayer = layerOf(target);
    if (targetLayer === layer && layer.alone === true) {
      problems.push(`${module} imports ${target}: the modules of ${layer.name} do not import each other`);
      continue;
    }
    if (targetLayer === undefined || targetLayer === layer || layer.uses.includes(targetLayer.name)) continue;
    problems.push(`${module} (${layer.name}) imports ${target} (${targetLayer.name}): ${layer.name} may not use ${targetLayer.name}`);
  }
}

// Cycles: each strongly connected component of more than one module (or a module importing itself).
let counter = 0;
const index = new Map();
const low = new Map();
const stack = [];
const onStack = new Set();
function connect(module) {
  index.set(module, counter);
  low.set(module, counter);
  counter++;
  stack.push(module);
  onStack.add(module);
  for (const next of graph.get(module) ?? []) {
    if (!graph.has(next)) continue;
    if (!index.has(next)) {
      connect(next);
      low.set(module, Math.min(low.get(module), low.get(next)));
    } else if (onStack.has(next)) {
      low.set(module, Math.min(low.get(module), index.get(next)));
    }
  }
  if (low.get(module) !== index.get(module)) return;
  const component = [];
  let popped;
  do {
    popped = stack.pop();
    onStack.delete(popped);
    component.push(popped);
  } while (popped !== module);
  if (component.length > 1 || (graph.get(module) ?? []).includes(module)) {
    problems.push(`import cycle: ${component.sort().join(' <-> ')}`);
  }
}
for (const module of modules) if (!index.has(module)) connect(module);

if (problems.length > 0) {
  for (const problem of problems) console.error(`check-layers: ${problem}`);
  console.error(`check-layers: ${problems.length} problem(s) in ${modules.length} modules; the layers are in scripts/check-layers.js`);
  process.exit(1);
}
console.log(`check-layers: ${modules.length} modules in ${LAYERS.length} layers, no import against the layers, no cycle`);
