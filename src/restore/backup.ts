/**
 * The backup file of the restore host: where it lives, whether it can be trusted, its
 * temporary siblings, and restoring it into a memory file.
 * @module
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { ShmfdError } from '../base/errors.js';
import { readAt } from '../base/read-at.js';
import { SnapshotFormatError } from '../snapshot/errors.js';
import { describeError, getXattr, isSystemError, setXattr } from '../system/libc.js';
import { CHUNK, copySparse, dataExtents, yieldToLoop, type CopyResult, type CopySparseOptions } from './copy.js';
import { readHead, readSlotState, type SlotState } from '../snapshot/pread.js';

/** How the host treats the backup: a raw memory image, or a snapshot file (restore-v1). */
export type BackupFormat = 'raw' | 'snapshot';

/** What {@link BackupFile.inspect} found. */
export type BackupInspection =
  | { state: 'missing' }
  | {
      state: 'present';
      /** Length in bytes; 0 for an empty file (a fresh start). */
      size: number;
      /** Last modification: when the newest durable copy was taken. */
      mtimeMs: number;
      /** Bytes allocated on disk. */
      allocated: number;
      /** The snapshot configuration and valid slots, for a configured file. */
      slots: SlotState | undefined;
      /** The record shm-restore wrote with the file, verified; undefined when it has none. */
      record: BackupRecord | undefined;
    };

/**
 * The extended attribute in which the host records, with every backup it writes, what it
 * wrote: `v1 size=N region=M sha256-1m=HEX`, the file's length and a SHA-256 digest of
 * its first M bytes (see {@link BackupRecord.digest}). A valid snapshot file is covered
 * up to its tail (head page, slots and data ring: what decides which snapshots it holds;
 * the tail is the program's own, may be gigabytes, and is persisted every few hundred
 * milliseconds in restore-v1), any other file entirely. The format alone cannot tell a
 * damaged head that hides every snapshot from a file that has none, nor a file cut short
 * inside its tail from a whole one; this record can. One attribute, so size and digest are one statement about one content, set on the
 * temporary file before its fsync and rename, so atomic with the content; the version
 * lets a later host record more in the same place. The file's bytes stay exactly the
 * format's. Files written by anything else (`cp`, the Rust host, a file system without
 * user attributes) lack it and are not checked.
 */
export const CHECK_ATTRIBUTE = 'user.shmfd.check';

/** What {@link CHECK_ATTRIBUTE} says about a backup. */
export interface BackupRecord {
  /** Length of the file in bytes. */
  size: number;
  /** Bytes from the start of the file that the digest covers. */
  region: number;
  /**
   * SHA-256 over the SHA-256 of each 1 MiB block of the region in order (the last one may
   * be shorter), lowercase hex. Blocks make holes free: a block that lies in a hole is
   * known to be zeros and is not read, so the cost follows the data, as the copy's does.
   */
  digest: string;
}

const RECORD = /^v1 size=([0-9]+) region=([0-9]+) sha256-1m=([0-9a-f]{64})$/;

/** The record in {@link CHECK_ATTRIBUTE}, or why it cannot be one (strictly: decimal digits, no spaces). */
export function parseRecord(text: string): BackupRecord | string {
  const m = RECORD.exec(text);
  if (m === null) {
    return /^v[0-9]+ /.test(text) && !text.startsWith('v1 ')
      ? `is of a version this shm-restore does not know (${JSON.stringify(text)}; written by a newer one?)`
      : `is damaged: ${JSON.stringify(text)} is not "v1 size=N region=M sha256-1m=HEX"`;
  }
  const size = Number(m[1]);
  const region = Number(m[2]);
  if (!Number.isSafeInteger(size) || !Number.isSafeInteger(region)) return `is damaged: ${JSON.stringify(text)} holds numbers beyond 2^53`;
  if (region > size) return `is damaged: it covers ${region} bytes of a ${size}-byte file`;
  return { size, region, digest: m[3]! };
}

const DIGEST_BLOCK = 2 ** 20;
let zeroBlockDigest: Buffer | undefined;

function sha256(bytes: Uint8Array): Buffer {
  return crypto.createHash('sha256').update(bytes).digest();
}

