import { randomUUID } from 'node:crypto';

/*
 * Nomad's server-side defaults and JSON conventions (Nomad 1.10 api/jobs.go, api/tasks.go
 * Canonicalize), applied to a submitted job so that GET /v1/job returns what Nomad would.
 */

export type JsonObject = Record<string, unknown>;

export function isObject(value: unknown): value is JsonObject {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

export function objectList(value: unknown): JsonObject[] {
  return Array.isArray(value) ? value.filter(isObject) : [];
}

export const second = 1_000_000_000;

/* Unix nanoseconds, like Nomad's CreateTime/ModifyTime (beyond 2^53, so the last digits are noise). */
export function nowNs(): number {
  return Date.now() * 1_000_000 + Math.floor(Math.random() * 1_000_000);
}

export function rfc3339(ms: number = Date.now()): string {
  return new Date(ms).toISOString();
}

export const zeroTime = '0001-01-01T00:00:00Z';

export function newId(): string {
  return randomUUID();
}

/*
 * What go-codec sends for a struct tagged `_struct bool \`codec:",omitempty"\`` (structs.Allocation,
 * Evaluation, Port, NetworkResource, AllocatedPortMapping): its fields holding "", 0, false, nil or an
 * empty map or list are left out. One level deep, like the tag; nested structs follow their own tags.
 */
export function omitEmpty(value: JsonObject): JsonObject {
  return Object.fromEntries(
    Object.entries(value).filter(
      ([, field]) =>
        !(
          field === undefined ||
          field === null ||
          field === '' ||
          field === 0 ||
          field === false ||
          (Array.isArray(field) && field.length === 0) ||
          (isObject(field) && Object.keys(field).length === 0)
        ),
    ),
  );
}

/* Empty maps and lists become null, as Go's omitempty-free JSON encoding of nil does after canonicalisation. */
function nullIfEmpty(value: unknown): unknown {
  if (value === undefined || value === null) return null;
  if (Array.isArray(value) && value.length === 0) return null;
  if (isObject(value) && Object.keys(value).length === 0) return null;
  return value;
}

const restartDefaults: Record<string, JsonObject> = {
  batch: { Attempts: 3, Interval: 24 * 3600 * second, Delay: 15 * second, Mode: 'fail', RenderTemplates: false },
  service: { Attempts: 2, Interval: 30 * 60 * second, Delay: 15 * second, Mode: 'fail', RenderTemplates: false },
};
const rescheduleDefaults: Record<string, JsonObject> = {
  batch: { Attempts: 1, Interval: 24 * 3600 * second, Delay: 5 * second, DelayFunction: 'constant', MaxDelay: 0, Unlimited: false },
  service: { Attempts: 0, Interval: 0, Delay: 30 * second, DelayFunction: 'exponential', MaxDelay: 3600 * second, Unlimited: true },
};

export function canonicalizeJob(submitted: JsonObject, namespace: string): JsonObject {
  const type = typeof submitted['Type'] === 'string' ? submitted['Type'] : 'service';
  const policyType = type === 'batch' || type === 'sysbatch' ? 'batch' : 'service';
  const datacenters = Array.isArray(submitted['Datacenters']) && submitted['Datacenters'].length > 0 ? submitted['Datacenters'] : ['*'];
  const groups = objectList(submitted['TaskGroups']).map((group) => {
    const restart = { ...restartDefaults[policyType], ...(isObject(group['RestartPolicy']) ? group['RestartPolicy'] : {}) };
    const tasks = objectList(group['Tasks']).map((task) => ({
      ...task,
      Config: nullIfEmpty(task['Config']),
      Env: nullIfEmpty(task['Env']),
      Meta: nullIfEmpty(task['Meta']),
      Constraints: nullIfEmpty(task['Constraints']),
      Affinities: nullIfEmpty(task['Affinities']),
      Services: nullIfEmpty(task['Services']),
      Templates: nullIfEmpty(task['Templates']),
      Artifacts: nullIfEmpty(task['Artifacts']),
      Leader: task['Leader'] ?? false,
      KillTimeout: task['KillTimeout'] ?? 5 * second,
      KillSignal: task['KillSignal'] ?? '',
      ShutdownDelay: task['ShutdownDelay'] ?? 0,
      Kind: task['Kind'] ?? '',
      User: task['User'] ?? '',
      LogConfig: { MaxFiles: 10, MaxFileSizeMB: 10, Disabled: false, ...(isObject(task['LogConfig']) ? task['LogConfig'] : {}) },
      Resources: {
        CPU: 100,
        Cores: 0,
        MemoryMB: 300,
        MemoryMaxMB: 0,
        DiskMB: null,
        IOPS: null,
        Networks: null,
        Devices: null,
        ...(isObject(task['Resources']) ? task['Resources'] : {}),
      },
      RestartPolicy: restart,
    }));
    return {
      ...group,
      Count: typeof group['Count'] === 'number' ? group['Count'] : 1,
      Meta: nullIfEmpty(group['Meta']),
      Networks: nullIfEmpty(group['Networks']),
      Constraints: nullIfEmpty(group['Constraints']),
      Affinities: nullIfEmpty(group['Affinities']),
      Spreads: nullIfEmpty(group['Spreads']),
      Services: nullIfEmpty(group['Services']),
      Volumes: nullIfEmpty(group['Volumes']),
      EphemeralDisk: { SizeMB: 300, Migrate: false, Sticky: false, ...(isObject(group['EphemeralDisk']) ? group['EphemeralDisk'] : {}) },
      RestartPolicy: restart,
      ReschedulePolicy: { ...rescheduleDefaults[policyType], ...(isObject(group['ReschedulePolicy']) ? group['ReschedulePolicy'] : {}) },
      Tasks: tasks,
    };
  });
  return {
    ...submitted,
    Region: submitted['Region'] ?? 'global',
    Namespace: namespace,
    Name: submitted['Name'] ?? submitted['ID'],
    Type: type,
    Priority: submitted['Priority'] ?? 50,
    AllAtOnce: submitted['AllAtOnce'] ?? false,
    Datacenters: datacenters,
    NodePool: submitted['NodePool'] ?? 'default',
    Constraints: nullIfEmpty(submitted['Constraints']),
    Affinities: nullIfEmpty(submitted['Affinities']),
    Spreads: nullIfEmpty(submitted['Spreads']),
    Meta: nullIfEmpty(submitted['Meta']),
    ParentID: submitted['ParentID'] ?? '',
    Dispatched: false,
    Payload: null,
    TaskGroups: groups,
  };
}

/* What the user controls: the canonical job without server-maintained fields; equal specs mean "no change". */
export const serverJobFields = ['Status', 'StatusDescription', 'Stop', 'Stable', 'Version', 'SubmitTime', 'CreateIndex', 'ModifyIndex', 'JobModifyIndex'];

export function jobSpecKey(job: JsonObject): string {
  const copy: JsonObject = { ...job };
  for (const field of serverJobFields) delete copy[field];
  return stableStringify(copy);
}

export function stableStringify(value: unknown): string {
  if (Array.isArray(value)) return `[${value.map(stableStringify).join(',')}]`;
  if (isObject(value)) {
    return `{${Object.keys(value)
      .sort()
      .map((key) => `${JSON.stringify(key)}:${stableStringify(value[key])}`)
      .join(',')}}`;
  }
  return JSON.stringify(value) ?? 'null';
}

/* Nomad's own validation subset; texts follow Nomad's multi-error format loosely. */
export function validateJob(job: JsonObject): string[] {
  const errors: string[] = [];
  const type = job['Type'];
  if (!['service', 'batch', 'system', 'sysbatch'].includes(String(type))) errors.push(`Invalid job type: "${String(type)}"`);
  const groups = objectList(job['TaskGroups']);
  if (groups.length === 0) errors.push('Missing job task groups');
  const groupNames = new Set<string>();
  for (const group of groups) {
    const name = String(group['Name'] ?? '');
    if (name === '' || groupNames.has(name)) errors.push(`Task group name "${name}" missing or duplicated`);
    groupNames.add(name);
    if (typeof group['Count'] === 'number' && group['Count'] < 0) errors.push(`Task group ${name}: Task group count can't be negative`);
    checkMeta(group['Meta'], `Task group ${name} Meta`, errors);
    const tasks = objectList(group['Tasks']);
    if (tasks.length === 0) errors.push(`Task group ${name}: Missing tasks for task group`);
    for (const task of tasks) {
      if (typeof task['Driver'] !== 'string' || task['Driver'] === '') errors.push(`Task ${String(task['Name'])}: Missing task driver`);
      checkMeta(task['Meta'], `Task ${String(task['Name'])} Meta`, errors);
      const resources = isObject(task['Resources']) ? task['Resources'] : {};
      const memory = Number(resources['MemoryMB'] ?? 300);
      const memoryMax = Number(resources['MemoryMaxMB'] ?? 0);
      if (memoryMax !== 0 && memoryMax < memory)
        errors.push(`Task ${String(task['Name'])}: MemoryMaxMB value (${memoryMax}) should be larger than MemoryMB value (${memory})`);
    }
    for (const [key, value] of [
      ['RestartPolicy', group['RestartPolicy']],
      ['ReschedulePolicy', group['ReschedulePolicy']],
    ] as const) {
      if (!isObject(value)) continue;
      for (const field of ['Delay', 'Interval', 'MaxDelay']) {
        if (value[field] !== undefined && !Number.isInteger(value[field])) errors.push(`${key}.${field} must be integer nanoseconds`);
      }
    }
  }
  checkMeta(job['Meta'], 'Job Meta', errors);
  return errors;
}

function checkMeta(meta: unknown, where: string, errors: string[]): void {
  if (meta === undefined || meta === null) return;
  if (!isObject(meta)) {
    errors.push(`${where} must be a map of strings`);
    return;
  }
  for (const [key, value] of Object.entries(meta)) if (typeof value !== 'string') errors.push(`${where}.${key} must be a string`);
}
