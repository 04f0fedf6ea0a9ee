import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { CodeOceanClient, DEFAULT_IMAGE, environmentSpec, type EnvironmentSpec } from './support/codeocean-client.js';
import { startDaemon, type Daemon } from './support/daemon.js';
import { nomadOnly, poolStatistics, stopNomadTest } from './support/nomad-e2e.js';
import { waitFor } from './support/wait.js';
import { startFakeNomad, type FakeNomad } from './fake-nomad/index.js';

/*
 * What the daemon makes of Nomad's scheduler, through the public API: a template Nomad cannot place
 * fails the PUT with Nomad's reasons (datacenter, driver, capacity) and leaves Nomad as it was;
 * runners Nomad cannot place fail at once, back off, show in /health and /metrics, and the pool fills
 * once capacity appears; nomad.runnerstarttimeout gives up a runner that never starts but not one
 * whose image is still being pulled. Also: a runner's used mark is an in-place update, and an exec
 * Nomad refuses for the token (1011 after the upgrade) is an error that names nomad.token.
 */

const TOKEN = 'nomad-placement-token';
let fake: FakeNomad;
let daemon: Daemon;
let client: CodeOceanClient;

/* Poseidon's swagger documents no 500 for PUT; CodeOcean reads {message, errorCode} from any error. */
async function putUnchecked(spec: EnvironmentSpec): Promise<{ status: number; message: string; errorCode: string | undefined }> {
  const response = await client.request(
    'PUT',
    '/execution-environments/{executionEnvironmentId}',
    { executionEnvironmentId: String(spec.id) },
    { body: { ...spec }, validate: false },
  );
  const body = response.body as { message?: string; errorCode?: string } | undefined;
  return { status: response.status, message: body?.message ?? response.text, errorCode: body?.errorCode };
}

async function metrics(target: Daemon): Promise<string> {
  return (await fetch(`${target.origin}/metrics`, { headers: { 'Poseidon-Token': TOKEN } })).text();
}

async function idleRunners(target: CodeOceanClient, environmentId: number): Promise<number | undefined> {
  return (await poolStatistics(target, environmentId))?.idleRunners;
}

const runnerJobs = (environmentId: number): string[] => fake.control.jobIds().filter((id) => id.startsWith(`${environmentId}-`));

async function nomadJob(id: string): Promise<Record<string, unknown>> {
  return (await (await fetch(`${fake.url}/v1/job/${id}`)).json()) as Record<string, unknown>;
}

function templateCpu(job: Record<string, unknown>): unknown {
  const groups = job['TaskGroups'] as Array<{ Name: string; Tasks: Array<{ Resources: { CPU: number } }> }>;
  return groups.find((group) => group.Name === 'default-group')?.Tasks[0]?.Resources.CPU;
}

before(async () => {
  fake = await startFakeNomad({ heartbeatMs: 200 });
  daemon = await startDaemon({
    token: TOKEN,
    config: { ...nomadOnly(fake.port), server: { alert: { buildfailurethreshold: 2 } } },
  });
  client = new CodeOceanClient(daemon.baseUrl, TOKEN);
});

after(() => stopNomadTest(daemon, () => fake.close()));

