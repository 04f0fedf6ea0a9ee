import { mkdtempSync, rmSync } from 'node:fs';
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import type { Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { WebSocketServer } from 'ws';
import { Cluster, HttpError, type EventBatch, type Timings } from './cluster.js';
import { type ExecFault, handleExec, oomKillExecs, runningExecCommands } from './exec.js';
import { isObject, omitEmpty, type JsonObject } from './model.js';
import type { FakeNode, NodeSpec } from './placement.js';
import { NomadSpec, type SpecMethod } from './spec.js';

export interface FakeNomadOptions {
  readonly timings?: Partial<Timings>;
  /* Interval of `{}` event-stream heartbeats (Nomad: 30 s). */
  readonly heartbeatMs?: number;
  /* Batches kept for resuming subscribers (Nomad's event_buffer_size, default 100). */
  readonly eventBufferSize?: number;
  /* When set, every Nomad call must carry it as X-Nomad-Token (or Bearer), else 403. */
  readonly token?: string;
  /* Validate responses, events and exec frames against the spec + overlay; reject invalid request bodies with 400 (default true). */
  readonly validate?: boolean;
  /*
   * Keep every request and event batch for control.requests()/events() (default true). Off, the fake
   * stays cheap at scale (10,000 runner jobs, event storms), where that history would grow without end.
   */
  readonly history?: boolean;
  readonly port?: number;
  /* Nomad's http_max_conns_per_client (default 100; 0: no limit). */
  readonly maxConnsPerClient?: number;
}

export interface RequestLogEntry {
  readonly method: string;
  readonly path: string;
  readonly query: string;
  /* Date.now() when the request arrived. */
  readonly time: number;
  readonly kind: 'http' | 'exec' | 'event-stream';
}

export interface HttpFault {
  readonly method?: string;
  /* Matches the path (e.g. `/v1/jobs`); a string is a prefix. */
  readonly path?: string | RegExp;
  /* Answer with this status and body instead of handling the request. */
  readonly status?: number;
  readonly body?: string;
  /* Extra delay before handling (or answering with `status`). */
  readonly delayMs?: number;
  /* How many matching requests it applies to; unlimited when absent. */
  readonly times?: number;
}

export interface FakeNomadControl {
  requests(): readonly RequestLogEntry[];
  /* Requests that arrived in [from, to] (Date.now() values), e.g. to assert that a code path made no Nomad call. */
  requestsBetween(from: number, to?: number): readonly RequestLogEntry[];
  clearRequests(): void;
  setLatency(ms: number): void;
  injectFault(fault: HttpFault): void;
  clearFaults(): void;
  /* Cuts every event stream mid-flight, like a Nomad server restart; optionally forgets the buffered batches too. */
  dropEventStreams(options?: { clearBuffer?: boolean }): void;
  setEventBufferSize(size: number): void;
  /* The allocation fails (task dead); with reschedule a replacement with PreviousAllocation is placed. */
  failAllocation(allocId: string, options?: { reschedule?: boolean }): void;
  /* The allocation's node is lost; by default a replacement is placed. */
  loseAllocation(allocId: string, options?: { reschedule?: boolean }): void;
  /* OOM kill: running execs exit 137, the task restarts with an OOM-killed Terminated event. */
  oomKill(allocId: string): void;
  crashTask(allocId: string, exitCode: number): void;
  /* Allocations of jobs whose ID starts with the prefix fail to start (image pull error). */
  failAllocationStart(jobIdPrefix: string): void;
  /* Exec failures of real Nomad for the execs whose argv (joined with spaces) matches; see ExecFault. */
  injectExecFault(fault: ExecFault): void;
  clearExecFaults(): void;
  /* OOM in an exec: only the matching exec'd processes die (137); no task event, no restart. */
  oomKillExec(allocId: string, match?: RegExp): number;
  /* argv of the allocation's execs that run or wait for a delayed start. */
  runningExecs(allocId: string): string[][];
  /* Nomad's http_max_conns_per_client: connections past it get Nomad's raw 429 and are closed. */
  setConnectionLimit(limit: number): void;
  /* The next `count` new connections get the 429 whatever the limit (a client near its limit). */
  rejectNextConnections(count: number): void;
  /* Per client address: the most concurrent connections seen, and how many got a 429. */
  connections(): { peak: number; rejected: number };
  resetConnectionStats(): void;
  /* Re-publishes running allocations unchanged, perSecond of them each second, for `seconds` (load tests). */
  eventStorm(perSecond: number, seconds: number): void;
  /* Allocation events the storms published so far. */
  stormEvents(): number;
  specViolations(): readonly string[];
  /* Every batch emitted since start (the ring buffer only keeps the newest ones). */
  events(): readonly EventBatch[];
  allocations(jobId?: string): JsonObject[];
  jobIds(): string[];
  readonly index: number;
  waitFor(predicate: () => boolean, timeoutMs?: number): Promise<void>;
  /* Allocations of jobs whose ID starts with the prefix stay pending without any event (a hung client). */
  stallAllocationStart(jobIdPrefix: string): void;
  /* Pulling the image takes timings.pullDelayMs on every node that has not pulled it yet ("Downloading image"). */
  slowImagePull(image: string): void;
  /* Replaces the cluster's nodes (default: one huge node in dc1 with the docker, exec and raw_exec drivers). */
  setNodes(nodes: readonly NodeSpec[]): FakeNode[];
  /* Changes one node; blocked evaluations are retried, as when Nomad sees new capacity. */
  updateNode(nodeId: string, change: NodeSpec): FakeNode;
  nodes(): FakeNode[];
  evaluation(evalId: string): JsonObject | undefined;
  /* The token may do everything but exec (a policy without alloc-exec): execs close with 1011 "Permission denied". */
  denyExec(denied: boolean): void;
}

export interface FakeNomad {
  readonly url: string;
  readonly address: string;
  readonly port: number;
  readonly control: FakeNomadControl;
  close(): Promise<void>;
}

interface Subscriber {
  response: ServerResponse;
  topics: Map<string, Set<string>>;
  namespace: string;
  heartbeat: NodeJS.Timeout;
}

let sharedSpec: NomadSpec | undefined;

export async function startFakeNomad(options: FakeNomadOptions = {}): Promise<FakeNomad> {
  const validate = options.validate ?? true;
  const spec = validate ? (sharedSpec ??= new NomadSpec()) : undefined;
  const violations: string[] = [];
  const requestLog: RequestLogEntry[] = [];
  const allEvents: EventBatch[] = [];
  const faults: Array<HttpFault & { remaining: number }> = [];
  const execFaults: Array<ExecFault & { remaining: number }> = [];
  let connectionLimit = options.maxConnsPerClient ?? 100;
  const openConnections = new Map<string, number>();
  const connectionStats = { peak: 0, rejected: 0 };
  let forcedRejections = 0;
  /* Connections answered with the 429: whatever request they still carry is never handled. */
  const rejectedSockets = new WeakSet<Socket>();
  const subscribers = new Set<Subscriber>();
  const sockets = new Set<Socket>();
  const storms = new Set<NodeJS.Timeout>();
  let stormEvents = 0;
  let latencyMs = 0;
  let execDenied = false;
  let address = '127.0.0.1:0';

  const tempRoot = mkdtempSync(join(tmpdir(), 'fake-nomad-'));
  const cluster = new Cluster(
    { schedulerDelayMs: 5, startDelayMs: 20, killDelayMs: 50, restartDelayMs: 50, pullDelayMs: 1_000, ...options.timings },
    options.eventBufferSize ?? 100,
    tempRoot,
    () => address,
  );
  const history = options.history ?? true;
  cluster.onEmit = (batch) => {
    if (history) allEvents.push(batch);
    if (spec !== undefined) violations.push(...spec.eventLine(batch));
  };
  const wss = new WebSocketServer({ noServer: true, perMessageDeflate: false });

  const authorized = (request: IncomingMessage): boolean => {
    if (options.token === undefined) return true;
    const bearer = request.headers.authorization?.replace(/^Bearer\s+/i, '');
    return request.headers['x-nomad-token'] === options.token || bearer === options.token;
  };

  const takeExecFault = (command: readonly string[]): ExecFault | undefined => {
    const fault = execFaults.find((candidate) => candidate.remaining > 0 && (candidate.match?.test(command.join(' ')) ?? true));
    if (fault !== undefined) fault.remaining -= 1;
    return fault;
  };

  /* Latency and injected faults; returns a fault answer to send instead of handling, if any. */
  const applyFaults = async (method: string, path: string): Promise<{ status: number; body: string } | undefined> => {
    if (latencyMs > 0) await sleep(latencyMs);
    for (const fault of faults) {
      if (fault.remaining <= 0) continue;
      if (fault.method !== undefined && fault.method.toUpperCase() !== method) continue;
      if (fault.path !== undefined && !(typeof fault.path === 'string' ? path.startsWith(fault.path) : fault.path.test(path))) continue;
      fault.remaining -= 1;
      if (fault.delayMs !== undefined) await sleep(fault.delayMs);
      if (fault.status !== undefined) return { status: fault.status, body: fault.body ?? 'injected fault' };
    }
    return undefined;
  };

  const sendJson = (response: ServerResponse, body: unknown, specRoute?: [SpecMethod, string]): void => {
    if (spec !== undefined && specRoute !== undefined) violations.push(...spec.response(specRoute[0], specRoute[1], body));
    response.writeHead(200, {
      'content-type': 'application/json',
      'x-nomad-index': String(cluster.index),
      'x-nomad-knownleader': 'true',
      'x-nomad-lastcontact': '0',
    });
    response.end(JSON.stringify(body));
  };
  const sendText = (response: ServerResponse, status: number, text: string): void => {
    response.writeHead(status, { 'content-type': 'text/plain; charset=utf-8' });
    response.end(text);
  };

  const readBody = async (request: IncomingMessage): Promise<unknown> => {
    const chunks: Buffer[] = [];
    for await (const chunk of request) chunks.push(Buffer.isBuffer(chunk) ? chunk : Buffer.from(String(chunk)));
    const text = Buffer.concat(chunks).toString('utf8');
    if (text.trim() === '') return undefined;
    try {
      return JSON.parse(text) as unknown;
    } catch {
      throw new HttpError(400, 'Request body is not valid JSON');
    }
  };

  const register = async (request: IncomingMessage, response: ServerResponse, namespace: string | undefined, pathJobId?: string): Promise<void> => {
    const body = await readBody(request);
    if (spec !== undefined) {
      const errors = spec.request('post', pathJobId === undefined ? '/jobs' : '/job/{jobName}', body);
      violations.push(...errors.map((error) => `request ${error}`));
      if (errors.length > 0) throw new HttpError(400, `request does not match the Nomad spec: ${errors.join('; ')}`);
    }
    if (pathJobId !== undefined && isObject(body) && isObject(body['Job']) && body['Job']['ID'] !== pathJobId) {
      throw new HttpError(400, 'Job ID does not match name');
    }
    sendJson(response, cluster.register(body, namespace), ['post', pathJobId === undefined ? '/jobs' : '/job/{jobName}']);
  };

  const subscribe = (request: IncomingMessage, response: ServerResponse, query: URLSearchParams): void => {
    const topics = new Map<string, Set<string>>();
    for (const value of query.getAll('topic')) {
      const [topic = '', key = '*'] = value.split(':');
      if (topic === '') throw new HttpError(400, `Invalid topic query: ${value}`);
      const keys = topics.get(topic) ?? new Set<string>();
      keys.add(key);
      topics.set(topic, keys);
    }
    if (topics.size === 0) topics.set('*', new Set(['*']));
    const indexText = query.get('index') ?? '0';
    const requested = Number(indexText);
    if (!Number.isInteger(requested) || requested < 0) throw new HttpError(400, 'Unable to parse index');
    const namespace = query.get('namespace') ?? 'default';
    response.writeHead(200, { 'content-type': 'application/json', 'cache-control': 'no-cache' });
    response.write('{}\n');
    const subscriber: Subscriber = {
      response,
      topics,
      namespace,
      heartbeat: setInterval(() => response.write('{}\n'), options.heartbeatMs ?? 30_000),
    };
    const write = (batch: EventBatch): void => {
      const events = batch.Events.filter((event) => matches(subscriber, event));
      if (events.length > 0) response.write(`${JSON.stringify({ Index: batch.Index, Events: events })}\n`);
    };
    // Resume rules of Nomad's ring buffer: from the first batch >= index, else the oldest (a gap), and the newest if index is beyond it.
    const buffer = cluster.buffer;
    let backlog: EventBatch[] = buffer;
    if (requested > 0) {
      const start = buffer.findIndex((batch) => batch.Index >= requested);
      backlog = start >= 0 ? buffer.slice(start) : buffer.slice(-1);
    }
    for (const batch of backlog) write(batch);
    const listener = (batch: EventBatch): void => write(batch);
    cluster.listeners.add(listener);
    subscribers.add(subscriber);
    const cleanup = (): void => {
      clearInterval(subscriber.heartbeat);
      cluster.listeners.delete(listener);
      subscribers.delete(subscriber);
    };
    response.on('close', cleanup);
    request.on('close', cleanup);
  };

  const handleNomad = async (request: IncomingMessage, response: ServerResponse, url: URL): Promise<void> => {
    const method = request.method ?? 'GET';
    const path = url.pathname;
    const query = url.searchParams;
    const namespace = query.get('namespace') ?? undefined;
    const ns = namespace ?? 'default';
    let match: RegExpExecArray | null;

    if (path === '/v1/jobs') {
      if (method === 'GET') return sendJson(response, cluster.jobStubs(ns, query.get('prefix') ?? '', query.get('meta') === 'true'), ['get', '/jobs']);
      if (method === 'PUT' || method === 'POST') return register(request, response, namespace);
    } else if ((match = /^\/v1\/job\/([^/]+)$/.exec(path)) !== null) {
      const id = decodeURIComponent(match[1] ?? '');
      if (method === 'GET') {
        const job = cluster.job(id, ns);
        return job === undefined ? sendText(response, 404, 'job not found') : sendJson(response, job, ['get', '/job/{jobName}']);
      }
      if (method === 'DELETE') return sendJson(response, cluster.deregister(id, ns, query.get('purge') === 'true'), ['delete', '/job/{jobName}']);
      if (method === 'POST' || method === 'PUT') return register(request, response, namespace, id);
    } else if ((match = /^\/v1\/job\/([^/]+)\/allocations$/.exec(path)) !== null && method === 'GET') {
      const id = decodeURIComponent(match[1] ?? '');
      // `all` only matters for older incarnations of a job ID, which purging leaves none of here.
      const stubs = cluster.jobAllocs(id, ns).map((record) => cluster.allocStub(record, query.get('resources') === 'true'));
      return sendJson(response, stubs, ['get', '/job/{jobName}/allocations']);
    } else if (path === '/v1/allocations' && method === 'GET') {
      const stubs = [...cluster.allocs.values()]
        .filter((record) => ns === '*' || record.namespace === ns)
        .filter((record) => String(record.alloc['ID']).startsWith(query.get('prefix') ?? ''))
        .map((record) => cluster.allocStub(record, query.get('resources') === 'true'));
      return sendJson(response, stubs, ['get', '/allocations']);
    } else if ((match = /^\/v1\/allocation\/([^/]+)$/.exec(path)) !== null && method === 'GET') {
      const record = cluster.allocs.get(decodeURIComponent(match[1] ?? ''));
      return record === undefined || (namespace !== undefined && record.namespace !== namespace)
        ? sendText(response, 404, 'alloc not found')
        : sendJson(response, cluster.fullAlloc(record), ['get', '/allocation/{allocID}']);
    } else if ((match = /^\/v1\/evaluation\/([^/]+)$/.exec(path)) !== null && method === 'GET') {
      const evaluation = cluster.evals.get(decodeURIComponent(match[1] ?? ''));
      // structs.Evaluation is omitempty: empty fields (BlockedEval, StatusDescription, ...) are absent.
      return evaluation === undefined ? sendText(response, 404, 'eval not found') : sendJson(response, omitEmpty(evaluation), ['get', '/evaluation/{evalID}']);
    } else if ((match = /^\/v1\/node\/([^/]+)$/.exec(path)) !== null && method === 'GET') {
      const node = cluster.node(decodeURIComponent(match[1] ?? ''));
      return node !== undefined ? sendJson(response, node, ['get', '/node/{nodeId}']) : sendText(response, 404, 'node not found');
    } else if (path === '/v1/event/stream' && method === 'GET') {
      return subscribe(request, response, query);
    } else if (path === '/v1/agent/health' && method === 'GET') {
      return sendJson(response, { client: { ok: true, message: 'ok' }, server: { ok: true, message: 'ok' } });
    } else if (path === '/v1/status/leader' && method === 'GET') {
      return sendJson(response, '127.0.0.1:4647', ['get', '/status/leader']);
    } else {
      return sendText(response, 404, '404 page not found');
    }
    sendText(response, 405, 'Invalid method');
  };

  const control: FakeNomadControl = {
    requests: () => [...requestLog],
    requestsBetween: (from, to = Number.POSITIVE_INFINITY) => requestLog.filter((entry) => entry.time >= from && entry.time <= to),
    clearRequests: () => {
      requestLog.length = 0;
    },
    setLatency: (ms) => {
      latencyMs = ms;
    },
    injectFault: (fault) => {
      faults.push({ ...fault, remaining: fault.times ?? Number.POSITIVE_INFINITY });
    },
    clearFaults: () => {
      faults.length = 0;
    },
    dropEventStreams: (dropOptions = {}) => {
      for (const subscriber of [...subscribers]) subscriber.response.socket?.destroy();
      if (dropOptions.clearBuffer === true) cluster.buffer = [];
    },
    setEventBufferSize: (size) => {
      cluster.eventBufferSize = size;
      while (cluster.buffer.length > size) cluster.buffer.shift();
    },
    failAllocation: (allocId, failOptions = {}) => cluster.failAllocation(allocId, failOptions.reschedule ?? false),
    loseAllocation: (allocId, loseOptions = {}) => cluster.loseAllocation(allocId, loseOptions.reschedule ?? true),
    oomKill: (allocId) => cluster.crashTask(allocId, { oom: true }),
    crashTask: (allocId, exitCode) => cluster.crashTask(allocId, { oom: false, exitCode }),
    failAllocationStart: (prefix) => {
      cluster.failStartPrefixes.add(prefix);
    },
    injectExecFault: (fault) => {
      execFaults.push({ ...fault, remaining: fault.times ?? Number.POSITIVE_INFINITY });
    },
    clearExecFaults: () => {
      execFaults.length = 0;
    },
    oomKillExec: (allocId, match) => {
      const record = cluster.allocs.get(allocId);
      if (record === undefined) throw new HttpError(404, `unknown allocation ${allocId}`);
      return oomKillExecs(record, match);
    },
    runningExecs: (allocId) => {
      const record = cluster.allocs.get(allocId);
      return record === undefined ? [] : runningExecCommands(record);
    },
    setConnectionLimit: (limit) => {
      connectionLimit = limit;
    },
    rejectNextConnections: (count) => {
      forcedRejections = count;
    },
    connections: () => ({ ...connectionStats }),
    resetConnectionStats: () => {
      connectionStats.peak = Math.max(0, ...openConnections.values());
      connectionStats.rejected = 0;
    },
    eventStorm: (perSecond, seconds) => {
      // Ticks of 10 ms, each catching up with the rate (timers drift under load): small steady batches.
      const started = Date.now();
      let sent = 0;
      const timer = setInterval(() => {
        const elapsed = Math.min(Date.now() - started, seconds * 1000);
        const due = Math.floor((elapsed / 1000) * perSecond) - sent;
        if (due > 0) {
          const published = cluster.republishRunning(due);
          sent += due;
          stormEvents += published;
        }
        if (elapsed >= seconds * 1000) {
          clearInterval(timer);
          storms.delete(timer);
        }
      }, 10);
      storms.add(timer);
    },
    stormEvents: () => stormEvents,
    specViolations: () => [...violations],
    events: () => [...allEvents],
    allocations: (jobId) =>
      [...cluster.allocs.values()].filter((record) => jobId === undefined || record.jobId === jobId).map((record) => structuredClone(record.alloc)),
    jobIds: () => [...cluster.jobs.values()].map((record) => record.id).sort(),
    get index() {
      return cluster.index;
    },
    waitFor: async (predicate, timeoutMs = 5_000) => {
      const deadline = Date.now() + timeoutMs;
      while (!predicate()) {
        if (Date.now() > deadline) throw new Error('fake nomad: condition not reached in time');
        await sleep(5);
      }
    },
    stallAllocationStart: (prefix) => {
      cluster.stallStartPrefixes.add(prefix);
    },
    slowImagePull: (image) => {
      cluster.slowImages.add(image);
    },
    setNodes: (nodes) => cluster.setNodes(nodes),
    updateNode: (nodeId, change) => cluster.updateNode(nodeId, change),
    nodes: () => [...cluster.nodes.values()],
    evaluation: (evalId) => {
      const evaluation = cluster.evals.get(evalId);
      return evaluation === undefined ? undefined : structuredClone(evaluation);
    },
    denyExec: (denied) => {
      execDenied = denied;
    },
  };

  const handleControl = async (request: IncomingMessage, response: ServerResponse, url: URL): Promise<void> => {
    const method = request.method ?? 'GET';
    const path = url.pathname.slice('/__control'.length);
    const body = method === 'GET' ? undefined : await readBody(request);
    const field = (name: string): unknown => (isObject(body) ? body[name] : undefined);
    const done = (): void => sendJson(response, { ok: true });
    let match: RegExpExecArray | null;
    if (path === '/requests' && method === 'GET') return sendJson(response, control.requests());
    if (path === '/requests' && method === 'DELETE') return (control.clearRequests(), done());
    if (path === '/latency' && method === 'PUT') return (control.setLatency(Number(field('ms') ?? 0)), done());
    if (path === '/faults' && method === 'POST') {
      const pathField = field('path');
      control.injectFault({
        ...(typeof field('method') === 'string' ? { method: String(field('method')) } : {}),
        ...(typeof pathField === 'string' ? { path: new RegExp(pathField) } : {}),
        ...(typeof field('status') === 'number' ? { status: Number(field('status')) } : {}),
        ...(typeof field('body') === 'string' ? { body: String(field('body')) } : {}),
        ...(typeof field('delayMs') === 'number' ? { delayMs: Number(field('delayMs')) } : {}),
        ...(typeof field('times') === 'number' ? { times: Number(field('times')) } : {}),
      });
      return done();
    }
    if (path === '/faults' && method === 'DELETE') return (control.clearFaults(), done());
    if (path === '/exec-faults' && method === 'POST') {
      const kind = field('kind');
      if (kind !== 'missing-exited' && kind !== 'close-1000' && kind !== 'truncate-tail' && kind !== 'delay-start')
        throw new HttpError(400, 'unknown exec fault kind');
      control.injectExecFault({
        kind,
        ...(typeof field('match') === 'string' ? { match: new RegExp(String(field('match'))) } : {}),
        ...(typeof field('afterMs') === 'number' ? { afterMs: Number(field('afterMs')) } : {}),
        ...(typeof field('bytes') === 'number' ? { bytes: Number(field('bytes')) } : {}),
        ...(typeof field('times') === 'number' ? { times: Number(field('times')) } : {}),
      });
      return done();
    }
    if (path === '/exec-faults' && method === 'DELETE') return (control.clearExecFaults(), done());
    if (path === '/connection-limit' && method === 'PUT') return (control.setConnectionLimit(Number(field('limit') ?? 100)), done());
    if (path === '/connections' && method === 'GET') return sendJson(response, control.connections());
    if (path === '/connections/reject' && method === 'POST') return (control.rejectNextConnections(Number(field('count') ?? 1)), done());
    if ((match = /^\/allocations\/([^/]+)\/oom-exec$/.exec(path)) !== null && method === 'POST') {
      const pattern = field('match');
      return sendJson(response, { killed: control.oomKillExec(match[1] ?? '', typeof pattern === 'string' ? new RegExp(pattern) : undefined) });
    }
    if (path === '/event-stream/drop' && method === 'POST') return (control.dropEventStreams({ clearBuffer: field('clearBuffer') === true }), done());
    if ((match = /^\/allocations\/([^/]+)\/(fail|lose|oom|crash)$/.exec(path)) !== null && method === 'POST') {
      const allocId = match[1] ?? '';
      if (match[2] === 'fail') control.failAllocation(allocId, { reschedule: field('reschedule') === true });
      if (match[2] === 'lose') control.loseAllocation(allocId, { reschedule: field('reschedule') !== false });
      if (match[2] === 'oom') control.oomKill(allocId);
      if (match[2] === 'crash') control.crashTask(allocId, Number(field('exitCode') ?? 1));
      return done();
    }
    if (path === '/nodes' && method === 'GET') return sendJson(response, control.nodes());
    if (path === '/nodes' && method === 'PUT') return sendJson(response, control.setNodes(Array.isArray(body) ? (body as NodeSpec[]) : []));
    if ((match = /^\/nodes\/([^/]+)$/.exec(path)) !== null && method === 'PATCH')
      return sendJson(response, control.updateNode(decodeURIComponent(match[1] ?? ''), isObject(body) ? (body as NodeSpec) : {}));
    if (path === '/images/slow' && method === 'POST') return (control.slowImagePull(String(field('image') ?? '')), done());
    if (path === '/event-storm' && method === 'POST') {
      control.eventStorm(Number(field('perSecond') ?? 1000), Number(field('seconds') ?? 1));
      return done();
    }
    if (path === '/event-storm' && method === 'GET') return sendJson(response, { events: control.stormEvents() });
    if (path === '/violations' && method === 'GET') return sendJson(response, control.specViolations());
    if (path === '/snapshot' && method === 'GET')
      return sendJson(response, { index: cluster.index, jobs: control.jobIds(), allocations: control.allocations() });
    sendText(response, 404, 'unknown control endpoint');
  };

  const server = createServer((request, response) => {
    if (rejectedSockets.has(request.socket)) return;
    const url = new URL(request.url ?? '/', 'http://fake-nomad');
    const handle = async (): Promise<void> => {
      if (url.pathname.startsWith('/__control/')) return handleControl(request, response, url);
      const method = request.method ?? 'GET';
      if (history)
        requestLog.push({
          method,
          path: url.pathname,
          query: url.search,
          time: Date.now(),
          kind: url.pathname === '/v1/event/stream' ? 'event-stream' : 'http',
        });
      const fault = await applyFaults(method, url.pathname);
      if (fault !== undefined) return sendText(response, fault.status, fault.body);
      if (!authorized(request)) return sendText(response, 403, 'ACL token not found');
      return handleNomad(request, response, url);
    };
    handle().catch((error: unknown) => {
      if (response.headersSent) {
        response.destroy();
        return;
      }
      if (error instanceof HttpError) sendText(response, error.status, error.message);
      else sendText(response, 500, error instanceof Error ? error.message : String(error));
    });
  });
  server.on('connection', (socket: Socket) => {
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
    // Nomad's connlimit: counted per client IP when the connection is accepted, before any request
    // is read; past the limit the raw 429 is written and the connection closed (command/agent/http.go).
    const client = socket.remoteAddress ?? '';
    const open = (openConnections.get(client) ?? 0) + 1;
    if ((connectionLimit > 0 && open > connectionLimit) || forcedRejections > 0) {
      forcedRejections = Math.max(0, forcedRejections - 1);
      connectionStats.rejected += 1;
      rejectedSockets.add(socket);
      const message = 'Your IP is issuing too many concurrent connections, please rate limit your calls\n';
      socket.end(`HTTP/1.1 429 Too Many Requests\r\nContent-Type: text/plain\r\nContent-Length: ${message.length}\r\nConnection: close\r\n\r\n${message}`);
      return;
    }
    openConnections.set(client, open);
    connectionStats.peak = Math.max(connectionStats.peak, open);
    socket.on('close', () => openConnections.set(client, (openConnections.get(client) ?? 1) - 1));
  });

  server.on('upgrade', (request: IncomingMessage, socket: Socket, head: Buffer) => {
    if (rejectedSockets.has(socket)) return;
    const url = new URL(request.url ?? '/', 'http://fake-nomad');
    const match = /^\/v1\/client\/allocation\/([^/]+)\/exec$/.exec(url.pathname);
    requestLog.push({ method: 'GET', path: url.pathname, query: url.search, time: Date.now(), kind: 'exec' });
    const refuse = (status: number, text: string): void => {
      socket.end(
        `HTTP/1.1 ${status} ${status === 403 ? 'Forbidden' : status === 404 ? 'Not Found' : 'Error'}\r\ncontent-type: text/plain\r\ncontent-length: ${Buffer.byteLength(text)}\r\nconnection: close\r\n\r\n${text}`,
      );
    };
    void (async () => {
      const fault = await applyFaults('GET', url.pathname);
      if (fault !== undefined) return refuse(fault.status, fault.body);
      if (match === null) return refuse(404, '404 page not found');
      let command: unknown;
      try {
        command = JSON.parse(url.searchParams.get('command') ?? '[]');
      } catch {
        // Nomad 1.10 parses the query before upgrading and answers malformed commands with a 500.
        return refuse(500, 'failed to parse command field');
      }
      if (!Array.isArray(command) || !command.every((part): part is string => typeof part === 'string')) {
        return refuse(500, 'failed to parse command field');
      }
      const tty = url.searchParams.get('tty');
      if (tty !== null && tty !== 'true' && tty !== 'false') return refuse(500, 'tty value is not a boolean');
      wss.handleUpgrade(request, socket, head, (ws) => {
        // Nomad checks the token in the streaming RPC, after the upgrade: a server closes the socket
        // with 1011 and "Permission denied" (nomad/client_alloc_endpoint.go exec, toWsCode(500)).
        if (!authorized(request) || execDenied) return ws.close(1011, 'Permission denied');
        handleExec(
          ws,
          { allocId: decodeURIComponent(match[1] ?? ''), task: url.searchParams.get('task') ?? undefined, command, tty: tty === 'true' },
          cluster,
          spec,
          violations,
          takeExecFault(command),
        );
      });
    })().catch(() => socket.destroy());
  });

  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(options.port ?? 0, '127.0.0.1', () => resolve());
  });
  const bound = server.address();
  const port = typeof bound === 'object' && bound !== null ? bound.port : 0;
  address = `127.0.0.1:${port}`;

  return {
    url: `http://127.0.0.1:${port}`,
    address: '127.0.0.1',
    port,
    control,
    close: async () => {
      for (const timer of storms) clearInterval(timer);
      storms.clear();
      for (const subscriber of [...subscribers]) {
        clearInterval(subscriber.heartbeat);
        subscriber.response.destroy();
      }
      for (const client of wss.clients) client.terminate();
      cluster.close();
      wss.close();
      await new Promise<void>((resolve) => {
        server.close(() => resolve());
        for (const socket of sockets) socket.destroy();
      });
      rmSync(tempRoot, { recursive: true, force: true });
    },
  };
}

function matches(subscriber: Subscriber, event: JsonObject): boolean {
  if (subscriber.namespace !== '*' && event['Namespace'] !== undefined && event['Namespace'] !== subscriber.namespace) return false;
  const keys = subscriber.topics.get(String(event['Topic'])) ?? subscriber.topics.get('*');
  if (keys === undefined) return false;
  if (keys.has('*')) return true;
  const filterKeys = Array.isArray(event['FilterKeys']) ? event['FilterKeys'] : [];
  return keys.has(String(event['Key'])) || filterKeys.some((key) => keys.has(String(key)));
}