function zerosDigest(length: number): Buffer {
  if (length !== DIGEST_BLOCK) return sha256(Buffer.alloc(length));
  zeroBlockDigest ??= sha256(Buffer.alloc(DIGEST_BLOCK));
  return zeroBlockDigest;
}

/** The digests of {@link BackupRecord.digest}'s blocks, each with the bytes read for it. */
function* blockDigests(fd: number, length: number): Generator<{ digest: Buffer; read: number }> {
  const extents = dataExtents(fd, length);
  const buffer = Buffer.allocUnsafe(Math.min(DIGEST_BLOCK, length));
  for (let start = 0, e = 0; start < length; start += DIGEST_BLOCK) {
    const end = Math.min(start + DIGEST_BLOCK, length);
    while (e < extents.length && extents[e]![1] <= start) e++;
    if (e === extents.length || extents[e]![0] >= end) {
      yield { digest: zerosDigest(end - start), read: 0 };
      continue;
    }
    // Short where the file ended early: the digest then differs.
    const n = readAt(fd, buffer, end - start, start);
    yield { digest: sha256(buffer.subarray(0, n)), read: n };
  }
}

function digestOf(fd: number, length: number): string {
  const hash = crypto.createHash('sha256');
  for (const block of blockDigests(fd, length)) hash.update(block.digest);
  return hash.digest('hex');
}

/** What the record covers: everything before the tail of a valid snapshot file, all of any other file. */
function checkedRegion(fd: number, size: number): number {
  try {
    return readHead(fd, size)?.head.tailStart ?? size;
  } catch (err) {
    if (err instanceof SnapshotFormatError) return size;
    throw err;
  }
}

/**
 * Records in {@link CHECK_ATTRIBUTE} of a backup being written, whose first `size` bytes
 * are final, its size and digest, read back from the file itself; a no-op where the file
 * system keeps no user attributes. Yields to the event loop as the copy does, and stops
 * there when `signal` is aborted.
 */
export async function recordBackupCheck(fd: number, size: number, signal?: AbortSignal): Promise<void> {
  const region = checkedRegion(fd, size);
  const hash = crypto.createHash('sha256');
  let sinceYield = 0;
  for (const block of blockDigests(fd, region)) {
    hash.update(block.digest);
    sinceYield += block.read;
    if (sinceYield >= CHUNK) {
      sinceYield = 0;
      await yieldToLoop();
      signal?.throwIfAborted();
    }
  }
  setXattr(fd, CHECK_ATTRIBUTE, recordText(size, region, hash.digest('hex')));
}

function recordText(size: number, region: number, digest: string): string {
  return `v1 size=${size} region=${region} sha256-1m=${digest}`;
}

/**
 * The {@link CHECK_ATTRIBUTE} record of a file of `size` bytes whose checked region (its
 * first `region.length` bytes) is `region`: what an in-place round sets, computed from the
 * bytes it writes rather than read back.
 */
export function recordOfRegion(size: number, region: Uint8Array): string {
  const hash = crypto.createHash('sha256');
  for (let start = 0; start < region.length; start += DIGEST_BLOCK) {
    hash.update(sha256(region.subarray(start, Math.min(start + DIGEST_BLOCK, region.length))));
  }
  return recordText(size, region.length, hash.digest('hex'));
}

/**
 * A backup that no longer matches the record shm-restore wrote with it, whose record is
 * unreadable, or (restore-v1) that shows no snapshot and has no record to vouch for it:
 * `ERR_BACKUP_DAMAGED`.
 */
export class BackupDamagedError extends ShmfdError {
  /** The problem and the way to proceed anyway, without the file's name. */
  readonly problem: string;

  constructor(file: string, problem: string) {
    super('ERR_BACKUP_DAMAGED', `backup ${file}: ${problem}`);
    this.problem = problem;
  }
}

