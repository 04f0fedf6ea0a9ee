import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { CodeOceanClient, environmentSpec, type ExecutionResult } from './support/codeocean-client.js';
import { startDaemon, type ConfigTree, type Daemon } from './support/daemon.js';
import { startFakeNomad, type FakeNomad } from './fake-nomad/index.js';
import { nomadOnly, stopNomadTest } from './support/nomad-e2e.js';

/*
 * Bounded connections to Nomad, through the public API: the fake refuses connections past its
 * per-client limit with Nomad's raw 429 (http_max_conns_per_client); the daemon stays below
 * nomad.maxconnections, retries a 429, and answers NOMAD_OVERLOAD when its queue overflows.
 */

const TOKEN = 'nomad-connections-token';
const ENV_ID = 51;
let fake: FakeNomad;
let daemon: Daemon | undefined;
let client: CodeOceanClient;

async function start(nomad: ConfigTree): Promise<void> {
  await daemon?.stop();
  daemon = await startDaemon({
    token: TOKEN,
    config: nomadOnly(fake.port, nomad),
  });
  client = new CodeOceanClient(daemon.baseUrl, TOKEN);
  const put = await client.putEnvironment(environmentSpec(ENV_ID, { prewarmingPoolSize: 1 }));
  assert.ok(put.status === 201 || put.status === 204, put.text);
}

const errorCodeOf = (body: unknown): string | undefined => (body as { errorCode?: string } | undefined)?.errorCode;

before(async () => {
  fake = await startFakeNomad({ heartbeatMs: 200 });
});

after(() => stopNomadTest(daemon, async () => fake?.close()));

describe('Nomad connection limits', () => {
  test('many parallel executions queue below nomad.maxconnections and never meet Nomad’s limit', async () => {
    // Slack of four: the fake counts a connection as closed only once it has seen it close.
    fake.control.setConnectionLimit(12);
    await start({ maxconnections: 8 });
    fake.control.resetConnectionStats();
    const runnerId = await client.claim(ENV_ID, 300);
    // Twelve executions of two exec sessions each (stderr and command): 24 sessions for 6 exec slots.
    const results = await Promise.all(Array.from({ length: 12 }, (_, index) => client.run(runnerId, `sleep 0.2; echo done ${index}`, { timeLimit: 60 })));
    results.forEach((result: ExecutionResult, index) => {
      assert.deepEqual(result.errors, [], `execution ${index}`);
      assert.equal(result.exitCode, 0, `execution ${index}: ${JSON.stringify(result.messages)}`);
      assert.equal(result.stdout, `done ${index}\r\n`);
    });
    const connections = fake.control.connections();
    assert.equal(connections.rejected, 0, `no 429 from Nomad: ${JSON.stringify(connections)}`);
    assert.ok(connections.peak <= 12, JSON.stringify(connections));
    assert.equal((await client.deleteRunner(runnerId)).status, 204);
    fake.control.setConnectionLimit(100);
  });

  test('Nomad’s 429 is retried with backoff: for exec sessions and for HTTP calls, writes included', async () => {
    const runnerId = await client.claim(ENV_ID, 300);
    fake.control.resetConnectionStats();
    fake.control.rejectNextConnections(2);
    const result = await client.run(runnerId, 'echo through');
    assert.equal(result.exitCode, 0, JSON.stringify(result.messages));
    assert.equal(result.stdout, 'through\r\n');
    assert.ok(fake.control.connections().rejected >= 1, JSON.stringify(fake.control.connections()));
    assert.match(daemon?.logs() ?? '', /Nomad refused an exec session \(connection limit\), retrying/);

    // Job registration is not idempotent, but a 429 comes before Nomad reads the request.
    fake.control.clearRequests();
    fake.control.injectFault({ method: 'POST', path: '/v1/jobs', status: 429, body: 'Your IP is issuing too many concurrent connections', times: 2 });
    const put = await client.putEnvironment(environmentSpec(ENV_ID + 1, { prewarmingPoolSize: 0 }));
    assert.equal(put.status, 201, put.text);
    const registrations = fake.control.requests().filter((entry) => entry.method === 'POST' && entry.path === '/v1/jobs');
    assert.equal(registrations.length, 3, 'two 429s, then the registration');
    assert.equal((await client.deleteEnvironment(ENV_ID + 1)).status, 204);
    assert.equal((await client.deleteRunner(runnerId)).status, 204);
  });

  test('past the queue, or after waiting nomad.requesttimeout for a slot, calls fail with NOMAD_OVERLOAD', async () => {
    // 4 connections: 2 for HTTP (one is the event stream's), 2 exec sessions; one caller may wait.
    await start({ maxconnections: 4, maxqueued: 1 });
    const runnerId = await client.claim(ENV_ID, 300);
    let running: () => void = () => undefined;
    const started = new Promise<void>((resolve) => (running = resolve));
    // This execution holds both exec slots (its stderr session and its command) until the runner goes.
    const holder = client.connect(await client.websocketUrl(runnerId, 'echo holding; sleep 60', 120), {
      onMessage: (message) => {
        if (message.type === 'stdout') running();
      },
    });
    await started;
    const metrics = await (await fetch(`${daemon?.origin}/metrics`, { headers: { 'Poseidon-Token': TOKEN } })).text();
    assert.match(metrics, /^poseidon_nomad_connections\{kind="exec",state="in_use"\} 2$/m, 'the held exec slots are in the metrics');
    const listings = await Promise.all([client.listFiles(runnerId), client.listFiles(runnerId)]);
    for (const listing of listings) {
      assert.equal(listing.status, 500, listing.text);
      assert.equal(errorCodeOf(listing.body), 'NOMAD_OVERLOAD', listing.text);
    }
    const messages = listings.map((listing) => (listing.body as { message: string }).message);
    const prefix = 'Nomad is busy: all 2 exec sessions allowed per Nomad address are in use and';
    assert.ok(messages.includes(`${prefix} the queue is full (1 waiting)`), messages.join(' | '));
    assert.ok(messages.includes(`${prefix} none became free within 3000 ms`), messages.join(' | '));
    assert.equal((await client.deleteRunner(runnerId)).status, 204);
    await holder;
    const next = await client.claim(ENV_ID, 300);
    assert.equal((await client.listFiles(next)).status, 200, 'the slots are free again');
    assert.equal((await client.deleteRunner(next)).status, 204);
  });

  test('every exchange with the fake matched the Nomad spec', () => {
    assert.deepEqual(fake.control.specViolations(), []);
  });
});
