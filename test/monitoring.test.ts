import assert from 'node:assert/strict';
import { Writable } from 'node:stream';
import { describe, test } from 'node:test';
import pino from 'pino';
import pretty from 'pino-pretty';
import { parseConfig } from '../src/config/load.js';
import type { EnvironmentStatistics } from '../src/dto/environment.js';
import { HealthMonitor } from '../src/monitoring/health.js';
import { loggerOptions } from '../src/monitoring/logger.js';
import { Metrics, nomadEndpoint } from '../src/monitoring/metrics.js';
import { buildInjectApp } from './support/api-fakes.js';

/*
 * Metrics, logs and health through app.inject and with a fake clock: the rules in milliseconds.
 * test/e2e-monitoring.test.ts checks the same against the real daemon and sandboxes.
 */

const SPEC = { id: 7, image: 'python', prewarmingPoolSize: 4, cpuLimit: 100, memoryLimit: 256, networkAccess: false, exposedPorts: [] };
const stats = (idle: number, size = 4, id = 7): EnvironmentStatistics => ({ id, prewarmingPoolSize: size, idleRunners: idle, usedRunners: 0 });

function clock(): { now: () => number; advance: (ms: number) => void } {
  let time = 1_000_000;
  return { now: () => time, advance: (ms) => (time += ms) };
}

