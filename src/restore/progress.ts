/**
 * A one-line progress display for long copies, shown only on a terminal and only once an
 * operation has taken longer than a moment, so that scripts and logs never see it.
 * @module
 */
import fs from 'node:fs';
import tty from 'node:tty';

/** How long an operation runs before its progress is shown. */
const SHOW_AFTER_MS = 1000;
/** Least time between two updates of the line. */
const UPDATE_EVERY_MS = 100;

/** Formats a byte count with a decimal unit (`12.3 MB`). */
export function formatBytes(bytes: number): string {
  if (bytes < 1000) return `${bytes} B`;
  const units = ['kB', 'MB', 'GB', 'TB'];
  let value = bytes / 1000;
  let unit = 0;
  while (value >= 1000 && unit < units.length - 1) {
    value /= 1000;
    unit++;
  }
  return `${value.toFixed(1)} ${units[unit]}`;
}

/** Formats a duration in milliseconds (`850 ms`, `2.4 s`, `3 min 5 s`). */
export function formatDuration(ms: number): string {
  if (ms < 10) return `${ms.toFixed(1)} ms`;
  if (ms < 1000) return `${Math.round(ms)} ms`;
  if (ms < 60_000) return `${(ms / 1000).toFixed(1)} s`;
  const s = Math.round(ms / 1000);
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

/** A progress line for one operation; see {@link Progress.start}. */
export class Progress {
  #label: string;
  #fd: number;
  #started = performance.now();
  #lastDraw = 0;
  #shown = false;

  private constructor(label: string, fd: number) {
    this.#label = label;
    this.#fd = fd;
  }

  /**
   * A progress line on stderr, or undefined when stderr is not a terminal (or `enabled`
   * is false, e.g. with `--log-level silent`).
   */
  static start(label: string, enabled = true, fd = 2): Progress | undefined {
    if (!enabled || !tty.isatty(fd)) return undefined;
    return new Progress(label, fd);
  }

  /** Reports `done` of `total` bytes; draws only after the first second, at most 10 times a second. */
  update(done: number, total: number): void {
    const now = performance.now();
    const elapsed = now - this.#started;
    if (elapsed < SHOW_AFTER_MS || now - this.#lastDraw < UPDATE_EVERY_MS) return;
    this.#lastDraw = now;
    const percent = total > 0 ? Math.min(100, Math.floor((done / total) * 100)) : 100;
    const rate = done / (elapsed / 1000);
    this.#write(`\r\x1b[K${this.#label}: ${percent}% (${formatBytes(done)} of ${formatBytes(total)}, ${formatBytes(rate)}/s)`);
    this.#shown = true;
  }

  /** Removes the line, if it was drawn. */
  done(): void {
    if (this.#shown) this.#write('\r\x1b[K');
    this.#shown = false;
  }

  #write(text: string): void {
    try {
      fs.writeSync(this.#fd, text);
    } catch {
      // A terminal that went away: nothing to show progress on.
    }
  }
}

/**
 * Runs `operation` under a progress line labelled `label` (see {@link Progress.start}): it
 * gets the callback that updates the line, or undefined when no line is shown, and the
 * line is removed when the operation ends, however it ends.
 */
export async function withProgress<T>(
  label: string,
  enabled: boolean,
  operation: (progress: ((done: number, total: number) => void) | undefined) => Promise<T>,
): Promise<T> {
  const progress = Progress.start(label, enabled);
  try {
    return await operation(progress === undefined ? undefined : (done, total) => progress.update(done, total));
  } finally {
    progress?.done();
  }
}
