/**
 * The system layer: every call into libc that Node does not offer goes through here, and
 * this is the only module that touches koffi. Each wrapper is typed, takes and returns
 * plain numbers, strings and buffers. What the kernel refuses is thrown as a
 * {@link SystemError} that looks like the ones `node:fs` throws (`code`, `errno`,
 * `syscall`); a check made here and not by the kernel throws a `ShmfdError` instead, and
 * {@link describeError} turns any of them into the end of a message line.
 *
 * What `node:fs` already does correctly (open, read, pread, fstat, fsync, close, ...) is not
 * routed through here: most modules call `node:fs` directly. `fstat` and `close` below are
 * those same `node:fs` calls, re-exported for the modules that otherwise use only this layer.
 *
 * Linux only; the layouts below are those of x86-64 and aarch64 (LP64, little-endian).
 * @module
 */
import fs from 'node:fs';
import { createRequire } from 'node:module';
import os from 'node:os';
import type * as Koffi from 'koffi';
import { ShmfdError } from '../base/errors.js';

const require = createRequire(import.meta.url);
// Required, not imported: the ES module view of node:util reads every export, and on Node
// 24 one of them opens process.stderr, which loads node:net when stderr is a pipe.
const util = require('node:util') as typeof import('node:util');

const { errno: E, signals } = os.constants;

/** Linux errnos that libuv's table (util.getSystemErrorMap) lacks and these calls can return. */
const MISSING_ERRNO_NAMES = new Map<number, [string, string]>([
  [E.ENOEXEC, ['ENOEXEC', 'exec format error']],
  [E.ECHILD, ['ECHILD', 'no child processes']],
  [E.EDEADLK, ['EDEADLK', 'resource deadlock would occur']],
  [E.ENOLCK, ['ENOLCK', 'no locks available']],
  [E.ESTALE, ['ESTALE', 'stale file handle']],
  [E.EDQUOT, ['EDQUOT', 'disk quota exceeded']],
  // Node's os.constants.errno names neither of these; the numbers are Linux's (asm-generic/errno.h).
  [109, ['ETOOMANYREFS', 'too many references']],
  [123, ['ENOMEDIUM', 'no medium found']],
]);

/** An error from a failed system call, shaped like the errors of `node:fs`. */
export class SystemError extends Error {
  /** Symbolic errno, e.g. `'EBADF'`. Match on this. */
  readonly code: string;
  /** Positive errno number. */
  readonly errno: number;
  /** The failing call, e.g. `'memfd_create'`. */
  readonly syscall: string;
  /** The file system path or socket address involved, when there is one. */
  readonly path?: string;

  constructor(syscall: string, errno: number, path?: string) {
    const [code, description] = util.getSystemErrorMap().get(-errno) ?? MISSING_ERRNO_NAMES.get(errno) ?? [`E${errno}`, 'unknown error'];
    super(`${code}: ${description}, ${syscall}${path === undefined ? '' : ` '${path}'`}`);
    this.name = 'SystemError';
    this.code = code;
    this.errno = errno;
    this.syscall = syscall;
    if (path !== undefined) this.path = path;
  }
}

/** True when `err` is a system error (ours or Node's) with the given code. */
export function isSystemError(err: unknown, code?: string): err is NodeJS.ErrnoException & { code: string } {
  return (
    err instanceof Error &&
    typeof (err as NodeJS.ErrnoException).code === 'string' &&
    typeof (err as NodeJS.ErrnoException).syscall === 'string' &&
    (code === undefined || (err as NodeJS.ErrnoException).code === code)
  );
}

/**
 * An error as the end of a message line: a system error's description and code
 * (`permission denied (EACCES)`), the message of any other error (with the error's name
 * when it is not a plain `Error` or one of shmfd's own).
 */
export function describeError(err: unknown): string {
  if (isSystemError(err)) {
    const errno = typeof err.errno === 'number' ? Math.abs(err.errno) : undefined;
    const text = errno === undefined ? undefined : (util.getSystemErrorMap().get(-errno) ?? MISSING_ERRNO_NAMES.get(errno))?.[1];
    return text === undefined ? err.code : `${text} (${err.code})`;
  }
  if (err instanceof ShmfdError || (err instanceof Error && err.name === 'Error')) return err.message;
  return err instanceof Error ? `${err.name}: ${err.message}` : String(err);
}

/*
 * koffi and each libc function are loaded at their first use, not when this module is: loading
 * koffi (its native library) and declaring every prototype cost a command 15-30 ms of its
 * start, and many (`--help`, `status`, a program that only reads its LISTEN_FDS) need none of
 * it or only a few functions. koffi is required, not imported, so that loading it can wait.
 */
let koffiModule: typeof Koffi | undefined;
let libcHandle: Koffi.LibraryHandle | undefined;
type LibcFunction = ReturnType<Koffi.LibraryHandle['func']>;

function ffi(): typeof Koffi {
  return (koffiModule ??= loadKoffi());
}

