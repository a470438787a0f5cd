/**
 * A mapped snapshot file: recovering its configuration and snapshots, and turning it into
 * a writer (the Rust crate's `File` and `FileDiscovery`).
 * @module
 */
import { ConfigureFile, checkConfig, type SnapshotConfig } from './config.js';
import { SnapshotFormatError } from './errors.js';
import {
  HEAD,
  MAGIC,
  PAGE,
  computeLayout,
  layoutFits,
  parseHead,
  readNewestSlot,
  readSlots,
  readStreamEnd,
  type DiscoveredHead,
  type Snapshot,
} from './format.js';
import { MappedSnapshot, WRITE_OFFSET_U32, storeU64 } from './mapped.js';
import { SnapshotReader } from './reader.js';
import { SnapshotWriter } from './writer.js';

const VERSION_U64 = HEAD.version / 8;
const ENTRY_MASK_U64 = HEAD.entryMask / 8;
const DATA_MASK_U64 = HEAD.dataMask / 8;

/**
 * The memory of a whole snapshot file, typically `mapping.bytes` of a mapped memfd. It
 * must cover the entire file (its length is taken as the file length) and start 8-byte
 * aligned, as every mapping does.
 */
export class SnapshotFile {
  readonly #mapped: MappedSnapshot;

  /**
   * @throws {@link SnapshotFormatError} `ERR_SNAPSHOT_ALIGNMENT` when `bytes` does not
   *   start at a multiple of 8 in its buffer
   */
  constructor(bytes: Uint8Array) {
    this.#mapped = new MappedSnapshot(bytes);
  }

  /** Same as the constructor. */
  static open(bytes: Uint8Array): SnapshotFile {
    return new SnapshotFile(bytes);
  }

  /** The file's bytes. */
  get bytes(): Uint8Array {
    return this.#mapped.bytes;
  }

