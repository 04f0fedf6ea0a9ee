import { setTimeout as sleep } from 'node:timers/promises';
import type { Logger } from 'pino';
import { executionEnvironmentSchema, type ExecutionEnvironmentSpec } from '../dto/environment.js';
import type { Allocation, AllocationListStub, NomadJob } from './client/api-types.js';
import { configGroupName, defaultTaskName, readTemplateEnvironment, templateJobId } from './job-template.js';

/* The environment as CodeOcean sent it, kept in the template's config-group meta for an exact round trip. */
export const metaEnvironmentSpec = 'environmentSpec';

/*
 * When the Nomad backend matches its memory to Nomad's jobs: one reconciliation at a time, a request
 * during one runs another afterwards, and a failed one is retried with backoff until it succeeds or
 * the loop is closed. What a reconciliation does is the handler's (it owns the state it repairs).
 */
export class ReconciliationLoop {
  #running: Promise<void> | undefined;
  #again = false;
  #closed = false;

  constructor(
    private readonly reconcile: () => Promise<void>,
    private readonly logger: Logger,
    private readonly hooks: {
      /* Fields for the log line of a successful run. */
      readonly summary: () => Record<string, unknown>;
      /* After the last run of a series. */
      readonly onIdle: () => void;
    },
  ) {}

  get running(): boolean {
    return this.#running !== undefined;
  }

  /* onFirstAttempt is called once the first attempt of this request ended, successful or not. */
  request(reason: string, onFirstAttempt?: () => void): Promise<void> {
    if (this.#running !== undefined) {
      this.#again = true;
      onFirstAttempt?.();
      return this.#running;
    }
    const run = async (): Promise<void> => {
      let attempt = 0;
      do {
        this.#again = false;
        try {
          await this.reconcile();
          attempt = 0;
          this.logger.info({ reason, ...this.hooks.summary() }, 'Nomad state loaded');
          onFirstAttempt?.();
        } catch (error) {
          onFirstAttempt?.();
          attempt += 1;
          const delay = Math.min(30_000, 500 * 2 ** Math.min(attempt, 6));
          this.logger.error({ err: error, reason, retryInMs: delay }, 'loading state from Nomad failed');
          if (this.#closed) return;
          await sleep(delay, undefined, { ref: false });
          this.#again = true;
        }
      } while (this.#again && !this.#closed);
    };
    const promise = run().finally(() => {
      this.#running = undefined;
      this.hooks.onIdle();
    });
    this.#running = promise;
    return promise;
  }

  close(): void {
    this.#closed = true;
  }
}

export function isRunning(allocation: Allocation | AllocationListStub): boolean {
  return allocation.ClientStatus === 'running' && allocation.DesiredStatus === 'run';
}

/*
 * The allocation waits for the Docker driver to pull its image: its last task event is the driver's
 * "Downloading image" (or a slow pull's "Docker image pull progress"), with the task still pending.
 */
export function isPullingImage(allocation: Allocation | AllocationListStub): boolean {
  if (allocation.ClientStatus !== 'pending') return false;
  const last = allocation.TaskStates?.[defaultTaskName]?.Events?.at(-1);
  if (last?.Type !== 'Driver') return false;
  const message = typeof last['DriverMessage'] === 'string' ? last['DriverMessage'] : (last.DisplayMessage ?? '');
  return /^(Downloading image|Docker image pull progress)/.test(message);
}

export function restartsOf(allocation: Allocation | AllocationListStub): number {
  return allocation.TaskStates?.[defaultTaskName]?.Restarts ?? 0;
}

/* The spec CodeOcean sent (from meta), else what the template job itself says. */
export function specOfTemplate(job: NomadJob): ExecutionEnvironmentSpec | undefined {
  const stored = job.TaskGroups?.find((group) => group.Name === configGroupName)?.Meta?.[metaEnvironmentSpec];
  if (stored !== undefined) {
    try {
      const parsed = executionEnvironmentSchema.safeParse(JSON.parse(stored));
      if (parsed.success && templateJobId(parsed.data.id) === job.ID) return parsed.data;
    } catch {
      // Not JSON: fall back to the job's own settings below.
    }
  }
  const environment = readTemplateEnvironment(job);
  return environment === undefined ? undefined : { ...environment, exposedPorts: [...environment.exposedPorts] };
}

/* Runs `work` on every item, at most `limit` at a time; rejects with the first failure once all settled. */
export async function forEachLimited<T>(items: readonly T[], limit: number, work: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  const failures: unknown[] = [];
  await Promise.all(
    Array.from({ length: Math.min(limit, items.length) }, async () => {
      while (next < items.length) {
        const item = items[next] as T;
        next += 1;
        await work(item).catch((error: unknown) => void failures.push(error));
      }
    }),
  );
  if (failures.length > 0) throw failures[0];
}