/**
 * koffi's native module, loaded from where koffi's own entry finds it. The entry also reads
 * the ELF headers of the node binary to tell glibc from musl and wraps deprecated aliases
 * (none of which this module uses): most of the cost of loading koffi (a program's
 * reattach to its state went from 37.9 to 28.2 ms without it, BENCHMARKS.md §6). The glibc build is tried first (it does not load on musl),
 * then the musl one; a module of another version than koffi's, or any other layout, falls
 * back to the entry.
 */
function loadKoffi(): typeof Koffi {
  try {
    const entry = require.resolve('koffi');
    const fromKoffi = createRequire(entry);
    const { version } = fromKoffi('./package.json') as { version: string };
    for (const libc of [process.platform, 'musl']) {
      try {
        const native = fromKoffi(`@koromix/koffi-${process.platform}-${process.arch}/${libc}_${process.arch}/koffi.node`) as typeof Koffi & { version?: string };
        if (native.version === version) return native;
      } catch {
        // Not this build: the next one, or the entry.
      }
    }
  } catch {
    // Not laid out as expected: the entry knows best.
  }
  return require('koffi') as typeof Koffi;
}

/** An object whose properties are the libc functions of `prototypes`, each declared when first read. */
function lazyFunctions<T extends Record<string, string>>(prototypes: T): { readonly [K in keyof T]: LibcFunction } {
  const functions = {};
  for (const [name, prototype] of Object.entries(prototypes)) {
    Object.defineProperty(functions, name, {
      configurable: true,
      get() {
        libcHandle ??= ffi().load('libc.so.6');
        const bound = libcHandle.func(prototype);
        // From then on a plain property: the calls on hot paths (sendfile, lseek) pay no getter.
        Object.defineProperty(functions, name, { value: bound });
        return bound;
      },
    });
  }
  return functions as { readonly [K in keyof T]: LibcFunction };
}

const c = lazyFunctions({
  memfd_create: 'int memfd_create(const char *name, unsigned int flags)',
  ftruncate: 'int ftruncate(int fd, int64_t length)',
  fcntl: 'int fcntl(int fd, int cmd, ...)',
  mmap: 'void *mmap(void *addr, size_t length, int prot, int flags, int fd, int64_t offset)',
  munmap: 'int munmap(void *addr, size_t length)',
  madvise: 'int madvise(void *addr, size_t length, int advice)',
  dup3: 'int dup3(int oldfd, int newfd, int flags)',
  close_range: 'int close_range(unsigned int first, unsigned int last, int flags)',
  execve: 'int execve(const char *path, const char **argv, const char **envp)',
  signal: 'void *signal(int signum, void *handler)',
  sigprocmask: 'int sigprocmask(int how, const void *set, void *oldset)',
  socket: 'int socket(int domain, int type, int protocol)',
  bind: 'int bind(int fd, const void *addr, uint32_t addrlen)',
  sendmsg: 'intptr_t sendmsg(int fd, const void *msg, int flags)',
  recvmsg: 'intptr_t recvmsg(int fd, void *msg, int flags)',
  sendfile: 'intptr_t sendfile(int out_fd, int in_fd, _Inout_ int64_t *offset, size_t count)',
  lseek: 'int64_t lseek(int fd, int64_t offset, int whence)',
  flock: 'int flock(int fd, int operation)',
  fsetxattr: 'int fsetxattr(int fd, const char *name, const void *value, size_t size, int flags)',
  fgetxattr: 'intptr_t fgetxattr(int fd, const char *name, _Out_ uint8_t *value, size_t size)',
  setsockopt: 'int setsockopt(int fd, int level, int name, const void *value, uint32_t len)',
  getsockopt: 'int getsockopt(int fd, int level, int name, _Out_ int *value, _Inout_ uint32_t *len)',
  getsockname: 'int getsockname(int fd, _Out_ uint8_t *addr, _Inout_ uint32_t *len)',
  listen: 'int listen(int fd, int backlog)',
  connect: 'int connect(int fd, const void *addr, uint32_t addrlen)',
  inet_pton: 'int inet_pton(int af, const char *src, _Out_ uint8_t *dst)',
  inet_ntop: 'const char *inet_ntop(int af, const uint8_t *src, _Out_ uint8_t *dst, uint32_t size)',
  _exit: 'void _exit(int status)',
  sysconf: 'long sysconf(int name)',
});

/** The value of `errno` left by the last libc call made through koffi. */
function lastErrno(): number {
  return ffi().errno();
}

function fail(syscall: string, path?: string): never {
  throw new SystemError(syscall, lastErrno(), path);
}

/** A pointer into native memory, as koffi represents it. */
export type Pointer = bigint;

const MAP_FAILED = 0xffffffffffffffffn;

// ---------------------------------------------------------------- constants

const MFD_CLOEXEC = 0x1;
const MFD_ALLOW_SEALING = 0x2;
const MEMFD_NAME_MAX = 249;

