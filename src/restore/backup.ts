/**
 * The backup file of the restore host: where it lives, whether it can be trusted, its
 * temporary siblings, and restoring it into a memory file.
 * @module
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import util from 'node:util';
import { ShmfdError } from '../errors.js';
import { SnapshotFormatError } from '../snapshot/errors.js';
import { getXattr, isSystemError, setXattr } from '../system.js';
import { copySparse, type CopyResult, type CopySparseOptions } from './copy.js';
import { readSlotState, type SlotState } from './slots.js';

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
      /** Permission bits, kept for the files that replace it. */
      mode: number;
      /** Bytes allocated on disk. */
      allocated: number;
      /** The snapshot configuration and valid slots, for a configured file. */
      slots: SlotState | undefined;
    };

/**
 * The extended attribute in which the host records the size of every backup it writes,
 * atomically with the content (set before the fsync and the rename). The snapshot format
 * cannot tell a file cut short inside the program's own data (the tail) from a whole one;
 * this attribute can. Files written by anything else lack it and are not checked.
 */
export const SIZE_ATTRIBUTE = 'user.shmfd.size';

/** Records `size` in {@link SIZE_ATTRIBUTE} of a backup being written; a no-op where the file system keeps no user attributes. */
export function recordBackupSize(fd: number, size: number): void {
  setXattr(fd, SIZE_ATTRIBUTE, String(size));
}

/** One line about a failed system call: `permission denied (EACCES)`. */
export function describeSystemError(err: unknown): string {
  if (isSystemError(err)) {
    const errno = typeof err.errno === 'number' ? err.errno : undefined;
    const text = errno === undefined ? undefined : util.getSystemErrorMap().get(errno < 0 ? errno : -errno)?.[1];
    return text === undefined ? err.code : `${text} (${err.code})`;
  }
  return err instanceof Error ? err.message : String(err);
}

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

  /** A fresh, unused-looking name for a temporary file next to the backup. */
  tempPath(): string {
    return path.join(this.dir, `${this.#tempPrefix}${crypto.randomBytes(6).toString('hex')}`);
  }

  /** True for names of this backup's temporary files. */
  isTempName(name: string): boolean {
    return name.startsWith(this.#tempPrefix) && /^[0-9a-f]+$/.test(name.slice(this.#tempPrefix.length));
  }

  /**
   * Reads what the backup is, without changing it (opened read-only: same bytes, same mtime).
   * @throws ShmfdError `ERR_BACKUP_ACCESS` (unreadable, a directory, not a regular file),
   *   `ERR_BACKUP_INVALID` (with format `'snapshot'`: not a valid snapshot file)
   */
  inspect(format: BackupFormat): BackupInspection {
    let fd: number;
    try {
      fd = fs.openSync(this.path, fs.constants.O_RDONLY | fs.constants.O_NOFOLLOW | fs.constants.O_NONBLOCK);
    } catch (err) {
      if (isSystemError(err, 'ENOENT')) return { state: 'missing' };
      if (isSystemError(err, 'EISDIR')) throw this.#error('ERR_BACKUP_ACCESS', 'is a directory');
      if (isSystemError(err, 'ELOOP')) throw this.#error('ERR_BACKUP_ACCESS', 'is a symbolic link to nothing');
      throw this.#error('ERR_BACKUP_ACCESS', `cannot open it: ${describeSystemError(err)}`);
    }
    try {
      const stat = fs.fstatSync(fd);
      if (stat.isDirectory()) throw this.#error('ERR_BACKUP_ACCESS', 'is a directory');
      if (!stat.isFile()) throw this.#error('ERR_BACKUP_ACCESS', 'is not a regular file');
      this.#checkRecordedSize(fd, stat.size);
      let slots: SlotState | undefined;
      if (stat.size > 0) {
        try {
          slots = readSlotState(fd, stat.size);
        } catch (err) {
          if (err instanceof SnapshotFormatError) {
            if (format === 'snapshot') throw this.#error('ERR_BACKUP_INVALID', `not a valid snapshot file: ${err.message}`);
          } else {
            throw this.#error('ERR_BACKUP_ACCESS', `cannot read it: ${describeSystemError(err)}`);
          }
        }
        if (slots === undefined && format === 'snapshot') {
          throw this.#error(
            'ERR_BACKUP_INVALID',
            'not a snapshot file: its head lacks the snapshot magic (written without --snapshot, or not a backup at all)',
          );
        }
      }
      return {
        state: 'present',
        size: stat.size,
        mtimeMs: stat.mtimeMs,
        mode: stat.mode & 0o7777,
        allocated: stat.blocks * 512,
        slots,
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
        `backup ${this.path}: cannot create a temporary file in ${this.dir}: ${describeSystemError(err)}`,
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

  #checkRecordedSize(fd: number, size: number): void {
    let recorded: string | undefined;
    try {
      recorded = getXattr(fd, SIZE_ATTRIBUTE);
    } catch (err) {
      throw this.#error('ERR_BACKUP_ACCESS', `cannot read its ${SIZE_ATTRIBUTE} attribute: ${describeSystemError(err)}`);
    }
    if (recorded === undefined || Number(recorded) === size) return;
    const expected = /^\d+$/.test(recorded) ? `${recorded} bytes` : `the unreadable size ${JSON.stringify(recorded)}`;
    throw this.#error(
      'ERR_BACKUP_INVALID',
      `is ${size} bytes, but shm-restore wrote ${expected}: it was cut short or extended since (to restore it anyway: setfattr -x ${SIZE_ATTRIBUTE} ${this.path})`,
    );
  }

  #error(code: 'ERR_BACKUP_ACCESS' | 'ERR_BACKUP_INVALID', problem: string): ShmfdError {
    return new ShmfdError(code, `backup ${this.path}: ${problem}`);
  }
}
