import type { Logger } from 'pino';
import type { EnvironmentStatistics, ExecutionEnvironmentSpec } from '../dto/environment.js';
import type { ContextLogger } from '../monitoring/logger.js';
import { type ClaimWaitOutcome, type Instruments, noInstruments, secondsSince } from '../monitoring/metrics.js';
import type { ManagedRunner } from '../runner/managed-runner.js';
import type { BuildSlots } from './build-slots.js';

/* The one thing an environment needs from a backend: a new, ready, idle runner. */
export interface RunnerFactory<R extends ManagedRunner> {
  createRunner(spec: ExecutionEnvironmentSpec): Promise<R>;
  /*
   * False while the backend cannot build yet (the local backend pulls the environment's image): the
   * pool builds nothing and claims answer at once; the backend calls refill() when it can.
   */
  canBuild?(spec: ExecutionEnvironmentSpec): boolean;
}

export interface PoolOptions {
  /* Builds at once while only topping up the pool; with claims waiting, any free slot is used. */
  refillConcurrency: number;
  /* The backend's builds over all its environments; without, each environment stays within refillConcurrency. */
  slots?: BuildSlots;
  logger: Logger;
  /* Told about every runner build (its time and whether it failed): metrics and the health check. */
  instruments?: Instruments;
}

/* How long a claim on an empty pool waits for a runner under construction, and who may call it off. */
export interface ClaimWait {
  /* Seconds (fractions allowed); 0 answers at once, as Poseidon does. */
  timeoutSeconds: number;
  /* Aborted when the client went away: the waiter leaves the queue, so no runner is handed to nobody. */
  signal?: AbortSignal;
}

/* A claim waiting for the next ready runner; `settle` ends the wait with a runner or with none. */
interface Waiter<R> {
  readonly inactivityTimeout: number;
  readonly log: ContextLogger | undefined;
  settle(runner: R | undefined, outcome: ClaimWaitOutcome): void;
}

const MAX_REFILL_BACKOFF_MS = 30_000;

/*
 * An execution environment and its prewarmed pool. Claims take a ready runner synchronously;
 * building replacements happens in the background. Only when the pool is empty while runners are
 * being built does a claim wait (bounded by runners.claimtimeout) for the next one, first come
 * first served, instead of answering NOMAD_OVERLOAD at once to a burst the pool is about to serve.
 */
