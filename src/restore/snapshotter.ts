/**
 * restore-v1: consistent snapshots of a live memory file while the program keeps
 * writing (restore.md). Each round reads the valid slots (A), copies the file, reads them
 * again (B), and keeps in the copy only the slots of A ∩ B: those were published before
 * the copy started and not invalidated before it ended, so their bytes in the copy are
 * intact. A copy with no such slot proves nothing and is dropped.
 *
 * No busy loop: rounds are paced by a timer, a round whose `write_offset` has not moved
 * since the last persisted backup costs one `fstat` and one `pread`, and a round never
 * overlaps another.
 * @module
 */
import fs from 'node:fs';
import type { Log } from '../base/log.js';
import { readAt } from '../base/read-at.js';
import { SnapshotFormatError } from '../snapshot/errors.js';
import { countValidSlots, MIN_FILE_LENGTH, PAGE, parseHead, type Snapshot, type SnapshotLayout } from '../snapshot/format.js';
import { DIRTY_MAX_BYTES, type DirtyPages } from '../fds/dirty-pages.js';
import { recordOfRegion, type BackupFile, type BackupState } from './backup.js';
import { applyRound, openJournal, spendJournal, syncFile, writeJournal, writeRound, type JournalRound } from './journal.js';
import { describeError, isSystemError } from '../system/libc.js';
import { CHUNK, yieldToLoop } from './copy.js';
import { directorySyncWarning, persistAtomically, refusedForRoom, type PersistFixup, type PersistResult } from './persist.js';
import { formatBytes, formatDuration, withProgress } from './progress.js';
import { intersectSlots, readHead, readSlotRegion, readSlotState, SlotTable, type SlotState } from '../snapshot/pread.js';

/**
 * Default pause between rounds, in milliseconds. A round that copies costs about 0.5 ms
 * of CPU per MB of data extents (copy, fsync, and freeing the replaced file); see
 * {@link Snapshotter} for how the pause stretches to keep a large state under a tenth
 * of a core.
 */
export const DEFAULT_INTERVAL_MS = 250;

/**
 * The pause after a round is at least this many times the CPU time the round took, so
 * that snapshots cost at most about 1 / (1 + factor) of a core (9 %) however large
 * the state is; a small state is snapshotted every interval.
 */
const PACING_FACTOR = 10;

/** CPU time (µs) that {@link besideRounds} kept out of the pacing, ever growing. */
let besideMicros = 0;

/**
 * Runs the synchronous `work` and keeps its CPU time out of the pacing of the rounds in
 * progress. A round is paced by the process's CPU time across it, and whatever else the
 * host's thread runs while the round awaits its I/O would count as the round's: work of
 * another kind (sending backups to a replica: reading, hashing, publishing) would then
 * slow the local backups down however cheap their own rounds are. Such work bounds its
 * own cost.
 */
export function besideRounds<T>(work: () => T): T {
  const before = process.cpuUsage();
  try {
    return work();
  } finally {
    const used = process.cpuUsage(before);
    besideMicros += used.user + used.system;
  }
}

/**
 * What one run of changed pages costs an in-place round, in bytes of a whole copy: a round
 * whose runs cost more than the file is copied whole. Measured on a 100 MB state with 16
 * random pages changed per 10 ms: about 100 KiB of sequential copy per scattered page.
 */
const RUN_COST_BYTES = 100 * 1024;

/** Bytes of memory and backup compared at a time when the pages that differ are looked for. */
const COMPARE_BYTES = 1 << 20;

/** Largest buffer an in-place round keeps for the next one (see `Snapshotter.#copyBuffer`). */
const KEEP_COPY_BUFFER = 64 << 20;

/** Copies discarded in a row before a warning says that no snapshot is being made durable. */
const DISCARDS_BEFORE_WARNING = 5;

/** The newest backup this host made durable. */
export interface DurableSnapshot {
  /** When its slots were read, before the copy (ms since the epoch): its data is at least this old. */
  takenAt: number;
  /** `write_offset` of the memory at that moment. */
  writeOffset: number;
  /** Snapshots kept in it. */
  count: number;
  /** The newest of them. */
  newest: Snapshot | undefined;
  /** Size of the backup file. */
  size: number;
  /** Whether the round wrote only the changed pages in place (through the journal), rather than a whole new file. */
  incremental: boolean;
  /** The byte ranges `[offset, length]` an in-place round wrote; everything else is as the round before left it. */
  changed?: [number, number][];
}

/** What one round did. */
export type RoundOutcome = 'persisted' | 'unchanged' | 'not-ready' | 'discarded' | 'failed' | 'aborted';

/**
 * Which rounds may be taken: `timed` copies whole or in place as the marks decide;
 * `in-place` only in place (not-ready otherwise); `differences` in place, with the pages
 * found by comparing the memory with the backup instead of by marks.
 */
