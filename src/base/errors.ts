/**
 * Errors raised by shmfd itself (as opposed to {@link SystemError}s from the kernel).
 * Every one carries a stable `code`; match on it, not on the message. The codes are
 * listed in docs/errors.md.
 * @module
 */

/**
 * Stable codes of the snapshot format's errors (`SnapshotFormatError`); match on these,
 * not on messages. docs/snapshot.md describes when each one is raised.
 */
export type SnapshotErrorCode =
  | 'ERR_SNAPSHOT_TOO_SMALL'
  | 'ERR_SNAPSHOT_SHORT_BUFFER'
  | 'ERR_SNAPSHOT_BAD_MASK'
  | 'ERR_SNAPSHOT_BEYOND_END'
  | 'ERR_SNAPSHOT_BAD_OFFSET'
  | 'ERR_SNAPSHOT_NOT_CONFIGURED'
  | 'ERR_SNAPSHOT_BAD_CONFIG'
  | 'ERR_SNAPSHOT_ALIGNMENT'
  | 'ERR_SNAPSHOT_PAYLOAD_SIZE'
  | 'ERR_SNAPSHOT_BAD_SNAPSHOT'
  | 'ERR_SNAPSHOT_TRANSACTION_CLOSED'
  | 'ERR_SNAPSHOT_BUSY';

/** Stable error codes of shmfd. */
export type ShmfdErrorCode =
  | SnapshotErrorCode
  | 'ERR_LISTEN_FDS_INVALID'
  | 'ERR_LISTEN_FDNAMES_MISMATCH'
  | 'ERR_LISTEN_FDNAME_INVALID'
  | 'ERR_FD_NOT_PASSED'
  | 'ERR_NOT_A_MEMORY_FILE'
  | 'ERR_DIRTY_PAGES_INVALID'
  | 'ERR_MEMORY_FILE_CLOSED'
  | 'ERR_MAPPING_RANGE'
  | 'ERR_NOTIFY_SOCKET_INVALID'
  | 'ERR_NOTIFY_UNSUPPORTED'
  | 'ERR_NOTIFY_MESSAGE'
  | 'ERR_INVALID_ARGUMENT'
  | 'ERR_COMMAND_NOT_FOUND'
  | 'ERR_COMMAND_NOT_EXECUTABLE'
  | 'ERR_SOCKET_SPEC'
  | 'ERR_SOCKET_OPEN'
  | 'ERR_SOCKET_KIND'
  | 'ERR_SOCKET_NOT_LISTENING'
  | 'ERR_NOT_A_SOCKET'
  | 'ERR_BACKUP_INVALID'
  | 'ERR_BACKUP_DAMAGED'
  | 'ERR_BACKUP_ACCESS'
  | 'ERR_BACKUP_IN_USE'
  | 'ERR_REPLICA_URL'
  | 'ERR_REPLICA_CREDENTIALS'
  | 'ERR_REPLICA_UNREACHABLE'
  | 'ERR_REPLICA_HELD'
  | 'ERR_REPLICA_DAMAGED'
  | 'ERR_STATE_DECLARATION'
  | 'ERR_STATE_NO_SHARED_FD'
  | 'ERR_STATE_LAYOUT_MISMATCH'
  | 'ERR_STATE_CORRUPT'
  | 'ERR_STATE_LOG_FULL'
  | 'ERR_STATE_RECORD_TOO_LARGE'
  | 'ERR_STATE_LOG_DROPPED'
  | 'ERR_STATE_MAP_FULL'
  | 'ERR_STATE_KEY_TOO_LARGE'
  | 'ERR_STATE_VALUE_TOO_LARGE'
  | 'ERR_STATE_MAP_CHANGED'
  | 'ERR_STATE_MIGRATION_FAILED'
  | 'ERR_STATE_READ_ONLY';

/** Base class of the errors shmfd raises. */
export class ShmfdError extends Error {
  readonly code: ShmfdErrorCode;

  constructor(code: ShmfdErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'ShmfdError';
    this.code = code;
  }
}
