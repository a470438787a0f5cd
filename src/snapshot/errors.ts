/**
 * The error type of the snapshot format and API.
 * @module
 */

/**
 * Stable codes of {@link SnapshotFormatError}; match on these, not on messages.
 * docs/snapshot.md describes when each one is raised.
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

import { ShmfdError } from '../errors.js';

/**
 * Raised for a file that is not (or not consistently) a snapshot file, and for calls the
 * format cannot honour. An *unconfigured* file is not an error: discovery returns
 * `undefined` for it.
 */
export class SnapshotFormatError extends ShmfdError {
  /** Stable identifier of the condition. */
  declare readonly code: SnapshotErrorCode;

  constructor(code: SnapshotErrorCode, message: string) {
    super(code, message);
    this.name = 'SnapshotFormatError';
  }
}
