import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { Metrics } from '../src/monitoring/metrics.js';
import { FakeRegistry } from './fake-registry/index.js';
import { testImageStore } from './support/image-store.js';
import { buildTestImage, type TestImage } from './support/test-images.js';

/* `poseidon pull IMAGE...` fills the cache the daemon reads; pull progress reaches the metrics. */

const CLI = path.join(import.meta.dirname, '..', 'src', 'cli.ts');

let scratch: string;
let registry: FakeRegistry;
let image: TestImage;

before(async () => {
  scratch = await mkdtemp(path.join(tmpdir(), 'poseidon-pull-command-'));
  await mkdir(path.join(scratch, 'outside'));
  image = await buildTestImage(path.join(scratch, 'layout'), { escapeTarget: path.join(scratch, 'outside') });
  registry = await FakeRegistry.start({ auth: true, credentials: { username: 'ci', password: 'pw' } });
  registry.push('test/busybox', 'v1', image, { index: 'docker' });
});

after(async () => {
  await registry.close();
  await rm(scratch, { recursive: true, force: true });
});

function cli(args: string[], config: string): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(
      process.execPath,
      ['--import', 'tsx', CLI, ...args, '--config', config],
      { cwd: path.join(import.meta.dirname, '..'), env: { ...process.env, NODE_OPTIONS: '' } },
      (error, stdout, stderr) => {
        resolve({ code: error ? ((error as { code?: number }).code ?? 1) : 0, stdout, stderr });
      },
    );
  });
}

test('poseidon pull fills the cache that a store with pull policy never then serves', async () => {
  const stateDir = path.join(scratch, 'state');
  const config = path.join(scratch, 'configuration.yaml');
  await writeFile(config, `local:\n  statedir: ${stateDir}\n  registries:\n    "${registry.host}": { username: ci, password: pw }\n`);
  const reference = `${registry.host}/test/busybox:v1`;
  const pulled = await cli(['pull', reference], config);
  assert.equal(pulled.code, 0, pulled.stderr);
  const [line, ...rest] = pulled.stdout.trim().split('\n');
  assert.deepEqual(rest, []);
  const [name, digest, root] = (line ?? '').split(' ');
  assert.equal(name, reference);
  assert.equal(digest, image.manifestDigest);
  assert.ok(root && existsSync(path.join(root, 'etc', 'os-release')));
  // Layer progress is logged (on stderr, as JSON lines).
  assert.match(pulled.stderr, /layer downloaded/);

  const store = testImageStore(path.join(stateDir, 'images'));
  const served = await store.prepare(reference, { policy: 'never' });
  await store.close();
  assert.equal(served.rootDirectory, root);

  const failed = await cli(['pull', `${registry.host}/test/missing:v1`, 'Bad Reference'], config);
  assert.equal(failed.code, 1);
  assert.equal(failed.stdout, '');
  assert.match(failed.stderr, /not found at the registry/);
  assert.match(failed.stderr, /invalid image reference/);
});

test('pull progress and outcomes reach the Prometheus metrics', async () => {
  const metrics = new Metrics({ processMetrics: false });
  const store = testImageStore(path.join(scratch, 'metrics-store'), {
    registries: { [registry.host]: { username: 'ci', password: 'pw', insecure: false } },
    instruments: () => metrics,
  });
  await store.prepare(`${registry.host}/test/busybox:v1`, { policy: 'always' });
  await store.prepare(`${registry.host}/test/busybox:v1`, { policy: 'ifnotpresent' });
  await assert.rejects(store.prepare(`${registry.host}/test/missing:v1`, { policy: 'always' }));
  await store.close();
  const text = await metrics.scrape();
  const total = [...image.blobs.entries()].filter(([digest]) => digest !== image.manifestDigest).reduce((sum, [, bytes]) => sum + bytes.length, 0);
  assert.match(text, new RegExp(`poseidon_image_pull_bytes_total\\{registry="${registry.host.replaceAll('.', '\\.')}"\\} ${total}\\b`));
  for (const outcome of ['pulled', 'cached', 'failed'])
    assert.match(text, new RegExp(`poseidon_image_prepare_duration_seconds_count\\{outcome="${outcome}"\\} 1\\b`));
  // Per-layer gauges exist only while a layer downloads.
  assert.doesNotMatch(text, /poseidon_image_layer_downloaded_bytes\{/);
});
