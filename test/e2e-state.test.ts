import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { randomBytes, randomInt } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { removeCgroupParent, runnerCgroups } from './support/cgroups.js';
import { CodeOceanClient, environmentSpec } from './support/codeocean-client.js';
import { type ConfigTree, descendantsOf, processesMatching, startDaemon } from './support/daemon.js';
import { sleep, waitFor } from './support/wait.js';

/* State that never disagrees with itself: a state directory that cannot be written, and a SIGKILLed daemon. */

const stats = async (client: CodeOceanClient): Promise<Record<string, { idleRunners: number; prewarmingPoolSize: number }>> =>
  (await client.statistics()).body as Record<string, { idleRunners: number; prewarmingPoolSize: number }>;

const storedIds = (stateDir: string): Array<{ id: number; prewarmingPoolSize: number }> =>
  (JSON.parse(readFileSync(path.join(stateDir, 'environments.json'), 'utf8')) as Array<{ id: number; prewarmingPoolSize: number }>).map(
    ({ id, prewarmingPoolSize }) => ({ id, prewarmingPoolSize }),
  );

/* A read-only bind mount of the directory onto itself: read-only even for root, which ignores modes. */
function makeReadOnly(directory: string): () => void {
  execFileSync('mount', ['--bind', directory, directory]);
  execFileSync('mount', ['-o', 'remount,bind,ro', directory]);
  let mounted = true;
  return () => {
    if (mounted) execFileSync('umount', [directory]);
    mounted = false;
  };
}

test('with a read-only state directory PUT and DELETE answer 500 and change nothing: API, runners and file agree, also after a restart', async (t) => {
  const stateDir = await mkdtemp(path.join(tmpdir(), 'poseidon-state-ro-'));
  t.after(() => rm(stateDir, { recursive: true, force: true }));
  const config: ConfigTree = { local: { statedir: stateDir } };
  const daemon = await startDaemon({ config });
  t.after(() => daemon.stop());
  const client = new CodeOceanClient(daemon.baseUrl, daemon.token);
  assert.equal((await client.putEnvironment(environmentSpec(81, { prewarmingPoolSize: 1 }))).status, 201);
  assert.equal((await client.putEnvironment(environmentSpec(82, { prewarmingPoolSize: 1 }))).status, 201);
  await waitFor(
    () => stats(client),
    (s) => s['81']?.idleRunners === 1 && s['82']?.idleRunners === 1,
    'both pools to fill',
  );

  // Poseidon answers 500 when it cannot store an environment too; its swagger leaves that status out.
  const unvalidated = (method: 'PUT' | 'DELETE', spec: ReturnType<typeof environmentSpec>) =>
    client.request(
      method,
      '/execution-environments/{executionEnvironmentId}',
      { executionEnvironmentId: String(spec.id) },
      {
        ...(method === 'PUT' ? { body: { ...spec } } : {}),
        validate: false,
      },
    );
  const writable = makeReadOnly(stateDir);
  t.after(writable);
  const created = await unvalidated('PUT', environmentSpec(83));
  assert.equal(created.status, 500);
  assert.match(created.text, /cannot write its state directory \(EROFS\).*nothing was changed/);
  const resized = await unvalidated('PUT', environmentSpec(81, { prewarmingPoolSize: 2 }));
  assert.equal(resized.status, 500);
  const deleted = await unvalidated('DELETE', environmentSpec(82));
  assert.equal(deleted.status, 500);
  await waitFor(
    async () => daemon.logs(),
    (logs) => /cannot delete the environment in the state directory/.test(logs),
    'the failed DELETE to be logged',
    5_000,
    50,
  );

  assert.equal((await client.getEnvironment(83)).status, 404, 'the failed PUT created nothing');
  assert.equal(((await client.getEnvironment(81)).body as { prewarmingPoolSize: number }).prewarmingPoolSize, 1, 'the failed PUT changed nothing');
  assert.equal((await client.getEnvironment(82)).status, 200, 'the failed DELETE removed nothing');
  await sleep(300);
  const during = await stats(client);
  assert.deepEqual(Object.keys(during).sort(), ['81', '82']);
  assert.equal(during['81']?.prewarmingPoolSize, 1);
  assert.equal(during['82']?.idleRunners, 1, "the failed DELETE left the environment's runners alone");
  const runner = await client.claim(82);
  assert.equal((await client.run(runner, 'echo still')).stdout, 'still\r\n', 'its runners still serve');
  assert.deepEqual(storedIds(stateDir), [
    { id: 81, prewarmingPoolSize: 1 },
    { id: 82, prewarmingPoolSize: 1 },
  ]);

  writable();
  assert.equal((await client.deleteEnvironment(82)).status, 204, 'the DELETE can be retried');
  assert.equal((await client.putEnvironment(environmentSpec(84))).status, 201);
  assert.deepEqual(
    storedIds(stateDir),
    [
      { id: 81, prewarmingPoolSize: 1 },
      { id: 84, prewarmingPoolSize: 1 },
    ],
    'no failed change is carried into a later write',
  );
  await daemon.stop();

  const readOnlyAgain = makeReadOnly(stateDir);
  try {
    await assert.rejects(startDaemon({ config }), /local\.statedir .* is not writable \(EROFS\)/, 'a read-only state directory stops the start');
  } finally {
    readOnlyAgain();
  }
  const restarted = await startDaemon({ config });
  t.after(() => restarted.stop());
  const after = new CodeOceanClient(restarted.baseUrl, restarted.token);
  const environments = (await after.request('GET', '/execution-environments')).body as { executionEnvironments: Array<{ id: number }> };
  assert.deepEqual(environments.executionEnvironments.map((spec) => spec.id).sort(), [81, 84]);
});

