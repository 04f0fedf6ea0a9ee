/*
 * npm run openapi: writes api/openapi.json and api/websocket.schema.json from the zod schemas.
 * npm run openapi -- --check: exits 1 when a committed copy differs (test/openapi.test.ts asserts the same).
 */
import { readFileSync, writeFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { generateOpenApiDocument, generateWebSocketSchema, OPENAPI_FILE, WEBSOCKET_SCHEMA_FILE } from '../src/api/openapi-document.js';

const outputs: Array<[URL, string]> = [
  [OPENAPI_FILE, await generateOpenApiDocument()],
  [WEBSOCKET_SCHEMA_FILE, generateWebSocketSchema()],
];
const check = process.argv.includes('--check');
let stale = false;
for (const [file, text] of outputs) {
  const path = fileURLToPath(file);
  if (!check) {
    writeFileSync(path, text);
    process.stdout.write(`wrote ${path}\n`);
    continue;
  }
  let committed = '';
  try {
    committed = readFileSync(path, 'utf8');
  } catch {
    // A missing file is as stale as a different one.
  }
  if (committed === text) continue;
  stale = true;
  process.stderr.write(`${path} is stale; run npm run openapi\n`);
}
if (stale) process.exit(1);
