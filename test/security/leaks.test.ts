import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { environmentSpec } from '../support/codeocean-client.js';
import { useDaemon } from '../support/fixture.js';
import { hostPathsOf } from '../support/security.js';

/*
 * Issue 8, "leaks and rough edges" and point 8: no host path appears anywhere a runner can read, and
 * the sandbox's /etc/passwd and /etc/group are minimal ones, not the host's. This daemon runs without
 * a token on purpose: it must say loudly at start what that means.
 */

const ENV_ID = 810;
const fixture = useDaemon({}, async ({ client }) => {
  assert.equal((await client.putEnvironment(environmentSpec(ENV_ID, { prewarmingPoolSize: 1 }))).status, 201);
});

describe('nothing of the host leaks into the sandbox', () => {
  for (const privilegedExecution of [false, true]) {
    test(`/proc/self/mountinfo and /proc/1/cmdline show no host path (privileged=${privilegedExecution})`, async () => {
      const { client, daemon } = fixture;
      const runnerId = await client.claim(ENV_ID);
      const result = await client.run(runnerId, 'cat /proc/self/mountinfo; tr "\\0" " " < /proc/1/cmdline; echo; cat /proc/self/cgroup', {
        privilegedExecution,
      });
      assert.match(result.stdout, / \/proc /, `the probe did not run: ${result.stdout}${result.stderr}`);
      const leaked = hostPathsOf(daemon).filter((hostPath) => result.stdout.includes(hostPath));
      assert.deepEqual(leaked, [], `host paths visible in the sandbox:\n${result.stdout}`);
      assert.equal((await client.deleteRunner(runnerId)).status, 204);
    });
  }

  test('/etc/passwd and /etc/group hold root, the learner user and nobody only', async () => {
    const { client } = fixture;
    const runnerId = await client.claim(ENV_ID);
    const result = await client.run(runnerId, 'id -u; id -g; echo ---; cat /etc/passwd; echo ---; cat /etc/group');
    const [ids = '', passwd = '', group = ''] = result.stdout.split(/---\r?\n/);
    const [learnerUid, learnerGid] = ids.trim().split(/\r?\n/).map(Number);
    const entries = (text: string): Array<{ name: string; id: number }> =>
      text
        .split(/\r?\n/)
        .filter((line) => line.includes(':'))
        .map((line) => ({ name: line.split(':')[0] ?? '', id: Number(line.split(':')[2]) }));
    const users = entries(passwd);
    const groups = entries(group);
    assert.ok(
      users.some((user) => user.id === 0),
      `no root in /etc/passwd:\n${passwd}`,
    );
    const strangers = users.filter((user) => ![0, 65534, learnerUid].includes(user.id));
    assert.deepEqual(strangers, [], `/etc/passwd lists other accounts:\n${passwd}`);
    assert.ok(users.length <= 3, `/etc/passwd has ${users.length} entries:\n${passwd}`);
    const strangerGroups = groups.filter((entry) => ![0, 65534, learnerGid].includes(entry.id));
    assert.deepEqual(strangerGroups, [], `/etc/group lists other groups:\n${group}`);
    assert.ok(groups.length <= 3, `/etc/group has ${groups.length} entries:\n${group}`);
    assert.equal((await client.deleteRunner(runnerId)).status, 204);
  });
});

describe('safe defaults of the service', () => {
  test('a daemon started without a token logs a loud warning naming the risk', () => {
    const logs = fixture.daemon.logs();
    assert.match(logs, /NO API TOKEN/, `no warning about the missing token in:\n${logs.slice(0, 2000)}`);
    assert.match(logs, /privileged/, 'the warning names the risk (privileged code for anyone who reaches the API)');
  });

  test("a runner with networkAccess cannot reach the daemon's API on 127.0.0.1", async () => {
    const { client, daemon } = fixture;
    assert.equal((await client.putEnvironment(environmentSpec(ENV_ID + 1, { networkAccess: true, prewarmingPoolSize: 1 }))).status, 201);
    const runnerId = await client.claim(ENV_ID + 1);
    const before = (await client.listEnvironments()).text;
    const result = await client.run(
      runnerId,
      `python3 -c "
import urllib.request
try:
    request = urllib.request.Request('http://127.0.0.1:${daemon.port}/api/v1/execution-environments/${ENV_ID}', method='DELETE')
    print('REACHED', urllib.request.urlopen(request, timeout=3).status)
except urllib.error.HTTPError as error:
    print('REACHED', error.code)
except Exception as error:
    print('BLOCKED', type(error).__name__)
"`,
      { timeLimit: 15 },
    );
    assert.match(result.stdout, /BLOCKED/, `learner code reached the daemon's API: ${result.stdout}${result.stderr}`);
    assert.equal((await client.listEnvironments()).text, before, 'the environments changed');
    assert.equal((await client.deleteRunner(runnerId)).status, 204);
    assert.equal((await client.deleteEnvironment(ENV_ID + 1)).status, 204);
  });
});
