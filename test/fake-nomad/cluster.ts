import type { ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { join } from 'node:path';
import { removeContainerTmp } from './exec.js';
import { canonicalizeJob, isObject, jobSpecKey, newId, omitEmpty, nowNs, objectList, rfc3339, validateJob, zeroTime, type JsonObject } from './model.js';
import {
  type AllocMetric,
  defaultNode,
  type FakeNode,
  groupUsage,
  nodeFrom,
  nodeJson,
  type NodeSpec,
  placeGroup,
  tasksUpdated,
  type Usage,
} from './placement.js';

/*
 * The fake's state store and scheduler/client simulation. Like Nomad's raft log, every write bumps
 * one index and yields one event batch with that index (section 6.3 of nomad-notes.md).
 */

export interface Timings {
  /* Register → PlanResult (allocations placed). */
  schedulerDelayMs: number;
  /* Placement → task running (image pull + container start). */
  startDelayMs: number;
  /* Purge/stop → processes killed (the client notices asynchronously). */
  killDelayMs: number;
  /* Crash → task running again. */
  restartDelayMs: number;
  /* Placement → image pulled, for images marked slow (setImagePull); the task is pending meanwhile. */
  pullDelayMs: number;
}

export class HttpError extends Error {
  constructor(
    readonly status: number,
    message: string,
  ) {
    super(message);
  }
}

export interface EventBatch {
  Index: number;
  Events: JsonObject[];
}

interface PendingEvent {
  topic: 'Job' | 'Evaluation' | 'Allocation' | 'Node';
  type: string;
  key: string;
  namespace: string;
  filterKeys: string[] | null;
  payload: JsonObject;
}

export interface AllocRecord {
  alloc: JsonObject;
  jobKey: string;
  namespace: string;
  jobId: string;
  group: string;
  taskNames: string[];
  /* The job version the allocation runs (Allocation.Job): what an update is compared with. */
  job: JsonObject;
  nodeId: string;
  /* What it holds on its node until it stops (DesiredStatus stop) or ends (terminal client status). */
  usage: Usage | undefined;
  dir: string | undefined;
  processes: Set<ChildProcess>;
  /* Process groups of tty execs: their commands lead sessions of their own (see pty-exec.py). */
  ttyGroups: Set<number>;
}

interface JobRecord {
  job: JsonObject;
  namespace: string;
  id: string;
}

export class Cluster {
  index = 1;
  readonly jobs = new Map<string, JobRecord>();
  readonly evals = new Map<string, JsonObject>();
  /* Blocked evaluations (ID → job key) waiting for capacity. */
  readonly blocked = new Map<string, string>();
  readonly allocs = new Map<string, AllocRecord>();
  buffer: EventBatch[] = [];
  eventBufferSize: number;
  readonly listeners = new Set<(batch: EventBatch) => void>();
  /* Jobs (by ID prefix) whose allocations fail to start, as after an image pull error. */
  readonly failStartPrefixes = new Set<string>();
  /* Jobs (by ID prefix) whose allocations stay pending without a word, as on a client that hangs. */
  readonly stallStartPrefixes = new Set<string>();
  /* Images whose pull takes timings.pullDelayMs on a node that does not have them yet. */
  readonly slowImages = new Set<string>();
  readonly nodes = new Map<string, FakeNode>();
  readonly #nodeUsage = new Map<string, Usage & { allocs: number }>();
  readonly #pulled = new Map<string, Set<string>>();
  /* Live allocations by job, so that scheduling one job never scans every allocation. */
  readonly #byJob = new Map<string, Set<AllocRecord>>();
  #unblockQueued = false;
  /* Observers of payloads, used to validate every emitted event against the spec. */
  onEmit: ((batch: EventBatch) => void) | undefined;
  private readonly timers = new Set<NodeJS.Timeout>();
  private closed = false;
  /* Where republishRunning goes on: every allocation gets its turn. */
  private stormIterator: IterableIterator<AllocRecord> | undefined;

  constructor(
    readonly timings: Timings,
    eventBufferSize: number,
    private readonly tempRoot: string,
    private readonly httpAddr: () => string,
  ) {
    this.eventBufferSize = eventBufferSize;
    const node = defaultNode();
    this.nodes.set(node.ID, node);
  }

  node(id: string): JsonObject | undefined {
    const node = this.nodes.get(id);
    return node === undefined ? undefined : nodeJson(node, this.httpAddr());
  }

  /* Replaces the cluster's nodes; allocations stay where they are (a node gone keeps its allocations, as a drain would not). */
  setNodes(specs: readonly NodeSpec[]): FakeNode[] {
    this.nodes.clear();
    const nodes = specs.map((spec, ordinal) => nodeFrom(spec, ordinal));
    for (const node of nodes) this.nodes.set(node.ID, node);
    this.#unblock();
    return nodes;
  }

  /* Changes one node (more memory, a driver, ready again); blocked evaluations get another go. */
  updateNode(id: string, change: NodeSpec): FakeNode {
    const node = this.nodes.get(id);
    if (node === undefined) throw new HttpError(404, 'node not found');
    const updated = nodeFrom({ ...node, ...change, ID: id }, 0);
    this.nodes.set(id, updated);
    this.#unblock();
    return updated;
  }

  #usage(nodeId: string): Usage & { allocs: number } {
    let usage = this.#nodeUsage.get(nodeId);
    if (usage === undefined) {
      usage = { cpu: 0, memoryMB: 0, diskMB: 0, allocs: 0 };
      this.#nodeUsage.set(nodeId, usage);
    }
    return usage;
  }

  /* The allocation stops holding its resources; waiting placements may fit now (Nomad unblocks on freed capacity). */
  #release(record: AllocRecord): void {
    if (record.usage === undefined) return;
    const usage = this.#usage(record.nodeId);
    usage.cpu -= record.usage.cpu;
    usage.memoryMB -= record.usage.memoryMB;
    usage.diskMB -= record.usage.diskMB;
    usage.allocs -= 1;
    record.usage = undefined;
    this.#unblock();
  }

  #addAlloc(record: AllocRecord): void {
    this.allocs.set(String(record.alloc['ID']), record);
    let set = this.#byJob.get(record.jobKey);
    if (set === undefined) {
      set = new Set();
      this.#byJob.set(record.jobKey, set);
    }
    set.add(record);
  }

  #dropAlloc(record: AllocRecord): void {
    this.#release(record);
    this.allocs.delete(String(record.alloc['ID']));
    const set = this.#byJob.get(record.jobKey);
    set?.delete(record);
    if (set?.size === 0) this.#byJob.delete(record.jobKey);
  }

  /* Allocations of one job (every version of it that this store still holds). */
  jobAllocs(jobId: string, namespace: string): AllocRecord[] {
    return [...(this.#byJob.get(`${namespace}/${jobId}`) ?? [])];
  }

  later(ms: number, task: () => void | Promise<void>): void {
    if (this.closed) return;
    const timer = setTimeout(() => {
      this.timers.delete(timer);
      if (this.closed) return;
      void Promise.resolve()
        .then(task)
        .catch((error: unknown) => console.error('fake nomad task failed', error));
    }, ms);
    this.timers.add(timer);
  }

  close(): void {
    this.closed = true;
    for (const timer of this.timers) clearTimeout(timer);
    this.timers.clear();
    for (const record of this.allocs.values()) this.destroyContainer(record, 0);
    this.allocs.clear();
    this.#byJob.clear();
  }

  /* One raft write: bump the index and publish the batch (even a write with no events bumps the index). */
  commit(events: PendingEvent[]): number {
    this.index += 1;
    if (events.length === 0) return this.index;
    const batch: EventBatch = {
      Index: this.index,
      Events: events.map((event) => ({
        Topic: event.topic,
        Type: event.type,
        Key: event.key,
        Namespace: event.namespace,
        FilterKeys: event.filterKeys,
        Index: this.index,
        // Snapshot now: later mutations of the live objects must not rewrite history.
        Payload: { [event.topic]: structuredClone(event.payload) },
      })),
    };
    this.buffer.push(batch);
    while (this.buffer.length > this.eventBufferSize) this.buffer.shift();
    this.onEmit?.(batch);
    for (const listener of this.listeners) listener(batch);
    return this.index;
  }

  // ---- jobs ----------------------------------------------------------------------------------

  register(body: unknown, queryNamespace: string | undefined): JsonObject {
    if (!isObject(body) || !isObject(body['Job'])) throw new HttpError(400, 'Job must be specified');
    const submitted = body['Job'];
    if (typeof submitted['ID'] !== 'string' || submitted['ID'] === '') throw new HttpError(400, "Job ID hasn't been provided");
    // command/agent/job_endpoint.go namespaceForJob: the query parameter wins, then the request's own
    // Namespace, then the job's; the job is stored under (and rewritten to) the winner.
    const named = (value: unknown): string | undefined => (typeof value === 'string' && value !== '' ? value : undefined);
    const namespace = named(queryNamespace) ?? named(body['Namespace']) ?? named(submitted['Namespace']) ?? 'default';
    const job = canonicalizeJob(submitted, namespace);
    const errors = validateJob(job);
    if (errors.length > 0) {
      throw new HttpError(
        500,
        `1 error occurred:\n\t* Job validation failed: ${errors.length} errors occurred:\n${errors.map((e) => `\t* ${e}`).join('\n')}\n\n`,
      );
    }
    const id = String(job['ID']);
    const key = `${namespace}/${id}`;
    const existing = this.jobs.get(key);
    const changed = existing === undefined || existing.job['Stop'] === true || jobSpecKey(existing.job) !== jobSpecKey(job);
    const evalId = newId();
    const index = this.index + 1;
    let record = existing;
    if (changed) {
      const now = nowNs();
      const stored: JsonObject = {
        ...job,
        Status: existing === undefined || existing.job['Stop'] === true ? 'pending' : existing.job['Status'],
        StatusDescription: '',
        Stop: false,
        Stable: false,
        Version: existing === undefined ? 0 : Number(existing.job['Version']) + 1,
        SubmitTime: now,
        CreateIndex: existing === undefined ? index : existing.job['CreateIndex'],
        ModifyIndex: index,
        JobModifyIndex: index,
      };
      record = { job: stored, namespace, id };
      this.jobs.set(key, record);
    }
    const stored = record ?? { job, namespace, id };
    const evaluation = this.newEval(evalId, stored.job, 'job-register', index);
    const events: PendingEvent[] = [];
    if (changed) events.push(this.jobEvent('JobRegistered', stored.job));
    events.push(this.evalEvent(changed ? 'JobRegistered' : 'EvaluationUpdated', evaluation));
    this.commit(events);
    this.later(this.timings.schedulerDelayMs, () => this.schedule(evalId, key));
    // Nomad warns and ignores MemoryMaxMB without memory oversubscription; we model an enabled cluster.
    return {
      EvalID: evalId,
      EvalCreateIndex: index,
      JobModifyIndex: stored.job['JobModifyIndex'],
      Warnings: '',
      Index: index,
      LastContact: 0,
      KnownLeader: false,
      NextToken: '',
    };
  }

  deregister(id: string, namespace: string, purge: boolean): JsonObject {
    const key = `${namespace}/${id}`;
    const record = this.jobs.get(key);
    if (record === undefined) {
      // Nomad >= 1.6: deleting an unknown job succeeds without an evaluation.
      return {
        EvalID: '',
        EvalCreateIndex: 0,
        JobModifyIndex: 0,
        VolumeEvalID: '',
        VolumeEvalIndex: 0,
        Index: this.index,
        LastContact: 0,
        KnownLeader: false,
        NextToken: '',
      };
    }
    const index = this.index + 1;
    const evalId = newId();
    const evaluation = this.newEval(evalId, record.job, 'job-deregister', index);
    evaluation['Type'] = 'service'; // Nomad hard-codes this for deregistration evals.
    const jobPayload: JsonObject = { ...record.job, Stop: true, ModifyIndex: index, JobModifyIndex: index };
    if (purge) {
      // One write deletes the job and its allocations; Nomad emits no Allocation events for that (nomad#19834).
      this.jobs.delete(key);
      for (const alloc of this.jobAllocs(id, namespace)) {
        this.#dropAlloc(alloc);
        this.destroyContainer(alloc, this.timings.killDelayMs);
      }
    } else {
      record.job = jobPayload;
    }
    this.commit([this.jobEvent('JobDeregistered', jobPayload), this.evalEvent('JobDeregistered', evaluation)]);
    this.later(this.timings.schedulerDelayMs, () => this.schedule(evalId, key));
    return {
      EvalID: evalId,
      EvalCreateIndex: index,
      JobModifyIndex: index,
      VolumeEvalID: '',
      VolumeEvalIndex: 0,
      Index: index,
      LastContact: 0,
      KnownLeader: false,
      NextToken: '',
    };
  }

  job(id: string, namespace: string): JsonObject | undefined {
    return this.jobs.get(`${namespace}/${id}`)?.job;
  }

  jobStubs(namespace: string, prefix: string, withMeta: boolean): JsonObject[] {
    return [...this.jobs.values()]
      .filter((record) => (namespace === '*' || record.namespace === namespace) && record.id.startsWith(prefix))
      .sort((a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0))
      .map(({ job }) => ({
        ID: job['ID'],
        ParentID: job['ParentID'],
        Name: job['Name'],
        Namespace: job['Namespace'],
        Datacenters: job['Datacenters'],
        NodePool: job['NodePool'],
        Type: job['Type'],
        Priority: job['Priority'],
        Periodic: false,
        ParameterizedJob: false,
        Stop: job['Stop'],
        Status: job['Status'],
        StatusDescription: job['StatusDescription'],
        JobSummary: null,
        CreateIndex: job['CreateIndex'],
        ModifyIndex: job['ModifyIndex'],
        JobModifyIndex: job['JobModifyIndex'],
        SubmitTime: job['SubmitTime'],
        ...(withMeta ? { Meta: job['Meta'] } : {}),
      }));
  }

  // ---- allocations ---------------------------------------------------------------------------

  allocStub(record: AllocRecord, withResources: boolean): JsonObject {
    const a = record.alloc;
    const job = this.jobs.get(record.jobKey)?.job;
    return {
      ID: a['ID'],
      EvalID: a['EvalID'],
      Name: a['Name'],
      Namespace: a['Namespace'],
      NodeID: a['NodeID'],
      NodeName: a['NodeName'],
      JobID: a['JobID'],
      JobType: job?.['Type'] ?? 'batch',
      JobVersion: a['JobVersion'],
      TaskGroup: a['TaskGroup'],
      AllocatedResources: withResources ? a['AllocatedResources'] : null,
      DesiredStatus: a['DesiredStatus'],
      DesiredDescription: a['DesiredDescription'],
      ClientStatus: a['ClientStatus'],
      ClientDescription: a['ClientDescription'],
      TaskStates: a['TaskStates'],
      DeploymentStatus: null,
      FollowupEvalID: a['FollowupEvalID'],
      NextAllocation: a['NextAllocation'],
      PreviousAllocation: a['PreviousAllocation'],
      RescheduleTracker: null,
      PreemptedAllocations: null,
      PreemptedByAllocation: '',
      CreateIndex: a['CreateIndex'],
      ModifyIndex: a['ModifyIndex'],
      CreateTime: a['CreateTime'],
      ModifyTime: a['ModifyTime'],
    };
  }

  fullAlloc(record: AllocRecord): JsonObject {
    // structs.Allocation is omitempty: empty descriptions, indexes and nil maps are absent (the Job is not).
    return { ...omitEmpty(record.alloc), Job: record.job };
  }

  /*
   * Scheduler (generic_sched.go): each group's live allocations of an older job version are updated in
   * place or replaced (tasksUpdated), surplus ones stop, missing ones are placed on a node that fits.
   * What cannot be placed ends the evaluation with FailedTGAllocs and a blocked evaluation that runs
   * again whenever capacity may have appeared (a node changed, an allocation stopped).
   */
  private async schedule(evalId: string, jobKey: string): Promise<void> {
    const evaluation = this.evals.get(evalId);
    if (evaluation === undefined || evaluation['Status'] === 'canceled') return;
    const reblocking = evaluation['Status'] === 'blocked';
    const record = this.jobs.get(jobKey);
    const events: PendingEvent[] = [];
    const started: AllocRecord[] = [];
    const stopped: AllocRecord[] = [];
    const updated: AllocRecord[] = [];
    const queued: Record<string, number> = {};
    const failed: Record<string, AllocMetric> = {};
    if (record !== undefined) {
      const stopAll = record.job['Stop'] === true;
      for (const group of objectList(record.job['TaskGroups'])) {
        const name = String(group['Name']);
        queued[name] = 0;
        const live = this.jobAllocs(record.id, record.namespace).filter((a) => a.group === name && a.alloc['DesiredStatus'] === 'run');
        const desired = stopAll ? 0 : Number(group['Count']);
        const keep: AllocRecord[] = [];
        const replace: AllocRecord[] = [];
        for (const alloc of live) {
          if (alloc.job['JobModifyIndex'] === record.job['JobModifyIndex']) keep.push(alloc);
          else if (tasksUpdated(alloc.job, record.job, name) !== undefined) replace.push(alloc);
          else {
            keep.push(alloc);
            updated.push(alloc);
          }
        }
        while (keep.length > desired) {
          const extra = keep.pop();
          if (extra === undefined) break;
          stopped.push(extra);
          if (updated.includes(extra)) updated.splice(updated.indexOf(extra), 1);
        }
        // The old allocation stops in the same plan that places its replacement, so its room counts as free.
        for (const old of replace) {
          old.alloc['DesiredDescription'] = 'alloc is being updated due to job update';
          stopped.push(old);
          this.#release(old);
        }
        const placed = (): number => keep.length + started.filter((a) => a.group === name).length;
        const replaced = [...replace];
        while (placed() + queued[name] < desired) {
          const metric = failed[name];
          if (metric !== undefined) {
            // Nomad stops trying a group after its first failure and counts the rest as coalesced.
            metric.CoalescedFailures += 1;
            queued[name] += 1;
            continue;
          }
          const previous = replaced.shift();
          const result = this.#place(record.job, group);
          if ('metric' in result) {
            failed[name] = result.metric;
            queued[name] += 1;
            continue;
          }
          const fresh = await this.newAlloc(record, group, evalId, previous, result.node);
          if (previous !== undefined) previous.alloc['NextAllocation'] = fresh.alloc['ID'];
          started.push(fresh);
        }
      }
    }
    if (this.closed) return;
    const hasFailures = Object.keys(failed).length > 0;
    if (hasFailures && !reblocking) events.push(...this.#block(evaluation, failed));
    for (const alloc of stopped) {
      alloc.alloc['DesiredStatus'] = 'stop';
      if (alloc.alloc['DesiredDescription'] === '') alloc.alloc['DesiredDescription'] = 'alloc not needed due to job update';
      this.#release(alloc);
    }
    for (const alloc of updated) {
      // An in-place update: same allocation, new job version (inplaceUpdate in util.go).
      alloc.job = record?.job ?? alloc.job;
      alloc.alloc['JobVersion'] = alloc.job['Version'];
    }
    if (started.length > 0 || stopped.length > 0 || updated.length > 0 || events.length > 0) {
      const index = this.index + 1;
      for (const alloc of [...started, ...stopped, ...updated]) this.touch(alloc, index);
      for (const alloc of started) this.#addAlloc(alloc);
      for (const alloc of [...started, ...stopped, ...updated]) events.push(this.allocEvent('PlanResult', alloc));
      if (record !== undefined && started.length > 0 && record.job['Status'] !== 'running') {
        record.job['Status'] = 'running';
        record.job['ModifyIndex'] = index;
        events.push(this.jobEvent('PlanResult', record.job));
      }
      this.commit(events);
    }
    // A blocked evaluation that still cannot place everything stays blocked (ReblockEval), unchanged.
    if (!(reblocking && hasFailures)) {
      this.blocked.delete(evalId);
      const evalIndex = this.index + 1;
      Object.assign(evaluation, {
        Status: 'complete',
        QueuedAllocations: queued,
        FailedTGAllocs: hasFailures ? failed : null,
        ModifyIndex: evalIndex,
        ModifyTime: nowNs(),
        SnapshotIndex: evalIndex - 1,
      });
      const updates = [this.evalEvent('EvaluationUpdated', evaluation)];
      // The state store cancels the job's blocked evaluations once one of its evaluations placed everything.
      if (!hasFailures) updates.push(...this.#cancelBlocked(jobKey, `evaluation ${JSON.stringify(evalId)} successful`));
      this.commit(updates);
    }
    for (const alloc of started) this.later(this.timings.startDelayMs, () => this.startAlloc(alloc));
    for (const alloc of stopped) this.later(this.timings.killDelayMs, () => this.completeAlloc(alloc));
  }

  #place(job: JsonObject, group: JsonObject): ReturnType<typeof placeGroup> {
    return placeGroup(
      job,
      group,
      this.nodes.values(),
      (nodeId) => this.#usage(nodeId),
      (nodeId) => this.#usage(nodeId).allocs,
    );
  }

  /* Evaluation.CreateBlockedEval: a blocked evaluation for what could not be placed, replacing an older one of the job. */
  #block(evaluation: JsonObject, failed: Record<string, AllocMetric>): PendingEvent[] {
    const jobKey = `${String(evaluation['Namespace'])}/${String(evaluation['JobID'])}`;
    // The leader cancels duplicate blocked evaluations of a job (leader.go reapDupBlockedEvaluations).
    const events = this.#cancelBlocked(jobKey, `existing blocked evaluation exists for job ${JSON.stringify(evaluation['JobID'])}`);
    const blocked = this.newEval(newId(), {}, 'queued-allocs', this.index + 1);
    Object.assign(blocked, {
      Namespace: evaluation['Namespace'],
      Priority: evaluation['Priority'],
      Type: evaluation['Type'],
      JobID: evaluation['JobID'],
      JobModifyIndex: evaluation['JobModifyIndex'],
      Status: 'blocked',
      StatusDescription: 'created to place remaining allocations',
      PreviousEval: evaluation['ID'],
      FailedTGAllocs: failed,
    });
    this.blocked.set(String(blocked['ID']), jobKey);
    evaluation['BlockedEval'] = blocked['ID'];
    events.push(this.evalEvent('EvaluationUpdated', blocked));
    return events;
  }

  #cancelBlocked(jobKey: string, description: string): PendingEvent[] {
    const events: PendingEvent[] = [];
    for (const [id, key] of this.blocked) {
      const blocked = this.evals.get(id);
      if (key !== jobKey || blocked?.['Status'] !== 'blocked') continue;
      this.blocked.delete(id);
      Object.assign(blocked, { Status: 'canceled', StatusDescription: description, ModifyIndex: this.index + 1, ModifyTime: nowNs() });
      events.push(this.evalEvent('EvaluationUpdated', blocked));
    }
    return events;
  }

  /* Blocked evaluations run again soon, once, however many reasons there were. */
  #unblock(): void {
    if (this.blocked.size === 0 || this.#unblockQueued) return;
    this.#unblockQueued = true;
    this.later(this.timings.schedulerDelayMs, async () => {
      this.#unblockQueued = false;
      for (const [id, jobKey] of [...this.blocked]) await this.schedule(id, jobKey);
    });
  }

  private async newAlloc(record: JobRecord, group: JsonObject, evalId: string, previous: AllocRecord | undefined, node: FakeNode): Promise<AllocRecord> {
    const groupName = String(group['Name']);
    const used = new Set(
      this.jobAllocs(record.id, record.namespace)
        .filter((a) => a.group === groupName && a.alloc['DesiredStatus'] === 'run')
        .map((a) => String(a.alloc['Name'])),
    );
    let slot = 0;
    while (used.has(`${record.id}.${groupName}[${slot}]`)) slot++;
    const ports: JsonObject[] = [];
    for (const network of objectList(group['Networks'])) {
      for (const port of objectList(network['DynamicPorts'])) {
        // AllocatedPortMapping is omitempty: a port without `to` has no To at all.
        ports.push(omitEmpty({ Label: String(port['Label']), Value: await freePort(), To: Number(port['To'] ?? 0), HostIP: '127.0.0.1' }));
      }
    }
    const tasks = objectList(group['Tasks']);
    const now = nowNs();
    const id = newId();
    const usage = groupUsage(group);
    const nodeUsage = this.#usage(node.ID);
    nodeUsage.cpu += usage.cpu;
    nodeUsage.memoryMB += usage.memoryMB;
    nodeUsage.diskMB += usage.diskMB;
    nodeUsage.allocs += 1;
    const alloc: JsonObject = {
      ID: id,
      Namespace: record.namespace,
      EvalID: evalId,
      Name: `${record.id}.${groupName}[${slot}]`,
      NodeID: node.ID,
      NodeName: node.Name,
      JobID: record.id,
      JobVersion: record.job['Version'],
      TaskGroup: groupName,
      AllocatedResources: {
        Tasks: Object.fromEntries(
          tasks.map((task) => {
            const resources = isObject(task['Resources']) ? task['Resources'] : {};
            return [
              String(task['Name']),
              {
                Cpu: { CpuShares: Number(resources['CPU'] ?? 100) },
                Memory: { MemoryMB: Number(resources['MemoryMB'] ?? 300), MemoryMaxMB: Number(resources['MemoryMaxMB'] ?? 0) },
                Networks: null,
              },
            ];
          }),
        ),
        TaskLifecycles: null,
        Shared: { DiskMB: usage.diskMB, Networks: null, Ports: ports.length > 0 ? ports : null },
      },
      DesiredStatus: 'run',
      DesiredDescription: '',
      DesiredTransition: { Migrate: null, Reschedule: null, ForceReschedule: null },
      ClientStatus: 'pending',
      ClientDescription: '',
      TaskStates: null,
      DeploymentStatus: null,
      RescheduleTracker: null,
      PreviousAllocation: previous === undefined ? '' : previous.alloc['ID'],
      NextAllocation: '',
      FollowupEvalID: '',
      PreemptedAllocations: null,
      PreemptedByAllocation: '',
      Metrics: null,
      CreateIndex: 0,
      ModifyIndex: 0,
      AllocModifyIndex: 0,
      CreateTime: now,
      ModifyTime: now,
    };
    return {
      alloc,
      jobKey: `${record.namespace}/${record.id}`,
      namespace: record.namespace,
      jobId: record.id,
      group: groupName,
      taskNames: tasks.map((task) => String(task['Name'])),
      job: record.job,
      nodeId: node.ID,
      usage,
      dir: undefined,
      processes: new Set(),
      ttyGroups: new Set(),
    };
  }

  private startAlloc(record: AllocRecord): void {
    if (!this.isLive(record) || record.alloc['ClientStatus'] !== 'pending') return;
    if ([...this.failStartPrefixes].some((prefix) => record.jobId.startsWith(prefix))) {
      this.failAlloc(record, 'Driver Failure', 'failed to pull image', false);
      return;
    }
    if ([...this.stallStartPrefixes].some((prefix) => record.jobId.startsWith(prefix))) return;
    const received = [taskEvent('Received', 'Task received by client'), taskEvent('Task Setup', 'Building Task Directory')];
    const pulled = this.#pulled.get(record.nodeId) ?? new Set<string>();
    this.#pulled.set(record.nodeId, pulled);
    const pulls = this.#images(record).filter((image) => this.slowImages.has(image) && !pulled.has(image));
    if (pulls.length > 0 && record.alloc['TaskStates'] === null) {
      // The Docker driver's "Downloading image" event (Type Driver) while the task stays pending.
      this.setTaskStates(record, () => ({
        State: 'pending',
        Failed: false,
        Restarts: 0,
        LastRestart: zeroTime,
        StartedAt: zeroTime,
        FinishedAt: zeroTime,
        Events: [...received, ...pulls.map((image) => ({ ...taskEvent('Driver', 'Downloading image', { image }), DriverMessage: 'Downloading image' }))],
      }));
      this.update(record);
      this.later(this.timings.pullDelayMs, () => {
        for (const image of pulls) pulled.add(image);
        this.startAlloc(record);
      });
      return;
    }
    record.dir = mkdtempSync(join(this.tempRoot, 'alloc-'));
    const started = rfc3339();
    this.setTaskStates(record, (state) => ({
      State: 'running',
      Failed: false,
      Restarts: 0,
      LastRestart: zeroTime,
      StartedAt: started,
      FinishedAt: zeroTime,
      Events: [...(objectList(state['Events']).length > 0 ? objectList(state['Events']) : received), taskEvent('Started', 'Task started by client')],
    }));
    record.alloc['ClientStatus'] = 'running';
    record.alloc['ClientDescription'] = 'Tasks are running';
    this.update(record);
  }

  /* The Docker images the allocation's tasks run. */
  #images(record: AllocRecord): string[] {
    const group = objectList(record.job['TaskGroups']).find((candidate) => candidate['Name'] === record.group);
    return objectList(group?.['Tasks'])
      .map((task) => (isObject(task['Config']) ? task['Config']['image'] : undefined))
      .filter((image): image is string => typeof image === 'string');
  }

  private completeAlloc(record: AllocRecord): void {
    if (!this.allocs.has(String(record.alloc['ID'])) || record.alloc['ClientStatus'] === 'complete') return;
    this.destroyContainer(record, 0);
    this.#release(record);
    record.alloc['ClientStatus'] = 'complete';
    record.alloc['ClientDescription'] = 'All tasks have completed';
    this.setTaskStates(record, (state) => ({
      ...state,
      State: 'dead',
      FinishedAt: rfc3339(),
      Events: [...objectList(state['Events']), taskEvent('Killing', 'Sent interrupt'), taskEvent('Killed', 'Task successfully killed')],
    }));
    this.update(record);
    this.maybeMarkJobDead(record.jobKey);
  }

  /* Fault: the task dies (OOM or a crash) and restarts within its restart policy. */
  crashTask(allocId: string, options: { oom: boolean; exitCode?: number }): void {
    const record = this.requireAlloc(allocId);
    if (record.alloc['ClientStatus'] !== 'running') throw new HttpError(400, `allocation ${allocId} is not running`);
    const exitCode = options.exitCode ?? (options.oom ? 137 : 1);
    // SIGKILL makes running execs end with 137, what Docker reports for an OOM kill.
    this.destroyContainer(record, 0);
    record.alloc['ClientStatus'] = 'pending';
    record.alloc['ClientDescription'] = 'No tasks have started';
    const details: Record<string, string> = { exit_code: String(exitCode), signal: '0', oom_killed: options.oom ? 'true' : 'false' };
    if (options.oom) details['exit_message'] = 'OOM Killed';
    this.setTaskStates(record, (state) => ({
      ...state,
      State: 'pending',
      Restarts: Number(state['Restarts'] ?? 0) + 1,
      LastRestart: rfc3339(),
      Events: [
        ...objectList(state['Events']),
        { ...taskEvent('Terminated', options.oom ? 'OOM Killed' : `Exit Code: ${exitCode}`, details), ExitCode: exitCode },
        {
          ...taskEvent('Restarting', `Task restarting in ${this.timings.restartDelayMs}ms`, {
            restart_reason: 'Restart within policy',
            start_delay: String(this.timings.restartDelayMs * 1_000_000),
          }),
          RestartReason: 'Restart within policy',
          StartDelay: this.timings.restartDelayMs * 1_000_000,
        },
      ],
    }));
    this.update(record);
    this.later(this.timings.restartDelayMs, () => {
      if (!this.isLive(record) || record.alloc['ClientStatus'] !== 'pending') return;
      record.dir = mkdtempSync(join(this.tempRoot, 'alloc-'));
      record.alloc['ClientStatus'] = 'running';
      record.alloc['ClientDescription'] = 'Tasks are running';
      this.setTaskStates(record, (state) => ({
        ...state,
        State: 'running',
        StartedAt: rfc3339(),
        Events: [...objectList(state['Events']), taskEvent('Started', 'Task started by client')],
      }));
      this.update(record);
    });
  }

  /* Fault: the allocation fails for good; optionally Nomad reschedules a replacement. */
  failAllocation(allocId: string, reschedule: boolean): void {
    this.failAlloc(this.requireAlloc(allocId), 'Terminated', 'Exit Code: 1', reschedule);
  }

  /* Fault: the node holding the allocation is lost; Nomad places a replacement (unless told not to). */
  loseAllocation(allocId: string, reschedule: boolean): void {
    const record = this.requireAlloc(allocId);
    this.destroyContainer(record, 0);
    this.#release(record);
    record.alloc['ClientStatus'] = 'lost';
    record.alloc['DesiredStatus'] = 'stop';
    record.alloc['DesiredDescription'] = 'alloc is lost since its node is down';
    this.setTaskStates(record, (state) => ({ ...state, State: 'dead', FinishedAt: rfc3339() }));
    void this.replace(record, reschedule);
  }

  private failAlloc(record: AllocRecord, eventType: string, message: string, reschedule: boolean): void {
    this.destroyContainer(record, 0);
    this.#release(record);
    record.alloc['ClientStatus'] = 'failed';
    record.alloc['ClientDescription'] = 'Failed tasks';
    const states: JsonObject = {};
    for (const task of record.taskNames) {
      const previous = isObject(record.alloc['TaskStates']) && isObject(record.alloc['TaskStates'][task]) ? record.alloc['TaskStates'][task] : {};
      states[task] = {
        State: 'dead',
        Failed: true,
        Restarts: previous['Restarts'] ?? 0,
        LastRestart: previous['LastRestart'] ?? zeroTime,
        StartedAt: previous['StartedAt'] ?? zeroTime,
        FinishedAt: rfc3339(),
        Events: [...objectList(previous['Events']), taskEvent(eventType, message), taskEvent('Not Restarting', 'Exceeded allowed attempts 0 in interval')],
      };
    }
    record.alloc['TaskStates'] = states;
    this.update(record);
    if (reschedule) {
      record.alloc['DesiredStatus'] = 'stop';
      record.alloc['DesiredDescription'] = 'alloc was rescheduled because it failed';
      void this.replace(record, true);
    } else {
      this.maybeMarkJobDead(record.jobKey);
    }
  }

  /* One PlanResult batch: the old alloc (with NextAllocation) and its replacement (with PreviousAllocation). */
  private async replace(old: AllocRecord, reschedule: boolean): Promise<void> {
    const job = this.jobs.get(old.jobKey);
    const group = objectList(job?.job['TaskGroups']).find((candidate) => candidate['Name'] === old.group);
    if (!reschedule || job === undefined || group === undefined) {
      this.update(old);
      this.maybeMarkJobDead(old.jobKey);
      return;
    }
    const placement = this.#place(job.job, group);
    if ('metric' in placement) {
      // No room anywhere: the replacement is not placed (Nomad would queue it behind a blocked evaluation).
      this.update(old);
      this.maybeMarkJobDead(old.jobKey);
      return;
    }
    const fresh = await this.newAlloc(job, group, String(old.alloc['EvalID']), old, placement.node);
    if (this.closed) return;
    old.alloc['NextAllocation'] = fresh.alloc['ID'];
    const index = this.index + 1;
    this.touch(old, index);
    this.touch(fresh, index);
    this.#addAlloc(fresh);
    this.commit([this.allocEvent('PlanResult', old), this.allocEvent('PlanResult', fresh)]);
    this.later(this.timings.startDelayMs, () => this.startAlloc(fresh));
  }

  private maybeMarkJobDead(jobKey: string): void {
    const record = this.jobs.get(jobKey);
    if (record === undefined) return;
    const live = [...this.allocs.values()].some((a) => a.jobKey === jobKey && (a.alloc['ClientStatus'] === 'running' || a.alloc['ClientStatus'] === 'pending'));
    if (live || record.job['Status'] === 'dead') return;
    record.job['Status'] = 'dead';
    record.job['ModifyIndex'] = this.index + 1;
    this.commit([this.jobEvent('AllocationUpdated', record.job)]);
  }

  /*
   * What a busy client node sends all the time: allocation updates with nothing a runner cares
   * about changed (health, ModifyIndex). `count` running allocations, taken in turn, in one write.
   */
  republishRunning(count: number): number {
    const events: PendingEvent[] = [];
    const index = this.index + 1;
    for (let scanned = 0; events.length < count && scanned < this.allocs.size; scanned += 1) {
      this.stormIterator ??= this.allocs.values();
      const next = this.stormIterator.next();
      if (next.done === true) {
        this.stormIterator = undefined;
        continue;
      }
      const record = next.value;
      if (record.alloc['ClientStatus'] !== 'running' || record.alloc['DesiredStatus'] !== 'run') continue;
      this.touch(record, index);
      events.push(this.allocEvent('AllocationUpdated', record));
    }
    if (events.length > 0) this.commit(events);
    return events.length;
  }

  requireAlloc(allocId: string): AllocRecord {
    const record = this.allocs.get(allocId);
    if (record === undefined) throw new HttpError(404, 'alloc not found');
    return record;
  }

  private isLive(record: AllocRecord): boolean {
    return this.allocs.get(String(record.alloc['ID'])) === record && record.alloc['DesiredStatus'] === 'run';
  }

  /* Kills every process of the allocation's "container" and removes its directory. */
  destroyContainer(record: AllocRecord, delayMs: number): void {
    const processes = [...record.processes];
    const groups = [...record.ttyGroups];
    const dir = record.dir;
    record.processes.clear();
    record.ttyGroups.clear();
    record.dir = undefined;
    const kill = (): void => {
      for (const group of groups) {
        try {
          process.kill(-group, 'SIGKILL');
        } catch {
          // already gone
        }
      }
      for (const child of processes) {
        try {
          if (child.pid !== undefined) process.kill(-child.pid, 'SIGKILL');
        } catch {
          child.kill('SIGKILL');
        }
      }
      if (dir !== undefined) rmSync(dir, { recursive: true, force: true });
      removeContainerTmp(record);
    };
    if (delayMs > 0 && !this.closed) this.later(delayMs, kill);
    else kill();
  }

  private setTaskStates(record: AllocRecord, change: (state: JsonObject) => JsonObject): void {
    const states = isObject(record.alloc['TaskStates']) ? record.alloc['TaskStates'] : {};
    record.alloc['TaskStates'] = Object.fromEntries(record.taskNames.map((task) => [task, change(isObject(states[task]) ? states[task] : {})]));
  }

  private touch(record: AllocRecord, index: number): void {
    if (record.alloc['CreateIndex'] === 0) record.alloc['CreateIndex'] = index;
    record.alloc['ModifyIndex'] = index;
    record.alloc['AllocModifyIndex'] = index;
    record.alloc['ModifyTime'] = nowNs();
  }

  private update(record: AllocRecord): void {
    this.touch(record, this.index + 1);
    this.commit([this.allocEvent('AllocationUpdated', record)]);
  }

  private newEval(id: string, job: JsonObject, triggeredBy: string, index: number): JsonObject {
    const now = nowNs();
    const evaluation: JsonObject = {
      ID: id,
      Namespace: job['Namespace'],
      Priority: job['Priority'] ?? 50,
      Type: job['Type'] ?? 'service',
      TriggeredBy: triggeredBy,
      JobID: job['ID'],
      JobModifyIndex: job['JobModifyIndex'] ?? 0,
      NodeID: '',
      NodeModifyIndex: 0,
      DeploymentID: '',
      Status: 'pending',
      StatusDescription: '',
      Wait: 0,
      WaitUntil: zeroTime,
      NextEval: '',
      PreviousEval: '',
      BlockedEval: '',
      RelatedEvals: null,
      FailedTGAllocs: null,
      ClassEligibility: null,
      QuotaLimitReached: '',
      EscapedComputedClass: false,
      AnnotatePlan: false,
      QueuedAllocations: null,
      SnapshotIndex: 0,
      CreateIndex: index,
      ModifyIndex: index,
      CreateTime: now,
      ModifyTime: now,
    };
    this.evals.set(id, evaluation);
    return evaluation;
  }

  private jobEvent(type: string, job: JsonObject): PendingEvent {
    return { topic: 'Job', type, key: String(job['ID']), namespace: String(job['Namespace']), filterKeys: null, payload: job };
  }

  private evalEvent(type: string, evaluation: JsonObject): PendingEvent {
    return {
      topic: 'Evaluation',
      type,
      key: String(evaluation['ID']),
      namespace: String(evaluation['Namespace']),
      filterKeys: [String(evaluation['JobID']), ''],
      // structs.Evaluation is omitempty as well (eval.go).
      payload: omitEmpty(evaluation),
    };
  }

  private allocEvent(type: string, record: AllocRecord): PendingEvent {
    // Allocation payloads carry no job (Nomad strips it from events).
    return {
      topic: 'Allocation',
      type,
      key: String(record.alloc['ID']),
      namespace: record.namespace,
      filterKeys: [record.jobId, ''],
      // Nomad strips the job and, the struct being omitempty, every empty field.
      payload: omitEmpty({ ...record.alloc, Job: null }),
    };
  }
}

function taskEvent(type: string, message: string, details: Record<string, string> = {}): JsonObject {
  return {
    Type: type,
    Time: nowNs(),
    Message: message,
    DisplayMessage: message,
    Details: Object.keys(details).length > 0 ? details : null,
    FailsTask: false,
    ExitCode: 0,
    Signal: 0,
  };
}

/* A currently free host port, as Nomad's dynamic port allocator would hand out. */
function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.unref();
    server.on('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const address = server.address();
      const port = typeof address === 'object' && address !== null ? address.port : 0;
      server.close(() => resolve(port));
    });
  });
}
