import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { createServer } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import pino from 'pino';
import { configSchema, type NomadConfig } from '../src/config/schema.js';
import type { Allocation, EventBatch } from '../src/nomad/client/api-types.js';
import { NomadError, NomadExecError } from '../src/nomad/client/errors.js';
import type { GapInfo } from '../src/nomad/client/event-stream.js';
import { ExecutorApi } from '../src/nomad/client/executor-api.js';
import { buildTemplateJob, defaultTaskName, defaultTemplateJob, deriveRunnerJob, type TemplateEnvironment } from '../src/nomad/job-template.js';
import { startFakeNomad, type FakeNomad } from './fake-nomad/index.js';
import { NOMAD_SPEC_MISSING, nomadSpecPresent } from './fake-nomad/spec.js';

const logger = pino({ level: 'silent' });
const environment: TemplateEnvironment = {
  id: 11,
  image: 'python:3',
  cpuLimit: 20,
  memoryLimit: 128,
  prewarmingPoolSize: 1,
  networkAccess: true,
  exposedPorts: [8080],
};

function nomadConfig(port: number, extra: Record<string, unknown> = {}): NomadConfig {
  return configSchema.parse({ nomad: { enabled: true, port, requesttimeout: 2_000, ...extra } }).nomad;
}

function newApi(port: number, extra: Record<string, unknown> = {}): ExecutorApi {
  return new ExecutorApi(nomadConfig(port, extra), logger, { retry: { retries: 2, baseDelayMs: 10, maxDelayMs: 50 } });
}

async function* chunks(...parts: string[]): AsyncGenerator<Buffer> {
  for (const part of parts) yield Buffer.from(part);
}

/* Registers a runner job and waits until its allocation runs (observed through the fake). */
async function startRunner(fake: FakeNomad, api: ExecutorApi, runnerId: string): Promise<string> {
  const config = nomadConfig(fake.port);
  await api.registerJob(deriveRunnerJob(buildTemplateJob(defaultTemplateJob(), environment, config), runnerId, config.namespace));
  await fake.control.waitFor(() => fake.control.allocations(runnerId).some((alloc) => alloc['ClientStatus'] === 'running'));
  const [newest] = await api.listJobAllocations(runnerId);
  assert.ok(newest !== undefined);
  return newest.ID;
}

/* A read the daemon never makes, straight from the fake Nomad. */
async function nomadGet(fake: FakeNomad, path: string): Promise<Record<string, unknown>> {
  const response = await fetch(`http://127.0.0.1:${fake.port}${path}`);
  return response.ok ? ((await response.json()) as Record<string, unknown>) : {};
}

async function closedPort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const address = server.address();
  await new Promise<void>((resolve) => server.close(() => resolve()));
  return typeof address === 'object' && address !== null ? address.port : 1;
}

async function rejectsWith(promise: Promise<unknown>, errorCode: NomadError['errorCode'], status?: number): Promise<NomadError> {
  try {
    await promise;
  } catch (error) {
    assert.ok(error instanceof NomadError, `expected a NomadError, got ${String(error)}`);
    assert.equal(error.errorCode, errorCode, error.message);
    if (status !== undefined) assert.equal(error.status, status);
    return error;
  }
  assert.fail('expected a rejection');
}