/** `word` as one word of a POSIX shell command line. */
function shellWord(word: string): string {
  return /^[\w@%+=:,./-]+$/.test(word) ? word : `'${word.replace(/'/g, `'\\''`)}'`;
}

/**
 * What the backup on disk holds, for the lines that say what a failed write left:
 * `previous`, an earlier state than the memory's; `torn`, that earlier state once its
 * journal is applied (an in-place round's writes into it failed, so the file alone is not
 * a state); `newest`, the memory's newest snapshot (a round in place after the program
 * exited, `Snapshotter.finish`).
 */
export type BackupState = 'previous' | 'torn' | 'newest';

/** The backup file named on the command line. */
export class BackupFile {
  /** The file that is read and replaced (a symbolic link is followed to its target). */
  readonly path: string;
  /** Its directory, where temporary files are written. */
  readonly dir: string;
  /** Its name within {@link dir}. */
  readonly base: string;
  readonly #tempPrefix: string;

  constructor(file: string) {
    let resolved = path.resolve(file);
    try {
      // Replacing a symbolic link by rename would cut it; replace what it points to.
      if (fs.lstatSync(resolved).isSymbolicLink()) resolved = fs.realpathSync(resolved);
    } catch {
      // Missing or dangling: it is created (or replaced) where it was named.
    }
    this.path = resolved;
    this.dir = path.dirname(resolved);
    this.base = path.basename(resolved);
    this.#tempPrefix = `.${this.base}.tmp-`;
  }

  /** The journal of in-place rounds, `.BACKUP.journal` beside the backup (docs/restore.md). */
  get journalPath(): string {
    return path.join(this.dir, `.${this.base}.journal`);
  }

  /** A fresh, unused-looking name for a temporary file next to the backup. */
  tempPath(): string {
    return path.join(this.dir, `${this.#tempPrefix}${crypto.randomBytes(6).toString('hex')}`);
  }

  /**
   * Gives a file this host has just created beside the backup (exclusively: the next
   * backup, the journal, the lock file) the backup's owner and group, when this host runs
   * as root. A root host on a service's backup is an administrator's one-off run; the
   * service, run as its own user, must still open every file afterwards. Any other host
   * creates files it owns, as whoever may write the backup may. Failing to change the owner
   * (a file system that refuses it, an id unmapped in a user namespace) leaves the file as
   * it was created, and stops nothing: the file is there, only root's.
   * @param fd a file created here with `O_EXCL`, never one that was already there: a hard
   *   link left in the directory must not be handed to anyone
   * @returns the backup's status as read for this, if it exists
   */
  giveToOwner(fd: number): fs.Stats | undefined {
    const backup = fs.statSync(this.path, { throwIfNoEntry: false });
    if (backup === undefined || process.geteuid?.() !== 0) return backup;
    try {
      fs.fchownSync(fd, backup.uid, backup.gid);
    } catch {
      // As documented above: the file stays root's.
    }
    return backup;
  }

  /**
   * Whether this host may write into `file`, a file found beside the backup (its lock
   * file, its journal) rather than created here: a regular file with no other name (a hard
   * link would carry the bytes into another file, in a root host any file of root's),
   * owned by this host's user or the backup's (a file someone else made there in advance,
   * in a directory others may write, would hand them what is written).
   */
  mayWriteInto(file: fs.Stats): boolean {
    const owners = [process.geteuid?.(), fs.statSync(this.path, { throwIfNoEntry: false })?.uid];
    return file.isFile() && file.nlink === 1 && owners.includes(file.uid);
  }

  /**
   * Gives the next backup, a file created here with `O_EXCL` and about to be renamed over
   * the backup, what it must keep of the file it replaces: its permission bits (0600 for
   * a first backup) and, in a root host, its owner ({@link giveToOwner}). Read from the
   * backup as it is now, so that a `chmod` while the host runs is kept too.
   */
  async giveAttributes(next: fs.promises.FileHandle): Promise<void> {
    // Owner first: a change of owner clears the set-id bits that the mode may restore.
    const backup = this.giveToOwner(next.fd);
    const mode = backup === undefined ? 0o600 : backup.mode & 0o7777;
    if (mode !== 0o600) await next.chmod(mode);
  }

  /** True for names of this backup's temporary files. */
  isTempName(name: string): boolean {
    return name.startsWith(this.#tempPrefix) && /^[0-9a-f]+$/.test(name.slice(this.#tempPrefix.length));
  }

  /**
   * Reads what the backup is, without changing it (opened read-only: same bytes, same
   * mtime), and verifies it against its {@link CHECK_ATTRIBUTE} record if it has one.
   * @throws ShmfdError `ERR_BACKUP_ACCESS` (unreadable, a directory, not a regular file),
   *   `ERR_BACKUP_INVALID` (with format `'snapshot'`: not a valid snapshot file),
   *   {@link BackupDamagedError} `ERR_BACKUP_DAMAGED` (changed since shm-restore wrote it,
   *   a damaged record; with format `'snapshot'`: no valid snapshot and no record)
   */
  inspect(format: BackupFormat): BackupInspection {
    let fd: number;
    try {
      fd = fs.openSync(this.path, fs.constants.O_RDONLY | fs.constants.O_NOFOLLOW | fs.constants.O_NONBLOCK);
    } catch (err) {
      if (isSystemError(err, 'ENOENT')) return { state: 'missing' };
      if (isSystemError(err, 'EISDIR')) throw this.#error('ERR_BACKUP_ACCESS', 'is a directory');
      if (isSystemError(err, 'ELOOP')) throw this.#error('ERR_BACKUP_ACCESS', 'is a symbolic link to nothing');
      throw this.#error('ERR_BACKUP_ACCESS', `cannot open it: ${describeError(err)}`);
    }
    try {
      const stat = fs.fstatSync(fd);
      if (stat.isDirectory()) throw this.#error('ERR_BACKUP_ACCESS', 'is a directory');
      if (!stat.isFile()) throw this.#error('ERR_BACKUP_ACCESS', 'is not a regular file');
      const record = this.#verifyRecord(fd, stat.size);
      let slots: SlotState | undefined;
      if (stat.size > 0) {
        try {
          slots = readSlotState(fd, stat.size);
        } catch (err) {
          if (err instanceof SnapshotFormatError) {
            if (format === 'snapshot') throw this.#error('ERR_BACKUP_INVALID', `not a valid snapshot file: ${err.message}`);
          } else {
            throw this.#error('ERR_BACKUP_ACCESS', `cannot read it: ${describeError(err)}`);
          }
        }
        if (slots === undefined && format === 'snapshot') {
          throw this.#error(
            'ERR_BACKUP_INVALID',
            'not a snapshot file: its head lacks the snapshot magic (written without --snapshot, or not a backup at all)',
          );
        }
        // Restoring it would start the program fresh, and the first snapshot would replace
        // the file: a flipped bit in write_offset or a mask must not cost the whole state.
        // A restore-v1 host writes no snapshot file without a valid snapshot.
        if (format === 'snapshot' && slots !== undefined && slots.slots.length === 0 && !(record !== undefined && record.region >= slots.head.dataStart)) {
          throw new BackupDamagedError(
            this.path,
            `holds no valid snapshot though it has the snapshot magic, and no ${CHECK_ATTRIBUTE} record vouches for it: damaged, or not written by a restore-v1 host ` +
              `(to start fresh anyway, move it aside: mv ${shellWord(this.path)} ${shellWord(`${this.path}.damaged`)})`,
          );
        }
      }
      return {
        state: 'present',
        size: stat.size,
        mtimeMs: stat.mtimeMs,
        allocated: stat.blocks * 512,
        slots,
        record,
      };
    } finally {
      fs.closeSync(fd);
    }
  }

  /**
   * Proves that a replacement can be written: creates and removes a temporary file in the
   * backup's directory (`access(2)` would not see a read-only mount or a full quota).
   * @throws ShmfdError `ERR_BACKUP_ACCESS`
   */
  checkWritable(): void {
    const probe = this.tempPath();
    let fd: number;
    try {
      fd = fs.openSync(probe, fs.constants.O_WRONLY | fs.constants.O_CREAT | fs.constants.O_EXCL, 0o600);
    } catch (err) {
      throw new ShmfdError(
        'ERR_BACKUP_ACCESS',
        `backup ${this.path}: cannot create a temporary file in ${this.dir}: ${describeError(err)}`,
        { cause: err },
      );
    }
    fs.closeSync(fd);
    fs.unlinkSync(probe);
  }

  /**
   * Removes the temporary files a killed host left next to the backup.
   * @returns the names removed
   */
  removeLeftovers(): string[] {
    let names: string[];
    try {
      names = fs.readdirSync(this.dir);
    } catch {
      return [];
    }
    const removed: string[] = [];
    for (const name of names) {
      if (!this.isTempName(name)) continue;
      try {
        fs.unlinkSync(path.join(this.dir, name));
        removed.push(name);
      } catch (err) {
        if (!isSystemError(err, 'ENOENT')) throw err;
      }
    }
    return removed;
  }

  /**
   * Copies the backup into `dest` (a new, empty memory file), sparsely.
   * @returns the backup's size and what the copy did; size 0 when there is no backup
   */
  async restoreInto(dest: number, options: CopySparseOptions = {}): Promise<CopyResult & { size: number }> {
    let fd: number;
    try {
      fd = fs.openSync(this.path, fs.constants.O_RDONLY | fs.constants.O_NOFOLLOW);
    } catch (err) {
      if (isSystemError(err, 'ENOENT')) return { size: 0, copied: 0 };
      throw err;
    }
    try {
      const size = fs.fstatSync(fd).size;
      const result = await copySparse(fd, dest, size, options);
      return { ...result, size };
    } finally {
      fs.closeSync(fd);
    }
  }

  /**
   * What a failed write left at the backup's path, for its error line: the backup as it
   * was before the write (see {@link BackupState}), or what replaced it.
   */
  whatIsLeft(backup: BackupState = 'previous'): string {
    let stat: fs.Stats;
    try {
      stat = fs.statSync(this.path);
    } catch (err) {
      if (!isSystemError(err, 'ENOENT') && !isSystemError(err, 'ENOTDIR')) return `${this.path} cannot be checked: ${describeError(err)}`;
      return fs.existsSync(this.dir) ? `there is no backup at ${this.path}` : `there is no backup: its directory ${this.dir} was removed`;
    }
    if (stat.isFile() && backup === 'torn') {
      return `the backup on disk is the previous one once its journal ${this.journalPath} is applied, as the next start does (a copy of the backup alone is not a state)`;
    }
    if (stat.isFile() && backup === 'newest') return 'the backup on disk holds the newest state, written in place after the program exited';
    if (stat.isFile()) return 'the backup on disk is the previous one';
    return `there is no backup: ${this.path} is now ${stat.isDirectory() ? 'a directory' : 'not a regular file'}`;
  }

  /** The verified record of the file open at `fd`, or undefined when it has none. */
  #verifyRecord(fd: number, size: number): BackupRecord | undefined {
    let text: string | undefined;
    try {
      text = getXattr(fd, CHECK_ATTRIBUTE);
    } catch (err) {
      throw this.#error('ERR_BACKUP_ACCESS', `cannot read its ${CHECK_ATTRIBUTE} attribute: ${describeError(err)}`);
    }
    if (text === undefined) return undefined;
    // cp keeps no extended attributes (unless -a or --preserve=xattr); setfattr would need Debian's attr package.
    const anyway = `to restore it anyway, drop the record: cp ${shellWord(this.path)} ${shellWord(`${this.path}.unchecked`)} && mv ${shellWord(`${this.path}.unchecked`)} ${shellWord(this.path)}`;
    const record = parseRecord(text);
    if (typeof record === 'string') throw new BackupDamagedError(this.path, `its ${CHECK_ATTRIBUTE} attribute ${record} (${anyway})`);
    if (record.size !== size) {
      throw new BackupDamagedError(this.path, `is ${size} bytes, but shm-restore wrote ${record.size} bytes: it was cut short or extended since (${anyway})`);
    }
    let digest: string;
    try {
      digest = digestOf(fd, record.region);
    } catch (err) {
      throw this.#error('ERR_BACKUP_ACCESS', `cannot read it: ${describeError(err)}`);
    }
    if (digest !== record.digest) {
      throw new BackupDamagedError(
        this.path,
        `changed since shm-restore wrote it: its first ${record.region} bytes no longer match the digest recorded in ${CHECK_ATTRIBUTE} (${anyway})`,
      );
    }
    return record;
  }

  #error(code: 'ERR_BACKUP_ACCESS' | 'ERR_BACKUP_INVALID', problem: string): ShmfdError {
    return new ShmfdError(code, `backup ${this.path}: ${problem}`);
  }
}