const F_GETFD = 1;
const F_SETFD = 2;
const F_GETFL = 3;
const F_SETFL = 4;
export const FD_CLOEXEC = 1;
export const O_NONBLOCK = 0o4000;
export const O_CLOEXEC = 0o2000000;
const F_ADD_SEALS = 1033;
const F_GET_SEALS = 1034;

/** File seals (fcntl(2)). */
export const Seal = {
  SEAL: 0x1,
  SHRINK: 0x2,
  GROW: 0x4,
  WRITE: 0x8,
  FUTURE_WRITE: 0x10,
} as const;

export const PROT_READ = 0x1;
export const PROT_WRITE = 0x2;
export const MAP_SHARED = 0x1;
export const MAP_PRIVATE = 0x2;
export const MAP_FIXED = 0x10;
export const MAP_ANONYMOUS = 0x20;
export const MAP_NORESERVE = 0x4000;

const CLOSE_RANGE_CLOEXEC = 1 << 2;
const SIG_SETMASK = 2;
const SIGSET_BYTES = 128;

export const AF_UNIX = 1;
export const SOCK_DGRAM = 2;
const SOCK_CLOEXEC = 0o2000000;
const SOL_SOCKET = 1;
const SCM_RIGHTS = 1;
const MSG_NOSIGNAL = 0x4000;
const MSG_CTRUNC = 0x8;
const MSG_CMSG_CLOEXEC = 0x40000000;

/** The most descriptors the kernel accepts in one `SCM_RIGHTS` message (SCM_MAX_FD). */
export const MAX_FDS_PER_MESSAGE = 253;

export const SEEK_DATA = 3;
export const SEEK_HOLE = 4;

// ---------------------------------------------------------------- descriptors

/** Creates an anonymous memory file (memfd_create(2)). */
export function memfdCreate(name: string, flags: number = MFD_CLOEXEC | MFD_ALLOW_SEALING): number {
  // The kernel takes at most 249 bytes (NAME_MAX less "memfd:"); the name is only shown in
  // /proc, so a longer one (descriptor names may have 255 characters) is cut, not refused.
  let shown = name;
  while (Buffer.byteLength(shown) > MEMFD_NAME_MAX) shown = shown.slice(0, -1);
  const fd = c.memfd_create(shown, flags) as number;
  if (fd < 0) fail('memfd_create');
  return fd;
}

export function ftruncate(fd: number, length: number): void {
  if (c.ftruncate(fd, length) !== 0) fail('ftruncate');
}

export function fstat(fd: number): fs.Stats {
  return fs.fstatSync(fd);
}

export function close(fd: number): void {
  fs.closeSync(fd);
}

function fcntlInt(fd: number, cmd: number, arg: number, name: string): number {
  const r = c.fcntl(fd, cmd, 'int', arg) as number;
  if (r < 0) fail(name);
  return r;
}

export function getFdFlags(fd: number): number {
  return fcntlInt(fd, F_GETFD, 0, 'fcntl');
}

export function setCloexec(fd: number, on: boolean): void {
  const flags = getFdFlags(fd);
  const next = on ? flags | FD_CLOEXEC : flags & ~FD_CLOEXEC;
  if (next !== flags) fcntlInt(fd, F_SETFD, next, 'fcntl');
}

export function setNonBlocking(fd: number, on: boolean): void {
  const flags = fcntlInt(fd, F_GETFL, 0, 'fcntl');
  const next = on ? flags | O_NONBLOCK : flags & ~O_NONBLOCK;
  if (next !== flags) fcntlInt(fd, F_SETFL, next, 'fcntl');
}

/** Adds seals (a combination of {@link Seal} bits) to a memfd. */
export function addSeals(fd: number, seals: number): void {
  fcntlInt(fd, F_ADD_SEALS, seals, 'fcntl');
}

/** The seals of a file; EINVAL when the file does not support sealing (it is no memfd). */
export function getSeals(fd: number): number {
  return fcntlInt(fd, F_GET_SEALS, 0, 'fcntl');
}

/** True when `fd` is an open descriptor. An expected condition, so a value, not an error. */
export function isOpen(fd: number): boolean {
  return (c.fcntl(fd, F_GETFD, 'int', 0) as number) >= 0;
}

const F_DUPFD_CLOEXEC = 1030;

/** Duplicates `fd` to the lowest free number >= `min`, close-on-exec. */
export function dupAbove(fd: number, min: number): number {
  return fcntlInt(fd, F_DUPFD_CLOEXEC, min, 'fcntl');
}

/** dup2 with an explicit close-on-exec choice (dup3(2)); `oldfd === newfd` only adjusts the flag. */
export function dup2(oldfd: number, newfd: number, cloexec = false): number {
  if (oldfd === newfd) {
    setCloexec(newfd, cloexec);
    return newfd;
  }
  const r = c.dup3(oldfd, newfd, cloexec ? O_CLOEXEC : 0) as number;
  if (r < 0) fail('dup3');
  return r;
}