describe('health monitor', () => {
  test('a pool below its threshold is healthy for the grace period, then depleted; filling again heals it', () => {
    const time = clock();
    const health = new HealthMonitor({ threshold: 0.5, graceMs: 10_000, buildFailureThreshold: 3 }, time.now);
    assert.equal(health.check([stats(0)]), undefined, 'just created: filling, not depleted');
    time.advance(9_000);
    assert.equal(health.check([stats(1)]), undefined, 'still within the grace period');
    time.advance(1_000);
    assert.match(health.check([stats(1)])?.message ?? '', /below 50% for longer than 10 s for execution environment\(s\) 7/);
    assert.equal(health.check([stats(2)]), undefined, 'at the threshold again');
    time.advance(20_000);
    assert.equal(health.check([stats(1)]), undefined, 'a new dip starts a new grace period');
  });

  test('a resize restarts the grace period; a threshold of 0 or an empty pool never alerts', () => {
    const time = clock();
    const health = new HealthMonitor({ threshold: 0.5, graceMs: 10_000, buildFailureThreshold: 3 }, time.now);
    health.observe([stats(0)]);
    time.advance(9_000);
    assert.equal(health.check([stats(0, 40)]), undefined, 'resized: filling towards the new size');
    time.advance(9_000);
    assert.equal(health.check([stats(3, 40)]), undefined);
    time.advance(1_000);
    assert.ok(health.check([stats(3, 40)]));
    const off = new HealthMonitor({ threshold: 0, graceMs: 0, buildFailureThreshold: 3 }, time.now);
    assert.equal(off.check([stats(0)]), undefined);
    assert.equal(health.check([stats(0, 0)]), undefined);
  });

  test('a pool waiting for its image is not depleted, however long the pull; its grace period starts when the image is ready; an image failure is reported until cleared', () => {
    const time = clock();
    const health = new HealthMonitor({ threshold: 0.5, graceMs: 10_000, buildFailureThreshold: 3 }, time.now);
    health.imageState(7, 'pulling');
    health.observe([stats(0)]);
    time.advance(60_000);
    assert.equal(health.check([stats(0)]), undefined, 'pulling for a minute: no failure');
    assert.deepEqual(health.pulls(), [{ environmentId: 7, detail: undefined }]);
    health.imageState(7, 'ready');
    assert.deepEqual(health.pulls(), []);
    // The app samples the pools every second: the first sample after the pull starts the grace period.
    health.observe([stats(0)]);
    time.advance(9_000);
    assert.equal(health.check([stats(0)]), undefined, 'ready: the pool fills within its grace period');
    time.advance(1_000);
    assert.ok(health.check([stats(0)]), 'then an empty pool is depleted as any other');
    health.imageState(8, 'failed', 'not-found: repository test/missing not found');
    assert.match(
      health.check([stats(4), stats(0, 1, 8)])?.message ?? '',
      /the image of execution environment 8 cannot be prepared \(not-found: repository test\/missing not found\)/,
    );
    health.imageState(8, 'pulling', 'retrying after registry-unavailable: connection refused');
    assert.equal(health.check([stats(4), stats(0, 1, 8)]), undefined, 'put again: pulling, no failure');
    assert.deepEqual(health.pulls(), [{ environmentId: 8, detail: 'retrying after registry-unavailable: connection refused' }]);
    health.observe([stats(4)]);
    assert.deepEqual(health.pulls(), [], 'a deleted environment is forgotten');
  });

  test('repeated build failures make runners unbuildable at once, naming the cause; a success clears it; deleted environments are forgotten', () => {
    const time = clock();
    const health = new HealthMonitor({ threshold: 0.5, graceMs: 60_000, buildFailureThreshold: 3 }, time.now);
    health.runnerBuilt(7, 0.1, new Error('bwrap: no such image'));
    health.runnerBuilt(7, 0.1, new Error('bwrap: no such image'));
    assert.equal(health.check([stats(0)]), undefined);
    health.runnerBuilt(7, 0.1, new Error('bwrap: no such image'));
    assert.match(
      health.check([stats(0)])?.message ?? '',
      /runners of execution environment 7 cannot be built \(3 failures in a row, last: bwrap: no such image\)/,
    );
    health.runnerBuilt(7, 0.1);
    assert.equal(health.check([stats(1)]), undefined);
    for (let i = 0; i < 3; i += 1) health.runnerBuilt(8, 0.1, new Error('gone'));
    assert.ok(health.check([stats(4), stats(0, 4, 8)]));
    assert.equal(health.check([stats(4)]), undefined, 'environment 8 was deleted');
  });

  test('GET /health through the app: 204 while filling, 503 PREWARMING_POOL_DEPLETING after the grace', async () => {
    const time = clock();
    const health = new HealthMonitor({ threshold: 0.5, graceMs: 5_000, buildFailureThreshold: 3 }, time.now);
    const { app, manager } = await buildInjectApp({ health });
    try {
      manager.specs.set(SPEC.id, SPEC);
      manager.idle = 0;
      assert.equal((await app.inject({ method: 'GET', url: '/api/v1/health' })).statusCode, 204);
      time.advance(5_000);
      const answer = await app.inject({ method: 'GET', url: '/api/v1/health' });
      assert.equal(answer.statusCode, 503);
      assert.deepEqual(answer.json(), {
        message: 'prewarming pool below 50% for longer than 5 s for execution environment(s) 7',
        errorCode: 'PREWARMING_POOL_DEPLETING',
      });
    } finally {
      await app.close();
    }
  });
});

