import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import test, { type TestContext } from 'node:test';
import pino from 'pino';
import type { ExecutionEnvironmentSpec } from '../src/dto/environment.js';
import { EnvironmentImages, type ImageState, imageSourceOf } from '../src/local/environment-images.js';
import { FileImageStore } from '../src/local/images/file-image-store.js';
import type { ImageStore } from '../src/local/images/image-store.js';
import { FakeRegistry } from './fake-registry/index.js';
import { BUSYBOX } from './support/prepared-root.js';
import { buildTestImage } from './support/test-images.js';
import { waitFor } from './support/wait.js';

/*
 * The runner side of registry images without sandboxes: which source a name has, when a pool may
 * build, and which digests stay pinned in the real store (environment and live runners) as an
 * environment rolls from one digest to the next.
 */

const skip = existsSync(BUSYBOX) ? false : 'busybox-static is not installed';
const LEARNER = { uid: 1000, gid: 1000 };
const logger = pino({ level: 'silent' });

test('local.images: a directory, host or registry per name, `*` for the rest, registry without it', () => {
  const images = new Map([
    ['python', '/srv/python'],
    ['java', 'host'],
    ['pulled', 'registry'],
  ]);
  assert.deepEqual(imageSourceOf(images, 'python'), { kind: 'directory', directory: '/srv/python' });
  assert.deepEqual(imageSourceOf(images, 'java'), { kind: 'host' });
  assert.deepEqual(imageSourceOf(images, 'other'), { kind: 'registry' });
  assert.deepEqual(imageSourceOf(new Map([...images, ['*', 'host']]), 'other'), { kind: 'host' });
  assert.deepEqual(imageSourceOf(new Map([...images, ['*', 'host']]), 'pulled'), { kind: 'registry' });
});

/* The real store, with every pin and unpin counted per digest. */
function countingStore(store: ImageStore): { store: ImageStore; pins: Map<string, number> } {
  const pins = new Map<string, number>();
  const counted: ImageStore = {
    prepare: (reference, options) => store.prepare(reference, options),
    collectGarbage: () => store.collectGarbage(),
    close: () => store.close(),
    pin: (digest) => {
      pins.set(digest, (pins.get(digest) ?? 0) + 1);
      const unpin = store.pin(digest);
      let once = false;
      return () => {
        if (once) return;
        once = true;
        pins.set(digest, (pins.get(digest) ?? 0) - 1);
        unpin();
      };
    },
  };
  return { store: counted, pins };
}

async function setup(t: TestContext): Promise<{
  registry: FakeRegistry;
  scratch: string;
  images: EnvironmentImages;
  pins: Map<string, number>;
  events: Array<{ environmentId: number; event: string }>;
}> {
  const registry = await FakeRegistry.start();
  t.after(() => registry.close());
  const scratch = await mkdtemp(path.join(tmpdir(), 'poseidon-env-images-'));
  t.after(() => rm(scratch, { recursive: true, force: true }));
  const real = new FileImageStore({ directory: path.join(scratch, 'images'), registries: {}, cache: { unusedretention: 0, maxunusedsize: 0 }, logger });
  t.after(() => real.close());
  const { store, pins } = countingStore(real);
  const events: Array<{ environmentId: number; event: string }> = [];
  const images = new EnvironmentImages({
    images: new Map([['host-image', 'host']]),
    policy: 'always',
    learner: LEARNER,
    store,
    logger,
    events: {
      ready: (environmentId, rolled) => events.push({ environmentId, event: rolled ? 'rolled' : 'ready' }),
      state: (environmentId, state: ImageState, detail) => events.push({ environmentId, event: detail ? `${state}: ${detail}` : state }),
    },
  });
  t.after(() => images.close());
  return { registry, scratch, images, pins, events };
}

const spec = (id: number, image: string): ExecutionEnvironmentSpec => ({
  id,
  image,
  prewarmingPoolSize: 1,
  cpuLimit: 20,
  memoryLimit: 256,
  networkAccess: false,
  exposedPorts: [],
});