/** Marks every descriptor from `first` on close-on-exec (close_range(2) with CLOSE_RANGE_CLOEXEC). */
export function cloexecFrom(first: number): void {
  if ((c.close_range(first, 0xffffffff, CLOSE_RANGE_CLOEXEC) as number) === 0) return;
  const errno = lastErrno();
  // Kernels before 5.11 lack the flag: walk the open descriptors instead.
  if (errno !== E.EINVAL && errno !== E.ENOSYS) throw new SystemError('close_range', errno);
  for (const entry of fs.readdirSync('/proc/self/fd')) {
    const fd = Number(entry);
    if (fd >= first && isOpen(fd)) setCloexec(fd, true);
  }
}

/** Moves the file offset (lseek(2)); for SEEK_DATA/SEEK_HOLE an ENXIO past the data is returned as -1. */
export function lseek(fd: number, offset: number, whence: number): number {
  const r = Number(c.lseek(fd, offset, whence));
  if (r < 0) {
    if (lastErrno() === E.ENXIO && (whence === SEEK_DATA || whence === SEEK_HOLE)) return -1;
    fail('lseek');
  }
  return r;
}

/**
 * Copies up to `count` bytes from `inFd` at `offset` to the current position of `outFd`
 * (sendfile(2)); returns the number of bytes copied, 0 at the end of the input.
 */
export function sendfile(outFd: number, inFd: number, offset: number, count: number): number {
  const off = [BigInt(offset)];
  const r = Number(c.sendfile(outFd, inFd, off, count));
  if (r < 0) fail('sendfile');
  return r;
}

export const LOCK_EX = 2;
export const LOCK_NB = 4;

/**
 * Places an advisory lock on an open file (flock(2)). The lock belongs to the
 * open file description: the kernel drops it when the last descriptor of that description
 * is closed, including when its process dies. With `LOCK_NB`, a conflicting lock held
 * elsewhere is an expected condition, so a value: false (EWOULDBLOCK), not an error.
 */
export function flock(fd: number, operation: number): boolean {
  if ((c.flock(fd, operation) as number) === 0) return true;
  const errno = lastErrno();
  if (errno === E.EWOULDBLOCK && (operation & LOCK_NB) !== 0) return false;
  throw new SystemError('flock', errno);
}

const XATTR_VALUE_MAX = 256;

/**
 * Sets the extended attribute `name` (e.g. `user.shmfd.check`) of an open file
 * (fsetxattr(2)). Returns false when the file system keeps no such attributes
 * (EOPNOTSUPP), which callers treat as "nothing recorded", not as a failure.
 */
export function setXattr(fd: number, name: string, value: string): boolean {
  const bytes = Buffer.from(value);
  if ((c.fsetxattr(fd, name, bytes, bytes.length, 0) as number) === 0) return true;
  if (lastErrno() === E.EOPNOTSUPP) return false;
  fail('fsetxattr');
}

/**
 * Reads the extended attribute `name` of an open file (fgetxattr(2)) as text; undefined
 * when the file has none of that name (ENODATA) or its file system keeps none (EOPNOTSUPP).
 * Values longer than 256 bytes are not ours: ERANGE.
 */
export function getXattr(fd: number, name: string): string | undefined {
  const buffer = Buffer.alloc(XATTR_VALUE_MAX);
  const n = Number(c.fgetxattr(fd, name, buffer, buffer.length));
  if (n >= 0) return buffer.toString('utf8', 0, n);
  const errno = lastErrno();
  if (errno === E.ENODATA || errno === E.EOPNOTSUPP) return undefined;
  fail('fgetxattr');
}

/** Ends the process at once (_exit(2)): no exit handlers, no flushing, nothing of libuv. */
export function exitNow(status: number): never {
  c._exit(status);
  throw new Error('unreachable: _exit returned');
}

// ---------------------------------------------------------------- memory

/** Maps `length` bytes of `fd` at `offset` (mmap(2)); returns the address. */
export function mmap(length: number, prot: number, flags: number, fd: number, offset = 0, addr: Pointer = 0n): Pointer {
  const p = ffi().address(c.mmap(addr === 0n ? null : addr, length, prot, flags, fd, offset)) as Pointer;
  if (p === MAP_FAILED) fail('mmap');
  return p;
}

export function munmap(addr: Pointer, length: number): void {
  if (c.munmap(addr, length) !== 0) fail('munmap');
}

/** madvise(2) advice (Linux 5.14+): allocate and map pages for writing, faulting them in. */
export const MADV_POPULATE_WRITE = 23;

/** Gives the kernel `advice` about `length` bytes at `addr` (madvise(2)). */
export function madvise(addr: Pointer, length: number, advice: number): void {
  if (c.madvise(addr, length, advice) !== 0) fail('madvise');
}

/**
 * The largest ArrayBuffer Node can hand out over native memory; koffi aborts the whole
 * process above it, so callers must check first.
 */
export const MAX_VIEW_BYTES = Math.min(2 ** 32, Number.MAX_SAFE_INTEGER);

