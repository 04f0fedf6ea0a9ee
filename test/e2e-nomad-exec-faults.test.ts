import assert from 'node:assert/strict';
import { after, before, beforeEach, describe, test } from 'node:test';
import { type CodeOceanClient, environmentSpec, fileEntries } from './support/codeocean-client.js';
import type { Daemon } from './support/daemon.js';
import { startNomadTest, stopNomadTest } from './support/nomad-e2e.js';
import { waitFor } from './support/wait.js';
import type { FakeNomad } from './fake-nomad/index.js';

/*
 * Exec results that survive Nomad's exec bugs, through the public API: the fake drops the `exited`
 * frame (nomad#9892), closes with 1000 before it (nomad#14595), loses the tail of the output
 * (nomad#27146), starts an exec late, and OOM-kills only an exec'd process.
 */

const TOKEN = 'nomad-exec-faults-token';
const ENV_ID = 41;
let fake: FakeNomad;
let daemon: Daemon;
let client: CodeOceanClient;
let runnerId: string;

/* The argv of each kind of exec the daemon makes, as the fake matches it (joined with spaces). */
const EXECUTION = / execute \/tmp\/\.poseidon-/;
const readOf = (path: string): RegExp => new RegExp(` read ${path.replace('.', '\\.')} \\d+$`);
const LISTING = / list \S+ /;

const allocation = (): string => {
  const running = fake.control.allocations(runnerId).find((alloc) => alloc['ClientStatus'] === 'running');
  assert.ok(running, 'the runner has a running allocation');
  return String(running['ID']);
};

/* The alloc's task events and restarts, to show that a fault left the task alone. */
const taskState = (): string => JSON.stringify((fake.control.allocations(runnerId)[0]?.['TaskStates'] as Record<string, unknown> | undefined) ?? {});

before(async () => {
  ({ fake, daemon, client } = await startNomadTest(TOKEN));
  assert.equal((await client.putEnvironment(environmentSpec(ENV_ID, { prewarmingPoolSize: 1 }))).status, 201);
  runnerId = await client.claim(ENV_ID, 300);
});

beforeEach(() => fake.control.clearExecFaults());

after(() => stopNomadTest(daemon, async () => fake?.close()));

