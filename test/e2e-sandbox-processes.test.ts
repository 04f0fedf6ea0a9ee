import assert from 'node:assert/strict';
import { existsSync, readFileSync } from 'node:fs';
import { after, before, describe, test } from 'node:test';
import { CodeOceanClient, environmentSpec } from './support/codeocean-client.js';
import { type Daemon, descendantsOf, processesMatching, startDaemon } from './support/daemon.js';
import { hostExecutable, sleepMarker } from './support/security.js';
import { waitFor } from './support/wait.js';

/*
 * What a runner costs on the host in processes: one, the sandbox's pid 1 (the agent), adopted by
 * the spawner once the sandbox is up; bubblewrap's waiting process is gone. As the pid namespace's
 * init, the agent reaps every orphan of learner code.
 */

const ENV = 93;
const POOL = 3;

function statusField(pid: number, field: string): string {
  const line = readFileSync(`/proc/${pid}/status`, 'utf8')
    .split('\n')
    .find((entry) => entry.startsWith(`${field}:`));
  return line?.slice(field.length + 1).trim() ?? '';
}

/* The v1 memory cgroup of a host process, as the host sees it. */
function memoryCgroup(pid: number): string | undefined {
  return readFileSync(`/proc/${pid}/cgroup`, 'utf8')
    .split('\n')
    .map((line) => line.split(':'))
    .find(([, controllers]) => controllers?.split(',').includes('memory'))?.[2];
}

/* -1 for a process that ended meanwhile: listings race with pool refills. */
function parentOf(pid: number): number {
  try {
    return Number(statusField(pid, 'PPid'));
  } catch {
    return -1;
  }
}

function processState(pid: number): string | undefined {
  try {
    return statusField(pid, 'State').charAt(0);
  } catch {
    return undefined;
  }
}

