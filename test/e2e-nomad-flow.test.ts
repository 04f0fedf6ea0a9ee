import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { CodeOceanClient, environmentSpec, fileEntries, type FileListEntry } from './support/codeocean-client.js';
import { startDaemon, type Daemon } from './support/daemon.js';
import { waitFor } from './support/wait.js';
import { startFakeNomad, type FakeNomad } from './fake-nomad/index.js';

/*
 * The CodeOcean flow of e2e-codeocean-flow, with the Nomad backend: the real daemon on a real port
 * against the fake Nomad, whose exec runs real processes. Also: a claim from a filled pool makes no
 * Nomad call, even when every Nomad call takes 200 ms.
 */

const TOKEN = 'nomad-flow-token';
const ENV_ID = 21;
let fake: FakeNomad;
let daemon: Daemon;
let client: CodeOceanClient;

const stripDot = (name: string): string => name.replace(/^\.\//, '').replace(/^\./, '');
const byName = (entries: FileListEntry[]): Map<string, FileListEntry> => new Map(entries.map((e) => [stripDot(e.name), e]));

async function statistics(environmentId: number): Promise<{ idleRunners: number; usedRunners: number } | undefined> {
  const response = await client.request('GET', '/statistics/execution-environments', {});
  const body = response.body as Record<string, { idleRunners: number; usedRunners: number }> | undefined;
  return body?.[String(environmentId)];
}

before(async () => {
  fake = await startFakeNomad({ heartbeatMs: 200 });
  daemon = await startDaemon({
    token: TOKEN,
    config: { nomad: { enabled: true, address: '127.0.0.1', port: fake.port, requesttimeout: 3000 }, local: { enabled: false } },
  });
  client = new CodeOceanClient(daemon.baseUrl, TOKEN);
});

after(async () => {
  const logs = daemon?.logs().trim() ?? '';
  try {
    await daemon?.stop();
  } finally {
    await fake?.close();
    if (logs.length > 0) process.stderr.write(`--- daemon output ---\n${logs.slice(-8000)}\n`);
  }
});

describe('CodeOcean flow on the Nomad backend', () => {
  test('PUT registers the template job; the pool fills from allocation events', async () => {
    const spec = environmentSpec(ENV_ID, { prewarmingPoolSize: 2, networkAccess: true, exposedPorts: [8080] });
    const created = await client.putEnvironment(spec);
    assert.equal(created.status, 201, created.text);
    assert.ok(fake.control.jobIds().includes(`template-${ENV_ID}`), 'the template job is registered in Nomad');
    assert.equal((await client.putEnvironment(spec)).status, 204);
    const single = await client.getEnvironment(ENV_ID);
    assert.deepEqual(single.body, { ...spec });
    await waitFor(
      () => statistics(ENV_ID),
      (s) => s?.idleRunners === 2,
      'two idle runners',
    );
    const runnerJobs = fake.control.jobIds().filter((id) => id.startsWith(`${ENV_ID}-`));
    assert.equal(runnerJobs.length, 2, `one job per runner: ${runnerJobs.join(', ')}`);
    // Readiness comes from the event stream: no per-runner polling of allocations.
    const polls = fake.control.requests().filter((entry) => /\/allocations$|\/v1\/allocation\//.test(entry.path));
    assert.deepEqual(polls, [], 'no allocation polling while filling the pool');
  });

  test('claim, upload, sh with stdin, exit code, list, raw, mapped ports, release → 410', async () => {
    const claimed = await client.claimRunner(ENV_ID, 180);
    assert.equal(claimed.status, 200, claimed.text);
    const body = claimed.body as { runnerId: string; mappedPorts?: Array<{ exposedPort: number; hostAddress: string }> };
    const runnerId = body.runnerId;
    assert.match(runnerId, new RegExp(`^${ENV_ID}-`));
    assert.equal(body.mappedPorts?.[0]?.exposedPort, 8080, JSON.stringify(body));
    assert.match(body.mappedPorts?.[0]?.hostAddress ?? '', /^127\.0\.0\.1:\d+$/);
    // The "used" mark reaches Nomad asynchronously.
    await fake.control.waitFor(() => {
      const job = fake.control.allocations(runnerId).length > 0;
      return (
        job &&
        fake.control
          .events()
          .some((batch) =>
            batch.Events.some((event) => event['Key'] === runnerId && event['Topic'] === 'Job' && JSON.stringify(event['Payload']).includes('"used":"true"')),
          )
      );
    });

    const first = await client.patchFiles(runnerId, {
      copy: [
        { path: 'olddir/' },
        { path: 'olddir/stale.txt', content: Buffer.from('stale').toString('base64') },
        { path: '.dotfile', content: Buffer.from('survives').toString('base64') },
      ],
      delete: [],
    });
    assert.equal(first.status, 204, first.text);
    const patch = await client.copySubmission(runnerId, {
      'main.sh': 'read name; echo "hello $name"; echo oops >&2; exit 3\n',
      'lib/util/helper.txt': 'help',
      'empty.txt': '',
    });
    assert.equal(patch.status, 204, patch.text);

    const ls = await client.run(runnerId, 'ls -A', { timeLimit: 10 });
    assert.equal(ls.exitCode, 0, ls.stderr);
    // On a terminal ls prints columns, as it does in Poseidon.
    assert.deepEqual(
      ls.stdout
        .split(/\s+/)
        .filter((line) => line.length > 0)
        .sort(),
      ['.dotfile', 'empty.txt', 'lib', 'main.sh'],
    );

    const sh = await client.run(runnerId, 'sh main.sh', { stdin: ['{"cmd":"result","data":"Bob"}\n'], timeLimit: 10 });
    // The terminal echoes the input and ends lines in \r\n; stderr comes through a TTY exec too.
    assert.equal(sh.stdout, '{"cmd":"result","data":"Bob"}\r\nhello {"cmd":"result","data":"Bob"}\r\n');
    assert.equal(sh.stderr, 'oops\r\n');
    assert.equal(sh.exitCode, 3);

    // biome-ignore lint/suspicious/noTemplateCurlyInString: a shell expansion, for the runner's shell.
    const env = await client.run(runnerId, 'echo "$CODEOCEAN:${NOMAD_ALLOC_ID:-unset}"');
    assert.equal(env.stdout, 'true:unset\r\n', 'CODEOCEAN is set and Nomad variables are removed');

    assert.equal((await client.run(runnerId, 'echo generated > out.txt')).exitCode, 0);
    const recursive = await client.listFiles(runnerId, { recursive: true });
    assert.equal(recursive.status, 200, recursive.text);
    const all = byName(fileEntries(recursive));
    for (const name of ['main.sh', 'lib/util/helper.txt', 'empty.txt', 'out.txt', 'lib', 'lib/util'])
      assert.ok(all.has(name), `listing lacks ${name}: ${[...all.keys()].join(', ')}`);
    assert.equal(all.get('lib/util')?.entryType, 'd');
    assert.equal(all.get('main.sh')?.entryType, '-');
    assert.equal(all.get('out.txt')?.size, 10);
    const flat = byName(fileEntries(await client.listFiles(runnerId, { recursive: false })));
    assert.ok(![...flat.keys()].some((name) => name.includes('helper')), 'non-recursive listing does not descend');
    assert.equal((await client.listFiles(runnerId, { path: 'does/not/exist' })).status, 424);

    const raw = await client.downloadRaw(runnerId, 'out.txt');
    assert.equal(raw.status, 200);
    assert.equal(raw.text, 'generated\n');
    assert.equal(raw.headers.get('content-length'), '10');
    assert.equal((await client.downloadRaw(runnerId, 'nope.txt')).status, 424);

    assert.equal((await client.deleteRunner(runnerId)).status, 204);
    await fake.control.waitFor(() => !fake.control.jobIds().includes(runnerId));
    assert.equal((await client.deleteRunner(runnerId)).status, 410);
    assert.equal((await client.copySubmission(runnerId, { 'a.txt': 'a' })).status, 410);
    assert.equal((await client.listFiles(runnerId)).status, 410);
    assert.equal((await client.execute(runnerId, 'true')).status, 410);
  });

  test('a time limit kills the execution in the allocation', async () => {
    const runnerId = await client.claim(ENV_ID);
    const started = Date.now();
    const result = await client.run(runnerId, 'sleep 37; echo never', { timeLimit: 1 });
    assert.ok(
      result.messages.some((message) => message.type === 'timeout'),
      JSON.stringify(result.messages),
    );
    assert.ok(Date.now() - started < 10_000);
    // The process group is gone from the "container".
    await waitFor(
      async () => (await client.run(runnerId, 'ps -eo args | grep -c "^sleep 37" || true')).stdout.trim(),
      (count) => count === '0',
      'sleep killed',
      5_000,
    );
    assert.equal((await client.deleteRunner(runnerId)).status, 204);
  });

  test('with 200 ms latency on every Nomad call, a claim from a filled pool makes no Nomad call', async () => {
    await waitFor(
      () => statistics(ENV_ID),
      (s) => (s?.idleRunners ?? 0) >= 2,
      'pool refilled',
    );
    fake.control.setLatency(200);
    try {
      const from = Date.now();
      const claimed = await client.claimRunner(ENV_ID, 60);
      const to = Date.now();
      assert.equal(claimed.status, 200, claimed.text);
      assert.ok(to - from < 190, `a claim must not wait for Nomad (took ${to - from} ms)`);
      // Asynchronous writes (refill, "used" mark) may start during the claim, but nothing is read or awaited.
      const during = fake.control.requestsBetween(from, to);
      assert.ok(
        during.every((entry) => entry.method === 'POST' && entry.path === '/v1/jobs'),
        JSON.stringify(during),
      );
      const runnerId = (claimed.body as { runnerId: string }).runnerId;
      assert.equal((await client.deleteRunner(runnerId)).status, 204);
    } finally {
      fake.control.setLatency(0);
    }
  });

  test('DELETE environment deregisters the template and purges every runner job', async () => {
    const runnerId = await client.claim(ENV_ID);
    assert.equal((await client.deleteEnvironment(ENV_ID)).status, 204);
    await fake.control.waitFor(() => !fake.control.jobIds().some((id) => id === `template-${ENV_ID}` || id.startsWith(`${ENV_ID}-`)), 5_000);
    assert.equal((await client.execute(runnerId, 'true')).status, 410);
    assert.equal((await client.claimRunner(ENV_ID)).status, 404);
    assert.deepEqual(fake.control.specViolations(), []);
  });
});
