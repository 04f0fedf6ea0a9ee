import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import WebSocket from 'ws';
import { startFakeNomad, type FakeNomad } from './fake-nomad/index.js';

/*
 * The fake's scheduler against Nomad 1.10's rules: placement by datacenter, driver, constraint and
 * capacity with Nomad's AllocMetric, blocked evaluations that place once capacity appears, in-place
 * updates versus replacements (tasksUpdated), the namespace a register lands in, and the 1011 close
 * of an exec with a bad token.
 */

type Json = Record<string, unknown>;
// biome-ignore lint/suspicious/noTemplateCurlyInString: Nomad interpolates ${node.datacenter}, not JavaScript.
const datacenterTarget = '${node.datacenter}';

function job(id: string, extra: Json = {}, task: Json = {}, group: Json = {}): Json {
  return {
    ID: id,
    Type: 'batch',
    Datacenters: ['dc1'],
    TaskGroups: [
      {
        Name: 'default-group',
        Count: 1,
        ...group,
        Tasks: [{ Name: 'default-task', Driver: 'docker', Config: { image: 'img' }, Resources: { CPU: 100, MemoryMB: 100 }, ...task }],
      },
    ],
    ...extra,
  };
}

async function call(fake: FakeNomad, method: string, path: string, body?: unknown): Promise<{ status: number; json: Json; text: string }> {
  const response = await fetch(`${fake.url}${path}`, { method, ...(body === undefined ? {} : { body: JSON.stringify(body) }) });
  const text = await response.text();
  let json: Json = {};
  try {
    json = JSON.parse(text) as Json;
  } catch {
    // plain-text answer
  }
  return { status: response.status, json, text };
}

/* Registers and waits until the evaluation is done (complete, or blocked for good). */
async function register(fake: FakeNomad, body: Json, query = ''): Promise<Json> {
  const answer = await call(fake, 'PUT', `/v1/jobs${query}`, { Job: body });
  assert.equal(answer.status, 200, answer.text);
  const evalId = String(answer.json['EvalID']);
  await fake.control.waitFor(() => fake.control.evaluation(evalId)?.['Status'] === 'complete');
  return (await call(fake, 'GET', `/v1/evaluation/${evalId}`)).json;
}

const allocationsOf = (fake: FakeNomad, jobId: string): Json[] => fake.control.allocations(jobId);

