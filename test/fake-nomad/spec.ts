import { existsSync, readFileSync } from 'node:fs';
import { Ajv, type ValidateFunction } from 'ajv';
import addFormatsModule from 'ajv-formats';
import { parse } from 'yaml';

/*
 * Validates what the fake sends (and what our client sends it) against Nomad's OpenAPI document
 * (hashicorp/nomad-openapi, generated from Nomad 1.4's api package; copied unmodified to
 * ../shared/nomad/nomad-openapi.yaml). The spec is never edited; this overlay fixes what it gets
 * wrong about the real wire format:
 *
 *  1. Nullability: the spec has no `nullable` at all, but Nomad serialises every nil list, map and
 *     pointer as `null` ("Meta": null, "TaskStates": null). Every typed node and every $ref is
 *     widened to also accept null.
 *  2. The exec WebSocket and the event stream are not in the spec; their frames and lines get the
 *     hand-written schemas below (from Nomad 1.10's api/allocations_exec.go and api/event_stream.go).
 *  3. 404 answers (`job not found`, `alloc not found`) are plain text and undeclared; only JSON
 *     answers are validated.
 *  4. OpenAPI-only formats (int32/int64/double/float/uint64) are type annotations, not string formats.
 *  5. Newer fields (NodePool, NetworkStatus, ...) are absent from the spec; the spec declares no
 *     additionalProperties:false, so they pass unchecked.
 *  6. PUT /v1/jobs is accepted by Nomad but the spec only declares POST; the fake accepts both and
 *     validates both against POST's schemas.
 */

export const specPath = new URL('../../../shared/nomad/nomad-openapi.yaml', import.meta.url);
/*
 * The spec is not part of the repository (it sits beside it, in ../shared); a fresh clone has no
 * such folder. The fake then works the same, without validating anything, and the tests that are
 * about the validation itself skip with this message.
 */
export const nomadSpecPresent = existsSync(specPath);
export const NOMAD_SPEC_MISSING = "Nomad's OpenAPI document: ../shared/nomad/nomad-openapi.yaml not found, so nothing is validated against it";

type JsonObject = Record<string, unknown>;

