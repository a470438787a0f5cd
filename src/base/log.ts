/**
 * Where shmfd reports what it does: one human-readable line per event. The library takes
 * any {@link Log}; the command-line tools (and the library's default) write to stderr
 * through a {@link StderrLog}.
 * @module
 */
import fs from 'node:fs';

/** Receives one line per event, by severity. */
export interface Log {
  error(message: string): void;
  warn(message: string): void;
  info(message: string): void;
  debug(message: string): void;
}

export const LOG_LEVELS = ['silent', 'error', 'warn', 'info', 'debug'] as const;
export type LogLevel = (typeof LOG_LEVELS)[number];

export function isLogLevel(value: string): value is LogLevel {
  return (LOG_LEVELS as readonly string[]).includes(value);
}

/**
 * A {@link Log} that writes `PROGRAM: warning: message` lines to stderr, quiet below its
 * level (`warn` by default). Writes are synchronous, so nothing is lost when the process
 * execs or exits.
 */
export class StderrLog implements Log {
  #rank: number;

  constructor(
    readonly program: string,
    level: LogLevel = 'warn',
  ) {
    this.#rank = LOG_LEVELS.indexOf(level);
  }

  set level(level: LogLevel) {
    this.#rank = LOG_LEVELS.indexOf(level);
  }

  enabled(level: Exclude<LogLevel, 'silent'>): boolean {
    return LOG_LEVELS.indexOf(level) <= this.#rank;
  }

  #write(level: Exclude<LogLevel, 'silent'>, message: string): void {
    if (!this.enabled(level)) return;
    const prefix = level === 'error' ? 'error: ' : level === 'warn' ? 'warning: ' : level === 'debug' ? 'debug: ' : '';
    try {
      fs.writeSync(2, `${this.program}: ${prefix}${message}\n`);
    } catch {
      // stderr closed: nowhere left to say it.
    }
  }

  error(message: string): void {
    this.#write('error', message);
  }
  warn(message: string): void {
    this.#write('warn', message);
  }
  info(message: string): void {
    this.#write('info', message);
  }
  debug(message: string): void {
    this.#write('debug', message);
  }
}