describe('metrics endpoint', () => {
  test('behind the token by default, open with server.metrics.requiretoken false, absent when disabled', async () => {
    const guarded = await buildInjectApp({ token: 'secret' });
    const open = await buildInjectApp({ token: 'secret', server: { metrics: { requiretoken: false } } });
    const disabled = await buildInjectApp({ token: 'secret', server: { metrics: { enabled: false } } });
    try {
      assert.equal((await guarded.app.inject({ method: 'GET', url: '/metrics' })).statusCode, 401);
      assert.equal((await guarded.app.inject({ method: 'GET', url: '/metrics', headers: { 'poseidon-token': 'secret' } })).statusCode, 200);
      assert.equal((await open.app.inject({ method: 'GET', url: '/metrics' })).statusCode, 200);
      assert.equal((await disabled.app.inject({ method: 'GET', url: '/metrics', headers: { 'poseidon-token': 'secret' } })).statusCode, 404);
    } finally {
      await Promise.all([guarded.app.close(), open.app.close(), disabled.app.close()]);
    }
  });

  test('requests by route template, claims by outcome, pools from the statistics; each app counts only its own', async () => {
    const metrics = new Metrics({ processMetrics: false });
    const { app, manager } = await buildInjectApp({ metrics });
    const other = await buildInjectApp();
    try {
      manager.specs.set(SPEC.id, SPEC);
      const claim = { executionEnvironmentId: SPEC.id, inactivityTimeout: 60 };
      const runnerId = (await app.inject({ method: 'POST', url: '/api/v1/runners', payload: claim })).json<{ runnerId: string }>().runnerId;
      manager.idle = 0;
      assert.equal((await app.inject({ method: 'POST', url: '/api/v1/runners', payload: claim })).statusCode, 500);
      assert.equal((await app.inject({ method: 'POST', url: '/api/v1/runners', payload: { ...claim, executionEnvironmentId: 99 } })).statusCode, 404);
      await app.inject({
        method: 'PATCH',
        url: `/api/v1/runners/${runnerId}/files`,
        payload: { copy: [{ path: 'a.txt', content: Buffer.from('12345').toString('base64') }] },
      });
      await app.inject({ method: 'GET', url: `/api/v1/runners/${runnerId}/files/raw?path=a.txt` });
      await app.inject({ method: 'GET', url: '/api/v1/runners/gone/files' });

      const text = (await app.inject({ method: 'GET', url: '/metrics' })).body;
      for (const line of [
        'poseidon_runner_claims_total{environment_id="7",outcome="success"} 1',
        'poseidon_runner_claims_total{environment_id="7",outcome="no_idle_runner"} 1',
        'poseidon_runner_claims_total{environment_id="99",outcome="environment_not_found"} 1',
        'poseidon_http_requests_total{method="POST",route="/api/v1/runners",status_code="200"} 1',
        'poseidon_http_requests_total{method="GET",route="/api/v1/runners/:runnerId/files",status_code="410"} 1',
        'poseidon_transferred_bytes_total{environment_id="7",direction="upload"} 5',
        'poseidon_transferred_bytes_total{environment_id="7",direction="download"} 5',
        'poseidon_runners_idle{environment_id="7"} 0',
        'poseidon_prewarming_pool_size{environment_id="7"} 4',
      ]) {
        assert.ok(text.includes(`${line}\n`), `missing ${line}`);
      }
      assert.match(text, /poseidon_http_request_duration_seconds_count\{method="POST",route="\/api\/v1\/runners",status_code="200"\} 1\n/);
      assert.ok(!text.includes(runnerId), 'no runner ids in labels');
      const otherText = (await other.app.inject({ method: 'GET', url: '/metrics' })).body;
      assert.ok(!otherText.includes('poseidon_runner_claims_total{'), 'a second app has a registry of its own');
    } finally {
      await Promise.all([app.close(), other.app.close()]);
    }
  });

  test('Nomad endpoints lose their ids', () => {
    assert.equal(nomadEndpoint('/v1/job/5-abc/allocations'), '/v1/job/:id/allocations');
    assert.equal(nomadEndpoint('/v1/client/allocation/a1b2/stats'), '/v1/client/allocation/:id/stats');
    assert.equal(nomadEndpoint('/v1/jobs'), '/v1/jobs');
    assert.equal(nomadEndpoint('/v1/evaluation/e1'), '/v1/evaluation/:id');
  });
});

