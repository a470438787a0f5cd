/**
 * The program side of `shm-fd` and `shm-restore`: the shared memory file they pass.
 * @module
 */
import { ShmfdError } from '../base/errors.js';
import { findListenFd, listenPidTarget, type Environment } from './listen-fds.js';
import { MemoryFile } from './memory-file.js';

/** The descriptor name under which the wrappers pass the memory file by default. */
export const SHARED_FD_NAME = 'SHM_SHARED_FD';

/** Options of {@link SharedFd.fromEnv}. */
export interface SharedFdOptions {
  /** Descriptor name to look for (default `SHM_SHARED_FD`). */
  name?: string;
  /** Environment to read (default `process.env`). */
  env?: Environment;
}

/** Entry point for programs, named after the original's `SharedFd`. */
export const SharedFd = {
  /**
   * The memory file passed under `name`, or undefined when the program runs without one
   * (no `LISTEN_FDS`, no such name, or descriptors meant for another process).
   * @throws ShmfdError when the environment is malformed (`ERR_LISTEN_FDS_INVALID`,
   *   `ERR_LISTEN_FDNAMES_MISMATCH`, `ERR_FD_NOT_PASSED`) or the named descriptor is no
   *   memory file (`ERR_NOT_A_MEMORY_FILE`).
   */
  fromEnv(options: SharedFdOptions = {}): MemoryFile | undefined {
    const env = options.env ?? process.env;
    const name = options.name ?? SHARED_FD_NAME;
    const passed = findListenFd(name, { env });
    if (passed === undefined) return undefined;
    try {
      return MemoryFile.fromFd(passed.fd, name);
    } catch (err) {
      // Inherited through a re-spawning tool, the variables may outlive the descriptors.
      if (err instanceof ShmfdError && listenPidTarget(env) === 'ancestor') return undefined;
      throw err;
    }
  },
};
