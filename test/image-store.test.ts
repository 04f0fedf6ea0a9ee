import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, lstatSync, readdirSync, readFileSync, readlinkSync, writeFileSync } from 'node:fs';
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import zlib from 'node:zlib';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { loadConfig } from '../src/config/load.js';
import type { RegistryConfig } from '../src/config/schema.js';
import type { FileImageStore } from '../src/local/images/file-image-store.js';
import { ImageError, type ImageErrorReason, type PullProgress } from '../src/local/images/image-store.js';
import { formatReference, parseReference } from '../src/local/images/reference.js';
import { FakeRegistry } from './fake-registry/index.js';
import { RealRegistry, realRegistryAvailable } from './fake-registry/real-registry.js';
import { testImageStore } from './support/image-store.js';
import { buildTestImage, TEST_IMAGE, type TestImage } from './support/test-images.js';

/*
 * The image store on its own: registry client, cache and unpacker against the in-process fake
 * registry (and Debian's real registry where installed). The API-level acceptance tests are in
 * e2e-images.test.ts.
 */

let scratch: string;
let escapeTarget: string;
let busybox: TestImage;
let busyboxV2: TestImage;

before(async () => {
  scratch = await mkdtemp(path.join(tmpdir(), 'poseidon-image-store-'));
  escapeTarget = path.join(scratch, 'outside');
  await mkdir(escapeTarget);
  busybox = await buildTestImage(path.join(scratch, 'layout-v1'), { marker: 'v1', escapeTarget });
  busyboxV2 = await buildTestImage(path.join(scratch, 'layout-v2'), { marker: 'v2', escapeTarget });
});

after(async () => {
  await rm(scratch, { recursive: true, force: true });
});

let stores = 0;
function newStore(
  registries: Record<string, RegistryConfig> = {},
  options: { directory?: string; retention?: number; minimumRetentionMs?: number } = {},
): { store: FileImageStore; directory: string } {
  stores += 1;
  const directory = options.directory ?? path.join(scratch, `store-${stores}`);
  const store = testImageStore(directory, {
    registries,
    cache: { unusedretention: options.retention ?? 3600, maxunusedsize: 0 },
    minimumRetentionMs: options.minimumRetentionMs,
  });
  return { store, directory };
}

async function rejectsWith(promise: Promise<unknown>, reason: ImageErrorReason, pattern?: RegExp): Promise<ImageError> {
  try {
    await promise;
  } catch (error) {
    assert.ok(error instanceof ImageError, `expected an ImageError, got ${String(error)}`);
    assert.equal(error.reason, reason, error.message);
    if (pattern) assert.match(error.message, pattern);
    return error;
  }
  assert.fail(`expected a rejection with ${reason}`);
}

/* Nothing half-made: no root besides complete ones, no file in tmp/ (a running store's own directory is there, empty). */
function assertNoLeftovers(directory: string, completeRoots: number): void {
  const temporary = path.join(directory, 'tmp');
  assert.deepEqual(
    readdirSync(temporary).flatMap((name) => readdirSync(path.join(temporary, name)).map((entry) => `${name}/${entry}`)),
    [],
  );
  const roots = readdirSync(path.join(directory, 'roots'));
  assert.equal(roots.length, completeRoots, `roots: ${roots.join(', ')}`);
  for (const root of roots) assert.ok(existsSync(path.join(directory, 'roots', root, 'image.json')));
}

