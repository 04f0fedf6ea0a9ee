import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { connect } from 'node:net';
import WebSocket from 'ws';
import { NomadSpec, startFakeNomad, type FakeNomad } from './fake-nomad/index.js';
import { NOMAD_SPEC_MISSING, nomadSpecPresent } from './fake-nomad/spec.js';

/* The fake's own contract: Nomad-shaped answers, validated against the spec, and the lifecycle of section 6.3. */

const spec = new NomadSpec();

function job(id: string, extra: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    ID: id,
    Type: 'batch',
    TaskGroups: [{ Name: 'default-group', Count: 1, Tasks: [{ Name: 'default-task', Driver: 'docker', Config: { image: 'x' } }] }],
    ...extra,
  };
}

async function call(fake: FakeNomad, method: string, path: string, body?: unknown): Promise<{ status: number; json: unknown; text: string }> {
  const response = await fetch(`${fake.url}${path}`, { method, ...(body === undefined ? {} : { body: JSON.stringify(body) }) });
  const text = await response.text();
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch {
    json = undefined;
  }
  return { status: response.status, json, text };
}

describe('Nomad spec validation (overlay)', () => {
  it('accepts Nomad-style nulls and rejects wrong types, so it can fail', (t) => {
    if (!nomadSpecPresent) return t.skip(NOMAD_SPEC_MISSING);
    assert.deepEqual(spec.component('Allocation', { ID: 'a', TaskStates: null, AllocatedResources: { Shared: { Ports: null } } }), []);
    assert.notDeepEqual(spec.component('Allocation', { ID: 'a', CreateIndex: 'one' }), []);
    assert.notDeepEqual(spec.response('get', '/jobs', [{ ID: 7 }]), []);
    assert.notDeepEqual(spec.eventLine({ Index: 1, Events: [] }), []);
    assert.deepEqual(spec.eventLine({}), []);
    assert.deepEqual(spec.execServerFrame({ exited: true, result: {} }), []);
    assert.notDeepEqual(spec.execServerFrame({ stdout: { data: 'not base64!' } }), []);
    assert.notDeepEqual(spec.execClientFrame({ stdin: { data: 1 } }), []);
  });
});

