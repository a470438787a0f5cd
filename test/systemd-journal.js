// The journal of the systemd test harness (test/systemd-sandbox.sh), which appends to LOG
// one line per entry: "UNIT: message". It serves the two sockets of the real journal in
// DIR: `socket`, where the manager sends its log (datagrams of the native protocol, read
// by a worker thread that blocks on them), and `stdout`, where the manager connects the
// output of services whose StandardOutput=/StandardError= is the journal (the default).
//
//   node test/systemd-journal.js DIR LOG
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import readline from 'node:readline';
import { Worker, isMainThread, workerData } from 'node:worker_threads';
import * as sys from '../dist/system/libc.js';

/**
 * The fields of one entry of the native protocol: `KEY=value\n`, or, for values that may
 * hold newlines, `KEY\n`, a 64-bit little-endian length, the value and `\n`.
 */
function parseEntry(data) {
  const fields = new Map();
  let at = 0;
  while (at < data.length) {
    let end = data.indexOf(0x0a, at);
    if (end < 0) end = data.length;
    const line = data.subarray(at, end);
    const eq = line.indexOf(0x3d);
    if (eq >= 0) {
      fields.set(line.subarray(0, eq).toString(), line.subarray(eq + 1).toString());
      at = end + 1;
    } else {
      const length = Number(data.readBigUInt64LE(end + 1));
      fields.set(line.toString(), data.subarray(end + 9, end + 9 + length).toString());
      at = end + 9 + length + 1;
    }
  }
  return fields;
}

/** Receives the manager's datagrams until the process ends. */
function serveNative(dir, log) {
  const fd = sys.socket(sys.AF_UNIX, sys.SOCK_DGRAM);
  sys.bindSocket(fd, { family: 'unix', path: path.join(dir, 'socket') });
  for (;;) {
    const message = sys.receiveDatagram(fd, 1 << 20, 4);
    let data = message.data;
    // An entry too large for one datagram comes as a sealed memfd with an empty payload.
    for (const memfd of message.fds) {
      data = fs.readFileSync(`/proc/self/fd/${memfd}`);
      fs.closeSync(memfd);
    }
    const entry = parseEntry(data);
    const unit = entry.get('USER_UNIT') ?? entry.get('UNIT') ?? '-';
    fs.writeSync(log, `${unit}: ${entry.get('MESSAGE') ?? ''}\n`);
  }
}

/** Accepts the services' output streams. */
function serveStreams(dir, log) {
  // Each stream starts with seven header lines (identifier, unit, priority, level prefix,
  // forward to syslog, to kmsg, to console), then carries the program's output.
  const HEADER_LINES = 7;
  net
    .createServer((connection) => {
      const header = [];
      connection.on('error', () => {});
      readline.createInterface({ input: connection, crlfDelay: Infinity }).on('line', (line) => {
        if (header.length < HEADER_LINES) header.push(line);
        else fs.writeSync(log, `${header[1] || header[0]}: ${line}\n`);
      });
    })
    .listen(path.join(dir, 'stdout'));
}

if (isMainThread) {
  const [dir, logFile] = process.argv.slice(2);
  new Worker(new URL(import.meta.url), { workerData: { dir, logFile } }).on('error', (err) => {
    console.error(`systemd-journal: ${err.stack ?? err}`);
    process.exit(1);
  });
  serveStreams(dir, fs.openSync(logFile, 'a'));
} else {
  serveNative(workerData.dir, fs.openSync(workerData.logFile, 'a'));
}
