#!/usr/bin/env node
// An HTTP server that counts the requests it answered in the shared memory file, and keeps
// its listening socket across restarts: restart it as often as you like, no connection is
// refused and the count goes on.
//
//   shm-fd --first-fd 17 -s http::8080 node --watch examples/http-counter.js
//   curl http://127.0.0.1:8080/       -> {"count":1,"pid":12345}
//
// Every request is answered with {"count": N, "pid": P}: N counts this request too, P is
// the pid of the process that answered. The listening socket is the one passed under the
// name `http` (by shm-fd -s or a systemd socket unit with FileDescriptorName=http); run
// alone, the server listens on 127.0.0.1:$PORT (default 8080).
//
// Layout of the memory file: the count is the native-endian 64-bit number at byte 0.
//
// Order of start-up: a restarter may send SIGTERM at any instant, even while this program
// is still starting. serve() comes first, from the light entry shmfd/serve (it loads only
// Node's own modules): from there on a stop is graceful. The rest of shmfd (koffi, libc)
// takes most of the start-up and is loaded after it. A signal before this file runs at
// all, while Node itself starts, ends the process by that signal: the restart loops in
// docs/sockets.md start it again.
import http from 'node:http';
import { serve } from 'shmfd/serve';

let counter; // set below, before the server listens
const server = http.createServer((req, res) => {
  // Atomics: several processes may share the file (e.g. an old one finishing while a new one starts).
  const count = Atomics.add(counter, 0, 1n) + 1n;
  const body = JSON.stringify({ count: Number(count), pid: process.pid });
  res.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) });
  res.end(body);
});
const service = serve({
  endpoints: [server],
  // Type=notify-reload: nothing to re-read, but say how far the count got.
  reload: () => console.error(`http-counter: reloaded at count ${Atomics.load(counter, 0)}`),
});

const { SharedFd, listenOn } = await import('shmfd');

// Setup errors (a passed socket of the wrong kind, a port in use) are one line, not a trace.
const fail = (err) => {
  console.error(`http-counter: error: ${err.message}`);
  process.exit(1);
};

let file;
try {
  file = SharedFd.fromEnv();
} catch (err) {
  fail(err);
}
if (file !== undefined) {
  file.grow(8);
  counter = file.map({ length: 8 }).array(BigUint64Array, 0, 1);
} else {
  console.error('http-counter: warning: no shared memory file passed; counting in process memory (run it under shm-fd to keep the count)');
  counter = new BigUint64Array(1);
}

const listening = await listenOn(server, { name: 'http', fallback: { port: Number(process.env.PORT ?? 8080), host: '127.0.0.1' } }).catch(fail);
await service.ready;
console.error(
  `http-counter: listening on ${listening.url}${listening.passed ? ` (passed socket ${listening.name}, fd ${listening.fd})` : ''}, pid ${process.pid}, count ${Atomics.load(counter, 0)}`,
);
