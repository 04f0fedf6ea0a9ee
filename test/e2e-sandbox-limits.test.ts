import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { createServer, type Server } from 'node:net';
import { after, describe, test } from 'node:test';
import { environmentSpec } from './support/codeocean-client.js';
import { processesMatching } from './support/daemon.js';
import { useDaemon } from './support/fixture.js';
import { sleep, waitFor } from './support/wait.js';

/*
 * What the sandbox must contain: runaway time, memory and processes, and network access when the
 * environment forbids it. Each test observes the effect from outside (exit codes, host /proc, a
 * host socket) so it fails when a limit is merely configured but not enforced.
 */

const TOKEN = 'limits-token-77c1';
const PIDS_LIMIT = 64;
const SMALL_ENV = 21;
const NET_ENV = 22;
let hostServer: Server | undefined;
let hostPort = 0;
let hostConnections = 0;

const fixture = useDaemon({ token: TOKEN, config: { local: { pidslimit: PIDS_LIMIT } } }, async ({ client }) => {
  const server = createServer((socket) => {
    hostConnections++;
    socket.end('hello from the host\n');
  });
  hostServer = server;
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const address = server.address();
  assert.ok(address !== null && typeof address === 'object');
  hostPort = address.port;
  assert.equal((await client.putEnvironment(environmentSpec(SMALL_ENV, { memoryLimit: 64, prewarmingPoolSize: 1 }))).status, 201);
  assert.equal((await client.putEnvironment(environmentSpec(NET_ENV, { networkAccess: true, prewarmingPoolSize: 1 }))).status, 201);
});

after(async () => {
  const server = hostServer;
  if (server !== undefined) await new Promise<void>((resolve) => server.close(() => resolve()));
});

const connectScript = (port: number): string =>
  `python3 -c "
import socket
try:
    s = socket.create_connection(('127.0.0.1', ${port}), timeout=3)
    print('CONNECTED', s.recv(100).decode().strip())
except Exception as e:
    print('BLOCKED', type(e).__name__)
"`;

