/**
 * shmfd: keep a program's in-memory state across restarts, crashes and upgrades.
 * @module
 */
export { ShmfdError, type ShmfdErrorCode } from './base/errors.js';
export type { Log } from './base/log.js';
export { SystemError, isSystemError, Seal, type SocketAddress, type SocketInfo } from './system/libc.js';
export {
  MemoryFile,
  Mapping,
  type CreateMemoryFileOptions,
  type MapOptions,
  type TypedArrayConstructor,
} from './fds/memory-file.js';
export {
  findListenFd,
  readListenFds,
  findPassedFd,
  listenPidTarget,
  listenEnv,
  withEnv,
  checkFdName,
  DEFAULT_FIRST_FD,
  UNKNOWN_NAME,
  type PassedFd,
  type Environment,
  type ReadListenFdsOptions,
  type ListenEnvOptions,
} from './fds/listen-fds.js';
export {
  Notifier,
  parseNotifySocket,
  fdStoreCapacity,
  fdStoreWarning,
  watchdogUsec,
  keepWatchdogFed,
  MAX_MESSAGE_BYTES,
  type NotifyState,
  type StoreFdsOptions,
  type WatchdogKeeper,
} from './fds/notify.js';
export { SharedFd, SHARED_FD_NAME, type SharedFdOptions } from './fds/shared-fd.js';
export { execReplace, resolveCommand, type ExecRequest, type FdPlacement } from './exec/exec.js';
export {
  parseSocketSpec,
  openSocket,
  socketFitsSpec,
  prepareSockets,
  describeSocket,
  DEFAULT_SOCKET_HOST,
  SOCKET_BACKLOG,
  type SocketKind,
  type SocketSpec,
  type OpenSocket,
  type SocketLog,
  type PrepareSocketsOptions,
  type PreparedSockets,
} from './sockets/open.js';
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
export {
  runRestoreHost,
  childDescriptors,
  childStdio,
  exitStatus,
  SNAPSHOT_MODES,
  FORWARDED_SIGNALS,
  EXIT_HOST_FAILURE,
  type RestoreHostOptions,
  type SnapshotMode,
} from './restore/host.js';
export { BackupFile, type BackupFormat, type BackupInspection, type BackupRecord } from './restore/backup.js';
export { persistAtomically, type PersistOptions, type PersistResult, type PersistTimings } from './restore/persist.js';
export { Snapshotter, DEFAULT_INTERVAL_MS, type DurableSnapshot, type SnapshotterOptions } from './restore/snapshotter.js';
export { backupStatus, type BackupStatus } from './restore/status.js';
export * from './snapshot/index.js';
export * from './state/index.js';
