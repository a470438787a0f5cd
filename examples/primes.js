#!/usr/bin/env node
// A one-shot prime sieve whose table lives in the shared memory file that `shm-fd` passes:
// every run continues where the last one stopped. Port of the original's `primes`.
//
//   shm-fd watch -n 0.1 node examples/primes.js
//
// Layout (the same as the original's, so both can take turns on one memfd): the whole file
// is an array of native-endian 64-bit numbers from byte 0, 100,000,000 bytes long; the primes
// found so far are its non-zero prefix.
import { SharedFd } from 'shmfd';

const SIZE = 100_000_000;
const CHUNK = 100_000;

const file = SharedFd.fromEnv();
if (file === undefined) {
  console.error('primes: no shared memory file passed; run it under shm-fd: shm-fd node examples/primes.js');
  process.exit(1);
}
file.grow(SIZE);
const table = file.map({ length: SIZE }).array(BigUint64Array);

if (table[0] === 0n) {
  table[0] = 2n;
  table[1] = 3n;
}
let count = table.indexOf(0n);
if (count < 0) count = table.length;
const end = Math.min(count + CHUNK, table.length);
if (count >= end) {
  console.log(`the table is full: all ${count} primes found`);
  process.exit(0);
}

// Trial division needs only the primes up to the square root of the candidates, and those
// fit comfortably in ordinary numbers (the largest candidate stays far below 2^53).
const divisors = [];
const takeDivisorsUpTo = (bound) => {
  while (divisors.length < count) {
    const p = Number(table[divisors.length]);
    if (p * p > bound) break;
    divisors.push(p);
  }
};
const isPrime = (n) => {
  for (const p of divisors) {
    if (p * p > n) return true;
    if (n % p === 0) return false;
  }
  return true;
};

let candidate = Number(table[count - 1]) + 2;
const start = count;
while (count < end) {
  takeDivisorsUpTo(candidate);
  if (isPrime(candidate)) table[count++] = BigInt(candidate);
  candidate += 2;
}
console.log(`generated ${count - start} more primes, total ${count}`);
