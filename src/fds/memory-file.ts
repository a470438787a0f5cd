/**
 * The shared-memory file: a memfd (or any regular file) that outlives one process, and
 * its mappings as typed arrays.
 * @module
 */
import { fdTarget } from '../system/proc.js';
import { ShmfdError } from '../base/errors.js';
import * as sys from '../system/libc.js';

/** Options of {@link MemoryFile.create}. */
export interface CreateMemoryFileOptions {
  /** Size in bytes to give the new file (default 0). */
  size?: number;
  /**
   * Seal the file against shrinking (default true). A mapping of a file that shrinks under
   * it kills the process with SIGBUS on the next access, in every process that maps it.
   */
  sealShrink?: boolean;
}

/** Options of {@link MemoryFile.map}. */
export interface MapOptions {
  /** First byte of the file to map (default 0); need not be page-aligned. */
  offset?: number;
  /** Bytes to map (default: from `offset` to the end of the file). At most 4 GiB per mapping. */
  length?: number;
  /** Map read-only. A write through a read-only view kills the process (SIGSEGV): for readers only. */
  readOnly?: boolean;
}

/** A typed-array constructor usable over a {@link Mapping}. */
export type TypedArrayConstructor<T> = {
  new (buffer: ArrayBuffer, byteOffset?: number, length?: number): T;
  readonly BYTES_PER_ELEMENT: number;
};

interface Region {
  addr: sys.Pointer;
  length: number;
}

// A mapping whose views the program dropped without calling unmap() is unmapped once the
// views are collected; the views hold the ArrayBuffer, so nothing can touch it by then.
const unmapWhenCollected = new FinalizationRegistry<Region>((region) => {
  try {
    sys.munmap(region.addr, region.length);
  } catch {
    // Nothing to report to: the process keeps running with a leaked range at worst.
  }
});

/**
 * A mapped range of a {@link MemoryFile}. Every view shares the memory with every other
 * process that maps the same file; use `Atomics` on them to publish writes in order.
 */
export class Mapping {
  /** All mapped bytes. */
  readonly bytes: Uint8Array;
  /** The ArrayBuffer behind {@link bytes} (not a SharedArrayBuffer: `Atomics.wait` does not work on it). */
  readonly buffer: ArrayBuffer;
  /** Offset in the file of `bytes[0]`. */
  readonly offset: number;
  #region: Region | undefined;

  /** @internal use {@link MemoryFile.map}. */
  constructor(region: Region, skip: number, length: number, offset: number) {
    this.#region = region;
    // The buffer spans the whole region so that views at any file offset stay aligned to
    // their element size as long as the file offset is.
    this.buffer = sys.view(region.addr, region.length);
    this.bytes = new Uint8Array(this.buffer, skip, length);
    this.offset = offset;
    unmapWhenCollected.register(this.buffer, region, this);
  }

  /** Number of mapped bytes. */
  get length(): number {
    return this.bytes.length;
  }

  /** False once {@link unmap} ran. */
  get mapped(): boolean {
    return this.#region !== undefined;
  }

  /**
   * A typed array over `count` elements starting at `byteOffset` of this mapping (default:
   * all whole elements to the end). The element must be aligned in the file: `offset +
   * byteOffset` a multiple of the element size.
   */
  array<T>(type: TypedArrayConstructor<T>, byteOffset = 0, count?: number): T {
    const size = type.BYTES_PER_ELEMENT;
    const available = Math.floor((this.length - byteOffset) / size);
    const n = count ?? available;
    // Alignment counts from the page the mapping starts at: a mapping at an unaligned file
    // offset needs a matching byteOffset, or the typed-array constructor throws a RangeError.
    const aligned = (this.bytes.byteOffset + byteOffset) % size === 0;
    if (!Number.isInteger(byteOffset) || byteOffset < 0 || !aligned || !Number.isInteger(n) || n < 0 || n > available) {
      throw new ShmfdError(
        'ERR_MAPPING_RANGE',
        `${n} elements of ${size} bytes at offset ${byteOffset} do not fit a mapping of ${this.length} bytes`,
      );
    }
    return new type(this.buffer, this.bytes.byteOffset + byteOffset, n);
  }

  /**
   * Allocates and maps the pages of `length` bytes from `byteOffset` for writing, in one
   * call (madvise `MADV_POPULATE_WRITE`) instead of a page fault at the first store to
   * each page; the bytes do not change. A hint: returns false, doing nothing more, where
   * the kernel lacks it (before Linux 5.14), for a read-only or unmapped mapping, or when
   * the pages cannot be allocated (stores would fail there too).
   */
  populate(byteOffset: number, length: number): boolean {
    const region = this.#region;
    if (region === undefined || !Number.isInteger(byteOffset) || byteOffset < 0 || !(length > 0)) return false;
    const start = this.bytes.byteOffset + byteOffset;
    const from = start - (start % sys.kernelPageSize());
    const to = Math.min(start + length, this.bytes.byteOffset + this.bytes.length);
    if (to <= start) return false;
    try {
      sys.madvise(region.addr + BigInt(from), to - from, sys.MADV_POPULATE_WRITE);
      return true;
    } catch {
      return false;
    }
  }

