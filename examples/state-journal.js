#!/usr/bin/env node
// A journal whose entries and totals survive crashes, power loss and restarts, written with
// the state structures: no slots, no payload formats, no tail offsets. Run it under the
// restore host, which mirrors the memory to a file:
//
//   shm-restore --snapshot=restore-v1 journal.state node examples/state-journal.js [INTERVAL_MS] [LIMIT]
//
// Every INTERVAL_MS (default 200) it appends one line to the journal, counts it, updates a
// running mean, and commits; it stops after LIMIT entries (default: never) or cleanly on
// SIGTERM/SIGINT. Kill it (or the whole tree) at any moment and start it again: it
// continues from the last committed entry, with totals that match the journal exactly.
import { StateFile, appendLog, counterSet, versionedCell } from 'shmfd';

const interval = Number(process.argv[2] ?? 200);
const limit = Number(process.argv[3] ?? Infinity);

let state;
try {
  state = StateFile.fromEnv({
    journal: appendLog(1 << 20), // 1 MiB of entries
    totals: counterSet(2), // [entries, bytes]
    mean: versionedCell(Float64Array, 2), // [mean entry length, last entry time]
  });
} catch (err) {
  console.error(`state-journal: ${err.message}`);
  process.exit(1);
}
const { journal, totals, mean } = state.structures;
const decoder = new TextDecoder();
const last = [...journal].at(-1);
console.log(`recovered ${journal.committedLength} entries (${totals.get(1)} bytes)${last ? `, last: ${decoder.decode(last)}` : ''}`);

function tick() {
  const n = Number(totals.get(0)) + 1;
  const line = new TextEncoder().encode(`entry ${n} at ${new Date().toISOString()}`);
  try {
    journal.append(line);
  } catch (err) {
    if (err.code !== 'ERR_STATE_LOG_FULL') throw err;
    console.log(`the journal is full at ${n - 1} entries`);
    process.exit(0);
  }
  totals.add(0, 1n);
  totals.add(1, BigInt(line.length));
  mean.stage((m) => {
    m[0] += (line.length - m[0]) / n;
    m[1] = Date.now();
  });
  state.commit(); // the entry, both counters and the mean become durable together
  console.log(`committed entry ${n}, mean length ${mean.value[0].toFixed(2)}`);
  if (n >= limit) process.exit(0);
  timer = setTimeout(tick, interval);
}

let timer;
for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => {
    clearTimeout(timer);
    console.log(`stopped by ${signal} at ${totals.committed(0)} entries`);
    process.exit(0);
  });
}
tick();