describe('Nomad placement failures', () => {
  test('a template Nomad cannot place fails the PUT with a 500 naming the reason, and nothing stays behind', async () => {
    const cases: Array<{ id: number; nodes: Parameters<FakeNomad['control']['setNodes']>[0]; reason: RegExp; cause: string }> = [
      { id: 41, nodes: [{ MemoryMB: 40 }], reason: /Dimension "memory" exhausted on 1 nodes/, cause: 'resources' },
      { id: 42, nodes: [{ Datacenter: 'dc2' }], reason: /No nodes were eligible for evaluation/, cause: 'no_nodes' },
      { id: 43, nodes: [{ Drivers: ['exec'] }], reason: /Constraint "missing drivers": 1 nodes excluded by filter/, cause: 'constraints' },
    ];
    for (const { id, nodes, reason, cause } of cases) {
      fake.control.setNodes(nodes);
      const answer = await putUnchecked(environmentSpec(id, { prewarmingPoolSize: 1 }));
      assert.equal(answer.status, 500, answer.message);
      assert.equal(answer.errorCode, 'NOMAD_INTERNAL_SERVER_ERROR');
      assert.match(answer.message, new RegExp(`Nomad could not place job "template-${id}"`));
      assert.match(answer.message, /task group "default-group" \(failed to place 1 allocation\)/);
      assert.match(answer.message, reason);
      assert.match(answer.message, /waiting for additional capacity to place remainder/);
      assert.equal((await client.getEnvironment(id)).status, 404, 'the environment was not stored');
      assert.ok(!fake.control.jobIds().includes(`template-${id}`), 'the template job was purged from Nomad');
      assert.deepEqual(runnerJobs(id), []);
      assert.match(await metrics(daemon), new RegExp(`poseidon_nomad_placement_failures_total\\{environment_id="${id}",cause="${cause}"\\} 1\\b`));
    }
    fake.control.setNodes([{}]);
  });

  test('an update Nomad cannot place fails the PUT and leaves the previous template in force', async () => {
    fake.control.setNodes([{ CPU: 1000 }]);
    const spec = environmentSpec(44, { prewarmingPoolSize: 0, cpuLimit: 20 });
    assert.equal((await client.putEnvironment(spec)).status, 201);
    const answer = await putUnchecked({ ...spec, cpuLimit: 5000 });
    assert.equal(answer.status, 500, answer.message);
    assert.match(answer.message, /Dimension "cpu" exhausted on 1 nodes/);
    assert.deepEqual((await client.getEnvironment(44)).body, { ...spec });
    assert.equal(templateCpu(await nomadJob('template-44')), 20, "Nomad runs the previous template's resources again");
    assert.equal((await client.deleteEnvironment(44)).status, 204);
    fake.control.setNodes([{}]);
  });

  test('runners Nomad cannot place fail at once, back off, show in /health and /metrics; the pool fills once capacity appears', async () => {
    // Room for the template and two runners (20 MHz each), not for the third.
    const [node] = fake.control.setNodes([{ CPU: 70 }]);
    assert.ok(node);
    assert.equal((await client.putEnvironment(environmentSpec(45, { prewarmingPoolSize: 3, cpuLimit: 20 }))).status, 201);
    await waitFor(
      () => idleRunners(client, 45),
      (idle) => idle === 2,
      'the two runners that fit',
    );
    // From now on every build fails, so the failure streak grows past the threshold.
    const unhealthy = await waitFor(
      () => client.health(),
      (response) => response.status === 503,
      '/health reporting the failing builds',
    );
    const message = (unhealthy.body as { message: string }).message;
    assert.match(message, /runners of execution environment 45 cannot be built/);
    assert.match(message, /Nomad could not place job "45-[^"]+".*Dimension "cpu" exhausted on 1 nodes/);
    assert.match(await metrics(daemon), /poseidon_nomad_placement_failures_total\{environment_id="45",cause="resources"\} [1-9]/);
    assert.match(await metrics(daemon), /poseidon_runner_builds_total\{environment_id="45",outcome="failure"\} [1-9]/);
    // Backing off, not hammering: a slower machine registers fewer jobs, never more, in a window.
    const from = Date.now();
    await new Promise((resolve) => setTimeout(resolve, 3_000));
    const registrations = fake.control.requestsBetween(from).filter((entry) => entry.path === '/v1/jobs' && entry.method !== 'GET');
    assert.ok(registrations.length <= 4, `${registrations.length} registrations within 3 s of backoff`);
    // Failed runner jobs were purged: Nomad holds only the two that run.
    await waitFor(
      async () => runnerJobs(45).length,
      (count) => count === 2,
      'only the placed runner jobs left in Nomad',
    );

    fake.control.updateNode(node.ID, { CPU: 10_000 });
    await waitFor(
      () => idleRunners(client, 45),
      (idle) => idle === 3,
      'the pool full once capacity appeared',
      60_000,
    );
    await waitFor(
      async () => (await client.health()).status,
      (status) => status === 204,
      'healthy again',
    );
    assert.equal((await client.deleteEnvironment(45)).status, 204);
    fake.control.setNodes([{}]);
  });

  test("a claim's used mark updates the runner job in place: same allocation, new job version, workspace kept", async () => {
    assert.equal((await client.putEnvironment(environmentSpec(48, { prewarmingPoolSize: 1 }))).status, 201);
    const runnerId = await client.claim(48);
    const [before] = fake.control.allocations(runnerId);
    assert.ok(before);
    assert.equal((await client.copySubmission(runnerId, { 'kept.txt': 'still here' })).status, 204);
    // The mark changes only the count-0 config group's meta, which Nomad's tasksUpdated does not compare.
    await fake.control.waitFor(() => fake.control.allocations(runnerId).some((allocation) => allocation['JobVersion'] === 1));
    const after = fake.control.allocations(runnerId);
    assert.deepEqual(
      after.map((allocation) => [allocation['ID'], allocation['DesiredStatus']]),
      [[before['ID'], 'run']],
      'no replacement allocation',
    );
    assert.equal((await client.run(runnerId, 'cat kept.txt')).stdout, 'still here');
    assert.equal((await client.deleteEnvironment(48)).status, 204);
  });

  test('an exec Nomad refuses for the token answers an error naming nomad.token; the runner stays usable', async () => {
    assert.equal((await client.putEnvironment(environmentSpec(49, { prewarmingPoolSize: 1 }))).status, 201);
    const runnerId = await client.claim(49);
    fake.control.denyExec(true);
    try {
      const upload = await client.copySubmission(runnerId, { 'a.txt': 'a' });
      assert.equal(upload.status, 500, upload.text);
      const body = upload.body as { message: string; errorCode: string };
      assert.equal(body.errorCode, 'NOMAD_INTERNAL_SERVER_ERROR');
      assert.match(body.message, /Nomad refused the exec \(Permission denied\): nomad\.token .*alloc-exec capability in namespace default/);
      const execution = await client.connect(await client.websocketUrl(runnerId, 'true'));
      assert.equal(execution.exitCode, undefined);
      assert.match(execution.errors.join('\n'), /Permission denied/, JSON.stringify(execution.messages));
    } finally {
      fake.control.denyExec(false);
    }
    assert.equal((await client.copySubmission(runnerId, { 'a.txt': 'a' })).status, 204);
    assert.equal((await client.run(runnerId, 'cat a.txt')).stdout, 'a');
    assert.equal((await client.deleteEnvironment(49)).status, 204);
  });

  test('every request and response exchanged with the fake Nomad matched the Nomad spec', () => {
    assert.deepEqual(fake.control.specViolations(), []);
  });
});

