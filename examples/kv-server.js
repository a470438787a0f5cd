#!/usr/bin/env node
// An HTTP key-value store whose data survives restarts, crashes and a SIGKILL of the whole
// tree: the entries live in a crash-consistent key-value map (docs/state.md) in the memory
// file that shm-restore passes and mirrors to a backup on disk.
//
//   shm-restore --snapshot=restore-v1 -s http::8080 /tmp/kv.state -- node examples/kv-server.js
//
//   PUT    /kv/KEY   body = the value: 204 once the change is committed
//   GET    /kv/KEY   200 with the value's exact bytes, or 404
//   DELETE /kv/KEY   204 once the deletion is committed, or 404
//   GET    /kv       200 {"count":N}
//
// KEY is the rest of the path, percent-decoded (UTF-8), 1 to 4096 bytes. Other requests get
// a 4xx or 5xx answer with one line of text: 400 (malformed key), 404 (another path),
// 405 (another method), 413 (value too large for the map), 414 (key too long), 507 (the
// map is full); nothing is staged for them, and nothing committed is lost.
//
// Group commit: changes are staged as their requests complete and committed together once
// the requests that arrived in the same turn of the event loop are staged (setImmediate),
// and only then answered. So an answered PUT or DELETE is committed, and a read (which
// waits for the commit of the changes staged before it) never shows a value that a crash
// could still take back.
//
// Environment: PORT (default 8080) when no socket was passed as `http`; KV_MAX_BYTES, the
// map's region (default 64 MiB, pages used as touched; a multiple of 4096): it holds about a
// third of that in entries, each at most 1/64 of it. Changing it for an existing backup is
// ERR_STATE_LAYOUT_MISMATCH. Quiet: it prints nothing unless something goes wrong (run
// alone, without a memory file, it warns once that the data lives in the process only).
import http from 'node:http';
import { serve } from 'shmfd/serve';

let state; // set below, before the server listens
let kv;
const server = http.createServer(handle);
// First, so that a stop signal during the rest of the start-up is graceful too.
serve({ endpoints: [server], onStop: () => state?.close() });

const { MAX_KEY_BYTES, MemoryFile, StateFile, keyValueMap, listenOn } = await import('shmfd');

const fail = (err) => {
  console.error(`kv-server: error: ${err.message}`);
  process.exit(1);
};

const declarations = { kv: keyValueMap({ maxBytes: Number(process.env.KV_MAX_BYTES ?? 64 << 20) }) };
try {
  state = StateFile.fromEnv(declarations);
} catch (err) {
  if (err.code !== 'ERR_STATE_NO_SHARED_FD') fail(err);
  try {
    state = StateFile.open(MemoryFile.create('kv-server'), declarations);
  } catch (err2) {
    fail(err2);
  }
  console.error('kv-server: warning: no memory file passed; the data lives in this process only (run it under shm-restore to keep it)');
}
kv = state.structures.kv;

/** Answers waiting for the commit of the batch being staged. */
let waiting = [];

/** Commits the staged batch, then runs the answers that waited for it. */
function commitBatch() {
  const answers = waiting;
  waiting = [];
  let failure;
  try {
    state.commit();
  } catch (err) {
    // Commits are atomic: the batch is not committed, so nobody may hear it was.
    failure = err;
    kv.discard();
    console.error(`kv-server: error: commit failed: ${err.message}`);
  }
  for (const answer of answers) answer(failure);
}

/** Runs `answer(failure)` once the changes staged so far are committed (at once when none wait). */
function afterCommit(answer) {
  if (waiting.length === 0) setImmediate(commitBatch);
  waiting.push(answer);
}

function reply(res, status, line, headers = {}) {
  if (line === undefined) {
    res.writeHead(status, headers).end();
    return;
  }
  const body = `${line}\n`;
  res.writeHead(status, { 'content-type': 'text/plain; charset=utf-8', 'content-length': Buffer.byteLength(body), ...headers }).end(body);
}

const committedOr = (res, status) => (failure) => {
  if (failure === undefined) reply(res, status);
  else reply(res, 500, `commit failed, nothing changed: ${failure.message}`);
};

