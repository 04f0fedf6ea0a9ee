import { isObject, objectList, stableStringify, type JsonObject } from './model.js';

/*
 * The fake's nodes and what Nomad's scheduler decides with them (Nomad 1.10 scheduler/feasible.go,
 * rank.go, generic_sched.go, util.go): which ready nodes in the job's datacenters and node pool fit a
 * task group (constraints, drivers, CPU/memory/disk), the AllocMetric of a failed placement, and
 * whether a job change updates an allocation in place or replaces it (tasksUpdated).
 */

export interface NodeSpec {
  readonly ID?: string;
  readonly Name?: string;
  readonly Datacenter?: string;
  readonly NodePool?: string;
  readonly NodeClass?: string;
  /* Healthy drivers, Nomad's `driver.<name>` attributes. */
  readonly Drivers?: readonly string[];
  readonly Attributes?: Readonly<Record<string, string>>;
  readonly Meta?: Readonly<Record<string, string>>;
  /* Allocatable CPU shares (MHz), memory and disk (MB), after the node's reservations. */
  readonly CPU?: number;
  readonly MemoryMB?: number;
  readonly DiskMB?: number;
  /* `down` nodes and ineligible ones take no placements. */
  readonly Status?: 'ready' | 'down';
  readonly SchedulingEligibility?: 'eligible' | 'ineligible';
}

export type FakeNode = Required<NodeSpec>;

export interface Usage {
  cpu: number;
  memoryMB: number;
  diskMB: number;
}

/*
 * The default node fits far more than any test or benchmark places (10,000 jobs), so only tests that
 * set their own nodes see capacity limits.
 */
export function defaultNode(): FakeNode {
  return nodeFrom({ ID: 'f0a1c2d3-0000-4000-8000-000000000001', Name: 'fake-node-1' }, 0);
}

export function nodeFrom(spec: NodeSpec, ordinal: number): FakeNode {
  const id = spec.ID ?? `f0a1c2d3-0000-4000-8000-${String(ordinal + 1).padStart(12, '0')}`;
  const name = spec.Name ?? `fake-node-${ordinal + 1}`;
  return {
    ID: id,
    Name: name,
    Datacenter: spec.Datacenter ?? 'dc1',
    NodePool: spec.NodePool ?? 'default',
    NodeClass: spec.NodeClass ?? '',
    Drivers: spec.Drivers ?? ['docker', 'exec', 'raw_exec'],
    Attributes: { 'kernel.name': 'linux', 'cpu.arch': 'amd64', 'unique.hostname': name, ...spec.Attributes },
    Meta: { ...spec.Meta },
    CPU: spec.CPU ?? 100_000_000,
    MemoryMB: spec.MemoryMB ?? 100_000_000,
    DiskMB: spec.DiskMB ?? 1_000_000_000,
    Status: spec.Status ?? 'ready',
    SchedulingEligibility: spec.SchedulingEligibility ?? 'eligible',
  };
}

/* What an allocation of the group reserves: the tasks' CPU and memory (not MemoryMaxMB) and the group's disk. */
export function groupUsage(group: JsonObject): Usage {
  let cpu = 0;
  let memoryMB = 0;
  for (const task of objectList(group['Tasks'])) {
    const resources = isObject(task['Resources']) ? task['Resources'] : {};
    cpu += Number(resources['CPU'] ?? 100);
    memoryMB += Number(resources['MemoryMB'] ?? 300);
  }
  const disk = isObject(group['EphemeralDisk']) ? Number(group['EphemeralDisk']['SizeMB'] ?? 300) : 300;
  return { cpu, memoryMB, diskMB: disk };
}

/* structs.AllocMetric: no omitempty tag, so every field is sent, nil maps as null. */
export interface AllocMetric extends JsonObject {
  NodesEvaluated: number;
  NodesFiltered: number;
  NodesInPool: number;
  NodePool: string;
  NodesAvailable: Record<string, number>;
  ClassFiltered: Record<string, number> | null;
  ConstraintFiltered: Record<string, number> | null;
  NodesExhausted: number;
  ClassExhausted: Record<string, number> | null;
  DimensionExhausted: Record<string, number> | null;
  QuotaExhausted: string[] | null;
  ResourcesExhausted: Record<string, JsonObject> | null;
  Scores: null;
  ScoreMetaData: null;
  AllocationTime: number;
  CoalescedFailures: number;
}

function newMetric(pool: string): AllocMetric {
  return {
    NodesEvaluated: 0,
    NodesFiltered: 0,
    NodesInPool: 0,
    NodePool: pool,
    NodesAvailable: {},
    ClassFiltered: null,
    ConstraintFiltered: null,
    NodesExhausted: 0,
    ClassExhausted: null,
    DimensionExhausted: null,
    QuotaExhausted: null,
    ResourcesExhausted: null,
    Scores: null,
    ScoreMetaData: null,
    AllocationTime: 0,
    CoalescedFailures: 0,
  };
}

