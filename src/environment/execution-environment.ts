import type { Logger } from 'pino';
import type { EnvironmentStatistics, ExecutionEnvironmentSpec } from '../dto/environment.js';
import type { ContextLogger } from '../monitoring/logger.js';
import { type Instruments, noInstruments, secondsSince } from '../monitoring/metrics.js';
import type { ManagedRunner } from '../runner/managed-runner.js';

/* The one thing an environment needs from a backend: a new, ready, idle runner. */
export interface RunnerFactory<R extends ManagedRunner> {
  createRunner(spec: ExecutionEnvironmentSpec): Promise<R>;
}

export interface PoolOptions {
  refillConcurrency: number;
  logger: Logger;
  /* Told about every runner build (its time and whether it failed): metrics and the health check. */
  instruments?: Instruments;
}

const MAX_REFILL_BACKOFF_MS = 30_000;

/*
 * An execution environment and its prewarmed pool. Claims take a ready runner synchronously;
 * building replacements happens in the background so a claim never waits for a sandbox.
 */
export class ExecutionEnvironment<R extends ManagedRunner = ManagedRunner> {
  readonly #idle = new Map<string, R>();
  readonly #used = new Map<string, R>();
  #creating = 0;
  /* Builds and teardowns under way; deleting waits for them so that no sandbox outlives its environment. */
  readonly #pending = new Set<Promise<void>>();
  #failureStreak = 0;
  #retryTimer: NodeJS.Timeout | undefined;
  #deleted = false;
  /* Set when the daemon drains: no new runner is built, the ones there keep serving. */
  #refillStopped = false;
  readonly #logger: Logger;

  constructor(
    public spec: ExecutionEnvironmentSpec,
    private readonly factory: RunnerFactory<R>,
    private readonly options: PoolOptions,
  ) {
    this.#logger = options.logger.child({ environmentId: spec.id });
  }

  get id(): number {
    return this.spec.id;
  }

  /* The requesting client's logger (with its request id) when there is one, else the environment's. */
  #log(log: ContextLogger | undefined): ContextLogger {
    return log?.child({ environmentId: this.spec.id }) ?? this.#logger;
  }

  /* Takes an idle runner, or undefined when the pool is empty. */
  sample(inactivityTimeoutSeconds: number, log?: ContextLogger): R | undefined {
    const next = this.#idle.entries().next();
    if (next.done) {
      this.refill();
      return undefined;
    }
    const [runnerId, runner] = next.value;
    this.#idle.delete(runnerId);
    this.#used.set(runnerId, runner);
    runner.setInactivityTimeout(inactivityTimeoutSeconds, () => {
      this.#logger.info({ runnerId, inactivityTimeout: inactivityTimeoutSeconds }, 'runner inactive: destroying');
      void this.remove(runner, 'inactivity timeout');
    });
    this.#log(log).info({ runnerId, idleRunners: this.#idle.size }, 'runner claimed');
    this.refill();
    return runner;
  }

  runner(runnerId: string): R | undefined {
    return this.#used.get(runnerId) ?? this.#idle.get(runnerId);
  }

  usedRunner(runnerId: string): R | undefined {
    return this.#used.get(runnerId);
  }

  /* Adopts a runner that already exists (recovery after a restart). */
  adopt(runner: R, used: boolean, onExpire?: () => void): void {
    if (used) {
      this.#used.set(runner.id, runner);
      if (onExpire) runner.setInactivityTimeout(runner.inactivityTimeout(), onExpire);
    } else {
      this.#idle.set(runner.id, runner);
    }
  }

  /* Removes and destroys a runner; the pool refills. Destroying twice is harmless. */
  async remove(runner: R, reason: string, log?: ContextLogger): Promise<void> {
    const known = this.#used.delete(runner.id) || this.#idle.delete(runner.id);
    if (known) this.refill();
    const teardown = runner.destroy(reason, log);
    this.#pending.add(teardown);
    try {
      await teardown;
    } finally {
      this.#pending.delete(teardown);
    }
  }

  /* Forgets a runner that its backend already lost (it must not be destroyed again). */
  forget(runnerId: string): boolean {
    const known = this.#used.delete(runnerId) || this.#idle.delete(runnerId);
    if (known) this.refill();
    return known;
  }

  setPoolSize(size: number): void {
    this.spec = { ...this.spec, prewarmingPoolSize: size };
    const surplus = this.#idle.size - size;
    for (const runner of [...this.#idle.values()].slice(0, Math.max(0, surplus))) {
      this.#idle.delete(runner.id);
      void runner.destroy('prewarming pool shrunk');
    }
    this.refill();
  }

  stopRefilling(): void {
    this.#refillStopped = true;
    if (this.#retryTimer) clearTimeout(this.#retryTimer);
    this.#retryTimer = undefined;
  }

  /* Starts as many runner builds as the pool lacks, bounded by the refill concurrency. */
  refill(): void {
    if (this.#deleted || this.#refillStopped || this.#retryTimer) return;
    while (
      this.#idle.size + this.#creating < this.spec.prewarmingPoolSize &&
      this.#creating < this.options.refillConcurrency
    ) {
      this.#creating += 1;
      const build = this.#createOne();
      this.#pending.add(build);
      void build.finally(() => this.#pending.delete(build));
    }
  }

  async #createOne(): Promise<void> {
    const instruments = this.options.instruments ?? noInstruments;
    const started = process.hrtime.bigint();
    try {
      let runner: R;
      try {
        runner = await this.factory.createRunner(this.spec);
      } catch (error) {
        instruments.runnerBuilt(this.spec.id, secondsSince(started), error);
        throw error;
      }
      instruments.runnerBuilt(this.spec.id, secondsSince(started));
      if (this.#deleted || this.#idle.size >= this.spec.prewarmingPoolSize) {
        // The environment was deleted or its pool shrunk while this runner was built.
        await runner.destroy(this.#deleted ? 'environment deleted' : 'prewarming pool already full');
        return;
      }
      this.#failureStreak = 0;
      this.#idle.set(runner.id, runner);
    } catch (error) {
      this.#failureStreak += 1;
      const delay = Math.min(MAX_REFILL_BACKOFF_MS, 250 * 2 ** Math.min(this.#failureStreak, 10));
      this.#logger.error({ err: error, retryInMs: delay }, 'building a runner failed');
      if (!this.#retryTimer && !this.#deleted && !this.#refillStopped) {
        this.#retryTimer = setTimeout(() => {
          this.#retryTimer = undefined;
          this.refill();
        }, delay);
        this.#retryTimer.unref();
      }
    } finally {
      this.#creating -= 1;
    }
    this.refill();
  }

  statistics(): EnvironmentStatistics {
    return {
      id: this.spec.id,
      prewarmingPoolSize: this.spec.prewarmingPoolSize,
      idleRunners: this.#idle.size,
      usedRunners: this.#used.size,
    };
  }

  /* Stops refilling and destroys every runner, idle and used. */
  async delete(reason: string, log?: ContextLogger): Promise<void> {
    this.#deleted = true;
    if (this.#retryTimer) clearTimeout(this.#retryTimer);
    this.#retryTimer = undefined;
    const runners = [...this.#idle.values(), ...this.#used.values()];
    this.#idle.clear();
    this.#used.clear();
    await Promise.allSettled([...runners.map((runner) => runner.destroy(reason, log)), ...this.#pending]);
    this.#log(log).info({ destroyedRunners: runners.length, reason }, 'environment runners destroyed');
  }
}
