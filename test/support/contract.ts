import assert from 'node:assert/strict';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { Ajv, type ValidateFunction } from 'ajv';
import addFormatsModule from 'ajv-formats';
import { parse } from 'yaml';
import { REPO_ROOT } from './daemon.js';

/*
 * The API description is the contract; tests validate every answer against it instead of against
 * hand-written expectations, so the suite catches drift in fields nobody thought of.
 *
 * The project owns its contract: api/openapi.json (generated from the route schemas, kept current
 * by test/openapi.test.ts) and api/websocket.schema.json. Where Poseidon's own documents sit beside
 * the repository (../shared/reference, not part of a clone), every answer is checked against them
 * too, so the project cannot drift from what CodeOcean was written against.
 */

export const REFERENCE_DIR = join(REPO_ROOT, '..', 'shared', 'reference');
export const OWN_OPENAPI_PATH = join(REPO_ROOT, 'api', 'openapi.json');
const OWN_WS_SCHEMA_PATH = join(REPO_ROOT, 'api', 'websocket.schema.json');
export const POSEIDON_SWAGGER_PATH = join(REFERENCE_DIR, 'poseidon-swagger.yaml');
const POSEIDON_WS_SCHEMA_PATH = join(REFERENCE_DIR, 'poseidon-websocket.schema.json');
/* Said by every check that needs Poseidon's documents when they are not there. */
export const POSEIDON_MISSING = `Poseidon's reference documents: ../shared/reference/poseidon-swagger.yaml not found`;
export const poseidonReferencePresent = existsSync(POSEIDON_SWAGGER_PATH) && existsSync(POSEIDON_WS_SCHEMA_PATH);

export type Json = string | number | boolean | null | Json[] | { [key: string]: Json };
export type JsonObject = { [key: string]: Json };

export type HttpMethod = 'GET' | 'PUT' | 'POST' | 'PATCH' | 'DELETE';

