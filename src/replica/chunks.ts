/**
 * A replicated state as chunks: the backup cut into pieces of a size that depends on the
 * state's ({@link chunkSizeFor}), each held by a data message of the stream (one message
 * holds up to {@link MESSAGE_BYTES} of consecutive chunks; a chunk of zeros is held by
 * none). A state is the stream sequence of each chunk's message, and the digest that binds
 * them, so that a new state re-sends only the chunks that changed and names the others
 * where they already are.
 *
 * Pure: bytes and numbers in, bytes and numbers out.
 * @module
 */
import crypto from 'node:crypto';

/** Smallest chunk: a scattered change of one page re-sends two pages. */
const MIN_CHUNK_SIZE = 8 * 1024;
/** Largest chunk: a state of a gigabyte or more is 16 Ki chunks or more. */
const MAX_CHUNK_SIZE = 64 * 1024;
/**
 * Chunks a state is cut into at most, while its chunks can be smaller than {@link MAX_CHUNK_SIZE}:
 * a base manifest lists a run per chunk at worst (~20 bytes each), and must fit a message.
 */
const MOST_CHUNKS = 16 * 1024;

/** Bytes of consecutive chunks sent in one message at most: fewer messages for the same bytes. */
export const MESSAGE_BYTES = 512 * 1024;

const DIGEST_BYTES = 32;

/**
 * The chunk size of a state of `size` bytes: the smallest power of two from
 * {@link MIN_CHUNK_SIZE} that cuts it into at most 16 Ki chunks, at most {@link MAX_CHUNK_SIZE}
 * (8 KiB up to 128 MiB, 64 KiB from 1 GiB on).
 */
export function chunkSizeFor(size: number): number {
  let chunkSize = MIN_CHUNK_SIZE;
  while (chunkSize < MAX_CHUNK_SIZE && Math.ceil(size / chunkSize) > MOST_CHUNKS) chunkSize *= 2;
  return chunkSize;
}

/** Whether a manifest's chunk size is one this version reads: a power of two from 4 KiB to 64 MiB. */
export function readableChunkSize(chunkSize: unknown): chunkSize is number {
  return typeof chunkSize === 'number' && Number.isInteger(chunkSize) && chunkSize >= 4096 && chunkSize <= 64 * 2 ** 20 && (chunkSize & (chunkSize - 1)) === 0;
}

/** Where each chunk of a state is, and what it holds. */
export interface ChunkTable {
  /** Size of the state in bytes. */
  size: number;
  /** Bytes per chunk (the last one may be shorter). */
  chunkSize: number;
  /** Stream sequence of each chunk's data message; 0 for a chunk of zeros. */
  seqs: Float64Array;
  /** SHA-256 of each chunk, {@link DIGEST_BYTES} bytes per chunk. */
  digests: Buffer;
}

/** Number of chunks of `chunkSize` bytes of a state of `size` bytes. */
export function chunkCount(size: number, chunkSize: number): number {
  return Math.ceil(size / chunkSize);
}

/** Bytes of chunk `index` of a state of `size` bytes (the last one may be shorter). */
export function chunkLength(size: number, chunkSize: number, index: number): number {
  return Math.min(chunkSize, size - index * chunkSize);
}

/** A table of `size` bytes of zeros, in chunks of `chunkSize` (by default the size's own). */
export function zeroTable(size: number, chunkSize = chunkSizeFor(size)): ChunkTable {
  const n = chunkCount(size, chunkSize);
  const digests = Buffer.allocUnsafe(n * DIGEST_BYTES);
  for (let i = 0; i < n; i++) zeroDigest(chunkLength(size, chunkSize, i)).copy(digests, i * DIGEST_BYTES);
  return { size, chunkSize, seqs: new Float64Array(n), digests };
}

/** SHA-256 of `bytes`. */
export function chunkDigest(bytes: Uint8Array): Buffer {
  return crypto.createHash('sha256').update(bytes).digest();
}

const zeroDigests = new Map<number, Buffer>();

/** SHA-256 of `length` zero bytes (cached: there are at most two lengths per chunk size). */
export function zeroDigest(length: number): Buffer {
  let digest = zeroDigests.get(length);
  if (digest === undefined) {
    digest = chunkDigest(Buffer.alloc(length));
    zeroDigests.set(length, digest);
  }
  return digest;
}

/** Digest `index` of `table`. */
export function digestAt(table: ChunkTable, index: number): Buffer {
  return table.digests.subarray(index * DIGEST_BYTES, (index + 1) * DIGEST_BYTES);
}

/** Sets chunk `index` of `table`: its message and its digest. */
export function setChunk(table: ChunkTable, index: number, seq: number, digest: Uint8Array): void {
  table.seqs[index] = seq;
  table.digests.set(digest, index * DIGEST_BYTES);
}

/**
 * `table` resized to `size` bytes: chunks beyond it dropped, new ones zeros; a cut last
 * chunk keeps its message until re-sent. A size whose chunks are of another size starts
 * from zeros: every chunk is compared, and sent, again.
 */
export function resized(table: ChunkTable, size: number): ChunkTable {
  const chunkSize = chunkSizeFor(size);
  if (chunkSize !== table.chunkSize) return zeroTable(size, chunkSize);
  if (size === table.size) return table;
  const out = zeroTable(size, chunkSize);
  const keep = Math.min(chunkCount(size, chunkSize), chunkCount(table.size, chunkSize));
  out.seqs.set(table.seqs.subarray(0, keep));
  table.digests.copy(out.digests, 0, 0, keep * DIGEST_BYTES);
  return out;
}

/** A copy of `table` that later changes of it do not reach. */
export function copyTable(table: ChunkTable): ChunkTable {
  return { size: table.size, chunkSize: table.chunkSize, seqs: table.seqs.slice(), digests: Buffer.from(table.digests) };
}

/** The digest of a whole state: SHA-256 over its chunks' digests in order, hex. */
export function stateDigest(table: ChunkTable): string {
  return crypto.createHash('sha256').update(table.digests).digest('hex');
}

/**
 * Where the chunks are, as runs: flat triples `[firstIndex, seq, count, ...]`, one per run
 * of consecutive chunks held by the same message (a message holds consecutive chunks,
 * the first at the offset in its header); a run of seq 0 is zeros. Only chunks where
 * `seqs` differs from `from` are listed.
 */
export function encodeRuns(seqs: Float64Array, from?: Float64Array): number[] {
  const out: number[] = [];
  let last = -1;
  for (let i = 0; i < seqs.length; i++) {
    const seq = seqs[i]!;
    if (from !== undefined && i < from.length && from[i] === seq) continue;
    if (last >= 0 && out[last]! + out[last + 2]! === i && out[last + 1] === seq) {
      out[last + 2]!++;
    } else {
      last = out.length;
      out.push(i, seq, 1);
    }
  }
  return out;
}

/**
 * Applies runs ({@link encodeRuns}) to `seqs` in place.
 * @returns false when a run is malformed or reaches beyond the table
 */
export function applyRuns(seqs: Float64Array, runs: unknown): boolean {
  if (!Array.isArray(runs) || runs.length % 3 !== 0) return false;
  for (let r = 0; r < runs.length; r += 3) {
    const [first, seq, count] = [runs[r] as unknown, runs[r + 1] as unknown, runs[r + 2] as unknown];
    if (!isCount(first) || !isCount(seq) || !isCount(count) || count === 0 || first + count > seqs.length) return false;
    seqs.fill(seq, first, first + count);
  }
  return true;
}

function isCount(value: unknown): value is number {
  return typeof value === 'number' && Number.isSafeInteger(value) && value >= 0;
}