function bump(map: Record<string, number> | null, key: string): Record<string, number> {
  const counts = map ?? {};
  counts[key] = (counts[key] ?? 0) + 1;
  return counts;
}

/* AllocMetric.FilterNode: a constraint or driver ruled the node out. */
function filterNode(metric: AllocMetric, node: FakeNode, reason: string): void {
  metric.NodesFiltered += 1;
  if (node.NodeClass !== '') metric.ClassFiltered = bump(metric.ClassFiltered, node.NodeClass);
  metric.ConstraintFiltered = bump(metric.ConstraintFiltered, reason);
}

/* AllocMetric.ExhaustedNode: the node lacks room in one dimension. */
function exhaustNode(metric: AllocMetric, node: FakeNode, dimension: string): void {
  metric.NodesExhausted += 1;
  if (node.NodeClass !== '') metric.ClassExhausted = bump(metric.ClassExhausted, node.NodeClass);
  metric.DimensionExhausted = bump(metric.DimensionExhausted, dimension);
}

/* AllocMetric.ExhaustResources: what the group asked for in the exhausted dimensions. */
function exhaustResources(metric: AllocMetric, group: JsonObject): void {
  if (metric.DimensionExhausted === null) return;
  const exhausted: Record<string, JsonObject> = metric.ResourcesExhausted ?? {};
  for (const task of objectList(group['Tasks'])) {
    const resources = isObject(task['Resources']) ? task['Resources'] : {};
    const name = String(task['Name']);
    const entry = exhausted[name] ?? {
      CPU: 0,
      Cores: 0,
      MemoryMB: 0,
      MemoryMaxMB: 0,
      DiskMB: 0,
      IOPS: 0,
      Networks: null,
      Devices: null,
      NUMA: null,
      SecretsMB: 0,
    };
    if ((metric.DimensionExhausted['memory'] ?? 0) > 0) entry['MemoryMB'] = Number(entry['MemoryMB']) + Number(resources['MemoryMB'] ?? 300);
    if ((metric.DimensionExhausted['cpu'] ?? 0) > 0) entry['CPU'] = Number(entry['CPU']) + Number(resources['CPU'] ?? 100);
    exhausted[name] = entry;
  }
  metric.ResourcesExhausted = exhausted;
}

/* Datacenter entries are globs since Nomad 1.5 (`*` is the default). */
function inDatacenters(node: FakeNode, datacenters: readonly string[]): boolean {
  return datacenters.some((pattern) => new RegExp(`^${pattern.replace(/[.+?^${}()|[\]\\]/g, '\\$&').replaceAll('*', '.*')}$`).test(node.Datacenter));
}

/* The node values a constraint target such as `${attr.kernel.name}` or `${node.datacenter}` reads. */
function resolveTarget(target: string, node: FakeNode): string | undefined {
  const match = /^\$\{(.+)\}$/.exec(target);
  if (match?.[1] === undefined) return target;
  const path = match[1];
  if (path.startsWith('attr.')) return node.Attributes[path.slice('attr.'.length)];
  if (path.startsWith('meta.')) return node.Meta[path.slice('meta.'.length)];
  switch (path) {
    case 'node.unique.id':
      return node.ID;
    case 'node.unique.name':
      return node.Name;
    case 'node.datacenter':
      return node.Datacenter;
    case 'node.class':
      return node.NodeClass;
    case 'node.pool':
      return node.NodePool;
    default:
      return undefined;
  }
}

/* The operands Poseidon's templates plausibly use (feasible.go checkConstraint); others never match. */
function constraintHolds(constraint: JsonObject, node: FakeNode): boolean {
  const operand = String(constraint['Operand'] ?? '=');
  const left = resolveTarget(String(constraint['LTarget'] ?? ''), node);
  const right = resolveTarget(String(constraint['RTarget'] ?? ''), node);
  switch (operand) {
    case '=':
    case '==':
    case 'is':
      return left !== undefined && left === right;
    case '!=':
    case 'not':
      return left !== right;
    case 'is_set':
      return left !== undefined;
    case 'is_not_set':
      return left === undefined;
    case 'regexp':
      return left !== undefined && right !== undefined && new RegExp(right).test(left);
    case 'set_contains':
      return left !== undefined && (right ?? '').split(',').every((item) => left.split(',').includes(item.trim()));
    default:
      return false;
  }
}

/* structs.Constraint.String(), the key of AllocMetric.ConstraintFiltered. */
function constraintKey(constraint: JsonObject): string {
  return `${String(constraint['LTarget'] ?? '')} ${String(constraint['Operand'] ?? '=')} ${String(constraint['RTarget'] ?? '')}`;
}

