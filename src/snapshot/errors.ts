/**
 * The error type of the snapshot format and API.
 * @module
 */

import { ShmfdError, type SnapshotErrorCode } from '../base/errors.js';

export type { SnapshotErrorCode };

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
