/**
 * The configuration of a snapshot file: what the Rust crate calls `ConfigureFile`.
 * @module
 */
import { SnapshotFormatError } from './errors.js';
import { MAX_DATA, MAX_ENTRIES, isPowerOfTwo, type DiscoveredHead } from './format.js';

/** The values that define a snapshot file's layout. */
export interface SnapshotConfig {
  /** Number of snapshot slots; a power of two, at most `MAX_ENTRIES`. */
  entries: number;
  /** Size of the data ring in bytes; a power of two, at least 2. */
  data: number;
  /** Stream position where writing starts (`write_offset`); default 0. */
  initialOffset?: number;
}

/**
 * A configuration that is either *initialized* (discovered from a configured file, or
 * completed by the caller) or still empty. Mirrors the Rust crate's flow:
 *
 * ```ts
 * const config = new ConfigureFile();
 * const found = file.recover(config);          // fills `config` when the file is configured
 * config.orInsertWith((c) => { c.entries = 0x100; c.data = 0x800; });
 * const writer = file.configure(config);
 * ```
 */
export class ConfigureFile implements SnapshotConfig {
  /** Number of snapshot slots; a power of two. */
  entries = 0;
  /** Size of the data ring in bytes; a power of two. */
  data = 0;
  /** Stream position of the next write. */
  initialOffset = 0;
  #initialized = false;

  /** An initialized configuration when `values` is given, an empty one otherwise. */
  constructor(values?: SnapshotConfig) {
    if (values !== undefined) this.#assign(values);
  }

  /** The configuration stored in a file's head. */
  static fromHead(head: DiscoveredHead): ConfigureFile {
    return new ConfigureFile({ entries: head.entries, data: head.data, initialOffset: head.writeOffset });
  }

  /** Whether the values are complete: discovered from a file or filled in. */
  isInitialized(): boolean {
    return this.#initialized;
  }

  /** Completes an empty configuration through `fill`; leaves an initialized one alone. */
  orInsertWith(fill: (config: ConfigureFile) => void): this {
    if (!this.#initialized) {
      fill(this);
      this.#initialized = true;
    }
    return this;
  }

  /** Completes an empty configuration with `values`; leaves an initialized one alone. */
  orInsert(values: SnapshotConfig): this {
    if (!this.#initialized) this.#assign(values);
    return this;
  }

  /** Copies another configuration, including whether it is initialized. */
  copyFrom(other: ConfigureFile): this {
    this.entries = other.entries;
    this.data = other.data;
    this.initialOffset = other.initialOffset;
    this.#initialized = other.#initialized;
    return this;
  }

  #assign(values: SnapshotConfig): void {
    this.entries = values.entries;
    this.data = values.data;
    this.initialOffset = values.initialOffset ?? 0;
    this.#initialized = true;
  }
}

/**
 * Validates a configuration before it is applied.
 * @internal
 */
export function checkConfig(config: SnapshotConfig): Required<SnapshotConfig> {
  if (config instanceof ConfigureFile && !config.isInitialized()) {
    throw new SnapshotFormatError('ERR_SNAPSHOT_NOT_CONFIGURED', 'the configuration is empty: complete it with orInsertWith() or orInsert() first');
  }
  const { entries, data } = config;
  const initialOffset = config.initialOffset ?? 0;
  if (!isPowerOfTwo(entries) || entries > MAX_ENTRIES) {
    throw new SnapshotFormatError('ERR_SNAPSHOT_BAD_CONFIG', `entries must be a power of two from 1 to ${MAX_ENTRIES}, got ${entries}`);
  }
  if (!isPowerOfTwo(data) || data < 2 || data > MAX_DATA) {
    throw new SnapshotFormatError('ERR_SNAPSHOT_BAD_CONFIG', `data must be a power of two from 2 to ${MAX_DATA}, got ${data}`);
  }
  if (!Number.isSafeInteger(initialOffset) || initialOffset < 0 || initialOffset > Number.MAX_SAFE_INTEGER - data) {
    throw new SnapshotFormatError('ERR_SNAPSHOT_BAD_CONFIG', `initialOffset must be an integer from 0 to 2^53 - data, got ${initialOffset}`);
  }
  return { entries, data, initialOffset };
}
