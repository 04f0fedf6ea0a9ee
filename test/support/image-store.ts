import pino from 'pino';
import { FileImageStore, type FileImageStoreOptions } from '../../src/local/images/file-image-store.js';

/* An image store in `directory` for tests and benches: no credentials, a long retention, a silent log. */
export function testImageStore(directory: string, options: Partial<Omit<FileImageStoreOptions, 'directory'>> = {}): FileImageStore {
  return new FileImageStore({
    directory,
    registries: {},
    cache: { unusedretention: 3600, maxunusedsize: 0 },
    logger: pino({ level: 'silent' }),
    ...options,
  });
}