const SC_PAGESIZE = 30;
let pageSize: number | undefined;

/**
 * The kernel's page size, which mmap(2) offsets are multiples of (4 KiB on x86-64; 4, 16 or
 * 64 KiB on aarch64). Not the snapshot format's `PAGE`, which the file format fixes at 4096.
 */
export function kernelPageSize(): number {
  return (pageSize ??= Number(c.sysconf(SC_PAGESIZE)));
}

/** An ArrayBuffer over native memory. Never call with a null pointer or a length over {@link MAX_VIEW_BYTES}. */
export function view(addr: Pointer, length: number): ArrayBuffer {
  if (addr === 0n || length <= 0 || length > MAX_VIEW_BYTES) {
    throw new RangeError(`cannot view ${length} bytes at 0x${addr.toString(16)}`);
  }
  return ffi().view(addr, length);
}

// ---------------------------------------------------------------- exec

/** Resets the signal mask and the dispositions a Node process leaves behind, for execve. */
export function resetSignalsForExec(): void {
  const empty = Buffer.alloc(SIGSET_BYTES);
  if (c.sigprocmask(SIG_SETMASK, empty, null) !== 0) fail('sigprocmask');
  // Node ignores SIGPIPE and SIGXFSZ, and an ignored signal stays ignored across execve;
  // handled ones revert by themselves, but resetting 1..31 costs nothing and leaves no doubt.
  for (let sig = 1; sig < 32; sig++) {
    if (sig === signals.SIGKILL || sig === signals.SIGSTOP) continue;
    c.signal(sig, null);
  }
}

/**
 * Replaces the process image (execve(2)). Returns only by throwing. The caller prepares the
 * descriptors; see `src/exec/exec.ts` for the steps a Node process needs first.
 */
export function execve(path: string, argv: readonly (string | Uint8Array)[], env: readonly (string | Uint8Array)[]): never {
  // Strings go out as UTF-8; bytes (arguments that are not UTF-8) as they are, NUL added.
  const raw = (item: string | Uint8Array): string | Buffer => (typeof item === 'string' ? item : Buffer.concat([item, NUL]));
  c.execve(path, [...argv.map(raw), null], [...env.map(raw), null]);
  fail('execve', path);
}

const NUL = Buffer.alloc(1);

// ---------------------------------------------------------------- unix datagram sockets

/**
 * The longest unix socket address: sun_path is 108 bytes (Linux's <sys/un.h>), and a path
 * needs room for its NUL, an abstract name (`@name`, the `@` not counted) for its leading NUL.
 * A constant, not read from koffi, so that checking an address needs no FFI.
 */
export const MAX_UNIX_ADDRESS_BYTES = 108 - 1;

/**
 * The structures the socket calls exchange with the kernel, laid out by koffi (with the C
 * ABI's padding) when a call first needs them.
 */
function describeLayouts() {
  const k = ffi();
  // The socket addresses of <sys/un.h> and <netinet/in.h>; the port and the IP address are
  // in network byte order, so they are written as bytes.
  const SockaddrUn = k.struct({ sun_family: 'uint16_t', sun_path: k.array('char', MAX_UNIX_ADDRESS_BYTES + 1) });
  const SockaddrIn = k.struct({
    sin_family: 'uint16_t',
    sin_port: 'uint16_t',
    sin_addr: k.array('uint8_t', 4),
    sin_zero: k.array('uint8_t', 8),
  });
  const SockaddrIn6 = k.struct({
    sin6_family: 'uint16_t',
    sin6_port: 'uint16_t',
    sin6_flowinfo: 'uint32_t',
    sin6_addr: k.array('uint8_t', 16),
    sin6_scope_id: 'uint32_t',
  });
  // The structures of sendmsg(2) and recvmsg(2). Anonymous, because koffi's type names are
  // global: a second copy of this module that shares the same koffi (two installs of the
  // package in one process) would fail on them.
  const Iovec = k.struct({ iov_base: 'void *', iov_len: 'size_t' });
  const Msghdr = k.struct({
    msg_name: 'void *',
    msg_namelen: 'uint32_t',
    msg_iov: 'void *',
    msg_iovlen: 'size_t',
    msg_control: 'void *',
    msg_controllen: 'size_t',
    msg_flags: 'int',
  });
  const Cmsghdr = k.struct({ cmsg_len: 'size_t', cmsg_level: 'int', cmsg_type: 'int' });
  const sizeT = k.sizeof('size_t');
  return {
    SockaddrIn,
    SockaddrIn6,
    Iovec,
    Msghdr,
    Cmsghdr,
    SUN_PATH_AT: k.offsetof(SockaddrUn, 'sun_path'),
    SOCKADDR_IN_BYTES: k.sizeof(SockaddrIn),
    SOCKADDR_IN6_BYTES: k.sizeof(SockaddrIn6),
    SIN_PORT_AT: k.offsetof(SockaddrIn, 'sin_port'),
    SIN_ADDR_AT: k.offsetof(SockaddrIn, 'sin_addr'),
    SIN6_PORT_AT: k.offsetof(SockaddrIn6, 'sin6_port'),
    SIN6_ADDR_AT: k.offsetof(SockaddrIn6, 'sin6_addr'),
    MSGHDR_BYTES: k.sizeof(Msghdr),
    IOVEC_BYTES: k.sizeof(Iovec),
    INT_BYTES: k.sizeof('int'),
    SIZE_T_BYTES: sizeT,
    /** CMSG_LEN(0): the header before a control message's data. */
    CMSG_HEADER_BYTES: Math.ceil(k.sizeof(Cmsghdr) / sizeT) * sizeT,
  };
}

