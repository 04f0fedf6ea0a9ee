import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { createServer, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { after, before, describe, it } from 'node:test';
import pino from 'pino';
import { configSchema } from '../src/config/schema.js';
import {
  allocationSchema,
  eventLineSchema,
  jobSchema,
  parseStreamEvent,
  portMappingSchema,
  type InvalidNomadEvent,
  type NomadEvent,
} from '../src/nomad/client/api-types.js';
import { InvalidEventReporter } from '../src/nomad/client/event-stream.js';
import { ExecutorApi } from '../src/nomad/client/executor-api.js';

/*
 * Nomad's JSON as Nomad documents it (test/fixtures/nomad/README.md names the sources) and as it
 * really arrives: go-codec leaves every empty field of Allocation, Port, NetworkResource and
 * AllocatedPortMapping out. The schemas must read both, and a payload they cannot read must be
 * loud (one warn line naming the field) rather than quietly mapped to `other`.
 */

type Json = Record<string, unknown>;

function fixture(name: string): Json {
  return JSON.parse(readFileSync(new URL(`./fixtures/nomad/${name}`, import.meta.url), 'utf8')) as Json;
}

function firstEvent(line: Json): NomadEvent {
  const parsed = eventLineSchema.parse(line);
  const raw = parsed.Events?.[0];
  assert.ok(raw !== undefined);
  return parseStreamEvent(raw);
}

/* The event fixture with one port mapping's Value turned into a string, as a broken encoder might. */
function malformedAllocationLine(index: number): Json {
  const line = structuredClone(fixture('event-allocation.omitempty.json'));
  const event = (line['Events'] as Json[])[0] as Json;
  const allocation = (event['Payload'] as Json)['Allocation'] as Json;
  const shared = (allocation['AllocatedResources'] as Json)['Shared'] as Json;
  ((shared['Ports'] as Json[])[0] as Json)['Value'] = '5678';
  line['Index'] = index;
  event['Index'] = index;
  return line;
}

interface LogLine {
  level: number;
  msg: string;
  field?: string;
  topic?: string;
  suppressed?: number;
}

function capturingLogger(): { logger: pino.Logger; lines: LogLine[] } {
  const lines: LogLine[] = [];
  const logger = pino({ level: 'warn' }, { write: (text: string) => void lines.push(JSON.parse(text) as LogLine) });
  return { logger, lines };
}

describe('Nomad JSON from the documented examples', () => {
  for (const variant of ['', '.omitempty']) {
    const label = variant === '' ? 'as documented' : 'with empty fields omitted';

    it(`reads the allocation (Read Allocation sample) ${label}`, () => {
      const allocation = allocationSchema.parse(fixture(`allocation-read${variant}.json`));
      assert.equal(allocation.ID, 'a8198d79-cfdb-6593-a999-1e9adabcba2e');
      assert.equal(allocation.JobID, 'example');
      assert.equal(allocation.ClientStatus, 'running');
      assert.equal(allocation.DesiredStatus, 'run');
      assert.equal(allocation.TaskStates?.['redis']?.State, 'running');
      assert.equal(allocation.TaskStates?.['redis']?.Restarts, 0);
      assert.deepEqual(
        allocation.TaskStates?.['redis']?.Events?.map((event) => event.Type),
        ['Received', 'Driver', 'Started'],
      );
      assert.equal(allocation.Job?.ID, 'example');
      assert.equal(allocation.Job?.Meta ?? null, null);
      // Omitted empty strings read as absent, never as a value the backend would act on.
      assert.equal(allocation.ClientDescription || undefined, undefined);
    });

    it(`reads the allocation with allocated ports (client-state sample) ${label}`, () => {
      const allocation = allocationSchema.parse(fixture(`allocation-client-state${variant}.json`));
      assert.equal(allocation.ClientStatus, 'pending');
      assert.equal(allocation.DesiredStatus, 'run');
      assert.equal(allocation.TaskStates ?? null, null);
      const ports = allocation.AllocatedResources?.Shared?.Ports ?? [];
      assert.equal(ports.length, 1);
      // `To` is 0 in the documented dump and absent on the wire; both read as 0.
      assert.deepEqual({ ...ports[0] }, { Label: 'http', Value: 5678, To: 0, HostIP: '192.168.1.9' });
      const network = allocation.Job?.TaskGroups?.[0]?.Networks?.[0];
      assert.equal(network?.ReservedPorts?.[0]?.Label, 'http');
      assert.equal(network?.ReservedPorts?.[0]?.To ?? 0, 0);
    });

    it(`reads the job (Read Job sample) ${label}`, () => {
      const job = jobSchema.parse(fixture(`job-read${variant}.json`));
      assert.equal(job.ID, 'example');
      assert.equal(job.Namespace, 'apps');
      assert.equal(job.Status, 'running');
      assert.deepEqual(job.Meta, { foo: 'bar', baz: 'pipe' });
      const group = job.TaskGroups?.[0];
      assert.equal(group?.Name, 'cache');
      assert.equal(group?.Count, 1);
      assert.deepEqual(group?.Meta, { foo: 'bar', baz: 'pipe' });
      assert.deepEqual(
        group?.Tasks?.map((task) => task.Name),
        ['init', 'redis'],
      );
    });

    it(`reads an Allocation event (documented envelope, client-state allocation) ${label}`, () => {
      const event = firstEvent(fixture(`event-allocation${variant}.json`));
      assert.equal(event.kind, 'allocation');
      if (event.kind !== 'allocation') return;
      assert.equal(event.Topic, 'Allocation');
      assert.equal(event.Type, 'AllocationUpdated');
      assert.equal(event.allocation.ID, '3b0ed734-f721-45d3-420a-3d96926b3f1d');
      assert.equal(event.allocation.JobID, 'docs');
      assert.equal(event.allocation.ClientStatus, 'pending');
      assert.equal(event.allocation.Job ?? null, null); // Nomad strips the job from allocation events.
      assert.equal(event.allocation.AllocatedResources?.Shared?.Ports?.[0]?.Value, 5678);
    });
  }

  it('reads port mappings and allocations that omit every empty field', () => {
    // A port without `to` on a node without an address on its host network.
    assert.deepEqual({ ...portMappingSchema.parse({ Label: '8080', Value: 31000 }) }, { Label: '8080', Value: 31000, To: 0, HostIP: '' });
    // An allocation whose statuses were left out reads as Nomad treats empty ones: not terminal, not stopped.
    const allocation = allocationSchema.parse({ ID: 'a', JobID: 'j' });
    assert.equal(allocation.ClientStatus, 'pending');
    assert.equal(allocation.DesiredStatus, 'run');
  });

  it('marks a malformed known-topic event invalid with the failing field, and leaves unknown topics alone', () => {
    const event = firstEvent(malformedAllocationLine(17));
    assert.equal(event.kind, 'invalid');
    if (event.kind !== 'invalid') return;
    assert.equal(event.field, 'Allocation.AllocatedResources.Shared.Ports.0.Value');
    assert.ok(event.payload['Allocation'] !== undefined);
    const missing = firstEvent({ Index: 3, Events: [{ Topic: 'Job', Type: 'JobRegistered', Key: 'x', Index: 3, Payload: {} }] });
    assert.equal(missing.kind, 'invalid');
    const node = firstEvent({ Index: 4, Events: [{ Topic: 'Node', Type: 'NodeRegistration', Key: 'n', Index: 4, Payload: { Node: {} } }] });
    assert.equal(node.kind, 'other');
  });
});

describe('InvalidEventReporter', () => {
  function invalid(topic: string, index: number): InvalidNomadEvent {
    return {
      Topic: topic,
      Type: 'AllocationUpdated',
      Key: 'k',
      Index: index,
      kind: 'invalid',
      payload: {},
      field: `${topic}.ClientStatus`,
      problem: 'expected string',
    };
  }

  it('logs once per topic per interval, counts every event and reports how many it suppressed', () => {
    const { logger, lines } = capturingLogger();
    let now = 0;
    const reporter = new InvalidEventReporter(logger, 60_000, () => now);
    reporter.report(invalid('Allocation', 1));
    reporter.report(invalid('Allocation', 2));
    reporter.report(invalid('Allocation', 3));
    reporter.report(invalid('Job', 4));
    assert.equal(lines.length, 2);
    assert.equal(lines[0]?.field, 'Allocation.ClientStatus');
    assert.equal(lines[0]?.suppressed, 0);
    assert.equal(lines[1]?.topic, 'Job');
    now = 60_000;
    reporter.report(invalid('Allocation', 5));
    assert.equal(lines.length, 3);
    assert.equal(lines[2]?.suppressed, 2);
    assert.equal(lines[2]?.level, 40); // warn
    assert.equal(reporter.count('Allocation'), 4);
    assert.equal(reporter.count(), 5);
  });
});

describe('A malformed Allocation event on the stream', () => {
  let server: Server;
  let port = 0;
  let lines: Json[] = [];
  const open = new Set<ServerResponse>();

  before(async () => {
    server = createServer((request, response) => {
      if (!request.url?.startsWith('/v1/event/stream')) {
        response.writeHead(404).end('not found');
        return;
      }
      open.add(response);
      response.writeHead(200, { 'content-type': 'application/json' });
      for (const line of lines) response.write(`${JSON.stringify(line)}\n`);
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    port = (server.address() as AddressInfo).port;
  });
  after(async () => {
    for (const response of open) response.end();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  });

  it('produces one warn line naming the field, is counted and still reaches the consumer, and later events are read', async () => {
    const good = fixture('event-allocation.omitempty.json');
    lines = [
      malformedAllocationLine(17),
      malformedAllocationLine(18),
      { ...good, Index: 19, Events: (good['Events'] as Json[]).map((event) => ({ ...event, Index: 19 })) },
    ];
    const { logger, lines: logs } = capturingLogger();
    const api = new ExecutorApi(configSchema.parse({ nomad: { enabled: true, port, requesttimeout: 2_000 } }).nomad, logger);
    const kinds: string[] = [];
    let resolveDone: () => void = () => undefined;
    const done = new Promise<void>((resolve) => (resolveDone = resolve));
    const subscription = api.subscribeEvents({
      startIndex: 16,
      onEvents: (batch) => {
        for (const event of batch.events) kinds.push(event.kind);
        if (batch.index === 19) resolveDone();
      },
    });
    try {
      await done;
      assert.deepEqual(kinds, ['invalid', 'invalid', 'allocation']);
      const warnings = logs.filter((line) => line.level === 40 && line.topic === 'Allocation');
      assert.equal(warnings.length, 1, JSON.stringify(logs));
      assert.equal(warnings[0]?.field, 'Allocation.AllocatedResources.Shared.Ports.0.Value');
      assert.match(warnings[0]?.msg ?? '', /Allocation\.AllocatedResources\.Shared\.Ports\.0\.Value/);
      assert.equal(subscription.invalidEvents.count('Allocation'), 2);
    } finally {
      await api.close();
    }
  });
});
