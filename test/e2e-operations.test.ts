import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { test } from 'node:test';
import WebSocket from 'ws';
import { parse, stringify } from 'yaml';
import { removeCgroupParent, runnerCgroups } from './support/cgroups.js';
import { CodeOceanClient, environmentSpec } from './support/codeocean-client.js';
import { processesMatching, REPO_ROOT, startDaemon } from './support/daemon.js';
import { sleep, waitFor } from './support/wait.js';

/*
 * The daemon as a service: drain on SIGTERM to its whole process group, SIGHUP, Poseidon's own
 * configuration with Poseidon's -config flag.
 */

const ownCgroupParent = (): string => `${process.env.TEST_CGROUP_PARENT ?? 'poseidon-ts'}-ops-${randomBytes(3).toString('hex')}`;

const idleRunners = async (client: CodeOceanClient, id: number): Promise<number> => {
  const response = await client.statistics();
  return (response.body as Record<string, { idleRunners: number }>)[String(id)]?.idleRunners ?? -1;
};

test('SIGTERM to the process group drains: health 503, claims refused, executions finish or get error + 1001, exit 0, nothing left', async (t) => {
  const cgroupParent = ownCgroupParent();
  t.after(() => removeCgroupParent(cgroupParent));
  const daemon = await startDaemon({
    detached: true,
    config: { server: { shutdowntimeout: 3 }, logger: { level: 'info' }, local: { cgroupparent: cgroupParent } },
  });
  t.after(() => daemon.stop());
  const client = new CodeOceanClient(daemon.baseUrl, daemon.token);
  assert.equal((await client.putEnvironment(environmentSpec(71, { prewarmingPoolSize: 3 }))).status, 201);
  await waitFor(
    () => idleRunners(client, 71),
    (idle) => idle === 3,
    'the pool to fill',
  );
  const [short, long] = [await client.claim(71), await client.claim(71)];

  const marker = `drain-${randomBytes(4).toString('hex')}`;
  const finishing = client.connect(await client.websocketUrl(short, 'sleep 1.5; echo finished', 0));
  const cut = client.connect(await client.websocketUrl(long, `sleep 300 # ${marker}`, 0));
  await waitFor(
    async () => processesMatching(marker).length,
    (count) => count > 0,
    'the long execution to run',
  );

  process.kill(-daemon.pid, 'SIGTERM');
  const signalled = Date.now();
  await waitFor(
    async () => (await fetch(`${daemon.baseUrl}/health`)).status,
    (status) => status === 503,
    'health to turn 503',
    2_000,
    20,
  );
  const health = (await (await fetch(`${daemon.baseUrl}/health`)).json()) as { message: string };
  assert.match(health.message, /shutting down \(SIGTERM\)/);
  const claim = await client.claimRunner(71, 60);
  assert.equal(claim.status, 500, 'a claim during the drain is refused');
  assert.match(claim.text, /NOMAD_OVERLOAD/, 'with the code CodeOcean shows as "try again later"');
  assert.match(claim.text, /shutting down/);

  const finished = await finishing;
  assert.equal(finished.exitCode, 0, 'an execution that ends within the grace period finishes normally');
  assert.match(finished.stdout, /^finished\r?\n$/);
  assert.equal(finished.closeCode, 1000);

  const ended = await cut;
  assert.equal(ended.exitCode, undefined);
  assert.ok(
    ended.errors.some((error) => /shutting down \(SIGTERM\).*grace period of 3 s/.test(error)),
    `an error names the shutdown: ${JSON.stringify(ended.messages)}`,
  );
  assert.equal(ended.closeCode, 1001);
  const elapsed = Date.now() - signalled;
  assert.ok(elapsed >= 2_500 && elapsed < 8_000, `the long execution was cut at the end of the grace period (${elapsed} ms)`);

  const exit = await daemon.exited;
  assert.deepEqual(exit, { code: 0, signal: null }, `the drained daemon exits 0; log:\n${daemon.logs().slice(-3000)}`);
  assert.equal(processesMatching(marker).length, 0, 'no learner process is left');
  assert.deepEqual(daemon.sandboxPids(), [], 'no sandbox is left');
  assert.deepEqual(runnerCgroups(cgroupParent), [], 'no runner cgroup is left');
  assert.doesNotMatch(daemon.logs(), /sandbox spawner exited|all its sandboxes are gone/, 'the spawner ignored the group signal and ended with the daemon');
});