describe('fake Nomad', () => {
  let fake: FakeNomad;
  before(async () => {
    fake = await startFakeNomad({ heartbeatMs: 50, timings: { schedulerDelayMs: 1, startDelayMs: 5, killDelayMs: 5, restartDelayMs: 10 } });
  });
  after(async () => {
    await fake.close();
  });

  it('answers like Nomad: text errors, 404s, 200 for deleting a missing job', async () => {
    assert.deepEqual(await call(fake, 'GET', '/v1/job/missing').then((r) => [r.status, r.text]), [404, 'job not found']);
    assert.deepEqual(await call(fake, 'GET', '/v1/allocation/missing').then((r) => [r.status, r.text]), [404, 'alloc not found']);
    assert.equal((await call(fake, 'PUT', '/v1/jobs', {})).text, 'Job must be specified');
    assert.equal((await call(fake, 'PUT', '/v1/jobs', { Job: { Type: 'batch' } })).text, "Job ID hasn't been provided");
    assert.equal((await call(fake, 'POST', '/v1/job/a', { Job: job('b') })).text, 'Job ID does not match name');
    const deleted = await call(fake, 'DELETE', '/v1/job/missing?purge=true');
    assert.equal(deleted.status, 200);
    assert.equal((deleted.json as { EvalID: string }).EvalID, '');
    assert.deepEqual((await call(fake, 'GET', '/v1/jobs?prefix=zzz')).json, []);
  });

  it('canonicalises jobs, versions only changed specs, and emits the register lifecycle', async () => {
    const first = await call(fake, 'POST', '/v1/jobs', { Job: job('life') });
    assert.equal(first.status, 200, first.text);
    await fake.control.waitFor(() => fake.control.allocations('life')[0]?.['ClientStatus'] === 'running');
    const read = (await call(fake, 'GET', '/v1/job/life')).json as Record<string, unknown>;
    assert.equal(read['Version'], 0);
    assert.equal(read['Status'], 'running');
    assert.equal(read['Priority'], 50);
    assert.equal(read['Meta'], null);
    await call(fake, 'POST', '/v1/jobs', { Job: job('life') });
    assert.equal(((await call(fake, 'GET', '/v1/job/life')).json as Record<string, unknown>)['Version'], 0, 'unchanged spec, no new version');
    await call(fake, 'POST', '/v1/jobs', { Job: job('life', { Meta: { a: 'b' } }) });
    assert.equal(((await call(fake, 'GET', '/v1/job/life')).json as Record<string, unknown>)['Version'], 1);

    const types = fake.control
      .events()
      .flatMap((batch) => batch.Events)
      .filter((event) => event['Key'] === 'life' || (event['Topic'] === 'Allocation' && JSON.stringify(event['Payload']).includes('"JobID":"life"')))
      .map((event) => `${String(event['Topic'])}/${String(event['Type'])}`);
    assert.deepEqual(types.slice(0, 4), ['Job/JobRegistered', 'Allocation/PlanResult', 'Job/PlanResult', 'Allocation/AllocationUpdated']);
  });

  it('leaves empty fields out of allocations, evaluations and port mappings, as go-codec does for omitempty structs', async () => {
    const withPorts = job('sparse', {
      TaskGroups: [
        {
          Name: 'default-group',
          Count: 1,
          Networks: [{ Mode: 'host', DynamicPorts: [{ Label: 'plain' }, { Label: 'mapped', To: 8080 }] }],
          Tasks: [{ Name: 'default-task', Driver: 'docker', Config: { image: 'x' } }],
        },
      ],
    });
    const registered = (await call(fake, 'POST', '/v1/jobs', { Job: withPorts })).json as Record<string, unknown>;
    await fake.control.waitFor(() => fake.control.allocations('sparse')[0]?.['ClientStatus'] === 'running');
    const allocId = String(fake.control.allocations('sparse')[0]?.['ID']);
    const allocation = (await call(fake, 'GET', `/v1/allocation/${allocId}`)).json as Record<string, unknown>;
    for (const empty of ['DesiredDescription', 'NextAllocation', 'PreviousAllocation', 'FollowupEvalID', 'DeploymentStatus']) {
      assert.ok(!(empty in allocation), `${empty} should be omitted`);
    }
    assert.equal(allocation['ClientDescription'], 'Tasks are running');
    const ports = ((allocation['AllocatedResources'] as Record<string, Record<string, unknown>>)['Shared']?.['Ports'] ?? []) as Record<string, unknown>[];
    const plain = ports.find((port) => port['Label'] === 'plain');
    assert.ok(plain !== undefined && !('To' in plain), JSON.stringify(ports));
    assert.equal(ports.find((port) => port['Label'] === 'mapped')?.['To'], 8080);
    const allocationEvents = fake.control
      .events()
      .flatMap((batch) => batch.Events)
      .filter((event) => event['Topic'] === 'Allocation' && event['Key'] === allocId)
      .map((event) => (event['Payload'] as Record<string, Record<string, unknown>>)['Allocation'] ?? {});
    assert.ok(allocationEvents.length > 0);
    for (const payload of allocationEvents) assert.ok(!('Job' in payload) && !('NextAllocation' in payload));
    const evaluation = (await call(fake, 'GET', `/v1/evaluation/${String(registered['EvalID'])}`)).json as Record<string, unknown>;
    assert.equal(evaluation['ID'], registered['EvalID']);
    for (const [key, value] of Object.entries(evaluation))
      assert.ok(value !== '' && value !== null && value !== 0 && value !== false, `${key} should be omitted`);
  });

  it('purges a job and its allocations without allocation events; exec then fails with Unknown allocation', async () => {
    await call(fake, 'POST', '/v1/jobs', { Job: job('purge-me') });
    await fake.control.waitFor(() => fake.control.allocations('purge-me')[0]?.['ClientStatus'] === 'running');
    const allocId = String(fake.control.allocations('purge-me')[0]?.['ID']);
    const indexBefore = fake.control.index;
    await call(fake, 'DELETE', '/v1/job/purge-me?purge=true');
    assert.equal((await call(fake, 'GET', `/v1/allocation/${allocId}`)).status, 404);
    const after = fake.control
      .events()
      .filter((batch) => batch.Index > indexBefore)
      .flatMap((batch) => batch.Events);
    assert.ok(after.some((event) => event['Topic'] === 'Job' && event['Type'] === 'JobDeregistered'));
    assert.ok(!after.some((event) => event['Topic'] === 'Allocation'));
    const close = await new Promise<[number, string]>((resolve) => {
      const socket = new WebSocket(
        `ws://127.0.0.1:${fake.port}/v1/client/allocation/${allocId}/exec?task=default-task&command=${encodeURIComponent('["true"]')}`,
      );
      socket.on('close', (code, reason) => resolve([code, reason.toString()]));
    });
    assert.deepEqual(close, [1008, `Unknown allocation "${allocId}"`]);
  });

  it('fails and loses allocations on request, linking replacements', async () => {
    await call(fake, 'POST', '/v1/jobs', { Job: job('fragile') });
    await fake.control.waitFor(() => fake.control.allocations('fragile')[0]?.['ClientStatus'] === 'running');
    const first = String(fake.control.allocations('fragile')[0]?.['ID']);
    fake.control.loseAllocation(first);
    await fake.control.waitFor(() =>
      fake.control.allocations('fragile').some((alloc) => alloc['PreviousAllocation'] === first && alloc['ClientStatus'] === 'running'),
    );
    const lost = fake.control.allocations('fragile').find((alloc) => alloc['ID'] === first);
    assert.equal(lost?.['ClientStatus'], 'lost');
    assert.notEqual(lost?.['NextAllocation'], '');
    const second = String(lost?.['NextAllocation']);
    fake.control.failAllocation(second);
    await fake.control.waitFor(() => fake.control.allocations('fragile').find((alloc) => alloc['ID'] === second)?.['ClientStatus'] === 'failed');
    await fake.control.waitFor(
      () => (fake.control.events().at(-1)?.Events[0]?.['Payload'] as Record<string, Record<string, unknown>> | undefined)?.['Job']?.['Status'] === 'dead',
    );
  });

  it('fails allocation starts for chosen jobs', async () => {
    fake.control.failAllocationStart('broken-');
    await call(fake, 'POST', '/v1/jobs', { Job: job('broken-1') });
    await fake.control.waitFor(() => fake.control.allocations('broken-1')[0]?.['ClientStatus'] === 'failed');
  });

  it('serves the event stream as NDJSON with heartbeats and Nomad resume semantics', async () => {
    const controller = new AbortController();
    const response = await fetch(`${fake.url}/v1/event/stream?index=${fake.control.index}&topic=Job:*`, { signal: controller.signal });
    assert.equal(response.headers.get('content-type'), 'application/json');
    const reader = response.body?.getReader();
    assert.ok(reader !== undefined);
    let text = '';
    const deadline = Date.now() + 2_000;
    while ((text.match(/\n/g) ?? []).length < 3 && Date.now() < deadline) {
      const { value } = await reader.read();
      text += new TextDecoder().decode(value);
    }
    controller.abort();
    const lines = text.split('\n').filter((line) => line !== '');
    assert.equal(lines[0], '{}');
    // index = newest → the newest retained batch is re-sent (nomad#11296), then heartbeats follow.
    assert.ok(lines.some((line) => line === '{}'));
    for (const line of lines) assert.deepEqual(spec.eventLine(JSON.parse(line)), []);
  });

  it('logs requests and exposes a control API over HTTP', async () => {
    const from = Date.now();
    await call(fake, 'GET', '/v1/jobs');
    assert.ok(fake.control.requestsBetween(from).some((entry) => entry.path === '/v1/jobs' && entry.method === 'GET'));
    assert.equal((await call(fake, 'PUT', '/__control/latency', { ms: 0 })).status, 200);
    assert.equal((await call(fake, 'POST', '/__control/faults', { path: '^/v1/status', status: 500, times: 1 })).status, 200);
    assert.equal((await call(fake, 'GET', '/v1/status/leader')).status, 500);
    assert.equal((await call(fake, 'GET', '/v1/status/leader')).status, 200);
    assert.ok(Array.isArray((await call(fake, 'GET', '/__control/requests')).json));
  });

  it('refuses connections past the per-client limit with Nomad’s raw 429, before reading a request', async () => {
    assert.equal((await call(fake, 'PUT', '/__control/connection-limit', { limit: 1 })).status, 200);
    const held = connect(fake.port);
    await new Promise<void>((resolve) => held.once('connect', () => resolve()));
    try {
      await fake.control.waitFor(() => fake.control.connections().peak >= 1);
      const refused = connect(fake.port);
      const answer = await new Promise<string>((resolve) => {
        let text = '';
        refused.on('data', (chunk: Buffer) => (text += chunk.toString('utf8')));
        refused.on('close', () => resolve(text));
      });
      assert.match(answer, /^HTTP\/1\.1 429 Too Many Requests\r\n/);
      assert.match(answer, /Connection: close\r\n\r\nYour IP is issuing too many concurrent connections, please rate limit your calls\n$/);
      assert.ok(fake.control.connections().rejected >= 1);
    } finally {
      held.destroy();
      fake.control.setConnectionLimit(100);
    }
    assert.equal((await call(fake, 'POST', '/__control/exec-faults', { kind: 'nonsense' })).status, 400);
    assert.equal((await call(fake, 'POST', '/__control/exec-faults', { kind: 'missing-exited', match: 'never-matches', times: 1 })).status, 200);
    assert.equal((await call(fake, 'DELETE', '/__control/exec-faults')).status, 200);
  });

  it('sent only spec-conforming responses and events', () => {
    assert.deepEqual(fake.control.specViolations(), []);
  });
});
