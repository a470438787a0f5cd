#!/usr/bin/env node
import { main } from '../dist/cli/shm-restore.js';

process.exitCode = main(process.argv.slice(2));
