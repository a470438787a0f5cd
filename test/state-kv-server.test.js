// examples/kv-server.js, the HTTP key-value store on the state map, run as users run it:
// under shm-restore --snapshot=restore-v1, on a socket the host passes (a unix socket here,
// so that parallel tests never compete for a port).
// - the protocol: PUT/GET/DELETE/count, binary values byte for byte, 404s, and one-line
//   4xx/5xx answers to bad input that lose nothing committed;
// - SIGKILL of the program while PUTs run: the host writes the memory back (and exits 137),
//   and a restart on that backup has every answered PUT, byte for byte;
// - SIGKILL of the whole tree while one writer PUTs: the restart has exactly the effect of
//   a prefix of the PUTs (a committed state), at least as new as a backup seen on disk
//   before the kill. How old that prefix is at the kill is printed as a diagnostic;
// - run alone on PORT (with a warning), and one error line for a bad configuration.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import path from 'node:path';
import { test } from 'node:test';
import { MemoryFile, StateFile, keyValueMap } from 'shmfd';
import { childrenOf, cleanEnv, NODE, ROOT, run, seededRandom, SHM_RESTORE, start, tempDir, waitFor } from './helpers.js';

const KV_SERVER = path.join(ROOT, 'examples', 'kv-server.js');
const SEED = process.env.KV_SEED === undefined ? Date.now() % 1_000_000_007 : Number(process.env.KV_SEED);
console.log(`# state-kv-server seed ${SEED} (replay with KV_SEED=${SEED})`);

let started = 0;

/**
 * Starts `shm-restore [hostArgs] -s http=unix::SOCKET BACKUP -- node examples/kv-server.js`
 * with `env` added; `request(method, key, body)` asks it (key undefined: `/kv`, a string
 * starting with `/`: that path as is).
 */
function startServer(t, dir, { hostArgs = [], env = {}, detached = false } = {}) {
  const socket = path.join(dir, `kv-${++started}.sock`);
  const backup = path.join(dir, 'kv.state');
  const host = start(NODE, [SHM_RESTORE, ...hostArgs, '-s', `http=unix::${socket}`, backup, '--', NODE, KV_SERVER], {
    t,
    detached,
    env: cleanEnv(env),
  });
  const agent = new http.Agent({ keepAlive: true });
  t.after(() => agent.destroy());
  /** @returns {Promise<{status: number, body: Buffer, headers: http.IncomingHttpHeaders}>} */
  const request = (method, key, body) =>
    new Promise((resolve, reject) => {
      const where = key === undefined ? '/kv' : key.startsWith('/') ? key : `/kv/${encodeURIComponent(key)}`;
      const req = http.request({ socketPath: socket, path: where, method, agent }, (res) => {
        const chunks = [];
        res.on('data', (c) => chunks.push(c));
        res.on('end', () => resolve({ status: res.statusCode, body: Buffer.concat(chunks), headers: res.headers }));
        res.on('error', reject);
      });
      req.on('error', (err) => {
        const end = host.ended();
        // Why the host is gone tells more than a refused connection does.
        if (end !== undefined) err.message += ` (the host exited ${end.code ?? end.signal}: ${end.stderr.trim()})`;
        reject(err);
      });
      req.end(body);
    });
  // The socket file appears at bind(), a moment before listen(): wait until it accepts.
  const accepts = () =>
    new Promise((resolve) => {
      const probe = net.connect(socket, () => resolve(true));
      probe.on('connect', () => probe.destroy());
      probe.on('error', () => resolve(false));
    });
  return { host, socket, backup, request, ready: () => waitFor(accepts, `the socket ${socket}`) };
}

