/**
 * The journal of incremental restore-v1 rounds (docs/restore.md, "Incremental rounds"):
 * before a round writes changed pages into the backup in place, it writes them to
 * `.BACKUP.journal` beside it and makes that durable; a crash during the in-place writes
 * is then repaired at the next start by replaying the journal, and a journal that is not
 * complete (its checksum fails) was never applied and is discarded.
 *
 * Layout (little-endian): the 8-byte magic `shmfdjnl`, u32 version 1, u32 number of runs,
 * u64 sequence, u64 inode of the backup it applies to, u64 size of the backup before the
 * round, u64 size after it, u64 total length of the journal, u32 length of the integrity
 * record text, u32 0, the record text padded with zeros to a multiple of 8, then each run
 * as u64 file offset and u64 length, then the runs' bytes in that order, then the SHA-256
 * of everything before it. The journal file is written over in place by the next round;
 * bytes after its total length mean nothing. Once its round is durable in the backup, its
 * magic is overwritten with `shmfdnil`: a spent journal, which nothing replays.
 * @module
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import type { Log } from '../base/log.js';
import { BackupDamagedError, CHECK_ATTRIBUTE, parseRecord, recordOfRegion, type BackupFile, type BackupInspection } from './backup.js';
import { SnapshotFormatError } from '../snapshot/errors.js';
import { parseHead, readSlots, slotPosition } from '../snapshot/format.js';
import type { SlotState } from '../snapshot/pread.js';
import { isSystemError, setXattr } from '../system/libc.js';
import { removeJournal, syncDirectory } from './persist.js';

const MAGIC = Buffer.from('shmfdjnl');
const SPENT = Buffer.from('shmfdnil');
const VERSION = 1;
const FIXED = 56;
const DIGEST = 32;

/** One incremental round, as journaled and applied. */
export interface JournalRound {
  /** Number of the round, for the logs. */
  sequence: number;
  /** Inode of the backup the round applies to. */
  inode: number;
  /** The backup's size before the round. */
  baseSize: number;
  /** The backup's size after it. */
  size: number;
  /** The integrity record to set (empty: none). */
  record: string;
  /** Bytes to write at each file offset, in order. */
  runs: { offset: number; data: Buffer }[];
}

function encode(round: JournalRound): Buffer[] {
  const record = Buffer.from(round.record);
  const table = FIXED + 8 + Math.ceil(record.length / 8) * 8;
  const head = Buffer.alloc(table + 16 * round.runs.length);
  const dataBytes = round.runs.reduce((sum, r) => sum + r.data.length, 0);
  MAGIC.copy(head, 0);
  head.writeUInt32LE(VERSION, 8);
  head.writeUInt32LE(round.runs.length, 12);
  head.writeBigUInt64LE(BigInt(round.sequence), 16);
  head.writeBigUInt64LE(BigInt(round.inode), 24);
  head.writeBigUInt64LE(BigInt(round.baseSize), 32);
  head.writeBigUInt64LE(BigInt(round.size), 40);
  head.writeBigUInt64LE(BigInt(head.length + dataBytes + DIGEST), 48);
  head.writeUInt32LE(record.length, FIXED);
  record.copy(head, FIXED + 8);
  round.runs.forEach((r, i) => {
    head.writeBigUInt64LE(BigInt(r.offset), table + 16 * i);
    head.writeBigUInt64LE(BigInt(r.data.length), table + 16 * i + 8);
  });
  const parts: Buffer[] = [head];
  // Runs read into one buffer, one after the other, are written (and hashed) as one part.
  let last: Buffer | undefined;
  for (const { data } of round.runs) {
    if (last !== undefined && data.buffer === last.buffer && data.byteOffset === last.byteOffset + last.length) {
      last = Buffer.from(last.buffer, last.byteOffset, last.length + data.length);
      parts[parts.length - 1] = last;
    } else {
      parts.push(data);
      last = data;
    }
  }
  const hash = crypto.createHash('sha256');
  for (const p of parts) hash.update(p);
  parts.push(hash.digest());
  return parts;
}

/**
 * Opens the journal file for writing rounds, creating it (and making its name durable)
 * when there is none to write over. The descriptor serves every round until a whole copy
 * removes the file.
 */
export async function openJournal(backup: BackupFile): Promise<number> {
  const existing = openOwnJournal(backup);
  if (existing !== undefined) return existing;
  // Whatever else has the name is removed, not written through.
  await removeJournal(backup);
  const fd = fs.openSync(backup.journalPath, fs.constants.O_WRONLY | fs.constants.O_CREAT | fs.constants.O_EXCL | fs.constants.O_NOFOLLOW, 0o600);
  try {
    backup.giveToOwner(fd);
    await syncDirectory(backup.dir);
  } catch (err) {
    fs.closeSync(fd);
    throw err;
  }
  return fd;
}

