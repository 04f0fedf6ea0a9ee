import { readFileSync } from 'node:fs';
import { z } from 'zod';
import type { NomadConfig } from '../config/schema.js';
import { jobSchema, type NomadJob, type NomadTask, type NomadTaskGroup } from './client/api-types.js';

/*
 * Poseidon's job model: an environment is the job `template-<envId>`, a runner is the job
 * `<envId>-<uuid>` copied from it. Group `default-group` runs `sleep infinity` in the image and
 * every command is exec'ed into it; the never-placed (count 0) group `config` holds Poseidon's
 * persistent state in its Meta, because changing meta of the running group would restart it.
 */

export const templateJobPrefix = 'template';
export const defaultGroupName = 'default-group';
export const defaultTaskName = 'default-task';
export const configGroupName = 'config';
export const configTaskName = 'config';

export const metaUsed = 'used';
export const metaTimeout = 'timeout';
export const metaPoolSize = 'prewarmingPoolSize';

export interface TemplateEnvironment {
  readonly id: number;
  readonly image: string;
  /* Nomad CPU shares in MHz; 0 keeps the template's value. */
  readonly cpuLimit: number;
  /* Hard memory limit in MB (MemoryMaxMB); 0 keeps the template's value. */
  readonly memoryLimit: number;
  readonly prewarmingPoolSize: number;
  readonly networkAccess: boolean;
  readonly exposedPorts: readonly number[];
}

const second = 1_000_000_000; // Nomad's API durations are integer nanoseconds.

export function templateJobId(environmentId: number): string {
  return `${templateJobPrefix}-${environmentId}`;
}

export function isTemplateJobId(jobId: string): boolean {
  const parts = jobId.split('-');
  return parts.length === 2 && parts[0] === templateJobPrefix && /^\d+$/.test(parts[1] ?? '');
}

/* The environment a template or runner job belongs to, or undefined for foreign jobs. */
export function environmentIdOfJob(jobId: string): number | undefined {
  const match = isTemplateJobId(jobId) ? /^template-(\d+)$/.exec(jobId) : /^(\d+)-.+$/.exec(jobId);
  return match?.[1] === undefined ? undefined : Number(match[1]);
}

/* Poseidon's template-environment-job.hcl, as API JSON. */
export function defaultTemplateJob(): NomadJob {
  return {
    ID: 'template-0',
    Name: 'template-0',
    Type: 'batch',
    Datacenters: ['dc1'],
    TaskGroups: [
      {
        Name: defaultGroupName,
        Count: 1,
        EphemeralDisk: { SizeMB: 10, Migrate: false, Sticky: false },
        // biome-ignore lint/suspicious/noTemplateCurlyInString: Nomad interpolates ${node.unique.name}, not JavaScript.
        Spreads: [{ Attribute: '${node.unique.name}', Weight: 100 }],
        RestartPolicy: { Attempts: 3, Delay: 15 * second, Interval: 3600 * second, Mode: 'fail' },
        ReschedulePolicy: {
          Attempts: 3,
          Interval: 6 * 3600 * second,
          Delay: 60 * second,
          MaxDelay: 240 * second,
          DelayFunction: 'exponential',
          Unlimited: false,
        },
        Tasks: [
          {
            Name: defaultTaskName,
            Driver: 'docker',
            KillTimeout: 0,
            KillSignal: 'SIGKILL',
            Config: { image: 'openhpi/co_execenv_python:latest', command: 'sleep', args: ['infinity'], network_mode: 'none', force_pull: false },
            LogConfig: { MaxFiles: 1, MaxFileSizeMB: 1 },
            Resources: { CPU: 40, MemoryMB: 50 },
          },
        ],
      },
      {
        Name: configGroupName,
        Count: 0,
        Meta: { [metaUsed]: 'false', [metaPoolSize]: '0' },
        Tasks: [
          {
            Name: configTaskName,
            Driver: 'exec',
            Config: { command: 'true' },
            LogConfig: { MaxFiles: 1, MaxFileSizeMB: 1 },
            Resources: { CPU: 1, MemoryMB: 10 },
          },
        ],
      },
    ],
  };
}

/* The configured template file (a job, or `{"Job": job}` as `nomad job run -output` prints it), else the default. */
export function loadBaseTemplate(config: NomadConfig): NomadJob {
  if (config.templatejobfile === undefined) return defaultTemplateJob();
  const json: unknown = JSON.parse(readFileSync(config.templatejobfile, 'utf8'));
  const wrapped = z.looseObject({ Job: jobSchema }).safeParse(json);
  return wrapped.success ? wrapped.data.Job : jobSchema.parse(json);
}

