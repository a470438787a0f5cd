/**
 * Reading the snapshot slots of a file through `pread`, without mapping it: the restore
 * host reads live memfds this way, so a program that resizes its memory can never make
 * the host fault.
 * @module
 */
import { readAt } from '../base/read-at.js';
import { SnapshotFormatError } from './errors.js';
import { LENGTH_U32, slotU32 } from './mapped.js';
import { PAGE, SLOT, markValidSlots, parseHead, readSlots, slotPosition, type DiscoveredHead, type Snapshot } from './format.js';

/** The configuration and valid snapshots of a file at one moment. */
export interface SlotState {
  head: DiscoveredHead;
  /** Valid snapshots, oldest first. */
  slots: Snapshot[];
  /** The head page and sequence region as read, for fixing up a private copy. */
  bytes: Buffer;
}

/** The parsed head of a file and its first page as read. */
export interface HeadPage {
  head: DiscoveredHead;
  page: Buffer;
}

/**
 * Reads the head page of a file of `size` bytes (one `pread`).
 * @returns undefined when the file is not configured (no magic), e.g. a new memfd
 * @throws {@link SnapshotFormatError} for a file too small or with impossible masks
 */
export function readHead(fd: number, size: number): HeadPage | undefined {
  const page = Buffer.allocUnsafe(PAGE);
  const read = readAt(fd, page, PAGE, 0);
  if (read < PAGE) {
    throw new SnapshotFormatError('ERR_SNAPSHOT_TOO_SMALL', `a snapshot file needs at least one page (${PAGE} bytes) for its head; this one has ${Math.min(size, read)}`);
  }
  const head = parseHead(page, size);
  return head === undefined ? undefined : { head, page };
}

/**
 * Reads the head page and the slots of a file of `size` bytes.
 * @returns undefined when the file is not configured (no magic), e.g. a new memfd
 * @throws {@link SnapshotFormatError} for a file too small or with impossible masks
 */
export function readSlotState(fd: number, size: number): SlotState | undefined {
  const found = readHead(fd, size);
  return found === undefined ? undefined : readSlotsAfter(fd, found);
}

/**
 * Reads the slots of a file whose head was read with {@link readHead}.
 * @throws {@link SnapshotFormatError} when the file ends inside its sequence region
 */
export function readSlotsAfter(fd: number, found: HeadPage): SlotState {
  const bytes = readSlotRegion(fd, found);
  return { head: found.head, slots: readSlots(bytes, found.head), bytes };
}

/**
 * The head page and sequence region of a file whose head was read with {@link readHead}
 * (one more `pread`, into one new buffer).
 * @throws {@link SnapshotFormatError} when the file ends inside its sequence region
 */
export function readSlotRegion(fd: number, { head, page }: HeadPage): Buffer {
  const needed = slotPosition(head.entries);
  const bytes = Buffer.allocUnsafe(needed);
  page.copy(bytes, 0, 0, PAGE);
  const done = PAGE + readAt(fd, bytes, needed - PAGE, PAGE, PAGE);
  if (done < needed) {
    throw new SnapshotFormatError('ERR_SNAPSHOT_TOO_SMALL', `the file ended at byte ${done}, inside its sequence region (which ends at ${needed})`);
  }
  return bytes;
}

/**
 * The slots of a file at one moment, kept as the bytes read: which hold a valid snapshot
 * is one byte per slot, and comparing two readings compares slot bytes. A restore-v1 round
 * reads the slots twice and checks a copy against them; a {@link Snapshot} per slot (and
 * keys to match them up) cost most of its CPU beside the writes.
 */
export class SlotTable {
  readonly head: DiscoveredHead;
  /** The head page and the sequence region, as read. */
  readonly bytes: Uint8Array;
  /** 1 at the index of each slot that holds a valid snapshot ({@link readSlots}), 0 elsewhere. */
  readonly valid: Uint8Array;
  /** How many slots hold a valid snapshot. */
  readonly count: number;
  /** Where writing continues after these slots (the `streamEnd` of the head and slots). */
  readonly end: number;
  readonly #words: Uint32Array;