let layoutsCache: ReturnType<typeof describeLayouts> | undefined;

function layouts(): ReturnType<typeof describeLayouts> {
  return (layoutsCache ??= describeLayouts());
}

/**
 * Encodes a unix socket address: `/path`, or `@name` for the abstract namespace. One longer
 * than {@link MAX_UNIX_ADDRESS_BYTES} is encoded all the same, for the kernel to refuse
 * (EINVAL); callers that take addresses from users check their length first.
 */
function sockaddrUn(address: string): Buffer {
  const abstract = address.startsWith('@');
  const name = Buffer.from(abstract ? address.slice(1) : address);
  const { SUN_PATH_AT } = layouts();
  // An abstract name follows a NUL and is as long as given; a path ends with its NUL.
  const addr = Buffer.alloc(SUN_PATH_AT + 1 + name.length);
  addr.writeUInt16LE(AF_UNIX, 0);
  name.copy(addr, abstract ? SUN_PATH_AT + 1 : SUN_PATH_AT);
  return addr;
}

/** Scratch native memory that lives for one call; Buffers may move or be pooled, this does not. */
class Scratch {
  readonly ptr: Pointer;
  readonly bytes: Buffer;
  constructor(readonly size: number) {
    const k = ffi();
    this.ptr = k.address(k.alloc('uint8_t', size)) as Pointer;
    this.bytes = Buffer.from(k.view(this.ptr, size));
    this.bytes.fill(0);
  }
  at(offset: number): Pointer {
    return this.ptr + BigInt(offset);
  }
  free(): void {
    ffi().free(this.ptr);
  }
}

/** CMSG_ALIGN: control messages and their data start at multiples of size_t. */
function cmsgAlign(bytes: number): number {
  const align = layouts().SIZE_T_BYTES;
  return Math.ceil(bytes / align) * align;
}

/** CMSG_SPACE of an `SCM_RIGHTS` message with `fdCount` descriptors. */
function cmsgSpace(fdCount: number): number {
  const { CMSG_HEADER_BYTES, INT_BYTES } = layouts();
  return CMSG_HEADER_BYTES + cmsgAlign(INT_BYTES * fdCount);
}

/**
 * Sends one datagram, with descriptors as `SCM_RIGHTS`, to a path or `@abstract` address.
 * More than {@link MAX_FDS_PER_MESSAGE} descriptors: EINVAL from the kernel.
 * @returns the number of payload bytes sent.
 */
export function sendDatagram(fd: number, address: string, payload: Uint8Array, fds: readonly number[] = []): number {
  const k = ffi();
  const { MSGHDR_BYTES, IOVEC_BYTES, CMSG_HEADER_BYTES, INT_BYTES, Iovec, Msghdr, Cmsghdr } = layouts();
  const addr = sockaddrUn(address);
  const control = fds.length === 0 ? 0 : cmsgSpace(fds.length);
  const iovAt = MSGHDR_BYTES;
  const nameAt = iovAt + IOVEC_BYTES;
  const controlAt = nameAt + cmsgAlign(addr.length);
  const dataAt = controlAt + control;
  const s = new Scratch(dataAt + Math.max(payload.length, 1));
  try {
    addr.copy(s.bytes, nameAt);
    s.bytes.set(payload, dataAt);
    k.encode(s.ptr, iovAt, Iovec, { iov_base: s.at(dataAt), iov_len: payload.length });
    k.encode(s.ptr, 0, Msghdr, {
      msg_name: s.at(nameAt),
      msg_namelen: addr.length,
      msg_iov: s.at(iovAt),
      msg_iovlen: 1,
      msg_control: control === 0 ? null : s.at(controlAt),
      msg_controllen: control,
      msg_flags: 0,
    });
    if (control > 0) {
      const cmsg = { cmsg_len: CMSG_HEADER_BYTES + INT_BYTES * fds.length, cmsg_level: SOL_SOCKET, cmsg_type: SCM_RIGHTS };
      k.encode(s.ptr, controlAt, Cmsghdr, cmsg);
      k.encode(s.ptr, controlAt + CMSG_HEADER_BYTES, 'int', [...fds], fds.length);
    }
    const r = Number(c.sendmsg(fd, s.ptr, MSG_NOSIGNAL));
    if (r < 0) fail('sendmsg', address);
    return r;
  } finally {
    s.free();
  }
}