function isObject(value: unknown): value is JsonObject {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

/* Overlay item 1, plus rewriting refs so schema fragments compile against the registered document. */
function widen(node: unknown): unknown {
  if (Array.isArray(node)) return node.map(widen);
  if (!isObject(node)) return node;
  const out: JsonObject = {};
  for (const [key, value] of Object.entries(node)) {
    if (key === 'properties' && isObject(value)) {
      out[key] = Object.fromEntries(Object.entries(value).map(([name, schema]) => [name, widen(schema)]));
    } else out[key] = widen(value);
  }
  if (typeof out['$ref'] === 'string') {
    const ref = out['$ref'].replace(/^#\//, 'nomad#/');
    return { anyOf: [{ $ref: ref }, { type: 'null' }] };
  }
  if (typeof out['type'] === 'string') out['type'] = [out['type'], 'null'];
  return out;
}

const eventSchema = {
  type: 'object',
  required: ['Topic', 'Type', 'Key', 'Index', 'Payload'],
  properties: {
    Topic: { type: 'string' },
    Type: { type: 'string' },
    Key: { type: 'string' },
    Namespace: { type: 'string' },
    FilterKeys: { type: ['array', 'null'], items: { type: 'string' } },
    Index: { type: 'integer', minimum: 1 },
    Payload: {
      type: 'object',
      properties: {
        Allocation: { $ref: 'nomad#/components/schemas/Allocation' },
        Evaluation: { $ref: 'nomad#/components/schemas/Evaluation' },
        Job: { $ref: 'nomad#/components/schemas/Job' },
        Node: { $ref: 'nomad#/components/schemas/Node' },
      },
      minProperties: 1,
    },
  },
};

/* Overlay item 2: one NDJSON line of /v1/event/stream, either `{}` or a batch. */
const eventLineSchema = {
  oneOf: [
    { type: 'object', maxProperties: 0 },
    {
      type: 'object',
      required: ['Index', 'Events'],
      properties: { Index: { type: 'integer', minimum: 1 }, Events: { type: 'array', minItems: 1, items: eventSchema } },
    },
  ],
};

const base64 = { type: 'string', pattern: '^[A-Za-z0-9+/]*={0,2}$' };
const streamPart = {
  type: 'object',
  additionalProperties: false,
  properties: { data: base64, close: { type: 'boolean' } },
};

/* Overlay item 2: exec frames, both directions. */
const execServerFrameSchema = {
  type: 'object',
  additionalProperties: false,
  properties: {
    stdout: streamPart,
    stderr: streamPart,
    exited: { type: 'boolean' },
    result: {
      type: 'object',
      additionalProperties: false,
      properties: { exit_code: { type: 'integer' }, signal: { type: 'string' }, oom_killed: { type: 'boolean' } },
    },
  },
};
const execClientFrameSchema = {
  type: 'object',
  additionalProperties: false,
  properties: {
    stdin: streamPart,
    tty_size: { type: 'object', properties: { height: { type: 'integer' }, width: { type: 'integer' } } },
    version: { type: 'integer' },
    auth_token: { type: 'string' },
  },
};

let missingNoted = false;
/* Once per process, on stderr, so a run without the spec says why the fake checked nothing. */
function noteMissingSpec(): void {
  if (missingNoted) return;
  missingNoted = true;
  process.stderr.write(`fake Nomad: ${NOMAD_SPEC_MISSING}\n`);
}

export type SpecMethod = 'get' | 'post' | 'put' | 'delete';

export class NomadSpec {
  private readonly ajv = new Ajv({ strict: false, allErrors: true });
  private readonly document: JsonObject | undefined;
  private readonly cache = new Map<string, ValidateFunction | null>();

  constructor() {
    if (!nomadSpecPresent) {
      this.document = undefined;
      noteMissingSpec();
      return;
    }
    const document: unknown = parse(readFileSync(specPath, 'utf8'));
    if (!isObject(document) || !isObject(document['components'])) throw new Error('Nomad OpenAPI document has no components');
    this.document = document;
    const addFormats = (addFormatsModule as unknown as { default: typeof addFormatsModule.default }).default;
    addFormats(this.ajv);
    for (const format of ['int32', 'int64', 'uint64', 'double', 'float']) this.ajv.addFormat(format, true); // overlay item 4
    const components = document['components'];
    this.ajv.addSchema({ $id: 'nomad', components: { schemas: widen(isObject(components) ? components['schemas'] : {}) } });
    this.cache.set('line:event', this.ajv.compile(eventLineSchema));
    this.cache.set('frame:server', this.ajv.compile(execServerFrameSchema));
    this.cache.set('frame:client', this.ajv.compile(execClientFrameSchema));
  }

  /* Errors of a JSON response body of `method path` (an OpenAPI path template like `/job/{jobName}`) with status 200. */
  response(method: SpecMethod, template: string, body: unknown): string[] {
    return this.run(`res:${method}:${template}`, () => this.operationSchema(method, template, 'response'), body);
  }

  request(method: SpecMethod, template: string, body: unknown): string[] {
    return this.run(`req:${method}:${template}`, () => this.operationSchema(method, template, 'request'), body);
  }

  component(name: string, value: unknown): string[] {
    return this.run(`schema:${name}`, () => ({ $ref: `nomad#/components/schemas/${name}` }), value);
  }

  eventLine(value: unknown): string[] {
    return this.run('line:event', () => undefined, value);
  }

  execServerFrame(value: unknown): string[] {
    return this.run('frame:server', () => undefined, value);
  }

  execClientFrame(value: unknown): string[] {
    return this.run('frame:client', () => undefined, value);
  }

  private run(key: string, schema: () => unknown, value: unknown): string[] {
    if (this.document === undefined) return []; // validation off: see nomadSpecPresent
    let validate = this.cache.get(key);
    if (validate === undefined) {
      const found = schema();
      validate = found === undefined ? null : this.ajv.compile(isObject(found) ? found : {});
      this.cache.set(key, validate);
    }
    if (validate === null) return [`no schema for ${key}`];
    if (validate(value)) return [];
    return (validate.errors ?? []).slice(0, 10).map((error) => `${key} ${error.instancePath || '/'} ${error.message ?? 'invalid'}`);
  }

  private operationSchema(method: SpecMethod, template: string, kind: 'request' | 'response'): unknown {
    const paths = this.document?.['paths'];
    const operation = isObject(paths) && isObject(paths[template]) ? paths[template][method === 'put' ? 'post' : method] : undefined;
    if (!isObject(operation)) return undefined;
    let holder: unknown = kind === 'request' ? operation['requestBody'] : isObject(operation['responses']) ? operation['responses']['200'] : undefined;
    if (isObject(holder) && typeof holder['$ref'] === 'string') holder = this.resolve(holder['$ref']);
    const content = isObject(holder) ? holder['content'] : undefined;
    const media = isObject(content) ? content['application/json'] : undefined;
    return isObject(media) ? widen(media['schema']) : undefined;
  }

  private resolve(ref: string): unknown {
    let node: unknown = this.document;
    for (const part of ref.replace(/^#\//, '').split('/')) node = isObject(node) ? node[part.replace(/~1/g, '/').replace(/~0/g, '~')] : undefined;
    return node;
  }
}