type RoundKind = 'timed' | 'in-place' | 'differences';

/** Options of {@link Snapshotter}. */
export interface SnapshotterOptions {
  /** Descriptor of the live memory file (read with pread and sendfile only, never mapped). */
  memoryFd: number;
  backup: BackupFile;
  intervalMs?: number;
  log: Log;
  /** `write_offset` of the backup on disk, so an unchanged memory is not copied again. */
  baselineWriteOffset?: number;
  /** Show progress of slow copies on a terminal. */
  progress?: boolean;
  /**
   * Called after each round that made a backup durable, whole or incremental: the one
   * place to hook what follows durability (e.g. shipping the backup elsewhere).
   */
  onPersisted?: (snapshot: DurableSnapshot, result: PersistResult) => void;
  /** Told when each round begins and ends, for readers of the backup that must not overlap one. */
  gate?: RoundGate;
  /**
   * The dirty-page map passed to the program. When the program sets its tracking flag,
   * rounds copy only the marked pages and apply them to the backup in place.
   */
  dirtyPages?: DirtyPages;
  /**
   * The backup on disk holds exactly the memory as the program found it (the host restored
   * the memory from it): rounds may be incremental from the start. Otherwise the first
   * durable round is a whole copy.
   */
  backupMatchesMemory?: boolean;
}

/** The snapshots a checked copy keeps. */
interface Kept {
  count: number;
  newest: Snapshot | undefined;
}

/** The slots of a file now, or undefined when it is not (or no longer) a snapshot file. */
function readSlotTable(fd: number, size: number): SlotTable | undefined {
  const found = readHead(fd, size);
  return found === undefined ? undefined : new SlotTable(readSlotRegion(fd, found), found.head);
}

/**
 * Lets a reader of the backup run between rounds: {@link quiet} runs its work now when no
 * round is running, else as soon as the running one ends, before the next can begin
 * (rounds start from a timer; the work runs in the microtask after the round's end). The
 * backup then holds exactly the state of the last round reported to `onPersisted`.
 */
export class RoundGate {
  #running: Promise<void> | undefined;
  #ended: (() => void) | undefined;

  /** A round begins. */
  enter(): void {
    this.#running = new Promise<void>((resolve) => (this.#ended = resolve));
  }

  /** The round ended. */
  leave(): void {
    this.#running = undefined;
    this.#ended?.();
  }