/**
 * The file at the journal's name, open for writing, when a round may write over it
 * ({@link BackupFile.mayWriteInto}): its blocks are then reused, which a full disk may
 * need. Undefined for anything else, or nothing.
 */
function openOwnJournal(backup: BackupFile): number | undefined {
  let fd: number;
  try {
    // Non-blocking: opening a FIFO for writing would wait for a reader.
    fd = fs.openSync(backup.journalPath, fs.constants.O_WRONLY | fs.constants.O_NOFOLLOW | fs.constants.O_NONBLOCK);
  } catch {
    return undefined;
  }
  let own = false;
  try {
    own = backup.mayWriteInto(fs.fstatSync(fd));
  } finally {
    if (!own) fs.closeSync(fd);
  }
  return own ? fd : undefined;
}

/**
 * Writes `round` over the journal open at `fd` and makes it durable; only then may the
 * round be applied to the backup. `fdatasync`: the journal's data and length are what a
 * replay needs, its timestamps are not.
 */
export async function writeJournal(fd: number, round: JournalRound): Promise<void> {
  let at = 0;
  for (const part of encode(round)) {
    let done = 0;
    while (done < part.length) done += fs.writeSync(fd, part, done, part.length - done, at + done);
    at += part.length;
  }
  await syncFile(fd, true);
}

/**
 * Marks the journal open at `fd` spent, once its round is durable in the backup. A host
 * killed between rounds then leaves nothing to replay: were the backup put back by hand
 * before the next start (`cp` keeps its inode), the last round's pages would be written
 * into another state. Not synced: until it is, a replay writes what the backup already
 * holds.
 */
export function spendJournal(fd: number): void {
  fs.writeSync(fd, SPENT, 0, SPENT.length, 0);
}

/** Writes `round` into the backup open at `fd` in place, sets its record, and syncs it. */
export async function applyRound(fd: number, round: JournalRound): Promise<void> {
  writeRound(fd, round);
  await syncFile(fd);
}

/** Writes `round` into the backup open at `fd` in place and sets its record; not synced. */
export function writeRound(fd: number, round: JournalRound): void {
  if (fs.fstatSync(fd).size !== round.size) fs.ftruncateSync(fd, round.size);
  for (const r of round.runs) {
    let done = 0;
    while (done < r.data.length) done += fs.writeSync(fd, r.data, done, r.data.length - done, r.offset + done);
  }
  if (round.record !== '') setXattr(fd, CHECK_ATTRIBUTE, round.record);
}

/** `fsync(2)` of `fd` on the thread pool; `fdatasync(2)` with `dataOnly`. */
export function syncFile(fd: number, dataOnly = false): Promise<void> {
  const sync = dataOnly ? fs.fdatasync : fs.fsync;
  return new Promise<void>((resolve, reject) => sync(fd, (err) => (err === null ? resolve() : reject(err))));
}

/** The round in the journal at `file`, or why there is none to replay; undefined when there is no journal, or a spent one. */
export function readJournal(file: string): JournalRound | { problem: string } | undefined {
  let bytes: Buffer;
  try {
    bytes = fs.readFileSync(file);
  } catch (err) {
    if (isSystemError(err, 'ENOENT')) return undefined;
    throw err;
  }
  if (bytes.subarray(0, 8).equals(SPENT)) return undefined;
  if (bytes.length < FIXED + 8 + DIGEST || !bytes.subarray(0, 8).equals(MAGIC)) return { problem: 'it is incomplete (no journal header)' };
  if (bytes.readUInt32LE(8) !== VERSION) return { problem: `its version ${bytes.readUInt32LE(8)} is unknown` };
  const total = Number(bytes.readBigUInt64LE(48));
  if (!Number.isSafeInteger(total) || total > bytes.length || total < FIXED + 8 + DIGEST) return { problem: 'it is incomplete (shorter than its header says)' };
  const digest = crypto.createHash('sha256').update(bytes.subarray(0, total - DIGEST)).digest();
  if (!digest.equals(bytes.subarray(total - DIGEST, total))) return { problem: 'it is incomplete (its checksum does not match)' };
  const count = bytes.readUInt32LE(12);
  const recordLength = bytes.readUInt32LE(FIXED);
  const record = bytes.toString('utf8', FIXED + 8, FIXED + 8 + recordLength);
  let table = FIXED + 8 + Math.ceil(recordLength / 8) * 8;
  let data = table + 16 * count;
  const runs: JournalRound['runs'] = [];
  for (let i = 0; i < count; i++, table += 16) {
    const offset = Number(bytes.readBigUInt64LE(table));
    const length = Number(bytes.readBigUInt64LE(table + 8));
    runs.push({ offset, data: bytes.subarray(data, data + length) });
    data += length;
  }
  return {
    sequence: Number(bytes.readBigUInt64LE(16)),
    inode: Number(bytes.readBigUInt64LE(24)),
    baseSize: Number(bytes.readBigUInt64LE(32)),
    size: Number(bytes.readBigUInt64LE(40)),
    record,
    runs,
  };
}

