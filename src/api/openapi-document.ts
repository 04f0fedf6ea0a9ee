import { readFileSync } from 'node:fs';
import pino from 'pino';
import { z } from 'zod';
import { parseConfig } from '../config/load.js';
import { webSocketMessageSchema } from '../dto/websocket.js';
import { EnvironmentNotFoundError, RunnerNotFoundError } from '../runner/errors.js';
import { buildApp } from './app.js';
import type { EnvironmentAccessor, RunnerAccessor } from './dependencies.js';

/* The committed copies, as Poseidon keeps api/swagger.yaml and api/websocket.schema.json. */
export const OPENAPI_FILE = new URL('../../api/openapi.json', import.meta.url);
export const WEBSOCKET_SCHEMA_FILE = new URL('../../api/websocket.schema.json', import.meta.url);

/* The WebSocket messages as JSON Schema (OpenAPI cannot describe a WebSocket's frames). */
export function generateWebSocketSchema(): string {
  const schema = z.toJSONSchema(webSocketMessageSchema, { target: 'draft-7' });
  return `${JSON.stringify({ title: 'event', ...schema }, null, 2)}\n`;
}

function packageVersion(): string {
  const manifest = JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as { version: string };
  return manifest.version;
}

/* The document depends on the routes only: no backend is asked anything while it is generated. */
const noBackend: RunnerAccessor & EnvironmentAccessor = {
  claim: async (environmentId) => Promise.reject(new EnvironmentNotFoundError(environmentId)),
  get: (runnerId) => {
    throw new RunnerNotFoundError(runnerId);
  },
  return: async (runner) => Promise.reject(new RunnerNotFoundError(runner.id)),
  environments: () => [],
  environment: (environmentId) => {
    throw new EnvironmentNotFoundError(environmentId);
  },
  putEnvironment: async (spec) => Promise.reject(new EnvironmentNotFoundError(spec.id)),
  deleteEnvironment: async (environmentId) => Promise.reject(new EnvironmentNotFoundError(environmentId)),
  statistics: () => [],
};

/* The OpenAPI document as the daemon serves it at /api/v1/openapi.json, as formatted text. */
export async function generateOpenApiDocument(): Promise<string> {
  const app = await buildApp({ config: parseConfig({}), manager: noBackend, logger: pino({ level: 'silent' }), version: packageVersion() });
  try {
    await app.ready();
    return `${JSON.stringify(app.swagger(), null, 2)}\n`;
  } finally {
    await app.close();
  }
}
