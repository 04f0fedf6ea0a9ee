import { randomBytes } from 'node:crypto';
import { chmod, mkdir, readdir, readFile, readlink, rename, rm, stat, unlink, writeFile } from 'node:fs/promises';
import path from 'node:path';
import type { Logger } from 'pino';
import { z } from 'zod';
import type { ImageCacheConfig, LocalConfig, RegistryConfig } from '../../config/schema.js';
import type { ImageInstruments } from '../../monitoring/metrics.js';
import { resolveAccounts } from './accounts.js';
import {
  type GarbageCollection,
  ImageError,
  type ImageRuntimeConfig,
  type ImageStore,
  type PreparedImage,
  type PrepareOptions,
  type PullPolicy,
  type PullProgress,
} from './image-store.js';
import { type Descriptor, type ImageManifest, imageConfigSchema, layerCompression } from './manifest.js';
import { formatReference, type ImageReference, parseReference } from './reference.js';
import { RegistryClient, type ResolvedImage } from './registry-client.js';
import { syncDirectory, writeSyncedFile } from '../synced-file.js';
import { SharedTasks } from './shared-tasks.js';
import { checkDecompressible, lstatOrUndefined, resolveInsideRoot, unpackLayerFile } from './unpack.js';

/*
 * The content-addressed image cache under local.statedir/images:
 *   blobs/sha256/<hex>         verified configs and layers
 *   roots/<hex>/rootfs         the unpacked root of image manifest sha256:<hex>
 *   roots/<hex>/image.json     its config, accounts, layers, size and last use
 *   references.json            normalised reference -> digests it last resolved to
 *   tmp/                       downloads and unpacks under way (emptied at start)
 * Everything appears by rename from tmp/, so a partial download or unpack is never visible; a
 * root is removed by renaming it into tmp/ first. A second process (`poseidon pull` next to the
 * daemon) may fill the same cache: lookups fall back to the disk.
 */

/* Mount points of the sandbox (src/local/sandbox.ts): bwrap cannot create them on a read-only root. */
const MOUNT_POINT_DIRECTORIES = ['proc', 'dev', 'tmp', 'workspace', '.poseidon'];
/* Files a runner may bind its own versions over. */
const MOUNT_POINT_FILES = ['etc/passwd', 'etc/group'];
/* Layers downloaded at once per image. */
const DOWNLOAD_CONCURRENCY = 3;
const MINIMUM_RETENTION_MS = 60_000;
/* A blob this young is never collected: another process (`poseidon pull`) may be about to unpack it. */
const MINIMUM_BLOB_AGE_MS = 3600_000;
const PROGRESS_INTERVAL_MS = 200;
const PROGRESS_LOG_INTERVAL_MS = 5_000;

const recordSchema = z.object({
  digest: z.string(),
  references: z.array(z.string()),
  config: z.object({ env: z.array(z.string()), user: z.string().optional(), workingDir: z.string().optional() }),
  accounts: z.object({
    user: z.object({ name: z.string(), uid: z.number(), gid: z.number(), home: z.string() }).optional(),
    configured: z.object({ uid: z.number(), gid: z.number(), name: z.string().optional() }).optional(),
  }),
  configDigest: z.string(),
  layers: z.array(z.string()),
  size: z.number(),
  createdAt: z.string(),
  lastUsedAt: z.string(),
});
type ImageRecord = z.infer<typeof recordSchema>;

const referencesSchema = z.record(z.string(), z.object({ topDigest: z.string(), manifestDigest: z.string(), resolvedAt: z.string().default('') }));
type References = z.infer<typeof referencesSchema>;

/* Two processes (the daemon, `poseidon pull`) may both have resolved a reference: the later resolution wins. */
function mergeReferences(a: References, b: References): References {
  const merged: References = { ...a };
  for (const [name, entry] of Object.entries(b)) {
    const other = merged[name];
    if (!other || other.resolvedAt <= entry.resolvedAt) merged[name] = entry;
  }
  return merged;
}

/* Whether the process that made a temporary directory (named `<pid>-...`) still runs. */
function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (error) {
    return (error as NodeJS.ErrnoException).code === 'EPERM';
  }
}

