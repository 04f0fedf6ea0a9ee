import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { type CodeOceanClient, environmentSpec } from './support/codeocean-client.js';
import type { Daemon } from './support/daemon.js';
import { poolStatistics, startNomadTest, stopNomadTest } from './support/nomad-e2e.js';
import { waitFor } from './support/wait.js';
import type { FakeNomad } from './fake-nomad/index.js';

/*
 * What the Nomad backend does in Nomad during the CodeOcean flow, seen through the fake's control
 * API: the jobs it registers and purges, its event-driven pool, and that a claim from a filled pool
 * makes no Nomad call even when every Nomad call takes 200 ms. The flow itself, through the public
 * API only, is e2e-nomad-agent (which also runs against a real agent).
 */

const TOKEN = 'nomad-flow-token';
const ENV_ID = 21;
let fake: FakeNomad;
let daemon: Daemon;
let client: CodeOceanClient;

const statistics = (environmentId: number): ReturnType<typeof poolStatistics> => poolStatistics(client, environmentId);

before(async () => {
  ({ fake, daemon, client } = await startNomadTest(TOKEN));
});

after(() => stopNomadTest(daemon, async () => fake?.close(), true));

describe('CodeOcean flow on the Nomad backend', () => {
  test('PUT registers the template job; the pool fills from allocation events', async () => {
    const spec = environmentSpec(ENV_ID, { prewarmingPoolSize: 2, networkAccess: true, exposedPorts: [8080] });
    const created = await client.putEnvironment(spec);
    assert.equal(created.status, 201, created.text);
    assert.ok(fake.control.jobIds().includes(`template-${ENV_ID}`), 'the template job is registered in Nomad');
    assert.equal((await client.putEnvironment(spec)).status, 204);
    const single = await client.getEnvironment(ENV_ID);
    assert.deepEqual(single.body, { ...spec });
    await waitFor(
      () => statistics(ENV_ID),
      (s) => s?.idleRunners === 2,
      'two idle runners',
    );
    const runnerJobs = fake.control.jobIds().filter((id) => id.startsWith(`${ENV_ID}-`));
    assert.equal(runnerJobs.length, 2, `one job per runner: ${runnerJobs.join(', ')}`);
    // Readiness comes from the event stream: no per-runner polling of allocations (the start's resync lists them all once).
    const polls = fake.control.requests().filter((entry) => /\/v1\/job\/[^/]+\/allocations$|\/v1\/allocation\//.test(entry.path));
    assert.deepEqual(polls, [], 'no allocation polling while filling the pool');
  });

  test('a claim marks the runner job used in Nomad, off the claim’s path; a release purges it', async () => {
    const runnerId = await client.claim(ENV_ID, 180);
    await fake.control.waitFor(() =>
      fake.control
        .events()
        .some((batch) =>
          batch.Events.some((event) => event['Key'] === runnerId && event['Topic'] === 'Job' && JSON.stringify(event['Payload']).includes('"used":"true"')),
        ),
    );
    assert.equal((await client.deleteRunner(runnerId)).status, 204);
    await fake.control.waitFor(() => !fake.control.jobIds().includes(runnerId));
    assert.equal((await client.execute(runnerId, 'true')).status, 410);
  });

  test('with 200 ms latency on every Nomad call, a claim from a filled pool makes no Nomad call', async () => {
    await waitFor(
      () => statistics(ENV_ID),
      (s) => (s?.idleRunners ?? 0) >= 2,
      'pool refilled',
    );
    fake.control.setLatency(200);
    try {
      const from = Date.now();
      const claimed = await client.claimRunner(ENV_ID, 60);
      const to = Date.now();
      assert.equal(claimed.status, 200, claimed.text);
      assert.ok(to - from < 190, `a claim must not wait for Nomad (took ${to - from} ms)`);
      // Asynchronous writes (refill, "used" mark) may start during the claim, but nothing is read or awaited.
      const during = fake.control.requestsBetween(from, to);
      assert.ok(
        during.every((entry) => entry.method === 'POST' && entry.path === '/v1/jobs'),
        JSON.stringify(during),
      );
      const runnerId = (claimed.body as { runnerId: string }).runnerId;
      assert.equal((await client.deleteRunner(runnerId)).status, 204);
    } finally {
      fake.control.setLatency(0);
    }
  });

  test('DELETE environment deregisters the template and purges every runner job', async () => {
    const runnerId = await client.claim(ENV_ID);
    assert.equal((await client.deleteEnvironment(ENV_ID)).status, 204);
    await fake.control.waitFor(() => !fake.control.jobIds().some((id) => id === `template-${ENV_ID}` || id.startsWith(`${ENV_ID}-`)), 5_000);
    assert.equal((await client.execute(runnerId, 'true')).status, 410);
    assert.equal((await client.claimRunner(ENV_ID)).status, 404);
    assert.deepEqual(fake.control.specViolations(), []);
  });
});