/**
 * Why a start would not apply the complete journal `round` to `backup`, whose status is
 * `stat` (undefined: there is none); undefined when it would.
 */
export function whyNotApplied(round: JournalRound, backup: BackupFile, stat: fs.Stats | undefined): string | undefined {
  if (stat === undefined) return `there is no backup ${backup.path} to apply it to`;
  if (stat.ino !== round.inode) return `it belongs to another file (inode ${round.inode}; the backup was replaced since)`;
  if (stat.size !== round.baseSize && stat.size !== round.size) return `the backup has ${stat.size} bytes, neither the ${round.baseSize} before the round nor the ${round.size} after it`;
  return undefined;
}

/**
 * The backup whose status is `stat` as applying the complete `round` will leave it, read
 * from the journal alone, without writing: a round's first run is the whole checked region
 * (head page, slots and data ring), and it carries the record it sets. The backup may be
 * torn until then, and checking it as it is would call it damaged. `durableAtMs`: when the
 * journal, and so the round, became durable.
 */
export function inspectApplied(round: JournalRound, backup: BackupFile, stat: fs.Stats, durableAtMs: number): BackupInspection {
  const region = round.runs[0]?.offset === 0 ? round.runs[0].data : undefined;
  const record = round.record === '' ? undefined : parseRecord(round.record);
  // As a host checks the backup once it applied the round.
  if (record !== undefined && (typeof record === 'string' || region === undefined || recordOfRegion(round.size, region) !== round.record)) {
    throw new BackupDamagedError(backup.path, `its journal's round does not match the ${CHECK_ATTRIBUTE} record it sets: a host applies it, then refuses the backup`);
  }
  let slots: SlotState | undefined;
  if (region !== undefined) {
    try {
      const head = parseHead(region, round.size);
      if (head !== undefined && slotPosition(head.entries) <= region.length) slots = { head, slots: readSlots(region, head), bytes: region };
    } catch (err) {
      if (!(err instanceof SnapshotFormatError)) throw err;
    }
  }
  return {
    state: 'present',
    size: round.size,
    mtimeMs: durableAtMs,
    allocated: stat.blocks * 512,
    slots,
    record,
  };
}

/** What {@link replayJournal} did. */
export type ReplayOutcome = { action: 'none' } | { action: 'replayed'; round: JournalRound } | { action: 'discarded'; problem: string };

/**
 * At start, under the backup's lock and before the backup is read (by the host, or by a
 * replica deciding which state is newer): a complete journal for this backup is applied
 * (again: applying a round twice writes the same bytes), an incomplete one was never
 * applied and is dropped; either way the journal is then removed durably, and `log` told.
 */
export async function replayJournal(backup: BackupFile, log: Log): Promise<ReplayOutcome> {
  const outcome = await replay(backup);
  if (outcome.action === 'replayed') log.info(`applied the journal of round ${outcome.round.sequence} to ${backup.path}: the host was stopped while writing it in place`);
  if (outcome.action === 'discarded') log.info(`discarded the journal ${backup.journalPath}: ${outcome.problem}`);
  return outcome;
}

async function replay(backup: BackupFile): Promise<ReplayOutcome> {
  const found = readJournal(backup.journalPath);
  if (found === undefined) return { action: 'none' };
  let outcome: ReplayOutcome;
  if ('problem' in found) {
    outcome = { action: 'discarded', problem: found.problem };
  } else {
    let fd: number | undefined;
    try {
      fd = fs.openSync(backup.path, fs.constants.O_RDWR | fs.constants.O_NOFOLLOW);
    } catch (err) {
      if (!isSystemError(err, 'ENOENT')) throw err;
    }
    try {
      const problem = whyNotApplied(found, backup, fd === undefined ? undefined : fs.fstatSync(fd));
      if (problem !== undefined) {
        outcome = { action: 'discarded', problem };
      } else {
        // Without a file there is a problem.
        await applyRound(fd!, found);
        outcome = { action: 'replayed', round: found };
      }
    } finally {
      if (fd !== undefined) fs.closeSync(fd);
    }
  }
  if (await removeJournal(backup)) await syncDirectory(backup.dir);
  return outcome;
}
