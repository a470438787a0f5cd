/**
 * One host per backup: an exclusive `flock(2)` on a lock file beside the backup
 * (`.BACKUP.lock`), held for as long as the host runs. The kernel drops the lock when the
 * holder dies, SIGKILL included, so a stale lock never needs cleaning up; the file itself
 * is never deleted (a host that deleted it could unlock a third host's fresh file while a
 * second still holds the old one).
 * @module
 */
import fs from 'node:fs';
import path from 'node:path';
import { ShmfdError } from '../base/errors.js';
import * as sys from '../system/libc.js';
import type { BackupFile } from './backup.js';

/** The lock file of a backup: `.<name>.lock` in its directory. */
export function lockFilePath(backup: BackupFile): string {
  return path.join(backup.dir, `.${backup.base}.lock`);
}

/** The exclusive lock of a backup, held by this process. */
export class BackupLock {
  private constructor(
    /** The lock file. */
    readonly path: string,
    readonly fd: number,
  ) {}

  /**
   * Takes the lock of `backup`, creating the lock file (mode 0600) if needed, and writes
   * this process's pid into it when it may ({@link BackupFile.mayWriteInto}). Never waits: a held lock is a
   * refusal.
   * @throws ShmfdError `ERR_BACKUP_IN_USE` (another process holds the lock, named by its
   *   pid), `ERR_BACKUP_ACCESS` (the lock file cannot be created or opened, or is not a
   *   regular file)
   */
  static acquire(backup: BackupFile): BackupLock {
    const file = lockFilePath(backup);
    let fd: number;
    let stat: fs.Stats;
    try {
      // Close-on-exec: the program (and anything it starts) must never hold the lock, or
      // it would outlive the host and refuse the next one.
      fd = openLockFile(backup, file);
    } catch (err) {
      const verb = fs.lstatSync(file, { throwIfNoEntry: false }) === undefined ? 'create' : 'open';
      throw new ShmfdError('ERR_BACKUP_ACCESS', `backup ${backup.path}: cannot ${verb} its lock file ${file}: ${sys.describeError(err)}`, { cause: err });
    }
    try {
      stat = fs.fstatSync(fd);
      if (!stat.isFile()) {
        throw new ShmfdError('ERR_BACKUP_ACCESS', `backup ${backup.path}: its lock file ${file} is not a regular file`);
      }
      if (!sys.flock(fd, sys.LOCK_EX | sys.LOCK_NB)) {
        const holder = flockHolder(fs.fstatSync(fd, { bigint: true })) ?? pidIn(fd);
        throw new ShmfdError(
          'ERR_BACKUP_IN_USE',
          `backup ${backup.path} is in use by another shm-restore (pid ${holder ?? 'unknown'}); one host per backup`,
        );
      }
    } catch (err) {
      fs.closeSync(fd);
      throw err;
    }
    // The pid is a hint for people: a lock file with other names (a hard link, from `cp -al`
    // of the directory or to another file) or of someone else's is locked, not written.
    if (backup.mayWriteInto(stat)) writePid(fd);
    return new BackupLock(file, fd);
  }

  /** Releases the lock (closing the file drops it). */
  release(): void {
    fs.closeSync(this.fd);
  }
}

/**
 * Opens the lock file, creating it if missing; only a file created here is given the
 * backup's owner ({@link BackupFile.giveToOwner}).
 */
function openLockFile(backup: BackupFile, file: string): number {
  const flags = fs.constants.O_RDWR | fs.constants.O_NOFOLLOW | sys.O_CLOEXEC;
  let fd: number;
  try {
    fd = fs.openSync(file, flags | fs.constants.O_CREAT | fs.constants.O_EXCL, 0o600);
  } catch (err) {
    if (!sys.isSystemError(err, 'EEXIST')) throw err;
    return fs.openSync(file, flags);
  }
  try {
    backup.giveToOwner(fd);
  } catch (err) {
    fs.closeSync(fd);
    throw err;
  }
  return fd;
}

/**
 * The pid of the process that holds the lock of `backup`, or undefined when it is free
 * (or the holder is not visible from here). Takes no lock, so it never disturbs a host
 * that is starting.
 */
export function lockHolder(backup: BackupFile): number | undefined {
  let stat: fs.BigIntStats;
  try {
    stat = fs.statSync(lockFilePath(backup), { bigint: true });
  } catch {
    return undefined;
  }
  return flockHolder(stat);
}

/**
 * The pid of the holder of an exclusive flock on the file `stat` describes, from the
 * kernel's table (/proc/locks): exact, unlike the pid in the file, which a new holder has
 * perhaps not written yet. Lines are matched by device and inode; a file system that
 * reports another device in stat than in that table (btrfs subvolumes) is matched by its
 * inode alone when that is unambiguous.
 */
function flockHolder(stat: fs.BigIntStats): number | undefined {
  let table: string;
  try {
    table = fs.readFileSync('/proc/locks', 'utf8');
  } catch {
    return undefined;
  }
  const major = ((stat.dev >> 8n) & 0xfffn) | ((stat.dev >> 32n) & ~0xfffn);
  const minor = (stat.dev & 0xffn) | ((stat.dev >> 12n) & ~0xffn);
  const sameInode: number[] = [];
  for (const line of table.split('\n')) {
    // "1: FLOCK  ADVISORY  WRITE 1234 fe:00:2155187 0 EOF"; waiters ("1: -> FLOCK ...") hold nothing.
    const m = /^\d+: FLOCK +\S+ +WRITE +(\d+) +([0-9a-f]+):([0-9a-f]+):(\d+) /.exec(line);
    if (m === null || BigInt(m[4] as string) !== stat.ino) continue;
    const pid = Number(m[1]);
    // 0: a holder in a pid namespace this process cannot see.
    if (pid === 0) continue;
    if (BigInt(`0x${m[2]}`) === major && BigInt(`0x${m[3]}`) === minor) return pid;
    sameInode.push(pid);
  }
  return sameInode.length === 1 ? sameInode[0] : undefined;
}

/** The pid a holder wrote into the lock file, if any. */
function pidIn(fd: number): number | undefined {
  const buffer = Buffer.alloc(32);
  let n: number;
  try {
    n = fs.readSync(fd, buffer, 0, buffer.length, 0);
  } catch {
    return undefined;
  }
  const m = /^(\d+)\n/.exec(buffer.toString('latin1', 0, n));
  return m === null ? undefined : Number(m[1]);
}

/**
 * Writes this process's pid into the held lock file, for people (`cat`) and for refusals
 * where /proc/locks does not show the holder. The lock holds without it, so a failure
 * (a full disk) changes nothing.
 */
function writePid(fd: number): void {
  const text = `${process.pid}\n`;
  try {
    fs.writeSync(fd, text, 0);
    fs.ftruncateSync(fd, Buffer.byteLength(text));
  } catch {
    // The pid is only a hint.
  }
}
