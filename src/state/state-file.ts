/**
 * The entry point of the state data structures: a snapshot file whose tail holds a
 * directory and the regions of the declared structures, and whose snapshots name a
 * committed state of all of them at once.
 * @module
 */
import { ShmfdError } from '../base/errors.js';
import { StderrLog, type Log } from '../base/log.js';
import type { MemoryFile, Mapping } from '../fds/memory-file.js';
import { SharedFd, SHARED_FD_NAME, type SharedFdOptions } from '../fds/shared-fd.js';
import { DirtyPages } from '../fds/dirty-pages.js';
import { checkConfig } from '../snapshot/config.js';
import { SnapshotFormatError } from '../snapshot/errors.js';
import { SnapshotFile, type FileDiscovery } from '../snapshot/file.js';
import { MAGIC, PAGE, tailStart, type Snapshot, type SnapshotLayout } from '../snapshot/format.js';
import { storeU64 } from '../snapshot/mapped.js';
import type { SnapshotWriter } from '../snapshot/writer.js';
import { CounterSet, VersionedCell } from './cell.js';
import type { StructureContainer, Structure } from './structure.js';
import {
  PAYLOAD_MAGIC,
  declarationsOf,
  decodePayload,
  directoryDifference,
  payloadBase,
  planLayout,
  type CellArray,
  type CellDeclaration,
  type CounterDeclaration,
  type Declarations,
  type DecodedPayload,
  type LogDeclaration,
  type MapDeclaration,
  type StateLayout,
} from './layout.js';
import { AppendLog } from './log.js';
import { KeyValueMap } from './kv-map.js';

/** The structure a declaration gives. */
export type StructureOf<D> = D extends LogDeclaration
  ? AppendLog
  : D extends CellDeclaration<infer T>
    ? VersionedCell<T>
    : D extends CounterDeclaration
      ? CounterSet
      : D extends MapDeclaration
        ? KeyValueMap
        : never;

/** The structures of a state file, by declared name. */
export type Structures<D extends Declarations> = { readonly [K in keyof D]: StructureOf<D[K]> };

/** Any structure, as a migration sees the structures of the old layout. */
export type AnyStructure = AppendLog | VersionedCell<CellArray> | CounterSet | KeyValueMap;

/** Options of {@link StateFile.open}. */
export interface StateFileOptions<D extends Declarations = Declarations> {
  /**
   * Runs when the file holds committed state declared differently: `old` gives the
   * committed state as the file's directory describes it (read only), `next` the new
   * declarations' structures, empty; what the migration stages in `next` becomes the
   * file's state, with one commit, when it returns. Until then the old state stays the
   * committed one: a crash or an exception (`ERR_STATE_MIGRATION_FAILED`) keeps it, and
   * the next open migrates again. Without it, other declarations are
   * `ERR_STATE_LAYOUT_MISMATCH`. In TypeScript, `old` may be declared as the old
   * declarations' structures: `migrate(old: Structures<typeof v1>, next) { ... }`.
   */
  migrate?(old: Readonly<Record<string, AnyStructure>>, next: Structures<D>): void;
  /**
   * Snapshot slots, a power of two (default 256). Used only when the file has no
   * committed state yet; otherwise the file's configuration is kept.
   */
  entries?: number;
  /**
   * Bytes of the snapshot data ring, a power of two (default: room for `entries` payloads,
   * at least one page). Used only when the file has no committed state yet.
   */
  data?: number;
  /**
   * Where opening reports a rebuild of a map's index (default: stderr, `shmfd: ...`
   * lines; the rebuild of a large map is a warning, the others are `info`).
   */
  log?: Log;
  /**
   * The restore host's dirty-page map (docs/restore.md, "Incremental rounds"): every
   * commit marks the pages it made live, so `shm-restore --snapshot=restore-v1` copies
   * only those. {@link StateFile.fromEnv} finds it by itself.
   */
  dirtyPages?: DirtyPages;
}

/** Options of {@link StateFile.fromEnv}. */
export interface StateFromEnvOptions<D extends Declarations = Declarations> extends StateFileOptions<D>, SharedFdOptions {}

