/**
 * shmfd, the main entry: what a program uses to keep its state across restarts, crashes
 * and upgrades. Each name is described in docs/api.md; the snapshot format over bytes is
 * the entry `shmfd/snapshot`. What the commands use inside (exec, opening sockets, the
 * restore host) is not exported, so importing this loads nothing that spawns,
 * speaks HTTP or UDP, or scans the descriptors, and koffi only comes with the first call
 * into libc (test/package.test.js checks it).
 * @module
 */
export type { Log } from './base/log.js';
export { ShmfdError, type ShmfdErrorCode } from './base/errors.js';
export { SystemError, isSystemError, Seal, type SocketAddress, type SocketInfo } from './system/libc.js';
export {
  MemoryFile,
  type Mapping,
  type CreateMemoryFileOptions,
  type MapOptions,
  type TypedArrayConstructor,
} from './fds/memory-file.js';
export {
  findListenFd,
  readListenFds,
  findPassedFd,
  type PassedFd,
  type Environment,
  type ReadListenFdsOptions,
} from './fds/listen-fds.js';
export {
  Notifier,
  fdStoreCapacity,
  fdStoreWarning,
  keepWatchdogFed,
  type NotifyState,
  type StoreFdsOptions,
  type WatchdogKeeper,
} from './fds/notify.js';
export { SharedFd, type SharedFdOptions } from './fds/shared-fd.js';
export { DirtyPages, DIRTY_PAGES_NAME, type DirtyPagesOptions } from './fds/dirty-pages.js';
export {
  findPassedSocket,
  listenOn,
  openDatagram,
  type PassedSocket,
  type FindPassedSocketOptions,
  type FallbackAddress,
  type ListenOnOptions,
  type Listening,
  type OpenDatagramOptions,
} from './sockets/adopt.js';
export { serve, type Endpoint, type ServeOptions, type Service } from './sockets/serve.js';
export { StateFile, type StateFileOptions, type StateFromEnvOptions, type AnyStructure, type Structures, type StructureOf } from './state/state-file.js';
export {
  appendLog,
  versionedCell,
  counterSet,
  type AppendLogOptions,
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
} from './state/layout.js';
export { recordBytes, type AppendLog } from './state/log.js';
export type { VersionedCell, CounterSet } from './state/cell.js';
export { keyValueMap, entryBytes, MAX_KEY_BYTES, type KeyValueMap, type KeyValueMapOptions, type MapDeclaration, type MapKey } from './state/kv-map.js';
