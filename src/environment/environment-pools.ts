import type { Logger } from 'pino';
import { type EnvironmentStatistics, type ExecutionEnvironmentSpec, sameRunnerShape } from '../dto/environment.js';
import type { ContextLogger } from '../monitoring/logger.js';
import { type Instruments, noInstruments } from '../monitoring/metrics.js';
import type { PutOutcome } from '../runner/accessor-handler.js';
import { EnvironmentNotFoundError } from '../runner/errors.js';
import type { ManagedRunner } from '../runner/managed-runner.js';
import type { Runner } from '../runner/runner.js';
import { environmentIdOfRunner } from '../runner/runner-id.js';
import { BuildSlots } from './build-slots.js';
import { ExecutionEnvironment, type RunnerFactory } from './execution-environment.js';

/* Where a backend keeps its environments (a local file, Nomad template jobs). */
export interface EnvironmentStorage {
  put(spec: ExecutionEnvironmentSpec): Promise<void>;
  delete(environmentId: number): Promise<void>;
}

export interface EnvironmentPoolsOptions<R extends ManagedRunner> {
  readonly runners: RunnerFactory<R>;
  readonly storage: EnvironmentStorage;
  readonly refillConcurrency: number;
  /* runners.buildconcurrency: builds at once over all environments (a burst may use them all); unset, no shared bound. */
  readonly buildConcurrency?: number;
  readonly logger: Logger;
  /*
   * runners.claimtimeout: how long a claim on an empty pool waits for a runner under construction
   * (seconds). Unset, claims answer at once, as Poseidon's do.
   */
  readonly claimTimeoutSeconds?: number;
  /* Read at each build, so instrumenting the chain after start (daemon wiring) reaches every environment. */
  readonly instruments?: () => Instruments;
}

/*
 * One backend's environments, each with its prewarmed pool: what a handler answers for itself in the
 * chain. A handler owns one and delegates to it; what differs between backends (how runners are
 * built, where environments are stored) comes in as strategies, not as overridden methods.
 */
export class EnvironmentPools<R extends ManagedRunner> {
  readonly #byId = new Map<number, ExecutionEnvironment<R>>();
  readonly #options: EnvironmentPoolsOptions<R>;
  readonly #changes = new Map<number, Promise<void>>();
  /* Set when the daemon drains: no pool builds runners any more, new environments included. */
  #refillStopped = false;
  readonly #slots: BuildSlots | undefined;

  constructor(options: EnvironmentPoolsOptions<R>) {
    this.#options = options;
    this.#slots = options.buildConcurrency === undefined ? undefined : new BuildSlots(options.buildConcurrency);
  }

  get size(): number {
    return this.#byId.size;
  }

  has(environmentId: number): boolean {
    return this.#byId.has(environmentId);
  }

  get(environmentId: number): ExecutionEnvironment<R> | undefined {
    return this.#byId.get(environmentId);
  }

  /* The live map's entries: a recovery loop sees environments added or deleted while it awaits. */
  entries(): IterableIterator<[number, ExecutionEnvironment<R>]> {
    return this.#byId.entries();
  }