/** Default number of snapshot slots. */
export const DEFAULT_STATE_ENTRIES = 256;

/**
 * The default data ring holds the payloads of all slots, up to this many, and at most
 * {@link DEFAULT_RING_MAX} bytes: a large `entries` alone does not make a large ring.
 */
const DEFAULT_RING_SLOTS = 2 ** 12;
const DEFAULT_RING_MAX = 2 ** 24;

/**
 * A program's state in a shared memory file, as declared structures (append-only logs,
 * versioned cells, counter sets) that are crash-consistent under
 * `shm-restore --snapshot=restore-v1` by construction. See docs/state.md.
 *
 * ```js
 * const state = StateFile.fromEnv({ events: appendLog(1 << 20), totals: counterSet(4) });
 * const { events, totals } = state.structures;
 * events.append(bytes);
 * totals.add(0, 1n);
 * state.commit();             // one snapshot naming both
 * ```
 *
 * One process at a time may open a file (there is one snapshot writer per file).
 */
export class StateFile<D extends Declarations> implements StructureContainer {
  /** The structures, by declared name. */
  readonly structures: Structures<D>;
  /** The memory file. */
  readonly file: MemoryFile;
  /** Where the declared structures lie in the tail. */
  readonly layout: StateLayout;
  /** @internal */
  readonly writer: SnapshotWriter;
  readonly #mapping: Mapping;
  readonly #list: Structure[];
  readonly #payload: Uint8Array;
  readonly #payloadU32: Uint32Array;
  #recovered: boolean;
  readonly #ownsFile: boolean;
  readonly #readOnly: boolean;
  #migrating = false;
  #migrated = false;
  #sequence: number;
  #dirty = false;
  #dirtyPages: DirtyPages | undefined;
  #ownsDirtyPages = false;

  private constructor(file: MemoryFile, mapping: Mapping, writer: SnapshotWriter, layout: StateLayout, newest: DecodedPayload | undefined, ownsFile: boolean, log: Log, readOnly = false) {
    this.file = file;
    this.#mapping = mapping;
    // The old state of a migration must stay exactly as its snapshots name it: a cell's
    // first stage would invalidate snapshots before markDirty could refuse it.
    this.writer = readOnly ? (Object.create(writer, { invalidateBefore: { value: () => this.markDirty() } }) as SnapshotWriter) : writer;
    this.#readOnly = readOnly;
    this.layout = layout;
    this.#ownsFile = ownsFile;
    this.#recovered = newest !== undefined;
    this.#sequence = newest?.sequence ?? 0;
    this.#payload = new Uint8Array(layout.payloadBytes);
    this.#payloadU32 = new Uint32Array(this.#payload.buffer);
    const u32 = this.#payloadU32;
    u32[0] = PAYLOAD_MAGIC;
    u32[1] = layout.structures.length;
    u32[2] = Number(layout.hash & 0xffffffffn);
    u32[3] = Number(layout.hash >> 32n);
    if (layout.base !== 0) storeU64(u32, u32.length - 2, layout.base);

    const tail = writer.tail;
    const named: Record<string, AppendLog | VersionedCell<CellArray> | CounterSet | KeyValueMap> = {};
    this.#list = [];
    for (const s of layout.structures) {
      const region = tail.subarray(s.offset, s.offset + s.length);
      const d = s.declaration;
      const words = newest?.words;
      const a = words?.[2 * s.index] ?? 0;
      const b = words?.[2 * s.index + 1] ?? 0;
      let structure: AppendLog | VersionedCell<CellArray> | CounterSet | KeyValueMap;
      if (d.kind === 'map') {
        const map = new KeyValueMap(this, s.name, mapping, region.byteOffset - mapping.bytes.byteOffset, region.length, file.fd);
        const damage = map.restore(a, b, newest === undefined, log);
        if (damage !== undefined) throw corrupt(file, damage);
        structure = map;
      } else if (d.kind === 'log') {
        const log = new AppendLog(this, s.name, region, d);
        const damage = log.restore(a, b);
        if (damage !== undefined) throw corrupt(file, damage);
        structure = log;
      } else {
        const type = d.kind === 'cell' ? d.type : BigUint64Array;
        const length = d.kind === 'cell' ? d.length : d.count;
        const cell = new VersionedCell<CellArray>(this, s.name, region, type, length, d.copies, s.stride);
        cell.restore(a, newest === undefined);
        structure = d.kind === 'cell' ? cell : new CounterSet(cell as VersionedCell<BigUint64Array>);
      }
      named[s.name] = structure;
      this.#list.push(structure);
    }
    this.structures = Object.freeze(named) as unknown as Structures<D>;
  }