/** A received datagram and the descriptors that came with it (already close-on-exec). */
export interface ReceivedDatagram {
  data: Buffer;
  fds: number[];
  /** The kernel dropped descriptors that did not fit (MSG_CTRUNC). */
  truncatedFds: boolean;
}

/** Receives one datagram (blocking unless the socket is non-blocking), with its descriptors. */
export function receiveDatagram(fd: number, maxBytes = 4096, maxFds = MAX_FDS_PER_MESSAGE): ReceivedDatagram {
  const k = ffi();
  const { MSGHDR_BYTES, IOVEC_BYTES, CMSG_HEADER_BYTES, INT_BYTES, Iovec, Msghdr, Cmsghdr } = layouts();
  const control = cmsgSpace(maxFds);
  const iovAt = MSGHDR_BYTES;
  const controlAt = iovAt + IOVEC_BYTES;
  const dataAt = controlAt + control;
  const s = new Scratch(dataAt + maxBytes);
  try {
    k.encode(s.ptr, iovAt, Iovec, { iov_base: s.at(dataAt), iov_len: maxBytes });
    k.encode(s.ptr, 0, Msghdr, {
      msg_name: null,
      msg_namelen: 0,
      msg_iov: s.at(iovAt),
      msg_iovlen: 1,
      msg_control: s.at(controlAt),
      msg_controllen: control,
      msg_flags: 0,
    });
    const n = Number(c.recvmsg(fd, s.ptr, MSG_CMSG_CLOEXEC));
    if (n < 0) fail('recvmsg');
    const msg = k.decode(s.ptr, 0, Msghdr) as { msg_controllen: number | bigint; msg_flags: number };
    const fds: number[] = [];
    const controlEnd = controlAt + Number(msg.msg_controllen);
    for (let at = controlAt; at + CMSG_HEADER_BYTES <= controlEnd; ) {
      const cmsg = k.decode(s.ptr, at, Cmsghdr) as { cmsg_len: number | bigint; cmsg_level: number; cmsg_type: number };
      const len = Number(cmsg.cmsg_len);
      if (len < CMSG_HEADER_BYTES) break;
      const count = Math.floor((len - CMSG_HEADER_BYTES) / INT_BYTES);
      if (cmsg.cmsg_level === SOL_SOCKET && cmsg.cmsg_type === SCM_RIGHTS && count > 0) {
        fds.push(...(k.decode(s.ptr, at + CMSG_HEADER_BYTES, 'int', count) as number[]));
      }
      at += cmsgAlign(len);
    }
    return {
      data: Buffer.from(s.bytes.subarray(dataAt, dataAt + Math.min(n, maxBytes))),
      fds,
      truncatedFds: (msg.msg_flags & MSG_CTRUNC) !== 0,
    };
  } finally {
    s.free();
  }
}

// ---------------------------------------------------------------- listening sockets

export const AF_INET = 2;
export const AF_INET6 = 10;
export const SOCK_STREAM = 1;
const SOCK_NONBLOCK = 0o4000;
const SO_REUSEADDR = 2;
const SO_TYPE = 3;
const SO_ACCEPTCONN = 30;
const SO_DOMAIN = 39;

/** A socket address: an IP address and port, or a unix path (`@name`: abstract namespace). */
export type SocketAddress =
  | { family: 'ipv4' | 'ipv6'; address: string; port: number }
  | { family: 'unix'; path: string };

function ipBytes(af: number, address: string): Buffer {
  const bytes = Buffer.alloc(af === AF_INET ? 4 : 16);
  if ((c.inet_pton(af, address, bytes) as number) !== 1) {
    throw new ShmfdError('ERR_INVALID_ARGUMENT', `${JSON.stringify(address)} is not an ${af === AF_INET ? 'IPv4' : 'IPv6'} address`);
  }
  return bytes;
}

/** Encodes a socket address as the kernel's sockaddr_in, sockaddr_in6 or sockaddr_un. */
export function encodeSocketAddress(addr: SocketAddress): Buffer {
  if (addr.family === 'unix') return sockaddrUn(addr.path);
  const { SOCKADDR_IN_BYTES, SOCKADDR_IN6_BYTES, SIN_PORT_AT, SIN_ADDR_AT, SIN6_PORT_AT, SIN6_ADDR_AT } = layouts();
  if (addr.family === 'ipv4') {
    const b = Buffer.alloc(SOCKADDR_IN_BYTES);
    b.writeUInt16LE(AF_INET, 0);
    b.writeUInt16BE(addr.port, SIN_PORT_AT);
    ipBytes(AF_INET, addr.address).copy(b, SIN_ADDR_AT);
    return b;
  }
  const b = Buffer.alloc(SOCKADDR_IN6_BYTES);
  b.writeUInt16LE(AF_INET6, 0);
  b.writeUInt16BE(addr.port, SIN6_PORT_AT);
  ipBytes(AF_INET6, addr.address).copy(b, SIN6_ADDR_AT);
  return b;
}

