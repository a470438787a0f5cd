/**
 * The shared memory file that `shm-fd` and `shm-restore` pass: where the wrappers get it,
 * and where the program finds it.
 * @module
 */
import { ShmfdError } from '../base/errors.js';
import { findListenFd, findPassedFd, listenPidTarget, type Environment, type PassedFd } from './listen-fds.js';
import { MemoryFile, type CreateMemoryFileOptions } from './memory-file.js';

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

/** The memory file a wrapper passes on; see {@link passedOrNewMemoryFile}. */
export interface WrapperMemoryFile {
  file: MemoryFile;
  /** True when it was created here, false when it was among the passed descriptors. */
  created: boolean;
}

/**
 * The wrapper side: the memory file passed in under `name` (it came back from the service
 * manager's fd store, so it is newer than anything on disk), grown to `options.size` when
 * given; or, when none was passed, a new memfd created with `options`.
 * @throws ShmfdError `ERR_NOT_A_MEMORY_FILE` when the descriptor of that name is no regular file
 */
export function passedOrNewMemoryFile(passed: readonly PassedFd[], name: string, options: CreateMemoryFileOptions = {}): WrapperMemoryFile {
  const found = findPassedFd(passed, name);
  if (found === undefined) return { file: MemoryFile.create(name, options), created: true };
  const file = MemoryFile.fromFd(found.fd, name);
  if (options.size !== undefined) file.grow(options.size);
  return { file, created: false };
}