describe('ExecutorApi against the fake Nomad', () => {
  let fake: FakeNomad;
  let api: ExecutorApi;

  before(async () => {
    fake = await startFakeNomad({ heartbeatMs: 100, timings: { schedulerDelayMs: 2, startDelayMs: 10, killDelayMs: 10, restartDelayMs: 30 } });
    api = newApi(fake.port);
  });
  after(async () => {
    await api.close();
    await fake.close();
  });

  it('registers, lists, reads and purges jobs', async () => {
    const config = nomadConfig(fake.port);
    const template = buildTemplateJob(defaultTemplateJob(), environment, config);
    const registered = await api.registerJob(template);
    assert.match(registered.evalId, /^[0-9a-f-]{36}$/);
    let evaluation = await nomadGet(fake, `/v1/evaluation/${registered.evalId}`);
    for (let poll = 0; evaluation['Status'] !== 'complete' && poll < 200; poll++) {
      await sleep(5);
      evaluation = await nomadGet(fake, `/v1/evaluation/${registered.evalId}`);
    }
    assert.equal(evaluation['Status'], 'complete');

    const stubs = await api.listJobs('template');
    assert.deepEqual(
      stubs.map((stub) => stub.ID),
      ['template-11'],
    );
    const job = await api.getJob('template-11');
    assert.equal(job?.Type, 'batch');
    const group = job?.TaskGroups?.find((candidate) => candidate.Name === 'config');
    assert.equal(group?.Meta?.['prewarmingPoolSize'], '1');
    assert.equal(group?.Count, 0);
    // Canonicalised like Nomad: server-side defaults appear in the read job.
    assert.equal(job?.['Region'], 'global');
    assert.equal(await api.getJob('no-such-job'), undefined);

    const purged = await api.deregisterJob('template-11', { purge: true });
    assert.ok(purged.evalId !== undefined);
    assert.equal(await api.getJob('template-11'), undefined);
    assert.deepEqual(await api.listJobs('template'), []);
    // Purging a missing job succeeds (Nomad >= 1.6 semantics).
    assert.deepEqual(await api.deregisterJob('template-11', { purge: true }), { evalId: undefined });
  });

  it('sees a runner allocation go pending → running through the event stream, with port mappings', async () => {
    const seen: Allocation[] = [];
    const subscription = api.subscribeEvents({
      startIndex: fake.control.index,
      onEvents: (batch: EventBatch) => {
        for (const event of batch.events) if (event.kind === 'allocation' && event.allocation.JobID === '11-events') seen.push(event.allocation);
      },
    });
    try {
      const allocId = await startRunner(fake, api, '11-events');
      await fake.control.waitFor(() => seen.some((alloc) => alloc.ClientStatus === 'running'));
      assert.equal(seen[0]?.ClientStatus, 'pending');
      assert.equal(seen[0]?.DesiredStatus, 'run');
      assert.equal(seen.at(-1)?.ID, allocId);
      assert.equal(seen.at(-1)?.Job ?? null, null); // Nomad strips the job from allocation events (and, omitempty, leaves the key out).
      const allocation = await api.getAllocation(allocId);
      const ports = allocation?.AllocatedResources?.Shared?.Ports ?? [];
      assert.equal(ports.length, 1);
      assert.equal(ports[0]?.To, 8080);
      assert.ok((ports[0]?.Value ?? 0) > 0);
      assert.equal(allocation?.Job?.ID, '11-events');
      assert.ok(allocation?.NodeID !== undefined && (await nomadGet(fake, `/v1/node/${allocation.NodeID ?? ''}`))['Status'] === 'ready');
    } finally {
      await subscription.stop();
    }
  });

  it('executes commands with stdin, stdout, stderr and exit codes', async () => {
    const allocId = await startRunner(fake, api, '11-exec');
    let stdout = '';
    let stderr = '';
    const code = await api.exec(allocId, defaultTaskName, ['/bin/sh', '-c', 'cat; echo oops >&2; exit 3'], {
      stdin: chunks('hello ', 'world\n'),
      onStdout: (chunk) => (stdout += chunk.toString()),
      onStderr: (chunk) => (stderr += chunk.toString()),
    });
    assert.equal(code, 3);
    assert.equal(stdout, 'hello world\n');
    assert.equal(stderr, 'oops\n');

    // Exit code 0 travels as an empty result; large stdin is split into frames and arrives whole.
    let counted = '';
    const big = 'x'.repeat(200_000);
    assert.equal(await api.exec(allocId, defaultTaskName, ['wc', '-c'], { stdin: chunks(big), onStdout: (chunk) => (counted += chunk.toString()) }), 0);
    assert.equal(counted.trim(), '200000');

    // argv is passed without a shell, and the command runs in the allocation's own directory.
    let echoed = '';
    await api.exec(allocId, defaultTaskName, ['echo', '$HOME', '*'], { onStdout: (chunk) => (echoed += chunk.toString()) });
    assert.equal(echoed, '$HOME *\n');
    assert.equal(await api.exec(allocId, defaultTaskName, ['/bin/sh', '-c', 'touch here && test -f "$NOMAD_ALLOC_DIR/here"']), 0);
  });

  it('turns exec refusals into NomadExecErrors with Nomad close reasons', async () => {
    const unknown = await rejectsWith(api.exec('00000000-0000-4000-8000-000000000000', defaultTaskName, ['true']), 'NOMAD_INTERNAL_SERVER_ERROR');
    assert.ok(unknown instanceof NomadExecError && unknown.allocationUnknown, unknown.message);
    const allocId = await startRunner(fake, api, '11-refuse');
    const badTask = await rejectsWith(api.exec(allocId, 'nope', ['true']), 'NOMAD_INTERNAL_SERVER_ERROR');
    assert.ok(badTask instanceof NomadExecError && badTask.closeReason === 'unknown task name "nope"');
    await api.deregisterJob('11-refuse');
    const gone = await rejectsWith(api.exec(allocId, defaultTaskName, ['true']), 'NOMAD_INTERNAL_SERVER_ERROR');
    assert.ok(gone instanceof NomadExecError && gone.allocationUnknown);
  });

  it('reports an OOM kill as exit 137 and an OOMKilled task event', async () => {
    const allocId = await startRunner(fake, api, '11-oom');
    const running = api.exec(allocId, defaultTaskName, ['sleep', '30']);
    await sleep(50);
    fake.control.oomKill(allocId);
    assert.equal(await running, 137);
    const allocation = await api.getAllocation(allocId);
    const events = allocation?.TaskStates?.[defaultTaskName]?.Events ?? [];
    assert.ok(events.some((event) => event.Type === 'Terminated' && event.Details?.['oom_killed'] === 'true'));
    assert.equal(allocation?.TaskStates?.[defaultTaskName]?.Restarts, 1);
    // The task restarts within its policy; exec works again afterwards.
    await fake.control.waitFor(() => fake.control.allocations('11-oom')[0]?.['ClientStatus'] === 'running');
    assert.equal(await api.exec(allocId, defaultTaskName, ['true']), 0);
  });

  it('turns a Nomad 500 into NOMAD_INTERNAL_SERVER_ERROR after retrying reads, and does not retry writes', async () => {
    fake.control.injectFault({ path: '/v1/jobs', status: 500, body: 'rpc error: leader lost' });
    try {
      const before = fake.control.requests().length;
      const error = await rejectsWith(api.listJobs('x'), 'NOMAD_INTERNAL_SERVER_ERROR', 500);
      assert.match(error.message, /leader lost/);
      assert.equal(fake.control.requests().length - before, 3, 'one call plus two retries');
      const beforeWrite = fake.control.requests().length;
      await rejectsWith(api.registerJob(defaultTemplateJob()), 'NOMAD_INTERNAL_SERVER_ERROR', 500);
      assert.equal(fake.control.requests().length - beforeWrite, 1, 'writes are not retried');
    } finally {
      fake.control.clearFaults();
    }
    // A transient fault heals through the retries.
    fake.control.injectFault({ path: '/v1/jobs', status: 503, times: 2 });
    assert.deepEqual(await api.listJobs('nothing-'), []);
    fake.control.clearFaults();
  });

  it('rejects what Nomad would reject with a clear error (request validated against the spec)', async (t) => {
    if (!nomadSpecPresent) return t.skip(NOMAD_SPEC_MISSING);
    const bad = { ...defaultTemplateJob(), ID: 'template-12', Meta: { count: 3 } } as unknown as Parameters<ExecutorApi['registerJob']>[0];
    const error = await rejectsWith(api.registerJob(bad), 'NOMAD_INTERNAL_SERVER_ERROR', 400);
    assert.match(error.message, /Meta/);
    fake.control.clearFaults();
  });

  it('times out slow calls as NOMAD_UNREACHABLE', async () => {
    const slow = newApi(fake.port, { requesttimeout: 100 });
    fake.control.setLatency(400);
    try {
      await rejectsWith(slow.getJob('anything'), 'NOMAD_UNREACHABLE');
    } finally {
      fake.control.setLatency(0);
      await slow.close();
    }
  });

  it('never produced a response, event or frame that violates the Nomad spec', () => {
    // The invalid job above is the only expected violation (it is a request, caught and answered with 400).
    const unexpected = fake.control.specViolations().filter((violation) => !violation.startsWith('request '));
    assert.deepEqual(unexpected, []);
  });
});