test('a SIGKILLed daemon leaves no process; the restart removes its cgroups and socket directory', async (t) => {
  const cgroupParent = `${process.env.TEST_CGROUP_PARENT ?? 'poseidon-ts'}-k9-${randomBytes(3).toString('hex')}`;
  t.after(() => removeCgroupParent(cgroupParent));
  const stateDir = await mkdtemp(path.join(tmpdir(), 'poseidon-state-k9-'));
  t.after(() => rm(stateDir, { recursive: true, force: true }));
  const networkId = randomBytes(4).toString('hex');
  // The same network names for both runs, so the restart replaces what the killed run left.
  const config: ConfigTree = {
    local: {
      statedir: stateDir,
      cgroupparent: cgroupParent,
      network: { bridge: `ptk${networkId}`, table: `ptk_${networkId}`, subnet: `10.217.${randomInt(0, 256)}.0/24`, uplinks: [] },
    },
  };
  const first = await startDaemon({ config, detached: true });
  t.after(() => first.stop().catch(() => undefined));
  const client = new CodeOceanClient(first.baseUrl, first.token);
  assert.equal((await client.putEnvironment(environmentSpec(85, { prewarmingPoolSize: 2 }))).status, 201);
  await waitFor(
    () => stats(client),
    (s) => s['85']?.idleRunners === 2,
    'the pool to fill',
  );
  const runner = await client.claim(85);
  const marker = `k9-${randomBytes(4).toString('hex')}`;
  void client.connect(await client.websocketUrl(runner, `sleep 300 # ${marker}`, 0));
  await waitFor(
    async () => processesMatching(marker).length,
    (count) => count > 0,
    'the execution to run',
  );

  const tree = descendantsOf(first.pid);
  const spawner = tree.map((pid) => readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0')).find((argv) => argv[0]?.endsWith('poseidon-spawner'));
  const socketDirectory = path.dirname(spawner?.[1] ?? '');
  assert.ok(existsSync(socketDirectory), `the spawner's socket directory ${socketDirectory} exists`);
  const cgroups = runnerCgroups(cgroupParent);
  assert.ok(cgroups.length >= 2, 'runners have cgroups');

  process.kill(first.pid, 'SIGKILL');
  await first.exited;
  const alive = (): number[] => tree.filter((pid) => existsSync(`/proc/${pid}`) && !readFileSync(`/proc/${pid}/stat`, 'utf8').includes(') Z '));
  await waitFor(
    async () => alive(),
    (pids) => pids.length === 0,
    'every process of the killed run to end with it',
    5_000,
    100,
  );
  assert.equal(processesMatching(marker).length, 0);
  assert.ok(
    cgroups.some((cgroup) => existsSync(cgroup)),
    'the killed run could not remove its cgroups',
  );

  // Runner cgroups count as stale once they have been empty for a moment.
  await sleep(2_100);
  const second = await startDaemon({ config, env: { POSEIDON_LOGGER_LEVEL: 'info' } });
  t.after(() => second.stop());
  await waitFor(
    async () => existsSync(socketDirectory),
    (exists) => !exists,
    'the stale socket directory to be removed',
    5_000,
    100,
  );
  assert.deepEqual(
    cgroups.filter((cgroup) => existsSync(cgroup)),
    [],
    'the stale runner cgroups are removed',
  );
  assert.match(second.logs(), /removed runner cgroups left by an earlier daemon/);
  await second.stop();
});
