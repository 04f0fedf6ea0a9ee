import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { CodeOceanClient, environmentSpec } from './support/codeocean-client.js';
import { startDaemon, type Daemon } from './support/daemon.js';
import { waitFor } from './support/wait.js';
import { startFakeNomad, type FakeNomad } from './fake-nomad/index.js';

/*
 * Recovery and faults of the Nomad backend: daemon restart mid-use, a dropped event stream, failed,
 * lost and OOM-killed allocations, and Nomad answering 500 or not at all.
 */

const TOKEN = 'nomad-faults-token';
const ENV_ID = 31;
const POOL = 2;
let fake: FakeNomad;
let daemon: Daemon | undefined;
let client: CodeOceanClient;

async function start(): Promise<void> {
  daemon = await startDaemon({
    token: TOKEN,
    config: { nomad: { enabled: true, address: '127.0.0.1', port: fake.port, requesttimeout: 1500 }, local: { enabled: false } },
  });
  client = new CodeOceanClient(daemon.baseUrl, TOKEN);
}

async function stop(): Promise<void> {
  const logs = daemon?.logs().trim() ?? '';
  try {
    await daemon?.stop();
  } finally {
    daemon = undefined;
    if (logs.length > 0 && process.env['NOMAD_E2E_LOGS'] !== undefined) process.stderr.write(`--- daemon output ---\n${logs.slice(-8000)}\n`);
  }
}

interface Stats {
  idleRunners: number;
  usedRunners: number;
}

async function statistics(): Promise<Stats | undefined> {
  const response = await client.request('GET', '/statistics/execution-environments', {});
  const body = response.body as Record<string, Stats> | undefined;
  return body?.[String(ENV_ID)];
}

const runnerJobs = (): string[] => fake.control.jobIds().filter((id) => id.startsWith(`${ENV_ID}-`));
const allocationOf = (runnerId: string): string => {
  const running = fake.control.allocations(runnerId).find((alloc) => alloc['ClientStatus'] === 'running');
  assert.ok(running, `runner ${runnerId} has a running allocation`);
  return String(running['ID']);
};

/* A runner whose allocation is gone answers 410 to everything. */
async function runnerGone(runnerId: string): Promise<void> {
  await waitFor(
    async () => (await client.execute(runnerId, 'true')).status,
    (status) => status === 410,
    'runner gone',
    5_000,
    100,
  );
}

/* The pool is full and every runner job in Nomad is counted exactly once (nothing leaked or doubled). */
async function settled(used: number): Promise<void> {
  await waitFor(
    async () => ({ stats: await statistics(), jobs: runnerJobs().length }),
    ({ stats, jobs }) => stats?.idleRunners === POOL && stats.usedRunners === used && jobs === POOL + used,
    `${POOL} idle and ${used} used runners, and as many runner jobs`,
    10_000,
    100,
  );
}

before(async () => {
  fake = await startFakeNomad({ heartbeatMs: 200 });
  await start();
  assert.equal((await client.putEnvironment(environmentSpec(ENV_ID, { prewarmingPoolSize: POOL }))).status, 201);
  await settled(0);
});

after(async () => {
  await stop();
  await fake?.close();
});