export interface FileImageStoreOptions {
  /* local.statedir/images */
  directory: string;
  registries: Record<string, RegistryConfig>;
  cache: ImageCacheConfig;
  logger: Logger;
  /*
   * An image used this recently is never collected (default a minute), so that a prepare and its
   * caller's pin are not raced by a collection; nor is a blob written this recently (default an hour).
   */
  minimumRetentionMs?: number;
  /* Where progress and outcomes are reported (the handler's current instruments). */
  instruments?: () => ImageInstruments | undefined;
}

/* A build's or download's own signal and progress (see SharedTasks). */
interface BuildOptions {
  signal: AbortSignal;
  onProgress: (report: PullProgress) => void;
}

function hexOf(digest: string): string {
  return digest.slice('sha256:'.length);
}

function toPrepared(reference: string, root: string, record: ImageRecord): PreparedImage {
  return {
    reference,
    digest: record.digest,
    rootDirectory: root,
    config: { env: record.config.env, user: record.config.user, workingDir: record.config.workingDir },
    accounts: {
      user: record.accounts.user,
      configured: record.accounts.configured && {
        uid: record.accounts.configured.uid,
        gid: record.accounts.configured.gid,
        name: record.accounts.configured.name,
      },
    },
  };
}

/* Writes a file by temporary name, fsync and rename: readers see the old or the new one, whole. */
async function writeAtomically(file: string, text: string): Promise<void> {
  const temporary = `${file}.${process.pid}-${randomBytes(4).toString('hex')}.tmp`;
  try {
    await writeSyncedFile(temporary, text, 0o644);
    await rename(temporary, file);
  } catch (error) {
    await rm(temporary, { force: true }).catch(() => undefined);
    throw error;
  }
  await syncDirectory(path.dirname(file));
}

function cacheFailure(reference: string, error: unknown): ImageError {
  return new ImageError('cache-unwritable', reference, `${reference}: the image cache cannot be written (${(error as Error).message})`, { cause: error });
}

export class FileImageStore implements ImageStore {
  readonly #directory: string;
  readonly #blobs: string;
  readonly #roots: string;
  /* tmp/<pid>-<random>: this store's downloads, unpacks and removals under way. */
  readonly #tmp: string;
  readonly #tmpParent: string;
  readonly #referencesFile: string;
  readonly #client: RegistryClient;
  readonly #logger: Logger;
  readonly #options: FileImageStoreOptions;
  readonly #records = new Map<string, ImageRecord>();
  #references: References = {};
  readonly #pins = new Map<string, number>();
  /* Builds under way by manifest digest: concurrent prepares of one image share one. */
  readonly #building = new SharedTasks<ImageRecord, PullProgress>();
  readonly #preparing = new Map<string, Promise<{ image: PreparedImage; pulled: boolean }>>();
  /* Blob downloads under way by digest: two images with a common layer share one. */
  readonly #downloading = new SharedTasks<void, PullProgress>();
  #loaded: Promise<void> | undefined;
  #collecting: Promise<GarbageCollection> | undefined;
  #timer: NodeJS.Timeout | undefined;
  #writingReferences: Promise<void> = Promise.resolve();

  constructor(options: FileImageStoreOptions) {
    this.#options = options;
    this.#directory = options.directory;
    this.#blobs = path.join(options.directory, 'blobs', 'sha256');
    this.#roots = path.join(options.directory, 'roots');
    this.#tmpParent = path.join(options.directory, 'tmp');
    this.#tmp = path.join(this.#tmpParent, `${process.pid}-${randomBytes(4).toString('hex')}`);
    this.#referencesFile = path.join(options.directory, 'references.json');
    this.#client = new RegistryClient(options.registries);
    this.#logger = options.logger.child({ component: 'images' });
  }

  /* The store of the local backend: local.statedir/images, local.registries, local.imagecache. */
  static fromConfig(local: LocalConfig, logger: Logger, instruments?: () => ImageInstruments | undefined): FileImageStore {
    return new FileImageStore({ directory: path.join(local.statedir, 'images'), registries: local.registries, cache: local.imagecache, logger, instruments });
  }

