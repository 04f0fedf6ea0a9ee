import swagger from '@fastify/swagger';
import swaggerUi from '@fastify/swagger-ui';
import type { FastifyInstance } from 'fastify';
import { createJsonSchemaTransform, jsonSchemaTransformObject } from 'fastify-type-provider-zod';
import { SECURITY_SCHEME } from './authentication.js';

export const API_PREFIX = '/api/v1';
export const OPENAPI_PATH = `${API_PREFIX}/openapi.json`;
export const DOCS_PREFIX = `${API_PREFIX}/docs`;

/*
 * The document is generated from the routes' zod schemas, so it cannot drift from what the code
 * validates. It is public, like /health and /version: Poseidon publishes the same description in
 * its repository, and it holds nothing about this daemon's configuration (the same document is
 * committed as api/openapi.json). OpenAPI 3.0, as Poseidon's swagger.yaml, so the two compare.
 */
type OpenApiObject = ReturnType<typeof jsonSchemaTransformObject>;

/*
 * The provider adds an input and an output variant of every schema with an id; only those the
 * routes reference (and what those reference) belong in the document.
 */
function withoutUnusedSchemas(document: OpenApiObject): OpenApiObject {
  if (!('components' in document) || !document.components?.schemas) return document;
  const schemas = document.components.schemas;
  const refsIn = (node: unknown): string[] => {
    const text = JSON.stringify(node);
    return [...text.matchAll(/"#\/components\/schemas\/([^"]+)"/g)].map((match) => match[1] ?? '');
  };
  const used = new Set<string>();
  const pending = refsIn(document.paths);
  for (let name = pending.pop(); name !== undefined; name = pending.pop()) {
    if (used.has(name)) continue;
    used.add(name);
    pending.push(...refsIn(schemas[name]));
  }
  // The object is the provider's fresh copy, so pruning it in place touches nothing shared.
  for (const name of Object.keys(schemas)) if (!used.has(name)) delete schemas[name];
  return document;
}

export async function registerOpenApi(app: FastifyInstance, version: string): Promise<void> {
  await app.register(swagger, {
    openapi: {
      openapi: '3.0.3',
      info: {
        title: 'poseidon-ts API',
        description:
          "The API CodeOcean uses to run code in runners; Poseidon's API (openHPI/poseidon api/swagger.yaml), generated from poseidon-ts's route schemas. " +
          "Every error is JSON {message, errorCode}. The WebSocket messages of /runners/{runnerId}/websocket follow Poseidon's websocket.schema.json.",
        version,
        license: { name: 'MIT' },
      },
      servers: [{ url: API_PREFIX }],
      components: {
        securitySchemes: {
          [SECURITY_SCHEME]: {
            type: 'apiKey',
            in: 'header',
            name: 'Poseidon-Token',
            description: 'Required on every route but /health and /version when server.token is set.',
          },
        },
      },
      tags: [
        { name: 'runner', description: 'A unit of execution' },
        { name: 'execution environment', description: 'A template for runners' },
        { name: 'miscellaneous' },
      ],
    },
    // Paths relative to the server URL, as in Poseidon's document.
    stripBasePath: true,
    transform: createJsonSchemaTransform({ zodToJsonConfig: { target: 'openapi-3.0' } }),
    transformObject: (document) => withoutUnusedSchemas(jsonSchemaTransformObject(document)),
  });
  // Served by the bundled swagger-ui assets (no CDN), so the page works offline.
  await app.register(swaggerUi, { routePrefix: DOCS_PREFIX });
  app.get(OPENAPI_PATH, { schema: { hide: true } }, async () => app.swagger());
}
