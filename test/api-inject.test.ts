import assert from 'node:assert/strict';
import { after, before, beforeEach, describe, test } from 'node:test';
import type { FastifyInstance, InjectOptions } from 'fastify';
import { ERROR_ANSWERS } from '../src/api/errors.js';
import { DomainError, type ErrorKind, WorkspaceUpdateError } from '../src/runner/errors.js';
import { buildInjectApp, type FakeManager, unreachable } from './support/api-fakes.js';
import { assertErrorBody, assertMatchesOwnDocument, type HttpMethod, type Json } from './support/contract.js';

/*
 * Every route and every error mapping of the API, through app.inject against in-memory fakes of
 * the accessors: no root, no sandbox, no network, a few hundred milliseconds. Every answer is also
 * checked against the project's OpenAPI document. The end-to-end suite drives the real backends.
 */

const TOKEN = 'inject-token';
const SPEC = { id: 7, image: 'python', prewarmingPoolSize: 2, cpuLimit: 100, memoryLimit: 256, networkAccess: false, exposedPorts: [] };

let app: FastifyInstance;
let manager: FakeManager;

before(async () => {
  ({ app, manager } = await buildInjectApp({ token: TOKEN, server: { bodylimit: 4096, alert: { prewarmingpoolthreshold: 0.5, depletiongraceperiod: 0 } } }));
});
after(async () => app.close());
beforeEach(() => {
  manager.specs.clear();
  manager.runners.clear();
  manager.idle = 1;
  manager.failure = undefined;
});

interface Answer {
  status: number;
  body: Json | undefined;
  text: string;
  headers: Record<string, unknown>;
}

/* One request as CodeOcean sends it (token and JSON content type on every call), checked against the document. */
async function call(
  method: HttpMethod,
  template: string,
  params: Record<string, string> = {},
  options: Omit<InjectOptions, 'method' | 'url'> & { query?: string; token?: string | null } = {},
): Promise<Answer> {
  const path = template.replace(/\{(\w+)\}/g, (_match, name: string) => params[name] ?? '');
  const { query, token = TOKEN, ...rest } = options;
  const headers: Record<string, string> = { 'content-type': 'application/json', ...(token === null ? {} : { 'poseidon-token': token }) };
  const response = await app.inject({
    method,
    url: `/api/v1${path}${query ? `?${query}` : ''}`,
    ...rest,
    headers: { ...headers, ...(rest.headers as Record<string, string> | undefined) },
  });
  const contentType = String(response.headers['content-type'] ?? '');
  const body = contentType.includes('json') && response.body.length > 0 ? (JSON.parse(response.body) as Json) : undefined;
  assertMatchesOwnDocument(
    method,
    template,
    response.statusCode,
    body,
    contentType.includes('json') ? contentType : response.body.length > 0 ? contentType : undefined,
  );
  if (response.statusCode >= 400) assertErrorBody(body, `${method} ${path} ${response.statusCode}`);
  return { status: response.statusCode, body, text: response.body, headers: response.headers };
}

function errorCode(answer: Answer): unknown {
  return typeof answer.body === 'object' && answer.body !== null && !Array.isArray(answer.body) ? answer.body.errorCode : undefined;
}

async function claim(): Promise<string> {
  manager.specs.set(SPEC.id, SPEC);
  const answer = await call('POST', '/runners', {}, { payload: { executionEnvironmentId: SPEC.id, inactivityTimeout: 60 } });
  assert.equal(answer.status, 200, answer.text);
  const body = answer.body as { runnerId: string };
  return body.runnerId;
}

const ENV = '/execution-environments/{executionEnvironmentId}';

describe('open routes', () => {
  test('health: 204, and 503 PREWARMING_POOL_DEPLETING while a pool is below the threshold', async () => {
    assert.equal((await call('GET', '/health', {}, { token: null })).status, 204);
    manager.specs.set(SPEC.id, SPEC);
    manager.idle = 0;
    const depleted = await call('GET', '/health', {}, { token: null });
    assert.equal(depleted.status, 503);
    assert.equal(errorCode(depleted), 'PREWARMING_POOL_DEPLETING');
  });

  test('version: 200, a JSON string, without a token', async () => {
    const answer = await call('GET', '/version', {}, { token: null });
    assert.equal(answer.status, 200);
    assert.equal(answer.body, '1.2.3');
  });
});

