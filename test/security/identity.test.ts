import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { describe, test } from 'node:test';
import { environmentSpec } from '../support/codeocean-client.js';
import { useDaemon } from '../support/fixture.js';
import { hasOwnUserNamespace, hostAccountIds, hostIds, idMap, type IdMapping, PY_SYSCALL, runPython, startMarkedProcess } from '../support/security.js';

/*
 * Issue 8, "privileged execution is host root" and "all runners share host uid 65534": sandbox ids
 * must be ids of the runner's own user namespace, mapped onto a host range no other runner and no
 * host account uses. Judged from the host: /proc/<pid>/status and uid_map of a live sandbox process.
 */

const TOKEN = `identity-${randomUUID()}`;
const ENV_ID = 801;
const fixture = useDaemon({ token: TOKEN }, async ({ client }) => {
  assert.equal((await client.putEnvironment(environmentSpec(ENV_ID, { prewarmingPoolSize: 2 }))).status, 201);
});

function hostIdOf(mapping: IdMapping[], inside: number): number | undefined {
  const entry = mapping.find((candidate) => inside >= candidate.inside && inside < candidate.inside + candidate.count);
  return entry === undefined ? undefined : entry.outside + (inside - entry.inside);
}

function overlaps(a: IdMapping[], b: IdMapping[]): boolean {
  return a.some((x) => b.some((y) => x.outside < y.outside + y.count && y.outside < x.outside + x.count));
}

test('a daemon with a token does not warn about a missing one', () => {
  assert.doesNotMatch(fixture.daemon.logs(), /NO API TOKEN/);
});