describe('references', () => {
  test('Docker Hub defaults, library/, registries with ports, tags and digests', () => {
    const digest = `sha256:${'a'.repeat(64)}`;
    const cases: Array<[string, string]> = [
      ['python', 'docker.io/library/python:latest'],
      ['openhpi/co_execenv_python:3.8', 'docker.io/openhpi/co_execenv_python:3.8'],
      ['docker.io/python:3.12', 'docker.io/library/python:3.12'],
      ['index.docker.io/library/python', 'docker.io/library/python:latest'],
      ['ghcr.io/org/sub/image:v1.2-rc_3', 'ghcr.io/org/sub/image:v1.2-rc_3'],
      ['localhost:5000/x', 'localhost:5000/x:latest'],
      ['127.0.0.1:5000/a/b:t', '127.0.0.1:5000/a/b:t'],
      [`python@${digest}`, `docker.io/library/python@${digest}`],
      [`python:3@${digest}`, `docker.io/library/python:3@${digest}`],
    ];
    for (const [text, expected] of cases) assert.equal(formatReference(parseReference(text)), expected, text);
  });

  test('bad references are refused with the reason', () => {
    const cases: Array<[string, RegExp]> = [
      ['', /empty/],
      ['Python', /not a repository name component/],
      ['python:', /tag/],
      ['python:-x', /tag/],
      ['python@sha256:abc', /digest/],
      ['python@md5:0123', /digest/],
      ['a//b', /component/],
      ['ghcr.io/', /component/],
      [`x:${'t'.repeat(129)}`, /tag/],
    ];
    for (const [text, pattern] of cases) {
      assert.throws(
        () => parseReference(text),
        (error: unknown) => error instanceof ImageError && error.reason === 'bad-reference' && error.kind === 'bad-request' && pattern.test(error.message),
        text,
      );
    }
  });
});

describe('configuration', () => {
  test("local.pullpolicy: Kubernetes' spellings, and Poseidon's nomad.disableforcepull when it is unset", async () => {
    const policy = async (environment: NodeJS.ProcessEnv): Promise<string> => (await loadConfig(undefined, environment)).local.pullpolicy;
    assert.equal(await policy({}), 'ifnotpresent');
    assert.equal(await policy({ POSEIDON_NOMAD_DISABLEFORCEPULL: 'false' }), 'always');
    assert.equal(await policy({ POSEIDON_NOMAD_DISABLEFORCEPULL: 'true' }), 'ifnotpresent');
    assert.equal(await policy({ POSEIDON_NOMAD_DISABLEFORCEPULL: 'false', POSEIDON_LOCAL_PULLPOLICY: 'Never' }), 'never');
    await assert.rejects(policy({ POSEIDON_LOCAL_PULLPOLICY: 'sometimes' }), /local\.pullpolicy/);
  });

  test('local.registries: credentials, mirrors and insecure hosts by host[:port]; bad keys and mirrors are refused', async () => {
    const config = await loadConfig(undefined, {
      POSEIDON_LOCAL_REGISTRIES:
        '{"docker.io": {"mirror": "http://10.0.0.5:5000/"}, "registry.example.org:5000": {"username": "u", "password": "p", "insecure": true}}',
    });
    assert.deepEqual(config.local.registries, {
      'docker.io': { mirror: 'http://10.0.0.5:5000', insecure: false },
      'registry.example.org:5000': { username: 'u', password: 'p', insecure: true },
    });
    await assert.rejects(loadConfig(undefined, { POSEIDON_LOCAL_REGISTRIES: '{"docker.io": {"mirror": "ftp://x"}}' }), /local\.registries/);
    await assert.rejects(loadConfig(undefined, { POSEIDON_LOCAL_REGISTRIES: '{"http://docker.io": {}}' }), /registry host/);
    await assert.rejects(loadConfig(undefined, { POSEIDON_LOCAL_REGISTRIES: '{"docker.io": {"token": "x"}}' }), /token/);
  });
});

