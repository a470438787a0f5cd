/**
 * Which stream positions of a ring the valid snapshots may still name (a log's first
 * record, a map's tail), so that a structure invalidates exactly those snapshots before
 * it reuses ring bytes. Shared by the retained log and the key-value map.
 * @module
 */

/**
 * Positions named by snapshots that may be valid, oldest first, each with the stream offset
 * of the newest snapshot naming it. A ring of as many groups as the snapshot file has slots:
 * when it is full, the oldest group's snapshots are older than that many commits, so their
 * slots were reused and it can be forgotten.
 */
export class NamedPositions {
  readonly #positions: Float64Array;
  readonly #offsets: Float64Array;
  #head = 0;
  #count = 0;

  /** @param slots the slots of the snapshot file */
  constructor(slots: number) {
    this.#positions = new Float64Array(slots);
    this.#offsets = new Float64Array(slots);
  }

  /** A valid snapshot at stream `offset` names ring position `position`. */
  add(position: number, offset: number): void {
    const positions = this.#positions;
    const groups = positions.length;
    let last = this.#head + this.#count - 1;
    if (last >= groups) last -= groups;
    if (this.#count > 0 && positions[last]! >= position) {
      // Same position (or, in a damaged file, a smaller one): one group, conservatively.
      positions[last] = Math.min(positions[last]!, position);
      this.#offsets[last] = Math.max(this.#offsets[last]!, offset);
      return;
    }
    if (this.#count === groups) this.#dropOldest();
    let at = this.#head + this.#count;
    if (at >= groups) at -= groups;
    positions[at] = position;
    this.#offsets[at] = offset;
    this.#count++;
  }

  /**
   * Forgets every position below `limit` and returns the newest snapshot offset that named
   * one (the caller invalidates the snapshots up to it), or -1 when none did.
   */
  dropBelow(limit: number): number {
    let offset = -1;
    while (this.#count > 0 && this.#positions[this.#head]! < limit) {
      offset = Math.max(offset, this.#offsets[this.#head]!);
      this.#dropOldest();
    }
    return offset;
  }

  #dropOldest(): void {
    this.#head = this.#head + 1 === this.#positions.length ? 0 : this.#head + 1;
    this.#count--;
  }
}