export type PlacementResult = { readonly node: FakeNode } | { readonly metric: AllocMetric };

/*
 * Picks a node for one allocation of the group, in the order of Nomad's generic stack: ready nodes of
 * the job's datacenters and node pool, job constraints, drivers, group and task constraints, then
 * room (AllocsFit's order: cpu, memory, disk). Among fitting nodes the emptiest wins, which is what
 * the spread over ${node.unique.name} in Poseidon's template asks for.
 */
export function placeGroup(
  job: JsonObject,
  group: JsonObject,
  nodes: Iterable<FakeNode>,
  used: (nodeId: string) => Usage,
  allocCount: (nodeId: string) => number,
): PlacementResult {
  const pool = String(job['NodePool'] ?? 'default');
  const datacenters = Array.isArray(job['Datacenters']) ? job['Datacenters'].map(String) : ['*'];
  const metric = newMetric(pool);
  const inPool = [...nodes].filter((node) => pool === 'all' || node.NodePool === pool);
  const candidates = inPool.filter((node) => node.Status === 'ready' && node.SchedulingEligibility === 'eligible' && inDatacenters(node, datacenters));
  metric.NodesInPool = candidates.length;
  for (const node of candidates) metric.NodesAvailable[node.Datacenter] = (metric.NodesAvailable[node.Datacenter] ?? 0) + 1;
  const tasks = objectList(group['Tasks']);
  const jobConstraints = objectList(job['Constraints']);
  const groupConstraints = [...objectList(group['Constraints']), ...tasks.flatMap((task) => objectList(task['Constraints']))];
  const drivers = new Set(tasks.map((task) => String(task['Driver'])));
  const need = groupUsage(group);
  let best: FakeNode | undefined;
  for (const node of candidates) {
    metric.NodesEvaluated += 1;
    const failedJobConstraint = jobConstraints.find((constraint) => !constraintHolds(constraint, node));
    if (failedJobConstraint !== undefined) {
      filterNode(metric, node, constraintKey(failedJobConstraint));
      continue;
    }
    if ([...drivers].some((driver) => !node.Drivers.includes(driver))) {
      filterNode(metric, node, 'missing drivers');
      continue;
    }
    const failedGroupConstraint = groupConstraints.find((constraint) => !constraintHolds(constraint, node));
    if (failedGroupConstraint !== undefined) {
      filterNode(metric, node, constraintKey(failedGroupConstraint));
      continue;
    }
    const usage = used(node.ID);
    const dimension =
      usage.cpu + need.cpu > node.CPU
        ? 'cpu'
        : usage.memoryMB + need.memoryMB > node.MemoryMB
          ? 'memory'
          : usage.diskMB + need.diskMB > node.DiskMB
            ? 'disk'
            : '';
    if (dimension !== '') {
      exhaustNode(metric, node, dimension);
      continue;
    }
    if (best === undefined || allocCount(node.ID) < allocCount(best.ID)) best = node;
  }
  if (best !== undefined) return { node: best };
  exhaustResources(metric, group);
  return { metric };
}

/* Nomad's node JSON (GET /v1/node/:id), from the fake's node. */
export function nodeJson(node: FakeNode, httpAddr: string): JsonObject {
  return {
    ID: node.ID,
    Name: node.Name,
    Datacenter: node.Datacenter,
    NodePool: node.NodePool,
    NodeClass: node.NodeClass,
    HTTPAddr: httpAddr,
    TLSEnabled: false,
    Status: node.Status,
    StatusDescription: '',
    SchedulingEligibility: node.SchedulingEligibility,
    Drain: false,
    Attributes: { ...node.Attributes, ...Object.fromEntries(node.Drivers.map((driver) => [`driver.${driver}`, '1'])) },
    Meta: Object.keys(node.Meta).length > 0 ? node.Meta : null,
    NodeResources: {
      Cpu: { CpuShares: node.CPU },
      Memory: { MemoryMB: node.MemoryMB },
      Disk: { DiskMB: node.DiskMB },
      Networks: null,
      Devices: null,
    },
    CreateIndex: 1,
    ModifyIndex: 1,
    StatusUpdatedAt: Math.floor(Date.now() / 1000),
  };
}

// ---- in-place updates ----------------------------------------------------------------------------

const same = (a: unknown, b: unknown): boolean => stableStringify(a ?? null) === stableStringify(b ?? null);
const emptyToNull = (value: unknown): unknown => (value === undefined || (isObject(value) && Object.keys(value).length === 0) ? null : value);

