// The system layer's own contracts: what the kernel decides and what the layer reports.
// Everything else in it is exercised through the modules that use it.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { test } from 'node:test';
import * as sys from '../dist/system.js';

test('PAGE_SIZE is the page size the kernel reports', () => {
  assert.equal(sys.PAGE_SIZE, Number(execFileSync('getconf', ['PAGESIZE'], { encoding: 'utf8' })));
});