test('SIGHUP re-reads the log level without a restart, and says so', async (t) => {
  const daemon = await startDaemon({ detached: true, config: { logger: { level: 'warn' } } });
  t.after(() => daemon.stop());
  const client = new CodeOceanClient(daemon.baseUrl, daemon.token);
  await client.statistics();
  assert.doesNotMatch(daemon.logs(), /"msg":"request"/, 'at warn, requests are not logged');

  const tree = parse(readFileSync(daemon.configPath, 'utf8')) as { logger: { level: string } };
  tree.logger.level = 'INFO';
  writeFileSync(daemon.configPath, stringify(tree));
  process.kill(daemon.pid, 'SIGHUP');
  await waitFor(
    async () => daemon.logs(),
    (logs) => /configuration reloaded/.test(logs),
    'the reload to be logged',
    5_000,
    50,
  );
  assert.match(daemon.logs(), /"previousLevel":"warn","level":"info"/);
  await client.statistics();
  await waitFor(
    async () => daemon.logs(),
    (logs) => /"msg":"request"/.test(logs),
    'a request line at the new level',
    5_000,
    50,
  );
  assert.equal((await fetch(`${daemon.baseUrl}/health`)).status, 204, 'the daemon still serves');
});

test("Poseidon's own example configuration, given with Poseidon's -config flag, starts the daemon with one warning per unimplemented key", async (t) => {
  const example = readFileSync(path.join(REPO_ROOT, 'test', 'fixtures', 'poseidon', 'configuration.example.yaml'), 'utf8');
  const daemon = await startDaemon({ configText: example, args: (configPath) => ['-config', configPath] });
  t.after(() => daemon.stop());
  assert.equal((await fetch(`${daemon.baseUrl}/health`)).status, 204);
  await sleep(100);
  const warned = daemon
    .logs()
    .split('\n')
    .filter((line) => line.includes('is not implemented by poseidon-ts'))
    .map((line) => JSON.parse(line) as { key: string; level: number | string });
  assert.ok(
    warned.every((line) => line.level === 40 || line.level === 'warn'),
    'each is a warning',
  );
  assert.deepEqual(warned.map((line) => line.key).sort(), [
    'profiling.cpufile',
    'profiling.memoryinterval',
    'profiling.memorythreshold',
    'server.alert.prewarmingpoolreloadtimeout',
  ]);
});

test('a stalled request body is answered 408 and cut after server.requesttimeout; a client breaking the WebSocket protocol is a warning', async (t) => {
  const daemon = await startDaemon({ token: 'secret', config: { server: { requesttimeout: 1 }, logger: { level: 'info' } } });
  t.after(() => daemon.stop());
  const socket = net.connect(daemon.port, '127.0.0.1');
  t.after(() => socket.destroy());
  let answer = '';
  socket.on('data', (chunk: Buffer) => {
    answer += chunk.toString();
  });
  const closed = new Promise<void>((resolve) => socket.once('close', () => resolve()));
  const started = Date.now();
  socket.write('POST /api/v1/runners HTTP/1.1\r\nHost: x\r\nPoseidon-Token: secret\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"executi');
  await closed;
  const elapsed = Date.now() - started;
  assert.match(answer, /^HTTP\/1\.1 408/);
  assert.ok(elapsed >= 900 && elapsed < 4_000, `cut after about a second (${elapsed} ms)`);

  const client = new CodeOceanClient(daemon.baseUrl, daemon.token);
  await client.putEnvironment(environmentSpec(72, { prewarmingPoolSize: 1 }));
  const runner = await client.claim(72);
  const ws = new WebSocket(await client.websocketUrl(runner, 'sleep 30', 0), { headers: client.defaultHeaders() });
  await new Promise<void>((resolve, reject) => {
    ws.once('message', () => resolve());
    ws.once('error', reject);
  });
  const wsClosed = new Promise<void>((resolve) => ws.once('close', () => resolve()));
  ws.send('x'.repeat(2 * 1024 * 1024));
  await wsClosed;
  const line = await waitFor(
    async () =>
      daemon
        .logs()
        .split('\n')
        .find((entry) => entry.includes('WebSocket client broke the protocol')),
    (found) => found !== undefined,
    'the protocol error to be logged',
    5_000,
    50,
  );
  const logged = JSON.parse(line ?? '{}') as { level: number | string; code: string; err?: unknown };
  assert.ok(logged.level === 40 || logged.level === 'warn');
  assert.equal(logged.code, 'WS_ERR_UNSUPPORTED_MESSAGE_LENGTH');
  assert.equal(logged.err, undefined, 'no stack');
});