describe('pulling from the fake registry', () => {
  let registry: FakeRegistry;
  const credentials = { username: 'codeocean', password: 'secret' };
  let registries: Record<string, RegistryConfig>;

  before(async () => {
    registry = await FakeRegistry.start({ auth: true, credentials });
    registries = { [registry.host]: { ...credentials, insecure: false } };
    registry.push('test/busybox', 'v1', busybox, { index: 'oci' });
    registry.push('test/busybox', 'docker', busybox, { index: 'docker' });
    registry.push('test/busybox', 'plain', busybox);
  });
  after(() => registry.close());

  test('an image comes unpacked with its config, accounts and the sandbox mount points; credentials never reach the blob host', async () => {
    const { store, directory } = newStore(registries);
    const progress: PullProgress[] = [];
    const image = await store.prepare(`${registry.host}/test/busybox:v1`, { policy: 'ifnotpresent', onProgress: (report) => progress.push(report) });
    await store.close();
    assert.equal(image.digest, busybox.manifestDigest, 'the linux/amd64 entry of the index');
    assert.equal(image.reference, `${registry.host}/test/busybox:v1`);
    assert.deepEqual(image.config, { env: [`PATH=${TEST_IMAGE.path}`, `${TEST_IMAGE.marker}=v1`, 'LANG=C.UTF-8'], user: undefined, workingDir: '/workspace' });
    assert.deepEqual(image.accounts.user, TEST_IMAGE.user);
    assert.equal(image.accounts.configured, undefined);
    const root = image.rootDirectory;
    assert.match(readFileSync(path.join(root, 'etc/os-release'), 'utf8'), /VERSION_ID=v1/);
    for (const mountPoint of ['proc', 'dev', 'tmp', 'workspace', 'etc', '.poseidon'])
      assert.ok(lstatSync(path.join(root, mountPoint)).isDirectory(), mountPoint);
    for (const file of ['etc/passwd', 'etc/group']) assert.ok(lstatSync(path.join(root, file)).isFile(), file);
    // Layer 2's whiteout hides layer 1's file; its opaque directory hides layer 1's contents.
    assert.equal(existsSync(path.join(root, TEST_IMAGE.whiteoutPath)), false);
    assert.deepEqual(readdirSync(path.join(root, TEST_IMAGE.opaqueDirectory)), ['upper']);
    // A hard link across layers, owners and modes as in the image, no device node.
    assert.equal(lstatSync(path.join(root, TEST_IMAGE.hardLink)).ino, lstatSync(path.join(root, 'etc/os-release')).ino);
    const owned = lstatSync(path.join(root, 'home/user/owned'));
    assert.deepEqual([owned.uid, owned.gid, owned.mode & 0o7777], [1000, 1000, 0o600]);
    assert.equal(lstatSync(path.join(root, 'etc/shadow')).gid, 42);
    assert.equal(lstatSync(path.join(root, 'var/tmp')).mode & 0o7777, 0o1777);
    assert.equal(existsSync(path.join(root, 'etc/null-device')), false);
    assert.equal(readlinkSync(path.join(root, 'bin/sh')), 'busybox');
    // The escape attempt stayed inside the root.
    assert.deepEqual(readdirSync(escapeTarget), []);
    assert.equal(readlinkSync(path.join(root, TEST_IMAGE.escapeLink)), escapeTarget);
    assert.equal(readFileSync(path.join(root, escapeTarget, TEST_IMAGE.escapeFile), 'utf8'), 'escaped\n');
    // Progress per layer, and the Bearer flow with Basic credentials, none of which went to the CDN.
    for (const layer of busybox.layers)
      assert.ok(
        progress.some((report) => report.layer === layer.digest && report.downloaded === layer.size),
        layer.digest,
      );
    assert.ok(registry.requests.some((request) => request.path.startsWith('/token') && request.authorization?.startsWith('Basic ')));
    assert.ok(registry.requests.some((request) => request.server === 'cdn'));
    assert.deepEqual(registry.cdnAuthorizations(), []);
    assertNoLeftovers(directory, 1);
  });

  test('Docker manifest lists and plain manifests resolve to the same image; shared blobs are not downloaded twice', async () => {
    const { store } = newStore(registries);
    const before = registry.requests.filter((request) => request.server === 'cdn').length;
    const [docker, plain] = [
      await store.prepare(`${registry.host}/test/busybox:docker`, { policy: 'always' }),
      await store.prepare(`${registry.host}/test/busybox:plain`, { policy: 'always' }),
    ];
    await store.close();
    assert.equal(docker.digest, busybox.manifestDigest);
    assert.equal(plain.rootDirectory, docker.rootDirectory);
    const blobs = registry.requests.filter((request) => request.server === 'cdn').length - before;
    assert.equal(blobs, 1 + busybox.layers.length, 'config and layers once');
  });

  test('concurrent prepares of one image unpack it once', async () => {
    const { store, directory } = newStore(registries);
    const before = registry.requests.filter((request) => request.server === 'cdn').length;
    const images = await Promise.all(
      ['v1', 'v1', 'docker', 'plain', 'v1'].map((tag, index) =>
        store.prepare(`${registry.host}/test/busybox:${tag}`, index === 1 ? { policy: 'always', onProgress: () => undefined } : { policy: 'ifnotpresent' }),
      ),
    );
    await store.close();
    assert.equal(new Set(images.map((image) => image.rootDirectory)).size, 1);
    assert.equal(registry.requests.filter((request) => request.server === 'cdn').length - before, 1 + busybox.layers.length);
    assertNoLeftovers(directory, 1);
  });

  test('wrong credentials, unknown repositories and tags are definite failures', async () => {
    const { store: denied, directory } = newStore({ [registry.host]: { username: 'codeocean', password: 'wrong', insecure: false } });
    const error = await rejectsWith(denied.prepare(`${registry.host}/test/busybox:v1`, { policy: 'always' }), 'access-denied', /token endpoint refused/);
    assert.equal(error.definite, true);
    await denied.close();
    const { store } = newStore(registries);
    await rejectsWith(store.prepare(`${registry.host}/test/missing:v1`, { policy: 'always' }), 'not-found', /NAME_UNKNOWN/);
    await rejectsWith(store.prepare(`${registry.host}/test/busybox:nope`, { policy: 'ifnotpresent' }), 'not-found', /MANIFEST_UNKNOWN/);
    await rejectsWith(store.prepare('Not A Reference', { policy: 'always' }), 'bad-reference');
    const lost = busyboxV2.layers[1]?.digest ?? '';
    registry.push('test/lost-blob', 'v1', busyboxV2);
    registry.faults.missingBlobs.add(lost);
    try {
      await rejectsWith(store.prepare(`${registry.host}/test/lost-blob:v1`, { policy: 'always' }), 'not-found', /BLOB_UNKNOWN/);
    } finally {
      registry.faults.missingBlobs.delete(lost);
    }
    await store.close();
    assertNoLeftovers(directory, 0);
  });

  test('a digest mismatch fails clearly and leaves no root, blob or temporary file', async () => {
    const corrupt = await buildTestImage(path.join(scratch, 'layout-corrupt'), { marker: 'corrupt', escapeTarget });
    registry.push('test/corrupt', 'v1', corrupt);
    const layer = corrupt.layers[1]?.digest ?? '';
    registry.faults.corruptBlobs.add(layer);
    const { store, directory } = newStore(registries);
    try {
      await rejectsWith(store.prepare(`${registry.host}/test/corrupt:v1`, { policy: 'always' }), 'digest-mismatch', new RegExp(`blob ${layer}`));
      assertNoLeftovers(directory, 0);
      assert.equal(existsSync(path.join(directory, 'blobs', 'sha256', layer.slice(7))), false);
      // Once the registry serves the right bytes, the same store pulls it.
      registry.faults.corruptBlobs.delete(layer);
      const image = await store.prepare(`${registry.host}/test/corrupt:v1`, { policy: 'always' });
      assert.equal(image.digest, corrupt.manifestDigest);
    } finally {
      registry.faults.corruptBlobs.delete(layer);
      await store.close();
    }
  });

  test('a manifest whose bytes do not match its digest is refused, by tag and by digest', async () => {
    registry.push('test/swapped', 'v1', busyboxV2);
    registry.faults.corruptManifests.add(busyboxV2.manifestDigest);
    const { store, directory } = newStore(registries);
    try {
      await rejectsWith(store.prepare(`${registry.host}/test/swapped:v1`, { policy: 'always' }), 'digest-mismatch', /not the announced/);
      await rejectsWith(
        store.prepare(`${registry.host}/test/swapped@${busyboxV2.manifestDigest}`, { policy: 'always' }),
        'digest-mismatch',
        /not the requested/,
      );
      assertNoLeftovers(directory, 0);
    } finally {
      registry.faults.corruptManifests.delete(busyboxV2.manifestDigest);
      await store.close();
    }
  });

  test('a new digest behind a tag gives a new root; the old one stays until collected', async () => {
    registry.push('test/rolling', 'latest', busybox);
    const { store, directory } = newStore(registries);
    const first = await store.prepare(`${registry.host}/test/rolling`, { policy: 'always' });
    registry.push('test/rolling', 'latest', busyboxV2);
    // ifnotpresent keeps what it has; always asks the registry (HEAD) and rolls.
    assert.equal((await store.prepare(`${registry.host}/test/rolling`, { policy: 'ifnotpresent' })).digest, first.digest);
    const second = await store.prepare(`${registry.host}/test/rolling`, { policy: 'always' });
    assert.equal(second.digest, busyboxV2.manifestDigest);
    assert.notEqual(second.rootDirectory, first.rootDirectory);
    assert.match(readFileSync(path.join(second.rootDirectory, 'etc/os-release'), 'utf8'), /VERSION_ID=v2/);
    assert.ok(existsSync(first.rootDirectory));
    // An unchanged tag costs one HEAD, no manifest GET.
    const requestsBefore = registry.requests.length;
    await store.prepare(`${registry.host}/test/rolling`, { policy: 'always' });
    const made = registry.requests.slice(requestsBefore).filter((request) => request.path.includes('/manifests/'));
    assert.deepEqual(
      made.map((request) => request.method),
      ['HEAD'],
    );
    await store.close();
    assertNoLeftovers(directory, 2);
  });

  test('after a restart with the registry gone, cached images are served by every policy; an uncached one fails clearly', async () => {
    const other = await FakeRegistry.start();
    other.push('test/offline', 'v1', busybox);
    const { store, directory } = newStore();
    const reference = `${other.host}/test/offline:v1`;
    const online = await store.prepare(reference, { policy: 'ifnotpresent' });
    await store.close();
    await other.close();
    const { store: restarted } = newStore({}, { directory });
    try {
      for (const policy of ['ifnotpresent', 'never', 'always'] as const) {
        const image = await restarted.prepare(reference, { policy });
        assert.equal(image.digest, online.digest, policy);
        assert.equal(image.rootDirectory, online.rootDirectory);
        assert.deepEqual(image.accounts, online.accounts);
      }
      await rejectsWith(restarted.prepare(`${other.host}/test/offline:v2`, { policy: 'never' }), 'not-cached', /poseidon pull/);
      const unavailable = await rejectsWith(restarted.prepare(`${other.host}/test/offline:v2`, { policy: 'ifnotpresent' }), 'registry-unavailable');
      assert.equal(unavailable.definite, false);
    } finally {
      await restarted.close();
    }
  });

  /* A registry of its own that sends `bytesPerSecond`, a fresh store; both end with the test. */
  async function withSlowRegistry(
    bytesPerSecond: number,
    body: (slow: FakeRegistry, reference: string, store: FileImageStore) => Promise<void>,
  ): Promise<string> {
    const slow = await FakeRegistry.start();
    slow.push('test/slow', 'v1', busybox);
    slow.faults.bytesPerSecond = bytesPerSecond;
    const { store, directory } = newStore();
    try {
      await body(slow, `${slow.host}/test/slow:v1`, store);
    } finally {
      await store.close();
      await slow.close();
    }
    return directory;
  }

  test('an aborted pull of a slow registry leaves nothing half-made', async () => {
    const directory = await withSlowRegistry(64 * 1024, async (_slow, reference, store) => {
      const controller = new AbortController();
      const pulling = store.prepare(reference, {
        policy: 'always',
        signal: controller.signal,
        onProgress: (report) => {
          if (report.phase === 'download' && report.downloaded > 0) controller.abort();
        },
      });
      await assert.rejects(pulling, (error: unknown) => controller.signal.aborted && (error as Error).name === 'AbortError');
    });
    assertNoLeftovers(directory, 0);
  });

  test('a caller that gives up does not cancel the pull another caller waits for', async () => {
    const directory = await withSlowRegistry(512 * 1024, async (slow, reference, store) => {
      const quitter = new AbortController();
      // Progress reaches a caller only once it waits for the shared download: then the first one quits.
      const seen = new Set<string>();
      const saw = (who: string) => (report: PullProgress) => {
        if (report.phase !== 'download') return;
        seen.add(who);
        if (seen.size === 2) quitter.abort();
      };
      const abandoned = store.prepare(reference, { policy: 'always', signal: quitter.signal, onProgress: saw('quitter') });
      const kept = store.prepare(reference, { policy: 'always', signal: new AbortController().signal, onProgress: saw('stayer') });
      await assert.rejects(abandoned, (error: unknown) => (error as Error).name === 'AbortError');
      assert.equal((await kept).digest, busybox.manifestDigest);
      assert.equal(slow.requests.filter((request) => request.server === 'cdn').length, 1 + busybox.layers.length, 'one download of each blob');
    });
    assertNoLeftovers(directory, 1);
  });

  test('plain tar layers unpack; zstd layers are refused before any download unless Node.js can read them', async () => {
    const plain = await buildTestImage(path.join(scratch, 'layout-plain'), { marker: 'plain', escapeTarget, uncompressed: true });
    const zstd = await buildTestImage(path.join(scratch, 'layout-zstd'), { marker: 'zstd', escapeTarget, zstd: true });
    registry.push('test/formats', 'tar', plain);
    registry.push('test/formats', 'zstd', zstd);
    const { store, directory } = newStore(registries);
    try {
      const image = await store.prepare(`${registry.host}/test/formats:tar`, { policy: 'always' });
      assert.match(readFileSync(path.join(image.rootDirectory, 'etc/os-release'), 'utf8'), /VERSION_ID=plain/);
      const cdnBefore = registry.requests.filter((request) => request.server === 'cdn').length;
      if ('createZstdDecompress' in zlib) {
        const unpacked = await store.prepare(`${registry.host}/test/formats:zstd`, { policy: 'always' });
        assert.match(readFileSync(path.join(unpacked.rootDirectory, 'etc/os-release'), 'utf8'), /VERSION_ID=zstd/);
      } else {
        await rejectsWith(store.prepare(`${registry.host}/test/formats:zstd`, { policy: 'always' }), 'unsupported', /zstd-compressed layers.*Node\.js 22\.15/);
        // Only the image config was fetched (it says which platform the image is for); no layer.
        assert.ok(registry.requests.filter((request) => request.server === 'cdn').length - cdnBefore <= 1);
        assertNoLeftovers(directory, 1);
      }
    } finally {
      await store.close();
    }
  });

  test('anonymous pulls get a token without credentials; a mirror serves a Docker Hub name', async () => {
    const mirror = await FakeRegistry.start({ auth: true });
    mirror.push('library/busybox', '1.36', busybox);
    mirror.push('openhpi/co_execenv_busybox', 'latest', busyboxV2);
    const { store } = newStore({ 'docker.io': { mirror: `http://${mirror.host}`, insecure: false } });
    try {
      assert.equal((await store.prepare('busybox:1.36', { policy: 'always' })).digest, busybox.manifestDigest);
      assert.equal((await store.prepare('docker.io/openhpi/co_execenv_busybox', { policy: 'always' })).digest, busyboxV2.manifestDigest);
      const tokens = mirror.requests.filter((request) => request.path.startsWith('/token'));
      assert.ok(tokens.length >= 2);
      assert.ok(tokens.every((request) => request.authorization === undefined));
      assert.ok(tokens.some((request) => request.path.includes(encodeURIComponent('repository:library/busybox:pull'))));
    } finally {
      await store.close();
      await mirror.close();
    }
  });

  test('garbage collection removes unused images and their blobs, never pinned ones', async () => {
    registry.push('test/gc', 'one', busybox);
    registry.push('test/gc', 'two', busyboxV2);
    const { store, directory } = newStore(registries, { retention: 0, minimumRetentionMs: 0 });
    const one = await store.prepare(`${registry.host}/test/gc:one`, { policy: 'always' });
    const two = await store.prepare(`${registry.host}/test/gc:two`, { policy: 'always' });
    const unpin = store.pin(one.digest);
    const collected = await store.collectGarbage();
    assert.deepEqual(collected.removedImages, [two.digest]);
    assert.ok(collected.removedBlobs >= 2, 'the config and the second layer of the unpinned image');
    assert.ok(existsSync(one.rootDirectory));
    assert.equal(existsSync(two.rootDirectory), false);
    // Blobs of the kept image stay; the removed image is pulled again when wanted.
    for (const layer of busybox.layers) assert.ok(existsSync(path.join(directory, 'blobs', 'sha256', layer.digest.slice(7))));
    unpin();
    unpin();
    assert.deepEqual((await store.collectGarbage()).removedImages, [one.digest]);
    assertNoLeftovers(directory, 0);
    assert.deepEqual(readdirSync(path.join(directory, 'blobs', 'sha256')), []);
    assert.equal((await store.prepare(`${registry.host}/test/gc:one`, { policy: 'ifnotpresent' })).digest, one.digest);
    await store.close();
  });
});

