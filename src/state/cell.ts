/**
 * Versioned fixed-size values in a tail region: a value lives in one of `copies` copies,
 * and an update writes the next version into a copy that no valid snapshot names.
 * @module
 */
import { storeU64 } from '../snapshot/mapped.js';
import type { StructureContainer, Structure } from './structure.js';
import type { CellArray, CellArrayConstructor } from './layout.js';

/**
 * A fixed-size value (a typed array of a declared length) with versions (see
 * docs/state.md). Version `v` lives in copy `v % copies`. {@link stage} writes the next
 * version into its copy, starting from the current value; the next commit of the state
 * file publishes it. Before a copy is written again, every snapshot that still names it
 * is invalidated, so a restore never trusts a copy that is being overwritten.
 */
export class VersionedCell<T extends CellArray> implements Structure {
  /** The name the cell was declared under. */
  readonly name: string;
  /** Number of copies in the tail. */
  readonly copies: number;
  /** Elements of the value. */
  readonly length: number;
  readonly #container: StructureContainer;
  readonly #views: T[];
  readonly #bytes: Uint8Array[];
  /** Per copy: stream offset of the newest snapshot that named it, -1 when none can be valid. */
  readonly #lastNamed: Float64Array;
  #version = 0;
  #staged = false;

  /** @internal created by the state file. */
  constructor(container: StructureContainer, name: string, region: Uint8Array, type: CellArrayConstructor<T>, length: number, copies: number, stride: number) {
    this.#container = container;
    this.name = name;
    this.copies = copies;
    this.length = length;
    this.#views = [];
    this.#bytes = [];
    const valueBytes = length * type.BYTES_PER_ELEMENT;
    for (let c = 0; c < copies; c++) {
      this.#views.push(new type(region.buffer as ArrayBuffer, region.byteOffset + c * stride, length));
      this.#bytes.push(region.subarray(c * stride, c * stride + valueBytes));
    }
    this.#lastNamed = new Float64Array(copies).fill(-1);
  }

  /** The committed version: 0 before the first committed update. */
  get version(): number {
    return this.#version;
  }

  /** Whether an update is staged (written, not committed yet). */
  get staged(): boolean {
    return this.#staged;
  }

  /**
   * The newest value: the staged one if there is one, else the committed one. A view into
   * the shared memory: read it, do not modify it (use {@link stage} or {@link update}).
   */
  get value(): T {
    return this.#views[(this.#version + (this.#staged ? 1 : 0)) % this.copies]!;
  }

  /** The committed value (a view; do not modify it). */
  get committed(): T {
    return this.#views[this.#version % this.copies]!;
  }

  /**
   * Changes the next version: `change` receives it (a copy of the newest value, see
   * {@link value}) and modifies it in place. Several stages before a commit change the same
   * next version. If `change` throws, the staged version is dropped and the error rethrown.
   * Do not keep the array past the call.
   */
  stage(change: (next: T) => void): void {
    const next = this.staging();
    try {
      change(next);
    } catch (err) {
      this.#staged = false;
      throw err;
    }
  }

  /**
   * {@link stage}, then commits the state file.
   * @returns the committed version
   */
  update(change: (next: T) => void): number {
    this.stage(change);
    this.#container.commit();
    return this.#version;
  }

  /** Commits the whole state file (see `StateFile.commit`). */
  commit(): boolean {
    return this.#container.commit();
  }

  /** Drops the staged version, if any. */
  discard(): void {
    this.#staged = false;
  }