  /**
   * Opens the state in the memory file the wrappers (`shm-restore`, `shm-fd`) pass as
   * `SHM_SHARED_FD` (or `options.name`). See {@link open}.
   * @throws {@link ShmfdError} `ERR_STATE_NO_SHARED_FD` when the program runs without one;
   *   the errors of {@link open} and of `SharedFd.fromEnv`
   */
  static fromEnv<D extends Declarations>(declarations: D, options: StateFromEnvOptions<D> = {}): StateFile<D> {
    const file = SharedFd.fromEnv(options);
    if (file === undefined) {
      throw new ShmfdError(
        'ERR_STATE_NO_SHARED_FD',
        `no shared memory file ${options.name ?? SHARED_FD_NAME} was passed; run the program under shm-restore (or shm-fd)`,
      );
    }
    // Before anything is written: from the flag on, the host trusts the marks.
    let dirtyPages: DirtyPages | undefined;
    try {
      dirtyPages = options.dirtyPages ?? DirtyPages.fromEnv({ env: options.env });
      const state = StateFile.#open(file, declarations, { ...options, dirtyPages }, true);
      state.#ownsDirtyPages = options.dirtyPages === undefined;
      return state;
    } catch (err) {
      if (options.dirtyPages === undefined) dirtyPages?.close();
      throw err;
    }
  }

  /**
   * Opens the state in `file`: grows the file to fit the declared structures, configures a
   * snapshot file when it has no committed state, and recovers the newest committed state
   * otherwise. Records and copies written after that state (an update a crash
   * interrupted) are discarded. When the committed state was declared differently and
   * `options.migrate` is given, migrates it (see {@link StateFileOptions.migrate}).
   *
   * @throws {@link ShmfdError} `ERR_STATE_DECLARATION` for invalid declarations or options;
   *   `ERR_STATE_LAYOUT_MISMATCH` when the file holds committed state declared differently
   *   (or written by something else) and there is no migration, or when the file's
   *   snapshot ring cannot hold the new declarations' payloads;
   *   `ERR_STATE_MIGRATION_FAILED` when the migration throws (the old state is kept);
   *   `ERR_STATE_CORRUPT` when its newest snapshot does not
   *   describe a well-formed state; the `ERR_SNAPSHOT_*` errors of a damaged snapshot head.
   *   Declaration and layout errors leave the file untouched; no error changes committed
   *   state.
   */
  static open<D extends Declarations>(file: MemoryFile, declarations: D, options: StateFileOptions<D> = {}): StateFile<D> {
    return StateFile.#open(file, declarations, options, false);
  }