describe('Nomad exec faults', () => {
  test('a missing exited frame: the exit code is recovered from the wrapper, not reported as an error', async () => {
    fake.control.injectExecFault({ kind: 'missing-exited', match: EXECUTION, times: 1 });
    const result = await client.run(runnerId, 'echo out; exit 7');
    assert.deepEqual(result.errors, []);
    assert.equal(result.exitCode, 7, JSON.stringify(result.messages));
    assert.equal(result.stdout, 'out\r\n');
    assert.match(daemon.logs(), /execution exit code recovered after Nomad lost it/);
  });

  test('a close 1000 before the exited frame, at the end and while the command still runs', async () => {
    fake.control.injectExecFault({ kind: 'close-1000', match: EXECUTION, times: 1 });
    const atEnd = await client.run(runnerId, 'exit 3');
    assert.equal(atEnd.exitCode, 3, JSON.stringify(atEnd.messages));

    // Nomad closes the session 100 ms in; the command ends later, and its status is still the one reported.
    fake.control.injectExecFault({ kind: 'close-1000', match: EXECUTION, afterMs: 100, times: 1 });
    const early = await client.run(runnerId, 'sleep 1; exit 5', { timeLimit: 20 });
    assert.deepEqual(early.errors, []);
    assert.equal(early.exitCode, 5, JSON.stringify(early.messages));

    // A status of 0 is recovered too, and a normal run afterwards is unaffected.
    fake.control.injectExecFault({ kind: 'missing-exited', match: EXECUTION, times: 1 });
    assert.equal((await client.run(runnerId, 'true')).exitCode, 0);
    assert.equal((await client.run(runnerId, 'exit 4')).exitCode, 4);
  });

  test('a download whose tail Nomad lost is completed from where it stopped', async () => {
    const content = Array.from({ length: 4000 }, (_, index) => `line ${index} of the generated file\n`).join('');
    assert.equal((await client.copySubmission(runnerId, { 'big.txt': content })).status, 204);
    fake.control.injectExecFault({ kind: 'truncate-tail', match: readOf('big.txt'), bytes: 5000, times: 1 });
    const raw = await client.downloadRaw(runnerId, 'big.txt');
    assert.equal(raw.status, 200);
    assert.equal(raw.headers.get('content-length'), String(content.length));
    assert.equal(raw.text.length, content.length);
    assert.equal(raw.text, content);
    // Dropped exit frames on the read, the resumed read included, change nothing either.
    fake.control.injectExecFault({ kind: 'missing-exited', match: readOf('big.txt'), times: 2 });
    assert.equal((await client.downloadRaw(runnerId, 'big.txt')).text, content);
    assert.match(daemon.logs(), /download incomplete; reading the rest/);
  });

  test('a download that keeps losing its tail ends short of its Content-Length, never as a complete file', async () => {
    fake.control.injectExecFault({ kind: 'truncate-tail', match: readOf('big.txt'), bytes: 1 });
    const response = await fetch(`${daemon.baseUrl}/runners/${runnerId}/files/raw?path=big.txt&privilegedExecution=false`, {
      headers: { 'Poseidon-Token': TOKEN },
    });
    assert.equal(response.status, 200);
    await assert.rejects(response.arrayBuffer(), 'the body is cut off before its announced length');
    await waitFor(
      async () => daemon.logs(),
      (logs) => logs.includes('download incomplete; giving up'),
      'the daemon logs the failed download',
    );
  });

  test('listings are complete despite a lost tail or a missing exit frame', async () => {
    assert.equal((await client.copySubmission(runnerId, { 'a/b/c.txt': 'c', 'a/d.txt': 'd', 'e.txt': 'e' })).status, 204);
    const names = async (): Promise<string[]> => {
      const response = await client.listFiles(runnerId, { recursive: true });
      assert.equal(response.status, 200, response.text);
      return fileEntries(response)
        .map((entry) => entry.name)
        .sort();
    };
    const expected = await names();
    assert.ok(expected.length >= 5, expected.join(', '));
    fake.control.injectExecFault({ kind: 'truncate-tail', match: LISTING, bytes: 20, times: 1 });
    assert.deepEqual(await names(), expected);
    fake.control.injectExecFault({ kind: 'missing-exited', match: LISTING, times: 1 });
    assert.deepEqual(await names(), expected);
    // find's failure still arrives as 424 when its exit frame is lost: the status is in the header.
    fake.control.injectExecFault({ kind: 'close-1000', match: LISTING, times: 1 });
    assert.equal((await client.listFiles(runnerId, { path: 'does/not/exist' })).status, 424);
  });

  test('a file upload whose exec lost its exit frame is applied once more and succeeds', async () => {
    fake.control.injectExecFault({ kind: 'missing-exited', match: / update /, times: 1 });
    assert.equal((await client.copySubmission(runnerId, { 'upload.txt': 'uploaded' })).status, 204);
    assert.equal((await client.downloadRaw(runnerId, 'upload.txt')).text, 'uploaded');
  });

  test('a kill that comes before the wrapper wrote its pid file still stops the command', async () => {
    let startExecution: () => void = () => undefined;
    const until = new Promise<void>((resolve) => (startExecution = resolve));
    fake.control.injectExecFault({ kind: 'delay-start', match: EXECUTION, until, times: 1 });
    const alloc = allocation();
    const command = 'touch started-late.txt; sleep 30';
    fake.control.clearRequests();
    const result = await client.run(runnerId, command, { timeLimit: 1 });
    assert.ok(result.gotTimeout, JSON.stringify(result.messages));
    // The kill's exec ran to its end while the execution's had not started yet.
    const isKill = (argv: string[]): boolean => argv.includes('kill') && argv.some((part) => part.startsWith('/tmp/.poseidon-'));
    await fake.control.waitFor(
      () =>
        fake.control.requests().some((entry) => entry.kind === 'exec' && isKill(JSON.parse(new URLSearchParams(entry.query).get('command') ?? '[]'))) &&
        !fake.control.runningExecs(alloc).some(isKill),
      15_000,
    );
    assert.ok(
      fake.control.runningExecs(alloc).some((argv) => argv.includes(command)),
      'the execution waits to start',
    );
    startExecution();
    // The delayed exec starts after the kill, finds the kill's mark and leaves before running the command.
    await fake.control.waitFor(() => !fake.control.runningExecs(alloc).some((argv) => argv.includes(command)), 15_000);
    const listing = await client.listFiles(runnerId, { recursive: false });
    assert.ok(!fileEntries(listing).some((entry) => entry.name.includes('started-late')), listing.text);
    assert.equal((await client.run(runnerId, 'echo still usable')).stdout, 'still usable\r\n');
  });

  test('an OOM kill of only the exec’d process: exit 137, no task event, the runner stays usable', async () => {
    const alloc = allocation();
    const before = taskState();
    const result = await client.run(runnerId, 'echo ready; sleep 20', {
      timeLimit: 15,
      onMessage: (message) => {
        if (message.type === 'stdout') fake.control.oomKillExec(alloc, EXECUTION);
      },
    });
    assert.equal(result.exitCode, 137, JSON.stringify(result.messages));
    assert.equal(taskState(), before, 'no task event and no restart');
    const next = await client.run(runnerId, 'echo alive');
    assert.equal(next.exitCode, 0);
    assert.equal(next.stdout, 'alive\r\n');
  });

  test('every exchange with the fake matched the Nomad spec', () => {
    assert.deepEqual(fake.control.specViolations(), []);
  });
});
