/**
 * `shm-restore status BACKUP`: what a backup holds and how old it is, read-only.
 * @module
 */
import fs from 'node:fs';
import { BackupDamagedError, BackupFile, CHECK_ATTRIBUTE, type BackupFormat, type BackupInspection } from './backup.js';
import { formatBytes, formatDuration } from './progress.js';
import { newestSlot } from '../snapshot/pread.js';
import { inspectApplied, readJournal, whyNotApplied, type JournalRound } from './journal.js';

/** Facts about a backup, one `key: value` line each. */
export interface BackupStatus {
  /** False for a missing, unreadable or invalid backup. */
  ok: boolean;
  lines: string[];
}

/**
 * Describes the backup at `file` without changing it. A file without the snapshot magic
 * is a raw memory image, valid only when `format` is `'raw'`; a damaged one
 * (`ERR_BACKUP_DAMAGED`, refused by a host) is described as such.
 * @throws ShmfdError `ERR_BACKUP_ACCESS`, `ERR_BACKUP_INVALID` for an unusable backup
 */
export function backupStatus(file: string, format: BackupFormat, now: number = Date.now()): BackupStatus {
  const backup = new BackupFile(file);
  const lines = [`backup: ${backup.path}`];
  // A host killed during an in-place round leaves the backup to be finished from it. The
  // facts are those of the backup as the next start finds it, after it decides.
  const journal = readJournal(backup.journalPath);
  let applied: { round: JournalRound; stat: fs.Stats } | undefined;
  if (journal !== undefined) {
    const stat = fs.lstatSync(backup.path, { throwIfNoEntry: false });
    const problem = 'problem' in journal ? journal.problem : whyNotApplied(journal, backup, stat);
    if (problem === undefined && !('problem' in journal) && stat !== undefined) applied = { round: journal, stat };
    lines.push(
      applied === undefined
        ? `journal: ${backup.journalPath}: ${problem}; a host discards it at start`
        : `journal: ${backup.journalPath}: round ${applied.round.sequence}, complete; a host applies it at start (the facts below are of the backup with it applied)`,
    );
  }
  let found: BackupInspection;
  try {
    found = applied === undefined ? backup.inspect(format) : inspectApplied(applied.round, backup, applied.stat, journalTime(backup, applied.stat));
  } catch (err) {
    if (!(err instanceof BackupDamagedError)) throw err;
    lines.push(`state: damaged: ${err.problem}`);
    return { ok: false, lines };
  }
  if (found.state === 'missing') {
    lines.push('state: missing (a host would start fresh)');
    return { ok: false, lines };
  }
  const age = formatDuration(Math.max(0, now - found.mtimeMs));
  const written = new Date(found.mtimeMs).toISOString();
  lines.push(`backup size: ${found.size} bytes (${formatBytes(found.size)}), ${formatBytes(found.allocated)} on disk`);
  lines.push(
    found.record === undefined
      ? `integrity record: none (no ${CHECK_ATTRIBUTE}: not written by shm-restore, or its file system keeps no user attributes)`
      : `integrity record: verified (size, and digest of the first ${found.record.region} bytes)`,
  );
  if (found.size === 0) {
    lines.push('state: empty (a host would start fresh)', 'snapshots: 0');
  } else if (found.slots === undefined) {
    lines.push('state: raw memory image (not a snapshot file)', 'snapshots: 0', `written: ${age} ago (${written})`);
  } else {
    const { head, slots } = found.slots;
    const newest = newestSlot(slots);
    lines.push(
      `state: snapshot file (${head.entries} slots, ${head.data}-byte data ring, write offset ${head.writeOffset})`,
      `snapshots: ${slots.length}`,
    );
    if (newest !== undefined) {
      lines.push(`newest snapshot size: ${newest.length} bytes (slot ${newest.index}, stream position ${newest.offset})`);
      lines.push(`newest snapshot age: ${age} (durable since ${written})`);
    } else {
      lines.push(`written: ${age} ago (${written})`);
    }
  }
  return { ok: true, lines };
}

/**
 * When the round in the journal became durable: the journal's last write. A host that
 * starts meanwhile removes the journal once applied; then the backup's last write as found.
 */
function journalTime(backup: BackupFile, stat: fs.Stats): number {
  return fs.statSync(backup.journalPath, { throwIfNoEntry: false })?.mtimeMs ?? stat.mtimeMs;
}