  specs(): ExecutionEnvironmentSpec[] {
    return [...this.#byId.values()].map((environment) => environment.spec);
  }

  statistics(): EnvironmentStatistics[] {
    return [...this.#byId.values()].map((environment) => environment.statistics());
  }

  /* A claimed runner that is still alive; idle runners are nobody's to address. */
  usedRunner(runnerId: string): R | undefined {
    const environmentId = environmentIdOfRunner(runnerId);
    if (environmentId === undefined) return undefined;
    const runner = this.#byId.get(environmentId)?.usedRunner(runnerId);
    return runner && !runner.destroyed ? runner : undefined;
  }

  /*
   * An idle runner, or the next one built within runners.claimtimeout; undefined when the environment
   * is unknown or none came. `signal` is the client's: aborted, the claim stops waiting.
   */
  async claim(environmentId: number, inactivityTimeout: number, log?: ContextLogger, signal?: AbortSignal): Promise<R | undefined> {
    const environment = this.#byId.get(environmentId);
    if (!environment) return undefined;
    return environment.claim(inactivityTimeout, { timeoutSeconds: this.#options.claimTimeoutSeconds ?? 0, signal }, log);
  }

  /* The request's logger, so what it causes carries its id; the backend's for work nobody asked for. */
  #log(log: ContextLogger | undefined): ContextLogger {
    return log ?? this.#options.logger;
  }

  return(runner: Runner, log?: ContextLogger): void {
    const environment = this.#byId.get(runner.environmentId);
    const managed = environment?.runner(runner.id);
    if (!environment || !managed) return;
    // The runner is gone for every caller as soon as it left the pool; tearing its sandbox or job
    // down takes tens of milliseconds and need not hold up the client.
    environment.remove(managed, 'returned', log).catch((error: unknown) => {
      this.#log(log).error({ err: error, runnerId: runner.id, environmentId: runner.environmentId }, 'destroying a returned runner failed');
    });
  }

  /* Forgets a runner its backend lost (it must not be destroyed again); true when it was in a pool. */
  forget(runnerId: string): boolean {
    const environmentId = environmentIdOfRunner(runnerId);
    return environmentId !== undefined && (this.#byId.get(environmentId)?.forget(runnerId) ?? false);
  }

  /*
   * Changes of one environment run one after the other: a PUT arriving while a DELETE of the same
   * environment is being stored waits for it, so memory and storage never end up disagreeing.
   */
  #serialised<T>(environmentId: number, change: () => Promise<T>): Promise<T> {
    const previous = this.#changes.get(environmentId) ?? Promise.resolve();
    const result = previous.then(change, change);
    const settled = result.then(
      () => undefined,
      () => undefined,
    );
    this.#changes.set(environmentId, settled);
    void settled.then(() => {
      if (this.#changes.get(environmentId) === settled) this.#changes.delete(environmentId);
    });
    return result;
  }

  put(spec: ExecutionEnvironmentSpec, log?: ContextLogger): Promise<PutOutcome> {
    return this.#serialised(spec.id, () => this.#put(spec, log));
  }

  async #put(spec: ExecutionEnvironmentSpec, log?: ContextLogger): Promise<PutOutcome> {
    const logger = this.#log(log);
    const existing = this.#byId.get(spec.id);
    await this.#options.storage.put(spec);
    if (existing && sameRunnerShape(existing.spec, spec)) {
      existing.setPoolSize(spec.prewarmingPoolSize);
      logger.info({ environmentId: spec.id, prewarmingPoolSize: spec.prewarmingPoolSize }, 'environment updated');
      return 'replaced';
    }
    // Any other change makes existing runners stale: Poseidon destroys them too.
    if (existing) void existing.delete('environment replaced', log);
    this.start(spec);
    logger.info({ environmentId: spec.id, replaced: Boolean(existing) }, 'environment stored');
    return existing ? 'replaced' : 'created';
  }

  /*
   * Removes the environment from the storage, then from the pools, then destroys all its runners:
   * a failed removal leaves everything in place (the storage is the truth a restart or resync reads
   * back), and changes to one environment run one after another, so nothing slips in between.
   */
  delete(environmentId: number, log?: ContextLogger): Promise<void> {
    return this.#serialised(environmentId, () => this.#delete(environmentId, log));
  }

  async #delete(environmentId: number, log?: ContextLogger): Promise<void> {
    const environment = this.#byId.get(environmentId);
    if (!environment) throw new EnvironmentNotFoundError(environmentId);
    await this.#options.storage.delete(environmentId);
    if (this.#byId.get(environmentId) === environment) this.#byId.delete(environmentId);
    await environment.delete('environment deleted', log);
    this.#log(log).info({ environmentId }, 'environment deleted');
  }

  /* An environment that is already stored, with its pool filling. */
  start(spec: ExecutionEnvironmentSpec): ExecutionEnvironment<R> {
    const environment = this.add(spec);
    environment.refill();
    return environment;
  }

  /* An environment that is already stored, not yet filling: recovery adopts its runners first. */
  add(spec: ExecutionEnvironmentSpec): ExecutionEnvironment<R> {
    const { runners, refillConcurrency, logger } = this.#options;
    const instruments = this.#options.instruments ?? (() => noInstruments);
    const environment = new ExecutionEnvironment(spec, runners, {
      refillConcurrency,
      ...(this.#slots === undefined ? {} : { slots: this.#slots }),
      logger,
      instruments: {
        runnerBuilt: (...args) => instruments().runnerBuilt(...args),
        nomadCall: (...args) => instruments().nomadCall(...args),
        claimWaited: (...args) => instruments().claimWaited(...args),
        placementFailed: (...args) => instruments().placementFailed(...args),
      },
    });
    // An environment stored while draining is kept for the next start, but builds nothing now.
    if (this.#refillStopped) environment.stopRefilling();
    this.#byId.set(spec.id, environment);
    return environment;
  }

  /* The drain before a shutdown: runners in use keep serving, but no pool refills. */
  stopRefilling(): void {
    this.#refillStopped = true;
    for (const environment of this.#byId.values()) environment.stopRefilling();
  }

  /* Drops an environment whose storage vanished underneath it, destroying its runners. */
  async discard(environmentId: number, reason: string): Promise<void> {
    const environment = this.#byId.get(environmentId);
    if (!environment) return;
    this.#byId.delete(environmentId);
    await environment.delete(reason);
  }

  /* Destroys every runner; environments stay stored. */
  async shutdown(): Promise<void> {
    const environments = [...this.#byId.values()];
    this.#byId.clear();
    await Promise.allSettled(environments.map((environment) => environment.delete('shutdown')));
  }

  /* Lets go of every environment without destroying a runner (they outlive the process in Nomad). */
  release(): void {
    this.#byId.clear();
  }
}
