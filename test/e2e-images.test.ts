import assert from 'node:assert/strict';
import { existsSync, readdirSync } from 'node:fs';
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import test, { type TestContext } from 'node:test';
import { FakeRegistry } from './fake-registry/index.js';
import { runnerCgroups } from './support/cgroups.js';
import { CodeOceanClient, type EnvironmentSpec, environmentSpec } from './support/codeocean-client.js';
import { type ConfigTree, type Daemon, startDaemon } from './support/daemon.js';
import { BUSYBOX } from './support/prepared-root.js';
import { buildTestImage, TEST_IMAGE, type TestImage } from './support/test-images.js';
import { waitFor } from './support/wait.js';

/*
 * Environments on registry images, through the public API: a real daemon pulls from the fake
 * registry on loopback, unpacks into its state directory and runs real sandboxes on the image root.
 */

const skip = existsSync(BUSYBOX) ? false : 'busybox-static is not installed';
const CGROUP_PARENT = process.env.TEST_CGROUP_PARENT ?? 'poseidon-ts';

interface Fixture {
  registry: FakeRegistry;
  scratch: string;
  stateDir: string;
  /* Where the escape-attempt layer would write if an unpacker followed its symlink. */
  escapeTarget: string;
  image(marker: string, options?: { python?: boolean }): Promise<TestImage>;
  config(extra?: ConfigTree): ConfigTree;
}

async function fixture(t: TestContext): Promise<Fixture> {
  const registry = await FakeRegistry.start({ auth: true });
  t.after(() => registry.close());
  const scratch = await mkdtemp(path.join(tmpdir(), 'poseidon-images-'));
  t.after(() => rm(scratch, { recursive: true, force: true }));
  const stateDir = path.join(scratch, 'state');
  const escapeTarget = path.join(scratch, 'escape-target');
  await mkdir(escapeTarget);
  return {
    registry,
    scratch,
    stateDir,
    escapeTarget,
    image: (marker, options = {}) => buildTestImage(path.join(scratch, `layout-${marker}`), { marker, escapeTarget, python: options.python }),
    config: (extra = {}) => ({
      ...extra,
      local: {
        statedir: stateDir,
        pullpolicy: 'always',
        // Registry images for every name (the harness maps them to the host layout otherwise).
        images: { '*': 'registry' },
        ...((extra.local as ConfigTree | undefined) ?? {}),
      },
    }),
  };
}

async function idleRunners(client: CodeOceanClient, environmentId: number): Promise<number> {
  const statistics = (await client.statistics()).body as Record<string, { idleRunners: number }>;
  return statistics[String(environmentId)]?.idleRunners ?? -1;
}

async function lines(
  client: CodeOceanClient,
  runnerId: string,
  command: string,
  privilegedExecution = false,
): Promise<{ stdout: string[]; stderr: string; exitCode: number | undefined }> {
  const result = await client.run(runnerId, command, { privilegedExecution });
  return { stdout: result.stdout.trim().split(/\r?\n/), stderr: result.stderr, exitCode: result.exitCode };
}

/* v1 of the test image as test/busybox:latest, a daemon, and an environment on it (PUT answered 201). */
async function environmentOnV1(t: TestContext, f: Fixture, environmentId: number): Promise<{ daemon: Daemon; client: CodeOceanClient; spec: EnvironmentSpec }> {
  f.registry.push('test/busybox', 'latest', await f.image('v1'));
  const daemon = await startDaemon({ config: f.config() });
  t.after(() => daemon.stop());
  const client = new CodeOceanClient(daemon.baseUrl, daemon.token);
  const spec = environmentSpec(environmentId, { image: `${f.registry.host}/test/busybox:latest`, prewarmingPoolSize: 1 });
  assert.equal((await client.putEnvironment(spec)).status, 201);
  return { daemon, client, spec };
}

async function stopAndCheckNothingLeaks(daemon: Daemon): Promise<void> {
  await daemon.stop();
  assert.deepEqual(daemon.sandboxPids(), [], 'no sandbox outlives the daemon');
  assert.deepEqual(runnerCgroups(CGROUP_PARENT), [], 'no runner cgroup is left');
}

