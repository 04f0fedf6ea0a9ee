import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { describe, test } from 'node:test';
import { environmentSpec } from '../support/codeocean-client.js';
import { useDaemon } from '../support/fixture.js';
import { hostExecutable, hostPathsOf, PY_SYSCALL, pythonCommand, runPython, sandboxInit, startMarkedProcess } from '../support/security.js';

/*
 * Issue 8, "the agent's channel can be forged": no process in the sandbox may obtain the daemon's
 * socket, and whatever arrives on it must not take the daemon down. The last test carries out the
 * whole attack from the issue (take pid 1's fd 1, write a result frame with an empty payload) and
 * then checks that the daemon and the other runners are still there.
 */

const TOKEN = `channel-${randomUUID()}`;
const ENV_ID = 803;
const fixture = useDaemon({ token: TOKEN }, async ({ client }) => {
  assert.equal((await client.putEnvironment(environmentSpec(ENV_ID, { prewarmingPoolSize: 2 }))).status, 201);
});

/* Takes fds 0, 1 and 2 of pid 1 and, with `attack`, writes forged RESULT frames (empty payload) into them. */
const takeChannel = (attack: boolean): string => `${PY_SYSCALL}
import struct
pidfd, e = sys('pidfd_open', 1, 0)
print('PIDFD', pidfd, e)
for target in (0, 1, 2):
    fd, e = sys('pidfd_getfd', pidfd, target, 0) if pidfd >= 0 else (-1, 'NO_PIDFD')
    print('GETFD', target, 'OK' if fd >= 0 else e)
    if fd >= 0 and ${attack ? 'True' : 'False'}:
        # Frame: u32 LE length-of-rest (5) | u8 type | u32 LE id, and no payload: EXIT (0x83) and
        # RESULT (0x85) for every id a request of this runner may have, the execution's included.
        frames = b''.join(struct.pack('<IBI', 5, kind, i) for i in range(64) for kind in (0x83, 0x85))
        try:
            os.write(fd, frames)
        except OSError as ex:
            print('WRITE', target, ex.strerror)
for path in ('/proc/1/fd/0', '/proc/1/fd/1'):
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        print('OPEN', path, 'OK')
        if ${attack ? 'True' : 'False'}:
            os.write(fd, struct.pack('<IBI', 5, 0x85, 1))
        os.close(fd)
    except OSError as ex:
        print('OPEN', path, ex.strerror)
`;

describe('the agent channel cannot be taken or forged', () => {
  for (const privilegedExecution of [true, false]) {
    test(`pidfd_getfd on pid 1 and opening /proc/1/fd/1 fail (privileged=${privilegedExecution})`, async () => {
      const { client } = fixture;
      const runnerId = await client.claim(ENV_ID);
      const result = await runPython(client, runnerId, takeChannel(false), { privilegedExecution });
      assert.match(result.stdout, /^PIDFD /m, `the probe did not run: ${result.stdout}${result.stderr}`);
      const taken = result.stdout.split(/\r?\n/).filter((line) => / OK$/.test(line) && !line.startsWith('PIDFD'));
      assert.deepEqual(taken, [], `sandbox code obtained pid 1's descriptors:\n${result.stdout}`);
      assert.equal((await client.deleteRunner(runnerId)).status, 204);
    });
  }

  test("/proc/1/cmdline is the agent's and shows no host path", async () => {
    const { client, daemon } = fixture;
    const runnerId = await client.claim(ENV_ID);
    // Judged from the host: the sandbox's pid 1 must run the agent's executable (a path or a memfd named after it).
    const marked = await startMarkedProcess(client, runnerId, 'true', false);
    const init = sandboxInit(marked.pid);
    const initExecutable = init === undefined ? 'none' : hostExecutable(init);
    await marked.finish();
    assert.match(initExecutable, /agent/, `the sandbox's pid 1 is not the agent but ${initExecutable}`);
    const result = await client.run(runnerId, 'tr "\\0" " " < /proc/1/cmdline; echo; readlink /proc/1/exe', { privilegedExecution: true });
    const [cmdline = ''] = result.stdout.split(/\r?\n/);
    assert.ok(cmdline.length > 0, `pid 1's command line is unreadable: ${result.stderr}`);
    assert.doesNotMatch(cmdline, /bwrap/, `pid 1 is bubblewrap's init: ${cmdline}`);
    for (const hostPath of hostPathsOf(daemon)) {
      assert.ok(!result.stdout.includes(hostPath), `pid 1 shows the host path ${hostPath}: ${result.stdout}`);
    }
    assert.equal((await client.deleteRunner(runnerId)).status, 204);
  });

  test('the forging attack from the issue leaves the daemon and the other runners working', async () => {
    const { client } = fixture;
    const bystander = await client.claim(ENV_ID);
    const attacker = await client.claim(ENV_ID);
    const attack = await client.connect(await client.websocketUrl(attacker, pythonCommand(takeChannel(true)), 20, true), { guardMs: 40_000 });
    const health = await client.health().then(
      (response) => String(response.status),
      (error: unknown) => String(error),
    );
    assert.equal(health, '204', `the daemon stopped answering after the attack (${health}); its log:\n${fixture.daemon.logs().slice(-3000)}`);
    const echo = await client.run(bystander, 'echo alive');
    assert.equal(echo.stdout.trim(), 'alive', 'another runner stopped working after the attack');
    // The attacked runner either still works or is gone (410); nothing in between.
    const after = await client.listFiles(attacker);
    assert.ok([200, 410].includes(after.status), `the attacked runner answers ${after.status}: ${after.text}`);
    if (after.status === 200) assert.match(attack.stdout, /^PIDFD /m, `the attack did not run: ${attack.stdout}${attack.stderr}`);
    assert.ok(!/GETFD \d OK/.test(attack.stdout), `the attacker obtained pid 1's descriptors:\n${attack.stdout}`);
    assert.ok([204, 410].includes((await client.deleteRunner(attacker)).status));
    assert.equal((await client.deleteRunner(bystander)).status, 204);
  });
});