  /**
   * @param bytes at least the head page and the sequence region; not copied, and must not
   *   change while the table is used
   * @param head the result of {@link parseHead} on `bytes`
   */
  constructor(bytes: Uint8Array, head: DiscoveredHead) {
    this.head = head;
    this.bytes = bytes;
    this.valid = new Uint8Array(head.entries);
    const { count, end } = markValidSlots(bytes, head, this.valid);
    this.count = count;
    this.end = end;
    this.#words = wordsOf(bytes, slotPosition(head.entries));
  }

  /**
   * Marks in `keep` (one byte per slot) the slots valid here and in `later`, a reading of
   * the same file taken after this one, with the same bytes in both: the snapshots
   * published before `later` was read that stayed in their slots until it was.
   * @returns how many were marked
   */
  validThrough(later: SlotTable, keep: Uint8Array): number {
    const a = this.#words;
    const b = later.#words;
    const valid = this.valid;
    const alsoValid = later.valid;
    let count = 0;
    for (let index = 0; index < this.head.entries; index++) {
      const w = slotU32(index);
      const same = valid[index] === 1 && alsoValid[index] === 1 && a[w] === b[w] && a[w + 1] === b[w + 1] && a[w + 2] === b[w + 2] && a[w + 3] === b[w + 3];
      keep[index] = same ? 1 : 0;
      if (same) count++;
    }
    return count;
  }

  /**
   * Empties (`length = 0`) every slot of `copy`, a private copy of the same file, that
   * claims a snapshot other than the one this table read in the same slot marked in `keep`.
   * Plain stores.
   * @param copy at least the head page and the sequence region
   * @returns the number of slots emptied
   */
  clearOthersIn(copy: Uint8Array, keep: Uint8Array): number {
    const a = this.#words;
    const c = wordsOf(copy, slotPosition(this.head.entries));
    let cleared = 0;
    for (let index = 0; index < this.head.entries; index++) {
      const w = slotU32(index);
      const l = w + LENGTH_U32;
      if ((c[l]! | c[l + 1]!) === 0) continue;
      if (keep[index] === 1 && a[w] === c[w] && a[w + 1] === c[w + 1] && a[l] === c[l] && a[l + 1] === c[l + 1]) continue;
      const at = slotPosition(index) + SLOT.length;
      copy.fill(0, at, at + 8);
      cleared++;
    }
    return cleared;
  }

  /** The snapshot with the largest offset among the slots marked in `keep` (the last that {@link readSlots} would list of them). */
  newestOf(keep: Uint8Array): Snapshot | undefined {
    const a = this.#words;
    let newest = -1;
    let offset = -1;
    for (let index = 0; index < this.head.entries; index++) {
      if (keep[index] !== 1) continue;
      const w = slotU32(index);
      const at = a[w + 1]! * 0x1_0000_0000 + a[w]!;
      // Ties go to the larger index, as in the order of readSlots.
      if (at >= offset) {
        offset = at;
        newest = index;
      }
    }
    if (newest < 0) return undefined;
    return { index: newest, offset, length: a[slotU32(newest) + LENGTH_U32]! };
  }
}

/** The first `length` bytes of `bytes` as u32 words: a view when aligned, else a copy. */
function wordsOf(bytes: Uint8Array, length: number): Uint32Array {
  return bytes.byteOffset % 4 === 0 ? new Uint32Array(bytes.buffer, bytes.byteOffset, length >>> 2) : new Uint32Array(bytes.slice(0, length).buffer);
}

/** The snapshots present, with the same slot, offset and length, in both lists. */
export function intersectSlots(a: readonly Snapshot[], b: readonly Snapshot[]): Snapshot[] {
  const key = (s: Snapshot): string => `${s.index}:${s.offset}:${s.length}`;
  const later = new Set(b.map(key));
  return a.filter((s) => later.has(key(s)));
}

/** The newest snapshot (largest stream position), if any. */
export function newestSlot(slots: readonly Snapshot[]): Snapshot | undefined {
  let newest: Snapshot | undefined;
  for (const s of slots) if (newest === undefined || s.offset > newest.offset) newest = s;
  return newest;
}
