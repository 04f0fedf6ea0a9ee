import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import test from 'node:test';
import { CodeOceanClient, environmentSpec } from './support/codeocean-client.js';
import { startDaemon } from './support/daemon.js';
import { BUSYBOX, preparedRoot } from './support/prepared-root.js';

/*
 * Runners on an image's root file system (here one mapped in local.images, as an operator or the
 * image store prepares it): its files keep their image owners inside each runner's user namespace
 * (an idmapped mount), and its own accounts name the users.
 */

const skip = existsSync(BUSYBOX) ? false : 'busybox-static is not installed';

test('an image root: files keep their image owners, the image user runs unprivileged commands, root privileged ones', { skip }, async (t) => {
  const root = preparedRoot();
  t.after(() => root.remove());
  const daemon = await startDaemon({ config: { local: { images: { 'test/busybox:1': root.directory } } } });
  t.after(() => daemon.stop());
  const client = new CodeOceanClient(daemon.baseUrl, daemon.token);
  assert.equal((await client.putEnvironment(environmentSpec(81, { image: 'test/busybox:1', prewarmingPoolSize: 1 }))).status, 201);
  const runnerId = await client.claim(81);

  const listing = await client.run(runnerId, 'ls -lnd / /root /home/user /home/user/notes /bin/busybox');
  assert.equal(listing.exitCode, 0, listing.stderr);
  const owners = Object.fromEntries(
    listing.stdout
      .trim()
      .split(/\r?\n/)
      .map((line) => line.trim().split(/\s+/))
      .map((fields) => [fields.at(-1), `${fields[2]}:${fields[3]}`]),
  );
  assert.deepEqual(owners, { '/': '0:0', '/root': '0:0', '/home/user': '1000:1000', '/home/user/notes': '1000:1000', '/bin/busybox': '0:0' });

  const whoami = await client.run(runnerId, 'whoami; id -u; pwd; echo "$HOME"');
  assert.equal(whoami.stderr, '');
  assert.deepEqual(whoami.stdout.trim().split(/\r?\n/), ['user', '1000', '/workspace', '/workspace']);
  const secret = await client.run(runnerId, 'cat /root/secret');
  assert.notEqual(secret.exitCode, 0, 'the learner cannot read a root-only file of the image');
  assert.match(secret.stderr + secret.stdout, /Permission denied/);

  const privileged = await client.run(runnerId, 'whoami; cat /root/secret; echo "$HOME"', { privilegedExecution: true });
  assert.equal(privileged.stderr, '');
  assert.deepEqual(privileged.stdout.trim().split(/\r?\n/), ['root', 'root only', '/root']);
  // The learner's own files of the image are theirs; the image root stays read-only.
  const write = await client.run(runnerId, 'cat /home/user/notes; touch /home/user/new');
  assert.match(write.stdout, /the user owns this/);
  assert.match(write.stderr + write.stdout, /Read-only file system/);
  const os = await client.run(runnerId, 'cat /etc/os-release');
  assert.match(os.stdout, /Poseidon Test Root/);
  assert.equal((await client.deleteEnvironment(81)).status, 204);
});

test('an image without a `user` account: unprivileged commands run as local.uid, named in a passwd laid over the image', { skip }, async (t) => {
  const root = preparedRoot({ passwd: 'root:x:0:0:root:/root:/bin/sh\n' });
  t.after(() => root.remove());
  const daemon = await startDaemon({ config: { local: { images: { 'test/busybox:nouser': root.directory }, uid: 1234, gid: 1234 } } });
  t.after(() => daemon.stop());
  const client = new CodeOceanClient(daemon.baseUrl, daemon.token);
  assert.equal((await client.putEnvironment(environmentSpec(82, { image: 'test/busybox:nouser', prewarmingPoolSize: 1 }))).status, 201);
  const runnerId = await client.claim(82);
  const whoami = await client.run(runnerId, 'whoami; id -u; id -g');
  assert.equal(whoami.stderr, '');
  assert.deepEqual(whoami.stdout.trim().split(/\r?\n/), ['learner', '1234', '1234']);
  assert.equal((await client.deleteEnvironment(82)).status, 204);
});