/** The pid of the kv-server under `host`, once setpriv and the shell before it have exec'd it. */
function programPid(host) {
  return waitFor(() => {
    for (const pid of childrenOf(host.pid)) {
      try {
        if (fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0')[1] === KV_SERVER) return pid;
      } catch {
        // gone meanwhile
      }
    }
    return undefined;
  }, 'the kv-server process');
}

/** Asserts that `r` is a one-line text answer with `status`, and returns the line. */
function assertLine(r, status, pattern) {
  const text = r.body.toString();
  assert.equal(r.status, status, text);
  assert.match(text, /^[^\n]+\n$/, 'one line of text');
  assert.match(text, pattern);
  return text;
}

function randomBytes(rng, length) {
  const bytes = Buffer.alloc(length);
  for (let i = 0; i < length; i++) bytes[i] = rng.int(0, 255);
  return bytes;
}

test('kv-server: PUT, GET, DELETE and the count; binary values byte for byte; quiet; SIGTERM stops it', async (t) => {
  const dir = tempDir(t);
  const server = startServer(t, dir);
  await server.ready();
  const rng = seededRandom(SEED);
  const { request } = server;

  const put = await request('PUT', 'greeting', 'hello, world');
  assert.equal(put.status, 204, put.body.toString());
  assert.equal(put.body.length, 0);
  const got = await request('GET', 'greeting');
  assert.equal(got.status, 200);
  assert.equal(got.body.toString(), 'hello, world');

  const every = Buffer.from(Array.from({ length: 256 }, (_, i) => i));
  const large = randomBytes(rng, 300_000);
  const odd = 'ü/ß ?#%&+=';
  /** @type {Map<string, Buffer>} */
  const values = new Map();
  values.set('every byte', every).set('large', large).set(odd, randomBytes(rng, 37)).set('empty', Buffer.alloc(0));
  for (const [key, value] of values) assert.equal((await request('PUT', key, value)).status, 204, key);
  for (const [key, value] of values) {
    const r = await request('GET', key);
    assert.equal(r.status, 200, key);
    assert.ok(r.body.equals(value), `${key}: the same ${value.length} bytes`);
  }
  assert.equal((await request('PUT', 'greeting', 'hello again')).status, 204);
  assert.equal((await request('GET', 'greeting')).body.toString(), 'hello again');

  // Concurrent PUTs (committed in shared batches): every one answered 204 and there.
  const concurrent = Array.from({ length: 64 }, (_, i) => ({ key: `c${i}`, value: randomBytes(rng, rng.int(0, 3000)) }));
  const answers = await Promise.all(concurrent.map(({ key, value }) => request('PUT', key, value)));
  assert.deepEqual(
    answers.map((r) => r.status),
    concurrent.map(() => 204),
  );
  for (const { key, value } of concurrent) assert.ok((await request('GET', key)).body.equals(value), key);

  const count = await request('GET');
  assert.equal(count.status, 200);
  assert.match(count.headers['content-type'], /^application\/json/);
  assert.deepEqual(JSON.parse(count.body.toString()), { count: 1 + values.size + concurrent.length });

  assertLine(await request('GET', 'missing'), 404, /not found: "missing"/);
  assertLine(await request('GET', 'two\nlines'), 404, /not found: "two\\nlines"/);
  assert.equal((await request('DELETE', 'greeting')).status, 204);
  assertLine(await request('GET', 'greeting'), 404, /not found: "greeting"/);
  assertLine(await request('DELETE', 'greeting'), 404, /not found: "greeting"/);
  assert.deepEqual(JSON.parse((await request('GET')).body.toString()), { count: values.size + concurrent.length });

  // Bad requests: one line each, and nothing changed.
  const post = assertLine(await request('POST', 'large', 'x'), 405, /method not allowed: POST/);
  assert.match(post, /PUT/);
  assert.equal((await request('PATCH', 'large', 'x')).headers.allow, 'GET, HEAD, PUT, DELETE');
  assertLine(await request('PUT', undefined, 'x'), 405, /method not allowed: PUT/);
  assertLine(await request('GET', '/elsewhere'), 404, /no such path: \/elsewhere/);
  assertLine(await request('GET', '/kv/%ZZ'), 400, /bad key: malformed percent-encoding/);
  assertLine(await request('PUT', '/kv/', 'x'), 400, /bad key: empty/);
  assertLine(await request('PUT', 'k'.repeat(4097), 'x'), 414, /key too long: 4097 bytes, at most 4096/);
  assertLine(await request('PUT', 'too large', Buffer.alloc(2 << 20)), 413, /value too large: 2097152 bytes, at most \d+/);
  assertLine(await request('GET', 'too large'), 404, /not found/);
  for (const [key, value] of values) assert.ok((await request('GET', key)).body.equals(value), `${key} after the bad requests`);
  assert.deepEqual(JSON.parse((await request('GET')).body.toString()), { count: values.size + concurrent.length });

  server.host.kill('SIGTERM');
  const end = await server.host.exited;
  assert.deepEqual([end.code, end.signal], [0, null], end.stderr);
  assert.equal(end.stdout, '');
  assert.equal(end.stderr, '', 'quiet when all goes well');

  // The backup keeps it all.
  const again = startServer(t, dir);
  await again.ready();
  for (const [key, value] of values) assert.ok((await again.request('GET', key)).body.equals(value), `${key} after a restart`);
  again.host.kill('SIGTERM');
  assert.equal((await again.host.exited).code, 0);
});

test('kv-server: a full map and values over its record size get 507 and 413, and lose nothing committed', async (t) => {
  const dir = tempDir(t);
  // 64 KiB: records of at most 896 bytes, about 21 KiB of entries.
  const server = startServer(t, dir, { env: { KV_MAX_BYTES: String(64 << 10) } });
  await server.ready();
  const { request } = server;
  assertLine(await request('PUT', 'big', Buffer.alloc(1000)), 413, /value too large: 1000 bytes, at most 877 with this key/);
  const rng = seededRandom(SEED);
  const kept = new Map();
  let full;
  for (let i = 0; full === undefined; i++) {
    assert.ok(i < 1000, 'the map fills up');
    const value = randomBytes(rng, 800);
    const r = await request('PUT', `k${i}`, value);
    if (r.status === 204) kept.set(`k${i}`, value);
    else full = r;
  }
  assertLine(full, 507, /ERR_STATE_MAP_FULL|full/);
  // Concurrent PUTs into the full map: each refused alone, nothing else disturbed.
  const refused = await Promise.all(Array.from({ length: 8 }, (_, i) => request('PUT', `more${i}`, randomBytes(rng, 800))));
  for (const r of refused) assertLine(r, 507, /full/);
  assert.deepEqual(JSON.parse((await request('GET')).body.toString()), { count: kept.size });
  for (const [key, value] of kept) assert.ok((await request('GET', key)).body.equals(value), key);
  // Room again after a delete.
  const [first] = kept.keys();
  assert.equal((await request('DELETE', first)).status, 204);
  kept.delete(first);
  const value = randomBytes(rng, 800);
  assert.equal((await request('PUT', 'after', value)).status, 204);
  kept.set('after', value);

  server.host.kill('SIGTERM');
  const end = await server.host.exited;
  assert.equal(end.code, 0, end.stderr);
  assert.equal(end.stderr, '');
  const again = startServer(t, dir, { env: { KV_MAX_BYTES: String(64 << 10) } });
  await again.ready();
  assert.deepEqual(JSON.parse((await again.request('GET')).body.toString()), { count: kept.size });
  for (const [key, v] of kept) assert.ok((await again.request('GET', key)).body.equals(v), `${key} after a restart`);
  again.host.kill('SIGTERM');
  assert.equal((await again.host.exited).code, 0);
});

test('kv-server: SIGKILL of the program while PUTs run: the host writes back, exits 137, and the restart has every answered PUT', async (t) => {
  const dir = tempDir(t);
  const server = startServer(t, dir);
  await server.ready();
  const pid = await programPid(server.host);
  const rng = seededRandom(SEED + 1);
  // Writers with keys of their own, each PUT after the previous one's answer: per key the
  // last answered value, and at most one in flight.
  /** @type {Map<string, {answered?: Buffer, inFlight?: Buffer}>} */
  const keys = new Map();
  let answered = 0;
  let stop = false;
  const writer = async (w) => {
    for (let i = 0; !stop; i++) {
      const key = `w${w}-${rng.int(0, 15)}`;
      const value = Buffer.concat([Buffer.from(`${w}:${i}:`), randomBytes(rng, rng.int(0, 2000))]);
      const entry = keys.get(key) ?? {};
      keys.set(key, entry);
      entry.inFlight = value;
      try {
        const r = await server.request('PUT', key, value);
        assert.equal(r.status, 204, r.body.toString());
      } catch (err) {
        if (err.code === 'ECONNRESET' || err.code === 'ECONNREFUSED' || err.code === 'EPIPE' || /socket hang up/.test(err.message)) return;
        throw err;
      }
      entry.answered = value;
      entry.inFlight = undefined;
      answered++;
    }
  };
  const writers = Promise.all(Array.from({ length: 6 }, (_, w) => writer(w)));
  const killAt = rng.int(50, 400);
  await waitFor(() => answered >= killAt, `${killAt} answered PUTs`, 60_000);
  process.kill(pid, 'SIGKILL');
  const end = await server.host.exited;
  stop = true;
  await writers;
  assert.equal(end.code, 137, `the host reports the SIGKILL: ${end.stderr}`);

  const again = startServer(t, dir);
  await again.ready();
  let fromInFlight = 0;
  for (const [key, { answered: last, inFlight }] of keys) {
    const r = await again.request('GET', key);
    if (last === undefined && r.status === 404) continue;
    assert.equal(r.status, 200, `${key}: ${r.body.toString()}`);
    // A PUT cut by the kill may have been committed; an answered one must be.
    if (inFlight !== undefined && r.body.equals(inFlight)) fromInFlight++;
    else assert.ok(last !== undefined && r.body.equals(last), `${key}: the last answered value, byte for byte`);
  }
  t.diagnostic(`seed ${SEED}: ${answered} answered PUTs over ${keys.size} keys kept; ${fromInFlight} PUTs cut by the kill were committed`);
  again.host.kill('SIGTERM');
  assert.equal((await again.host.exited).code, 0);
});

const SMALL_MAP = 1 << 20;

/** The number of the newest PUT whose value is among `values` (-1 for none): values start with `NUMBER:`. */
function newestPut(values) {
  let newest = -1;
  for (const value of values) newest = Math.max(newest, Number(value.subarray(0, value.indexOf(':')).toString()));
  return newest;
}

/** The map in a copy of `backup` (in a new memfd, as a restore makes it): key → value. */
function readBackup(backup) {
  const bytes = fs.readFileSync(backup);
  const memory = MemoryFile.create('kv-backup-check', { size: bytes.length });
  try {
    memory.map().bytes.set(bytes);
    const state = StateFile.open(memory, { kv: keyValueMap({ maxBytes: SMALL_MAP }) });
    try {
      return new Map([...state.structures.kv].map(([key, value]) => [Buffer.from(key).toString(), Buffer.from(value)]));
    } finally {
      state.close();
    }
  } finally {
    memory.close();
  }
}

test('kv-server: SIGKILL of the whole tree while one writer PUTs: the restart has exactly a prefix of the PUTs, as new as the backups on disk', async (t) => {
  const dir = tempDir(t);
  const env = { KV_MAX_BYTES: String(SMALL_MAP) };
  const server = startServer(t, dir, { hostArgs: ['--snapshot=restore-v1', '--interval', '50'], env, detached: true });
  await server.ready();
  const rng = seededRandom(SEED + 2);
  // One writer, PUTs one after the other, unique values: PUT i is `puts[i]`.
  /** @type {{key: string, value: Buffer, answeredAt?: number}[]} */
  const puts = [];
  let answered = 0;
  const writer = (async () => {
    for (let i = 0; ; i++) {
      const put = { key: `k${rng.int(0, 24)}`, value: Buffer.concat([Buffer.from(`${i}:`), randomBytes(rng, rng.int(0, 1500))]) };
      puts.push(put);
      try {
        const r = await server.request('PUT', put.key, put.value);
        assert.equal(r.status, 204, r.body.toString());
      } catch (err) {
        if (err.code === 'ECONNRESET' || err.code === 'ECONNREFUSED' || err.code === 'EPIPE' || /socket hang up/.test(err.message)) return;
        throw err;
      }
      put.answeredAt = performance.now();
      answered = i + 1;
    }
  })();
  // The backup on disk follows the writer: wait until it holds a PUT answered after this point.
  await waitFor(() => answered >= 100, '100 answered PUTs', 60_000);
  const mark = answered - 1;
  await waitFor(() => fs.existsSync(server.backup) && newestPut(readBackup(server.backup).values()) >= mark, `a backup holding PUT ${mark}`, 60_000);
  const onDisk = answered;
  const more = rng.int(0, 200);
  await waitFor(() => answered >= onDisk + more, `${more} more answered PUTs`, 60_000);
  server.host.kill('SIGKILL');
  const killedAt = performance.now();
  await server.host.exited;
  await writer;

  const again = startServer(t, dir, { hostArgs: ['--snapshot=restore-v1'], env });
  await again.ready();
  const found = new Map();
  for (const key of new Set(puts.map((p) => p.key))) {
    const r = await again.request('GET', key);
    if (r.status === 404) continue;
    assert.equal(r.status, 200, r.body.toString());
    found.set(key, r.body);
  }
  assert.deepEqual(JSON.parse((await again.request('GET')).body.toString()), { count: found.size });
  // The newest PUT the map holds names the prefix; the map must be exactly its effect.
  const prefix = newestPut(found.values());
  const expected = new Map();
  for (const put of puts.slice(0, prefix + 1)) expected.set(put.key, put.value);
  assert.deepEqual([...found.keys()].sort(), [...expected.keys()].sort(), `seed ${SEED}: the keys of PUTs 0..${prefix}`);
  for (const [key, value] of expected) assert.ok(found.get(key).equals(value), `seed ${SEED}: ${key} holds its last value of PUTs 0..${prefix}, byte for byte`);
  assert.ok(prefix <= answered, `seed ${SEED}: PUT ${prefix} was sent (${answered} answered, one in flight)`);
  assert.ok(prefix >= mark, `seed ${SEED}: the restart (PUT ${prefix}) is at least as new as a backup seen before the kill (PUT ${mark})`);
  const newest = puts[prefix]?.answeredAt;
  const lost = answered - 1 - prefix;
  t.diagnostic(
    `seed ${SEED}: ${answered} PUTs answered at the kill; the restart has PUTs 0..${prefix} (${Math.max(0, lost)} answered PUTs lost), ` +
      `${newest === undefined ? 'its newest unanswered at the kill' : `answered ${(killedAt - newest).toFixed(0)} ms before the kill`}`,
  );
  again.host.kill('SIGTERM');
  assert.equal((await again.host.exited).code, 0);
});

test('kv-server: alone it serves on PORT with a warning; a bad KV_MAX_BYTES or a backup of another layout is one error line', async (t) => {
  const bad = await run(NODE, [KV_SERVER], { env: cleanEnv({ KV_MAX_BYTES: 'lots' }) });
  assert.equal(bad.code, 1);
  assert.match(bad.stderr, /^kv-server: error: kv: a map's maxBytes must be a multiple of 4096 .*, got NaN\n$/);

  const dir = tempDir(t);
  const server = startServer(t, dir);
  await server.ready();
  assert.equal((await server.request('PUT', 'a', 'x')).status, 204);
  server.host.kill('SIGTERM');
  assert.equal((await server.host.exited).code, 0);
  const other = await run(NODE, [SHM_RESTORE, '--snapshot=restore-v1', path.join(dir, 'kv.state'), '--', NODE, KV_SERVER], {
    env: cleanEnv({ KV_MAX_BYTES: String(64 << 10) }),
  });
  assert.equal(other.code, 1, other.stderr);
  assert.match(other.stderr, /^kv-server: error: .*another layout.*\n$/);

  const port = await new Promise((resolve, reject) => {
    const probe = net.createServer().listen(0, '127.0.0.1', () => {
      const { port: free } = /** @type {net.AddressInfo} */ (probe.address());
      probe.close(() => resolve(free));
    });
    probe.on('error', reject);
  });
  const alone = start(NODE, [KV_SERVER], { t, env: cleanEnv({ PORT: String(port) }) });
  await alone.err.waitFor(/^kv-server: warning: no memory file passed/);
  const answer = await waitFor(
    () =>
      new Promise((resolve) => {
        const req = http.request({ host: '127.0.0.1', port, path: '/kv/a', method: 'PUT' }, (res) => resolve(res.statusCode));
        req.on('error', () => resolve(undefined));
        req.end('x');
      }),
    `a PUT on port ${port}`,
  );
  assert.equal(answer, 204);
  alone.kill('SIGTERM');
  const end = await alone.exited;
  assert.equal(end.code, 0);
  assert.equal(end.stderr.split('\n').filter(Boolean).length, 1, `the warning alone: ${end.stderr}`);
});
