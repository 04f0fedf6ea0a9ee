import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { mkdirSync } from 'node:fs';
import { describe, test } from 'node:test';
import { environmentSpec } from './support/codeocean-client.js';
import { useDaemon } from './support/fixture.js';

/*
 * Runners belong to different learners, and the daemon's token lets anyone create runners. The
 * daemon's files live under /var/tmp here, not /tmp, because a private /tmp in the sandbox would
 * hide them trivially and the test would prove nothing about the rest of the host view.
 */

const TOKEN = `secret-token-${randomUUID()}`;
const CANARY = `canary-${randomUUID()}`;
const ENV_ID = 31;
const BASE_DIR = '/var/tmp';
mkdirSync(BASE_DIR, { recursive: true });
const fixture = useDaemon({ token: TOKEN, baseDir: BASE_DIR, env: { E2E_DAEMON_CANARY: CANARY } }, async ({ client }) => {
  assert.equal((await client.putEnvironment(environmentSpec(ENV_ID, { prewarmingPoolSize: 2 }))).status, 201);
});

const SECRET_NAME = `learner-secret-${randomUUID()}.txt`;
const SECRET = `alice-private-${randomUUID()}`;

describe('isolation between runners and from the daemon', () => {
  test("a runner cannot see another runner's files", async () => {
    const { client, daemon } = fixture;
    const alice = await client.claim(ENV_ID);
    const bob = await client.claim(ENV_ID);
    assert.notEqual(alice, bob);
    assert.equal((await client.copySubmission(alice, { [SECRET_NAME]: SECRET })).status, 204);
    const own = await client.run(alice, `cat ${SECRET_NAME}`);
    assert.equal(own.stdout.trim(), SECRET, 'control: the owner reads its own file');

    const probe = [
      `cat ${SECRET_NAME}`,
      `ls -la .. / /tmp`,
      `find ${daemon.tempDir} /tmp /var/tmp /dev/shm /run -name ${SECRET_NAME} 2>/dev/null | head`,
      `find ${daemon.tempDir} 2>/dev/null | head -50`,
      `grep -rl ${SECRET} ${daemon.tempDir} /tmp /var/tmp /dev/shm 2>/dev/null`,
      `cat /proc/*/root/*/${SECRET_NAME} 2>/dev/null`,
    ].join('; ');
    for (const privilegedExecution of [false, true]) {
      const look = await client.run(bob, `sh -c '${probe}'`, { privilegedExecution, timeLimit: 30, guardMs: 60_000 });
      assert.ok(!look.stdout.includes(SECRET) && !look.stderr.includes(SECRET), `bob (privileged=${privilegedExecution}) read alice's secret:\n${look.stdout}`);
      assert.ok(!look.stdout.includes(SECRET_NAME), `bob (privileged=${privilegedExecution}) can see alice's file name:\n${look.stdout}`);
    }
    const bobFiles = await client.listFiles(bob, { recursive: true });
    assert.ok(!bobFiles.text.includes(SECRET_NAME), "bob's listing shows alice's file");
    const bobRaw = await client.downloadRaw(bob, SECRET_NAME);
    assert.equal(bobRaw.status, 424, "bob cannot download alice's file");

    assert.equal((await client.deleteRunner(alice)).status, 204);
    assert.equal((await client.deleteRunner(bob)).status, 204);
  });

  for (const privilegedExecution of [false, true]) {
    test(`a runner cannot read the daemon's config, token or environment (privileged=${privilegedExecution})`, async () => {
      const { client, daemon } = fixture;
      const runnerId = await client.claim(ENV_ID);
      const probe = [
        `cat ${daemon.configPath}`,
        'env',
        'cat /proc/*/environ 2>/dev/null | tr "\\0" "\\n"',
        'cat /proc/*/cmdline 2>/dev/null | tr "\\0" " "',
        `ls -la ${daemon.tempDir} ${daemon.stateDir}`,
      ].join('; ');
      // The probe must not contain the token itself: /proc/*/cmdline would echo it back.
      assert.ok(!probe.includes(TOKEN));
      const look = await client.run(runnerId, `sh -c '${probe}'`, { privilegedExecution, timeLimit: 30, guardMs: 60_000 });
      const seen = look.stdout + look.stderr;
      assert.ok(!seen.includes(TOKEN), `the server token is visible inside the sandbox:\n${seen.slice(0, 2000)}`);
      assert.ok(!seen.includes(CANARY), `the daemon's environment leaks into the sandbox:\n${seen.slice(0, 2000)}`);

      const raw = await client.downloadRaw(runnerId, daemon.configPath, privilegedExecution);
      assert.ok(!raw.text.includes(TOKEN), `GET files/raw with an absolute path returned the daemon config (status ${raw.status})`);
      const escaped = await client.downloadRaw(runnerId, `../../../../../../../..${daemon.configPath}`, privilegedExecution);
      assert.ok(!escaped.text.includes(TOKEN), `GET files/raw with ../ escaped the workspace (status ${escaped.status})`);

      // A symlink planted by the learner must not let file operations reach the host.
      await client.run(runnerId, 'ln -s / hostroot');
      const viaLink = await client.downloadRaw(runnerId, `hostroot${daemon.configPath}`, privilegedExecution);
      assert.ok(!viaLink.text.includes(TOKEN), `GET files/raw followed a symlink to the daemon config (status ${viaLink.status})`);
      assert.ok([204, 410].includes((await client.deleteRunner(runnerId)).status));
    });
  }

  test('uploads with .. or absolute paths stay inside the sandbox', async () => {
    const { client, daemon } = fixture;
    const runnerId = await client.claim(ENV_ID);
    const name = `escape-${randomUUID()}.txt`;
    const response = await client.patchFiles(runnerId, {
      copy: [
        { path: `../../../../../../..${daemon.tempDir}/${name}`, content: Buffer.from('x').toString('base64') },
        { path: `${daemon.tempDir}/abs-${name}`, content: Buffer.from('x').toString('base64') },
      ],
    });
    assert.ok([204, 400].includes(response.status), `unexpected ${response.status}: ${response.text}`);
    const { existsSync } = await import('node:fs');
    assert.ok(!existsSync(`${daemon.tempDir}/${name}`), 'a relative upload escaped to the host');
    assert.ok(!existsSync(`${daemon.tempDir}/abs-${name}`), 'an absolute upload landed on the host');
    assert.ok([204, 410].includes((await client.deleteRunner(runnerId)).status));
  });
});