function decodeSocketAddress(b: Buffer): SocketAddress | undefined {
  const { SUN_PATH_AT, SIN_PORT_AT, SIN_ADDR_AT, SIN6_PORT_AT, SIN6_ADDR_AT } = layouts();
  const family = b.length >= 2 ? b.readUInt16LE(0) : -1;
  if (family === AF_UNIX) {
    const raw = b.subarray(SUN_PATH_AT);
    if (raw.length > 0 && raw[0] === 0) return { family: 'unix', path: `@${raw.subarray(1).toString()}` };
    const end = raw.indexOf(0);
    return { family: 'unix', path: raw.subarray(0, end < 0 ? raw.length : end).toString() };
  }
  if (family !== AF_INET && family !== AF_INET6) return undefined;
  const text = Buffer.alloc(64);
  const [addrAt, addrBytes, portAt] = family === AF_INET ? [SIN_ADDR_AT, 4, SIN_PORT_AT] : [SIN6_ADDR_AT, 16, SIN6_PORT_AT];
  if (c.inet_ntop(family, b.subarray(addrAt, addrAt + addrBytes), text, text.length) === null) fail('inet_ntop');
  return {
    family: family === AF_INET ? 'ipv4' : 'ipv6',
    address: text.subarray(0, text.indexOf(0)).toString(),
    port: b.readUInt16BE(portAt),
  };
}

/** Opens a socket (socket(2)), always close-on-exec; `nonBlocking` adds SOCK_NONBLOCK. */
export function socket(domain: number, type: number, nonBlocking = false): number {
  const fd = c.socket(domain, type | SOCK_CLOEXEC | (nonBlocking ? SOCK_NONBLOCK : 0), 0) as number;
  if (fd < 0) fail('socket');
  return fd;
}

/** Sets SO_REUSEADDR, so that a TCP port in TIME_WAIT can be bound again at once. */
export function setReuseAddress(fd: number): void {
  const one = Buffer.alloc(4);
  one.writeInt32LE(1, 0);
  if (c.setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, one, 4) !== 0) fail('setsockopt');
}

function getsockoptInt(fd: number, name: number): number {
  const value = [0];
  if (c.getsockopt(fd, SOL_SOCKET, name, value, [4]) !== 0) fail('getsockopt');
  return value[0] as number;
}

/** Binds a socket to an address (bind(2)). */
export function bindSocket(fd: number, addr: SocketAddress): void {
  const bytes = encodeSocketAddress(addr);
  if (c.bind(fd, bytes, bytes.length) !== 0) fail('bind', describeSocketAddress(addr));
}

/** Marks a stream socket as accepting connections (listen(2)); the kernel caps `backlog` at somaxconn. */
export function listen(fd: number, backlog: number): void {
  if (c.listen(fd, backlog) !== 0) fail('listen');
}

/** Connects a socket (connect(2)); EINPROGRESS and EAGAIN surface as errors for the caller to judge. */
export function connectSocket(fd: number, addr: SocketAddress): void {
  const bytes = encodeSocketAddress(addr);
  if (c.connect(fd, bytes, bytes.length) !== 0) fail('connect', describeSocketAddress(addr));
}

/** What a socket descriptor is: family, type, whether it listens, and its local address. */
export interface SocketInfo {
  family: 'ipv4' | 'ipv6' | 'unix' | 'other';
  type: 'stream' | 'datagram' | 'other';
  listening: boolean;
  address: SocketAddress | undefined;
}

/** Describes a socket descriptor; throws ENOTSOCK for anything else. */
export function socketInfo(fd: number): SocketInfo {
  const domain = getsockoptInt(fd, SO_DOMAIN);
  const type = getsockoptInt(fd, SO_TYPE);
  const bytes = Buffer.alloc(128);
  const len = [bytes.length];
  if (c.getsockname(fd, bytes, len) !== 0) fail('getsockname');
  return {
    family: domain === AF_INET ? 'ipv4' : domain === AF_INET6 ? 'ipv6' : domain === AF_UNIX ? 'unix' : 'other',
    type: type === SOCK_STREAM ? 'stream' : type === SOCK_DGRAM ? 'datagram' : 'other',
    listening: type === SOCK_STREAM && getsockoptInt(fd, SO_ACCEPTCONN) === 1,
    address: decodeSocketAddress(bytes.subarray(0, Math.min(len[0] as number, bytes.length))),
  };
}

/**
 * A socket address for people: `127.0.0.1:8080`, `[::1]:8080` or the unix path; with a
 * `scheme`, an IP address as a URL (`http://127.0.0.1:8080`).
 */
export function describeSocketAddress(addr: SocketAddress, scheme?: string): string {
  if (addr.family === 'unix') return addr.path;
  const where = addr.family === 'ipv6' ? `[${addr.address}]:${addr.port}` : `${addr.address}:${addr.port}`;
  return scheme === undefined ? where : `${scheme}://${where}`;
}