describe('sandbox ids are not host ids', () => {
  test("privileged execution is root inside only: its host uid and gid are not 0 and lie in the runner's own range", async () => {
    const { client } = fixture;
    const runnerId = await client.claim(ENV_ID);
    const marked = await startMarkedProcess(client, runnerId, 'id -u; id -g', true);
    let ids: { uids: number[]; gids: number[] };
    let uidMap: IdMapping[];
    let gidMap: IdMapping[];
    let ownNamespace: boolean;
    try {
      ids = hostIds(marked.pid);
      uidMap = idMap(marked.pid, 'uid');
      gidMap = idMap(marked.pid, 'gid');
      ownNamespace = hasOwnUserNamespace(marked.pid);
    } finally {
      await marked.finish();
    }
    const result = await marked.execution;
    assert.equal(result.stdout.trim().split(/\r?\n/)[0], '0', `privileged execution is not root inside: ${result.stdout}`);
    assert.ok(ownNamespace, `the sandbox has no user namespace of its own (uid_map ${JSON.stringify(uidMap)})`);
    for (const uid of ids.uids) assert.notEqual(uid, 0, `privileged sandbox process runs as host uid 0 (${JSON.stringify(ids)})`);
    for (const gid of ids.gids) assert.notEqual(gid, 0, `privileged sandbox process runs as host gid 0 (${JSON.stringify(ids)})`);
    assert.equal(hostIdOf(uidMap, 0), ids.uids[0], 'sandbox root maps onto the host uid the process has');
    assert.equal(hostIdOf(gidMap, 0), ids.gids[0], 'sandbox root group maps onto the host gid the process has');
    // The range is the daemon's own: no host account owns any id in it.
    const accounts = hostAccountIds('/etc/passwd');
    for (const range of uidMap) {
      assert.ok(range.outside > 0, `uid range ${JSON.stringify(range)} includes host root`);
      for (const account of accounts) {
        assert.ok(
          account < range.outside || account >= range.outside + range.count,
          `host account uid ${account} lies in the runner's range ${JSON.stringify(range)}`,
        );
      }
    }
    assert.equal((await client.deleteRunner(runnerId)).status, 204);
  });

  test('the learner user of runner A and of runner B are different host uids, from disjoint ranges', async () => {
    const { client } = fixture;
    const runnerA = await client.claim(ENV_ID);
    const runnerB = await client.claim(ENV_ID);
    const markedA = await startMarkedProcess(client, runnerA, 'id -u', false);
    const markedB = await startMarkedProcess(client, runnerB, 'id -u', false);
    let idsA: { uids: number[]; gids: number[] };
    let idsB: { uids: number[]; gids: number[] };
    let mapA: IdMapping[];
    let mapB: IdMapping[];
    try {
      idsA = hostIds(markedA.pid);
      idsB = hostIds(markedB.pid);
      mapA = idMap(markedA.pid, 'uid');
      mapB = idMap(markedB.pid, 'uid');
    } finally {
      await Promise.all([markedA.finish(), markedB.finish()]);
    }
    const insideA = (await markedA.execution).stdout.trim();
    const insideB = (await markedB.execution).stdout.trim();
    assert.notEqual(insideA, '0', 'unprivileged execution runs as root');
    assert.equal(insideA, insideB, 'both runners use the same learner uid inside');
    assert.notEqual(idsA.uids[0], idsB.uids[0], `runner A and runner B run learner code as the same host uid ${String(idsA.uids[0])}`);
    assert.notEqual(idsA.gids[0], idsB.gids[0], `runner A and runner B run learner code as the same host gid ${String(idsA.gids[0])}`);
    for (const ids of [idsA, idsB]) {
      assert.ok(!ids.uids.includes(0) && !ids.uids.includes(65534), `learner code runs as a shared host uid: ${JSON.stringify(ids)}`);
      assert.ok(!hostAccountIds('/etc/passwd').has(ids.uids[0] as number), `learner code runs as a host account: ${JSON.stringify(ids)}`);
    }
    assert.ok(!overlaps(mapA, mapB), `runner A's and runner B's id ranges overlap: ${JSON.stringify(mapA)} / ${JSON.stringify(mapB)}`);
    assert.equal((await client.deleteRunner(runnerA)).status, 204);
    assert.equal((await client.deleteRunner(runnerB)).status, 204);
  });

  test('a key added to the keyring in runner A is not readable in runner B, nor in a runner after A is gone', async () => {
    const { client } = fixture;
    const description = `poseidon-probe-${randomUUID()}`;
    const secret = `key-secret-${randomUUID()}`;
    // KEY_SPEC_USER_KEYRING = -4; KEYCTL_SEARCH = 10, KEYCTL_READ = 11, KEYCTL_REVOKE = 3 (a found key is revoked).
    const addKey = `${PY_SYSCALL}
payload = b'${secret}'
r, e = sys('add_key', b'user', b'${description}', payload, len(payload), -4)
print('ADD', r, e)
if r > 0:
    sys('keyctl', 15, r, 120)  # KEYCTL_SET_TIMEOUT: should it land in a shared keyring, it expires soon
`;
    const searchKey = `${PY_SYSCALL}
r, e = sys('keyctl', 10, -4, b'user', b'${description}', 0)
print('SEARCH', r, e)
if r > 0:
    buf = ctypes.create_string_buffer(4096)
    n, e2 = sys('keyctl', 11, r, buf, 4096)
    print('READ', buf.raw[:max(n, 0)].decode(errors='replace'))
    sys('keyctl', 3, r)
try:
    print(open('/proc/keys').read())
except Exception as ex:
    print('PROC_KEYS', type(ex).__name__)
`;
    for (const privilegedExecution of [false, true]) {
      const runnerA = await client.claim(ENV_ID);
      const runnerB = await client.claim(ENV_ID);
      const added = await runPython(client, runnerA, addKey, { privilegedExecution });
      assert.match(added.stdout, /^ADD /m, `the probe did not run: ${added.stdout}${added.stderr}`);
      const inB = await runPython(client, runnerB, searchKey, { privilegedExecution });
      assert.match(inB.stdout, /^SEARCH /m, `the probe did not run: ${inB.stdout}${inB.stderr}`);
      assert.ok(
        !inB.stdout.includes(secret) && !inB.stdout.includes(description),
        `runner B sees runner A's key (privileged=${privilegedExecution}):\n${inB.stdout}`,
      );
      assert.equal((await client.deleteRunner(runnerA)).status, 204);
      const runnerC = await client.claim(ENV_ID);
      const inC = await runPython(client, runnerC, searchKey, { privilegedExecution });
      assert.match(inC.stdout, /^SEARCH /m, `the probe did not run: ${inC.stdout}${inC.stderr}`);
      assert.ok(
        !inC.stdout.includes(secret) && !inC.stdout.includes(description),
        `a later runner sees the deleted runner's key (privileged=${privilegedExecution}):\n${inC.stdout}`,
      );
      // Either add_key is refused (seccomp) or the key lived in a keyring of A's own; both are contained.
      assert.match(added.stdout, /^ADD (-1 EPERM|-1 ENOSYS|\d+ OK)$/m, added.stdout);
      assert.equal((await client.deleteRunner(runnerB)).status, 204);
      assert.equal((await client.deleteRunner(runnerC)).status, 204);
    }
  });
});
