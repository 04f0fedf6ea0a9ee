import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, describe, test } from 'node:test';
import { environmentSpec, type ApiResponse } from '../support/codeocean-client.js';
import { useDaemon } from '../support/fixture.js';
import { nodeState, restoreNode, type NodeState } from '../support/security.js';
import { sleep } from '../support/wait.js';

/*
 * Issue 8, "file uploads modify host device nodes" and point 5: every path of a PATCH is resolved
 * inside the sandbox without following a symlink out of it, and only regular files and directories
 * are written. The probes aim at /dev/full only (never /dev/null); if the host's node changed, it is
 * put back as it was and the test fails.
 */

const TOKEN = `files-${randomUUID()}`;
const ENV_ID = 804;
const DEVICE = '/dev/full';
const hostDevice: NodeState = nodeState(DEVICE);
const fixture = useDaemon({ token: TOKEN }, async ({ client }) => {
  assert.equal((await client.putEnvironment(environmentSpec(ENV_ID, { prewarmingPoolSize: 1 }))).status, 201);
});
after(() => {
  // Whatever happened above, the host leaves this file as it found it.
  restoreNode(DEVICE, hostDevice);
});

const content = Buffer.from('#!/bin/sh\necho overwritten\n').toString('base64');

function assertRefused(response: ApiResponse, what: string): void {
  assert.equal(response.status, 400, `${what}: expected a clear 400, got ${response.status} ${response.text}`);
  const body = response.body;
  const message = typeof body === 'object' && body !== null && !Array.isArray(body) ? body.message : undefined;
  assert.ok(typeof message === 'string' && message.length > 0, `${what}: the refusal carries no message: ${response.text}`);
}

describe('file uploads stay inside the sandbox and touch only regular files', () => {
  test('PATCH to /dev/full (absolute) is refused and the host device node is unchanged', async () => {
    const { client } = fixture;
    const runnerId = await client.claim(ENV_ID);
    const response = await client.patchFiles(runnerId, { copy: [{ path: DEVICE, content }] });
    const changed = restoreNode(DEVICE, hostDevice);
    assert.equal(changed, undefined, changed);
    assertRefused(response, `PATCH ${DEVICE}`);
    assert.equal((await client.run(runnerId, 'echo alive')).stdout.trim(), 'alive');
    assert.equal((await client.deleteRunner(runnerId)).status, 204);
  });

  test("PATCH through a learner's symlink to /dev (d/full) or to a device (f) is refused; host node unchanged", async () => {
    const { client } = fixture;
    const runnerId = await client.claim(ENV_ID);
    const link = await client.run(runnerId, `ln -s /dev d && ln -s ${DEVICE} f && echo linked`);
    assert.equal(link.stdout.trim(), 'linked', link.stderr);
    for (const path of ['d/full', 'f', 'd/./full']) {
      const response = await client.patchFiles(runnerId, { copy: [{ path, content }] });
      const changed = restoreNode(DEVICE, hostDevice);
      assert.equal(changed, undefined, `PATCH ${path}: ${String(changed)}`);
      assertRefused(response, `PATCH ${path}`);
    }
    // Files next to the links still upload: the refusal is about the target, not the runner.
    assert.equal((await client.patchFiles(runnerId, { copy: [{ path: 'ok.txt', content }] })).status, 204);
    assert.equal((await client.deleteRunner(runnerId)).status, 204);
  });

  test('PATCH to a FIFO made by learner code answers at once with a refusal, and the runner keeps working', async () => {
    const { client } = fixture;
    const runnerId = await client.claim(ENV_ID);
    assert.equal((await client.run(runnerId, 'mkfifo fifo && echo made')).stdout.trim(), 'made');
    const started = Date.now();
    const outcome = await Promise.race([client.patchFiles(runnerId, { copy: [{ path: 'fifo', content }] }), sleep(10_000).then(() => undefined)]);
    assert.ok(outcome !== undefined, 'PATCH to a FIFO hangs (no answer within 10 s)');
    assert.ok(Date.now() - started < 10_000);
    assertRefused(outcome, 'PATCH fifo');
    assert.equal((await client.run(runnerId, 'echo alive')).stdout.trim(), 'alive');
    assert.ok([204, 410].includes((await client.deleteRunner(runnerId)).status));
  });
});
