import assert from 'node:assert/strict';
import { test } from 'node:test';
import pino from 'pino';
import type { ExecutionEnvironmentSpec } from '../src/dto/environment.js';
import { MemoryRunner, settle, spec } from './support/memory-pools.js';
import type { ContextLogger } from '../src/monitoring/logger.js';
import { type ClaimWaitOutcome, noInstruments } from '../src/monitoring/metrics.js';
import { EnvironmentPools } from '../src/environment/environment-pools.js';
import { AccessorHandler, type PutOutcome } from '../src/runner/accessor-handler.js';
import { EnvironmentNotFoundError, NoIdleRunnerError, RunnerNotFoundError } from '../src/runner/errors.js';
import type { Runner } from '../src/runner/runner.js';

/* A handler as the backends build theirs: the chain from AccessorHandler, the pools an object it owns. */
class MemoryHandler extends AccessorHandler {
  readonly stored = new Map<number, ExecutionEnvironmentSpec>();
  #counter = 0;
  /* While set, runner builds wait for it: a pool that cannot refill instantly. */
  hold: Promise<void> | undefined;
  /* Every runner built, to check that none is left alive outside the pools. */
  readonly built: MemoryRunner[] = [];
  protected readonly pools: EnvironmentPools<MemoryRunner>;
  constructor(
    readonly name: string,
    private readonly accepts: (spec: ExecutionEnvironmentSpec) => boolean,
    claimTimeoutSeconds = 0,
  ) {
    super();
    this.pools = new EnvironmentPools({
      runners: {
        createRunner: async (spec) => {
          await this.hold;
          const runner = new MemoryRunner(`${spec.id}-${this.name}-${(this.#counter += 1)}`, spec.id);
          this.built.push(runner);
          return runner;
        },
      },
      claimTimeoutSeconds,
      instruments: () => this.instruments,
      storage: {
        put: async (spec) => void this.stored.set(spec.id, spec),
        delete: async (id) => void this.stored.delete(id),
      },
      refillConcurrency: 4,
      logger: pino({ level: 'silent' }),
    });
  }
  acceptsEnvironment(spec: ExecutionEnvironmentSpec) {
    return this.accepts(spec);
  }
  protected async claimOwn(id: number, inactivityTimeout: number, log?: ContextLogger, signal?: AbortSignal): Promise<Runner | undefined> {
    return this.pools.claim(id, inactivityTimeout, log, signal);
  }
  protected async returnOwn(runner: Runner) {
    this.pools.return(runner);
  }
  protected putOwnEnvironment(spec: ExecutionEnvironmentSpec): Promise<PutOutcome> {
    return this.pools.put(spec);
  }
  protected deleteOwnEnvironment(id: number) {
    return this.pools.delete(id);
  }
  protected async loadOwn() {}
  protected shutdownOwn() {
    return this.pools.shutdown();
  }
}

function chain() {
  // The first handler takes only even ids, like a Nomad handler that owns some environments.
  const first = new MemoryHandler('first', (candidate) => candidate.id % 2 === 0);
  const second = new MemoryHandler('second', () => true);
  first.setNextHandler(second);
  return { first, second };
}

test('environments go to the first handler that accepts them; claims are delegated to their owner', async () => {
  const { first, second } = chain();
  assert.equal(first.nextHandler(), second);
  assert.equal(second.hasNextHandler(), false);
  assert.equal(await first.putEnvironment(spec(2)), 'created');
  assert.equal(await first.putEnvironment(spec(3)), 'created');
  assert.deepEqual([...first.stored.keys()], [2]);
  assert.deepEqual([...second.stored.keys()], [3]);
  await settle();

  const even = await first.claim(2, 0);
  const odd = await first.claim(3, 0);
  assert.match(even.id, /^2-first-/);
  assert.match(odd.id, /^3-second-/);
  // Get and Return find the owner through the chain too.
  assert.equal(first.get(odd.id), odd);
  assert.equal(first.get(even.id), even);
  await first.return(odd);
  assert.throws(() => first.get(odd.id), RunnerNotFoundError);
  assert.deepEqual(
    first.statistics().map((stats) => stats.id),
    [2, 3],
  );
});

