import type { Logger } from 'pino';
import { type EnvironmentStatistics, type ExecutionEnvironmentSpec, sameRunnerShape } from '../dto/environment.js';
import type { ContextLogger } from '../monitoring/logger.js';
import { AccessorHandler, type PutOutcome } from '../runner/accessor-handler.js';
import { EnvironmentNotFoundError } from '../runner/errors.js';
import type { ManagedRunner } from '../runner/managed-runner.js';
import type { Runner } from '../runner/runner.js';
import { environmentIdOfRunner } from '../runner/runner-id.js';
import { ExecutionEnvironment, type RunnerFactory } from './execution-environment.js';

/*
 * An AccessorHandler whose environments keep prewarmed pools of runners built by a backend.
 * Subclasses say how runners are built and where environments are stored.
 */
export abstract class PoolingAccessorHandler<R extends ManagedRunner> extends AccessorHandler {
  protected readonly environmentsById = new Map<number, ExecutionEnvironment<R>>();

  constructor(
    protected readonly logger: Logger,
    private readonly refillConcurrency: number,
  ) {
    super();
  }

  protected abstract runnerFactory(): RunnerFactory<R>;
  protected abstract storeEnvironment(spec: ExecutionEnvironmentSpec): Promise<void>;
  protected abstract removeStoredEnvironment(environmentId: number): Promise<void>;

  knowsEnvironment(environmentId: number): boolean {
    return this.environmentsById.has(environmentId);
  }

  ownEnvironments(): ExecutionEnvironmentSpec[] {
    return [...this.environmentsById.values()].map((environment) => environment.spec);
  }

  ownStatistics(): EnvironmentStatistics[] {
    return [...this.environmentsById.values()].map((environment) => environment.statistics());
  }

  ownRunner(runnerId: string): R | undefined {
    const environmentId = environmentIdOfRunner(runnerId);
    if (environmentId === undefined) return undefined;
    const runner = this.environmentsById.get(environmentId)?.usedRunner(runnerId);
    return runner && !runner.destroyed ? runner : undefined;
  }

  protected async claimOwn(environmentId: number, inactivityTimeout: number, log?: ContextLogger): Promise<Runner | undefined> {
    return this.environmentsById.get(environmentId)?.sample(inactivityTimeout, log);
  }

  /* The request's logger, or this backend's for work nobody asked for. */
  protected log(log: ContextLogger | undefined): ContextLogger {
    return log?.child({ backend: this.name }) ?? this.logger;
  }

  protected async returnOwn(runner: Runner, log?: ContextLogger): Promise<void> {
    const environment = this.environmentsById.get(runner.environmentId);
    const managed = environment?.runner(runner.id);
    if (!environment || !managed) return;
    // The runner is gone for every caller as soon as it left the pool; tearing its sandbox or job
    // down takes tens of milliseconds and need not hold up the client.
    environment.remove(managed, 'returned', log).catch((error: unknown) => {
      this.log(log).error({ err: error, runnerId: runner.id, environmentId: runner.environmentId }, 'destroying a returned runner failed');
    });
  }

  protected async putOwnEnvironment(spec: ExecutionEnvironmentSpec, log?: ContextLogger): Promise<PutOutcome> {
    const existing = this.environmentsById.get(spec.id);
    await this.storeEnvironment(spec);
    if (existing && sameRunnerShape(existing.spec, spec)) {
      existing.setPoolSize(spec.prewarmingPoolSize);
      this.log(log).info({ environmentId: spec.id, prewarmingPoolSize: spec.prewarmingPoolSize }, 'environment updated');
      return 'replaced';
    }
    // Any other change makes existing runners stale: Poseidon destroys them too.
    if (existing) void existing.delete('environment replaced', log);
    this.startEnvironment(spec);
    this.log(log).info({ environmentId: spec.id, replaced: Boolean(existing) }, 'environment stored');
    return existing ? 'replaced' : 'created';
  }

  protected async deleteOwnEnvironment(environmentId: number, log?: ContextLogger): Promise<void> {
    const environment = this.environmentsById.get(environmentId);
    if (!environment) throw new EnvironmentNotFoundError(environmentId);
    this.environmentsById.delete(environmentId);
    await this.removeStoredEnvironment(environmentId);
    await environment.delete('environment deleted', log);
    this.log(log).info({ environmentId }, 'environment deleted');
  }

  protected startEnvironment(spec: ExecutionEnvironmentSpec): ExecutionEnvironment<R> {
    const environment = new ExecutionEnvironment(spec, this.runnerFactory(), {
      refillConcurrency: this.refillConcurrency,
      logger: this.logger,
      // Read at each build, so instrument() after start (daemon wiring) still reaches every environment.
      instruments: { runnerBuilt: (...args) => this.instruments.runnerBuilt(...args), nomadCall: (...args) => this.instruments.nomadCall(...args) },
    });
    this.environmentsById.set(spec.id, environment);
    environment.refill();
    return environment;
  }

  protected async shutdownOwn(): Promise<void> {
    const environments = [...this.environmentsById.values()];
    this.environmentsById.clear();
    await Promise.allSettled(environments.map((environment) => environment.delete('shutdown')));
  }
}