export class ExecutionEnvironment<R extends ManagedRunner = ManagedRunner> {
  readonly #idle = new Map<string, R>();
  readonly #used = new Map<string, R>();
  /* Claims waiting for a runner under construction, oldest first: a ready runner goes to the head. */
  readonly #waiters: Waiter<R>[] = [];
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
    this.#use(runner, inactivityTimeoutSeconds, log);
    return runner;
  }

  /*
   * An idle runner, or else the next one built if it is ready within `wait.timeoutSeconds`; undefined
   * when none came (or the environment went away, or the client did). Waiting only makes sense while
   * a build is under way: with refill stopped, the environment deleted, a pool size of 0 or builds
   * backing off after failures, nothing will come, and the client hears so at once.
   */
  async claim(inactivityTimeoutSeconds: number, wait: ClaimWait, log?: ContextLogger): Promise<R | undefined> {
    const runner = this.sample(inactivityTimeoutSeconds, log);
    // A pool of size 0 builds nothing ahead (Poseidon answers at once); waiting would make it build on demand.
    if (runner || wait.timeoutSeconds <= 0 || this.spec.prewarmingPoolSize === 0 || wait.signal?.aborted) return runner;
    let resolve: (runner: R | undefined) => void = () => undefined;
    const promise = new Promise<R | undefined>((settle) => (resolve = settle));
    const started = process.hrtime.bigint();
    let timer: NodeJS.Timeout | undefined;
    const onAbort = (): void => waiter.settle(undefined, 'cancelled');
    const waiter: Waiter<R> = {
      inactivityTimeout: inactivityTimeoutSeconds,
      log,
      settle: (served, outcome) => {
        const index = this.#waiters.indexOf(waiter);
        if (index === -1) return;
        this.#waiters.splice(index, 1);
        clearTimeout(timer);
        wait.signal?.removeEventListener('abort', onAbort);
        const seconds = secondsSince(started);
        (this.options.instruments ?? noInstruments).claimWaited(this.spec.id, seconds, outcome);
        if (outcome === 'timeout') {
          this.#log(log).warn(
            { waitedSeconds: seconds, claimTimeout: wait.timeoutSeconds, waitingClaims: this.#waiters.length },
            'claim wait timed out: no runner became ready',
          );
        }
        resolve(served);
      },
    };
    this.#waiters.push(waiter);
    // Demand-aware: the waiter raises the refill target, so a build starts for it if concurrency allows.
    this.refill();
    if (this.#creating === 0 && !this.options.slots?.waiting(this)) {
      // Nothing is being built, so nothing will come: Poseidon's answer at once, and no wait to count.
      this.#waiters.splice(this.#waiters.indexOf(waiter), 1);
      return undefined;
    }
    // Not unref'd: the wait is bounded (runners.claimtimeout) and a shutdown dismisses it anyway.
    timer = setTimeout(() => waiter.settle(undefined, 'timeout'), wait.timeoutSeconds * 1000);
    wait.signal?.addEventListener('abort', onAbort, { once: true });
    return promise;
  }

  /* Marks a runner as claimed: used, with its inactivity timeout running. */
  #use(runner: R, inactivityTimeoutSeconds: number, log: ContextLogger | undefined): void {
    const runnerId = runner.id;
    this.#used.set(runnerId, runner);
    runner.setInactivityTimeout(inactivityTimeoutSeconds, () => {
      this.#logger.info({ runnerId, inactivityTimeout: inactivityTimeoutSeconds }, 'runner inactive: destroying');
      void this.remove(runner, 'inactivity timeout');
    });
    this.#log(log).info({ runnerId, idleRunners: this.#idle.size }, 'runner claimed');
    this.refill();
  }

  /* A ready runner goes to the oldest waiting claim before it may enter the idle pool; false when nobody waits. */
  #handOver(runner: R): boolean {
    const waiter = this.#waiters[0];
    if (!waiter) return false;
    this.#use(runner, waiter.inactivityTimeout, waiter.log);
    waiter.settle(runner, 'served');
    return true;
  }

  /* Ends every wait without a runner: the environment is gone or its builds fail, nothing will come soon. */
  #dismissWaiters(): void {
    for (const waiter of [...this.#waiters]) waiter.settle(undefined, 'unavailable');
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
    } else if (!this.#handOver(runner)) {
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

  /*
   * What the runners are built on changed (a new image digest): idle runners are replaced, runners in
   * use serve on until they are returned. A failure backoff is over: the new image deserves a try.
   */
  renewIdle(reason: string): void {
    const stale = [...this.#idle.values()];
    this.#idle.clear();
    for (const runner of stale) void this.remove(runner, reason);
    if (this.#retryTimer) clearTimeout(this.#retryTimer);
    this.#retryTimer = undefined;
    this.#failureStreak = 0;
    this.refill();
  }

  /* Builds under way still go to waiting claims; later claims are refused by the lame duck. */
  stopRefilling(): void {
    this.#refillStopped = true;
    this.options.slots?.forget(this);
    if (this.#retryTimer) clearTimeout(this.#retryTimer);
    this.#retryTimer = undefined;
  }

  /*
   * Starts as many runner builds as the pool lacks. Waiting claims count on top of the pool size, and
   * while there are any the environment builds with every slot the backend has free (demand first),
   * not only its refill concurrency: a burst gets its runners as fast as the host can build them.
   */
  refill(): void {
    if (this.#deleted || this.#refillStopped || this.#retryTimer) return;
    if (this.factory.canBuild && !this.factory.canBuild(this.spec)) return;
    const slots = this.options.slots;
    const urgent = this.#waiters.length > 0;
    const limit = urgent && slots !== undefined ? slots.capacity : this.options.refillConcurrency;
    while (this.#idle.size + this.#creating < this.spec.prewarmingPoolSize + this.#waiters.length && this.#creating < limit) {
      if (slots !== undefined && !slots.take(this, urgent, () => this.refill())) return;
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
      if (!this.#deleted) this.#failureStreak = 0;
      if (this.#deleted || (this.#waiters.length === 0 && this.#idle.size >= this.spec.prewarmingPoolSize)) {
        // The environment was deleted or its pool shrunk while this runner was built (or the claim it
        // was built for stopped waiting and the pool is full).
        await runner.destroy(this.#deleted ? 'environment deleted' : 'prewarming pool already full');
      } else if (!this.#handOver(runner)) {
        this.#idle.set(runner.id, runner);
      }
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
      this.options.slots?.release();
    }
    this.refill();
    // Builds are failing and none is left under way: waiting claims would only run into their timeout.
    if (this.#creating === 0 && this.#retryTimer) this.#dismissWaiters();
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
    this.options.slots?.forget(this);
    this.#dismissWaiters();
    if (this.#retryTimer) clearTimeout(this.#retryTimer);
    this.#retryTimer = undefined;
    const runners = [...this.#idle.values(), ...this.#used.values()];
    this.#idle.clear();
    this.#used.clear();
    await Promise.allSettled([...runners.map((runner) => runner.destroy(reason, log)), ...this.#pending]);
    this.#log(log).info({ destroyedRunners: runners.length, reason }, 'environment runners destroyed');
  }
}
