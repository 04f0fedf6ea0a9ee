import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { type ApiResponse, CodeOceanClient, environmentSpec, type RequestOptions } from './support/codeocean-client.js';
import type { HttpMethod } from './support/contract.js';
import { useDaemon } from './support/fixture.js';
import { sleep } from './support/wait.js';

/*
 * Issue 10, points 5-7 against the real daemon: a CodeOcean-like session moves the Prometheus
 * counters and histograms it should; every log line a request causes carries its X-Request-Id;
 * /health stays 204 while a pool fills normally and answers 503 for one that stays depleted.
 */

const TOKEN = 'monitoring-token-5c1e';
const GRACE_S = 4;
const GOOD_ENV = 31;
const FILLING_ENV = 32;
const BROKEN_ENV = 33;

/* A client that sends the X-Request-Id set before each call, as a proxy in front of the daemon would. */
class TracingClient extends CodeOceanClient {
  requestId: string | undefined;

  override request(method: HttpMethod, pathTemplate: string, params: Record<string, string> = {}, options: RequestOptions = {}): Promise<ApiResponse> {
    const headers = this.requestId === undefined ? options.headers : { ...options.headers, 'X-Request-Id': this.requestId };
    return super.request(method, pathTemplate, params, { ...options, headers });
  }
}

const fixture = useDaemon({
  token: TOKEN,
  config: {
    logger: { level: 'debug' },
    // One build at a time, so a new pool spends a while below its threshold while filling.
    runners: { refillconcurrency: 1 },
    server: { alert: { prewarmingpoolthreshold: 0.5, depletiongraceperiod: GRACE_S, buildfailurethreshold: 1000 } },
    // An image whose root file system does not exist: its runners can never be built.
    local: { images: { broken: '/nonexistent/poseidon-ts-monitoring-rootfs' } },
  },
});

type Samples = Map<string, number>;

/* Prometheus text format into `name{labels}` -> value; labels as the daemon writes them (sorted by prom-client). */
function parseMetrics(text: string): Samples {
  const samples: Samples = new Map();
  for (const line of text.split('\n')) {
    if (line === '' || line.startsWith('#')) continue;
    const space = line.lastIndexOf(' ');
    samples.set(line.slice(0, space), Number(line.slice(space + 1)));
  }
  return samples;
}

/* The sum over every sample of `name` whose labels include all of `labels`. */
function total(samples: Samples, name: string, labels: Record<string, string> = {}): number {
  let sum = 0;
  for (const [key, value] of samples) {
    const brace = key.indexOf('{');
    const metric = brace === -1 ? key : key.slice(0, brace);
    if (metric !== name) continue;
    if (Object.entries(labels).every(([label, wanted]) => key.includes(`${label}="${wanted}"`))) sum += value;
  }
  return sum;
}

async function scrape(): Promise<Samples> {
  const response = await fetch(`${fixture.daemon.origin}/metrics`, { headers: { 'Poseidon-Token': TOKEN } });
  assert.equal(response.status, 200);
  assert.match(response.headers.get('content-type') ?? '', /^text\/plain; version=0\.0\.4/);
  return parseMetrics(await response.text());
}

interface LogLine {
  level: string;
  msg: string;
  requestId?: string;
  runnerId?: string;
  environmentId?: number;
  [key: string]: unknown;
}

function logLines(): LogLine[] {
  return fixture.daemon
    .logs()
    .split('\n')
    .filter((line) => line.startsWith('{'))
    .map((line) => JSON.parse(line) as LogLine);
}