/** Stages a change; a full map first gets the batch committed (its staged changes may be what fills it), then one more try. */
function stage(change) {
  try {
    change();
  } catch (err) {
    if (err.code !== 'ERR_STATE_MAP_FULL' || waiting.length === 0) throw err;
    commitBatch();
    change();
  }
}

const STATUS_OF = { ERR_STATE_MAP_FULL: 507, ERR_STATE_VALUE_TOO_LARGE: 413, ERR_STATE_KEY_TOO_LARGE: 414 };

/** The answer to a refused change: one line, and the status its code means. */
function refuse(res, err) {
  const status = STATUS_OF[err.code];
  if (status === undefined) throw err;
  reply(res, status, err.message);
}

/**
 * Reads the body, up to `limit` bytes; undefined (after a 413) when it is longer. The rest
 * of a refused body is read and dropped, so that the client, still sending, gets the answer.
 */
function readBody(req, res, limit) {
  const refuseLength = (n) => reply(res, 413, `value too large: ${n} bytes, at most ${limit} with this key`);
  const declared = Number(req.headers['content-length']);
  if (declared > limit) {
    refuseLength(declared);
    req.resume();
    return Promise.resolve(undefined);
  }
  return new Promise((resolve) => {
    const chunks = [];
    let length = 0;
    req.on('data', (chunk) => {
      length += chunk.length;
      if (length <= limit) chunks.push(chunk);
      else if (!res.headersSent) refuseLength(`more than ${limit}`);
    });
    req.on('end', () => resolve(length <= limit ? Buffer.concat(chunks, length) : undefined));
    // A client that went away staged nothing.
    req.on('close', () => resolve(undefined));
  });
}

async function handleKey(req, res, encoded) {
  let key;
  try {
    key = decodeURIComponent(encoded);
  } catch {
    reply(res, 400, 'bad key: malformed percent-encoding');
    return;
  }
  const keyBytes = Buffer.byteLength(key);
  if (keyBytes === 0) return reply(res, 400, 'bad key: empty (use /kv/KEY)');
  if (keyBytes > MAX_KEY_BYTES) return reply(res, 414, `key too long: ${keyBytes} bytes, at most ${MAX_KEY_BYTES}`);
  switch (req.method) {
    case 'GET':
    case 'HEAD':
      afterCommit(() => {
        const value = kv.get(key);
        if (value === undefined) reply(res, 404, `not found: ${JSON.stringify(key)}`);
        else res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': value.length }).end(value);
      });
      return;
    case 'PUT': {
      // An entry takes 16 bytes of header and the key and value rounded up to 8 (entryBytes).
      const value = await readBody(req, res, Math.max(0, kv.maxRecordBytes - 16 - keyBytes));
      if (value === undefined) return;
      try {
        stage(() => kv.set(key, value));
      } catch (err) {
        return refuse(res, err);
      }
      afterCommit(committedOr(res, 204));
      return;
    }
    case 'DELETE': {
      let present;
      try {
        stage(() => (present = kv.delete(key)));
      } catch (err) {
        return refuse(res, err);
      }
      afterCommit(present ? committedOr(res, 204) : () => reply(res, 404, `not found: ${JSON.stringify(key)}`));
      return;
    }
    default:
      reply(res, 405, `method not allowed: ${req.method} (use GET, PUT or DELETE on /kv/KEY)`, { allow: 'GET, HEAD, PUT, DELETE' });
  }
}

function handle(req, res) {
  const path = (req.url ?? '/').split('?')[0];
  if (path.startsWith('/kv/')) {
    handleKey(req, res, path.slice('/kv/'.length)).catch((err) => {
      console.error(`kv-server: error: ${err.message}`);
      if (!res.headersSent) reply(res, 500, `internal error: ${err.message}`);
    });
  } else if (path === '/kv') {
    if (req.method !== 'GET' && req.method !== 'HEAD') reply(res, 405, `method not allowed: ${req.method} (use GET on /kv)`, { allow: 'GET, HEAD' });
    else afterCommit(() => reply(res, 200, JSON.stringify({ count: kv.size }), { 'content-type': 'application/json' }));
  } else {
    reply(res, 404, `no such path: ${path} (use /kv/KEY or /kv)`);
  }
}

await listenOn(server, { name: 'http', fallback: { port: Number(process.env.PORT ?? 8080), host: '127.0.0.1' } }).catch(fail);
