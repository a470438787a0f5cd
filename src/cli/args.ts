/**
 * Command-line parsing shared by the wrappers. Options come first; the first argument
 * that is not an option (or everything after `--`) is the command to run, so options of
 * the command are never taken for ours.
 * @module
 */
import fs from 'node:fs';
import { ShmfdError } from '../base/errors.js';
import { isSystemError } from '../system/libc.js';
import { isLogLevel, type StderrLog } from '../base/log.js';

export interface OptionSpec {
  /** Long name without dashes. */
  name: string;
  short?: string;
  /** Takes a value (`--name VALUE` or `--name=VALUE`). */
  value?: boolean;
}

export interface ParsedArgs {
  /** Values of value options (repeatable: every occurrence), `''` for flags. */
  options: Map<string, string[]>;
  /** The rest: the command and its arguments. */
  rest: string[];
}

export function usageError(message: string): ShmfdError {
  return new ShmfdError('ERR_INVALID_ARGUMENT', message);
}

/** A usage error that ends by pointing at the program's help. */
export function usageErrorSeeHelp(program: string, message: string): ShmfdError {
  return usageError(`${message} (see ${program} --help)`);
}

/** Parses `argv` by `specs`; mistakes in the options are usage errors pointing at `program --help`. */
export function parseArgs(argv: readonly string[], specs: readonly OptionSpec[], program: string): ParsedArgs {
  const fail = (message: string): ShmfdError => usageErrorSeeHelp(program, message);
  const options = new Map<string, string[]>();
  const add = (name: string, value: string): void => {
    options.set(name, [...(options.get(name) ?? []), value]);
  };
  let i = 0;
  for (; i < argv.length; i++) {
    const arg = argv[i] as string;
    if (arg === '--') {
      i++;
      break;
    }
    if (!arg.startsWith('-') || arg === '-') break;
    const long = arg.startsWith('--');
    const eq = long ? arg.indexOf('=') : -1;
    const key = long ? arg.slice(2, eq < 0 ? undefined : eq) : arg.slice(1, 2);
    const spec = specs.find((s) => (long ? s.name === key : s.short === key));
    if (spec === undefined) throw fail(`unknown option ${long ? `--${key}` : `-${key}`}`);
    if (spec.value !== true) {
      if (eq >= 0 || (!long && arg.length > 2)) throw fail(`option --${spec.name} takes no value`);
      add(spec.name, '');
      continue;
    }
    let value: string | undefined;
    if (eq >= 0) value = arg.slice(eq + 1);
    else if (!long && arg.length > 2) value = arg.slice(2);
    else value = argv[++i];
    if (value === undefined) throw fail(`option --${spec.name} needs a value`);
    add(spec.name, value);
  }
  return { options, rest: argv.slice(i) };
}

/** The last value of an option, if given. */
export function last(parsed: ParsedArgs, name: string): string | undefined {
  return parsed.options.get(name)?.at(-1);
}

const UNITS: Record<string, number> = { '': 1, k: 2 ** 10, m: 2 ** 20, g: 2 ** 30, t: 2 ** 40 };

/** The size suffixes, for help texts and errors: `K, M, G, T`. */
export const SIZE_SUFFIXES = Object.keys(UNITS)
  .filter((unit) => unit !== '')
  .map((unit) => unit.toUpperCase())
  .join(', ');

/** Parses a size: bytes, or with a binary suffix (`64K`, `100M`, `1GiB`); nothing around it. */
export function parseSize(option: string, text: string): number {
  const match = /^([0-9]+)(?:([kmgt])(?:i?b)?)?$/i.exec(text);
  const n = match === null ? NaN : Number(match[1]) * (UNITS[(match[2] ?? '').toLowerCase()] ?? NaN);
  if (!Number.isSafeInteger(n)) {
    throw usageError(`${option}: invalid size ${JSON.stringify(text)} (bytes, or with a suffix ${SIZE_SUFFIXES})`);
  }
  return n;
}

export function packageVersion(): string {
  const pkg = JSON.parse(fs.readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as { version: string };
  return pkg.version;
}

/** Writes a command's answer to stdout; a reader that went away (`| head -1`, `| true`) is no failure. */
export function printAnswer(text: string): void {
  try {
    fs.writeSync(1, text);
  } catch (err) {
    if (!isSystemError(err, 'EPIPE')) throw err;
  }
}

/**
 * The options every command shares: `--help` and `--version` (answered here: returns the
 * exit status) and `--log-level` (or `SHMFD_LOG`, applied to `log`: returns undefined).
 */
export function commonOptions(args: ParsedArgs, program: string, usage: string, log: StderrLog): number | undefined {
  const answer = args.options.has('help') ? usage : args.options.has('version') ? `${program} ${packageVersion()}` : undefined;
  if (answer !== undefined) {
    printAnswer(`${answer}\n`);
    return 0;
  }
  const option = last(args, 'log-level');
  if (option !== undefined) {
    if (!isLogLevel(option)) throw usageError(`--log-level: unknown level ${JSON.stringify(option)}`);
    log.level = option;
    return undefined;
  }
  // A mistyped Environment=SHMFD_LOG= in a unit must not keep the service from starting.
  const variable = process.env.SHMFD_LOG;
  if (variable !== undefined && variable !== '') {
    if (isLogLevel(variable)) log.level = variable;
    else log.warn(`SHMFD_LOG: unknown level ${JSON.stringify(variable)}, ignored (silent, error, warn, info or debug)`);
  }
  return undefined;
}
