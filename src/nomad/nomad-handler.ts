import type { Logger } from 'pino';
import type { ContextLogger } from '../monitoring/logger.js';
import type { NomadConfig } from '../config/schema.js';
import type { ExecutionEnvironmentSpec } from '../dto/environment.js';
import { EnvironmentPools } from '../environment/environment-pools.js';
import type { ExecutionEnvironment } from '../environment/execution-environment.js';
import { AccessorHandler, type PutOutcome } from '../runner/accessor-handler.js';
import { BackendError } from '../runner/errors.js';
import type { Runner } from '../runner/runner.js';
import { newRunnerId } from '../runner/runner-id.js';
import type { Allocation, AllocationListStub, EventBatch, NomadJob } from './client/api-types.js';
import { EvaluationTracker, evaluationFailure, PlacementError } from './evaluations.js';
import type { EventStreamSubscription } from './client/event-stream.js';
import { ExecutorApi, type ExecutorApiOptions } from './client/executor-api.js';
import { domainErrorOf } from './failures.js';
import {
  buildTemplateJob,
  configGroupName,
  defaultTaskName,
  deriveRunnerJob,
  environmentIdOfJob,
  isTemplateJobId,
  loadBaseTemplate,
  readRunnerUsage,
  templateJobId,
  templateJobPrefix,
  withRunnerUsage,
} from './job-template.js';
import { NomadRunner } from './nomad-runner.js';
import { forEachLimited, isPullingImage, isRunning, metaEnvironmentSpec, ReconciliationLoop, restartsOf, specOfTemplate } from './reconciliation.js';

/* Poseidon's fallback when a used runner's meta lacks its timeout. */
const DEFAULT_USED_TIMEOUT_SECONDS = 60;
/* A resync's Nomad calls in flight: 4 environments × 16 runner jobs stay below nomad.maxconnections' default. */
const RECONCILE_ENVIRONMENTS_AT_ONCE = 4;
const RECONCILE_RUNNERS_AT_ONCE = 16;
const SWEEP_INTERVAL_MS = 1000;

export interface NomadHandlerOptions {
  readonly api?: ExecutorApiOptions;
  /* server.interactivestderr: stderr apart from the executions' terminal, through a FIFO (default). */
  readonly interactiveStderr?: boolean;
  /* runners.claimtimeout: seconds a claim on an empty pool waits for a runner job being started (0: none). */
  readonly claimTimeout?: number;
  /* runners.buildconcurrency: runner jobs started at once over all environments. */
  readonly buildConcurrency?: number;
}

interface Waiter {
  readonly environmentId: number;
  readonly resolve: (allocation: Allocation) => void;
  readonly reject: (error: Error) => void;
}

const terminalClientStatuses = new Set(['failed', 'lost', 'complete']);

/*
 * The Nomad backend: environments are template jobs, runners are jobs derived from them, and Nomad
 * itself is the store (no local file). Runner readiness and loss come from the event stream; any
 * doubt about the stream (reconnect, gap) triggers a full reconciliation with Nomad's job list.
 */
export class NomadAccessorHandler extends AccessorHandler {
  readonly name = 'nomad';
  readonly #logger: Logger;
  protected readonly pools: EnvironmentPools<NomadRunner>;
  readonly #api: ExecutorApi;
  readonly #base: NomadJob;
  readonly #templates = new Map<number, NomadJob>();
  readonly #waiters = new Map<string, Waiter>();
  /* Every live runner by allocation, for routing allocation events. */
  readonly #byAllocation = new Map<string, NomadRunner>();
  /* Runner jobs this process gave up on; a resync purges them instead of adopting them again. */
  readonly #discarded = new Set<string>();
  /* Environments PUT while a resync runs: the resync's older job list must not delete them. */
  readonly #putDuringResync = new Set<number>();
  /* nomad.runnerstarttimeout: how long a new runner may take from registration to a running allocation, image pulls aside. */
  readonly #readinessTimeoutMs: number;
  readonly #evaluations: EvaluationTracker;
  readonly #reconciliation: ReconciliationLoop;
  readonly #interactiveStderr: boolean;
  #subscription: EventStreamSubscription | undefined;
  #everConnected = false;
  #lastSweep = 0;
  /* Allocations seen ending while a resync runs (its allocation snapshot may still show them running). */
  readonly #stoppedDuringResync = new Set<string>();
  #closed = false;

