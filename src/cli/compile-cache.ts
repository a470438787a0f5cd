/**
 * Turns on Node's compile cache for the commands (Node 22.1 and later; older lines have
 * none and start as before). Imported by bin/ before the rest of the command, so that every
 * module after it, koffi's JavaScript included, is compiled from the cache from the second
 * run on. See docs/exec.md, "Start-up".
 * @module
 */
import module from 'node:module';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

/**
 * Where the commands keep the cache: beside the package's own code, in its
 * `node_modules/.cache/shmfd-compile`. Whoever may write there may change the code it
 * caches anyway, unlike a shared temporary directory, where another user could leave a
 * cache for a root service to run. When the directory cannot be written (another user's
 * or a read-only installation), Node runs without a cache.
 */
export const COMPILE_CACHE_DIR = path.join(fileURLToPath(new URL('../../', import.meta.url)), 'node_modules', '.cache', 'shmfd-compile');

// Not in @types/node 20. NODE_COMPILE_CACHE (Node's own variable, read at its start) wins,
// and NODE_DISABLE_COMPILE_CACHE=1 turns the cache off: Node answers this call accordingly.
(module as { enableCompileCache?: (directory: string) => unknown }).enableCompileCache?.(COMPILE_CACHE_DIR);