  /* Where an image's root is, whether or not it exists. */
  rootDirectory(digest: string): string {
    return path.join(this.#roots, hexOf(digest), 'rootfs');
  }

  #load(): Promise<void> {
    this.#loaded ??= (async () => {
      /*
       * Only root may enter the cache: roots keep the image's owners and modes (world-writable
       * directories among them), which no host user must reach. The spawner opens a root as host
       * root and mounts it idmapped into each runner.
       */
      await mkdir(this.#directory, { recursive: true, mode: 0o700 });
      await chmod(this.#directory, 0o700);
      await Promise.all([this.#blobs, this.#roots, this.#tmp].map((directory) => mkdir(directory, { recursive: true, mode: 0o755 })));
      // What a process that is gone left half-done (a crash during a pull) goes; a running one's stays.
      const leftovers = (await readdir(this.#tmpParent)).filter((name) => !processAlive(Number.parseInt(name, 10)));
      await Promise.all(leftovers.map((name) => rm(path.join(this.#tmpParent, name), { recursive: true, force: true })));
      for (const name of await readdir(this.#roots)) {
        const record = await this.#readRecord(`sha256:${name}`);
        if (!record) {
          this.#logger.warn({ root: path.join(this.#roots, name) }, 'removing an image root without a readable image.json');
          await this.#removeRoot(`sha256:${name}`);
        }
      }
      this.#references = await this.#readReferences();
      if (leftovers.length > 0) this.#logger.info({ removed: leftovers.length }, 'removed unfinished pulls of an earlier run');
      this.#logger.info({ images: this.#records.size, directory: this.#directory }, 'image cache loaded');
    })();
    return this.#loaded;
  }

  async #readRecord(digest: string): Promise<ImageRecord | undefined> {
    const known = this.#records.get(digest);
    if (known) return known;
    try {
      const parsed = recordSchema.safeParse(JSON.parse(await readFile(path.join(this.#roots, hexOf(digest), 'image.json'), 'utf8')));
      if (!parsed.success || parsed.data.digest !== digest) return undefined;
      this.#records.set(digest, parsed.data);
      return parsed.data;
    } catch {
      return undefined;
    }
  }

  async #readReferences(): Promise<References> {
    try {
      const parsed = referencesSchema.safeParse(JSON.parse(await readFile(this.#referencesFile, 'utf8')));
      return parsed.success ? parsed.data : {};
    } catch {
      return {};
    }
  }

  /* The cached image a reference last resolved to, looking at the disk when memory knows nothing (a `poseidon pull` may have added it). */
  async #cached(name: string, reference: ImageReference): Promise<{ record: ImageRecord; topDigest: string } | undefined> {
    // The disk too: a `poseidon pull` may have resolved it meanwhile.
    this.#references = mergeReferences(this.#references, await this.#readReferences());
    const entry = this.#references[name];
    const digest = entry?.manifestDigest ?? reference.digest;
    if (!digest) return undefined;
    const record = await this.#readRecord(digest);
    return record ? { record, topDigest: entry?.topDigest ?? digest } : undefined;
  }

  async prepare(text: string, options: PrepareOptions): Promise<PreparedImage> {
    const started = process.hrtime.bigint();
    const seconds = (): number => Number(process.hrtime.bigint() - started) / 1e9;
    try {
      const { image, pulled } = await this.#prepare(text, options);
      this.#options.instruments?.()?.imagePrepared?.(pulled ? 'pulled' : 'cached', seconds());
      return image;
    } catch (error) {
      this.#options.instruments?.()?.imagePrepared?.('failed', seconds());
      throw error;
    }
  }

  /* Concurrent prepares of one reference and policy share one resolution (and so one manifest GET). */
  #prepare(text: string, options: PrepareOptions): Promise<{ image: PreparedImage; pulled: boolean }> {
    const reference = parseReference(text);
    const key = `${options.policy} ${formatReference(reference)}`;
    // A caller with its own signal or progress listener gets its own resolution.
    if (options.signal || options.onProgress) return this.#resolveAndPrepare(reference, text, options);
    let shared = this.#preparing.get(key);
    if (!shared) {
      shared = this.#resolveAndPrepare(reference, text, options).finally(() => this.#preparing.delete(key));
      this.#preparing.set(key, shared);
    }
    return shared;
  }

  async #resolveAndPrepare(reference: ImageReference, text: string, options: PrepareOptions): Promise<{ image: PreparedImage; pulled: boolean }> {
    const name = formatReference(reference);
    await this.#load().catch((error: unknown) => {
      this.#loaded = undefined;
      throw cacheFailure(name, error);
    });
    this.#scheduleCollection();
    const cached = await this.#cached(name, reference);
    const fromCache = async (record: ImageRecord): Promise<{ image: PreparedImage; pulled: boolean }> => {
      await this.#touch(record);
      return { image: toPrepared(name, this.rootDirectory(record.digest), record), pulled: false };
    };
    const policy: PullPolicy = reference.digest !== undefined && options.policy === 'always' ? 'ifnotpresent' : options.policy;
    if (policy === 'never' || (policy === 'ifnotpresent' && cached)) {
      if (cached) return fromCache(cached.record);
      throw new ImageError(
        'not-cached',
        name,
        `${name} is not in the image cache and local.pullpolicy is never: fill the cache with \`poseidon pull ${text}\``,
      );
    }
    if (policy === 'always' && cached) {
      try {
        // A HEAD is not counted against Docker Hub's pull limit; an unchanged digest needs nothing else.
        const current = await this.#client.headDigest(reference, options.signal);
        if (current === cached.topDigest) return fromCache(cached.record);
      } catch (error) {
        if (error instanceof ImageError && error.reason === 'registry-unavailable') {
          this.#logger.warn({ reference: name, err: error }, 'the registry cannot be reached: using the cached image');
          return fromCache(cached.record);
        }
        throw error;
      }
    }
    let resolved: ResolvedImage;
    try {
      resolved = await this.#client.resolve(reference, options.signal);
    } catch (error) {
      if (policy === 'always' && cached && error instanceof ImageError && error.reason === 'registry-unavailable') {
        this.#logger.warn({ reference: name, err: error }, 'the registry cannot be reached: using the cached image');
        return fromCache(cached.record);
      }
      throw error;
    }
    let record = await this.#readRecord(resolved.manifestDigest);
    const pulled = record === undefined;
    if (!record) {
      record = await this.#building.run(
        resolved.manifestDigest,
        (signal, progress) => this.#build(name, reference, resolved, signal, progress),
        options.signal,
        options.onProgress,
      );
    }
    await this.#remember(name, resolved, record);
    if (pulled) this.#logger.info({ reference: name, digest: record.digest, size: record.size }, 'image ready');
    return { image: toPrepared(name, this.rootDirectory(record.digest), record), pulled };
  }

  async #remember(name: string, resolved: ResolvedImage, record: ImageRecord): Promise<void> {
    const previous = this.#references[name];
    if (previous?.topDigest === resolved.topDigest && previous.manifestDigest === resolved.manifestDigest && record.references.includes(name)) return;
    if (previous && previous.manifestDigest !== resolved.manifestDigest) {
      this.#logger.info({ reference: name, previous: previous.manifestDigest, digest: resolved.manifestDigest }, 'the tag now names another image');
    }
    this.#references[name] = { topDigest: resolved.topDigest, manifestDigest: resolved.manifestDigest, resolvedAt: new Date().toISOString() };
    if (!record.references.includes(name)) record.references.push(name);
    await this.#writeRecord(record).catch((error: unknown) => this.#logger.warn({ err: error, digest: record.digest }, 'cannot update image.json'));
    await this.#writeReferences().catch((error: unknown) => {
      throw cacheFailure(name, error);
    });
  }

  #writeReferences(): Promise<void> {
    const write = this.#writingReferences.then(async () => {
      // Entries another process added meanwhile are kept.
      this.#references = mergeReferences(await this.#readReferences(), this.#references);
      await writeAtomically(this.#referencesFile, `${JSON.stringify(this.#references, null, 2)}\n`);
    });
    this.#writingReferences = write.catch(() => undefined);
    return write;
  }

  async #writeRecord(record: ImageRecord): Promise<void> {
    await writeAtomically(path.join(this.#roots, hexOf(record.digest), 'image.json'), `${JSON.stringify(record, null, 2)}\n`);
  }

  async #touch(record: ImageRecord): Promise<void> {
    record.lastUsedAt = new Date().toISOString();
    await this.#writeRecord(record).catch((error: unknown) => this.#logger.warn({ err: error, digest: record.digest }, 'cannot update image.json'));
  }

  /* Downloads what is missing and unpacks into tmp/, then renames into roots/. */
  async #build(
    name: string,
    reference: ImageReference,
    resolved: ResolvedImage,
    signal: AbortSignal,
    onProgress: (report: PullProgress) => void,
  ): Promise<ImageRecord> {
    const options = { signal, onProgress };
    const { manifest, manifestDigest } = resolved;
    for (const layer of manifest.layers) {
      const compression = layerCompression(layer.mediaType);
      if (!compression) throw new ImageError('unsupported', name, `${name}: layer ${layer.digest} has the unsupported media type ${layer.mediaType}`);
      checkDecompressible(compression, name);
    }
    const total = manifest.layers.reduce((sum, layer) => sum + layer.size, 0);
    this.#logger.info({ reference: name, digest: manifestDigest, layers: manifest.layers.length, bytes: total }, 'pulling image');
    await this.#ensureBlob(name, reference, manifest.config, options, false);
    signal.throwIfAborted();
    const configDocument = imageConfigSchema.safeParse(JSON.parse(await readFile(this.#blobPath(manifest.config.digest), 'utf8').catch(() => 'null')));
    if (!configDocument.success)
      throw new ImageError('invalid-image', name, `${name}: the image config is malformed: ${configDocument.error.issues[0]?.message ?? ''}`);
    const { os, architecture } = configDocument.data;
    if ((os !== undefined && os !== 'linux') || (architecture !== undefined && architecture !== 'amd64')) {
      throw new ImageError('unsupported', name, `${name}: the image is for ${os ?? '?'}/${architecture ?? '?'}, not linux/amd64`);
    }
    const config: ImageRuntimeConfig = {
      env: configDocument.data.config?.Env ?? [],
      user: configDocument.data.config?.User || undefined,
      workingDir: configDocument.data.config?.WorkingDir || undefined,
    };
    const staging = path.join(this.#tmp, `unpack-${hexOf(manifestDigest).slice(0, 16)}-${randomBytes(4).toString('hex')}`);
    const rootfs = path.join(staging, 'rootfs');
    try {
      await mkdir(rootfs, { recursive: true, mode: 0o755 });
      const size = await this.#unpackLayers(name, reference, manifest, rootfs, options);
      await this.#addMountPoints(name, rootfs, config.workingDir);
      const { accounts, problem } = resolveAccounts(
        config.user,
        await this.#readInRoot(name, rootfs, 'etc/passwd'),
        await this.#readInRoot(name, rootfs, 'etc/group'),
      );
      if (problem) this.#logger.warn({ reference: name }, `${problem}: runners fall back to local.uid`);
      const now = new Date().toISOString();
      const record: ImageRecord = {
        digest: manifestDigest,
        references: [name],
        config: { env: config.env, ...(config.user ? { user: config.user } : {}), ...(config.workingDir ? { workingDir: config.workingDir } : {}) },
        accounts: { ...(accounts.user ? { user: accounts.user } : {}), ...(accounts.configured ? { configured: accounts.configured } : {}) },
        configDigest: manifest.config.digest,
        layers: manifest.layers.map((layer) => layer.digest),
        size,
        createdAt: now,
        lastUsedAt: now,
      };
      await writeFile(path.join(staging, 'image.json'), `${JSON.stringify(record, null, 2)}\n`);
      await this.#publish(staging, manifestDigest);
      const published = (await this.#readRecord(manifestDigest)) ?? record;
      this.#records.set(manifestDigest, published);
      return published;
    } catch (error) {
      await rm(staging, { recursive: true, force: true }).catch((cleanup: unknown) =>
        this.#logger.error({ err: cleanup, staging }, 'cannot remove a failed unpack'),
      );
      if (error instanceof ImageError || signal.aborted) throw error;
      throw cacheFailure(name, error);
    }
  }

  /* Renames the staged image into roots/; if another process was first, its copy stays. */
  async #publish(staging: string, digest: string): Promise<void> {
    const target = path.join(this.#roots, hexOf(digest));
    try {
      await rename(staging, target);
    } catch (error) {
      const code = (error as NodeJS.ErrnoException).code;
      if (code !== 'EEXIST' && code !== 'ENOTEMPTY') throw error;
      await rm(staging, { recursive: true, force: true });
    }
  }

  /* Downloads layers (a few at once) and applies them in order, each as soon as it and its predecessors are there. */
  async #unpackLayers(name: string, reference: ImageReference, manifest: ImageManifest, rootfs: string, options: BuildOptions): Promise<number> {
    const downloads: Array<Promise<void>> = [];
    let next = 0;
    const startNext = (): void => {
      const layer = manifest.layers[next];
      if (!layer) return;
      const index = next;
      next += 1;
      downloads[index] = this.#ensureBlob(name, reference, layer, options, true);
      void downloads[index].then(startNext, () => undefined);
    };
    for (let started = 0; started < DOWNLOAD_CONCURRENCY; started += 1) startNext();
    let size = 0;
    try {
      for (const [index, layer] of manifest.layers.entries()) {
        await downloads[index];
        const compression = layerCompression(layer.mediaType) ?? 'none';
        const stats = await unpackLayerFile(rootfs, this.#blobPath(layer.digest), compression, name, options.signal);
        size += stats.bytes;
        if (stats.skipped.length > 0)
          this.#logger.debug({ reference: name, layer: layer.digest, skipped: stats.skipped.slice(0, 20) }, 'layer entries skipped');
        options.onProgress({ reference: name, layer: layer.digest, downloaded: layer.size, total: layer.size, phase: 'unpack' });
      }
    } finally {
      // A failed layer must not leave downloads of later ones running unobserved.
      await Promise.allSettled(downloads);
    }
    return size;
  }

  #blobPath(digest: string): string {
    return path.join(this.#blobs, hexOf(digest));
  }

  /* A verified blob in blobs/, downloaded once however many pulls want it at the same time. */
  async #ensureBlob(name: string, reference: ImageReference, descriptor: Descriptor, options: BuildOptions, isLayer: boolean): Promise<void> {
    const file = this.#blobPath(descriptor.digest);
    const existing = await lstatOrUndefined(file);
    if (existing?.isFile() && existing.size === descriptor.size) {
      if (isLayer) options.onProgress({ reference: name, layer: descriptor.digest, downloaded: descriptor.size, total: descriptor.size, phase: 'cached' });
      return;
    }
    await this.#downloading.run(
      descriptor.digest,
      (signal, progress) => this.#download(name, reference, descriptor, { signal, onProgress: progress }, isLayer),
      options.signal,
      options.onProgress,
    );
  }

  async #download(name: string, reference: ImageReference, descriptor: Descriptor, options: BuildOptions, isLayer: boolean): Promise<void> {
    const partial = path.join(this.#tmp, `blob-${hexOf(descriptor.digest).slice(0, 16)}-${randomBytes(4).toString('hex')}`);
    const instruments = this.#options.instruments?.();
    let reported = 0;
    let lastProgress = 0;
    let lastLog = Date.now();
    const report = (downloaded: number, done: boolean): void => {
      instruments?.imageBytes?.(reference.registry, downloaded - reported);
      reported = downloaded;
      if (!isLayer) return;
      instruments?.imageLayerProgress?.(name, descriptor.digest, downloaded, descriptor.size, done);
      const now = Date.now();
      if (done || now - lastProgress >= PROGRESS_INTERVAL_MS) {
        lastProgress = now;
        const progress: PullProgress = { reference: name, layer: descriptor.digest, downloaded, total: descriptor.size, phase: 'download' };
        options.onProgress(progress);
      }
      if (done || now - lastLog >= PROGRESS_LOG_INTERVAL_MS) {
        lastLog = now;
        this.#logger.info({ reference: name, layer: descriptor.digest, downloaded, total: descriptor.size }, done ? 'layer downloaded' : 'downloading layer');
      }
    };
    try {
      await this.#client.downloadBlob(reference, descriptor, partial, (downloaded) => report(downloaded, false), options.signal);
      report(descriptor.size, true);
      await rename(partial, this.#blobPath(descriptor.digest));
    } catch (error) {
      if (isLayer) instruments?.imageLayerProgress?.(name, descriptor.digest, reported, descriptor.size, true);
      await rm(partial, { force: true });
      throw error;
    }
  }

  /* The sandbox's mount points, and WorkingDir, which Docker creates too. */
  async #addMountPoints(name: string, rootfs: string, workingDir: string | undefined): Promise<void> {
    for (const directory of MOUNT_POINT_DIRECTORIES) {
      const file = path.join(rootfs, directory);
      const existing = await lstatOrUndefined(file);
      if (existing?.isDirectory()) continue;
      // A symlink or file where a mount point must be is replaced: bubblewrap would follow it.
      if (existing) await rm(file, { recursive: true, force: true });
      await mkdir(file, { mode: 0o755 });
    }
    const etc = await lstatOrUndefined(path.join(rootfs, 'etc'));
    if (etc && !etc.isDirectory()) throw new ImageError('invalid-image', name, `${name}: the image's /etc is not a directory, which sandboxes cannot use`);
    if (!etc) await mkdir(path.join(rootfs, 'etc'), { mode: 0o755 });
    for (const file of MOUNT_POINT_FILES) {
      const host = path.join(rootfs, file);
      const existing = await lstatOrUndefined(host);
      if (existing?.isFile()) continue;
      // A symlinked passwd (rare) becomes a copy of what it points to inside the image.
      const content = existing ? await this.#readInRoot(name, rootfs, file) : '';
      if (existing) await rm(host, { recursive: true, force: true });
      await writeFile(host, content, { mode: 0o644 });
    }
    if (workingDir) await resolveInsideRoot(rootfs, workingDir.split('/'), name, () => undefined);
  }

  /* A text file of the image, symlinks resolved inside it; '' when it is missing or not a file. */
  async #readInRoot(name: string, rootfs: string, file: string): Promise<string> {
    const parts = file.split('/');
    for (let hop = 0; hop < 40; hop += 1) {
      const base = parts.pop() ?? '';
      const parent = await resolveInsideRoot(rootfs, parts, name).catch(() => undefined);
      if (parent === undefined) return '';
      const host = path.join(rootfs, parent, base);
      const existing = await lstatOrUndefined(host);
      if (!existing) return '';
      if (existing.isFile()) return readFile(host, 'utf8');
      if (!existing.isSymbolicLink()) return '';
      const target = await readlink(host);
      parts.splice(0, parts.length, ...(target.startsWith('/') ? [] : parent.split('/')), ...target.split('/'));
    }
    return '';
  }

  pin(digest: string): () => void {
    this.#pins.set(digest, (this.#pins.get(digest) ?? 0) + 1);
    let pinned = true;
    return () => {
      if (!pinned) return;
      pinned = false;
      const count = (this.#pins.get(digest) ?? 1) - 1;
      if (count > 0) {
        this.#pins.set(digest, count);
        return;
      }
      this.#pins.delete(digest);
      const record = this.#records.get(digest);
      if (record) void this.#touch(record);
    };
  }

  #scheduleCollection(): void {
    if (this.#timer) return;
    const retention = this.#options.cache.unusedretention * 1000;
    const interval = Math.min(Math.max(retention / 4, MINIMUM_RETENTION_MS), 3600_000);
    this.#timer = setInterval(() => {
      this.collectGarbage().catch((error: unknown) => this.#logger.error({ err: error }, 'image garbage collection failed'));
    }, interval);
    this.#timer.unref();
  }

  collectGarbage(): Promise<GarbageCollection> {
    this.#collecting ??= this.#collect().finally(() => {
      this.#collecting = undefined;
    });
    return this.#collecting;
  }

  async #collect(): Promise<GarbageCollection> {
    await this.#load();
    const result: GarbageCollection = { removedImages: [], removedBlobs: 0, freedBytes: 0 };
    const now = Date.now();
    const minimum = this.#options.minimumRetentionMs ?? MINIMUM_RETENTION_MS;
    const retention = Math.max(this.#options.cache.unusedretention * 1000, minimum);
    const unused = [...this.#records.values()]
      .filter((record) => !this.#pins.has(record.digest) && !this.#building.has(record.digest) && now - Date.parse(record.lastUsedAt) >= minimum)
      .sort((a, b) => Date.parse(a.lastUsedAt) - Date.parse(b.lastUsedAt));
    const expired = new Set(unused.filter((record) => now - Date.parse(record.lastUsedAt) >= retention));
    const limit = this.#options.cache.maxunusedsize * 1024 * 1024;
    if (limit > 0) {
      let kept = unused.filter((record) => !expired.has(record)).reduce((sum, record) => sum + record.size, 0);
      for (const record of unused) {
        if (kept <= limit) break;
        if (expired.has(record)) continue;
        expired.add(record);
        kept -= record.size;
      }
    }
    for (const record of expired) {
      // Pinned meanwhile (a prepare finished during this collection): kept.
      if (this.#pins.has(record.digest)) continue;
      await this.#removeRoot(record.digest);
      result.removedImages.push(record.digest);
      result.freedBytes += record.size;
    }
    if (result.removedImages.length > 0) {
      const removed = new Set(result.removedImages);
      for (const [name, entry] of Object.entries(this.#references)) if (removed.has(entry.manifestDigest)) delete this.#references[name];
      await this.#writeReferencesWithout(removed);
    }
    const { count, bytes } = await this.#collectBlobs();
    result.removedBlobs = count;
    result.freedBytes += bytes;
    if (result.removedImages.length > 0 || count > 0) this.#logger.info({ ...result }, 'image cache collected');
    return result;
  }

  async #writeReferencesWithout(removed: Set<string>): Promise<void> {
    const write = this.#writingReferences.then(async () => {
      const merged = mergeReferences(await this.#readReferences(), this.#references);
      for (const [name, entry] of Object.entries(merged)) if (removed.has(entry.manifestDigest)) delete merged[name];
      this.#references = merged;
      await writeAtomically(this.#referencesFile, `${JSON.stringify(merged, null, 2)}\n`);
    });
    this.#writingReferences = write.catch(() => undefined);
    await write;
  }

  /* Blobs no kept image and no pull under way refers to. */
  async #collectBlobs(): Promise<{ count: number; bytes: number }> {
    const wanted = new Set<string>();
    for (const record of this.#records.values()) {
      wanted.add(hexOf(record.configDigest));
      for (const layer of record.layers) wanted.add(hexOf(layer));
    }
    for (const digest of this.#downloading.keys()) wanted.add(hexOf(digest));
    // A build under way still needs its blobs, whose digests only it knows: no blob goes meanwhile.
    if (this.#building.size > 0) return { count: 0, bytes: 0 };
    let count = 0;
    let bytes = 0;
    const youngest = Date.now() - (this.#options.minimumRetentionMs ?? MINIMUM_BLOB_AGE_MS);
    for (const name of await readdir(this.#blobs)) {
      if (wanted.has(name)) continue;
      const file = path.join(this.#blobs, name);
      const info = await stat(file).catch(() => undefined);
      if (!info || info.mtimeMs > youngest) continue;
      const size = info.size;
      await unlink(file).catch(() => undefined);
      count += 1;
      bytes += size;
    }
    return { count, bytes };
  }

  /* Moves a root into tmp/ and removes it there, so that a half-removed root is never visible. */
  async #removeRoot(digest: string): Promise<void> {
    this.#records.delete(digest);
    const source = path.join(this.#roots, hexOf(digest));
    const doomed = path.join(this.#tmp, `remove-${hexOf(digest).slice(0, 16)}-${randomBytes(4).toString('hex')}`);
    try {
      await rename(source, doomed);
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === 'ENOENT') return;
      throw error;
    }
    await rm(doomed, { recursive: true, force: true });
    this.#logger.info({ digest }, 'image removed from the cache');
  }

  async close(): Promise<void> {
    clearInterval(this.#timer);
    this.#timer = undefined;
    await Promise.allSettled([this.#building.settled(), this.#downloading.settled(), this.#collecting]);
    await this.#client.close();
    await rm(this.#tmp, { recursive: true, force: true });
  }
}