test('a registry image: PUT answers at once, the pool waits for the pull, runners get the image, its Env and its user', { skip }, async (t) => {
  const f = await fixture(t);
  const image = await f.image('v1');
  f.registry.push('test/busybox', 'latest', image, { index: 'oci' });
  // Slow blobs: the pull is still under way when the first answers come.
  f.registry.faults.bytesPerSecond = 64 * 1024;
  const daemon = await startDaemon({ config: f.config({ runners: { claimtimeout: 0 }, logger: { level: 'info' } }) });
  t.after(() => daemon.stop());
  const client = new CodeOceanClient(daemon.baseUrl, daemon.token);
  const reference = `${f.registry.host}/test/busybox:latest`;

  assert.equal((await client.putEnvironment(environmentSpec(91, { image: reference, prewarmingPoolSize: 1 }))).status, 201);
  const listed = (await client.request('GET', '/execution-environments')).body as { executionEnvironments: Array<{ id: number }> };
  assert.ok(
    listed.executionEnvironments.some((environment) => environment.id === 91),
    'listed while pulling',
  );
  assert.equal(await idleRunners(client, 91), 0);
  const early = await client.claimRunner(91);
  assert.equal(early.status, 500);
  assert.equal((early.body as { errorCode: string }).errorCode, 'NOMAD_OVERLOAD');
  const health = await client.health();
  assert.equal(health.status, 204, 'a pull is no failure');
  assert.match(health.headers.get('poseidon-image-pulls') ?? '', /execution environment\(s\) 91/);

  f.registry.faults.bytesPerSecond = 0;
  const runnerId = await client.claim(91, 180, 120_000);
  const os = await lines(client, runnerId, 'cat /etc/os-release');
  assert.ok(
    os.stdout.some((line) => line === 'VERSION_ID=v1'),
    os.stdout.join('\n'),
  );
  const variables = await lines(client, runnerId, `echo "$PATH"; echo "$${TEST_IMAGE.marker}"; echo "$CODEOCEAN"; echo "$LANG"; pwd`);
  assert.deepEqual(variables.stdout, [TEST_IMAGE.path, 'v1', 'true', 'C.UTF-8', '/workspace']);
  const whoami = await lines(client, runnerId, 'whoami; id -u');
  assert.equal(whoami.stderr, '', 'CodeOcean fails an environment on any stderr');
  assert.deepEqual(whoami.stdout, [TEST_IMAGE.user.name, String(TEST_IMAGE.user.uid)]);
  const root = await lines(client, runnerId, 'whoami', true);
  assert.deepEqual(root.stdout, ['root']);
  // The request's environment comes last: it overrides the image's (and Poseidon's CODEOCEAN).
  const execution = await client.request(
    'POST',
    '/runners/{runnerId}/execute',
    { runnerId },
    { body: { command: `echo "$${TEST_IMAGE.marker} $LANG"`, timeLimit: 10, environment: { [TEST_IMAGE.marker]: 'from-request' } } },
  );
  assert.equal(execution.status, 200, execution.text);
  const overridden = await client.connect((execution.body as { websocketUrl: string }).websocketUrl);
  assert.equal(overridden.stdout.trim(), 'from-request C.UTF-8');
  assert.ok(existsSync('/usr/bin/python3'), 'the host has Python (else this check proves nothing)');
  const python = await client.run(runnerId, 'command -v python3 || ls /usr/bin/python3');
  assert.notEqual(python.exitCode, 0, 'the host Python is not in the image');
  const whiteout = await client.run(runnerId, `test -e ${TEST_IMAGE.whiteoutPath}`);
  assert.equal(whiteout.exitCode, 1, 'the whiteout hides the lower layer file');
  assert.deepEqual(readdirSync(f.escapeTarget), [], 'the symlink-escape layer wrote nothing outside');
  assert.equal((await client.deleteEnvironment(91)).status, 204);
  await stopAndCheckNothingLeaks(daemon);
});

test("a Python image runs a learner's program as CodeOcean does: files copied, python3 from the image as its user", { skip }, async (t) => {
  const f = await fixture(t);
  f.registry.push('test/python', '3', await f.image('py', { python: true }));
  const daemon = await startDaemon({ config: f.config() });
  t.after(() => daemon.stop());
  const client = new CodeOceanClient(daemon.baseUrl, daemon.token);
  assert.equal((await client.putEnvironment(environmentSpec(97, { image: `${f.registry.host}/test/python:3`, prewarmingPoolSize: 1 }))).status, 201);
  const runnerId = await client.claim(97, 180, 180_000);
  const copy = await client.patchFiles(runnerId, {
    delete: [],
    copy: [{ path: 'hello.py', content: Buffer.from('import getpass, sys\nprint("Hello", getpass.getuser(), sys.executable)\n').toString('base64') }],
  });
  assert.equal(copy.status, 204, copy.text);
  const run = await client.run(runnerId, 'python3 hello.py');
  assert.equal(run.stderr, '');
  assert.equal(run.stdout.trim(), `Hello ${TEST_IMAGE.user.name} /usr/bin/python3`);
  assert.equal((await client.deleteEnvironment(97)).status, 204);
  await stopAndCheckNothingLeaks(daemon);
});

