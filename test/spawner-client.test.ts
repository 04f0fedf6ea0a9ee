import assert from 'node:assert/strict';
import { chownSync, existsSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import type net from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { AgentClient } from '../src/local/agent/agent-client.js';
import { AGENT_BINARY, ensureAgentBuilt, SPAWNER_BINARY } from '../src/local/binaries.js';
import { idmappedPath, type SpawnedProcess, SpawnerClient } from '../src/local/spawner-client.js';
import { agentCommandArguments, minimalSandboxArguments } from './support/agent-sandbox.js';

/*
 * The spawner (agent/poseidon-spawner.c) forks for the daemon: a spawned process talks over one
 * unix socket as stdin and stdout, its stderr comes back with its exit status, and nothing it
 * started outlives the spawner.
 */

async function readAll(socket: net.Socket): Promise<string> {
  socket.resume();
  let text = '';
  for await (const chunk of socket) text += String(chunk);
  return text;
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return !readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]?.startsWith('Z');
  } catch {
    return false;
  }
}

async function waitUntil(condition: () => boolean, timeoutMs = 5000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error('timed out');
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

describe('sandbox spawner', () => {
  let spawner: SpawnerClient;
  const deaths: string[] = [];

  before(() => {
    ensureAgentBuilt();
    assert.ok(existsSync(SPAWNER_BINARY));
    spawner = new SpawnerClient(SPAWNER_BINARY, (message) => deaths.push(message));
  });

  after(async () => {
    await spawner.close();
  });

  test('the socket is stdin and stdout; stderr and the status come with the exit', async () => {
    const child = spawner.spawn(['/bin/sh', '-c', 'read line; echo "got $line $FOO"; echo oops >&2; exit 3'], { FOO: 'bar', PATH: '/usr/bin:/bin' });
    const socket = await child.connection;
    const output = readAll(socket);
    socket.write('hello\n');
    assert.equal(await output, 'got hello bar\n');
    const exit = await child.exited;
    assert.deepEqual(exit, { code: 3, signal: null, stderr: 'oops\n' });
    assert.ok(typeof child.pid === 'number' && child.pid > 0);
  });

  test('a user namespace of the given host range, the child its root, with no nested user namespaces', async () => {
    const base = 0x6000_0000 + 4095 * 65536;
    const child = spawner.spawn(
      [
        '/bin/sh',
        '-c',
        'id -u; cat /proc/self/uid_map /proc/self/gid_map /proc/sys/user/max_user_namespaces; unshare -U true 2>/dev/null || echo nested-refused',
      ],
      { PATH: '/usr/bin:/bin' },
      { userNamespace: { base, count: 65536 } },
    );
    const output = readAll(await child.connection);
    const lines = (await output).split('\n').map((line) => line.trim().split(/\s+/).join(' '));
    assert.deepEqual(lines.slice(0, 5), ['0', `0 ${base} 65536`, `0 ${base} 65536`, '0', 'nested-refused']);
    assert.equal((await child.exited).code, 0);
  });

  test('an idmapped directory: image ids seen unchanged in the user namespace, read-only, mounted only in the child', async (t) => {
    const directory = mkdtempSync(path.join(tmpdir(), 'poseidon-idmap-'));
    t.after(() => rmSync(directory, { recursive: true, force: true }));
    writeFileSync(path.join(directory, 'owned'), 'x');
    chownSync(path.join(directory, 'owned'), 1000, 1001);
    writeFileSync(path.join(directory, 'root-only'), 'secret', { mode: 0o600 });
    const base = 0x6000_0000 + 4094 * 65536;
    const root = idmappedPath(0);
    const child = spawner.spawn(
      ['/bin/sh', '-c', `stat -c '%u:%g %n' ${root}/owned ${root}/root-only; cat ${root}/root-only; echo; touch ${root}/new 2>/dev/null || echo read-only`],
      { PATH: '/usr/bin:/bin' },
      { userNamespace: { base, count: 65536 }, idmapped: [directory] },
    );
    const output = await readAll(await child.connection);
    assert.deepEqual(output.trim().split('\n'), [`1000:1001 ${root}/owned`, `0:0 ${root}/root-only`, 'secret', 'read-only']);
    assert.equal((await child.exited).code, 0);
    assert.ok(!readFileSync('/proc/self/mountinfo', 'utf8').includes('.poseidon-idmapped'), 'the host sees no mount');
    assert.equal(statSync(path.join(directory, 'owned')).uid, 1000, 'nothing was chowned on disk');
    for (const refused of [
      spawner.spawn(['/bin/true'], {}, { idmapped: [directory] }),
      spawner.spawn(['/bin/true'], {}, { userNamespace: { base, count: 65536 }, idmapped: ['relative/path'] }),
    ]) {
      assert.match((await refused.exited).stderr, /bad SPAWN request/);
    }
  });

  test('a network namespace with only loopback, up', async () => {
    const child = spawner.spawn(
      ['/bin/sh', '-c', 'cat /proc/net/dev | tail -n +3 | cut -d: -f1; cat /sys/class/net/lo/operstate'],
      { PATH: '/usr/bin:/bin' },
      { networkNamespace: true },
    );
    const output = await readAll(await child.connection);
    assert.deepEqual(
      output
        .split('\n')
        .map((line) => line.trim())
        .filter(Boolean),
      ['lo', 'unknown'],
    );
    assert.equal((await child.exited).code, 0);
  });

  test('data blobs arrive as pipes at their fds; a bad fd number is refused', async () => {
    const child = spawner.spawn(
      ['/bin/sh', '-c', 'cat <&7; cat <&5'],
      { PATH: '/usr/bin:/bin' },
      {
        data: [
          { fd: 7, bytes: Buffer.from('seven ') },
          { fd: 5, bytes: Buffer.alloc(100_000, 'x') },
        ],
      },
    );
    const output = await readAll(await child.connection);
    assert.equal(output, `seven ${'x'.repeat(100_000)}`);
    const refused = spawner.spawn(['/bin/true'], {}, { data: [{ fd: 1, bytes: Buffer.from('no') }] });
    assert.match((await refused.exited).stderr, /bad SPAWN request/);
  });

  test('kill ends the process with SIGKILL', async () => {
    const child = spawner.spawn(['/bin/sleep', '30'], {});
    (await child.connection).destroy();
    await waitUntil(() => child.pid !== undefined);
    child.kill();
    const exit = await child.exited;
    assert.equal(exit.signal, 'SIGKILL');
    assert.equal(alive(child.pid ?? 0), false);
  });

  test('detach swaps a waiting parent for its only child, which kill and exited then concern', async () => {
    // `; exit 7` keeps sh from exec'ing sleep: sh waits for its one child, as bubblewrap does for a sandbox.
    const child = spawner.spawn(['/bin/sh', '-c', 'sleep 30; exit 7'], { PATH: '/usr/bin:/bin' });
    (await child.connection).destroy();
    // Waits until the child has finished exec'ing sleep: during an exec its cmdline reads empty.
    const childOf = (pid: number) => readFileSync(`/proc/${pid}/task/${pid}/children`, 'utf8').trim();
    await waitUntil(() => {
      const grandchild = child.pid === undefined ? '' : childOf(child.pid);
      return grandchild !== '' && /^sleep\0/.test(readFileSync(`/proc/${grandchild}/cmdline`, 'utf8'));
    });
    const waiter = child.pid ?? 0;
    await child.detach();
    assert.notEqual(child.pid, waiter, 'the held process is the child now');
    assert.match(readFileSync(`/proc/${child.pid}/cmdline`, 'utf8'), /^sleep\0/);
    await waitUntil(() => !alive(waiter));
    const spawnerPid = Number(readFileSync(`/proc/${child.pid}/status`, 'utf8').match(/^PPid:\s+(\d+)/m)?.[1]);
    assert.match(readFileSync(`/proc/${spawnerPid}/cmdline`, 'utf8'), /poseidon-spawner/, 'the spawner adopted the child');
    child.kill();
    assert.equal((await child.exited).signal, 'SIGKILL', "the exit is the adopted child's, not the waiter's exit 7");
    assert.equal(alive(child.pid ?? 0), false);
  });

  test('detach keeps a process that has no child of its own', async () => {
    const child = spawner.spawn(['/bin/sleep', '30'], {});
    (await child.connection).destroy();
    await waitUntil(() => child.pid !== undefined);
    const pid = child.pid;
    await child.detach();
    assert.equal(child.pid, pid);
    assert.ok(alive(pid ?? 0));
    child.kill();
    assert.equal((await child.exited).signal, 'SIGKILL');
  });

  test('a program that cannot be executed exits 126 with the reason on stderr', async () => {
    const child = spawner.spawn(['/nonexistent/program'], {});
    const exit = await child.exited;
    assert.equal(exit.code, 126);
    assert.match(exit.stderr, /nonexistent\/program: No such file/);
    (await child.connection).destroy();
  });

  test('many spawns at once each get their own connection', async () => {
    const children = Array.from({ length: 20 }, (_, index) => spawner.spawn(['/bin/sh', '-c', `echo ${index}`], {}));
    const outputs = await Promise.all(children.map(async (child) => readAll(await child.connection)));
    assert.deepEqual(
      outputs,
      children.map((_, index) => `${index}\n`),
    );
    await Promise.all(children.map((child) => child.exited));
  });

  test('a bwrap sandbox runs the agent over the socket', async () => {
    const child = spawner.spawn(
      ['/usr/bin/env', 'bwrap', ...minimalSandboxArguments(), '--perms', '1777', '--tmpfs', '/workspace', ...agentCommandArguments(AGENT_BINARY)],
      { PATH: '/usr/local/bin:/usr/bin:/bin' },
    );
    const socket = await child.connection;
    const agent = new AgentClient(socket, socket);
    socket.resume();
    await agent.ready;
    let stdout = '';
    const execution = agent.exec(
      ['/bin/sh', '-c', 'echo $$'],
      { env: {}, privileged: false },
      { onStdout: (chunk) => (stdout += String(chunk)), onStderr: () => undefined },
    );
    assert.equal((await execution.result).exitCode, 0);
    assert.match(stdout, /^[0-9]+\n$/); // a pid of the sandbox's own pid namespace
    assert.ok(Number(stdout) < 10);
    agent.close();
    assert.equal((await child.exited).code, 0);
  });

  test('a dead spawner ends its processes and is restarted on the next spawn', async () => {
    const first = spawner.spawn(['/bin/sleep', '30'], {});
    (await first.connection).destroy();
    await waitUntil(() => first.pid !== undefined);
    const spawnerPid = Number(readFileSync(`/proc/${first.pid}/stat`, 'utf8').split(') ')[1]?.split(' ')[1]);
    process.kill(spawnerPid, 'SIGKILL');
    const exit = await first.exited;
    assert.match(exit.stderr, /spawner exited/);
    assert.equal(deaths.length, 1);
    await waitUntil(() => !alive(first.pid ?? 0));
    const second: SpawnedProcess = spawner.spawn(['/bin/sh', '-c', 'echo again'], {});
    assert.equal(await readAll(await second.connection), 'again\n');
    assert.equal((await second.exited).code, 0);
  });

  test('closing the client kills the spawner and everything it started', async () => {
    const other = new SpawnerClient(SPAWNER_BINARY, (message) => deaths.push(message));
    const child = other.spawn(['/bin/sleep', '30'], {});
    (await child.connection).destroy();
    await waitUntil(() => child.pid !== undefined);
    await other.close();
    await waitUntil(() => !alive(child.pid ?? 0));
    assert.throws(() => other.spawn(['/bin/true'], {}), /closed/);
  });

  test('the socket directory is private', async () => {
    const child = spawner.spawn(['/bin/true'], {});
    (await child.connection).destroy();
    await child.exited;
    const directories = readFileSync('/proc/self/net/unix', 'utf8').match(/\/\S*poseidon-spawner-[^/\s]+/g) ?? [];
    assert.ok(directories.length > 0);
    for (const directory of directories) if (existsSync(directory)) assert.equal(statSync(directory).mode & 0o777, 0o700);
  });
});