test('a registry image: no builds until ready; the environment and each live runner pin its digest; a roll moves the pin', { skip }, async (t) => {
  const { registry, scratch, images, pins, events } = await setup(t);
  const v1 = await buildTestImage(path.join(scratch, 'v1'), { marker: 'v1' });
  registry.push('test/busybox', 'latest', v1);
  const environment = spec(1, `${registry.host}/test/busybox:latest`);
  assert.equal(images.canBuild(spec(2, 'host-image')), true, 'a host image needs no pull');
  assert.equal(images.canBuild(environment), false, 'not tracked yet: nothing to build on');

  images.track(environment);
  assert.equal(images.canBuild(environment), false, 'pulling');
  assert.throws(() => images.imageFor(environment), /is not ready: being pulled/);
  await waitFor(
    async () => events.map((entry) => entry.event),
    (seen) => seen.includes('ready'),
    'the image to be ready',
  );
  assert.deepEqual(
    events.map((entry) => entry.event),
    ['pulling', 'ready', 'ready'],
  );
  assert.equal(images.canBuild(environment), true);
  const first = images.imageFor(environment);
  assert.equal(first.digest, v1.manifestDigest);
  assert.deepEqual(first.learner, { uid: 1000, gid: 1000 }, "the image's `user` account");
  assert.equal(first.environment(false).POSEIDON_TEST_MARKER, 'v1');
  assert.equal(first.environment(false).CODEOCEAN, 'true');
  assert.equal(first.environment(false).HOME, '/workspace');
  assert.deepEqual(Object.fromEntries(pins), { [v1.manifestDigest]: 1 }, 'the environment pins its image');
  const runnerUnpin = images.pinForRunner(first);
  assert.equal(pins.get(v1.manifestDigest), 2, 'and so does each live runner');

  const v2 = await buildTestImage(path.join(scratch, 'v2'), { marker: 'v2' });
  registry.push('test/busybox', 'latest', v2);
  images.track(environment);
  await waitFor(
    async () => events.map((entry) => entry.event),
    (seen) => seen.includes('rolled'),
    'the roll',
  );
  assert.equal(images.isCurrent(environment, first), false, 'a runner built on v1 is stale now');
  assert.equal(images.imageFor(environment).digest, v2.manifestDigest);
  assert.deepEqual(Object.fromEntries(pins), { [v1.manifestDigest]: 1, [v2.manifestDigest]: 1 }, 'the claimed runner keeps v1 pinned');
  runnerUnpin();
  images.forget(environment.id);
  assert.deepEqual(Object.fromEntries(pins), { [v1.manifestDigest]: 0, [v2.manifestDigest]: 0 }, 'nothing pinned once all are gone');

  // Put again with the same digest: nothing rolls.
  const before = events.length;
  images.track(environment);
  await waitFor(
    async () => events.length,
    (count) => count > before + 1,
    'the environment to be ready again',
  );
  images.track(environment);
  await new Promise((resolve) => setTimeout(resolve, 500));
  assert.ok(!events.slice(before).some((entry) => entry.event === 'rolled'));
});

test('an unknown repository fails for good, named in the state; putting it again retries', { skip }, async (t) => {
  const { registry, images, events, pins } = await setup(t);
  const environment = spec(3, `${registry.host}/test/missing:latest`);
  images.track(environment);
  await waitFor(
    async () => events.map((entry) => entry.event),
    (seen) => seen.some((event) => event.startsWith('failed: not-found')),
    'the failure',
  );
  assert.equal(images.canBuild(environment), false);
  assert.throws(() => images.imageFor(environment), /is not ready: .*missing/);
  const count = events.length;
  images.track(environment);
  await waitFor(
    async () => events.slice(count).map((entry) => entry.event),
    (seen) => seen.some((event) => event.startsWith('failed: not-found')),
    'the second attempt to fail as well',
  );
  assert.deepEqual(Object.fromEntries(pins), {});
});
