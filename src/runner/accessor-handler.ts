import type { EnvironmentStatistics, ExecutionEnvironmentSpec } from '../dto/environment.js';
import { EnvironmentNotFoundError, NoIdleRunnerError, RunnerNotFoundError } from './errors.js';
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

  abstract readonly name: string;
  /* The handler's own environments and runners (its EnvironmentPools), which the chain reads directly. */
  protected abstract readonly pools: OwnEnvironments;

  setNextHandler(next: AccessorHandler): void {
    this.#next = next;
  }

  nextHandler(): AccessorHandler | undefined {
    return this.#next;
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
  /* An idle runner, or undefined when the pool is empty. */
  protected abstract claimOwn(environmentId: number, inactivityTimeout: number): Promise<Runner | undefined>;
  protected abstract returnOwn(runner: Runner): Promise<void>;
  protected abstract putOwnEnvironment(spec: ExecutionEnvironmentSpec): Promise<PutOutcome>;
  protected abstract deleteOwnEnvironment(environmentId: number): Promise<void>;
  protected abstract loadOwn(): Promise<void>;
  /* Destroys every runner; environments stay stored. */
  protected abstract shutdownOwn(): Promise<void>;

  async claim(environmentId: number, inactivityTimeout: number): Promise<Runner> {
    if (!this.knowsEnvironment(environmentId)) {
      if (this.#next) return this.#next.claim(environmentId, inactivityTimeout);
      throw new EnvironmentNotFoundError(environmentId);
    }
    const runner = await this.claimOwn(environmentId, inactivityTimeout);
    if (!runner) throw new NoIdleRunnerError(environmentId);
    return runner;
  }

  get(runnerId: string): Runner {
    const runner = this.ownRunner(runnerId);
    if (runner) return runner;
    if (this.#next) return this.#next.get(runnerId);
    throw new RunnerNotFoundError(runnerId);
  }

  async return(runner: Runner): Promise<void> {
    if (this.ownRunner(runner.id)) return this.returnOwn(runner);
    if (this.#next) return this.#next.return(runner);
    throw new RunnerNotFoundError(runner.id);
  }

  async load(): Promise<void> {
    await this.loadOwn();
    await this.#next?.load();
  }

  /* Stored by the handler that knows it, else by the first that accepts it. */
  async putEnvironment(spec: ExecutionEnvironmentSpec): Promise<PutOutcome> {
    const owner = [...this.chain()].find((handler) => handler.knowsEnvironment(spec.id));
    if (owner) return owner.putOwnEnvironment(spec);
    const acceptor = [...this.chain()].find((handler) => handler.acceptsEnvironment(spec));
    if (!acceptor) throw new EnvironmentNotFoundError(spec.id);
    return acceptor.putOwnEnvironment(spec);
  }

  async deleteEnvironment(environmentId: number): Promise<void> {
    if (this.knowsEnvironment(environmentId)) return this.deleteOwnEnvironment(environmentId);
    if (this.#next) return this.#next.deleteEnvironment(environmentId);
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