  /**
   * Recovers the configuration and snapshots of a configured file.
   *
   * @param into filled with the discovered configuration (left alone when the file is not
   *   configured), for the Rust crate's `recover(&mut cfg)` flow
   * @returns a view of the snapshots, or `undefined` when the file is not configured
   * @throws {@link SnapshotFormatError} for a file that is too small or whose head is
   *   inconsistent (see {@link parseHead})
   */
  recover(into?: ConfigureFile): FileDiscovery | undefined {
    const head = parseHead(this.#mapped.bytes, this.#mapped.length);
    if (head === undefined) return undefined;
    const configuration = ConfigureFile.fromHead(head);
    into?.copyFrom(configuration);
    return new FileDiscovery(this.#mapped, head, configuration);
  }

  /**
   * Applies a configuration and returns a writer.
   *
   * If the file already has this layout (same `entries` and `data`), its snapshots are
   * kept and writing continues after the newest one (never before `initialOffset`).
   * Otherwise the file is first marked unconfigured and its sequence region cleared, so
   * no reader ever sees the new layout with stale slots. Then `entry_mask`, `data_mask`,
   * `write_offset` are stored, and `version` last; the new stream starts at
   * `initialOffset`, or past the old one's end if the file was configured before.
   *
   * @throws {@link SnapshotFormatError} `ERR_SNAPSHOT_NOT_CONFIGURED` for an empty
   *   {@link ConfigureFile}, `ERR_SNAPSHOT_BAD_CONFIG` for invalid values,
   *   `ERR_SNAPSHOT_TOO_SMALL` when the layout does not fit the file
   */
  configure(config: SnapshotConfig): SnapshotWriter {
    const { entries, data, initialOffset } = checkConfig(config);
    const mapped = this.#mapped;
    const layout = computeLayout(entries, data, mapped.length);
    if (!layoutFits(layout)) {
      throw new SnapshotFormatError('ERR_SNAPSHOT_TOO_SMALL', `entries ${entries} and data ${data} need ${layout.tailStart} bytes; the file has ${mapped.length}`);
    }
    const current = headOrUndefined(mapped);
    const keep = current !== undefined && current.entries === entries && current.data === data;
    let start = initialOffset;
    if (!keep) {
      // A reader may still hold a snapshot of the old layout: the new stream starts past
      // every old position, so that no (slot, offset, length) it checks can come back.
      if (current !== undefined) {
        start = Math.min(Math.max(start, readStreamEnd(mapped.bytes, current)), Number.MAX_SAFE_INTEGER - data);
      }
      Atomics.store(mapped.u64, VERSION_U64, 0n);
      mapped.bytes.fill(0, PAGE, layout.dataStart);
    }
    const head: DiscoveredHead = { ...layout, writeOffset: keep ? current.writeOffset : start };
    const writer = new SnapshotWriter(mapped, head, start);
    mapped.u64[ENTRY_MASK_U64] = BigInt(entries - 1);
    mapped.u64[DATA_MASK_U64] = BigInt(data - 1);
    storeU64(mapped.u32, WRITE_OFFSET_U32, writer.writeOffset);
    Atomics.store(mapped.u64, VERSION_U64, MAGIC);
    return writer;
  }

  /**
   * A writer for the file as it is configured, continuing after its newest snapshot.
   * @throws {@link SnapshotFormatError} `ERR_SNAPSHOT_NOT_CONFIGURED` for an unconfigured
   *   file, and the errors of {@link recover}
   */
  intoWriter(): SnapshotWriter {
    const head = parseHead(this.#mapped.bytes, this.#mapped.length);
    if (head === undefined) {
      throw new SnapshotFormatError('ERR_SNAPSHOT_NOT_CONFIGURED', 'the file is not configured (no snapshot magic in its head): use configure()');
    }
    return new SnapshotWriter(this.#mapped, head, head.writeOffset);
  }
}

/** The configured head, or `undefined` for an unconfigured or damaged one. */
function headOrUndefined(mapped: MappedSnapshot): DiscoveredHead | undefined {
  try {
    return parseHead(mapped.bytes, mapped.length);
  } catch (err) {
    // Configuring is how a damaged head gets replaced.
    if (err instanceof SnapshotFormatError) return undefined;
    throw err;
  }
}

/** The snapshots of a configured file, as recovered (the Rust crate's `FileDiscovery`). */
export class FileDiscovery extends SnapshotReader {
  /** The configuration found in the file (initialized). */
  readonly configuration: ConfigureFile;
  /** Layout and stored write position. */
  readonly head: DiscoveredHead;
  readonly #mapped: MappedSnapshot;

  /** @internal use {@link SnapshotFile.recover}. */
  constructor(mapped: MappedSnapshot, head: DiscoveredHead, configuration: ConfigureFile) {
    super(mapped, head);
    this.#mapped = mapped;
    this.head = head;
    this.configuration = configuration;
  }

  /** The valid snapshots, oldest first (read afresh on every call; see {@link readSlots}). */
  valid(): Snapshot[] {
    return readSlots(this.#mapped.bytes, this.head);
  }

  /** The newest valid snapshot (largest offset), if any; see {@link SnapshotReader.newest}. */
  newest(): Snapshot | undefined {
    return readNewestSlot(this.#mapped.bytes, this.head);
  }

  /**
   * Empties the slot of `snapshot` if it still holds it.
   * @returns whether the slot was emptied
   */
  invalidate(snapshot: Snapshot): boolean {
    if (!this.#mapped.holds(this.head, snapshot)) return false;
    this.#mapped.clearSlot(snapshot.index);
    return true;
  }

  /**
   * Keeps only the valid snapshots for which `keep` returns true (the Rust crate's
   * `retain`); every other slot that claims a snapshot, including the ones
   * {@link valid} does not report, is emptied.
   * @returns the number of slots emptied
   */
  retain(keep: (snapshot: Snapshot) => boolean): number {
    const mapped = this.#mapped;
    const kept = new Uint8Array(this.head.entries);
    for (const s of this.valid()) if (keep(s)) kept[s.index] = 1;
    let cleared = 0;
    for (let i = 0; i < this.head.entries; i++) {
      if (kept[i] === 0 && mapped.slotLength(i) !== 0) {
        mapped.clearSlot(i);
        cleared++;
      }
    }
    return cleared;
  }
}