  /**
   * Releases the mapping. Views that are still reachable then read zeros (the range is
   * replaced by private anonymous memory, released once they are collected), so a stale
   * view can never crash the process nor touch the file.
   */
  unmap(): void {
    const region = this.#region;
    if (region === undefined) return;
    this.#region = undefined;
    unmapWhenCollected.unregister(this);
    sys.mmap(
      region.length,
      sys.PROT_READ | sys.PROT_WRITE,
      sys.MAP_PRIVATE | sys.MAP_FIXED | sys.MAP_ANONYMOUS | sys.MAP_NORESERVE,
      -1,
      0,
      region.addr,
    );
    unmapWhenCollected.register(this.buffer, region);
  }
}

/**
 * A shared-memory file: an anonymous memfd created here or received from another process,
 * or a regular file. The descriptor belongs to this object until {@link close}.
 */
export class MemoryFile {
  /** The open descriptor. */
  readonly fd: number;
  /** The name given at creation, or the name it was passed under. */
  readonly name: string;
  /** True for a memfd (an anonymous file in memory), false for another regular file. */
  readonly isMemfd: boolean;
  #closed = false;

  private constructor(fd: number, name: string, isMemfd: boolean) {
    this.fd = fd;
    this.name = name;
    this.isMemfd = isMemfd;
  }

  /** Creates a new memfd (close-on-exec, sealable), sized to `options.size`. */
  static create(name: string, options: CreateMemoryFileOptions = {}): MemoryFile {
    const fd = sys.memfdCreate(name);
    const file = new MemoryFile(fd, name, true);
    try {
      if (options.size !== undefined && options.size > 0) file.resize(options.size);
      if (options.sealShrink !== false) file.seal(sys.Seal.SHRINK);
    } catch (err) {
      sys.close(fd);
      throw err;
    }
    return file;
  }

  /**
   * Adopts an open descriptor, typically one passed by `shm-fd`, `shm-restore` or systemd.
   * @throws ShmfdError `ERR_NOT_A_MEMORY_FILE` when the descriptor is not a regular file
   *   (a socket, a pipe, a directory); SystemError `EBADF` when it is not open.
   */
  static fromFd(fd: number, name = `fd${fd}`): MemoryFile {
    const stat = sys.fstat(fd);
    const target = fdTarget(fd) ?? `fd ${fd}`;
    if (!stat.isFile()) {
      throw new ShmfdError('ERR_NOT_A_MEMORY_FILE', `descriptor ${fd} (${name}) is not a memory file but ${target}`);
    }
    return new MemoryFile(fd, name, target.startsWith('/memfd:'));
  }

  /** Current size in bytes. */
  get size(): number {
    return sys.fstat(this.#open('read its size')).size;
  }

  /**
   * The descriptor, while this object owns it: after close() its number may already name
   * another file, so the kernel is not asked.
   */
  #open(method: string): number {
    if (this.#closed) throw new ShmfdError('ERR_MEMORY_FILE_CLOSED', `${this.name}: cannot ${method}, the memory file is closed`);
    return this.fd;
  }

  /** Sets the size; shrinking fails with EPERM once sealed. */
  resize(size: number): void {
    checkSize(size);
    sys.ftruncate(this.#open('resize'), size);
  }

  /** Grows the file to at least `size` bytes; never shrinks. Returns the size afterwards. */
  grow(size: number): number {
    checkSize(size);
    const current = this.size;
    if (size <= current) return current;
    sys.ftruncate(this.#open('grow'), size);
    return size;
  }

  /** Adds seals ({@link sys.Seal} bits). Only memfds created sealable accept them. */
  seal(seals: number): void {
    sys.addSeals(this.#open('seal'), seals);
  }

  /** The current seals, or 0 for a file that cannot be sealed. */
  get seals(): number {
    try {
      return sys.getSeals(this.#open('read its seals'));
    } catch (err) {
      if (sys.isSystemError(err, 'EINVAL')) return 0;
      throw err;
    }
  }

  /**
   * Maps a range of the file, shared with every other process that maps it. The range must
   * lie within the current size (touching pages past the end of a file kills the process
   * with SIGBUS, so it is refused here). Files above 4 GiB are mapped in windows.
   */
  map(options: MapOptions = {}): Mapping {
    const size = this.size;
    const offset = options.offset ?? 0;
    const length = options.length ?? size - offset;
    if (!Number.isSafeInteger(offset) || offset < 0 || !Number.isSafeInteger(length) || length <= 0 || offset + length > size) {
      throw new ShmfdError(
        'ERR_MAPPING_RANGE',
        `cannot map ${length} bytes at offset ${offset} of ${this.name}: the file has ${size} bytes`,
      );
    }
    const skip = offset % sys.kernelPageSize();
    const regionLength = skip + length;
    if (regionLength > sys.MAX_VIEW_BYTES) {
      throw new ShmfdError(
        'ERR_MAPPING_RANGE',
        `cannot map ${length} bytes of ${this.name} at once: at most ${sys.MAX_VIEW_BYTES} bytes per mapping; map it in windows with { offset, length }`,
      );
    }
    const prot = options.readOnly === true ? sys.PROT_READ : sys.PROT_READ | sys.PROT_WRITE;
    const addr = sys.mmap(regionLength, prot, sys.MAP_SHARED, this.#open('map'), offset - skip);
    return new Mapping({ addr, length: regionLength }, skip, length, offset);
  }

  /**
   * Closes the descriptor. Mappings stay valid until unmapped or collected; every other
   * method then throws `ERR_MEMORY_FILE_CLOSED` rather than act on whatever file gets the
   * number next.
   */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    sys.close(this.fd);
  }
}

function checkSize(size: number): void {
  if (!Number.isSafeInteger(size) || size < 0) {
    throw new ShmfdError('ERR_INVALID_ARGUMENT', `invalid size: ${size}`);
  }
}