describe('metrics and request ids', () => {
  test('/metrics needs the token', async () => {
    const response = await fetch(`${fixture.daemon.origin}/metrics`);
    assert.equal(response.status, 401);
  });

  test('a CodeOcean session moves the counters and histograms, and every line it caused carries its request id', async () => {
    const client = new TracingClient(fixture.daemon.baseUrl, TOKEN);
    const before = await scrape();

    client.requestId = 'session-put';
    assert.equal((await client.putEnvironment(environmentSpec(GOOD_ENV, { prewarmingPoolSize: 1 }))).status, 201);
    client.requestId = 'session-claim';
    const runnerId = await client.claim(GOOD_ENV, 60);
    client.requestId = 'session-patch';
    const upload = 'print("hello")\n'.repeat(10);
    assert.equal((await client.copySubmission(runnerId, { 'main.py': upload })).status, 204);
    client.requestId = 'session-execute';
    const url = await client.websocketUrl(runnerId, 'python3 main.py', 10);
    const run = await client.connect(url, { headers: { 'X-Request-Id': 'session-websocket' } });
    assert.equal(run.exitCode, 0, run.stderr);
    client.requestId = 'session-download';
    const download = await client.downloadRaw(runnerId, 'main.py');
    assert.equal(download.status, 200);
    assert.equal(download.headers.get('x-request-id'), 'session-download', 'the id is echoed');
    client.requestId = 'session-return';
    assert.equal((await client.deleteRunner(runnerId)).status, 204);
    client.requestId = undefined;
    // The returned runner's teardown finishes after the answer.
    await sleep(500);

    const after = await scrape();
    const delta = (name: string, labels: Record<string, string> = {}): number => total(after, name, labels) - total(before, name, labels);
    const env = { environment_id: String(GOOD_ENV) };
    assert.equal(delta('poseidon_runner_claims_total', { ...env, outcome: 'success' }), 1);
    assert.equal(delta('poseidon_runner_claim_duration_seconds_count', { ...env, outcome: 'success' }), 1);
    assert.equal(delta('poseidon_executions_total', { ...env, outcome: 'exit' }), 1);
    assert.equal(delta('poseidon_execution_duration_seconds_count', { ...env, outcome: 'exit' }), 1);
    assert.ok(delta('poseidon_execution_duration_seconds_sum', env) > 0);
    // The first runner, and its replacement after the claim.
    assert.ok(delta('poseidon_runner_builds_total', { ...env, outcome: 'success' }) >= 2);
    assert.ok(delta('poseidon_runner_build_duration_seconds_sum', env) > 0);
    // What the client received (a terminal execution turns \n into \r\n).
    assert.equal(run.stdout.replace(/\r\n/g, '\n'), 'hello\n'.repeat(10));
    assert.equal(delta('poseidon_transferred_bytes_total', { ...env, direction: 'stdout' }), Buffer.byteLength(run.stdout));
    assert.equal(delta('poseidon_transferred_bytes_total', { ...env, direction: 'upload' }), upload.length);
    assert.equal(delta('poseidon_transferred_bytes_total', { ...env, direction: 'download' }), upload.length);
    assert.equal(delta('poseidon_websocket_upgrades_total', { outcome: 'accepted' }), 1);
    assert.equal(total(after, 'poseidon_websocket_connections'), 0, 'the connection is closed again');
    const route = (path: string): Record<string, string> => ({ route: `/api/v1${path}` });
    assert.equal(delta('poseidon_http_requests_total', { ...route('/runners'), method: 'POST', status_code: '200' }), 1);
    assert.equal(delta('poseidon_http_requests_total', { ...route('/runners/:runnerId/files'), method: 'PATCH', status_code: '204' }), 1);
    assert.equal(delta('poseidon_http_request_duration_seconds_count', { ...route('/runners/:runnerId'), method: 'DELETE', status_code: '204' }), 1);
    assert.equal(total(after, 'poseidon_prewarming_pool_size', env), 1);
    assert.equal(total(after, 'poseidon_runners_used', env), 0);
    assert.ok(total(after, 'process_cpu_seconds_total') > 0, 'default process metrics are there');

    // Every line a request caused carries that request's id, and the ones we expect are there.
    const lines = logLines();
    const byRequest = (id: string): string[] => lines.filter((line) => line.requestId === id).map((line) => line.msg);
    const expected: Record<string, string[]> = {
      'session-put': ['environment stored', 'request'],
      'session-claim': ['runner claimed', 'request'],
      'session-patch': ['request'],
      'session-execute': ['request'],
      'session-websocket': ['websocket upgrade accepted', 'execution started', 'execution finished'],
      'session-download': ['request'],
      'session-return': ['runner destroyed', 'request'],
    };
    for (const [id, messages] of Object.entries(expected)) {
      const seen = byRequest(id);
      for (const message of messages) assert.ok(seen.includes(message), `no "${message}" line with requestId ${id}; its lines: ${JSON.stringify(seen)}`);
    }
    // Lines about this runner that only a request can cause must all carry one of the session's ids.
    const caused = new Set([
      'runner claimed',
      'runner destroyed',
      'execution started',
      'execution finished',
      'websocket upgrade accepted',
      'environment stored',
    ]);
    for (const line of lines.filter((candidate) => caused.has(candidate.msg) && (candidate.runnerId === runnerId || candidate.environmentId === GOOD_ENV))) {
      assert.ok(line.requestId?.startsWith('session-'), `a line caused by a request lacks its id: ${JSON.stringify(line)}`);
    }
    // Request lines name the client and use level names.
    const claimLine = lines.find((line) => line.requestId === 'session-claim' && line.msg === 'request');
    assert.equal(claimLine?.level, 'info');
    assert.equal(claimLine?.remoteAddress, '127.0.0.1');
    assert.equal(typeof claimLine?.userAgent, 'string');
    assert.ok(!fixture.daemon.logs().includes(TOKEN), 'the token never reaches the log');
  });

  test('a request without X-Request-Id gets a UUID, echoed; health and metrics probes log at debug only', async () => {
    const response = await fetch(`${fixture.daemon.baseUrl}/version`);
    const id = response.headers.get('x-request-id') ?? '';
    assert.match(id, /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/);
    await sleep(100);
    const line = logLines().find((candidate) => candidate.requestId === id);
    assert.equal(line?.level, 'debug');
  });
});

