#!/usr/bin/env node
/*
 * The `poseidon` command. The daemon runs from its TypeScript sources, as `npm start` does: tsx is
 * a runtime dependency already, so registering its loader here spares a separate build step and
 * keeps one way of running the code.
 */
import { register } from 'tsx/esm/api';

register();
await import('../src/cli.ts');