export function isObject(value: Json | undefined): value is JsonObject {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

function pointer(root: Json, ref: string): Json {
  assert.ok(ref.startsWith('#/'), `only local $refs are supported, got ${ref}`);
  let node: Json | undefined = root;
  for (const part of ref.slice(2).split('/')) {
    assert.ok(isObject(node), `dangling $ref ${ref}`);
    node = node[part.replace(/~1/g, '/').replace(/~0/g, '~')];
  }
  assert.ok(node !== undefined, `dangling $ref ${ref}`);
  return node;
}

/* Inlining refs keeps each compiled validator self-contained; the documents have no recursive refs. */
export function deref(root: Json, node: Json, depth = 0): Json {
  assert.ok(depth < 50, 'recursive $ref in document');
  if (Array.isArray(node)) return node.map((item) => deref(root, item, depth + 1));
  if (!isObject(node)) return node;
  const ref = node.$ref;
  if (typeof ref === 'string') return deref(root, pointer(root, ref), depth + 1);
  const out: JsonObject = {};
  for (const [key, value] of Object.entries(node)) out[key] = deref(root, value, depth + 1);
  return Array.isArray(out.allOf) ? mergeAllOf(out, out.allOf) : out;
}

/*
 * Poseidon's InternalServerError is `allOf: [ClientError (additionalProperties: false),
 * {errorCode}]`, which under JSON Schema rejects every body that carries errorCode — the very body
 * CodeOcean needs for NOMAD_OVERLOAD. OpenAPI tooling reads allOf as object composition, so the
 * parts are merged into one object schema, as the authors evidently meant.
 */
function mergeAllOf(node: JsonObject, parts: Json[]): Json {
  if (!parts.every((part) => isObject(part) && (part.type === 'object' || part.type === undefined))) return node;
  const properties: JsonObject = {};
  const required = new Set<string>();
  let closed = false;
  for (const part of parts) {
    assert.ok(isObject(part));
    if (isObject(part.properties)) Object.assign(properties, part.properties);
    if (Array.isArray(part.required)) for (const name of part.required) required.add(String(name));
    if (part.additionalProperties === false) closed = true;
  }
  const { allOf: _allOf, ...rest } = node;
  const merged: JsonObject = { ...rest, type: 'object', properties, required: [...required] };
  if (closed) merged.additionalProperties = false;
  return merged;
}

/* Poseidon's swagger, as the tests read it (see withPoseidonOverlay); undefined without ../shared. */
export function loadPoseidonSwagger(): JsonObject | undefined {
  if (!poseidonReferencePresent) return undefined;
  const swagger = parse(readFileSync(POSEIDON_SWAGGER_PATH, 'utf8')) as Json;
  assert.ok(isObject(swagger), 'swagger root must be an object');
  return swagger;
}

/*
 * Two deliberate, documented deviations from Poseidon's swagger, applied when answers are checked
 * against it (the project's own document states both):
 *  1. Its FileHeader forbids extra keys, yet real Poseidon emits owner/group/permissions/linkTarget
 *     and CodeOcean's file browser reads them (codeocean-contract.md §4). A daemon that omits them
 *     breaks CodeOcean, so the four string fields are allowed.
 *  2. Every error body of ours is `{message, errorCode}` (a machine-readable code on every error).
 *     The swagger only lists errorCode on 500s, and its ClientError (410, 424) forbids extra keys;
 *     CodeOcean reads `message` there and ignores the rest. So ClientError accepts a string errorCode.
 */
function withPoseidonOverlay(swagger: JsonObject): JsonObject {
  const components = swagger.components;
  assert.ok(isObject(components) && isObject(components.schemas), 'swagger has no components.schemas');
  const fileHeader = components.schemas.FileHeader;
  assert.ok(isObject(fileHeader) && isObject(fileHeader.properties), 'swagger has no FileHeader');
  for (const key of ['owner', 'group', 'permissions', 'linkTarget']) fileHeader.properties[key] = { type: 'string' };
  const clientError = components.schemas.ClientError;
  assert.ok(isObject(clientError) && isObject(clientError.properties), 'swagger has no ClientError');
  clientError.properties.errorCode = { type: 'string' };
  return swagger;
}

export function loadOwnDocument(): JsonObject {
  const document = JSON.parse(readFileSync(OWN_OPENAPI_PATH, 'utf8')) as Json;
  assert.ok(isObject(document), 'api/openapi.json root must be an object');
  return document;
}

const ajv = new Ajv({ strict: false, allErrors: true });
// ajv-formats is CommonJS whose module object is itself the plugin; NodeNext types see the namespace.
const addFormats = (addFormatsModule as unknown as { default: typeof addFormatsModule.default }).default;
addFormats(ajv);
// OpenAPI-only formats that carry no checkable constraint for our purposes (base64 has its pattern beside it).
for (const format of ['pct-encoded', 'binary', 'base64']) ajv.addFormat(format, true);

interface ResponseSpec {
  /** content type → compiled validator, or null when the type is not JSON (e.g. octet-stream). */
  content: Map<string, ValidateFunction | null>;
}

const routeKey = (method: string, pathTemplate: string): string => `${method.toUpperCase()} ${pathTemplate}`;

function describeErrors(validate: ValidateFunction): string {
  return ajv.errorsText(validate.errors, { separator: '; ' });
}

/* One OpenAPI document, compiled into validators of every response and JSON request body. */
class DocumentContract {
  readonly #responses = new Map<string, Map<string, ResponseSpec>>();
  readonly #requests = new Map<string, ValidateFunction>();

  constructor(
    readonly name: string,
    document: JsonObject,
  ) {
    const paths = document.paths;
    assert.ok(isObject(paths), `${name} has no paths`);
    for (const [template, rawItem] of Object.entries(paths)) {
      const item = deref(document, rawItem);
      assert.ok(isObject(item));
      for (const method of ['get', 'put', 'post', 'patch', 'delete']) {
        const operation = item[method];
        if (!isObject(operation)) continue;
        const key = routeKey(method, template);
        const statuses = new Map<string, ResponseSpec>();
        const responses = operation.responses;
        assert.ok(isObject(responses), `${key} has no responses in ${name}`);
        for (const [status, response] of Object.entries(responses)) {
          assert.ok(isObject(response));
          const content = new Map<string, ValidateFunction | null>();
          if (isObject(response.content)) {
            for (const [type, media] of Object.entries(response.content)) {
              const schema = isObject(media) ? media.schema : undefined;
              content.set(type, type.includes('json') && isObject(schema) ? ajv.compile(schema) : null);
            }
          }
          statuses.set(status, { content });
        }
        this.#responses.set(key, statuses);
        const body = operation.requestBody;
        if (isObject(body) && isObject(body.content)) {
          const media = body.content['application/json'];
          if (isObject(media) && isObject(media.schema)) this.#requests.set(key, ajv.compile(media.schema));
        }
      }
    }
  }

  assertResponse(method: HttpMethod, pathTemplate: string, status: number, body: Json | undefined, contentType?: string | null): void {
    const key = routeKey(method, pathTemplate);
    const spec = this.#responses.get(key);
    assert.ok(spec, `route ${key} is not in ${this.name}`);
    const response = spec.get(String(status));
    assert.ok(
      response,
      `${key} answered ${status}, which ${this.name} does not document (documented: ${[...spec.keys()].join(', ')}); body: ${JSON.stringify(body)}`,
    );
    if (response.content.size === 0) return;
    const jsonEntry = [...response.content.entries()].find(([type]) => type.includes('json'));
    if (jsonEntry === undefined) return; // e.g. the raw download: bytes, nothing to validate
    const [, validate] = jsonEntry;
    assert.ok(
      contentType === undefined || contentType?.includes('application/json') === true,
      `${key} ${status} must be application/json, got Content-Type ${String(contentType)}`,
    );
    assert.ok(body !== undefined, `${key} ${status} must carry a JSON body, got none`);
    if (validate !== null) {
      assert.ok(validate(body), `${key} ${status} body violates ${this.name}: ${describeErrors(validate)}; body: ${JSON.stringify(body)}`);
    }
  }

  assertRequest(method: HttpMethod, pathTemplate: string, body: Json): void {
    const validate = this.#requests.get(routeKey(method, pathTemplate));
    assert.ok(validate, `route ${routeKey(method, pathTemplate)} has no JSON request body in ${this.name}`);
    assert.ok(validate(body), `request to ${routeKey(method, pathTemplate)} violates ${this.name}: ${describeErrors(validate)}`);
  }
}

const own = new DocumentContract("the project's api/openapi.json", loadOwnDocument());
const poseidonSwagger = loadPoseidonSwagger();
const poseidon = poseidonSwagger ? new DocumentContract("Poseidon's swagger", withPoseidonOverlay(poseidonSwagger)) : undefined;

/**
 * Fails unless `status` is documented for the route and, when the document gives a JSON schema for
 * it, `body` is JSON (contentType says so) that validates; against the project's document, and
 * against Poseidon's where it is present. `body` is the parsed JSON or undefined.
 */
export function assertMatchesSwagger(method: HttpMethod, pathTemplate: string, status: number, body: Json | undefined, contentType?: string | null): void {
  own.assertResponse(method, pathTemplate, status, body, contentType);
  poseidon?.assertResponse(method, pathTemplate, status, body, contentType);
}

/** Only the project's own document: for answers Poseidon's never lists (413, 415, 401 on statistics...). */
export const assertMatchesOwnDocument: typeof assertMatchesSwagger = (...answer) => own.assertResponse(...answer);

/** Keeps the CodeOcean client honest: what it sends must itself be valid per the documents. */
export function assertRequestMatchesSwagger(method: HttpMethod, pathTemplate: string, body: Json): void {
  own.assertRequest(method, pathTemplate, body);
  poseidon?.assertRequest(method, pathTemplate, body);
}

const wsValidators = [OWN_WS_SCHEMA_PATH, ...(poseidonReferencePresent ? [POSEIDON_WS_SCHEMA_PATH] : [])].map((path) => ({
  path,
  validate: ajv.compile(JSON.parse(readFileSync(path, 'utf8')) as JsonObject),
}));

export type WsMessage = { type: 'start' } | { type: 'timeout' } | { type: 'exit'; data: number } | { type: 'stdout' | 'stderr' | 'error'; data: string };

export function assertWebSocketMessage(message: Json): asserts message is WsMessage & Json {
  for (const { path, validate } of wsValidators) {
    assert.ok(validate(message), `WebSocket message violates ${path}: ${describeErrors(validate)}; message: ${JSON.stringify(message)}`);
  }
}

/**
 * Errors must be what CodeOcean's generic handler parses: JSON `{message, errorCode?}`, and never a
 * leaked stack trace.
 */
export function assertErrorBody(body: Json | undefined, context: string): void {
  assert.ok(isObject(body), `${context}: error body must be a JSON object, got ${JSON.stringify(body)}`);
  assert.equal(typeof body.message, 'string', `${context}: error body needs a string message: ${JSON.stringify(body)}`);
  assert.ok(String(body.message).length > 0, `${context}: error message is empty`);
  if ('errorCode' in body) assert.equal(typeof body.errorCode, 'string', `${context}: errorCode must be a string`);
  for (const key of Object.keys(body)) {
    assert.ok(['message', 'errorCode'].includes(key), `${context}: unexpected key ${key} in error body ${JSON.stringify(body)}`);
  }
  assert.doesNotMatch(String(body.message), /\n\s+at /, `${context}: error message leaks a stack trace`);
}
