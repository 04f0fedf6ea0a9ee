import type { EnvironmentStatistics, ExecutionEnvironmentSpec } from '../dto/environment.js';
import type { ContextLogger } from '../monitoring/logger.js';
import { type Instruments, noInstruments } from '../monitoring/metrics.js';
import { ClaimCancelledError, EnvironmentNotFoundError, NoIdleRunnerError, RunnerNotFoundError, ShuttingDownError } from './errors.js';
import type { Runner } from './runner.js';

export type PutOutcome = 'created' | 'replaced';

/* What the chain reads of one handler's own environments and runners: its pools (EnvironmentPools). */
export interface OwnEnvironments {
  has(environmentId: number): boolean;
  specs(): ExecutionEnvironmentSpec[];
  statistics(): EnvironmentStatistics[];
  /* A claimed runner that is still alive. */
  usedRunner(runnerId: string): Runner | undefined;
}

/*
 * One backend's view of environments and runners, linked into a chain of responsibility
 * (as Poseidon's runner.AccessorHandler): each public operation is answered by the first
 * handler that knows the environment or runner, and passed on otherwise.
 */
export abstract class AccessorHandler {
  #next: AccessorHandler | undefined;
  /* Where runner builds and backend calls are reported (metrics, health); nothing until instrument(). */
  protected instruments: Instruments = noInstruments;
  /* Why the daemon is draining (e.g. "SIGTERM"); undefined while it serves normally. */
  #lameDuck: string | undefined;

  abstract readonly name: string;
  /* The handler's own environments and runners (its EnvironmentPools), which the chain reads directly. */
  protected abstract readonly pools: OwnEnvironments;

  setNextHandler(next: AccessorHandler): void {
    this.#next = next;
  }

  nextHandler(): AccessorHandler | undefined {
    return this.#next;
  }

  /* Reports to `instruments` from now on, for this handler and every later one in the chain. */
  instrument(instruments: Instruments): void {
    for (const handler of this.chain()) handler.instruments = instruments;
  }

  hasNextHandler(): boolean {
    return this.#next !== undefined;
  }

  /* Handlers from this one to the end of the chain. */
  *chain(): Generator<AccessorHandler> {
    for (let handler: AccessorHandler | undefined = this; handler; handler = handler.nextHandler()) yield handler;
  }

  // Reads are the same for every backend: they only look at its pools.
  knowsEnvironment(environmentId: number): boolean {
    return this.pools.has(environmentId);
  }

  ownEnvironments(): ExecutionEnvironmentSpec[] {
    return this.pools.specs();
  }

  ownStatistics(): EnvironmentStatistics[] {
    return this.pools.statistics();
  }

  /* The runner of this backend with that id, if any. */
  ownRunner(runnerId: string): Runner | undefined {
    return this.pools.usedRunner(runnerId);
  }

  // What each backend does for itself: claims and changes differ (Nomad writes jobs, purges leftovers).
  /* Whether a new environment should live in this backend. */
  abstract acceptsEnvironment(spec: ExecutionEnvironmentSpec): boolean;
  /* An idle runner (or one that became ready within runners.claimtimeout), or undefined when none came. */
  // `log` is the logger of the request that asked, so that what it causes carries the request's id;
  // `signal` aborts when its client went away, so that a waiting claim stops waiting.
  protected abstract claimOwn(environmentId: number, inactivityTimeout: number, log?: ContextLogger, signal?: AbortSignal): Promise<Runner | undefined>;
  protected abstract returnOwn(runner: Runner, log?: ContextLogger): Promise<void>;
  protected abstract putOwnEnvironment(spec: ExecutionEnvironmentSpec, log?: ContextLogger): Promise<PutOutcome>;
  protected abstract deleteOwnEnvironment(environmentId: number, log?: ContextLogger): Promise<void>;
  protected abstract loadOwn(): Promise<void>;
  /* Destroys every runner; environments stay stored. */
  protected abstract shutdownOwn(): Promise<void>;
  /* From now on no runner is built: pools stop refilling (running executions go on). Backends with pools override it. */
  protected enterLameDuckOwn(): void {}

  /*
   * The drain before a shutdown (after Nex's EnterLameDuck): claims are refused, pools stop
   * refilling and /health reports it, while runners in use keep serving.
   */
  enterLameDuck(reason: string): void {
    for (const handler of this.chain()) {
      if (handler.#lameDuck !== undefined) continue;
      handler.#lameDuck = reason;
      handler.enterLameDuckOwn();
    }
  }

  /* Why the daemon is draining, or undefined while it serves normally. */
  get lameDuck(): string | undefined {
    return this.#lameDuck;
  }

  async claim(environmentId: number, inactivityTimeout: number, log?: ContextLogger, signal?: AbortSignal): Promise<Runner> {
    if (this.#lameDuck !== undefined) throw new ShuttingDownError(this.#lameDuck);
    if (!this.knowsEnvironment(environmentId)) {
      if (this.#next) return this.#next.claim(environmentId, inactivityTimeout, log, signal);
      throw new EnvironmentNotFoundError(environmentId);
    }
    const runner = await this.claimOwn(environmentId, inactivityTimeout, log, signal);
    if (runner && signal?.aborted) {
      // The client left after the runner was handed over: nobody will ever use or return it.
      await this.returnOwn(runner, log);
      throw new ClaimCancelledError(environmentId);
    }
    if (!runner) throw new NoIdleRunnerError(environmentId);
    return runner;
  }

  get(runnerId: string): Runner {
    const runner = this.ownRunner(runnerId);
    if (runner) return runner;
    if (this.#next) return this.#next.get(runnerId);
    throw new RunnerNotFoundError(runnerId);
  }

  async return(runner: Runner, log?: ContextLogger): Promise<void> {
    if (this.ownRunner(runner.id)) return this.returnOwn(runner, log);
    if (this.#next) return this.#next.return(runner, log);
    throw new RunnerNotFoundError(runner.id);
  }

  async load(): Promise<void> {
    await this.loadOwn();
    await this.#next?.load();
  }

  /* Stored by the handler that knows it, else by the first that accepts it. */
  async putEnvironment(spec: ExecutionEnvironmentSpec, log?: ContextLogger): Promise<PutOutcome> {
    const owner = [...this.chain()].find((handler) => handler.knowsEnvironment(spec.id));
    if (owner) return owner.putOwnEnvironment(spec, log);
    const acceptor = [...this.chain()].find((handler) => handler.acceptsEnvironment(spec));
    if (!acceptor) throw new EnvironmentNotFoundError(spec.id);
    return acceptor.putOwnEnvironment(spec, log);
  }

  async deleteEnvironment(environmentId: number, log?: ContextLogger): Promise<void> {
    if (this.knowsEnvironment(environmentId)) return this.deleteOwnEnvironment(environmentId, log);
    if (this.#next) return this.#next.deleteEnvironment(environmentId, log);
    throw new EnvironmentNotFoundError(environmentId);
  }

  environment(environmentId: number): ExecutionEnvironmentSpec {
    for (const handler of this.chain()) {
      const spec = handler.ownEnvironments().find((environment) => environment.id === environmentId);
      if (spec) return spec;
    }
    throw new EnvironmentNotFoundError(environmentId);
  }

  environments(): ExecutionEnvironmentSpec[] {
    return [...this.chain()].flatMap((handler) => handler.ownEnvironments());
  }

  statistics(): EnvironmentStatistics[] {
    return [...this.chain()].flatMap((handler) => handler.ownStatistics());
  }

  async shutdown(): Promise<void> {
    await Promise.allSettled([...this.chain()].map((handler) => handler.shutdownOwn()));
  }
}