test('at start, what a dead process left in tmp/ goes; what a running one (a poseidon pull) is writing stays', async () => {
  const { store, directory } = newStore();
  const dead = spawnSync('true').pid;
  const leftovers = { dead: path.join(directory, 'tmp', `${dead}-0000`), alive: path.join(directory, 'tmp', `${process.pid}-ffff`) };
  for (const folder of Object.values(leftovers)) {
    await mkdir(folder, { recursive: true });
    writeFileSync(path.join(folder, 'blob-partial'), 'x');
  }
  await store.collectGarbage();
  await store.close();
  assert.equal(existsSync(leftovers.dead), false);
  assert.ok(existsSync(path.join(leftovers.alive, 'blob-partial')));
  await rm(leftovers.alive, { recursive: true });
});

describe('the real registry', { skip: realRegistryAvailable() ? false : 'docker-registry or skopeo is not installed' }, () => {
  test('an image pushed by skopeo is pulled and unpacked', async () => {
    const registry = await RealRegistry.start();
    try {
      await registry.push(busybox.layoutDirectory, busybox.tag, 'test/busybox', 'v1');
      const { store, directory } = newStore();
      const image = await store.prepare(`${registry.host}/test/busybox:v1`, { policy: 'always' });
      await store.close();
      assert.equal(image.digest, busybox.manifestDigest);
      assert.match(readFileSync(path.join(image.rootDirectory, 'etc/os-release'), 'utf8'), /VERSION_ID=v1/);
      assert.deepEqual(image.accounts.user, TEST_IMAGE.user);
      assertNoLeftovers(directory, 1);
    } finally {
      await registry.stop();
    }
  });
});
