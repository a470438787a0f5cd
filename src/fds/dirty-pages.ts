/**
 * The dirty-page map of restore-v1 (docs/restore.md, "Incremental rounds"): a small memfd
 * that `shm-restore --snapshot=restore-v1` creates and passes to the program beside its
 * memory file, under the name `SHM_DIRTY_PAGES`. One bit per 4096-byte page of the memory
 * file; a program that sets the header's tracking flag promises to set the bit of every
 * page it writes, after the write and before it publishes a snapshot naming those bytes.
 * The host then copies only the pages whose bits it found set (taking them with an atomic
 * exchange), instead of the whole file.
 * @module
 */
import { ShmfdError } from '../base/errors.js';
import { Seal } from '../system/libc.js';
import { findListenFd, type Environment } from './listen-fds.js';
import { MemoryFile, type Mapping } from './memory-file.js';

/** The descriptor name under which `shm-restore` passes the map. */
export const DIRTY_PAGES_NAME = 'SHM_DIRTY_PAGES';

/** Bytes per bit: the `PAGE` of the snapshot format (docs/snapshot-format.md). */
export const DIRTY_PAGE = 4096;

/** Largest memory file the map covers (1 TiB); beyond it the host copies whole files. */
export const DIRTY_MAX_BYTES = 2 ** 40;

const MAGIC = 0x67706472; // "rdpg"
const VERSION = 1;
/** u32 words of the header page: magic, version, tracking flag. */
const H_MAGIC = 0;
const H_VERSION = 1;
const H_TRACKING = 2;
const HEADER_BYTES = 4096;
const BITS_BYTES = DIRTY_MAX_BYTES / DIRTY_PAGE / 8;

/** Options of {@link DirtyPages.fromEnv}. */
export interface DirtyPagesOptions {
  /** Descriptor name to look for (default `SHM_DIRTY_PAGES`). */
  name?: string;
  /** Environment to read (default `process.env`). */
  env?: Environment;
}

/**
 * The dirty-page map. A program gets it with {@link fromEnv} (the state structures of
 * `StateFile.fromEnv` do this themselves) and calls {@link mark} for each range it wrote.
 * The map is sealed against resizing, so mapping it is safe in both processes; it is
 * sparse, so its 32 MiB of bits cost memory only where pages are marked.
 */
export class DirtyPages {
  /** The map's memory file. */
  readonly file: MemoryFile;
  readonly #mapping: Mapping;
  readonly #header: Uint32Array;
  readonly #bits: Uint32Array;

  private constructor(file: MemoryFile) {
    this.file = file;
    if (file.size !== HEADER_BYTES + BITS_BYTES) {
      throw new ShmfdError('ERR_DIRTY_PAGES_INVALID', `${file.name}: a dirty-page map has ${HEADER_BYTES + BITS_BYTES} bytes, this file ${file.size}`);
    }
    this.#mapping = file.map();
    this.#header = this.#mapping.array(Uint32Array, 0, HEADER_BYTES / 4);
    this.#bits = this.#mapping.array(Uint32Array, HEADER_BYTES, BITS_BYTES / 4);
  }

  /** The host side: a new, empty map, sealed against resizing. */
  static create(): DirtyPages {
    const file = MemoryFile.create(DIRTY_PAGES_NAME, { size: HEADER_BYTES + BITS_BYTES, sealShrink: false });
    try {
      file.seal(Seal.SHRINK | Seal.GROW | Seal.SEAL);
      const map = new DirtyPages(file);
      map.#header[H_MAGIC] = MAGIC;
      map.#header[H_VERSION] = VERSION;
      return map;
    } catch (err) {
      file.close();
      throw err;
    }
  }

  /**
   * The program side: the map passed under `SHM_DIRTY_PAGES` (or `options.name`), with its
   * tracking flag set, or undefined when the program runs without one (not under
   * `shm-restore --snapshot=restore-v1`). From this call on, the program must
   * {@link mark} every range of the memory file it writes, before publishing a snapshot
   * that names it; the host relies on that to copy only the marked pages.
   * @throws ShmfdError `ERR_DIRTY_PAGES_INVALID` when the descriptor is not such a map;
   *   the errors of reading `LISTEN_FDS`
   */
  static fromEnv(options: DirtyPagesOptions = {}): DirtyPages | undefined {
    const passed = findListenFd(options.name ?? DIRTY_PAGES_NAME, { env: options.env ?? process.env });
    if (passed === undefined) return undefined;
    const map = new DirtyPages(MemoryFile.fromFd(passed.fd, options.name ?? DIRTY_PAGES_NAME));
    if (map.#header[H_MAGIC] !== MAGIC || map.#header[H_VERSION] !== VERSION) {
      throw new ShmfdError('ERR_DIRTY_PAGES_INVALID', `${map.file.name}: not a dirty-page map of this version`);
    }
    Atomics.store(map.#header, H_TRACKING, 1);
    return map;
  }

  /** Whether the program declared that it marks what it writes (the host side reads this). */
  get tracking(): boolean {
    return Atomics.load(this.#header, H_TRACKING) === 1;
  }

  /**
   * Marks the pages of bytes `[offset, offset + length)` of the memory file as written.
   * Call it after writing them and before publishing the snapshot that names them:
   * `Atomics.or` is a full barrier, so the bit is never seen before the bytes.
   */
  mark(offset: number, length: number): void {
    if (length <= 0) return;
    const end = offset + length;
    if (end > DIRTY_MAX_BYTES) return; // beyond the map: the host copies such files whole
    const bits = this.#bits;
    const last = Math.floor((end - 1) / DIRTY_PAGE);
    // Always the locked instruction, even for a bit that looks set: a plain load could
    // pass the program's own earlier stores (x86 reorders a store before a later load),
    // see the bit, and the host could take it and copy the page before those stores land.
    // One locked instruction per word of bits, not per page: a 1 MiB append is 8 words.
    const first = Math.floor(offset / DIRTY_PAGE);
    for (let word = first >>> 5; word <= last >>> 5; word++) {
      const from = word === first >>> 5 ? first & 31 : 0;
      const to = word === last >>> 5 ? last & 31 : 31;
      Atomics.or(bits, word, (0xffffffff >>> (31 - to + from)) << from);
    }
  }

  /**
   * The host side: moves the bits of pages `[0, pages)` into `into` (ORed in), clearing
   * them in the map with an atomic exchange per word, so a mark made after the exchange
   * stays set for the next call.
   * @returns the number of pages taken
   */
  take(pages: number, into: Uint32Array): number {
    const bits = this.#bits;
    const words = Math.min(Math.ceil(pages / 32), bits.length, into.length);
    let taken = 0;
    for (let w = 0; w < words; w++) {
      if (bits[w] === 0) continue;
      const value = Atomics.exchange(bits, w, 0);
      into[w]! |= value;
      taken += popcount(value);
    }
    return taken;
  }

  /** Unmaps and closes the map. */
  close(): void {
    this.#mapping.unmap();
    this.file.close();
  }
}

/** Number of set bits in a u32. */
export function popcount(value: number): number {
  let v = value - ((value >>> 1) & 0x55555555);
  v = (v & 0x33333333) + ((v >>> 2) & 0x33333333);
  return (((v + (v >>> 4)) & 0x0f0f0f0f) * 0x01010101) >>> 24;
}