describe('ExecutorApi when Nomad is unreachable', () => {
  it('reports NOMAD_UNREACHABLE for HTTP calls and exec', async () => {
    const api = newApi(await closedPort());
    try {
      const error = await rejectsWith(api.listJobs('template'), 'NOMAD_UNREACHABLE');
      assert.match(error.message, /ECONNREFUSED/);
      await rejectsWith(api.exec('00000000-0000-4000-8000-000000000000', defaultTaskName, ['true']), 'NOMAD_UNREACHABLE');
    } finally {
      await api.close();
    }
  });
});

describe('ExecutorApi with an ACL token', () => {
  it('sends X-Nomad-Token on every call, exec included', async () => {
    const fake = await startFakeNomad({ token: 'secret', timings: { schedulerDelayMs: 1, startDelayMs: 5 } });
    const api = newApi(fake.port, { token: 'secret' });
    const wrong = newApi(fake.port, { token: 'wrong' });
    try {
      const allocId = await startRunner(fake, api, '11-token');
      assert.equal(await api.exec(allocId, defaultTaskName, ['true']), 0);
      await rejectsWith(wrong.listJobs(''), 'NOMAD_INTERNAL_SERVER_ERROR', 403);
      // Nomad upgrades the exec WebSocket, then closes it with 1011 "Permission denied": named as such.
      const denied = await wrong.exec(allocId, defaultTaskName, ['true']).then(
        () => assert.fail('exec with a wrong token succeeded'),
        (error: unknown) => error,
      );
      assert.ok(denied instanceof NomadExecError && denied.permissionDenied && denied.closeCode === 1011, String(denied));
      assert.match(denied.message, /Permission denied.*nomad\.token.*alloc-exec.*namespace default/);
      assert.ok(fake.control.requests().every((entry) => entry.query.includes('namespace=default')));
    } finally {
      await Promise.all([api.close(), wrong.close()]);
      await fake.close();
    }
  });
});