describe('authentication scope', () => {
  test('every protected route answers 401 UNAUTHORIZED without or with a wrong token', async () => {
    const routes: Array<[HttpMethod, string, Record<string, string>]> = [
      ['GET', '/statistics/execution-environments', {}],
      ['GET', '/execution-environments', {}],
      ['GET', ENV, { executionEnvironmentId: '7' }],
      ['PUT', ENV, { executionEnvironmentId: '7' }],
      ['DELETE', ENV, { executionEnvironmentId: '7' }],
      ['POST', '/runners', {}],
      ['DELETE', '/runners/{runnerId}', { runnerId: 'r' }],
      ['PATCH', '/runners/{runnerId}/files', { runnerId: 'r' }],
      ['GET', '/runners/{runnerId}/files', { runnerId: 'r' }],
      ['GET', '/runners/{runnerId}/files/raw', { runnerId: 'r' }],
      ['POST', '/runners/{runnerId}/execute', { runnerId: 'r' }],
      ['GET', '/runners/{runnerId}/websocket', { runnerId: 'r' }],
    ];
    for (const token of [null, 'wrong']) {
      for (const [method, template, params] of routes) {
        const answer = await call(method, template, params, { token });
        assert.equal(answer.status, 401, `${method} ${template} with token ${String(token)}: ${answer.text}`);
        assert.equal(errorCode(answer), 'UNAUTHORIZED');
      }
    }
  });

  test('the document and the docs page are public', async () => {
    assert.equal((await app.inject({ method: 'GET', url: '/api/v1/openapi.json' })).statusCode, 200);
    assert.equal((await app.inject({ method: 'GET', url: '/api/v1/docs/' })).statusCode, 200);
  });

  test('an unknown route is 404 NOT_FOUND as JSON', async () => {
    const response = await app.inject({ method: 'GET', url: '/api/v1/nothing', headers: { 'poseidon-token': TOKEN } });
    assert.equal(response.statusCode, 404);
    assert.deepEqual(JSON.parse(response.body), { message: 'no route GET /api/v1/nothing', errorCode: 'NOT_FOUND' });
  });
});

describe('execution environments', () => {
  test('PUT creates (201), replaces (204), tolerates a missing body id, and GET/list/statistics/DELETE follow', async () => {
    assert.equal((await call('PUT', ENV, { executionEnvironmentId: '7' }, { payload: SPEC })).status, 201);
    assert.equal((await call('PUT', ENV, { executionEnvironmentId: '7' }, { payload: { ...SPEC, prewarmingPoolSize: 3 } })).status, 204);
    const { id: _id, ...withoutId } = SPEC;
    assert.equal((await call('PUT', ENV, { executionEnvironmentId: '8' }, { payload: withoutId })).status, 201);
    assert.deepEqual(manager.specs.get(8), { ...SPEC, id: 8 });

    assert.deepEqual((await call('GET', ENV, { executionEnvironmentId: '7' })).body, { ...SPEC, prewarmingPoolSize: 3 });
    assert.deepEqual((await call('GET', ENV, { executionEnvironmentId: '7' }, { query: 'fetch=true' })).status, 200);
    const list = await call('GET', '/execution-environments', {}, { query: 'fetch=false' });
    assert.deepEqual((list.body as { executionEnvironments: Json[] }).executionEnvironments.length, 2);
    const statistics = await call('GET', '/statistics/execution-environments');
    assert.deepEqual(Object.keys(statistics.body as object), ['7', '8']);

    assert.equal((await call('DELETE', ENV, { executionEnvironmentId: '7' })).status, 204);
    const gone = await call('GET', ENV, { executionEnvironmentId: '7' });
    assert.equal(gone.status, 404);
    assert.equal(errorCode(gone), 'NOT_FOUND');
    assert.equal((await call('DELETE', ENV, { executionEnvironmentId: '7' })).status, 404);
  });

  test('path ids are decimal integers as CodeOcean writes them; anything else is 400', async () => {
    for (const id of ['%20', '0x1f', '1e2', '+5', '%0A7', '-1', '07', '1.0', 'abc', '9007199254740993']) {
      for (const method of ['GET', 'PUT', 'DELETE'] as const) {
        const answer = await call(method, ENV, { executionEnvironmentId: id }, method === 'PUT' ? { payload: { ...SPEC, id: undefined } } : {});
        assert.equal(answer.status, 400, `${method} id ${id}: ${answer.text}`);
        assert.equal(errorCode(answer), 'BAD_REQUEST');
        assert.match(String((answer.body as { message: string }).message), /executionEnvironmentId/);
      }
    }
    assert.equal(manager.specs.size, 0, 'no environment was created from a malformed id');
    assert.equal((await call('PUT', ENV, { executionEnvironmentId: '0' }, { payload: { ...SPEC, id: 0 } })).status, 201);
  });

  test('invalid bodies and queries are 400 BAD_REQUEST naming the field', async () => {
    const put = (payload: unknown): Promise<Answer> => call('PUT', ENV, { executionEnvironmentId: '7' }, { payload: JSON.stringify(payload) });
    const cases: Array<[unknown, RegExp]> = [
      [{ ...SPEC, prewarmingPoolSize: 'two' }, /prewarmingPoolSize/],
      [{ ...SPEC, memoryLimit: -5 }, /memoryLimit/],
      [{ ...SPEC, exposedPorts: [70000] }, /exposedPorts/],
      [{ ...SPEC, unknown: 1 }, /unknown/],
      [[1, 2, 3], /body/],
      [{ ...SPEC, id: 8 }, /differs/],
    ];
    for (const [payload, field] of cases) {
      const answer = await put(payload);
      assert.equal(answer.status, 400, `${JSON.stringify(payload)}: ${answer.text}`);
      assert.match((answer.body as { message: string }).message, field);
    }
    const malformed = await call('PUT', ENV, { executionEnvironmentId: '7' }, { payload: '{"id": 7, "image": ' });
    assert.equal(malformed.status, 400);
    const query = await call('GET', '/execution-environments', {}, { query: 'fetch=maybe' });
    assert.equal(query.status, 400);
    assert.match((query.body as { message: string }).message, /^invalid query: fetch/);
  });

  test('oversized (413) and non-JSON (415) bodies', async () => {
    const big = await call('PUT', ENV, { executionEnvironmentId: '7' }, { payload: { ...SPEC, image: 'x'.repeat(8192) } });
    assert.equal(big.status, 413);
    assert.equal(errorCode(big), 'PAYLOAD_TOO_LARGE');
    const text = await call('PUT', ENV, { executionEnvironmentId: '7' }, { payload: '<id>7</id>', headers: { 'content-type': 'application/xml' } });
    assert.equal(text.status, 415);
    assert.equal(errorCode(text), 'UNSUPPORTED_MEDIA_TYPE');
  });

  test('a backend failure is 500 with its errorCode, an unexpected one 500 UNKNOWN without details', async () => {
    manager.failure = unreachable();
    const nomad = await call('PUT', ENV, { executionEnvironmentId: '7' }, { payload: SPEC });
    assert.equal(nomad.status, 500);
    assert.equal(errorCode(nomad), 'NOMAD_UNREACHABLE');
    manager.failure = new TypeError('secret internals');
    const bug = await call('PUT', ENV, { executionEnvironmentId: '7' }, { payload: SPEC });
    assert.equal(bug.status, 500);
    assert.deepEqual(bug.body, { message: 'internal error; see the daemon log', errorCode: 'UNKNOWN' });
  });

  // Straight through app.inject: a PUT documents only the statuses a backend gives it, not all of them.
  test('every domain error kind answers the status and errorCode of the table in src/api/errors.ts, with its message', async () => {
    for (const [kind, answer] of Object.entries(ERROR_ANSWERS) as [ErrorKind, (typeof ERROR_ANSWERS)[ErrorKind]][]) {
      manager.failure = new DomainError(kind, `failed as ${kind}`);
      const response = await app.inject({ method: 'PUT', url: '/api/v1/execution-environments/7', headers: { 'poseidon-token': TOKEN }, payload: SPEC });
      assert.equal(response.statusCode, answer.statusCode, kind);
      assert.deepEqual(response.json(), { message: `failed as ${kind}`, errorCode: answer.errorCode }, kind);
    }
  });
});

