#!/usr/bin/env node
import '../dist/cli/compile-cache.js';

// Imported after the compile cache is on, to be compiled from it.
const { main } = await import('../dist/cli/shm-fd.js');

main(process.argv.slice(2)).then((code) => {
  process.exitCode = code;
});
