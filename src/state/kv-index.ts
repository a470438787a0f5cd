/**
 * The key-value map's index tables (the map's own, and the one a rebuild fills): open
 * addressing with linear probing and no tombstones. A slot is `stride` u32 words: the
 * record it names (0 for an empty slot), the key's hash, then whatever the table keeps.
 * @module
 */

/** Empties `slot` of the table of `mask + 1` slots at word `base` of `t`, moving later slots of its probe run back. */
export function removeSlot(t: Uint32Array, base: number, stride: number, mask: number, slot: number): void {
  let hole = slot;
  for (let i = (slot + 1) & mask; ; i = (i + 1) & mask) {
    const s = base + stride * i;
    if (t[s] === 0) break;
    const home = t[s + 1]! & mask;
    // Move the entry into the hole unless its home lies cyclically in (hole, i].
    if (hole <= i ? home <= hole || home > i : home <= hole && home > i) {
      for (let w = 0; w < stride; w++) t[base + stride * hole + w] = t[s + w]!;
      hole = i;
    }
  }
  for (let w = 0; w < stride; w++) t[base + stride * hole + w] = 0;
}

/** The first empty slot of the probe run of `hash` in the table of `mask + 1` slots at word `base` of `t`. */
export function emptySlot(t: Uint32Array, base: number, stride: number, mask: number, hash: number): number {
  let i = hash & mask;
  while (t[base + stride * i] !== 0) i = (i + 1) & mask;
  return i;
}
