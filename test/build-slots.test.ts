import assert from 'node:assert/strict';
import { test } from 'node:test';
import pino from 'pino';
import type { ExecutionEnvironmentSpec } from '../src/dto/environment.js';
import type { ManagedRunner } from '../src/runner/managed-runner.js';
import { MemoryRunner, settle, spec } from './support/memory-pools.js';
import { BuildSlots } from '../src/environment/build-slots.js';
import { ExecutionEnvironment } from '../src/environment/execution-environment.js';

/* Runner builds that end only when the test says so: how many run at once is what is checked. */
class HeldBuilds {
  readonly pending: Array<{ environmentId: number; finish: () => void }> = [];
  #counter = 0;

  createRunner = (spec: ExecutionEnvironmentSpec): Promise<ManagedRunner> =>
    new Promise((resolve) => {
      const id = `${spec.id}-${(this.#counter += 1)}`;
      this.pending.push({ environmentId: spec.id, finish: () => resolve(new MemoryRunner(id, spec.id)) });
    });

  running(environmentId: number): number {
    return this.pending.filter((build) => build.environmentId === environmentId).length;
  }

  /* Ends the oldest build of an environment. */
  finish(environmentId: number): void {
    const index = this.pending.findIndex((build) => build.environmentId === environmentId);
    assert.notEqual(index, -1, `no build of ${environmentId} is running`);
    const [build] = this.pending.splice(index, 1);
    build?.finish();
  }
}

/* Deleting waits for builds under way: they are let finish (and their runners destroyed). */
async function deleteAll(builds: HeldBuilds, ...environments: ExecutionEnvironment[]): Promise<void> {
  const deleted = Promise.all(environments.map((environment) => environment.delete('test')));
  for (const build of builds.pending.splice(0)) build.finish();
  await deleted;
}

test('BuildSlots: a freed slot goes to an owner with waiting claims before owners that only top up', () => {
  const slots = new BuildSlots(1);
  const woken: string[] = [];
  const topUp = {};
  const urgent = {};
  assert.equal(
    slots.take({}, false, () => undefined),
    true,
  );
  assert.equal(
    slots.take(topUp, false, () => woken.push('top-up')),
    false,
  );
  assert.equal(
    slots.take(urgent, true, () => woken.push('urgent')),
    false,
  );
  assert.equal(slots.waiting(topUp), true);
  slots.release();
  // The urgent owner did not take the slot in its callback: the slot goes on to the next one.
  assert.deepEqual(woken, ['urgent', 'top-up']);
  assert.equal(slots.waiting(urgent), false);
  assert.equal(slots.inUse, 0);
});

test('pools share the backend build bound; a pool with waiting claims builds beyond its refill concurrency and first', async () => {
  const builds = new HeldBuilds();
  const slots = new BuildSlots(4);
  const options = { refillConcurrency: 2, slots, logger: pino({ level: 'silent' }) };
  const a = new ExecutionEnvironment(spec(1, 10), { createRunner: builds.createRunner }, options);
  const b = new ExecutionEnvironment(spec(2, 10), { createRunner: builds.createRunner }, options);
  a.refill();
  b.refill();
  assert.equal(builds.running(1), 2, 'topping up stays within the refill concurrency');
  assert.equal(builds.running(2), 2);
  assert.equal(slots.inUse, 4);

  // A's pool is empty; claims arrive: they wait, and A becomes urgent.
  const claims = Array.from({ length: 12 }, () => a.claim(60, { timeoutSeconds: 30 }));
  await settle();
  // B's next finished build frees a slot: it goes to A, whose waiters need more than its refill concurrency.
  builds.finish(2);
  await settle();
  assert.equal(builds.running(1), 3, 'the freed slot went to the environment with waiting claims');
  assert.equal(builds.running(2), 1);
  builds.finish(2);
  await settle();
  assert.equal(builds.running(1), 4, 'a burst may use every slot of the backend');
  assert.equal(builds.running(2), 0, 'B waits for a slot');
  assert.equal(slots.inUse, 4, 'never more builds than the backend bound');

  // Every ready runner goes to a waiting claim, first come first served, until all are served.
  for (let served = 0; served < 12; served += 1) {
    builds.finish(1);
    await settle();
    assert.ok(slots.inUse <= 4);
  }
  const runners = await Promise.all(claims);
  assert.equal(runners.filter((runner) => runner !== undefined).length, 12);
  // With the burst served, A tops up its pool at its refill concurrency again and B gets slots back.
  assert.ok(builds.running(1) <= 2, `A builds ${builds.running(1)} at once after the burst`);
  assert.ok(builds.running(2) >= 1, 'B builds again');
  await deleteAll(builds, a, b);
});

test('a claim queued behind other environments builds waits for a slot instead of answering NOMAD_OVERLOAD', async () => {
  const builds = new HeldBuilds();
  const slots = new BuildSlots(1);
  const options = { refillConcurrency: 1, slots, logger: pino({ level: 'silent' }) };
  const busy = new ExecutionEnvironment(spec(3, 5), { createRunner: builds.createRunner }, options);
  const empty = new ExecutionEnvironment(spec(4, 1), { createRunner: builds.createRunner }, options);
  busy.refill();
  empty.refill();
  assert.equal(builds.running(4), 0, 'no slot free for the second environment');
  const claim = empty.claim(60, { timeoutSeconds: 30 });
  await settle();
  builds.finish(3);
  await settle();
  assert.equal(builds.running(4), 1, 'the freed slot went to the waiting claim');
  builds.finish(4);
  const runner = await claim;
  assert.equal(runner?.environmentId, 4);
  await deleteAll(builds, busy, empty);
});
