import type { Logger } from 'pino';
import { setTimeout as sleep } from 'node:timers/promises';
import { z } from 'zod';
import type { NomadConfig } from '../../config/schema.js';
import {
  allocationListStubSchema,
  allocationSchema,
  evaluationSchema,
  jobDeregisterResponseSchema,
  jobListStubSchema,
  jobRegisterResponseSchema,
  jobSchema,
  type Allocation,
  type AllocationListStub,
  type Evaluation,
  type JobListStub,
  type NomadJob,
} from './api-types.js';
import { NomadError } from './errors.js';
import { EventStreamSubscription, type EventStreamOptions } from './event-stream.js';
import { execInAllocation, type ExecOptions } from './exec.js';
import { NomadHttp, defaultRetryPolicy, type CallObserver, type ConnectionObserver, type RetryPolicy } from './http.js';

export interface ExecutorApiOptions {
  readonly retry?: Partial<RetryPolicy>;
  readonly onCall?: CallObserver;
  readonly onConnections?: ConnectionObserver;
}

export interface RegisterResult {
  readonly evalId: string;
  /* Nomad accepts some settings with a warning and ignores them (e.g. MemoryMaxMB without oversubscription). */
  readonly warnings: string | undefined;
  readonly jobModifyIndex: number | undefined;
}

/*
 * The daemon's only door to Nomad: typed calls for the handful of endpoints Poseidon uses. Every
 * failure is a NomadError (NOMAD_UNREACHABLE or NOMAD_INTERNAL_SERVER_ERROR); reads are retried
 * with backoff, writes are not (a register creates an evaluation each time).
 */
export class ExecutorApi {
  private readonly http: NomadHttp;
  private readonly subscriptions = new Set<EventStreamSubscription>();

  constructor(
    private readonly config: NomadConfig,
    private readonly logger: Logger,
    options: ExecutorApiOptions = {},
  ) {
    this.http = new NomadHttp(config, logger, { ...defaultRetryPolicy, ...options.retry }, options.onCall, options.onConnections);
  }

  async registerJob(job: NomadJob): Promise<RegisterResult> {
    // Nomad registers into the query parameter's namespace whatever the job says; the job says the same, so that it reads back as sent.
    const body = { Job: { ...job, Namespace: this.config.namespace } };
    const response = await this.http.call('POST', '/v1/jobs', { body, schema: jobRegisterResponseSchema });
    if (response.Warnings) this.logger.warn({ jobId: job.ID, warnings: response.Warnings }, 'Nomad registered the job with warnings');
    return { evalId: response.EvalID, warnings: response.Warnings || undefined, jobModifyIndex: response.JobModifyIndex ?? undefined };
  }

  /* Succeeds for a job that does not exist (Nomad >= 1.6 answers 200 with an empty EvalID). */
  async deregisterJob(jobId: string, options: { purge: boolean } = { purge: true }): Promise<{ evalId: string | undefined }> {
    const response = await this.http.call('DELETE', `/v1/job/${encodeURIComponent(jobId)}`, {
      query: { purge: options.purge },
      schema: jobDeregisterResponseSchema,
      idempotent: options.purge,
    });
    return { evalId: response.EvalID || undefined };
  }

  /* Job stubs whose ID starts with `prefix`, sorted by ID like the Go client does. */
  async listJobs(prefix: string): Promise<JobListStub[]> {
    const jobs = await this.http.call('GET', '/v1/jobs', { query: { prefix }, schema: z.array(jobListStubSchema), idempotent: true });
    return jobs.sort((a, b) => (a.ID < b.ID ? -1 : a.ID > b.ID ? 1 : 0));
  }

  /* The full job, or undefined when Nomad does not know it. */
  async getJob(jobId: string): Promise<NomadJob | undefined> {
    return this.http.call('GET', `/v1/job/${encodeURIComponent(jobId)}`, { schema: jobSchema, idempotent: true, notFoundIsUndefined: true });
  }

  /* Allocations of a job, newest (highest CreateIndex) first; [] for an unknown job. */
  async listJobAllocations(jobId: string, options: { all?: boolean } = {}): Promise<AllocationListStub[]> {
    const allocations = await this.http.call('GET', `/v1/job/${encodeURIComponent(jobId)}/allocations`, {
      query: { all: options.all ?? false },
      schema: z.array(allocationListStubSchema),
      idempotent: true,
    });
    return allocations.sort((a, b) => (b.CreateIndex ?? 0) - (a.CreateIndex ?? 0));
  }

  /* Every allocation of the namespace with its allocated resources (ports), newest first: one call for a resync. */
  async listAllocations(): Promise<AllocationListStub[]> {
    const allocations = await this.http.call('GET', '/v1/allocations', {
      query: { resources: true },
      schema: z.array(allocationListStubSchema),
      idempotent: true,
    });
    return allocations.sort((a, b) => (b.CreateIndex ?? 0) - (a.CreateIndex ?? 0));
  }

  async getAllocation(allocationId: string): Promise<Allocation | undefined> {
    return this.http.call('GET', `/v1/allocation/${encodeURIComponent(allocationId)}`, {
      schema: allocationSchema,
      idempotent: true,
      notFoundIsUndefined: true,
    });
  }

  async getEvaluation(evalId: string): Promise<Evaluation | undefined> {
    return this.http.call('GET', `/v1/evaluation/${encodeURIComponent(evalId)}`, { schema: evaluationSchema, idempotent: true, notFoundIsUndefined: true });
  }

  /* Runs argv (no shell is added) in a task of an allocation; resolves with its exit code. */
  async exec(allocationId: string, task: string, command: readonly string[], options: ExecOptions = {}): Promise<number> {
    if (command.length === 0) throw new NomadError('NOMAD_INTERNAL_SERVER_ERROR', 'exec needs a non-empty command', { operation: 'exec' });
    for (let attempt = 1; ; attempt += 1) {
      try {
        // The slot is held for the whole session: each session is a connection of its own.
        return await this.http.execs.run(
          () => execInAllocation(this.http, this.logger, this.config.requesttimeout, allocationId, task, command, options),
          options.signal,
        );
      } catch (error) {
        // A 429 comes before the upgrade, so nothing ran and stdin is untouched: the session may start again.
        if (!(error instanceof NomadError && error.tooManyConnections) || attempt >= this.http.attempts || options.signal?.aborted === true) throw error;
        const delay = this.http.backoff(attempt);
        this.logger.warn({ err: error, attempt, delay, allocationId }, 'Nomad refused an exec session (connection limit), retrying');
        await sleep(delay, undefined, options.signal === undefined ? {} : { signal: options.signal });
      }
    }
  }

  /* Starts a self-reconnecting event stream subscription; close() stops it too. */
  subscribeEvents(options: EventStreamOptions): EventStreamSubscription {
    const subscription = new EventStreamSubscription(this.http, this.logger, options);
    this.subscriptions.add(subscription);
    return subscription;
  }

  async close(): Promise<void> {
    await Promise.all([...this.subscriptions].map((subscription) => subscription.stop()));
    this.subscriptions.clear();
    await this.http.close();
  }
}