/* networkPortMap: dynamic ports compare without their value. */
function networkKey(networks: unknown): unknown {
  return objectList(networks).map((network) => ({
    Mode: network['Mode'] ?? '',
    MBits: network['MBits'] ?? 0,
    Hostname: network['Hostname'] ?? '',
    DNS: network['DNS'] ?? null,
    CNI: network['CNI'] ?? null,
    Ports: [
      ...objectList(network['ReservedPorts']).map((port) => [port['Label'], port['Value'] ?? 0, port['To'] ?? 0, port['HostNetwork'] ?? '']),
      ...objectList(network['DynamicPorts']).map((port) => [port['Label'], -1, port['To'] ?? 0, port['HostNetwork'] ?? '']),
    ],
  }));
}

/* Job.CombinedTaskMeta: task meta over group meta over job meta. */
function combinedTaskMeta(job: JsonObject, group: JsonObject, task: JsonObject): Record<string, unknown> {
  return {
    ...(isObject(job['Meta']) ? job['Meta'] : {}),
    ...(isObject(group['Meta']) ? group['Meta'] : {}),
    ...(isObject(task['Meta']) ? task['Meta'] : {}),
  };
}

/*
 * Nomad 1.10 scheduler/util.go tasksUpdated: the first change that forces a destructive update of the
 * group's allocations, or undefined when they can be updated in place (new job version, same
 * allocation). Count, constraints, restart and reschedule policies, the group's own meta outside the
 * combined task meta, and any other group are not compared.
 */
export function tasksUpdated(jobA: JsonObject, jobB: JsonObject, groupName: string): string | undefined {
  const a = objectList(jobA['TaskGroups']).find((group) => group['Name'] === groupName);
  const b = objectList(jobB['TaskGroups']).find((group) => group['Name'] === groupName);
  if (a === undefined || b === undefined) return 'task group';
  const tasksA = objectList(a['Tasks']);
  const tasksB = objectList(b['Tasks']);
  if (tasksA.length !== tasksB.length) return 'number of tasks';
  if (!same(a['EphemeralDisk'], b['EphemeralDisk'])) return 'ephemeral disk';
  if (!same(networkKey(a['Networks']), networkKey(b['Networks']))) return 'network';
  if (!same(a['Consul'], b['Consul'])) return 'consul';
  if (!same(a['Volumes'], b['Volumes'])) return 'volume request';
  const renderA = isObject(a['RestartPolicy']) ? a['RestartPolicy']['RenderTemplates'] : undefined;
  const renderB = isObject(b['RestartPolicy']) ? b['RestartPolicy']['RenderTemplates'] : undefined;
  if (Boolean(renderA) !== Boolean(renderB)) return 'group restart render_templates';
  for (const taskA of tasksA) {
    const taskB = tasksB.find((task) => task['Name'] === taskA['Name']);
    if (taskB === undefined) return 'task deleted';
    for (const field of ['Driver', 'User']) if ((taskA[field] ?? '') !== (taskB[field] ?? '')) return `task ${field.toLowerCase()}`;
    for (const field of ['Config', 'Env', 'Artifacts', 'Vault', 'Consul', 'Templates', 'CSIPluginConfig', 'VolumeMounts', 'Identity', 'Identities']) {
      if (!same(emptyToNull(taskA[field]), emptyToNull(taskB[field]))) return `task ${field.toLowerCase()}`;
    }
    if (!same(combinedTaskMeta(jobA, a, taskA), combinedTaskMeta(jobB, b, taskB))) return 'task meta';
    const resourcesA = isObject(taskA['Resources']) ? taskA['Resources'] : {};
    const resourcesB = isObject(taskB['Resources']) ? taskB['Resources'] : {};
    if (!same(networkKey(resourcesA['Networks']), networkKey(resourcesB['Networks']))) return 'task network';
    for (const field of ['CPU', 'Cores', 'MemoryMB', 'MemoryMaxMB', 'Devices', 'NUMA', 'SecretsMB']) {
      if (!same(resourcesA[field] ?? 0, resourcesB[field] ?? 0)) return `task ${field.toLowerCase()}`;
    }
    const logA = isObject(taskA['LogConfig']) ? taskA['LogConfig']['Disabled'] : undefined;
    const logB = isObject(taskB['LogConfig']) ? taskB['LogConfig']['Disabled'] : undefined;
    if (Boolean(logA) !== Boolean(logB)) return 'task log disabled';
    const taskRenderA = isObject(taskA['RestartPolicy']) ? taskA['RestartPolicy']['RenderTemplates'] : undefined;
    const taskRenderB = isObject(taskB['RestartPolicy']) ? taskB['RestartPolicy']['RenderTemplates'] : undefined;
    if (Boolean(taskRenderA) !== Boolean(taskRenderB)) return 'task restart render_templates';
  }
  return undefined;
}