describe('Nomad backend recovery and faults', () => {
  test('a daemon restart mid-use recovers the environment, idle and used runners with their ids', async () => {
    const used = await client.claim(ENV_ID, 300);
    assert.equal((await client.copySubmission(used, { 'state.txt': 'kept' })).status, 204);
    await settled(1);
    // Wait until the asynchronous "used" mark is in Nomad, as it would be long before a real restart.
    await fake.control.waitFor(() =>
      fake.control.events().some((b) => b.Events.some((e) => e['Key'] === used && JSON.stringify(e['Payload']).includes('"used":"true"'))),
    );
    const jobsBefore = runnerJobs();

    await stop();
    await start();
    await settled(1);
    assert.deepEqual(runnerJobs(), jobsBefore, 'the same runner jobs: nothing re-created, nothing leaked');
    const read = await client.run(used, 'cat state.txt');
    assert.equal(read.stdout, 'kept', 'the used runner keeps its id and workspace');
    const idle = await client.claim(ENV_ID);
    assert.ok(jobsBefore.includes(idle), 'an idle runner from before the restart is handed out');
    assert.equal((await client.deleteRunner(idle)).status, 204);
    assert.equal((await client.deleteRunner(used)).status, 204);
    await settled(0);
  });

  test('a dropped event stream (buffer lost) triggers a resync; the pool refills without double counting', async () => {
    fake.control.dropEventStreams({ clearBuffer: true });
    const claimed = [await client.claim(ENV_ID), await client.claim(ENV_ID)];
    await settled(2);
    fake.control.dropEventStreams({ clearBuffer: true });
    await new Promise((resolve) => setTimeout(resolve, 2_500)); // past the continuity timeout: the gap resync ran
    await settled(2);
    for (const runnerId of claimed) assert.equal((await client.deleteRunner(runnerId)).status, 204);
    await settled(0);
  });

  test('a failed allocation: the runner answers 410 and is replaced', async () => {
    const runnerId = await client.claim(ENV_ID);
    await settled(1);
    fake.control.failAllocation(allocationOf(runnerId));
    await runnerGone(runnerId);
    assert.equal((await client.deleteRunner(runnerId)).status, 410);
    await settled(0);
    assert.ok(!runnerJobs().includes(runnerId), 'its job is purged');
    // An idle runner failing is replaced too.
    const [idle] = runnerJobs();
    assert.ok(idle);
    fake.control.failAllocation(allocationOf(idle));
    await waitFor(
      async () => runnerJobs().includes(idle),
      (present) => !present,
      'failed idle runner purged',
      5_000,
      100,
    );
    await settled(0);
  });

  test('a lost allocation (rescheduled elsewhere): 410, replacement job purged, pool refilled', async () => {
    const runnerId = await client.claim(ENV_ID);
    await settled(1);
    fake.control.loseAllocation(allocationOf(runnerId), { reschedule: true });
    await runnerGone(runnerId);
    await settled(0);
    assert.ok(!runnerJobs().includes(runnerId));
  });

  test('an OOM kill ends the execution with exit 137 and the runner is recycled', async () => {
    const runnerId = await client.claim(ENV_ID);
    const allocation = allocationOf(runnerId);
    const result = await client.run(runnerId, 'echo ready; sleep 20', {
      timeLimit: 15,
      onMessage: (message) => {
        if (message.type === 'stdout') fake.control.oomKill(allocation);
      },
    });
    assert.equal(result.exitCode, 137, JSON.stringify(result.messages));
    await waitFor(
      async () => (await client.execute(runnerId, 'true')).status,
      (status) => status === 410,
      'OOM-killed runner gone',
      5_000,
      100,
    );
    await settled(0);
  });

  test('Nomad 500s and timeouts become clear API errors; the daemon stays up and recovers', async () => {
    fake.control.injectFault({ method: 'POST', path: '/v1/jobs', status: 500, body: 'rpc error: leader lost', times: 1 });
    // Poseidon's swagger documents no 500 for PUT, but CodeOcean's generic handler reads {message, errorCode}.
    const putUnchecked = (): ReturnType<CodeOceanClient['request']> =>
      client.request(
        'PUT',
        '/execution-environments/{executionEnvironmentId}',
        { executionEnvironmentId: String(ENV_ID + 1) },
        {
          body: { ...environmentSpec(ENV_ID + 1, { prewarmingPoolSize: 0 }) },
          validate: false,
        },
      );
    const failed = await putUnchecked();
    assert.equal(failed.status, 500, failed.text);
    assert.equal((failed.body as { errorCode?: string }).errorCode, 'NOMAD_INTERNAL_SERVER_ERROR', failed.text);

    fake.control.injectFault({ method: 'POST', path: '/v1/jobs', delayMs: 2_500, times: 1 });
    const slow = await putUnchecked();
    assert.equal(slow.status, 500, slow.text);
    assert.equal((slow.body as { errorCode?: string }).errorCode, 'NOMAD_UNREACHABLE', slow.text);

    const runnerId = await client.claim(ENV_ID);
    fake.control.injectFault({ path: '/v1/client/allocation/', status: 500, body: 'internal error', times: 1 });
    const patch = await client.copySubmission(runnerId, { 'a.txt': 'a' });
    assert.equal(patch.status, 500, patch.text);
    assert.equal((patch.body as { errorCode?: string }).errorCode, 'NOMAD_INTERNAL_SERVER_ERROR', patch.text);

    assert.equal((await client.version()).status, 200, 'the daemon is still up');
    assert.equal((await client.copySubmission(runnerId, { 'a.txt': 'a' })).status, 204, 'and works once Nomad does');
    assert.equal((await client.putEnvironment(environmentSpec(ENV_ID + 1, { prewarmingPoolSize: 0 }))).status, 201);
    assert.equal((await client.deleteEnvironment(ENV_ID + 1)).status, 204);
    assert.equal((await client.deleteRunner(runnerId)).status, 204);
    await settled(0);
  });

  test('every request and response exchanged with the fake Nomad matched the Nomad spec', () => {
    assert.deepEqual(fake.control.specViolations(), []);
  });
});