describe('runners', () => {
  test('claim: 200 {runnerId, mappedPorts}; 404 unknown environment; 500 NOMAD_OVERLOAD when none is idle; 400 bad body', async () => {
    const runnerId = await claim();
    assert.ok(manager.runners.has(runnerId));
    assert.equal((await call('POST', '/runners', {}, { payload: { executionEnvironmentId: 99, inactivityTimeout: 60 } })).status, 404);
    manager.idle = 0;
    const overload = await call('POST', '/runners', {}, { payload: { executionEnvironmentId: SPEC.id } });
    assert.equal(overload.status, 500);
    assert.equal(errorCode(overload), 'NOMAD_OVERLOAD');
    for (const payload of [{ executionEnvironmentId: 'abc' }, { inactivityTimeout: 60 }, { executionEnvironmentId: 7, inactivityTimeout: 'soon' }]) {
      assert.equal((await call('POST', '/runners', {}, { payload })).status, 400, JSON.stringify(payload));
    }
  });

  test('an unknown runner is 410 RUNNER_GONE on every runner route, never 404', async () => {
    const runnerId = 'ghost';
    const answers = [
      await call('DELETE', '/runners/{runnerId}', { runnerId }),
      await call('PATCH', '/runners/{runnerId}/files', { runnerId }, { payload: { copy: [] } }),
      await call('GET', '/runners/{runnerId}/files', { runnerId }),
      await call('GET', '/runners/{runnerId}/files/raw', { runnerId }, { query: 'path=a.txt' }),
      await call('POST', '/runners/{runnerId}/execute', { runnerId }, { payload: { command: 'true' } }),
      await call('GET', '/runners/{runnerId}/websocket', { runnerId }, { query: 'executionID=x' }),
    ];
    for (const answer of answers) {
      assert.equal(answer.status, 410, answer.text);
      assert.equal(errorCode(answer), 'RUNNER_GONE');
    }
  });

  test('files: copy (204), list (200), download (200 with Content-Length), 424 when unreadable, 400 on bad input', async () => {
    const runnerId = await claim();
    const runner = manager.get(runnerId);
    const patch = await call(
      'PATCH',
      '/runners/{runnerId}/files',
      { runnerId },
      { payload: { delete: ['./*'], copy: [{ path: 'a.txt', content: Buffer.from('hello').toString('base64') }, { path: 'dir/' }] } },
    );
    assert.equal(patch.status, 204, patch.text);
    assert.deepEqual(runner.updates.at(-1)?.delete, ['./*']);
    assert.ok(runner.touches >= 1, 'every runner request is activity');

    const list = await call('GET', '/runners/{runnerId}/files', { runnerId }, { query: 'recursive=false&path=./&privilegedExecution=1' });
    assert.equal(list.status, 200);
    assert.deepEqual(
      (list.body as { files: Array<{ name: string }> }).files.map((file) => file.name),
      ['./a.txt', './dir/'],
    );
    assert.equal((await call('GET', '/runners/{runnerId}/files', { runnerId }, { query: 'path=/missing' })).status, 424);
    assert.equal((await call('GET', '/runners/{runnerId}/files', { runnerId }, { query: 'recursive=yes' })).status, 400);

    const raw = await call('GET', '/runners/{runnerId}/files/raw', { runnerId }, { query: 'path=a.txt' });
    assert.equal(raw.status, 200);
    assert.equal(raw.text, 'hello');
    assert.equal(raw.headers['content-length'], '5');
    assert.equal(raw.headers['content-type'], 'application/octet-stream');
    const missing = await call('GET', '/runners/{runnerId}/files/raw', { runnerId }, { query: 'path=b.txt' });
    assert.equal(missing.status, 424);
    assert.equal(errorCode(missing), 'FILE_NOT_AVAILABLE');
    assert.equal((await call('GET', '/runners/{runnerId}/files/raw', { runnerId })).status, 400, 'path is required');

    for (const payload of [{ copy: 'main.py' }, { copy: [{ content: 'eA==' }] }, { delete: [5] }, { copy: [{ path: 'a', content: '%%%' }] }]) {
      assert.equal((await call('PATCH', '/runners/{runnerId}/files', { runnerId }, { payload })).status, 400, JSON.stringify(payload));
    }
    runner.failFiles = new WorkspaceUpdateError('updating files failed: read-only');
    assert.equal((await call('PATCH', '/runners/{runnerId}/files', { runnerId }, { payload: { copy: [] } })).status, 400);
  });

  test('execute: 200 with a ws:// URL from the Host header, single use on the WebSocket route (404 afterwards); 400 bad body', async () => {
    const runnerId = await claim();
    const answer = await call(
      'POST',
      '/runners/{runnerId}/execute',
      { runnerId },
      { payload: { command: "echo 'hi'", timeLimit: 5 }, headers: { host: 'poseidon.example:7200' } },
    );
    assert.equal(answer.status, 200);
    const url = new URL((answer.body as { websocketUrl: string }).websocketUrl);
    assert.equal(url.protocol, 'ws:');
    assert.equal(url.host, 'poseidon.example:7200');
    assert.equal(url.pathname, `/api/v1/runners/${runnerId}/websocket`);
    assert.deepEqual(manager.get(runnerId).executions, []);
    // A plain GET (no upgrade) passes the pre-upgrade checks and takes the execution; a second one finds nothing.
    await app.inject({ method: 'GET', url: `${url.pathname}${url.search}`, headers: { 'poseidon-token': TOKEN } });
    const again = await call('GET', '/runners/{runnerId}/websocket', { runnerId }, { query: url.search.slice(1) });
    assert.equal(again.status, 404);
    assert.equal((await call('GET', '/runners/{runnerId}/websocket', { runnerId })).status, 400, 'executionID is required');

    for (const payload of [
      { command: 42 },
      { timeLimit: 5 },
      { command: 'true', timeLimit: 'x' },
      { command: 'true', environment: { A: 1 } },
      { command: 'true', environment: { '1A': 'x' } },
    ]) {
      assert.equal((await call('POST', '/runners/{runnerId}/execute', { runnerId }, { payload })).status, 400, JSON.stringify(payload));
    }
  });

  test('return: 204, then the runner is gone (410); a body-less DELETE with a JSON content type is fine', async () => {
    const runnerId = await claim();
    assert.equal((await call('DELETE', '/runners/{runnerId}', { runnerId })).status, 204);
    assert.deepEqual(manager.returned.at(-1), runnerId);
    assert.equal((await call('DELETE', '/runners/{runnerId}', { runnerId })).status, 410);
  });
});