describe('sandbox limits', () => {
  test('time limit: timeout message, then the server closes, and the process tree is killed', async () => {
    const { client } = fixture;
    const runnerId = await client.claim(SMALL_ENV);
    const marker = `${3000 + Math.floor(Math.random() * 900)}.${Math.floor(Math.random() * 1e6)}`;
    const result = await client.run(runnerId, `sleep ${marker} & sleep ${marker}; echo finished`, { timeLimit: 1, guardMs: 20_000 });
    assert.ok(result.gotTimeout, `expected a timeout message, got ${JSON.stringify(result.messages)}`);
    assert.ok(!result.stdout.includes('finished'));
    const lastIndex = result.messages.findIndex((m) => m.type === 'timeout');
    assert.ok(!result.messages.slice(lastIndex + 1).some((m) => m.type === 'stdout'), 'no output after timeout');
    // Both sleeps, including the backgrounded one, belong to the execution and must die with it.
    await waitFor(
      async () => processesMatching(`sleep ${marker}`).length,
      (n) => n === 0,
      'the timed-out process tree to be killed',
      10_000,
    );
    // CodeOcean deletes the runner after a timeout; it may already be gone.
    assert.ok([204, 410].includes((await client.deleteRunner(runnerId)).status));
  });

  test('memory limit: allocating far beyond memoryLimit ends with exit 137', async () => {
    const { client } = fixture;
    const runnerId = await client.claim(SMALL_ENV);
    const result = await client.run(runnerId, `python3 -c "b = b'x' * (500 * 1024 * 1024); print(len(b))"`, { timeLimit: 20, guardMs: 40_000 });
    assert.ok(!result.stdout.includes('524288000'), 'the allocation must not succeed under a 64 MB limit');
    assert.equal(result.exitCode, 137, `expected exit 137 (OOM), got ${JSON.stringify(result.messages)}`);
    const status = (await client.deleteRunner(runnerId)).status;
    assert.ok([204, 410].includes(status));
  });

  test('fork bomb is contained by the pids limit and the daemon keeps serving', async () => {
    const { client } = fixture;
    const runnerId = await client.claim(SMALL_ENV);
    const marker = `forkbomb-${randomUUID()}`;
    // `$0` carries the marker into every forked shell, so host /proc can count the bomb.
    const pending = client.run(runnerId, `sh -c 'f() { f | f & }; f; sleep 4' ${marker}`, { timeLimit: 3, guardMs: 30_000 });
    let peak = 0;
    for (let i = 0; i < 15; i++) {
      peak = Math.max(peak, processesMatching(marker).length);
      await sleep(200);
    }
    const result = await pending;
    assert.ok(result.exitCode !== undefined || result.gotTimeout, 'the execution must end with exit or timeout');
    // A few extra processes (bwrap, the daemon's exec wrapper) carry the marker outside the limit.
    assert.ok(peak <= PIDS_LIMIT + 8, `fork bomb reached ${peak} processes, above the pids limit ${PIDS_LIMIT}`);

    assert.equal((await client.health()).status, 204, 'daemon must still serve /health');
    const other = await client.claim(SMALL_ENV);
    const echo = await client.run(other, 'echo alive');
    assert.equal(echo.stdout.trim(), 'alive');
    assert.equal((await client.deleteRunner(other)).status, 204);

    assert.ok([204, 410].includes((await client.deleteRunner(runnerId)).status));
    await waitFor(
      async () => processesMatching(marker).length,
      (n) => n === 0,
      'fork bomb processes to be gone after the runner was deleted',
      15_000,
    );
  });

  test('networkAccess false: no connection even to 127.0.0.1 on the host', async () => {
    const { client } = fixture;
    const runnerId = await client.claim(SMALL_ENV);
    const before = hostConnections;
    const result = await client.run(runnerId, connectScript(hostPort), { timeLimit: 15 });
    assert.equal(result.exitCode, 0, result.stderr);
    assert.match(result.stdout, /BLOCKED/, `runner without network reached the host: ${result.stdout}`);
    assert.equal(hostConnections, before, 'the host listener saw a connection from the sandbox');
    assert.equal((await client.deleteRunner(runnerId)).status, 204);
  });

  // With networkAccess a runner has a private network: the host's loopback stays out of reach.
  // test/security/network.test.ts shows the same runner reaching a (test) public host through NAT.
  test('networkAccess true: no connection to 127.0.0.1 on the host either', async () => {
    const { client } = fixture;
    const runnerId = await client.claim(NET_ENV);
    const before = hostConnections;
    const result = await client.run(runnerId, connectScript(hostPort), { timeLimit: 15 });
    assert.equal(result.exitCode, 0, result.stderr);
    assert.match(result.stdout, /BLOCKED/, `runner with network reached the host's loopback: ${result.stdout}`);
    assert.equal(hostConnections, before, 'the host listener saw a connection from the sandbox');
    assert.equal((await client.deleteRunner(runnerId)).status, 204);
  });

  test('commands run unprivileged unless privilegedExecution is set', async () => {
    const { client } = fixture;
    const runnerId = await client.claim(SMALL_ENV);
    const normal = await client.run(runnerId, 'id -u');
    assert.notEqual(normal.stdout.trim(), '0', 'unprivileged execution ran as root');
    assert.match(normal.stdout.trim(), /^\d+$/);
    const privileged = await client.run(runnerId, 'id -u', { privilegedExecution: true });
    assert.equal(privileged.stdout.trim(), '0');
    // Each execution enters the same sandbox: a file from one is seen by the next, the host's /tmp is not.
    await client.run(runnerId, 'sh -c "echo persisted > /tmp/probe-file"');
    const read = await client.run(runnerId, 'cat /tmp/probe-file');
    assert.equal(read.stdout.trim(), 'persisted');
    assert.equal((await client.deleteRunner(runnerId)).status, 204);
  });
});
