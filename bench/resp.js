// A minimal Redis client (RESP2 over node:net) and a redis-server the benchmark starts
// and stops itself. Only what bench/kv.js needs: commands as arrays of strings or bytes,
// replies in order (bulk strings as Buffer copies, errors as rejections), pipelining by
// sending several commands before awaiting them.
import { spawn } from 'node:child_process';
import net from 'node:net';
import { freePort } from './lib.js';

const INCOMPLETE = Symbol('incomplete');

export class ReplyError extends Error {}

export class Resp {
  #socket;
  #buf = Buffer.alloc(0);
  #pos = 0;
  #queue = [];
  #head = 0;

  constructor(socket) {
    this.#socket = socket;
    socket.setNoDelay(true);
    socket.on('data', (chunk) => this.#data(chunk));
    socket.on('error', (err) => this.#fail(err));
    socket.on('close', () => this.#fail(new Error('redis connection closed')));
  }

  /** Connects to 127.0.0.1:`port`. */
  static connect(port) {
    return new Promise((resolve, reject) => {
      const socket = net.connect({ port, host: '127.0.0.1' });
      socket.once('error', reject);
      socket.once('connect', () => {
        socket.off('error', reject);
        resolve(new Resp(socket));
      });
    });
  }

  /** Sends one command; the promise settles with its reply. */
  send(args) {
    this.#socket.write(encode(args));
    return new Promise((resolve, reject) => this.#queue.push({ resolve, reject }));
  }

  /** Sends `commands` in one write and resolves with their replies. */
  pipeline(commands) {
    this.#socket.cork();
    const replies = commands.map((c) => this.send(c));
    this.#socket.uncork();
    return Promise.all(replies);
  }

  close() {
    this.#socket.destroy();
  }

  #data(chunk) {
    this.#buf = this.#pos < this.#buf.length ? Buffer.concat([this.#buf.subarray(this.#pos), chunk]) : chunk;
    this.#pos = 0;
    for (;;) {
      const start = this.#pos;
      const reply = this.#parse();
      if (reply === INCOMPLETE) {
        this.#pos = start;
        return;
      }
      const waiter = this.#queue[this.#head];
      this.#queue[this.#head++] = undefined;
      if (this.#head > 4096 && this.#head * 2 > this.#queue.length) {
        this.#queue.splice(0, this.#head);
        this.#head = 0;
      }
      if (reply instanceof ReplyError) waiter.reject(reply);
      else waiter.resolve(reply);
    }
  }

  #parse() {
    const b = this.#buf;
    const p = this.#pos;
    if (p >= b.length) return INCOMPLETE;
    const eol = b.indexOf(13, p + 1);
    if (eol < 0 || eol + 1 >= b.length) return INCOMPLETE;
    const line = b.toString('latin1', p + 1, eol);
    const next = eol + 2;
    switch (b[p]) {
      case 0x2b: // +
        this.#pos = next;
        return line;
      case 0x2d: // -
        this.#pos = next;
        return new ReplyError(line);
      case 0x3a: // :
        this.#pos = next;
        return Number(line);
      case 0x24: { // $
        const n = Number(line);
        if (n < 0) {
          this.#pos = next;
          return null;
        }
        if (next + n + 2 > b.length) return INCOMPLETE;
        this.#pos = next + n + 2;
        return Buffer.from(b.subarray(next, next + n));
      }
      case 0x2a: { // *
        const n = Number(line);
        this.#pos = next;
        if (n < 0) return null;
        const items = new Array(n);
        for (let i = 0; i < n; i++) {
          const item = this.#parse();
          if (item === INCOMPLETE) return INCOMPLETE;
          items[i] = item;
        }
        return items;
      }
      default:
        throw new Error(`redis: unexpected reply byte 0x${b[p].toString(16)}`);
    }
  }

  #fail(err) {
    for (let i = this.#head; i < this.#queue.length; i++) this.#queue[i]?.reject(err);
    this.#queue = [];
    this.#head = 0;
  }
}

function encode(args) {
  const parts = [Buffer.from(`*${args.length}\r\n`, 'latin1')];
  for (const a of args) {
    const bytes = typeof a === 'string' ? Buffer.from(a, 'utf8') : a;
    parts.push(Buffer.from(`$${bytes.length}\r\n`, 'latin1'), bytes, CRLF);
  }
  return Buffer.concat(parts);
}
const CRLF = Buffer.from('\r\n', 'latin1');

/**
 * Starts `redis-server` on a free loopback port with no persistence except what the
 * benchmark asks for (`--save ""`, `--appendonly no`; SAVE writes DIR/kv.rdb, which a
 * server started on the same DIR loads). Resolves once a command is answered (a server
 * loading an RDB answers -LOADING until it is done, so this waits for the load).
 */
export async function startRedis(dir) {
  const port = await freePort();
  const started = performance.now();
  const child = spawn('redis-server', [
    '--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no',
    '--dir', dir, '--dbfilename', 'kv.rdb', '--daemonize', 'no', '--logfile', '',
  ], { stdio: ['ignore', 'ignore', 'inherit'] });
  const exited = new Promise((resolve) => child.once('exit', resolve));
  child.once('error', () => {});
  let client;
  for (;;) {
    if (child.exitCode !== null || child.signalCode !== null) throw new Error(`redis-server exited (${child.exitCode ?? child.signalCode})`);
    try {
      client ??= await Resp.connect(port);
      await client.send(['PING']);
      break;
    } catch (err) {
      if (client !== undefined && !String(err.message).startsWith('LOADING')) {
        client.close();
        client = undefined;
      }
      await new Promise((r) => setTimeout(r, 2));
    }
  }
  const readyMs = performance.now() - started;
  return {
    port,
    pid: child.pid,
    client,
    readyMs,
    async stop() {
      client.close();
      child.kill('SIGTERM');
      await exited;
    },
  };
}

/** Whether `redis-server` can be run. */
export function haveRedis() {
  return new Promise((resolve) => {
    const child = spawn('redis-server', ['--version'], { stdio: 'ignore' });
    child.once('error', () => resolve(false));
    child.once('exit', (code) => resolve(code === 0));
  });
}