  constructor(
    private readonly config: NomadConfig,
    refillConcurrency: number,
    logger: Logger,
    options: NomadHandlerOptions = {},
  ) {
    super();
    this.#logger = logger.child({ backend: 'nomad' });
    // Every Nomad call is reported (latency, errors) to whatever instruments the daemon attached later.
    this.#api = new ExecutorApi(config, this.#logger, {
      ...options.api,
      onCall: (...args) => this.instruments.nomadCall(...args),
      onConnections: (...args) => this.instruments.nomadConnections?.(...args),
    });
    this.#base = loadBaseTemplate(config);
    this.#readinessTimeoutMs = config.runnerstarttimeout * 1000;
    this.#evaluations = new EvaluationTracker((evalId) => this.#api.getEvaluation(evalId), this.#logger);
    this.pools = new EnvironmentPools({
      runners: { createRunner: (spec) => this.#createRunner(spec) },
      storage: { put: (spec) => this.#storeTemplate(spec), delete: (environmentId) => this.#removeTemplate(environmentId) },
      refillConcurrency,
      ...(options.buildConcurrency === undefined ? {} : { buildConcurrency: options.buildConcurrency }),
      claimTimeoutSeconds: options.claimTimeout ?? 0,
      logger: this.#logger,
      instruments: () => this.instruments,
    });
    this.#reconciliation = new ReconciliationLoop(() => this.#reconcile(), this.#logger, {
      summary: () => ({ environments: this.pools.size }),
      onIdle: () => this.#putDuringResync.clear(),
    });
    this.#interactiveStderr = options.interactiveStderr ?? true;
  }

  /* With Nomad enabled every new environment lives in Nomad; local keeps only those it already stored. */
  acceptsEnvironment(): boolean {
    return this.config.enabled;
  }

  // ---- claims and returns ------------------------------------------------------------------

  /* Takes an idle runner without any Nomad call; the "used" mark is written afterwards. */
  protected async claimOwn(environmentId: number, inactivityTimeout: number, log?: ContextLogger, signal?: AbortSignal): Promise<Runner | undefined> {
    const runner = await this.pools.claim(environmentId, inactivityTimeout, log, signal);
    if (runner === undefined) return undefined;
    /*
     * The runner job is derived from the template again, as it was registered: runners do not keep
     * their job (at 10,000 runners the copies cost more memory than all the rest of them).
     */
    runner.enqueueJobWrite('mark used', async () => {
      const template = this.#templates.get(environmentId);
      // Without its template the environment is gone, and so is the runner's job.
      if (template === undefined) return;
      await this.#api.registerJob(withRunnerUsage(deriveRunnerJob(template, runner.id, this.config.namespace), true, inactivityTimeout));
    });
    return runner;
  }

  protected async returnOwn(runner: Runner, log?: ContextLogger): Promise<void> {
    this.pools.return(runner, log);
  }

  // ---- environments ------------------------------------------------------------------------

  protected async putOwnEnvironment(spec: ExecutionEnvironmentSpec, log?: ContextLogger): Promise<PutOutcome> {
    if (this.#reconciliation.running) this.#putDuringResync.add(spec.id);
    return this.pools.put(spec, log);
  }

  async #storeTemplate(spec: ExecutionEnvironmentSpec): Promise<void> {
    const job = buildTemplateJob(this.#base, spec, this.config);
    const configGroup = job.TaskGroups?.find((group) => group.Name === configGroupName);
    if (configGroup) configGroup.Meta = { ...(configGroup.Meta ?? {}), [metaEnvironmentSpec]: JSON.stringify(spec) };
    const previous = this.#templates.get(spec.id);
    let evalId: string;
    try {
      ({ evalId } = await this.#api.registerJob(job));
    } catch (error) {
      throw domainErrorOf(error);
    }
    // Poseidon fails the PUT when Nomad cannot place the template (its allocation is what runners will look like).
    const failure = await this.#evaluationFailure(evalId, job.ID, spec.id);
    if (failure !== undefined) {
      await this.#revertTemplate(job.ID, previous);
      throw failure;
    }
    this.#templates.set(spec.id, job);
  }

  /* A failed PUT leaves Nomad as it was: a new template goes, an updated one gets its previous version back. */
  async #revertTemplate(jobId: string, previous: NomadJob | undefined): Promise<void> {
    try {
      if (previous === undefined) await this.#api.deregisterJob(jobId, { purge: true });
      else await this.#api.registerJob(previous);
    } catch (error) {
      this.#logger.error({ err: error, jobId }, 'reverting a template job Nomad could not place failed; the next resync reads what Nomad has');
    }
  }

  /*
   * Follows a registration's evaluation: the placement failure (or failed evaluation) it ended with,
   * counted and logged; undefined when everything was placed or Nomad did not finish in time (then
   * the caller goes on, as Poseidon does, and a runner's readiness timeout still applies).
   */
  async #evaluationFailure(evalId: string, jobId: string, environmentId: number): Promise<Error | undefined> {
    const evaluation = await this.#evaluations.settle(evalId);
    if (evaluation === undefined) {
      this.#logger.warn({ evalId, jobId }, 'Nomad did not finish evaluating a registration in time; going on without its result');
      return undefined;
    }
    const failure = evaluationFailure(evaluation, jobId);
    if (failure instanceof PlacementError) {
      this.instruments.placementFailed(environmentId, failure.placementCause);
      this.#logger.warn(
        { evalId, jobId, environmentId, blockedEval: failure.blockedEvaluation, failedTaskGroups: evaluation.FailedTGAllocs },
        'Nomad could not place a job',
      );
    }
    return failure;
  }

  /* Once the template is gone its runner jobs are to go too; a resync purges any this delete misses. */
  async #removeTemplate(environmentId: number): Promise<void> {
    try {
      await this.#api.deregisterJob(templateJobId(environmentId), { purge: true });
    } catch (error) {
      throw domainErrorOf(error);
    }
    this.#templates.delete(environmentId);
    for (const runner of this.#runnersOf(environmentId)) this.#discarded.add(runner.id);
  }

  /* The template goes first (so a failure leaves everything in place), then every runner job. */
  protected async deleteOwnEnvironment(environmentId: number, log?: ContextLogger): Promise<void> {
    await this.pools.delete(environmentId, log);
    // Runner jobs this process does not know (a refill in flight, leftovers of an earlier process).
    try {
      const leftovers = (await this.#api.listJobs(`${environmentId}-`)).filter((stub) => environmentIdOfJob(stub.ID) === environmentId);
      await Promise.all(leftovers.map((stub) => this.#api.deregisterJob(stub.ID, { purge: true })));
    } catch (error) {
      (log ?? this.#logger).warn({ err: error, environmentId }, 'purging leftover runner jobs failed; the next resync retries');
    }
  }

  // ---- runner creation ---------------------------------------------------------------------

  async #createRunner(spec: ExecutionEnvironmentSpec): Promise<NomadRunner> {
    const template = this.#templates.get(spec.id);
    if (this.#closed || template === undefined) throw new BackendError(`environment ${spec.id} has no template job`);
    const id = newRunnerId(spec.id);
    const job = deriveRunnerJob(template, id, this.config.namespace);
    // Waiting starts before the registration, so a running event cannot slip through in between.
    const ready = this.#awaitRunningAllocation(id, spec.id);
    try {
      const { evalId } = await this.#api.registerJob(job);
      // A runner Nomad cannot place fails now with Nomad's reason, not after the readiness timeout.
      void this.#evaluationFailure(evalId, id, spec.id).then((failure) => {
        if (failure !== undefined) this.#waiters.get(id)?.reject(failure);
      });
    } catch (error) {
      this.#waiters.get(id)?.reject(domainErrorOf(error));
      await ready.catch(() => undefined);
      throw domainErrorOf(error);
    }
    let allocation: Allocation;
    try {
      allocation = await ready;
    } catch (error) {
      this.#discarded.add(id);
      void this.#api.deregisterJob(id, { purge: true }).catch((purgeError: unknown) => {
        this.#logger.warn({ err: purgeError, runnerId: id }, 'purging a runner job that never ran failed');
      });
      throw error;
    }
    const runner = this.#newRunner(id, spec.id, allocation);
    this.#logger.info({ runnerId: id, environmentId: spec.id, allocationId: allocation.ID }, 'runner ready');
    return runner;
  }

  #awaitRunningAllocation(jobId: string, environmentId: number): Promise<Allocation> {
    return new Promise<Allocation>((resolve, reject) => {
      let timer: NodeJS.Timeout | undefined;
      const arm = (): void => {
        timer = setTimeout(() => {
          void this.#checkWaiter(jobId).then((state) => {
            if (state === 'running' || !this.#waiters.has(jobId)) return;
            if (state === 'pulling') {
              // Nomad bounds a pull itself (image_pull_timeout, pull activity timeout) and fails the task if it stalls.
              this.#logger.info({ runnerId: jobId, environmentId }, 'runner still pulling its image: waiting another runnerstarttimeout');
              arm();
              return;
            }
            const seconds = this.#readinessTimeoutMs / 1000;
            this.#waiters
              .get(jobId)
              ?.reject(new BackendError(`runner ${jobId} did not start within ${seconds} s (nomad.runnerstarttimeout)`, 'backend-failed'));
          });
        }, this.#readinessTimeoutMs);
        timer.unref();
      };
      arm();
      const settle = (): void => {
        clearTimeout(timer);
        this.#waiters.delete(jobId);
      };
      this.#waiters.set(jobId, {
        environmentId,
        resolve: (allocation) => {
          settle();
          resolve(allocation);
        },
        reject: (error) => {
          settle();
          reject(error);
        },
      });
    });
  }

  /* Asks Nomad directly whether a waited-for runner already runs, or still pulls its image (after a gap, or at the timeout). */
  async #checkWaiter(jobId: string): Promise<'running' | 'pulling' | 'waiting'> {
    try {
      const allocations = await this.#api.listJobAllocations(jobId);
      const running = allocations.find(isRunning);
      const allocation = running === undefined ? undefined : await this.#api.getAllocation(running.ID);
      if (allocation === undefined || !isRunning(allocation)) return allocations.some(isPullingImage) ? 'pulling' : 'waiting';
      this.#waiters.get(jobId)?.resolve(allocation);
      return 'running';
    } catch (error) {
      this.#logger.warn({ err: error, runnerId: jobId }, 'checking a starting runner failed');
      return 'waiting';
    }
  }

  #newRunner(id: string, environmentId: number, allocation: Allocation | AllocationListStub): NomadRunner {
    const runner = new NomadRunner(
      {
        id,
        environmentId,
        allocationId: allocation.ID,
        ports: allocation.AllocatedResources?.Shared?.Ports ?? [],
        restarts: restartsOf(allocation),
      },
      this.#api,
      this.#logger,
      (gone, reason) => this.#lose(gone, reason),
      this.#interactiveStderr,
    );
    this.#byAllocation.set(allocation.ID, runner);
    return runner;
  }

  /* A runner whose allocation broke: it answers 410 from now on and the pool refills. */
  #lose(runner: NomadRunner, reason: string): void {
    this.#byAllocation.delete(runner.allocationId);
    this.#discarded.add(runner.id);
    runner.markLost(reason);
    this.pools.get(runner.environmentId)?.forget(runner.id);
  }

  #runnersOf(environmentId: number): NomadRunner[] {
    return [...this.#byAllocation.values()].filter((runner) => runner.environmentId === environmentId);
  }

  // ---- events ------------------------------------------------------------------------------

  #onEvents(batch: EventBatch): void {
    for (const event of batch.events) {
      if (event.kind === 'allocation') this.#onAllocation(event.allocation);
      else if (event.kind === 'evaluation' && environmentIdOfJob(event.evaluation.JobID ?? '') !== undefined) this.#evaluations.observe(event.evaluation);
      else if (event.kind === 'job' && event.Type === 'JobDeregistered') this.#onJobDeregistered(event.job.ID);
    }
    // Destroyed runners (returned, expired) produce no allocation events after a purge. Swept at most
    // once a second: a pass over 10,000 runners per batch made an event storm block claims.
    const now = Date.now();
    if (now - this.#lastSweep < SWEEP_INTERVAL_MS) return;
    this.#lastSweep = now;
    for (const [allocationId, runner] of this.#byAllocation) if (runner.destroyed) this.#byAllocation.delete(allocationId);
  }

  #onAllocation(allocation: Allocation): void {
    if (isTemplateJobId(allocation.JobID)) return;
    // A resync adopts from a snapshot of allocations: one that ended since must not be adopted.
    if (this.#reconciliation.running && !isRunning(allocation)) this.#stoppedDuringResync.add(allocation.ID);
    const waiter = this.#waiters.get(allocation.JobID);
    if (waiter !== undefined) {
      if (isRunning(allocation)) waiter.resolve(allocation);
      else if (terminalClientStatuses.has(allocation.ClientStatus) || allocation.DesiredStatus !== 'run') {
        waiter.reject(
          new BackendError(`runner ${allocation.JobID} failed to start: ${allocation.ClientDescription ?? allocation.ClientStatus}`, 'backend-failed'),
        );
      }
    }
    const runner = this.#byAllocation.get(allocation.ID);
    if (runner !== undefined && !runner.destroyed) {
      const state = allocation.TaskStates?.[defaultTaskName];
      if ((state?.Restarts ?? 0) > runner.restarts) {
        // A restarted container lost its workspace and processes: Poseidon drops such runners too.
        const oom = (state?.Events ?? []).some((event) => event.Details?.['oom_killed'] === 'true');
        if (oom) runner.markOomKilled();
        this.#lose(runner, oom ? 'allocation OOM killed' : 'task restarted');
      } else if (terminalClientStatuses.has(allocation.ClientStatus) || allocation.DesiredStatus !== 'run') {
        this.#lose(runner, `allocation ${allocation.ClientStatus}/${allocation.DesiredStatus}`);
      }
      return;
    }
    const previous = allocation.PreviousAllocation ? this.#byAllocation.get(allocation.PreviousAllocation) : undefined;
    if (previous !== undefined && !previous.destroyed) this.#lose(previous, 'allocation rescheduled');
  }

  #onJobDeregistered(jobId: string): void {
    const environmentId = environmentIdOfJob(jobId);
    if (environmentId === undefined || isTemplateJobId(jobId)) return;
    const runner = this.pools.get(environmentId)?.runner(jobId);
    if (runner !== undefined && !runner.destroyed) this.#lose(runner, 'job deregistered');
  }

  // ---- recovery ----------------------------------------------------------------------------

  protected async loadOwn(): Promise<void> {
    if (!this.config.enabled) return;
    // Subscribe first, so that nothing happening during the initial load goes unseen.
    this.#subscription ??= this.#api.subscribeEvents({
      onEvents: (batch) => this.#onEvents(batch),
      onGap: () => {
        this.#evaluations.recheck();
        return this.#reconciliation.request('event gap');
      },
      onConnected: () => {
        // Poseidon reloads after every lost stream; a reconnect may have missed events between buffers.
        if (this.#everConnected) {
          this.#evaluations.recheck();
          void this.#reconciliation.request('event stream reconnected');
        }
        this.#everConnected = true;
      },
    });
    // The daemon starts after the first attempt even when Nomad is down; later attempts run in the background.
    await new Promise<void>((resolve) => void this.#reconciliation.request('start', resolve));
  }

  /* Makes the in-memory environments and runners match Nomad's jobs, without double-counting. */
  async #reconcile(): Promise<void> {
    const templates = (await this.#api.listJobs(templateJobPrefix)).filter((stub) => isTemplateJobId(stub.ID) && stub.Status !== 'dead');
    this.#stoppedDuringResync.clear();
    // One call for every allocation instead of two per runner job: the running ones are adopted from it.
    const runningByJob = new Map<string, AllocationListStub>();
    for (const allocation of await this.#api.listAllocations()) {
      if (isRunning(allocation) && !runningByJob.has(allocation.JobID)) runningByJob.set(allocation.JobID, allocation);
    }
    const inNomad = new Set<number>();
    // Environments, and the runners of each, a few at a time: thousands of runner jobs in sequence took minutes.
    await forEachLimited(templates, RECONCILE_ENVIRONMENTS_AT_ONCE, async (stub) => {
      const job = await this.#api.getJob(stub.ID);
      const spec = job === undefined ? undefined : specOfTemplate(job);
      if (job === undefined || spec === undefined || this.#closed) return;
      inNomad.add(spec.id);
      let environment = this.pools.get(spec.id);
      if (environment === undefined) {
        this.#templates.set(spec.id, job);
        // Not filling yet: the runners Nomad still runs are adopted first.
        environment = this.pools.add(spec);
      }
      await this.#reconcileRunners(environment, runningByJob);
      environment.refill();
    });
    for (const [environmentId] of this.pools.entries()) {
      if (inNomad.has(environmentId) || this.#putDuringResync.has(environmentId)) continue;
      this.#logger.warn({ environmentId }, 'template job vanished from Nomad: environment removed');
      this.#templates.delete(environmentId);
      await this.pools.discard(environmentId, 'template job gone');
    }
    // Runners that started while events were missed.
    await Promise.all([...this.#waiters.keys()].map((jobId) => this.#checkWaiter(jobId)));
  }

  /*
   * `snapshot`: the running allocation of each job when the resync began. Only trusted for what it
   * shows running (and not seen ending since); a job without one there is asked about again, since
   * its allocation may have started meanwhile.
   */
  async #reconcileRunners(environment: ExecutionEnvironment<NomadRunner>, snapshot: ReadonlyMap<string, AllocationListStub>): Promise<void> {
    const environmentId = environment.id;
    // Runners created after this snapshot are not in the job list below and must not look lost.
    const before = new Set(this.#runnersOf(environmentId));
    const jobs = (await this.#api.listJobs(`${environmentId}-`)).filter((stub) => environmentIdOfJob(stub.ID) === environmentId && !isTemplateJobId(stub.ID));
    const alive = new Set<string>();
    const knownById = new Map([...before].map((runner) => [runner.id, runner]));
    // Built once per environment: looking each job up among all runners was quadratic at 10,000 runners.
    const runnerIds = new Set([...this.#byAllocation.values()].map((runner) => runner.id));
    await forEachLimited(jobs, RECONCILE_RUNNERS_AT_ONCE, async (stub) => {
      if (this.#waiters.has(stub.ID)) return;
      if (this.#discarded.has(stub.ID) || stub.Status === 'dead') {
        await this.#api.deregisterJob(stub.ID, { purge: true });
        return;
      }
      const snapshotted = snapshot.get(stub.ID);
      const running =
        snapshotted !== undefined && !this.#stoppedDuringResync.has(snapshotted.ID)
          ? snapshotted
          : (await this.#api.listJobAllocations(stub.ID)).find(isRunning);
      const known = knownById.get(stub.ID);
      if (known !== undefined) {
        if (running?.ID === known.allocationId && !known.destroyed) alive.add(known.id);
        return;
      }
      if (running === undefined || runnerIds.has(stub.ID)) {
        // Not running (still starting for a previous process, or broken): the pool builds a fresh one instead.
        if (running === undefined) {
          this.#discarded.add(stub.ID);
          await this.#api.deregisterJob(stub.ID, { purge: true });
        }
        return;
      }
      const job = await this.#api.getJob(stub.ID);
      if (job === undefined || this.#stoppedDuringResync.has(running.ID)) return;
      this.#adopt(environment, job, running);
      alive.add(stub.ID);
    });
    for (const runner of before) {
      if (!alive.has(runner.id) && !runner.destroyed) this.#lose(runner, 'no running allocation in Nomad');
    }
    const listed = new Set(jobs.map((stub) => stub.ID));
    for (const id of this.#discarded) if (environmentIdOfJob(id) === environmentId && !listed.has(id)) this.#discarded.delete(id);
  }

  #adopt(environment: ExecutionEnvironment<NomadRunner>, job: NomadJob, allocation: Allocation | AllocationListStub): void {
    const runner = this.#newRunner(job.ID, environment.id, allocation);
    const usage = readRunnerUsage(job);
    if (usage.used) {
      // Activity times are not persisted (that would cost a Nomad call per request): the full timeout restarts.
      runner.setInactivityTimeout(usage.timeoutSeconds ?? DEFAULT_USED_TIMEOUT_SECONDS, () => undefined);
      environment.adopt(runner, true, () => {
        this.#logger.info({ runnerId: runner.id, environmentId: environment.id }, 'recovered runner inactive: destroying');
        void environment.remove(runner, 'inactivity timeout');
      });
    } else {
      environment.adopt(runner, false);
    }
    this.#logger.info({ runnerId: runner.id, environmentId: environment.id, used: usage.used }, 'runner recovered');
  }

  /* Runners and jobs stay in Nomad, so that the next start recovers them with the same ids. */
  protected override enterLameDuckOwn(): void {
    this.pools.stopRefilling();
  }

  protected async shutdownOwn(): Promise<void> {
    this.#closed = true;
    this.#reconciliation.close();
    for (const waiter of [...this.#waiters.values()]) waiter.reject(new BackendError('daemon shutting down'));
    this.#evaluations.close();
    this.pools.release();
    await this.#api.close();
  }
}
