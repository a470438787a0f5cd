#!/usr/bin/env node
import { main } from '../dist/cli/shm-fd.js';

process.exitCode = main(process.argv.slice(2));