describe('sandbox processes on the host', () => {
  let daemon: Daemon;
  let client: CodeOceanClient;

  const spawnerPid = (): number => {
    const spawner = descendantsOf(daemon.pid).find((pid) => {
      try {
        return (readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0')[0] ?? '').endsWith('poseidon-spawner');
      } catch {
        return false;
      }
    });
    assert.ok(spawner !== undefined, 'the daemon has no spawner');
    return spawner;
  };
  const spawnerChildren = (): number[] => {
    const spawner = spawnerPid();
    return descendantsOf(spawner).filter((pid) => parentOf(pid) === spawner);
  };

  before(async () => {
    daemon = await startDaemon();
    client = new CodeOceanClient(daemon.baseUrl, daemon.token);
    assert.equal((await client.putEnvironment(environmentSpec(ENV, { prewarmingPoolSize: POOL }))).status, 201);
    await waitFor(
      async () => ((await client.statistics()).body as Record<string, { idleRunners: number }>)[String(ENV)]?.idleRunners ?? 0,
      (idle) => idle === POOL,
      'the pool to fill',
    );
  });

  after(async () => {
    await daemon?.stop();
  });

  test('an idle runner is one host process: the sandbox pid 1 running the agent, no bubblewrap left waiting', async () => {
    // Refills may still be settling: wait for the spawner to hold exactly the pool's sandboxes.
    const children = await waitFor(
      async () => spawnerChildren(),
      (pids) => pids.length === POOL && pids.every((pid) => !hostExecutable(pid).endsWith('bwrap')),
      'one host process per idle runner',
    );
    for (const pid of children) {
      const nspid = statusField(pid, 'NSpid').split(/\s+/);
      assert.equal(nspid.length, 2, `process ${pid} is not in a pid namespace of its own: NSpid ${nspid.join(' ')}`);
      assert.equal(nspid[1], '1', `process ${pid} is not its sandbox's pid 1`);
      assert.match(hostExecutable(pid), /memfd:poseidon-agent/, `process ${pid} is not the agent`);
      assert.deepEqual(descendantsOf(pid), [], `idle sandbox ${pid} runs more than its agent`);
    }
  });

  test("the agent, as its sandbox's init, reaps orphans of learner code", async (t) => {
    const runnerId = await client.claim(ENV);
    // Returned even when an assertion fails, so the next test finds the pool as it expects.
    t.after(() => client.deleteRunner(runnerId));
    const marker = sleepMarker();
    // sh exits at once, so the sleep is orphaned and re-parented to the sandbox's pid 1. The hang-up is ignored
    // before the fork: set in the subshell, a slow subshell could get the terminal's SIGHUP first.
    const result = await client.connect(
      await client.websocketUrl(runnerId, `sh -c 'trap "" HUP; (exec sleep ${marker}) </dev/null >/dev/null 2>&1 & echo started'`, 0),
    );
    assert.match(result.stdout, /started/);
    const [orphan] = await waitFor(
      async () => processesMatching(`sleep ${marker}`),
      (pids) => pids.length === 1,
      'the orphaned sleep',
    );
    assert.ok(orphan !== undefined);
    assert.ok(spawnerChildren().includes(parentOf(orphan)), `the orphan's parent ${parentOf(orphan)} is not a sandbox's pid 1`);
    // Killed from the host, it stays a zombie until its parent reaps it; only then its /proc entry goes.
    process.kill(orphan, 'SIGKILL');
    await waitFor(
      async () => processState(orphan),
      (state) => state === undefined,
      'the killed orphan to be reaped by the agent',
    );
  });

  test('an idle runner has no memory cgroup of its own (v1); a claimed one gets one, with its limit, before its first execution', {
    skip: !existsSync('/sys/fs/cgroup/memory/cgroup.procs') && 'no cgroup v1 memory controller here',
  }, async () => {
    const parent = `/${daemon.cgroupParent}`;
    // The previous test's runner was just returned: wait for its refill to finish (a sandbox still being built is bwrap's).
    const idle = await waitFor(
      async () => spawnerChildren(),
      (pids) => pids.length === POOL && pids.every((pid) => !hostExecutable(pid).endsWith('bwrap')),
      'the pool to settle',
    );
    assert.ok(idle.length > 0);
    for (const pid of idle) assert.equal(memoryCgroup(pid), parent, `idle sandbox ${pid} has a memory cgroup of its own`);
    const runnerId = await client.claim(ENV);
    const own = `${parent}/${runnerId}`;
    const claimed = spawnerChildren().filter((pid) => memoryCgroup(pid) === own);
    assert.equal(claimed.length, 1, "the claimed runner's agent is not in the runner's memory cgroup");
    assert.equal(readFileSync(`/sys/fs/cgroup/memory${own}/memory.limit_in_bytes`, 'utf8').trim(), String(256 * 1024 * 1024));
    const marker = sleepMarker();
    const execution = client.connect(await client.websocketUrl(runnerId, `sleep ${marker}`, 0));
    const [learner] = await waitFor(
      async () => processesMatching(`sleep ${marker}`).filter((pid) => readFileSync(`/proc/${pid}/cmdline`, 'utf8').startsWith('sleep\0')),
      (pids) => pids.length === 1,
      'the execution',
    );
    assert.ok(learner !== undefined);
    assert.equal(memoryCgroup(learner), own, 'learner code runs outside the runner memory cgroup');
    process.kill(learner, 'SIGKILL');
    await execution;
    assert.equal((await client.deleteRunner(runnerId)).status, 204);
    await waitFor(
      async () => existsSync(`/sys/fs/cgroup/memory${own}`),
      (exists) => !exists,
      "the destroyed runner's memory cgroup to go",
    );
  });

  test('destroying a runner ends its one host process', async () => {
    const before = spawnerChildren();
    const runnerId = await client.claim(ENV);
    const claimedOwners = new Set(before);
    assert.equal((await client.deleteRunner(runnerId)).status, 204);
    await waitFor(
      async () => [...claimedOwners].filter((pid) => processState(pid) !== undefined && processState(pid) !== 'Z').length,
      (alive) => alive < before.length,
      'the destroyed runner to leave the host',
    );
  });
});