test('the end of the chain answers unknown environments with 404 and unknown runners with 410', async () => {
  const { first } = chain();
  await assert.rejects(first.claim(99, 0), EnvironmentNotFoundError);
  assert.throws(() => first.get('99-nothing'), RunnerNotFoundError);
  await assert.rejects(first.deleteEnvironment(99), EnvironmentNotFoundError);
});

test('an empty pool is an overload, and the pool refills after claims', async () => {
  const { first } = chain();
  await first.putEnvironment(spec(4, 1));
  await settle();
  let release = () => {};
  first.hold = new Promise((resolve) => (release = resolve));
  await first.claim(4, 0);
  await assert.rejects(first.claim(4, 0), NoIdleRunnerError);
  release();
  await settle();
  const [stats] = first.statistics();
  assert.deepEqual(stats, { id: 4, prewarmingPoolSize: 1, idleRunners: 1, usedRunners: 1 });
});

test('changing only the pool size keeps runners; other changes replace them; delete destroys all', async () => {
  const { first } = chain();
  await first.putEnvironment(spec(6, 2));
  await settle();
  const claimed = await first.claim(6, 0);
  assert.equal(await first.putEnvironment(spec(6, 4)), 'replaced');
  await settle();
  assert.equal(first.get(claimed.id), claimed);
  assert.equal(first.statistics()[0]?.idleRunners, 4);
  assert.equal(await first.putEnvironment(spec(6, 1)), 'replaced');
  assert.equal(first.statistics()[0]?.idleRunners, 1);

  assert.equal(await first.putEnvironment({ ...spec(6, 1), memoryLimit: 256 }), 'replaced');
  assert.throws(() => first.get(claimed.id), RunnerNotFoundError);
  assert.equal((claimed as MemoryRunner).destroyed, true);

  await settle();
  const again = await first.claim(6, 0);
  await first.deleteEnvironment(6);
  assert.equal((again as MemoryRunner).destroyed, true);
  assert.deepEqual(first.environments(), []);
});

test('an inactive runner is destroyed after its timeout, but not while it executes', async (t) => {
  t.mock.timers.enable({ apis: ['setTimeout'] });
  const { first } = chain();
  await first.putEnvironment(spec(8, 1));
  t.mock.timers.runAll();
  await settle();
  const runner = await first.claim(8, 5);
  runner.beginExecution();
  t.mock.timers.tick(6000);
  assert.equal(first.get(runner.id), runner);
  runner.endExecution();
  t.mock.timers.tick(5001);
  assert.throws(() => first.get(runner.id), RunnerNotFoundError);
});

test('a failed storage removal leaves the environment in place', async () => {
  const pools = new EnvironmentPools<MemoryRunner>({
    runners: { createRunner: async (candidate) => new MemoryRunner(`${candidate.id}-pool-1`, candidate.id) },
    storage: {
      put: async () => {},
      delete: async () => {
        throw new Error('storage unavailable');
      },
    },
    refillConcurrency: 1,
    logger: pino({ level: 'silent' }),
  });
  assert.equal(await pools.put(spec(10, 1)), 'created');
  await assert.rejects(pools.delete(10), /storage unavailable/);
  assert.equal(pools.has(10), true);
  await pools.shutdown();
});

/* A handler whose builds hang until released, with its one-runner pool filled and that runner claimed. */
async function drained(claimTimeoutSeconds: number, id: number) {
  const handler = new MemoryHandler('waiting', () => true, claimTimeoutSeconds);
  const waits: ClaimWaitOutcome[] = [];
  handler.instrument({ ...noInstruments, claimWaited: (_environmentId, _seconds, outcome) => void waits.push(outcome) });
  await handler.putEnvironment(spec(id, 1));
  await settle();
  let release = () => {};
  handler.hold = new Promise((resolve) => (release = resolve));
  const first = await handler.claim(id, 0);
  return { handler, waits, first, release };
}

