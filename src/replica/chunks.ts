/**
 * A replicated state as chunks: the backup cut into {@link CHUNK_SIZE} pieces, each held by
 * a data message of the stream (one message holds up to {@link CHUNKS_PER_MESSAGE}
 * consecutive chunks; a chunk of zeros is held by none). A state is the stream sequence of
 * each chunk's message, and the digest that binds them, so that a new state re-sends only
 * the chunks that changed and names the others where they already are.
 *
 * Pure: bytes and numbers in, bytes and numbers out.
 * @module
 */
import crypto from 'node:crypto';

/** Bytes per chunk. Small enough that a scattered change re-sends little, large enough that a gigabyte is 16 Ki messages. */
export const CHUNK_SIZE = 64 * 1024;

/** Consecutive chunks sent in one message at most (512 KiB): fewer messages for the same bytes. */
export const CHUNKS_PER_MESSAGE = 8;

const DIGEST_BYTES = 32;

/** Where each chunk of a state is, and what it holds. */
export interface ChunkTable {
  /** Size of the state in bytes. */
  size: number;
  /** Stream sequence of each chunk's data message; 0 for a chunk of zeros. */
  seqs: Float64Array;
  /** SHA-256 of each chunk, {@link DIGEST_BYTES} bytes per chunk. */
  digests: Buffer;
}

/** Number of chunks of a state of `size` bytes. */
export function chunkCount(size: number): number {
  return Math.ceil(size / CHUNK_SIZE);
}

/** Bytes of chunk `index` of a state of `size` bytes (the last one may be shorter). */
export function chunkLength(size: number, index: number): number {
  return Math.min(CHUNK_SIZE, size - index * CHUNK_SIZE);
}

/** A table of `size` bytes of zeros. */
export function zeroTable(size: number): ChunkTable {
  const n = chunkCount(size);
  const digests = Buffer.allocUnsafe(n * DIGEST_BYTES);
  for (let i = 0; i < n; i++) zeroDigest(chunkLength(size, i)).copy(digests, i * DIGEST_BYTES);
  return { size, seqs: new Float64Array(n), digests };
}

/** SHA-256 of `bytes`. */
export function chunkDigest(bytes: Uint8Array): Buffer {
  return crypto.createHash('sha256').update(bytes).digest();
}

const zeroDigests = new Map<number, Buffer>();

/** SHA-256 of `length` zero bytes (cached: there are at most two lengths per state). */
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

/** `table` resized to `size` bytes: chunks beyond it dropped, new ones zeros; a cut last chunk keeps its message until re-sent. */
export function resized(table: ChunkTable, size: number): ChunkTable {
  if (size === table.size) return table;
  const out = zeroTable(size);
  const keep = Math.min(chunkCount(size), chunkCount(table.size));
  out.seqs.set(table.seqs.subarray(0, keep));
  table.digests.copy(out.digests, 0, 0, keep * DIGEST_BYTES);
  return out;
}

/** A copy of `table` that later changes of it do not reach. */
export function copyTable(table: ChunkTable): ChunkTable {
  return { size: table.size, seqs: table.seqs.slice(), digests: Buffer.from(table.digests) };
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
