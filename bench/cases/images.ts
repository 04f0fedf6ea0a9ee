import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { FakeRegistry } from '../../test/fake-registry/index.js';
import { preparedRoot } from '../../test/support/prepared-root.js';
import { testImageStore } from '../../test/support/image-store.js';
import { buildTestImage, type TestImage } from '../../test/support/test-images.js';
import { environmentSpec } from '../lib/client.js';
import type { BenchContext, CaseResult } from '../lib/context.js';
import { nowMs, round, summarize } from '../lib/stats.js';
import { ErrorLog, latencyResult } from './common.js';
import { fillTimes, refillResult, withAddedPerRunner } from './pool.js';

/*
 * image_pull: pull + unpack of the Python test image (host Python with its full standard library,
 * two gzip layers) from the in-process fake registry on loopback into an empty image store, against
 * skopeo copy + umoci unpack of the same image from the same registry in the same run. MB/s is
 * uncompressed layer bytes over the whole time (download, verification, decompression, writing).
 */

const run = promisify(execFile);
const MB = 1_000_000;
const SKOPEO = '/usr/bin/skopeo';
const UMOCI = '/usr/bin/umoci';

/* One skopeo copy + umoci unpack into fresh directories. */
async function skopeoUmoci(scratch: string, reference: string, iteration: number): Promise<void> {
  const layout = path.join(scratch, `skopeo-${iteration}`);
  const bundle = path.join(scratch, `umoci-${iteration}`);
  await run(SKOPEO, ['copy', '--quiet', '--src-tls-verify=false', `docker://${reference}`, `oci:${layout}:bench`], { env: { ...process.env, HOME: scratch } });
  await run(UMOCI, ['unpack', '--image', `${layout}:bench`, bundle]);
}

export async function imagePull(context: BenchContext): Promise<CaseResult> {
  if (!existsSync(SKOPEO) || !existsSync(UMOCI)) throw new Error('skopeo and umoci are needed for the baseline (scripts/setup.sh installs them)');
  const scratch = await mkdtemp(path.join(tmpdir(), 'poseidon-bench-images-'));
  context.onCleanup('image bench scratch', () => rm(scratch, { recursive: true, force: true }));
  const escapeTarget = path.join(scratch, 'outside');
  await mkdir(escapeTarget);
  const image: TestImage = await buildTestImage(path.join(scratch, 'layout'), { python: 'full', escapeTarget, marker: 'bench' });
  const registry = await FakeRegistry.start();
  context.onCleanup('fake registry', () => registry.close());
  registry.push('bench/python', 'v1', image);
  const reference = `${registry.host}/bench/python:v1`;
  const n = context.n(5);
  const errors = new ErrorLog();
  // Alternating the two, so that the noise of a shared machine falls on both alike.
  const ours: number[] = [];
  const theirs: number[] = [];
  for (let iteration = 0; iteration < n; iteration += 1) {
    const store = testImageStore(path.join(scratch, `store-${iteration}`));
    let start = nowMs();
    try {
      await store.prepare(reference, { policy: 'always' });
      ours.push(nowMs() - start);
    } catch (error) {
      errors.add(error);
    } finally {
      await store.close();
    }
    start = nowMs();
    await skopeoUmoci(scratch, reference, iteration);
    theirs.push(nowMs() - start);
  }
  const baseline = await context.baseline('skopeo_umoci', async () => {
    const summary = summarize(theirs);
    return {
      ...summary,
      what: 'skopeo copy + umoci unpack of the same image, alternating',
      mb_per_s: round(image.unpackedBytes / MB / (summary.p50_ms / 1000), 1),
    };
  });
  const samples = ours;
  const result = latencyResult(samples, errors.count, undefined, baseline);
  const compressed = image.layers.reduce((sum, layer) => sum + layer.size, 0);
  return {
    ...result,
    unpacked_mb: round(image.unpackedBytes / MB, 1),
    download_mb: round(compressed / MB, 1),
    mb_per_s: round(image.unpackedBytes / MB / (Math.max(result.p50_ms ?? 0, 0.001) / 1000), 1),
    baseline_mb_per_s: baseline.mb_per_s ?? 0,
    ...(errors.samples.length > 0 ? { error_samples: errors.samples } : {}),
  };
}

/* Environment ids of this case's own daemon. */
const IMAGE_ENV = 7;
const HOST_ENV = 8;
const IMAGE_NAME = 'bench/image-root';

/*
 * Sandbox start on an image root (read-only, idmapped into each runner's user namespace, the image's
 * own passwd) against the host layout, in the same daemon and run: the time to fill an emptied pool
 * of each. The root is a prepared busybox root as the image store leaves one; pulling and unpacking
 * are measured apart from sandbox start.
 */
export async function imageRootStart(context: BenchContext): Promise<CaseResult> {
  const root = preparedRoot();
  context.onCleanup('image root', async () => root.remove());
  const { client } = await context.startDaemon('image root daemon', { local: { images: { [IMAGE_NAME]: root.directory } } });
  const size = context.quick ? 5 : 50;
  const errors = new ErrorLog();
  const specOf =
    (id: number, image: string) =>
    (poolSize: number): ReturnType<typeof environmentSpec> => ({ ...environmentSpec(id, poolSize), image });
  const baseline = await context.baseline(`host_layout_fill_${size}`, async () => ({
    what: `the same fill of ${size} runners on the host layout`,
    ...summarize(await fillTimes(client, context, specOf(HOST_ENV, 'bench'), size, errors)),
  }));
  const result = refillResult(await fillTimes(client, context, specOf(IMAGE_ENV, IMAGE_NAME), size, errors), size, baseline, errors);
  return withAddedPerRunner(result, baseline, size);
}
