import type { Logger } from 'pino';
import type { LocalConfig } from '../../config/schema.js';
import { FileImageStore } from './file-image-store.js';
import { ImageError } from './image-store.js';

/*
 * `poseidon pull IMAGE...`: resolves each image at its registry (policy always) into the cache the
 * daemon uses, so that an environment on it starts without a download. Runs beside a running
 * daemon safely: both only ever add whole images by rename. Layer progress goes to the log.
 * Returns the number of images that failed.
 */
export async function pullImages(images: string[], local: LocalConfig, logger: Logger, write: (line: string) => void): Promise<number> {
  const store = FileImageStore.fromConfig(local, logger);
  let failed = 0;
  try {
    for (const image of images) {
      try {
        const prepared = await store.prepare(image, { policy: 'always' });
        write(`${prepared.reference} ${prepared.digest} ${prepared.rootDirectory}\n`);
      } catch (error) {
        failed += 1;
        const reason = error instanceof ImageError ? error.reason : 'error';
        logger.error({ image, reason, err: error }, `cannot pull ${image}: ${(error as Error).message}`);
      }
    }
  } finally {
    await store.close();
  }
  return failed;
}