describe('nomad.runnerstarttimeout', () => {
  let slowFake: FakeNomad;
  let slowDaemon: Daemon;
  let slowClient: CodeOceanClient;
  before(async () => {
    slowFake = await startFakeNomad({ heartbeatMs: 200, timings: { pullDelayMs: 6_000 } });
    slowDaemon = await startDaemon({
      token: TOKEN,
      config: { ...nomadOnly(slowFake.port, { runnerstarttimeout: 2 }), server: { alert: { buildfailurethreshold: 1 } }, logger: { level: 'info' } },
    });
    slowClient = new CodeOceanClient(slowDaemon.baseUrl, TOKEN);
  });
  after(() => stopNomadTest(slowDaemon, () => slowFake.close()));

  test('a runner whose image takes longer to pull than the timeout is waited for, not given up', async () => {
    const image = `${DEFAULT_IMAGE}-slow-pull`;
    slowFake.control.slowImagePull(image);
    assert.equal((await slowClient.putEnvironment(environmentSpec(46, { prewarmingPoolSize: 2, image }))).status, 201);
    await waitFor(
      () => idleRunners(slowClient, 46),
      (idle) => idle === 2,
      'both runners ready after their image pull',
      60_000,
    );
    const purges = slowFake.control.requests().filter((entry) => entry.method === 'DELETE' && entry.path.startsWith('/v1/job/46-'));
    assert.deepEqual(purges, [], 'no runner was given up while pulling');
    assert.match(slowDaemon.logs(), /runner still pulling its image/);
    assert.equal((await slowClient.deleteEnvironment(46)).status, 204);
  });

  test('a runner that never starts is given up after the timeout, and its job purged', async () => {
    slowFake.control.stallAllocationStart('47-');
    assert.equal((await slowClient.putEnvironment(environmentSpec(47, { prewarmingPoolSize: 1 }))).status, 201);
    const unhealthy = await waitFor(
      () => slowClient.health(),
      (response) => response.status === 503,
      '/health reporting the runner that did not start',
    );
    assert.match((unhealthy.body as { message: string }).message, /did not start within 2 s \(nomad\.runnerstarttimeout\)/);
    await waitFor(
      async () => slowFake.control.requests().some((entry) => entry.method === 'DELETE' && entry.path.startsWith('/v1/job/47-')),
      (purged) => purged,
      'the stalled runner job purged',
    );
    assert.equal((await slowClient.deleteEnvironment(47)).status, 204);
  });
});