  static #open<D extends Declarations>(file: MemoryFile, declarations: D, options: StateFileOptions<D>, ownsFile: boolean): StateFile<D> {
    let layout = planLayout(declarations);
    const wanted = wantedConfig(layout, options);
    const log = options.log ?? new StderrLog('shmfd');
    let mapping = file.size > 0 ? file.map() : undefined;
    try {
      // A file too small for a snapshot file is new, unless its head says it was configured:
      // then it was cut short, and discovery says so (ERR_SNAPSHOT_TOO_SMALL).
      const discovery = mapping === undefined || !startsWithMagic(mapping.bytes) ? undefined : discover(file, mapping);
      const valid = discovery?.valid() ?? [];
      let config: { entries: number; data: number; initialOffset: number };
      let old: StateLayout | undefined;
      if (discovery !== undefined && valid.length > 0) {
        const head = discovery.head;
        const newest = valid[valid.length - 1]!;
        const raw = discovery.read(newest);
        // A payload that names no directory in the file is checked against the first page:
        // another program's file is a layout mismatch, a damaged payload corrupt.
        const named = payloadBase(raw);
        const base = typeof named === 'number' && named + PAGE <= head.tailLength ? named : 0;
        const directory = mapping!.bytes.subarray(head.tailStart + base, head.tailStart + base + PAGE);
        layout = planLayout(declarations, base);
        const difference = directoryDifference(directory, layout);
        if (difference !== undefined) {
          const found = options.migrate === undefined ? undefined : declarationsOf(directory, base);
          if (found === undefined || typeof found === 'string') {
            throw new ShmfdError('ERR_STATE_LAYOUT_MISMATCH', `${file.name}: holds committed state of another layout (${difference}); use another file, or migrate it`);
          }
          old = planLayout(found, base);
          // The new layout goes where it overlaps nothing the old one uses: before it when
          // it fits there (the space of the layout before the last migration), else after it.
          layout = planLayout(declarations, planLayout(declarations).tailBytes <= base ? 0 : old.tailBytes);
        }
        const decoded = decodePayload(raw, old ?? layout);
        if (typeof decoded === 'string') throw corrupt(file, `the newest snapshot (slot ${newest.index}): ${decoded}`);
        const unsafe = unsafeConfig(head.entries, head.data, layout.payloadBytes);
        if (unsafe !== undefined) throw new ShmfdError('ERR_STATE_LAYOUT_MISMATCH', `${file.name}: its snapshot layout is unsafe for these declarations (${unsafe}); use another file`);
        config = { entries: head.entries, data: head.data, initialOffset: head.writeOffset };
      } else {
        // Continue the stream where it was, so a restore host never sees an old position again.
        const previous = discovery?.head.writeOffset ?? 0;
        config = { ...wanted, initialOffset: Math.min(previous, Number.MAX_SAFE_INTEGER - wanted.data) };
      }
      const required = tailStart(config.entries, config.data) + Math.max(layout.tailBytes, old?.tailBytes ?? 0);
      if (mapping === undefined || file.size < required) {
        mapping?.unmap();
        mapping = undefined;
        file.grow(required);
        mapping = file.map();
      }
      const writer = new SnapshotFile(mapping.bytes).configure(config);
      const dirty = options.dirtyPages;
      if (old !== undefined) return StateFile.#migrate(file, mapping, writer, old, layout, options.migrate!.bind(options), ownsFile, log, dirty);
      const newest = adoptSnapshots(file, writer, layout);
      if (newest === undefined) {
        writeDirectory(writer.tail, layout);
        dirty?.mark(writer.layout.tailStart + layout.base, PAGE);
      }
      const state = new StateFile<D>(file, mapping, writer, layout, newest?.payload, ownsFile, log);
      state.#dirtyPages = dirty;
      if (newest !== undefined) {
        for (const { payload, offset } of newest.all) state.#named(payload, offset);
      }
      return state;
    } catch (err) {
      mapping?.unmap();
      throw err;
    }
  }

  /**
   * Builds the `next` layout's state past (or before) the `old` one's regions, which it
   * never writes, and publishes it with one commit: until that snapshot, every valid
   * snapshot names the old layout, intact; after it, the newest names the new one, complete.
   */
  static #migrate<D extends Declarations>(file: MemoryFile, mapping: Mapping, writer: SnapshotWriter, old: StateLayout, layout: StateLayout, migrate: NonNullable<StateFileOptions<D>['migrate']>, ownsFile: boolean, log: Log, dirty: DirtyPages | undefined): StateFile<D> {
    // Snapshots of still older layouts may name the bytes the new layout takes: only the
    // old layout's stay valid (adopting invalidates the others, oldest first).
    const adopted = adoptSnapshots(file, writer, old)!;
    const before = new StateFile<Declarations>(file, mapping, writer, old, adopted.payload, false, log, true);
    for (const { payload, offset } of adopted.all) before.#named(payload, offset);
    writeDirectory(writer.tail.subarray(layout.base), layout);
    dirty?.mark(writer.layout.tailStart + layout.base, PAGE);
    const next = new StateFile<D>(file, mapping, writer, layout, undefined, ownsFile, log);
    next.#dirtyPages = dirty;
    next.#migrating = true;
    try {
      migrate(before.structures as Readonly<Record<string, AnyStructure>>, next.structures);
    } catch (err) {
      const names = (l: StateLayout): string => l.structures.map((s) => s.name).join(', ');
      throw new ShmfdError(
        'ERR_STATE_MIGRATION_FAILED',
        `${file.name}: the migration from [${names(old)}] to [${names(layout)}] failed (${err instanceof Error ? err.message : String(err)}); the old state is kept, the next open migrates again`,
        { cause: err },
      );
    }
    next.#migrating = false;
    next.#migrated = true;
    next.#recovered = true;
    next.#sequence = adopted.payload.sequence;
    next.#dirty = true;
    next.commit();
    return next;
  }

  /** Whether opening migrated the file's committed state to these declarations. */
  get migrated(): boolean {
    return this.#migrated;
  }

  /** Whether the file held a committed state when it was opened. */
  get recovered(): boolean {
    return this.#recovered;
  }

  /**
   * Number of the last commit (1 for the first commit to the file; carried across
   * restarts). 0 before the first commit.
   */
  get sequence(): number {
    return this.#sequence;
  }

  /** Whether something changed since the last commit. */
  get dirty(): boolean {
    return this.#dirty;
  }

  /** Layout of the snapshot file (slots, data ring, where the tail starts). */
  get snapshotLayout(): SnapshotLayout {
    return this.writer.layout;
  }

  /** @internal */
  markDirty(): void {
    if (this.#readOnly) throw new ShmfdError('ERR_STATE_READ_ONLY', `${this.file.name}: the state a migration reads is read only; change the new structures`);
    this.#dirty = true;
  }

  /** @internal */
  written(view: Uint8Array, start: number, end: number): void {
    this.#dirtyPages?.mark(view.byteOffset - this.#mapping.bytes.byteOffset + this.#mapping.offset + start, end - start);
  }

  /**
   * Publishes the current state of every structure as one snapshot: the appended records of
   * every log and the staged version of every cell become committed together, or (after a
   * crash before the snapshot is published) none of them. Does nothing when nothing
   * changed since the last commit.
   * @returns whether a snapshot was published
   */
  commit(): boolean {
    if (this.#migrating) throw new ShmfdError('ERR_STATE_READ_ONLY', `${this.file.name}: a migration cannot commit; the new state is committed when the migration returns`);
    if (!this.#dirty) return false;
    const sequence = this.#sequence + 1;
    const u32 = this.#payloadU32;
    storeU64(u32, 4, sequence);
    const list = this.#list;
    for (let i = 0; i < list.length; i++) list[i]!.encode(u32, 6 + 4 * i);
    const offset = this.writer.writeOffset;
    this.writer.commit(this.#payload);
    for (let i = 0; i < list.length; i++) list[i]!.published(offset);
    this.#sequence = sequence;
    this.#dirty = false;
    return true;
  }

  /**
   * Unmaps the file (and closes it when {@link fromEnv} opened it). Uncommitted changes
   * stay in memory but are not part of the state. The structures must not be used after.
   */
  close(): void {
    this.#mapping.unmap();
    if (this.#ownsFile) this.file.close();
    if (this.#ownsDirtyPages) this.#dirtyPages?.close();
  }

  /** Tells every cell, map and retained log what the valid snapshot at `offset` names. */
  #named(payload: DecodedPayload, offset: number): void {
    for (const s of this.layout.structures) {
      const structure = this.#list[s.index]!;
      if (structure instanceof AppendLog) {
        structure.named(payload.words[2 * s.index]!, offset);
        continue;
      }
      if (structure instanceof KeyValueMap) {
        structure.named(payload.words[2 * s.index]!, offset);
        continue;
      }
      const cell = structure instanceof CounterSet ? structure.cell : (structure as VersionedCell<CellArray>);
      cell.named(payload.words[2 * s.index]!, offset);
    }
  }
}

function corrupt(file: MemoryFile, problem: string): ShmfdError {
  return new ShmfdError('ERR_STATE_CORRUPT', `${file.name}: ${problem}; the committed state cannot be recovered by this program`);
}

function wantedConfig(layout: StateLayout, options: { entries?: number; data?: number }): { entries: number; data: number } {
  const entries = options.entries ?? DEFAULT_STATE_ENTRIES;
  let data = options.data;
  if (data === undefined) {
    data = PAGE;
    while (data <= layout.payloadBytes * Math.min(entries, DEFAULT_RING_SLOTS) && data < DEFAULT_RING_MAX) data *= 2;
  }
  try {
    checkConfig({ entries, data });
  } catch (err) {
    if (err instanceof SnapshotFormatError) throw new ShmfdError('ERR_STATE_DECLARATION', err.message);
    throw err;
  }
  const unsafe = unsafeConfig(entries, data, layout.payloadBytes);
  if (unsafe !== undefined) throw new ShmfdError('ERR_STATE_DECLARATION', unsafe);
  return { entries, data };
}

/**
 * Why a commit under this configuration could drop the newest committed state before it
 * publishes the next one (a crash in between would then leave none), or undefined. A
 * commit empties the slot it reuses and every snapshot it overwrites: with one slot, or a
 * ring shorter than two payloads, that is the newest.
 */
function unsafeConfig(entries: number, data: number, payloadBytes: number): string | undefined {
  if (entries < 2) return `a state file needs at least 2 snapshot slots (entries), got ${entries}: with one, every commit empties the committed state first`;
  if (data < 2 * payloadBytes) {
    return `a snapshot payload of ${payloadBytes} bytes needs a data ring of at least twice that (${2 * payloadBytes}), got ${data}: a commit would overwrite the committed state first`;
  }
  return undefined;
}

function startsWithMagic(bytes: Uint8Array): boolean {
  return bytes.length >= 8 && new DataView(bytes.buffer, bytes.byteOffset, 8).getBigUint64(0, true) === MAGIC;
}

function discover(file: MemoryFile, mapping: Mapping): FileDiscovery | undefined {
  try {
    return new SnapshotFile(mapping.bytes).recover();
  } catch (err) {
    if (err instanceof SnapshotFormatError) throw new SnapshotFormatError(err.code, `${file.name}: ${err.message}`);
    throw err;
  }
}

interface Adopted {
  /** The newest snapshot's payload. */
  readonly payload: DecodedPayload;
  /** Every valid snapshot's payload and offset, oldest first. */
  readonly all: { payload: DecodedPayload; offset: number }[];
}

/**
 * Decodes the writer's valid snapshots. One that does not decode cannot come from this
 * layout: it and every older one are invalidated (the newest was checked before).
 */
function adoptSnapshots(file: MemoryFile, writer: SnapshotWriter, layout: StateLayout): Adopted | undefined {
  const valid: Snapshot[] = writer.valid();
  const all: { payload: DecodedPayload; offset: number }[] = [];
  let bad = -1;
  for (const s of valid) {
    const decoded = decodePayload(writer.read(s), layout);
    if (typeof decoded === 'string') bad = s.offset;
    else all.push({ payload: decoded, offset: s.offset });
  }
  if (bad >= 0) writer.invalidateBefore(bad + 1);
  const kept = all.filter((x) => x.offset > bad);
  const newest = kept[kept.length - 1];
  if (newest === undefined) {
    if (valid.length > 0) throw corrupt(file, 'no snapshot decodes');
    return undefined;
  }
  return { payload: newest.payload, all: kept };
}

/** Writes the directory page of a file without committed state, unless it is already there. */
function writeDirectory(tail: Uint8Array, layout: StateLayout): void {
  const page = tail.subarray(0, PAGE);
  const d = layout.directory;
  let same = true;
  for (let i = 0; i < d.length && same; i++) same = page[i] === d[i];
  if (same) return;
  page.fill(0);
  page.set(d);
}