describe('honest health', () => {
  test('/health stays 204 while a new pool fills normally', async () => {
    const client = fixture.client;
    assert.equal((await client.putEnvironment(environmentSpec(FILLING_ENV, { prewarmingPoolSize: 6 }))).status, 201);
    let belowThresholdPolls = 0;
    const deadline = Date.now() + 60_000;
    for (;;) {
      const stats = (await client.statistics()).body as Record<string, { idleRunners: number; prewarmingPoolSize: number }>;
      const pool = stats[String(FILLING_ENV)];
      assert.ok(pool);
      const health = await client.health();
      assert.equal(health.status, 204, `health during a normal fill (${pool.idleRunners}/${pool.prewarmingPoolSize} idle): ${health.text}`);
      if (pool.idleRunners / pool.prewarmingPoolSize < 0.5) belowThresholdPolls += 1;
      if (pool.idleRunners === pool.prewarmingPoolSize) break;
      assert.ok(Date.now() < deadline, 'the pool did not fill within 60 s');
      await sleep(50);
    }
    // Otherwise the test would prove nothing: the old /health answered 503 at these moments.
    assert.ok(belowThresholdPolls > 0, 'never saw the pool below its threshold');
    assert.equal((await client.deleteEnvironment(FILLING_ENV)).status, 204);
  });

  test('/health answers 503 naming the environment once a pool stays depleted past the grace period, 204 after it is gone', async () => {
    const client = fixture.client;
    assert.equal((await client.putEnvironment(environmentSpec(BROKEN_ENV, { image: 'broken', prewarmingPoolSize: 2 }))).status, 201);
    const created = Date.now();
    assert.equal((await client.health()).status, 204, 'within the grace period');
    let health: ApiResponse;
    for (;;) {
      health = await client.health();
      if (health.status !== 204) break;
      assert.ok(Date.now() - created < (GRACE_S + 10) * 1000, 'still 204 long after the grace period');
      await sleep(200);
    }
    assert.ok(Date.now() - created >= GRACE_S * 1000 - 100, `503 before the grace period ended (${Date.now() - created} ms)`);
    assert.equal(health.status, 503);
    const body = health.body as { message: string; errorCode: string };
    assert.equal(body.errorCode, 'PREWARMING_POOL_DEPLETING');
    assert.match(body.message, new RegExp(`below 50% for longer than ${GRACE_S} s for execution environment\\(s\\) ${BROKEN_ENV}`));

    const metrics = await scrape();
    assert.ok(total(metrics, 'poseidon_runner_builds_total', { environment_id: String(BROKEN_ENV), outcome: 'failure' }) >= 1, 'build failures are counted');

    assert.equal((await client.deleteEnvironment(BROKEN_ENV)).status, 204);
    assert.equal((await client.health()).status, 204);
  });
});