  /**
   * @internal The next version's array, prepared on first use after a commit: the
   * snapshots that name its copy are invalidated, then the current value is copied in.
   */
  staging(): T {
    const current = this.#version % this.copies;
    const target = (this.#version + 1) % this.copies;
    if (!this.#staged) {
      const named = this.#lastNamed[target]!;
      if (named >= 0) {
        this.#container.writer.invalidateBefore(named + 1);
        this.#lastNamed[target] = -1;
      }
      this.#bytes[target]!.set(this.#bytes[current]!);
      this.#staged = true;
      this.#container.markDirty();
    }
    return this.#views[target]!;
  }

  /** @internal */
  encode(u32: Uint32Array, word: number): void {
    if (this.#staged) {
      const copy = this.#bytes[(this.#version + 1) % this.copies]!;
      this.#container.written(copy, 0, copy.length);
    }
    storeU64(u32, word, this.#staged ? this.#version + 1 : this.#version);
    storeU64(u32, word + 2, 0);
  }

  /** @internal */
  published(offset: number): void {
    if (this.#staged) {
      this.#version++;
      this.#staged = false;
    }
    this.#lastNamed[this.#version % this.copies] = offset;
  }

  /** @internal A valid snapshot at stream `offset` names `version`. */
  named(version: number, offset: number): void {
    const copy = version % this.copies;
    if (offset > this.#lastNamed[copy]!) this.#lastNamed[copy] = offset;
  }

  /** @internal Takes over committed `version`; a fresh cell (version 0, no snapshot) is zeroed. */
  restore(version: number, fresh: boolean): void {
    this.#version = version;
    this.#staged = false;
    if (fresh) this.#bytes[0]!.fill(0);
  }
}

/**
 * A fixed set of unsigned 64-bit counters: a {@link VersionedCell} of a `BigUint64Array`.
 * {@link add} and {@link set} stage; {@link commit} publishes (per call or in batches).
 */
export class CounterSet implements Structure {
  readonly #cell: VersionedCell<BigUint64Array>;

  /** @internal created by the state file. */
  constructor(cell: VersionedCell<BigUint64Array>) {
    this.#cell = cell;
  }

  /** The name the set was declared under. */
  get name(): string {
    return this.#cell.name;
  }

  /** Number of counters. */
  get count(): number {
    return this.#cell.length;
  }

  /** Committed version (number of commits that changed a counter). */
  get version(): number {
    return this.#cell.version;
  }

  /** Whether changes are staged. */
  get staged(): boolean {
    return this.#cell.staged;
  }

  /**
   * Adds `delta` to counter `index` (wrapping at 2^64), staged until the next commit.
   * @returns the new value
   * @throws RangeError for an index out of range
   */
  add(index: number, delta: bigint | number = 1n): bigint {
    this.#check(index);
    const next = this.#cell.staging();
    next[index] = next[index]! + BigInt(delta);
    return next[index]!;
  }

  /** Sets counter `index` to `value` (taken modulo 2^64), staged until the next commit. */
  set(index: number, value: bigint | number): void {
    this.#check(index);
    this.#cell.staging()[index] = BigInt(value);
  }

  /** The newest value of counter `index` (staged changes included). */
  get(index: number): bigint {
    this.#check(index);
    return this.#cell.value[index]!;
  }

  /** The committed value of counter `index`. */
  committed(index: number): bigint {
    this.#check(index);
    return this.#cell.committed[index]!;
  }

  /** All newest values, copied. */
  values(): bigint[] {
    return Array.from(this.#cell.value);
  }

  /** Commits the whole state file (see `StateFile.commit`). */
  commit(): boolean {
    return this.#cell.commit();
  }

  /** Drops the staged changes. */
  discard(): void {
    this.#cell.discard();
  }

  /** @internal */
  encode(u32: Uint32Array, word: number): void {
    this.#cell.encode(u32, word);
  }

  /** @internal */
  published(offset: number): void {
    this.#cell.published(offset);
  }

  /** @internal */
  get cell(): VersionedCell<BigUint64Array> {
    return this.#cell;
  }

  #check(index: number): void {
    if (!Number.isInteger(index) || index < 0 || index >= this.#cell.length) {
      throw new RangeError(`counter set ${this.#cell.name}: index ${index} is not in 0..${this.#cell.length - 1}`);
    }
  }
}
