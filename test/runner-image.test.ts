import assert from 'node:assert/strict';
import { symlinkSync, unlinkSync } from 'node:fs';
import path from 'node:path';
import test from 'node:test';
import type { PreparedImage } from '../src/local/images/image-store.js';
import { DEFAULT_PATH, directoryImage, hostImage, registryImage } from '../src/local/runner-image.js';
import { preparedRoot } from './support/prepared-root.js';

/*
 * Who an image's runners run as and with which variables (Poseidon's conventions), from the image's
 * config and its own /etc/passwd.
 */

const FALLBACK = { uid: 1500, gid: 1500 };

function prepared(rootDirectory: string, overrides: Partial<PreparedImage> = {}): PreparedImage {
  return {
    reference: 'registry.example.org/test/image:1',
    digest: `sha256:${'a'.repeat(64)}`,
    rootDirectory,
    config: { env: ['PATH=/opt/bin:/usr/bin:/bin', 'MARKER=image', 'CODEOCEAN=false'], user: undefined, workingDir: '/workspace' },
    accounts: { user: { name: 'user', uid: 1000, gid: 1000, home: '/workspace' }, configured: undefined },
    ...overrides,
  };
}

test("the image's `user` account runs unprivileged commands; the image's Env, then CODEOCEAN=true; HOME from the image's passwd", (t) => {
  const root = preparedRoot();
  t.after(() => root.remove());
  const image = registryImage(prepared(root.directory), FALLBACK);
  assert.deepEqual(image.learner, { uid: 1000, gid: 1000 });
  assert.equal(image.accounts, undefined, "the image's own passwd names the user");
  assert.equal(image.rootDirectory, root.directory);
  assert.deepEqual(image.environment(false), { PATH: '/opt/bin:/usr/bin:/bin', HOME: '/workspace', TERM: 'xterm', MARKER: 'image', CODEOCEAN: 'true' });
  assert.equal(image.environment(true).HOME, '/root');
});

test('without a `user` account: the configured User unless root, else local.uid with a learner entry over the image passwd', (t) => {
  const root = preparedRoot({ passwd: 'root:x:0:0:root:/root:/bin/sh\napp:x:2000:2001:app:/home/app:/bin/sh\n' });
  t.after(() => root.remove());
  const configured = registryImage(prepared(root.directory, { accounts: { user: undefined, configured: { uid: 2000, gid: 2001, name: 'app' } } }), FALLBACK);
  assert.deepEqual(configured.learner, { uid: 2000, gid: 2001 });
  assert.equal(configured.accounts, undefined);
  assert.equal(configured.environment(false).HOME, '/home/app');

  const asRoot = registryImage(prepared(root.directory, { accounts: { user: undefined, configured: { uid: 0, gid: 0, name: 'root' } } }), FALLBACK);
  assert.deepEqual(asRoot.learner, FALLBACK, 'a root User never runs learner code');
  assert.match(
    asRoot.accounts?.passwd ?? '',
    /^root:x:0:0:root:\/root:\/bin\/sh\napp:x:2000:2001:app:\/home\/app:\/bin\/sh\nlearner:x:1500:1500:learner:\/workspace:\/bin\/sh\n$/,
  );
  assert.match(asRoot.accounts?.group ?? '', /\nlearner:x:1500:\n$/);
  assert.equal(asRoot.environment(false).HOME, '/workspace');
});

test('a directory mapped in local.images uses its `user` account; the host layout keeps its minimal accounts', (t) => {
  const root = preparedRoot();
  t.after(() => root.remove());
  const directory = directoryImage(root.directory, FALLBACK);
  assert.deepEqual(directory.learner, { uid: 1000, gid: 1000 });
  assert.equal(directory.digest, undefined);
  assert.deepEqual(directory.environment(false), { PATH: DEFAULT_PATH, HOME: '/workspace', TERM: 'xterm', CODEOCEAN: 'true' });
  const host = hostImage(FALLBACK);
  assert.equal(host.rootDirectory, undefined);
  assert.match(host.accounts?.passwd ?? '', /learner:x:1500:1500/);
  assert.equal(host.environment(false).LANG, 'C.UTF-8');
});

test("an image's /etc/passwd that is a symbolic link is not followed to the host's files", (t) => {
  const root = preparedRoot();
  t.after(() => root.remove());
  const passwd = path.join(root.directory, 'etc/passwd');
  unlinkSync(passwd);
  symlinkSync('/etc/passwd', passwd);
  const image = directoryImage(root.directory, FALLBACK);
  assert.deepEqual(image.learner, FALLBACK, 'no `user` read from the host');
  assert.equal(
    image.accounts?.passwd,
    'root:x:0:0:root:/root:/bin/sh\nlearner:x:1500:1500:learner:/workspace:/bin/sh\n',
    'root and the learner keep their names',
  );
});