describe('logs', () => {
  interface Line {
    level: string;
    msg: string;
    requestId?: string;
    [key: string]: unknown;
  }

  async function capturingApp(
    level: string,
  ): Promise<{ lines: Line[]; app: Awaited<ReturnType<typeof buildInjectApp>>['app']; manager: Awaited<ReturnType<typeof buildInjectApp>>['manager'] }> {
    const lines: Line[] = [];
    const sink = new Writable({
      write(chunk: Buffer, _encoding, done) {
        for (const text of chunk.toString().split('\n')) if (text) lines.push(JSON.parse(text) as Line);
        done();
      },
    });
    const logger = pino(loggerOptions({ level: level as 'info', formatter: 'json' }), sink);
    const { app, manager } = await buildInjectApp({ logger, token: 'tok-secret' });
    return { lines, app, manager };
  }

  test('X-Request-Id is taken, echoed and on the request line with client address and user agent; a bad one is replaced by a UUID', async () => {
    const { lines, app, manager } = await capturingApp('info');
    try {
      manager.specs.set(SPEC.id, SPEC);
      const answer = await app.inject({
        method: 'POST',
        url: '/api/v1/runners',
        headers: { 'x-request-id': 'co-4711', 'user-agent': 'Faraday v2.9', 'poseidon-token': 'tok-secret' },
        payload: { executionEnvironmentId: SPEC.id, inactivityTimeout: 60 },
      });
      assert.equal(answer.headers['x-request-id'], 'co-4711');
      const line = lines.find((candidate) => candidate.msg === 'request' && candidate.requestId === 'co-4711');
      assert.ok(line, JSON.stringify(lines));
      assert.equal(line.level, 'info', 'level names, not numbers');
      assert.equal(line.userAgent, 'Faraday v2.9');
      assert.equal(line.remoteAddress, '127.0.0.1');
      assert.equal(line.statusCode, 200);

      const garbled = await app.inject({ method: 'GET', url: '/api/v1/version', headers: { 'x-request-id': 'evil\tline' } });
      assert.match(String(garbled.headers['x-request-id']), /^[0-9a-f-]{36}$/);
      assert.ok(!JSON.stringify(lines).includes('tok-secret'), 'the token is never logged');
    } finally {
      await app.close();
    }
  });

  test('health, version and metrics probes are debug lines; a refused WebSocket upgrade is logged', async () => {
    const { lines, app } = await capturingApp('info');
    try {
      await app.inject({ method: 'GET', url: '/api/v1/health' });
      await app.inject({ method: 'GET', url: '/api/v1/version' });
      await app.inject({ method: 'GET', url: '/metrics', headers: { 'poseidon-token': 'tok-secret' } });
      assert.equal(lines.length, 0, `nothing at info: ${JSON.stringify(lines)}`);
      await app.inject({
        method: 'GET',
        url: '/api/v1/runners/7-x/websocket?executionID=nope',
        headers: { upgrade: 'websocket', connection: 'upgrade', 'poseidon-token': 'tok-secret' },
      });
      assert.ok(
        lines.some((line) => line.msg === 'websocket upgrade refused'),
        JSON.stringify(lines),
      );
    } finally {
      await app.close();
    }
    const debug = await capturingApp('debug');
    try {
      await debug.app.inject({ method: 'GET', url: '/api/v1/health' });
      assert.equal(debug.lines.find((line) => line.msg === 'request')?.level, 'debug');
    } finally {
      await debug.app.close();
    }
  });

  test("logger.formatter takes Poseidon's TextFormatter/JSONFormatter (and text/json); text is one readable line", () => {
    assert.equal(parseConfig({ logger: { formatter: 'TextFormatter' } }).logger.formatter, 'text');
    assert.equal(parseConfig({ logger: { formatter: 'JSONFormatter' } }).logger.formatter, 'json');
    assert.equal(parseConfig({ logger: { formatter: 'text' } }).logger.formatter, 'text');
    assert.equal(parseConfig({}).logger.formatter, 'json');
    assert.throws(() => parseConfig({ logger: { formatter: 'xml' } }), /logger\.formatter/);

    let output = '';
    const sink = new Writable({
      write(chunk: Buffer, _encoding, done) {
        output += chunk.toString();
        done();
      },
    });
    const logger = pino(loggerOptions({ level: 'info', formatter: 'text' }), pretty({ sync: true, colorize: false, singleLine: true, destination: sink }));
    logger.info({ requestId: 'r-1', token: 'do-not-show' }, 'runner claimed');
    assert.match(output, /INFO.*runner claimed.*"requestId":"r-1"/);
    assert.equal(output.trim().split('\n').length, 1);
    assert.ok(!output.includes('do-not-show'));
  });
});
