/**
 * State data structures on top of snapshots: append-only logs, versioned cells and
 * counter sets in the tail of a snapshot file, crash-consistent under
 * `shm-restore --snapshot=restore-v1` by construction (docs/state.md).
 * @module
 */
export {
  StateFile,
  DEFAULT_STATE_ENTRIES,
  type StateFileOptions,
  type StateFromEnvOptions,
  type AnyStructure,
  type Structures,
  type StructureOf,
} from './state-file.js';
export { AppendLog, recordBytes } from './log.js';
export { VersionedCell, CounterSet } from './cell.js';
export { KeyValueMap, keyValueMap, MAX_KEY_BYTES, entryBytes, type MapKey, type MapDeclaration, type KeyValueMapOptions } from './kv-map.js';
export {
  appendLog,
  type AppendLogOptions,
  versionedCell,
  counterSet,
  planLayout,
  MAX_STRUCTURES,
  MAX_NAME_BYTES,
  type CellArray,
  type CellArrayConstructor,
  type CopiesOptions,
  type Declaration,
  type Declarations,
  type LogDeclaration,
  type CellDeclaration,
  type CounterDeclaration,
  type PlacedStructure,
  type StateLayout,
} from './layout.js';
