#!/usr/bin/env node
/*
 * The `poseidon` command. It runs the compiled daemon (dist/, made by `npm run build` and shipped
 * in the package and the Docker image); a checkout that was never built falls back to the
 * TypeScript sources through tsx, as `npm start` does, so a newcomer needs no build step.
 */
import { existsSync } from 'node:fs';

const compiled = new URL('../dist/cli.js', import.meta.url);
if (existsSync(compiled)) {
  await import(compiled.href);
} else {
  const { register } = await import('tsx/esm/api');
  register();
  await import('../src/cli.ts');
}