describe('fake Nomad scheduler', () => {
  let fake: FakeNomad;
  before(async () => {
    fake = await startFakeNomad({ heartbeatMs: 50, timings: { schedulerDelayMs: 1, startDelayMs: 5, killDelayMs: 5, restartDelayMs: 10, pullDelayMs: 50 } });
  });
  after(async () => {
    await fake.close();
  });

  it('fails placements with Nomad AllocMetrics: datacenter, driver, constraint, capacity', async () => {
    fake.control.setNodes([
      { Name: 'small', Datacenter: 'dc1', CPU: 1000, MemoryMB: 150 },
      { Name: 'exec-only', Datacenter: 'dc1', Drivers: ['exec'] },
      { Name: 'elsewhere', Datacenter: 'dc2' },
    ]);
    const noDatacenter = await register(fake, job('p-dc', { Datacenters: ['dc9'] }));
    const noDcMetric = (noDatacenter['FailedTGAllocs'] as Record<string, Json>)['default-group'];
    assert.equal(noDcMetric?.['NodesEvaluated'], 0, JSON.stringify(noDatacenter));
    assert.deepEqual(noDcMetric?.['NodesAvailable'], {});

    const tooBig = await register(fake, job('p-mem', {}, { Resources: { CPU: 100, MemoryMB: 200 } }));
    const metric = (tooBig['FailedTGAllocs'] as Record<string, Json>)['default-group'] ?? {};
    assert.equal(metric['NodesEvaluated'], 2);
    assert.equal(metric['NodesFiltered'], 1);
    assert.deepEqual(metric['ConstraintFiltered'], { 'missing drivers': 1 });
    assert.equal(metric['NodesExhausted'], 1);
    assert.deepEqual(metric['DimensionExhausted'], { memory: 1 });
    assert.deepEqual((metric['ResourcesExhausted'] as Record<string, Json>)['default-task']?.['MemoryMB'], 200);
    assert.deepEqual(metric['NodesAvailable'], { dc1: 2 });
    assert.equal(metric['NodePool'], 'default');
    assert.equal(allocationsOf(fake, 'p-mem').length, 0, 'nothing placed');

    const constrained = await register(
      fake,
      job('p-con', { Datacenters: ['dc*'], Constraints: [{ LTarget: datacenterTarget, Operand: '=', RTarget: 'dc3' }] }),
    );
    assert.deepEqual((constrained['FailedTGAllocs'] as Record<string, Json>)['default-group']?.['ConstraintFiltered'], { [`${datacenterTarget} = dc3`]: 3 });

    const twoOfThree = await register(fake, job('p-count', {}, { Resources: { CPU: 100, MemoryMB: 60 } }, { Count: 3 }));
    assert.equal(allocationsOf(fake, 'p-count').length, 2, 'two fit on the small node');
    assert.equal((twoOfThree['FailedTGAllocs'] as Record<string, Json>)['default-group']?.['CoalescedFailures'], 0);
    assert.deepEqual(twoOfThree['QueuedAllocations'], { 'default-group': 1 });
    for (const id of ['p-dc', 'p-mem', 'p-con', 'p-count']) await call(fake, 'DELETE', `/v1/job/${id}?purge=true`);
  });

  it('a blocked evaluation places the rest once capacity appears, and a successful evaluation cancels it', async () => {
    const [node] = fake.control.setNodes([{ Name: 'tight', CPU: 1000, MemoryMB: 100 }]);
    assert.ok(node);
    const evaluation = await register(fake, job('blocked', {}, { Resources: { CPU: 100, MemoryMB: 80 } }, { Count: 2 }));
    const blockedId = String(evaluation['BlockedEval']);
    assert.notEqual(blockedId, 'undefined', JSON.stringify(evaluation));
    const blocked = fake.control.evaluation(blockedId);
    assert.equal(blocked?.['Status'], 'blocked');
    assert.equal(blocked?.['TriggeredBy'], 'queued-allocs');
    assert.equal(blocked?.['PreviousEval'], evaluation['ID']);
    await fake.control.waitFor(() => allocationsOf(fake, 'blocked').some((alloc) => alloc['ClientStatus'] === 'running'));
    assert.equal(allocationsOf(fake, 'blocked').length, 1);

    fake.control.updateNode(node.ID, { MemoryMB: 400 });
    await fake.control.waitFor(() => fake.control.evaluation(blockedId)?.['Status'] === 'complete');
    await fake.control.waitFor(() => allocationsOf(fake, 'blocked').filter((alloc) => alloc['ClientStatus'] === 'running').length === 2);

    // Blocked again, then a register that fits everything cancels the blocked evaluation.
    const again = await register(fake, job('blocked', {}, { Resources: { CPU: 100, MemoryMB: 300 } }, { Count: 2 }));
    const reblocked = String(again['BlockedEval']);
    assert.equal(fake.control.evaluation(reblocked)?.['Status'], 'blocked');
    await register(fake, job('blocked', {}, { Resources: { CPU: 100, MemoryMB: 80 } }, { Count: 2 }));
    await fake.control.waitFor(() => fake.control.evaluation(reblocked)?.['Status'] === 'canceled');
    assert.match(String(fake.control.evaluation(reblocked)?.['StatusDescription']), /successful/);
    await call(fake, 'DELETE', '/v1/job/blocked?purge=true');
    fake.control.setNodes([{}]);
  });

  it('updates in place what tasksUpdated allows, and replaces allocations otherwise', async () => {
    const config = { Name: 'config', Count: 0, Meta: { used: 'false' }, Tasks: [{ Name: 'config', Driver: 'exec', Config: { command: 'true' } }] };
    const withConfig = (meta: Json, extra: Json = {}, task: Json = {}): Json => {
      const base = job('inplace', extra, task);
      return { ...base, TaskGroups: [...(base['TaskGroups'] as Json[]), { ...config, Meta: meta }] };
    };
    await register(fake, withConfig({ used: 'false' }));
    await fake.control.waitFor(() => allocationsOf(fake, 'inplace')[0]?.['ClientStatus'] === 'running');
    const first = allocationsOf(fake, 'inplace')[0] ?? {};
    const index = fake.control.index;

    // The config group's meta is not part of default-group's combined meta: same allocation, new job version.
    await register(fake, withConfig({ used: 'true' }));
    const updated = allocationsOf(fake, 'inplace');
    assert.equal(updated.length, 1);
    assert.equal(updated[0]?.['ID'], first['ID']);
    assert.equal(updated[0]?.['JobVersion'], 1);
    assert.ok(Number(updated[0]?.['AllocModifyIndex']) > Number(first['AllocModifyIndex']));
    const planResult = fake.control
      .events()
      .filter((batch) => batch.Index > index)
      .flatMap((batch) => batch.Events)
      .find((event) => event['Topic'] === 'Allocation' && event['Type'] === 'PlanResult' && event['Key'] === first['ID']);
    const planned = (planResult?.['Payload'] as Record<string, Json> | undefined)?.['Allocation'];
    assert.equal(planned?.['JobVersion'], 1, 'a PlanResult event for the in-place update');
    const read = (await call(fake, 'GET', `/v1/allocation/${String(first['ID'])}`)).json;
    assert.equal((read['Job'] as Json)['Version'], 1, "the allocation's job is the new version");

    // Job meta is part of the combined task meta: the allocation is replaced.
    await register(fake, withConfig({ used: 'true' }, { Meta: { owner: 'x' } }));
    await fake.control.waitFor(() => allocationsOf(fake, 'inplace').some((alloc) => alloc['PreviousAllocation'] === first['ID']));
    const replaced = allocationsOf(fake, 'inplace').find((alloc) => alloc['ID'] === first['ID']);
    assert.equal(replaced?.['DesiredStatus'], 'stop');
    assert.equal(replaced?.['DesiredDescription'], 'alloc is being updated due to job update');
    await call(fake, 'DELETE', '/v1/job/inplace?purge=true');
  });

  it('registers into the namespace of the query parameter, whatever the job says', async () => {
    const answer = await call(fake, 'PUT', '/v1/jobs?namespace=ns-query', { Job: job('ns-job', { Namespace: 'ns-body' }) });
    assert.equal(answer.status, 200, answer.text);
    assert.equal((await call(fake, 'GET', '/v1/job/ns-job?namespace=ns-query')).json['Namespace'], 'ns-query');
    assert.equal((await call(fake, 'GET', '/v1/job/ns-job?namespace=ns-body')).status, 404);
    await call(fake, 'DELETE', '/v1/job/ns-job?purge=true&namespace=ns-query');
  });

  it('a slow image pull shows as a pending task with a Driver "Downloading image" event', async () => {
    fake.control.slowImagePull('slow:1');
    await register(fake, job('pulling', {}, { Config: { image: 'slow:1' } }));
    await fake.control.waitFor(() => {
      const state = (allocationsOf(fake, 'pulling')[0]?.['TaskStates'] as Record<string, Json> | null)?.['default-task'];
      return state?.['State'] === 'pending' && JSON.stringify(state['Events']).includes('Downloading image');
    });
    await fake.control.waitFor(() => allocationsOf(fake, 'pulling')[0]?.['ClientStatus'] === 'running');
    await call(fake, 'DELETE', '/v1/job/pulling?purge=true');
  });

  it('sent only spec-conforming responses and events', () => {
    assert.deepEqual(fake.control.specViolations(), []);
  });
});

describe('fake Nomad exec with a bad ACL token', () => {
  let fake: FakeNomad;
  before(async () => {
    fake = await startFakeNomad({ token: 'good', timings: { schedulerDelayMs: 1, startDelayMs: 5 } });
  });
  after(async () => {
    await fake.close();
  });

  it('upgrades the WebSocket, then closes it with 1011 "Permission denied", as a Nomad server does', async () => {
    const result = await new Promise<{ upgraded: boolean; code: number; reason: string }>((resolve) => {
      let upgraded = false;
      const socket = new WebSocket(`ws://127.0.0.1:${fake.port}/v1/client/allocation/x/exec?task=t&command=${encodeURIComponent('["true"]')}`, {
        headers: { 'X-Nomad-Token': 'bad' },
      });
      socket.on('open', () => {
        upgraded = true;
      });
      socket.on('unexpected-response', () => resolve({ upgraded: false, code: 0, reason: 'refused before the upgrade' }));
      socket.on('close', (code, reason) => resolve({ upgraded, code, reason: reason.toString() }));
    });
    assert.deepEqual(result, { upgraded: true, code: 1011, reason: 'Permission denied' });
  });
});