  /** Runs `work` while no round runs. */
  async quiet<T>(work: () => T): Promise<T> {
    while (this.#running !== undefined) await this.#running;
    return work();
  }
}

/**
 * Marks in `keep` the slots of `before` (read before a copy of the live memory began) that
 * are still valid after it, as read now: only those name bytes the copy holds intact.
 * Returns how many, or undefined, with the reason logged, when the memory was reconfigured
 * or no slot stayed valid.
 */
function slotsValidThroughCopy(memoryFd: number, before: SlotTable, log: Log, keep: Uint8Array): number | undefined {
  let after: SlotTable | undefined;
  try {
    after = readSlotTable(memoryFd, sizeOf(memoryFd));
  } catch (err) {
    if (!(err instanceof SnapshotFormatError)) throw err;
  }
  if (after === undefined || !sameLayout(after, before)) {
    log.debug('snapshot discarded: the memory was reconfigured during the copy');
    return undefined;
  }
  const count = before.validThrough(after, keep);
  if (count === 0) {
    log.debug(`snapshot discarded: none of the ${before.count} slots stayed valid during the copy`);
    return undefined;
  }
  return count;
}

/**
 * Checks the head page and sequence region of a copy taken while the memory was live
 * (`copy`, fixed up in place): finds the slots valid through the copy, empties every other
 * slot in it, and checks that it then holds exactly those.
 * @returns the number of slots emptied, or undefined (the reason logged) when the copy
 *   must be discarded
 */
function fixUpCopy(memoryFd: number, before: SlotTable, log: Log, copy: Uint8Array, size: number, kept: Kept): number | undefined {
  const keep = new Uint8Array(before.head.entries);
  const count = slotsValidThroughCopy(memoryFd, before, log, keep);
  if (count === undefined) return undefined;
  const head = parseHead(copy, size);
  if (head === undefined || !sameLayout({ head }, before)) {
    log.debug('snapshot discarded: the copied head differs from the live one');
    return undefined;
  }
  const cleared = before.clearOthersIn(copy, keep);
  // Every slot left claiming a snapshot is one of `keep`: if as many are valid, all of them are.
  if (countValidSlots(copy, head) !== count) {
    log.debug('snapshot discarded: the copy does not hold the slots it was checked against');
    return undefined;
  }
  kept.count = count;
  kept.newest = before.newestOf(keep);
  return cleared;
}

/**
 * Checks a temporary copy taken while the memory was live: reads the slots again (B),
 * keeps A ∩ B, clears every other slot in the copy, and verifies the result.
 */
export function liveCopyFixup(memoryFd: number, before: SlotTable, log: Log, kept: Kept): PersistFixup {
  return (tempFd, size) => {
    const found = readHead(tempFd, size);
    if (found === undefined) {
      log.debug('snapshot discarded: the copied head differs from the live one');
      return false;
    }
    const copy = readSlotRegion(tempFd, found);
    const cleared = fixUpCopy(memoryFd, before, log, copy, size, kept);
    if (cleared === undefined) return false;
    // The bytes written are the ones just checked: no need to read them back.
    if (cleared > 0) writeSequenceRegion(tempFd, copy);
    return true;
  };
}

/** Checks a copy of quiescent memory: the same configuration and the same valid slots. */
export function quiescentCopyFixup(expected: SlotState): PersistFixup {
  return (tempFd, size) => {
    const copy = readSlotState(tempFd, size);
    return copy !== undefined && sameLayout(copy, expected) && sameSlots(copy.slots, expected.slots);
  };
}

/**
 * Takes restore-v1 snapshots of a live memory file on a timer until {@link stop}.
 *
 * Pacing: the next round starts `intervalMs` after the previous one ended, or
 * {@link PACING_FACTOR} times the CPU time it used if that is longer, so a large state
 * that changes constantly costs a bounded share of a core. Work that the host's thread
 * runs meanwhile through {@link besideRounds} is not the round's and is not counted. One
 * exception: a whole copy made because too many pages were marked since the last round
 * is followed by a round at the interval, unless the round before it was one too. Marks
 * pile up with the pause, so a paced pause would make the next round as crowded, and a
 * program whose rounds go in place at the interval would get whole copies for ever.
 */
export class Snapshotter {
  readonly intervalMs: number;
  #o: SnapshotterOptions;
  #timer: NodeJS.Timeout | undefined;
  #round: Promise<RoundOutcome> | undefined;
  #abort = new AbortController();
  #stopped = false;
  #persistedWriteOffset: number | undefined;
  #lastNote = '';
  #lastError = '';
  #nextDelay: number;
  #discardedInARow = 0;
  /** Whether the last round copied whole because of the pages marked since the one before. */
  #lastCrowded = false;
  /**
   * The backup file that, with the pages marked since (taken into {@link #pending} or still
   * in the map), makes the memory, as this host last left it ({@link fileIdentity}): set
   * once a round that read every page after the program set its tracking flag (a whole
   * copy, or one by comparison) is durable, or from the start when the host restored the
   * memory from the backup. A backup that no longer
   * has this identity was replaced or written by someone else, and only a whole copy
   * makes it the memory again.
   */
  #base: string | undefined;
  /** Pages taken from the map and not yet durable in the backup, one bit each. */
  #pending = new Uint32Array(0);
  /** A journaled round whose in-place writes failed: applied again before anything else. */
  #unapplied: JournalRound | undefined;
  #sequence = 0;
  /** The buffer of {@link #copyBuffer}. */
  #runsBuffer = Buffer.alloc(0);
  /** A whole copy failed for room (ENOSPC, EDQUOT), and none succeeded since. */
  #copyRefusedForRoom = false;
  /** The journal, open from the first in-place round until a whole copy removes it. */
  #journalFd: number | undefined;
  /** The newest backup made durable by this snapshotter. */
  lastPersisted: DurableSnapshot | undefined;
  /** Rounds by outcome, for logs and tests. */
  readonly counts: Record<RoundOutcome, number> = {
    persisted: 0,
    unchanged: 0,
    'not-ready': 0,
    discarded: 0,
    failed: 0,
    aborted: 0,
  };

  constructor(options: SnapshotterOptions) {
    this.#o = options;
    this.intervalMs = options.intervalMs ?? DEFAULT_INTERVAL_MS;
    this.#nextDelay = this.intervalMs;
    this.#persistedWriteOffset = options.baselineWriteOffset;
    const restoredFrom = options.backupMatchesMemory === true ? fs.statSync(options.backup.path, { bigint: true, throwIfNoEntry: false }) : undefined;
    this.#base = restoredFrom === undefined ? undefined : fileIdentity(restoredFrom);
  }

  /** What the backup on disk holds now, as far as this snapshotter changed it. */
  get #backupState(): BackupState {
    // A journaled round whose writes into the backup failed, not applied again since.
    return this.#unapplied === undefined ? 'previous' : 'torn';
  }

  /** The pause before the next round, in milliseconds: the interval, or longer after a costly round. */
  get pauseMs(): number {
    return this.#nextDelay;
  }

  /** Starts the timer. */
  start(): void {
    this.#schedule();
  }

