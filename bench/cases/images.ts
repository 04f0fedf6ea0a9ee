import { preparedRoot } from '../../test/support/prepared-root.js';
import { environmentSpec } from '../lib/client.js';
import type { BenchContext, CaseResult } from '../lib/context.js';
import { summarize } from '../lib/stats.js';
import { ErrorLog } from './common.js';
import { fillTimes, refillResult, withAddedPerRunner } from './pool.js';

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