describe('Event stream resilience', () => {
  let fake: FakeNomad;
  let api: ExecutorApi;
  before(async () => {
    fake = await startFakeNomad({ heartbeatMs: 50, eventBufferSize: 3, timings: { schedulerDelayMs: 1, startDelayMs: 5, killDelayMs: 5 } });
    api = newApi(fake.port);
  });
  after(async () => {
    await api.close();
    await fake.close();
  });

  function collect(): { batches: number[]; gaps: GapInfo[]; connects: number; subscription: ReturnType<ExecutorApi['subscribeEvents']> } {
    const state = {
      batches: [] as number[],
      gaps: [] as GapInfo[],
      connects: 0,
      subscription: undefined as unknown as ReturnType<ExecutorApi['subscribeEvents']>,
    };
    state.subscription = api.subscribeEvents({
      startIndex: fake.control.index,
      reconnectInitialDelayMs: 20,
      continuityTimeoutMs: 150,
      idleTimeoutMs: 1_000,
      onEvents: (batch) => {
        state.batches.push(batch.index);
      },
      onGap: (gap) => {
        state.gaps.push(gap);
      },
      onConnected: () => {
        state.connects += 1;
      },
    });
    return state;
  }

  it('reconnects after a dropped stream without a gap when the buffer still holds our cursor', async () => {
    const state = collect();
    try {
      await fake.control.waitFor(() => state.connects === 1);
      await api.registerJob({ ...defaultTemplateJob(), ID: 'template-21', Name: 'template-21' });
      // Let the whole lifecycle (placement, eval completion, task start) reach the client.
      await fake.control.waitFor(() => fake.control.allocations('template-21')[0]?.['ClientStatus'] === 'running');
      await fake.control.waitFor(() => state.batches.at(-1) === fake.control.events().at(-1)?.Index);
      const before = [...state.batches];
      fake.control.dropEventStreams();
      await fake.control.waitFor(() => state.connects === 2);
      await sleep(250); // past the continuity timeout
      assert.deepEqual(state.gaps, []);
      assert.deepEqual(state.batches, before, 're-delivered batches are de-duplicated');
      await api.deregisterJob('template-21');
      await fake.control.waitFor(() => state.batches.length > before.length);
      assert.deepEqual(
        [...state.batches].sort((a, b) => a - b),
        state.batches,
        'indexes strictly increase',
      );
      assert.equal(new Set(state.batches).size, state.batches.length);
    } finally {
      await state.subscription.stop();
    }
  });

  it('signals a gap when batches were lost while disconnected (buffer overrun)', async () => {
    const state = collect();
    try {
      await fake.control.waitFor(() => state.connects === 1);
      await api.registerJob({ ...defaultTemplateJob(), ID: 'template-22', Name: 'template-22' });
      await fake.control.waitFor(() => state.batches.length >= 1);
      // Keep the client out for a while and produce more batches than the buffer (3) holds.
      fake.control.injectFault({ path: '/v1/event/stream', status: 500, times: 3 });
      fake.control.dropEventStreams();
      for (const id of ['template-23', 'template-24', 'template-25']) await api.registerJob({ ...defaultTemplateJob(), ID: id, Name: id });
      await sleep(50);
      await fake.control.waitFor(() => state.gaps.length === 1, 5_000);
      assert.equal(state.gaps[0]?.reason, 'buffer-overrun');
      assert.ok((state.gaps[0]?.resumedAt ?? 0) > (state.gaps[0]?.lastIndex ?? 0));
    } finally {
      fake.control.clearFaults();
      await state.subscription.stop();
    }
  });

  it('signals a gap when Nomad lost its buffer (server restart)', async () => {
    const state = collect();
    try {
      await fake.control.waitFor(() => state.connects === 1);
      await api.registerJob({ ...defaultTemplateJob(), ID: 'template-26', Name: 'template-26' });
      await fake.control.waitFor(() => state.batches.length >= 1);
      await sleep(30);
      fake.control.dropEventStreams({ clearBuffer: true });
      await fake.control.waitFor(() => state.gaps.length === 1, 5_000);
      assert.equal(state.gaps[0]?.reason, 'buffer-lost');
    } finally {
      await state.subscription.stop();
    }
  });

  it('stops cleanly while Nomad is down', async () => {
    fake.control.injectFault({ path: '/v1/event/stream', status: 500 });
    const state = collect();
    await sleep(100);
    assert.equal(state.connects, 0);
    await state.subscription.stop();
    fake.control.clearFaults();
    assert.deepEqual(fake.control.specViolations(), []);
  });
});