  /** Stops the timer and aborts a round in progress (its temporary file is removed). */
  async stop(): Promise<void> {
    await this.#halt();
    this.#closeJournal();
  }

  /**
   * After the program exited: stops the rounds and, when a round would write only the
   * pages changed since the last one, runs it on the quiescent memory. The whole copy of
   * the final write-back needs room for a second file; when a full disk refuses it, this
   * round has kept what the program committed last.
   * @returns what the backup holds then, for the write-back's error lines
   */
  async finish(): Promise<BackupState> {
    await this.#halt();
    // The abort was for the round in progress, a whole copy the write-back makes anyway.
    this.#abort = new AbortController();
    return this.#lastRound('in-place');
  }

  /**
   * After {@link finish}, when the write-back's whole copy found no room: writes into the
   * backup in place, through the journal, every page where the quiescent memory differs
   * from it, found by reading both. It needs room for the journal of those pages only. The
   * way a program that marks no pages (its rounds copy the memory whole) keeps its newest
   * state on a full disk.
   * @returns what the backup holds then
   */
  persistDifferences(): Promise<BackupState> {
    return this.#lastRound('differences');
  }

  /** A round after the program exited: what the backup holds after it. */
  async #lastRound(kind: RoundKind): Promise<BackupState> {
    const outcome = await this.#guardedRound(kind);
    this.#closeJournal();
    return outcome === 'persisted' || outcome === 'unchanged' ? 'newest' : this.#backupState;
  }

  async #halt(): Promise<void> {
    this.#stopped = true;
    if (this.#timer !== undefined) clearTimeout(this.#timer);
    this.#abort.abort(new Error('the snapshotter stopped'));
    await this.#round;
  }

  #closeJournal(): void {
    if (this.#journalFd !== undefined) fs.closeSync(this.#journalFd);
    this.#journalFd = undefined;
  }

  #schedule(): void {
    if (this.#stopped) return;
    this.#timer = setTimeout(() => {
      this.#timer = undefined;
      this.#round = this.round();
      void this.#round.then(() => this.#schedule());
    }, this.#nextDelay);
    this.#timer.unref();
  }

  /** Runs one round now. Never throws: failures are logged and counted. */
  round(): Promise<RoundOutcome> {
    return this.#guardedRound('timed');
  }

  async #guardedRound(kind: RoundKind): Promise<RoundOutcome> {
    const gate = this.#o.gate;
    gate?.enter();
    let outcome: RoundOutcome;
    try {
      outcome = await this.#roundInner(kind);
    } catch (err) {
      // Whatever went wrong, the host must outlive the program: log it and go on.
      outcome = this.#failed(err);
    } finally {
      gate?.leave();
    }
    this.counts[outcome]++;
    return outcome;
  }

  async #roundInner(kind: RoundKind): Promise<RoundOutcome> {
    const { log, memoryFd } = this.#o;
    this.#nextDelay = this.intervalMs;
    let size: number;
    let before: SlotTable;
    try {
      size = sizeOf(memoryFd);
      if (size < MIN_FILE_LENGTH) return this.#notReady(`the memory has ${size} bytes, too few for a snapshot file`);
      const found = readHead(memoryFd, size);
      if (found === undefined) return this.#notReady('the memory is not configured as a snapshot file yet');
      // Nothing committed since the last persist: the slots need not be read.
      if (found.head.writeOffset === this.#persistedWriteOffset) return 'unchanged';
      before = new SlotTable(readSlotRegion(memoryFd, found), found.head);
      // A snapshot in `before` was published after the data it refers to was written, so
      // the size now covers that data; the size read first may not (the file can grow).
      size = Math.max(size, sizeOf(memoryFd));
    } catch (err) {
      if (err instanceof SnapshotFormatError) return this.#notReady(`the memory is not a valid snapshot file: ${err.message}`);
      return this.#failed(err);
    }
    if (before.count === 0) return this.#notReady('the memory holds no snapshot yet');
    this.#lastNote = '';

    const takenAt = Date.now();
    const cpuBefore = process.cpuUsage();
    const besideBefore = besideMicros;
    const kept: Kept = { count: 0, newest: undefined };
    let result: PersistResult | undefined;
    let own = 0;
    const dirty = this.#o.dirtyPages;
    // The flag is read before the bits are taken: a whole copy that starts after both then
    // holds every write the program made before it began to mark them.
    const tracking = dirty?.tracking === true;
    const pages = Math.ceil(Math.min(size, DIRTY_MAX_BYTES) / PAGE);
    if (dirty !== undefined) this.#take(dirty, pages);
    let spans: [number, number][] | undefined;
    let crowded = false;
    // The backup as it is now. Another name of it (a hard link: `ln state state.monday`,
    // `cp -al`) shares its bytes, which writes in place would change too; a file replaced,
    // or written by someone else, since this host wrote it is no longer the base that the
    // marked pages complete. A whole copy is a new file under the backup's name only: the
    // other names keep what they hold, and it is the base of the rounds after it.
    const path = this.#o.backup.path;
    const backupFile = fs.statSync(path, { bigint: true, throwIfNoEntry: false });
    const names = Number(backupFile?.nlink ?? 0);
    if (this.#base !== undefined && (names > 1 || !this.#isBase(backupFile))) {
      log.info(
        names > 1
          ? `${path} has ${names} names (hard links): this round copies the memory whole, so that the other names keep what they hold (writing in place would change them too)`
          : `${path} changed since this host last wrote it (replaced, removed, or written by another process): this round copies the memory whole`,
      );
      this.#base = undefined;
    }
    if (kind !== 'differences' && tracking && this.#base !== undefined && size <= DIRTY_MAX_BYTES) {
      spans = this.#spans(before.head.tailStart, size);
      // Pages changed all over the file cost more in place (a read, a journaled write and a
      // random write each) than one sequential copy of it: then the round copies it whole.
      if (spans.length * RUN_COST_BYTES > size) {
        spans = undefined;
        crowded = true;
      }
    }
    // Where a whole copy finds no room, the pages that differ from the backup go in place.
    const byComparison = spans === undefined && (kind === 'differences' || (kind === 'timed' && this.#noRoomForCopy()));
    if (byComparison) {
      if (names > 1) return this.#failed(new Error(`it has ${names} names (hard links): writing it in place would change the others too, and there is no room for a whole copy`));
      try {
        // Compared with the backup as the round will find it.
        if (this.#unapplied !== undefined) await this.#applyAgain(this.#unapplied);
        spans = await this.#differingSpans(before.head.tailStart, size);
      } catch (err) {
        if (this.#abort.signal.aborted) return 'aborted';
        return this.#failed(err);
      }
      // Without room for the journal either, a timed round tries the copy, which says why it fails.
      if (spans === undefined && kind === 'differences') return 'not-ready';
    }
    const incremental = spans !== undefined;
    if (kind === 'in-place' && !incremental) return this.#notReady('no round in place is possible: the write-back copies the memory whole');
    try {
      if (this.#unapplied !== undefined) await this.#applyAgain(this.#unapplied);
      result = spans
        ? await this.#persistInPlace(spans, before, size, kept)
        : await withProgress('shm-restore: persisting snapshot', this.#o.progress === true, (progress) =>
            persistAtomically(this.#o.backup, memoryFd, size, {
              fixup: liveCopyFixup(memoryFd, before, log, kept),
              signal: this.#abort.signal,
              progress,
            }),
          );
    } catch (err) {
      if (this.#abort.signal.aborted) return 'aborted';
      // A backup that cannot be written in place (removed, replaced by a directory) gets
      // a whole copy next, unless a journaled round must be finished first.
      if (incremental && this.#unapplied === undefined) this.#base = undefined;
      if (!incremental && refusedForRoom(err)) this.#copyRefusedForRoom = true;
      return this.#failed(err);
    } finally {
      // Every round that copied is paced, kept or not: discarded copies cost as much.
      const cpu = process.cpuUsage(cpuBefore);
      own = cpu.user + cpu.system - (besideMicros - besideBefore);
      this.#nextDelay = crowded && !this.#lastCrowded ? this.intervalMs : Math.max(this.intervalMs, (PACING_FACTOR * own) / 1000);
      this.#lastCrowded = crowded;
    }
    if (result === undefined) return this.#discarded();
    // Durable: the pages it copied are in the backup; bits taken beyond the size stay.
    this.#settle(pages);
    // A whole round, or one by comparison, read every page after taking the marks (which
    // the program sets after each write), one by marks every page marked: the backup and
    // what the program marks from now on make the memory.
    this.#base = tracking ? fileIdentity(result.written) : undefined;
    if (!incremental) {
      this.#copyRefusedForRoom = false;
      // The rename removed the journal: the next in-place round creates it again.
      this.#closeJournal();
    }
    this.#discardedInARow = 0;
    if (this.#lastError !== '') log.info(`persisting snapshots works again${byComparison ? ': in place, the pages that differ from the backup (no room for a whole copy)' : ''}`);
    this.#lastError = '';
    // The slots are read after the head: a commit between the two reads is in the backup
    // though the head said less, and must not make the next round copy the same state again.
    this.#persistedWriteOffset = before.end;
    const snapshot: DurableSnapshot = {
      takenAt,
      writeOffset: before.head.writeOffset,
      count: kept.count,
      newest: kept.newest,
      size,
      incremental,
      changed: spans,
    };
    this.lastPersisted = snapshot;
    const unsynced = directorySyncWarning(this.#o.backup, result);
    if (unsynced !== undefined) log.warn(unsynced);
    const t = result.timings;
    log.debug(
      `snapshot persisted${incremental ? ' in place' : ''}: ${snapshot.count} of ${before.count} slots kept, newest at ${snapshot.newest?.offset ?? '-'}; ` +
        `copy ${ms(t.copyMs)} (${formatBytes(result.copied)} of ${formatBytes(size)}), validate ${ms(t.validateMs)}, ` +
        (incremental ? `journal and write ${ms(t.fsyncMs)}` : `fsync ${ms(t.fsyncMs)}, rename ${ms(t.renameMs)}`) +
        `; CPU ${ms(own / 1000)}`,
    );
    this.#o.onPersisted?.(snapshot, result);
    return 'persisted';
  }

  /** Moves the map's bits of pages `[0, pages)` into {@link #pending}. */
  #take(dirty: DirtyPages, pages: number): void {
    const words = Math.ceil(pages / 32);
    if (this.#pending.length < words) {
      const grown = new Uint32Array(Math.max(words, 2 * this.#pending.length));
      grown.set(this.#pending);
      this.#pending = grown;
    }
    dirty.take(pages, this.#pending);
  }

  /** Forgets the pending pages below `pages`, now durable. */
  #settle(pages: number): void {
    const pending = this.#pending;
    const full = Math.min(pages >>> 5, pending.length);
    pending.fill(0, 0, full);
    const rest = pages & 31;
    if (rest !== 0 && full < pending.length) pending[full]! &= ~((1 << rest) - 1);
  }

  /**
   * An incremental round: copies the head, slots and data ring (always: they decide which
   * snapshots the backup holds, and the record covers them) and the pending pages, checks
   * the slots as a whole copy is checked, journals the result durably, then writes it into
   * the backup in place.
   */
  async #persistInPlace(spans: [number, number][], before: SlotTable, size: number, kept: Kept): Promise<PersistResult | undefined> {
    const { memoryFd, backup, log } = this.#o;
    const t0 = performance.now();
    // One buffer for all the runs: a buffer per page costs more than its read.
    const buffer = this.#copyBuffer(bytesOf(spans));
    const runs: JournalRound['runs'] = [];
    let copied = 0;
    let short = false;
    for (const [offset, length] of spans) {
      const data = buffer.subarray(copied, copied + length);
      const done = readAt(memoryFd, data, length, offset);
      runs.push({ offset, data });
      copied += done;
      if (done < length) {
        short = true;
        break;
      }
    }
    const t1 = performance.now();
    if (short) {
      log.debug('snapshot discarded: the memory shrank during the copy');
      return undefined;
    }
    const copy = runs[0]!.data;
    if (fixUpCopy(memoryFd, before, log, copy, size, kept) === undefined) return undefined;
    const record = recordOfRegion(size, copy);
    this.#abort.signal.throwIfAborted();
    const t2 = performance.now();
    const fd = fs.openSync(backup.path, fs.constants.O_RDWR | fs.constants.O_NOFOLLOW);
    let written: fs.BigIntStats;
    try {
      // The marked pages complete the file this host last left, and no other: one replaced
      // or written by someone else since the round began, or while it waits for the disk
      // (where a round spends its time), gets no pages, and the next round copies whole.
      const stat = fs.fstatSync(fd, { bigint: true });
      if (!this.#isBase(stat)) return this.#changedUnderRound(stat);
      const round: JournalRound = { sequence: ++this.#sequence, inode: Number(stat.ino), baseSize: Number(stat.size), size, record, runs };
      this.#journalFd ??= await openJournal(backup);
      await writeJournal(this.#journalFd, round);
      const journaled = fs.fstatSync(fd, { bigint: true });
      if (!this.#isBase(journaled)) {
        // Durably, or a crash could leave the round to the next start to apply into that file.
        spendJournal(this.#journalFd);
        await syncFile(this.#journalFd, true);
        return this.#changedUnderRound(journaled);
      }
      let ours: string;
      try {
        writeRound(fd, round);
        ours = fileIdentity(fs.fstatSync(fd, { bigint: true }));
        await syncFile(fd);
      } catch (err) {
        // The backup may be torn now; the journal that repairs it must stay until it is applied.
        this.#unapplied = round;
        throw err;
      } finally {
        written = this.#wrote(fd);
      }
      spendJournal(this.#journalFd);
      // Written by someone else during the sync: what is durable is no longer the round.
      if (fileIdentity(written) !== ours) return this.#changedUnderRound(written);
    } finally {
      fs.closeSync(fd);
    }
    const t3 = performance.now();
    return { size, copied, timings: { copyMs: t1 - t0, validateMs: t2 - t1, fsyncMs: t3 - t2, renameMs: 0 }, written };
  }

  /**
   * A buffer of `bytes` bytes for the runs of an in-place round, the same one every round
   * up to {@link KEEP_COPY_BUFFER} bytes. A new buffer each round is new memory each round:
   * its page faults cost more than the copy (measured on a 1 GiB state with ~290 kB per
   * round: 2.3 ms instead of 0.35 ms for the reads). Nothing of a round outlives it: a
   * round whose writes failed is applied again before the next one reads.
   */
  #copyBuffer(bytes: number): Buffer {
    if (bytes > KEEP_COPY_BUFFER) return Buffer.allocUnsafe(bytes);
    if (this.#runsBuffer.length < bytes) this.#runsBuffer = Buffer.allocUnsafe(Math.min(KEEP_COPY_BUFFER, Math.max(bytes, 2 * this.#runsBuffer.length)));
    return this.#runsBuffer.subarray(0, bytes);
  }

  /**
   * The byte ranges an in-place round copies: the head, slots and ring (up to `region`),
   * then each run of pending pages.
   */
  #spans(region: number, size: number): [number, number][] {
    const pages = Math.ceil(size / PAGE);
    const spans: [number, number][] = [[0, region]];
    const pending = this.#pending;
    for (let page = region / PAGE; page < pages; ) {
      const word = pending[page >>> 5] ?? 0;
      if (word === 0) {
        page = ((page >>> 5) + 1) << 5;
        continue;
      }
      if ((word & (1 << (page & 31))) === 0) {
        page++;
        continue;
      }
      let end = page + 1;
      while (end < pages && ((pending[end >>> 5] ?? 0) & (1 << (end & 31))) !== 0) end++;
      spans.push([page * PAGE, Math.min(end * PAGE, size) - page * PAGE]);
      page = end;
    }
    return spans;
  }

  /**
   * The spans of an in-place round that makes the backup equal to the memory: the head,
   * slots and ring (up to `region`, always a span of their own: the round checks them), then
   * each run of pages after them where the two differ, read a MiB at a time. Undefined, the
   * reason logged, when there is no backup or their journal needs more room than the disk has.
   */
  async #differingSpans(region: number, size: number): Promise<[number, number][] | undefined> {
    const { memoryFd, backup, log } = this.#o;
    const spans: [number, number][] = [[0, region]];
    const memory = Buffer.allocUnsafe(COMPARE_BYTES);
    const onDisk = Buffer.allocUnsafe(COMPARE_BYTES);
    let fd: number;
    try {
      fd = fs.openSync(backup.path, fs.constants.O_RDONLY | fs.constants.O_NOFOLLOW);
    } catch (err) {
      if (!isSystemError(err, 'ENOENT')) throw err;
      log.debug('no round in place: there is no backup to write into');
      return undefined;
    }
    try {
      for (let at = region; at < size; at += COMPARE_BYTES) {
        // The host's other work goes on between copy chunks' worth (a GiB takes about a second).
        if ((at - region) % CHUNK === 0 && at > region) {
          await yieldToLoop();
          this.#abort.signal.throwIfAborted();
        }
        const length = Math.min(COMPARE_BYTES, size - at);
        readAt(memoryFd, memory, length, at);
        // Past the backup's end it reads as zeros, as the round's resize leaves it.
        onDisk.fill(0, readAt(fd, onDisk, length, at), length);
        if (memory.compare(onDisk, 0, length, 0, length) === 0) continue;
        for (let page = 0; page < length; page += PAGE) {
          const end = Math.min(page + PAGE, length);
          if (memory.compare(onDisk, page, end, page, end) === 0) continue;
          const last = spans[spans.length - 1]!;
          if (spans.length > 1 && last[0] + last[1] === at + page) last[1] += end - page;
          else spans.push([at + page, end - page]);
        }
      }
    } finally {
      fs.closeSync(fd);
    }
    const journaled = bytesOf(spans);
    // The journal is written over its old bytes: their blocks are room too.
    const room = freeBytes(backup.dir) + allocatedBytes(backup.journalPath);
    if (journaled > room) {
      log.debug(`no round in place: the journal of the ${formatBytes(journaled)} that differ needs more room than the ${formatBytes(room)} left`);
      return undefined;
    }
    return spans;
  }

  /**
   * Whether whole copies were refused for room and still would be: the disk has less room
   * than the memory's data. A copy is tried again once it has enough.
   */
  #noRoomForCopy(): boolean {
    if (!this.#copyRefusedForRoom) return false;
    let free: number;
    try {
      free = freeBytes(this.#o.backup.dir);
    } catch {
      // The copy says what is wrong with the directory.
      return false;
    }
    return free < fs.fstatSync(this.#o.memoryFd).blocks * 512;
  }

  /** Applies a journaled round whose in-place writes failed; throws while it still fails. */
  async #applyAgain(round: JournalRound): Promise<void> {
    const fd = fs.openSync(this.#o.backup.path, fs.constants.O_RDWR | fs.constants.O_NOFOLLOW);
    try {
      await applyRound(fd, round);
    } finally {
      this.#wrote(fd);
      fs.closeSync(fd);
    }
    this.#unapplied = undefined;
    if (this.#journalFd !== undefined) spendJournal(this.#journalFd);
  }

  /** Whether `stat` is the file this host last left, where rounds go by the marks (else any file is). */
  #isBase(stat: fs.BigIntStats | undefined): boolean {
    return this.#base === undefined || fileIdentity(stat) === this.#base;
  }

  /** A round in place that found the backup changed under it (now `stat`): discarded, and the next copies whole. */
  #changedUnderRound(stat: fs.BigIntStats): undefined {
    const names = Number(stat.nlink);
    this.#o.log.info(
      names > 1
        ? `${this.#o.backup.path} got ${names} names (hard links) while a round wrote it in place: the round is discarded, the next copies the memory whole, so that the other names keep what they hold`
        : `${this.#o.backup.path} changed while a round wrote it in place (replaced, or written by another process): the round is discarded, the next copies the memory whole`,
    );
    this.#base = undefined;
    return undefined;
  }

  /**
   * The status of the backup open at `fd` after this host wrote into it: the base goes on
   * being this file, whose ctime the writes changed (a failed write too).
   */
  #wrote(fd: number): fs.BigIntStats {
    const written = fs.fstatSync(fd, { bigint: true });
    if (this.#base !== undefined) this.#base = fileIdentity(written);
    return written;
  }

  #discarded(): RoundOutcome {
    this.#discardedInARow++;
    if (this.#discardedInARow === DISCARDS_BEFORE_WARNING) {
      this.#o.log.warn(
        `the last ${DISCARDS_BEFORE_WARNING} copies of the memory were discarded: no snapshot stayed valid while one was copied ` +
          '(does the program drop or overwrite all of its snapshots faster than a copy takes? a larger data ring keeps them longer)',
      );
    }
    return 'discarded';
  }

  #notReady(reason: string): RoundOutcome {
    if (reason !== this.#lastNote) this.#o.log.debug(`no snapshot taken: ${reason}`);
    this.#lastNote = reason;
    return 'not-ready';
  }

  #failed(err: unknown): RoundOutcome {
    const message = `cannot persist a snapshot to ${this.#o.backup.path}: ${describeError(err)}; ${this.#o.backup.whatIsLeft(this.#backupState)}`;
    if (message !== this.#lastError) this.#o.log.error(message);
    else this.#o.log.debug(message);
    this.#lastError = message;
    return 'failed';
  }
}

/** Bytes the `[offset, length]` spans cover. */
function bytesOf(spans: [number, number][]): number {
  return spans.reduce((sum, [, length]) => sum + length, 0);
}

/** Bytes an unprivileged process may still allocate on the filesystem of `dir`. */
function freeBytes(dir: string): number {
  const stat = fs.statfsSync(dir);
  return stat.bavail * stat.bsize;
}

/** Bytes allocated to `file`, 0 when it does not exist. */
function allocatedBytes(file: string): number {
  try {
    return fs.lstatSync(file).blocks * 512;
  } catch (err) {
    if (isSystemError(err, 'ENOENT')) return 0;
    throw err;
  }
}

/**
 * What tells a file as this host left it from one replaced (another inode) or written by
 * someone else since (the kernel sets the ctime on every write, and no one can set it
 * back): device, inode, ctime in nanoseconds, size; `none` for no file.
 */
function fileIdentity(stat: fs.BigIntStats | undefined): string {
  return stat === undefined ? 'none' : `${stat.dev}:${stat.ino}:${stat.ctimeNs}:${stat.size}`;
}

function sizeOf(fd: number): number {
  return fs.fstatSync(fd).size;
}

function sameLayout(a: { head: SnapshotLayout }, b: { head: SnapshotLayout }): boolean {
  return a.head.entries === b.head.entries && a.head.data === b.head.data;
}

function sameSlots(a: readonly Snapshot[], b: readonly Snapshot[]): boolean {
  return a.length === b.length && intersectSlots(a, b).length === a.length;
}

/** Writes the (fixed-up) sequence region of `bytes` (head page and sequence region) back into the file. */
function writeSequenceRegion(fd: number, bytes: Uint8Array): void {
  const region = bytes.subarray(PAGE);
  let done = 0;
  while (done < region.length) done += fs.writeSync(fd, region, done, region.length - done, PAGE + done);
}

function ms(value: number): string {
  return value < 100 ? `${value.toFixed(1)} ms` : formatDuration(value);
}
