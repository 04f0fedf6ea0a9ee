import assert from 'node:assert/strict';
import { createServer, type IncomingMessage, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { after, before, beforeEach, describe, test } from 'node:test';
import { join } from 'node:path';
import { gunzipSync } from 'node:zlib';
import type { FastifyInstance } from 'fastify';
import { parseConfig, unimplementedKeyWarnings } from '../src/config/load.js';
import { createErrorReporter, type ErrorReporter } from '../src/monitoring/sentry.js';
import { buildInjectApp, type FakeManager, unreachable } from './support/api-fakes.js';
import { REPO_ROOT, startDaemon } from './support/daemon.js';

/*
 * Error reporting to Sentry against a fake ingest server on 127.0.0.1 that records the envelopes
 * the SDK posts to /api/<project>/envelope/: an unexpected 500 is reported once, with its message
 * and without the token or the request body; 4xx and expected 5xx answers are not; without a DSN
 * nothing is created and nothing is sent.
 */

const TOKEN = 'sentry-secret-token';
/* Sent in the query and a header: neither may reach Sentry. */
const SECRET = 'learner-secret-payload';

interface Envelope {
  path: string;
  text: string;
}

const envelopes: Envelope[] = [];
let ingest: Server;
let port: number;

async function bodyOf(request: IncomingMessage): Promise<string> {
  const chunks: Buffer[] = [];
  for await (const chunk of request) chunks.push(chunk as Buffer);
  const raw = Buffer.concat(chunks);
  return (request.headers['content-encoding'] === 'gzip' ? gunzipSync(raw) : raw).toString('utf8');
}

before(async () => {
  ingest = createServer((request, response) => {
    void bodyOf(request).then((text) => {
      envelopes.push({ path: (request.url ?? '').split('?', 1)[0] ?? '', text });
      response.writeHead(200, { 'content-type': 'application/json' }).end('{}');
    });
  });
  await new Promise<void>((resolve) => ingest.listen(0, '127.0.0.1', resolve));
  port = (ingest.address() as AddressInfo).port;
});
after(async () => new Promise<void>((resolve) => ingest.close(() => resolve())));
beforeEach(() => {
  envelopes.length = 0;
});

/* The event items of the recorded envelopes (an envelope is a header line, then item header and payload lines). */
function events(): Record<string, unknown>[] {
  const found: Record<string, unknown>[] = [];
  for (const envelope of envelopes) {
    const lines = envelope.text.split('\n').filter((line) => line.length > 0);
    for (let index = 1; index + 1 < lines.length; index += 2) {
      const header = JSON.parse(lines[index] as string) as { type?: string };
      if (header.type === 'event') found.push(JSON.parse(lines[index + 1] as string) as Record<string, unknown>);
    }
  }
  return found;
}

async function claim(app: FastifyInstance, environmentId: number): Promise<number> {
  const response = await app.inject({
    method: 'POST',
    url: `/api/v1/runners?hint=${SECRET}`,
    headers: { 'content-type': 'application/json', 'poseidon-token': TOKEN, 'x-learner': SECRET },
    payload: { executionEnvironmentId: environmentId, inactivityTimeout: 60 },
  });
  return response.statusCode;
}

describe('with sentry.dsn', () => {
  let app: FastifyInstance;
  let manager: FakeManager;
  let reporter: ErrorReporter;

  before(async () => {
    const config = parseConfig({ sentry: { dsn: `http://public@127.0.0.1:${port}/1`, environment: 'test', release: 'poseidon-ts@9.9.9' } });
    const created = await createErrorReporter(config.sentry, '1.2.3');
    assert.ok(created);
    reporter = created;
    ({ app, manager } = await buildInjectApp({ token: TOKEN, errors: reporter }));
    manager.specs.set(7, { id: 7, image: 'python', prewarmingPoolSize: 1, cpuLimit: 100, memoryLimit: 256, networkAccess: false, exposedPorts: [] });
  });
  after(async () => app.close());
  beforeEach(() => {
    manager.failure = undefined;
  });

  test('an unexpected 500 is reported once: its message, environment, release, route; no token, no query, no headers', async () => {
    manager.failure = new Error('the disk is on fire');
    assert.equal(await claim(app, 7), 500);
    assert.equal(await reporter.flush(5_000), true);
    const sent = events();
    assert.equal(sent.length, 1, JSON.stringify(envelopes));
    assert.ok(
      envelopes.every((envelope) => envelope.path === '/api/1/envelope/'),
      envelopes.map((envelope) => envelope.path).join(),
    );
    const text = envelopes.map((envelope) => envelope.text).join('\n');
    assert.match(text, /the disk is on fire/);
    assert.doesNotMatch(text, new RegExp(TOKEN));
    assert.doesNotMatch(text, /poseidon-token/i);
    assert.doesNotMatch(text, new RegExp(SECRET));
    const event = sent[0] as { environment?: string; release?: string; tags?: Record<string, string> };
    assert.equal(event.environment, 'test');
    assert.equal(event.release, 'poseidon-ts@9.9.9');
    assert.equal(event.tags?.route, '/api/v1/runners');
    assert.equal(event.tags?.method, 'POST');
  });

  test('4xx answers and expected 5xx answers (an unreachable backend) send nothing', async () => {
    assert.equal(await claim(app, 404), 404);
    const unauthorized = await app.inject({ method: 'GET', url: '/api/v1/execution-environments', headers: { 'poseidon-token': 'wrong' } });
    assert.equal(unauthorized.statusCode, 401);
    manager.failure = unreachable();
    assert.ok((await claim(app, 7)) >= 500);
    assert.equal(await reporter.flush(5_000), true);
    await new Promise((resolve) => setTimeout(resolve, 200));
    assert.equal(envelopes.length, 0, JSON.stringify(envelopes));
  });
});

describe('without sentry.dsn', () => {
  test('no reporter is created, and a 500 sends nothing', async () => {
    assert.equal(await createErrorReporter(parseConfig({}).sentry, '1.2.3'), undefined);
    assert.equal(await createErrorReporter(parseConfig({ sentry: { environment: 'staging' } }).sentry, '1.2.3'), undefined);
    const { app, manager } = await buildInjectApp({ token: TOKEN });
    try {
      manager.specs.set(7, { id: 7, image: 'python', prewarmingPoolSize: 1, cpuLimit: 100, memoryLimit: 256, networkAccess: false, exposedPorts: [] });
      manager.failure = new Error('the disk is on fire');
      assert.equal(await claim(app, 7), 500);
      await new Promise((resolve) => setTimeout(resolve, 300));
      assert.equal(envelopes.length, 0);
    } finally {
      await app.close();
    }
  });
});

test('configuration: the honoured sentry keys are not warned about; tracing, profiling and proxies are', () => {
  const warnings = unimplementedKeyWarnings({
    sentry: {
      dsn: 'http://public@127.0.0.1:1/1',
      environment: 'x',
      release: 'y',
      debug: true,
      samplerate: 0.5,
      enabletracing: true,
      tracessamplerate: 0.2,
      httpproxy: 'http://proxy',
    },
  });
  assert.deepEqual(warnings.map((warning) => warning.key).sort(), ['sentry.enabletracing', 'sentry.httpproxy', 'sentry.tracessamplerate']);
});

describe('the daemon', () => {
  test('with sentry.dsn, an uncaught exception is logged at fatal, reported to Sentry before the exit, and the exit is 1', async () => {
    const daemon = await startDaemon({
      token: TOKEN,
      config: { sentry: { dsn: `http://public@127.0.0.1:${port}/1` } },
      env: { NODE_OPTIONS: `--import ${join(REPO_ROOT, 'test/fixtures/sentry/fatal-on-sigusr2.mjs')}` },
    });
    try {
      assert.doesNotMatch(daemon.logs(), /sentry\.dsn/, 'sentry.dsn is not warned about as unimplemented');
      process.kill(daemon.pid, 'SIGUSR2');
      const exit = await daemon.exited;
      assert.equal(exit.code, 1, daemon.logs());
      assert.match(daemon.logs(), /uncaught exception: shutting down/);
      const sent = events();
      assert.equal(sent.length, 1, JSON.stringify(envelopes));
      const text = envelopes.map((envelope) => envelope.text).join('\n');
      assert.match(text, /fatal probe: thrown on SIGUSR2/);
      assert.doesNotMatch(text, new RegExp(TOKEN));
    } finally {
      await daemon.stop();
    }
  });
});