test('a new digest behind the tag rolls the environment: idle runners are replaced, a claimed one serves on', { skip }, async (t) => {
  const f = await fixture(t);
  const { daemon, client, spec } = await environmentOnV1(t, f, 92);
  const before = await client.claim(92, 180, 120_000);
  await waitFor(
    () => idleRunners(client, 92),
    (idle) => idle === 1,
    'an idle runner on v1',
    60_000,
  );

  f.registry.push('test/busybox', 'latest', await f.image('v2'));
  assert.equal((await client.putEnvironment(spec)).status, 204);
  const after = await waitFor(
    async () => {
      const runnerId = await client.claim(92, 180, 120_000);
      const marker = (await lines(client, runnerId, `echo "$${TEST_IMAGE.marker}"`)).stdout[0];
      if (marker !== 'v2') await client.deleteRunner(runnerId);
      return { runnerId, marker };
    },
    (claimed) => claimed.marker === 'v2',
    'a runner on the new digest',
    120_000,
  );
  assert.match((await client.run(after.runnerId, 'cat /etc/os-release')).stdout, /VERSION_ID=v2/);
  // Drained, not killed: the runner claimed before the roll still runs on the old root.
  assert.deepEqual((await lines(client, before, `echo "$${TEST_IMAGE.marker}"`)).stdout, ['v1']);
  assert.equal((await client.deleteEnvironment(92)).status, 204);
  await stopAndCheckNothingLeaks(daemon);
});

test('after a restart with the registry gone, the environment starts from the cache', { skip }, async (t) => {
  const f = await fixture(t);
  const { daemon: first, client: firstClient } = await environmentOnV1(t, f, 93);
  await firstClient.claim(93, 180, 120_000);
  await stopAndCheckNothingLeaks(first);

  await f.registry.close();
  const second = await startDaemon({ config: f.config({ logger: { level: 'info' } }) });
  t.after(() => second.stop());
  const client = new CodeOceanClient(second.baseUrl, second.token);
  const runnerId = await client.claim(93, 180, 120_000);
  assert.deepEqual((await lines(client, runnerId, `echo "$${TEST_IMAGE.marker}"; whoami`)).stdout, ['v1', 'user']);
  assert.equal((await client.health()).status, 204, 'an unreachable registry is no failure while the cache serves');
  assert.equal((await client.deleteEnvironment(93)).status, 204);
  await stopAndCheckNothingLeaks(second);
});

test('a bad reference, an unknown image and a digest mismatch: clear, logged failures, no runner, no half-made root', { skip }, async (t) => {
  const f = await fixture(t);
  const image = await f.image('v1');
  f.registry.push('test/busybox', 'latest', image);
  const daemon = await startDaemon({ config: f.config({ runners: { claimtimeout: 0 } }) });
  t.after(() => daemon.stop());
  const client = new CodeOceanClient(daemon.baseUrl, daemon.token);

  // PUT takes any image string, as Poseidon does; the failure shows where CodeOcean and operators look.
  const failsWith = async (environmentId: number, image: string, reason: string): Promise<void> => {
    assert.equal((await client.putEnvironment(environmentSpec(environmentId, { image, prewarmingPoolSize: 1 }))).status, 201);
    const health = await waitFor(
      () => client.health(),
      (answer) => answer.status === 503,
      `health to report ${reason}`,
      60_000,
    );
    assert.match((health.body as { message: string }).message, new RegExp(`image of execution environment ${environmentId} cannot be prepared \\(${reason}`));
    assert.match(daemon.logs(), new RegExp(`"environmentId":${environmentId}.*"reason":"${reason}".*cannot prepare the image`));
  };
  await failsWith(94, `${f.registry.host}/test/missing:latest`, 'not-found');
  const claim = await client.claimRunner(94);
  assert.equal((claim.body as { errorCode: string }).errorCode, 'NOMAD_OVERLOAD');
  assert.equal(await idleRunners(client, 94), 0);
  assert.equal((await client.deleteEnvironment(94)).status, 204);
  assert.equal((await client.health()).status, 204, 'deleting the environment ends its failure');
  await failsWith(96, 'Not A Reference!', 'bad-reference');
  assert.equal((await client.deleteEnvironment(96)).status, 204);

  const layer = image.layers[1]?.digest ?? '';
  f.registry.faults.corruptBlobs.add(layer);
  assert.equal((await client.putEnvironment(environmentSpec(95, { image: `${f.registry.host}/test/busybox:latest`, prewarmingPoolSize: 1 }))).status, 201);
  await waitFor(
    async () => daemon.logs(),
    (logs) => /"environmentId":95.*"reason":"digest-mismatch".*retrying/.test(logs),
    'the digest mismatch to be logged, with a retry',
    60_000,
  );
  assert.equal(await idleRunners(client, 95), 0);
  const imagesDirectory = path.join(f.stateDir, 'images');
  const unpacked = existsSync(imagesDirectory) ? readdirSync(imagesDirectory, { recursive: true, encoding: 'utf8' }) : [];
  assert.ok(!unpacked.some((entry) => entry.endsWith('os-release')), `no root was made from a corrupt layer: ${unpacked.join(', ')}`);
  // The retry, after the registry serves the right bytes again, makes the environment usable.
  f.registry.faults.corruptBlobs.clear();
  const runnerId = await client.claim(95, 180, 180_000);
  assert.deepEqual((await lines(client, runnerId, 'whoami')).stdout, ['user']);
  assert.equal((await client.deleteEnvironment(95)).status, 204);
  await stopAndCheckNothingLeaks(daemon);
});
