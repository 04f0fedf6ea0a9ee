import assert from 'node:assert/strict';
import { randomInt } from 'node:crypto';
import { after, before, describe, test } from 'node:test';
import { CodeOceanClient, DEFAULT_IMAGE, environmentSpec, fileEntries, type FileListEntry } from './support/codeocean-client.js';
import { startDaemon, type Daemon } from './support/daemon.js';
import { poolStatistics, stopNomadTest } from './support/nomad-e2e.js';
import { nomadTarget, type NomadTarget } from './support/nomad-target.js';
import { waitFor } from './support/wait.js';

/*
 * The CodeOcean flow on the Nomad backend through the public API only, so that it also runs against
 * a real Nomad agent: `NOMAD_ADDR=https://nomad:4646 NOMAD_TOKEN=… npm run test:nomad-real` (see the
 * README). Without NOMAD_ADDR it starts the fake Nomad as a process of its own and reaches it through
 * the same variables. NOMAD_TEST_IMAGE (an openHPI execution image), NOMAD_TEST_ENVIRONMENT_ID and
 * NOMAD_TEST_READY_MS (the wait for the first runners, image pulls included) tune it for a cluster.
 */

const TOKEN = 'nomad-agent-token';
let target: NomadTarget;
let daemon: Daemon | undefined;
let client: CodeOceanClient;
let environmentId: number;
let readyMs: number;

const stripDot = (name: string): string => name.replace(/^\.\//, '').replace(/^\./, '');
const byName = (entries: FileListEntry[]): Map<string, FileListEntry> => new Map(entries.map((e) => [stripDot(e.name), e]));

const statistics = (): ReturnType<typeof poolStatistics> => poolStatistics(client, environmentId);

before(async () => {
  target = await nomadTarget();
  environmentId = Number(process.env['NOMAD_TEST_ENVIRONMENT_ID'] ?? (target.fake ? 61 : 9061));
  readyMs = Number(process.env['NOMAD_TEST_READY_MS'] ?? (target.fake ? 30_000 : 600_000));
  daemon = await startDaemon({ token: TOKEN, config: { nomad: target.config, local: { enabled: false } } });
  client = new CodeOceanClient(daemon.baseUrl, TOKEN);
});

after(async () => {
  // Leaves nothing behind on a real cluster, even when a test failed halfway.
  if (daemon !== undefined) await client.deleteEnvironment(environmentId).catch(() => undefined);
  await stopNomadTest(daemon, async () => target?.stop());
});

describe('CodeOcean flow on a Nomad agent (NOMAD_ADDR, else the fake)', () => {
  test('PUT creates the environment; the pool fills', async () => {
    const spec = environmentSpec(environmentId, {
      prewarmingPoolSize: 2,
      networkAccess: true,
      exposedPorts: [8080],
      image: process.env['NOMAD_TEST_IMAGE'] ?? DEFAULT_IMAGE,
    });
    const created = await client.putEnvironment(spec);
    assert.ok(created.status === 201 || created.status === 204, created.text);
    assert.equal((await client.putEnvironment(spec)).status, 204);
    assert.deepEqual((await client.getEnvironment(environmentId)).body, { ...spec });
    await waitFor(statistics, (s) => s?.idleRunners === 2, 'two idle runners', readyMs, 500);
  });

  test('claim, upload, sh with stdin, exit code, variables, list, raw, mapped ports, release → 410', async () => {
    const claimed = await client.claimRunner(environmentId, 180);
    assert.equal(claimed.status, 200, claimed.text);
    const body = claimed.body as { runnerId: string; mappedPorts?: Array<{ exposedPort: number; hostAddress: string }> };
    const runnerId = body.runnerId;
    assert.match(runnerId, new RegExp(`^${environmentId}-`));
    assert.equal(body.mappedPorts?.[0]?.exposedPort, 8080, JSON.stringify(body));
    assert.match(body.mappedPorts?.[0]?.hostAddress ?? '', /^[\d.]+:\d+$|^\[?[0-9a-f:]+\]?:\d+$/);

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
    assert.equal((await client.deleteRunner(runnerId)).status, 410);
    assert.equal((await client.copySubmission(runnerId, { 'a.txt': 'a' })).status, 410);
    assert.equal((await client.listFiles(runnerId)).status, 410);
    assert.equal((await client.execute(runnerId, 'true')).status, 410);
  });

  test('exit codes and downloads arrive whole: large outputs, a 1 MB file, executions in parallel', async () => {
    const runnerId = await client.claim(environmentId, 180, readyMs);
    // Nomad's Docker driver can return before the end of the output is copied (nomad#27146).
    const content = Array.from({ length: 30_000 }, (_, index) => `line ${index} of a generated file\n`).join('');
    assert.equal((await client.copySubmission(runnerId, { 'big.txt': content })).status, 204);
    const raw = await client.downloadRaw(runnerId, 'big.txt');
    assert.equal(raw.status, 200);
    assert.equal(raw.headers.get('content-length'), String(content.length));
    assert.ok(raw.text === content, `the download differs: ${raw.text.length} of ${content.length} bytes`);
    const results = await Promise.all(
      [0, 1, 2, 3, 4, 5].map((index) => client.run(runnerId, `seq 1 20000 | tail -n 1; exit ${index + 10}`, { timeLimit: 60 })),
    );
    results.forEach((result, index) => {
      assert.deepEqual(result.errors, []);
      assert.equal(result.exitCode, index + 10, JSON.stringify(result.messages.slice(-3)));
      assert.equal(result.stdout, '20000\r\n');
    });
    assert.equal((await client.deleteRunner(runnerId)).status, 204);
  });

  test('a time limit kills the execution in the allocation', async () => {
    const runnerId = await client.claim(environmentId, 180, readyMs);
    // Unique on the host too: the fake runs execs on the host, beside other test runs.
    const seconds = `37.${randomInt(100_000, 999_999)}`;
    const result = await client.run(runnerId, `sleep ${seconds}; echo never`, { timeLimit: 1 });
    assert.ok(
      result.messages.some((message) => message.type === 'timeout'),
      JSON.stringify(result.messages),
    );
    // The process is gone, found through /proc (images need not have ps).
    const count = `for f in /proc/[0-9]*/cmdline; do tr "\\000" " " < "$f" 2>/dev/null; echo; done | grep -c "^sleep ${seconds}" || true`;
    await waitFor(
      async () => (await client.run(runnerId, count)).stdout.trim(),
      (found) => found === '0',
      'sleep killed',
      10_000,
    );
    assert.equal((await client.deleteRunner(runnerId)).status, 204);
  });

  test('DELETE environment removes it and its runners', async () => {
    const runnerId = await client.claim(environmentId, 180, readyMs);
    assert.equal((await client.deleteEnvironment(environmentId)).status, 204);
    assert.equal((await client.execute(runnerId, 'true')).status, 410);
    assert.equal((await client.claimRunner(environmentId)).status, 404);
  });
});
