// Issue 4, interop: a program that reads its descriptors with libsystemd's semantics
// (sd_listen_fds_with_names: pid check, names, count) accepts what shm-fd passes: the
// sockets and the memory file, with the right names and LISTEN_PID.
import assert from 'node:assert/strict';
import http from 'node:http';
import path from 'node:path';
import { test } from 'node:test';
import { fixture, NODE, PYTHON, SHM_FD, start, tempDir } from './helpers.js';

const SD_LISTEN = fixture('sockets-sd-listen.py');

/** Starts `shm-fd ARGS`; `line()` is the first line of its program, parsed. */
function startWrapper(t, args) {
  const wrapper = start(NODE, [SHM_FD, ...args], { t });
  const line = async () => {
    const first = await wrapper.out.line(0);
    assert.ok(first !== undefined, `the program printed nothing: ${wrapper.err.text}`);
    return JSON.parse(first);
  };
  return { exited: wrapper.exited, line };
}

test('a libsystemd-style reader (Python) gets the sockets and the memory file, named, with its own pid', async (t) => {
  const unixPath = path.join(tempDir(t), 'py.sock');
  const { line, exited } = startWrapper(t, ['-s', 'http::0', '-s', 'udp::0', '-s', `ctl=unix::${unixPath}`, '--', PYTHON, SD_LISTEN]);
  const report = await line();
  assert.equal(report.n, 4, 'LISTEN_PID equals the pid of the exec-ed program, so sd_listen_fds accepts');
  const [h, u, c, m] = report.fds;
  assert.deepEqual([h.fd, h.name, h.family, h.type, h.listening, h.address[0]], [3, 'http', 'inet', 'stream', true, '127.0.0.1']);
  assert.deepEqual([u.fd, u.name, u.family, u.type], [4, 'udp', 'inet', 'dgram']);
  assert.deepEqual([c.fd, c.name, c.family, c.type, c.listening, c.address], [5, 'ctl', 'unix', 'stream', true, unixPath]);
  assert.deepEqual([m.fd, m.name], [6, 'SHM_SHARED_FD']);
  assert.match(m.target, /^\/memfd:SHM_SHARED_FD/);
  const body = await new Promise((resolve, reject) => {
    http
      .get({ host: '127.0.0.1', port: h.address[1], agent: false }, (res) => {
        let b = '';
        res.on('data', (d) => (b += d));
        res.on('end', () => resolve(JSON.parse(b)));
      })
      .on('error', reject);
  });
  assert.deepEqual(body, { count: 1, pid: report.pid });
  assert.equal((await exited).code, 0);
});

test('with --no-pid the strict reader sees nothing (libsystemd requires LISTEN_PID), as documented', async (t) => {
  const { line, exited } = startWrapper(t, ['--no-pid', '-s', 'tcp::0', '--', PYTHON, SD_LISTEN]);
  assert.equal((await line()).n, 0);
  assert.equal((await exited).code, 0);
});