/* Builds the template job of an environment from the base template. */
export function buildTemplateJob(base: NomadJob, environment: TemplateEnvironment, config: NomadConfig): NomadJob {
  const job = withIdentity(stripServerFields(clone(base)), templateJobId(environment.id), config.namespace);
  const group = ensureGroup(job, defaultGroupName, 1);
  const task = ensureTask(group, defaultTaskName, 'docker');
  const taskConfig: Record<string, unknown> = { ...(task.Config ?? {}) };
  taskConfig['image'] = environment.image;
  taskConfig['command'] ??= 'sleep';
  taskConfig['args'] ??= ['infinity'];
  // Only the template pulls; runners reuse the image the template's allocation already fetched.
  taskConfig['force_pull'] = !config.disableforcepull;

  const resources = { ...(task.Resources ?? {}) };
  if (environment.cpuLimit > 0) resources.CPU = environment.cpuLimit;
  if (environment.memoryLimit > 0) {
    resources.MemoryMaxMB = environment.memoryLimit;
    // Nomad rejects MemoryMaxMB below the reservation, so a small limit lowers the reservation too.
    if ((resources.MemoryMB ?? 0) > environment.memoryLimit) resources.MemoryMB = environment.memoryLimit;
  }
  task.Resources = resources;

  if (environment.networkAccess) {
    // Docker's network_mode "none" cannot be expressed on the group network (nomad#10540), so it lives in the task config.
    taskConfig['network_mode'] = '';
    group.Networks = [
      {
        Mode: config.network.mode,
        DynamicPorts: environment.exposedPorts.map((port) => ({ Label: String(port), To: port })),
      },
    ];
  } else {
    taskConfig['network_mode'] = 'none';
    group.Networks = [];
  }
  task.Config = taskConfig;

  const configGroup = ensureGroup(job, configGroupName, 0);
  ensureTask(configGroup, configTaskName, 'exec');
  configGroup.Meta = { ...(configGroup.Meta ?? {}), [metaUsed]: 'false', [metaPoolSize]: String(environment.prewarmingPoolSize) };
  return job;
}

/* A runner job is the template under a new ID, with fresh (unused) meta. */
export function deriveRunnerJob(template: NomadJob, runnerId: string, namespace: string): NomadJob {
  const job = withIdentity(stripServerFields(clone(template)), runnerId, namespace);
  const task = findTask(job, defaultGroupName, defaultTaskName);
  if (task?.Config !== undefined && task.Config !== null) task.Config = { ...task.Config, force_pull: false };
  const configGroup = ensureGroup(job, configGroupName, 0);
  configGroup.Meta = { [metaUsed]: 'false' };
  return job;
}

/* The job with its "used" mark and inactivity timeout set; re-registering it leaves the allocation alone. */
export function withRunnerUsage(job: NomadJob, used: boolean, timeoutSeconds: number | undefined): NomadJob {
  const copy = stripServerFields(clone(job));
  const configGroup = ensureGroup(copy, configGroupName, 0);
  const meta: Record<string, string> = { ...(configGroup.Meta ?? {}), [metaUsed]: used ? 'true' : 'false' };
  if (used && timeoutSeconds !== undefined) meta[metaTimeout] = String(timeoutSeconds);
  else delete meta[metaTimeout];
  configGroup.Meta = meta;
  return copy;
}

export interface RunnerUsage {
  readonly used: boolean;
  readonly timeoutSeconds: number | undefined;
}

export function readRunnerUsage(job: NomadJob): RunnerUsage {
  const meta = job.TaskGroups?.find((group) => group.Name === configGroupName)?.Meta ?? {};
  const timeout = Number(meta[metaTimeout]);
  return { used: meta[metaUsed] === 'true', timeoutSeconds: Number.isFinite(timeout) && meta[metaTimeout] !== undefined ? timeout : undefined };
}

/* Rebuilds an environment's settings from its template job (recovery after a restart). */
export function readTemplateEnvironment(job: NomadJob): TemplateEnvironment | undefined {
  const id = isTemplateJobId(job.ID) ? environmentIdOfJob(job.ID) : undefined;
  if (id === undefined) return undefined;
  const group = job.TaskGroups?.find((candidate) => candidate.Name === defaultGroupName);
  const task = group?.Tasks?.find((candidate) => candidate.Name === defaultTaskName);
  const configMeta = job.TaskGroups?.find((candidate) => candidate.Name === configGroupName)?.Meta ?? {};
  const network = group?.Networks?.[0];
  const image = task?.Config?.['image'];
  return {
    id,
    image: typeof image === 'string' ? image : '',
    cpuLimit: task?.Resources?.CPU ?? 0,
    memoryLimit: task?.Resources?.MemoryMaxMB ?? 0,
    prewarmingPoolSize: Number(configMeta[metaPoolSize] ?? '0') || 0,
    networkAccess: network !== undefined,
    exposedPorts: (network?.DynamicPorts ?? []).map((port) => port.To ?? Number(port.Label)).filter((port) => Number.isInteger(port) && port > 0),
  };
}

const serverFields = ['Status', 'StatusDescription', 'Stable', 'Version', 'SubmitTime', 'CreateIndex', 'ModifyIndex', 'JobModifyIndex'] as const;

function stripServerFields(job: NomadJob): NomadJob {
  const copy: Record<string, unknown> = { ...job };
  for (const field of serverFields) delete copy[field];
  return jobSchema.parse(copy);
}

function withIdentity(job: NomadJob, id: string, namespace: string): NomadJob {
  return { ...job, ID: id, Name: id, Namespace: namespace };
}

function clone(job: NomadJob): NomadJob {
  return jobSchema.parse(structuredClone(job));
}

function ensureGroup(job: NomadJob, name: string, count: number): NomadTaskGroup {
  job.TaskGroups ??= [];
  let group = job.TaskGroups.find((candidate) => candidate.Name === name);
  if (group === undefined) {
    group = { Name: name, Count: count, Tasks: [] };
    job.TaskGroups.push(group);
  }
  return group;
}

function ensureTask(group: NomadTaskGroup, name: string, driver: string): NomadTask {
  group.Tasks ??= [];
  let task = group.Tasks.find((candidate) => candidate.Name === name);
  if (task === undefined) {
    task = { Name: name, Driver: driver, Config: driver === 'exec' ? { command: 'true' } : {}, Resources: { CPU: 1, MemoryMB: 10 } };
    group.Tasks.push(task);
  }
  return task;
}

function findTask(job: NomadJob, groupName: string, taskName: string): NomadTask | undefined {
  return job.TaskGroups?.find((group) => group.Name === groupName)?.Tasks?.find((task) => task.Name === taskName);
}
