/**
 * The record format of a key-value map's ring: a 16-byte header (key length and flags,
 * value length, key hash, check word), the key, the value, zero padding to 8 bytes. Shared
 * by the map and its index rebuild; pure.
 * @module
 */

/** Longest key, in bytes (a string key counts its UTF-8 bytes). */
export const MAX_KEY_BYTES = 4096;
/** Bytes of an entry record's header: key length and flags, value length, hash, check. */
export const ENTRY_HEADER = 16;
/** Header flag: the record deletes its key. */
export const FLAG_TOMBSTONE = 0x0100_0000;
/** Header flag: the ring continues at its start (the record does not fit before the end). */
export const FLAG_WRAP = 0x0200_0000;
/** Header bits of the key length. */
export const KEY_MASK = 0x00ff_ffff;
/** Mixed into the check word, so that a zeroed header is not a valid one. */
export const CHECK_SALT = 0x6b76_6d70;

/** Bytes a record with a key of `keyBytes` and a value of `valueBytes` takes in the ring. */
export function entryBytes(keyBytes: number, valueBytes: number): number {
  // Modulo rather than `& ~7`: a length read from a damaged record may exceed 2^31.
  const n = keyBytes + valueBytes + 7;
  return ENTRY_HEADER + n - (n % 8);
}

/** 32-bit hash of `n` bytes of `b` (Murmur3's body and finalizer). */
export function hashBytes(b: Uint8Array, from: number, n: number): number {
  let h = n ^ 0x9747b28c;
  const end = from + (n & ~3);
  let i = from;
  for (; i < end; i += 4) {
    let k = b[i]! | (b[i + 1]! << 8) | (b[i + 2]! << 16) | (b[i + 3]! << 24);
    k = Math.imul(k, 0xcc9e2d51);
    k = (k << 15) | (k >>> 17);
    h ^= Math.imul(k, 0x1b873593);
    h = (h << 13) | (h >>> 19);
    h = (Math.imul(h, 5) + 0xe6546b64) | 0;
  }
  const rest = n & 3;
  if (rest !== 0) {
    let k = b[i]!;
    if (rest > 1) k ^= b[i + 1]! << 8;
    if (rest > 2) k ^= b[i + 2]! << 16;
    k = Math.imul(k, 0xcc9e2d51);
    k = (k << 15) | (k >>> 17);
    h ^= Math.imul(k, 0x1b873593);
  }
  h ^= h >>> 16;
  h = Math.imul(h, 0x85ebca6b);
  h ^= h >>> 13;
  h = Math.imul(h, 0xc2b2ae35);
  h ^= h >>> 16;
  return h >>> 0;
}
