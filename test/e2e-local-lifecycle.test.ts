import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import WebSocket from 'ws';
import { CodeOceanClient, environmentSpec } from './support/codeocean-client.js';
import { freePort, processesMatching, REPO_ROOT, startDaemon } from './support/daemon.js';
import { sleep, waitFor } from './support/wait.js';

const idleRunners = async (client: CodeOceanClient, id: number): Promise<number> => {
  const response = await client.statistics();
  const stats = (response.body as Record<string, { idleRunners: number }>)[String(id)];
  return stats?.idleRunners ?? -1;
};

test('environments are stored on disk and come back, with full pools, after a restart', async (t) => {
  const stateDir = await mkdtemp(path.join(tmpdir(), 'poseidon-state-'));
  t.after(() => rm(stateDir, { recursive: true, force: true }));
  const config = { local: { statedir: stateDir } };

  const first = await startDaemon({ config });
  try {
    const client = new CodeOceanClient(first.baseUrl, first.token);
    assert.equal((await client.putEnvironment(environmentSpec(61, { prewarmingPoolSize: 2, memoryLimit: 96 }))).status, 201);
    assert.equal((await client.putEnvironment(environmentSpec(62))).status, 201);
    assert.equal((await client.deleteEnvironment(62)).status, 204);
  } finally {
    await first.stop();
  }

  const second = await startDaemon({ config });
  try {
    const client = new CodeOceanClient(second.baseUrl, second.token);
    const environment = await client.getEnvironment(61);
    assert.equal(environment.status, 200);
    assert.deepEqual(environment.body, environmentSpec(61, { prewarmingPoolSize: 2, memoryLimit: 96 }));
    assert.equal((await client.getEnvironment(62)).status, 404, 'a deleted environment stays deleted');
    await waitFor(
      () => idleRunners(client, 61),
      (idle) => idle === 2,
      'the reloaded pool to fill',
    );
    const runnerId = await client.claim(61);
    const result = await client.run(runnerId, 'echo back');
    assert.equal(result.stdout, 'back\r\n');
  } finally {
    await second.stop();
  }
});

test('files and background processes persist between executions; a client that leaves kills its execution', async (t) => {
  const daemon = await startDaemon();
  t.after(() => daemon.stop());
  const client = new CodeOceanClient(daemon.baseUrl, daemon.token);
  await client.putEnvironment(environmentSpec(63, { prewarmingPoolSize: 1 }));
  const runnerId = await client.claim(63);

  // trap "" HUP: executions have a terminal, and its session leader's exit sends SIGHUP to the
  // foreground process group, background jobs of `sh -c` included (as in Poseidon).
  const background = await client.run(runnerId, 'trap "" HUP; sleep 300 >/dev/null 2>&1 & echo $! > sleeper.pid; echo started');
  assert.equal(background.exitCode, 0);
  const check = await client.run(runnerId, 'kill -0 "$(cat sleeper.pid)" && echo alive');
  assert.equal(check.stdout, 'alive\r\n', 'a background process of an earlier execution is still running');

  const marker = `left-${randomUUID()}`;
  const url = await client.websocketUrl(runnerId, `sleep 300 # ${marker}`, 0);
  const socket = new WebSocket(url, { headers: client.defaultHeaders() });
  await new Promise<void>((resolve, reject) => {
    socket.once('message', () => resolve());
    socket.once('error', reject);
  });
  await waitFor(
    async () => processesMatching(marker).length,
    (count) => count > 0,
    'the execution to run',
  );
  socket.close();
  await waitFor(
    async () => processesMatching(marker).length,
    (count) => count === 0,
    'the execution to be killed',
  );
});