/* Whether a promise has settled yet, without waiting for it. */
const settledYet = async (promise: Promise<unknown>): Promise<boolean> => {
  let done = false;
  promise.then(
    () => (done = true),
    () => (done = true),
  );
  await settle();
  return done;
};

test('with claimtimeout a claim on an empty pool waits for the runner under construction and gets it', async () => {
  const { handler, waits, first, release } = await drained(30, 20);
  const waiting = handler.claim(20, 0);
  assert.equal(await settledYet(waiting), false, 'the claim waits while the build hangs');
  release();
  const runner = await waiting;
  assert.notEqual(runner.id, first.id);
  assert.equal(handler.get(runner.id), runner);
  assert.deepEqual(waits, ['served']);
  await settle();
  // The pool refills behind the served claim: its one idle runner is back.
  assert.deepEqual(handler.statistics()[0], { id: 20, prewarmingPoolSize: 1, idleRunners: 1, usedRunners: 2 });
  await handler.shutdown();
});

test('waiting claims are served first come first served', async () => {
  const { handler, release } = await drained(30, 22);
  const order: string[] = [];
  const older = handler.claim(22, 0).then((runner) => (order.push('older'), runner));
  const newer = handler.claim(22, 0).then((runner) => (order.push('newer'), runner));
  await settle();
  release();
  const [olderRunner, newerRunner] = await Promise.all([older, newer]);
  assert.deepEqual(order, ['older', 'newer']);
  // Runners are numbered in the order their builds end: the older claim got the first one ready.
  const number = (runner: Runner) => Number(runner.id.split('-').at(-1));
  assert.ok(number(olderRunner) < number(newerRunner), `${olderRunner.id} before ${newerRunner.id}`);
  await handler.shutdown();
});

test('a claim that waits in vain answers NOMAD_OVERLOAD (NoIdleRunnerError) and is counted as timed out', async () => {
  const { handler, waits, release } = await drained(0.05, 24);
  await assert.rejects(handler.claim(24, 0), NoIdleRunnerError);
  assert.deepEqual(waits, ['timeout']);
  release();
  await settle();
  // The runner built for the claim that left joins the pool; nothing else stays alive.
  assert.deepEqual(handler.statistics()[0], { id: 24, prewarmingPoolSize: 1, idleRunners: 1, usedRunners: 1 });
  assert.equal(handler.built.filter((runner) => !runner.destroyed).length, 2);
  await handler.shutdown();
});

test('claimtimeout 0 answers an empty pool at once, as Poseidon does', async () => {
  const { handler, waits, release } = await drained(0, 26);
  const claim = handler.claim(26, 0);
  assert.equal(await settledYet(claim), true, 'answered without waiting for the build');
  await assert.rejects(claim, NoIdleRunnerError);
  assert.deepEqual(waits, [], 'no wait happened');
  release();
  await handler.shutdown();
});

test('a waiter whose client leaves, or whose environment is deleted, leaks no runner', async () => {
  const { handler, waits, release } = await drained(30, 28);
  const client = new AbortController();
  const cancelled = handler.claim(28, 0, undefined, client.signal);
  await settle();
  client.abort();
  await assert.rejects(cancelled, NoIdleRunnerError);
  release();
  await settle();
  // The builds started for the cancelled claim end in the pool or destroyed, never handed to nobody.
  assert.deepEqual(handler.statistics()[0], { id: 28, prewarmingPoolSize: 1, idleRunners: 1, usedRunners: 1 });
  assert.equal(handler.built.filter((runner) => !runner.destroyed).length, 2);

  // Now the pool is empty again with a build hanging, and the environment goes away under the waiter.
  let releaseAgain = () => {};
  handler.hold = new Promise((resolve) => (releaseAgain = resolve));
  await handler.claim(28, 0);
  const orphaned = handler.claim(28, 0);
  await settle();
  const deleted = handler.deleteEnvironment(28);
  await assert.rejects(orphaned, NoIdleRunnerError);
  releaseAgain();
  await deleted;
  assert.deepEqual(waits, ['cancelled', 'unavailable']);
  assert.equal(handler.built.filter((runner) => !runner.destroyed).length, 0, 'every runner built was destroyed with its environment');
});
