/**
 * Reading the snapshot slots of a file through `pread`, without mapping it: the restore
 * host reads live memfds this way, so a program that resizes its memory can never make
 * the host fault.
 * @module
 */
import fs from 'node:fs';
import { SnapshotFormatError } from './errors.js';
import { PAGE, parseHead, readSlots, slotPosition, type DiscoveredHead, type Snapshot } from './format.js';

/** The configuration and valid snapshots of a file at one moment. */
export interface SlotState {
  head: DiscoveredHead;
  /** Valid snapshots, oldest first. */
  slots: Snapshot[];
  /** The head page and sequence region as read, for fixing up a private copy. */
  bytes: Buffer;
}

/** Up to `length` bytes of `fd` from `position`: fewer only where the file ends. */
export function preadFully(fd: number, length: number, position: number): Buffer {
  const buf = Buffer.alloc(length);
  let done = 0;
  while (done < length) {
    const n = fs.readSync(fd, buf, done, length - done, position + done);
    if (n === 0) break;
    done += n;
  }
  return done === length ? buf : buf.subarray(0, done);
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
  const page = preadFully(fd, PAGE, 0);
  if (page.length < PAGE) {
    throw new SnapshotFormatError('ERR_SNAPSHOT_TOO_SMALL', `a snapshot file needs at least one page (${PAGE} bytes) for its head; this one has ${Math.min(size, page.length)}`);
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
export function readSlotsAfter(fd: number, { head, page }: HeadPage): SlotState {
  const needed = slotPosition(head.entries);
  const bytes = needed <= PAGE ? page : Buffer.concat([page, preadFully(fd, needed - PAGE, PAGE)]);
  if (bytes.length < needed) {
    throw new SnapshotFormatError('ERR_SNAPSHOT_TOO_SMALL', `the file ended at byte ${bytes.length}, inside its sequence region (which ends at ${needed})`);
  }
  return { head, slots: readSlots(bytes, head), bytes };
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