test('a pool that cannot be filled: health 503, claims 500 NOMAD_OVERLOAD, the daemon keeps serving', async (t) => {
  const missingRoot = path.join(tmpdir(), `no-such-rootfs-${randomUUID()}`);
  // claimtimeout 0: the claim below relies on Poseidon's immediate answer, not on a wait for a build.
  const daemon = await startDaemon({ config: { runners: { claimtimeout: 0 }, local: { images: { 'broken:image': missingRoot } } } });
  t.after(() => daemon.stop());
  const client = new CodeOceanClient(daemon.baseUrl, daemon.token);
  assert.equal((await client.putEnvironment(environmentSpec(64, { image: 'broken:image', prewarmingPoolSize: 2 }))).status, 201);
  // Not at once: 503 needs server.alert.buildfailurethreshold (3) failed builds in a row, about half a second.
  const health = await waitFor(
    () => client.health(),
    (answer) => answer.status !== 204,
    'health to report the unbuildable pool',
    15_000,
    100,
  );
  assert.equal(health.status, 503);
  assert.match(
    (health.body as { message: string }).message,
    /runners of execution environment 64 cannot be built \(\d+ failures in a row, last: .*no-such-rootfs/,
  );
  const claim = await client.claimRunner(64);
  assert.equal(claim.status, 500);
  assert.equal((claim.body as { errorCode: string }).errorCode, 'NOMAD_OVERLOAD');
  assert.equal((await client.deleteEnvironment(64)).status, 204);
  assert.equal((await client.health()).status, 204);
});

test('a second claim on a pool of 1 waits for the runner being built instead of answering NOMAD_OVERLOAD', async (t) => {
  const token = 'claim-wait-token';
  const daemon = await startDaemon({ token, config: { runners: { claimtimeout: 10 } } });
  t.after(() => daemon.stop());
  const client = new CodeOceanClient(daemon.baseUrl, daemon.token);
  assert.equal((await client.putEnvironment(environmentSpec(68, { prewarmingPoolSize: 1 }))).status, 201);
  await waitFor(
    () => idleRunners(client, 68),
    (idle) => idle === 1,
    'the pool to fill',
  );
  // Both at once: the first takes the idle runner, the second finds the pool empty and a build under way.
  const claims = await Promise.all([client.claimRunner(68), client.claimRunner(68)]);
  for (const claim of claims) assert.equal(claim.status, 200, claim.text);
  const ids = claims.map((claim) => (claim.body as { runnerId: string }).runnerId);
  assert.notEqual(ids[0], ids[1]);
  const metrics = await (await fetch(`${daemon.origin}/metrics`, { headers: { 'Poseidon-Token': token } })).text();
  assert.match(metrics, /poseidon_runner_claim_wait_seconds_count\{environment_id="68",outcome="served"\} 1\b/);
  for (const id of ids) assert.equal((await client.deleteRunner(id)).status, 204);
});

test('a wrong configuration stops the start with a message naming the key', async (t) => {
  const directory = await mkdtemp(path.join(tmpdir(), 'poseidon-badconfig-'));
  t.after(() => rm(directory, { recursive: true, force: true }));
  const file = path.join(directory, 'config.yaml');
  await writeFile(file, 'server:\n  port: 99999\nlocal:\n  cgroups: sometimes\n');
  const run = spawnSync(process.execPath, ['--import', 'tsx', 'src/cli.ts', '--config', file], { cwd: REPO_ROOT, encoding: 'utf8', timeout: 30_000 });
  assert.equal(run.status, 1);
  assert.match(run.stderr, /server\.port/);
  assert.match(run.stderr, /local\.cgroups/);
  const help = spawnSync(process.execPath, ['--import', 'tsx', 'src/cli.ts', '--help'], { cwd: REPO_ROOT, encoding: 'utf8', timeout: 30_000 });
  assert.equal(help.status, 0);
  assert.match(help.stdout, /--config FILE/);
});

test('with networkAccess, an exposed port is reachable at the reported mappedPorts address', async (t) => {
  const daemon = await startDaemon();
  t.after(() => daemon.stop());
  const client = new CodeOceanClient(daemon.baseUrl, daemon.token);
  const port = await freePort();
  await client.putEnvironment(environmentSpec(65, { prewarmingPoolSize: 1, networkAccess: true, exposedPorts: [port] }));
  let claim = await client.claimRunner(65);
  for (let attempt = 0; claim.status !== 200 && attempt < 50; attempt += 1) {
    await sleep(200);
    claim = await client.claimRunner(65);
  }
  const { runnerId, mappedPorts } = claim.body as { runnerId: string; mappedPorts: Array<{ exposedPort: number; hostAddress: string }> };
  // Published by a relay on the host address, on a port of its own (two runners may expose one port).
  assert.equal(mappedPorts.length, 1);
  assert.equal(mappedPorts[0]?.exposedPort, port);
  assert.match(mappedPorts[0]?.hostAddress ?? '', /^127\.0\.0\.1:\d+$/);

  await client.copySubmission(runnerId, { 'index.html': 'served from the runner\n' });
  const started = await client.run(runnerId, `trap "" HUP; python3 -m http.server ${port} --bind 0.0.0.0 >/dev/null 2>&1 & echo started`);
  assert.equal(started.exitCode, 0);
  const body = await waitFor(
    () =>
      fetch(`http://${mappedPorts[0]?.hostAddress}/index.html`).then(
        (response) => response.text(),
        () => '',
      ),
    (text) => text !== '',
    'the runner to serve on its exposed port',
    // Python starts at the sandboxes' nice 10: on a loaded 2-core host that alone can take many seconds.
    60_000,
  );
  assert.equal(body, 'served from the runner\n');
  assert.equal((await client.deleteRunner(runnerId)).status, 204);
  await waitFor(
    () =>
      fetch(`http://${mappedPorts[0]?.hostAddress}/`).then(
        () => 'up',
        () => 'down',
      ),
    (state) => state === 'down',
    'the server to end with its runner',
  );
});

test('a runner whose sandbox dies on its own is gone (410) and its pool refills', async (t) => {
  const daemon = await startDaemon();
  t.after(() => daemon.stop());
  const client = new CodeOceanClient(daemon.baseUrl, daemon.token);
  await client.putEnvironment(environmentSpec(66, { prewarmingPoolSize: 1 }));
  const runnerId = await client.claim(66);
  // The agent is the sandbox's pid 1, which nothing inside can kill: end it from the host, as a
  // crash or the host's OOM killer would.
  const marker = `lost-${randomUUID()}`;
  const running = client.connect(await client.websocketUrl(runnerId, `exec sh -c 'sleep 30; true' ${marker}`, 60, true));
  await waitFor(
    async () => processesMatching(marker).length,
    (count) => count === 1,
    'the execution to run',
  );
  const agentPid = Number(/^PPid:\s+(\d+)/m.exec(readFileSync(`/proc/${processesMatching(marker)[0]}/status`, 'utf8'))?.[1]);
  process.kill(agentPid, 'SIGKILL');
  const killed = await running;
  assert.deepEqual(killed.errors, ['the sandbox agent is gone'], 'the execution reports why it ended');
  await waitFor(
    async () => (await client.listFiles(runnerId)).status,
    (status) => status === 410,
    'the lost runner to answer 410',
  );
  await waitFor(
    () => idleRunners(client, 66),
    (idle) => idle === 1,
    'the pool to refill',
  );
  assert.match(daemon.logs(), /sandbox ended unexpectedly/);
});
