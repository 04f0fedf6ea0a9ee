import type { Logger } from 'pino';
import type { ExecutionEnvironmentSpec } from '../dto/environment.js';
import type { ContextLogger } from '../monitoring/logger.js';
import { ImageError, type ImageStore, type PreparedImage, type PullPolicy } from './images/image-store.js';
import { directoryImage, hostImage, type RunnerImage, registryImage, type SandboxUser } from './runner-image.js';

/*
 * Where an environment's `image` comes from. local.images maps names to a directory, to `host`
 * (the host's system directories, as before images were pulled) or to `registry`; the key `*`
 * applies to every name not listed, and without it unlisted names are pulled from a registry.
 */
export type ImageSource = { kind: 'host' } | { kind: 'directory'; directory: string } | { kind: 'registry' };

export function imageSourceOf(images: ReadonlyMap<string, string>, name: string): ImageSource {
  const mapped = images.get(name) ?? images.get('*') ?? 'registry';
  if (mapped === 'host') return { kind: 'host' };
  if (mapped === 'registry') return { kind: 'registry' };
  return { kind: 'directory', directory: mapped };
}

/* What the pool of one environment waits for, or why it cannot build: reported to /health. */
export type ImageState = 'pulling' | 'ready' | 'failed';

export interface ImageEvents {
  /* The environment's image is usable (first time or a new digest): its pool may build. */
  ready(environmentId: number, rolled: boolean): void;
  state(environmentId: number, state: ImageState, detail?: string): void;
}

export interface EnvironmentImagesOptions {
  images: ReadonlyMap<string, string>;
  policy: PullPolicy;
  learner: SandboxUser;
  store: ImageStore;
  logger: Logger;
  events: ImageEvents;
}

const FIRST_RETRY_MS = 1_000;
const MAX_RETRY_MS = 5 * 60_000;

/* One environment's registry image: what it runs on now, and the pull under way. */
interface Tracked {
  reference: string;
  current: { image: RunnerImage; unpin: () => void } | undefined;
  failure: ImageError | Error | undefined;
  pulling: AbortController | undefined;
  retryTimer: NodeJS.Timeout | undefined;
  attempts: number;
}

/*
 * The images of the local backend's environments. A registry image is prepared in the background
 * (PUT answers at once, as Poseidon's does); until it is ready the pool builds nothing, so claims
 * answer NOMAD_OVERLOAD and statistics show no idle runner. A failure that retrying cannot mend
 * (unknown image, access denied) stops until the next PUT; others retry with a growing delay.
 * A new digest behind the same reference rolls the pool (ready with rolled = true). Every image an
 * environment runs on is pinned in the store, and so is each live runner's.
 */
export class EnvironmentImages {
  readonly #tracked = new Map<number, Tracked>();
  readonly #logger: Logger;
  #closed = false;

  constructor(private readonly options: EnvironmentImagesOptions) {
    this.#logger = options.logger;
  }

  /* Whether a runner of this environment can be built now. */
  canBuild(spec: ExecutionEnvironmentSpec): boolean {
    if (imageSourceOf(this.options.images, spec.image).kind !== 'registry') return true;
    const tracked = this.#tracked.get(spec.id);
    return tracked?.reference === spec.image && tracked.current !== undefined;
  }

  /* What a new runner of this environment is built on; throws while a registry image is not ready. */
  imageFor(spec: ExecutionEnvironmentSpec): RunnerImage {
    const source = imageSourceOf(this.options.images, spec.image);
    if (source.kind === 'host') return hostImage(this.options.learner);
    if (source.kind === 'directory') return directoryImage(source.directory, this.options.learner);
    const tracked = this.#tracked.get(spec.id);
    if (tracked?.reference !== spec.image || !tracked.current) {
      throw new Error(`the image ${spec.image} of execution environment ${spec.id} is not ready: ${tracked?.failure?.message ?? 'being pulled'}`);
    }
    return tracked.current.image;
  }

  /* False once a registry image rolled on (or the environment left): a runner built on it is stale. */
  isCurrent(spec: ExecutionEnvironmentSpec, image: RunnerImage): boolean {
    if (imageSourceOf(this.options.images, spec.image).kind !== 'registry') return true;
    return this.#tracked.get(spec.id)?.current?.image === image;
  }

  /* Pins a registry image's digest for one runner's life; the result unpins. */
  pinForRunner(image: RunnerImage): () => void {
    return image.digest ? this.options.store.pin(image.digest) : () => undefined;
  }

  /*
   * After an environment was stored (created, changed or put again): start or refresh its image.
   * `fromCache` (a restart) starts from the cached digest without the network, then checks the
   * registry as the policy says.
   */
  track(spec: ExecutionEnvironmentSpec, options: { fromCache?: boolean; log?: ContextLogger } = {}): void {
    if (this.#closed) return;
    const log = options.log ?? this.#logger;
    const existing = this.#tracked.get(spec.id);
    if (imageSourceOf(this.options.images, spec.image).kind !== 'registry') {
      if (existing) this.forget(spec.id);
      return;
    }
    if (existing && existing.reference !== spec.image) this.forget(spec.id);
    const tracked = this.#tracked.get(spec.id) ?? this.#add(spec);
    // A pull under way answers this PUT too; a ready image with `ifnotpresent` or `never` stays as it is.
    if (tracked.pulling) return;
    if (tracked.current && this.options.policy !== 'always') return;
    clearTimeout(tracked.retryTimer);
    tracked.retryTimer = undefined;
    tracked.attempts = 0;
    void this.#pull(spec.id, tracked, options.fromCache && !tracked.current ? 'never' : this.options.policy, log, options.fromCache === true);
  }

  #add(spec: ExecutionEnvironmentSpec): Tracked {
    const tracked: Tracked = { reference: spec.image, current: undefined, failure: undefined, pulling: undefined, retryTimer: undefined, attempts: 0 };
    this.#tracked.set(spec.id, tracked);
    return tracked;
  }

  async #pull(environmentId: number, tracked: Tracked, policy: PullPolicy, log: ContextLogger, fromCache: boolean): Promise<void> {
    const store = this.options.store;
    const reference = tracked.reference;
    const controller = new AbortController();
    tracked.pulling = controller;
    tracked.attempts += 1;
    if (!tracked.current) this.options.events.state(environmentId, 'pulling');
    log.info({ environmentId, image: reference, policy, attempt: tracked.attempts }, 'preparing the image');
    let prepared: PreparedImage;
    try {
      prepared = await store.prepare(reference, {
        policy,
        signal: controller.signal,
        onProgress: (progress) => log.debug({ environmentId, ...progress }, 'image pull progress'),
      });
    } catch (error) {
      if (tracked.pulling !== controller) return;
      tracked.pulling = undefined;
      this.#failed(environmentId, tracked, error, policy, log, fromCache);
      return;
    }
    if (tracked.pulling !== controller) return;
    tracked.pulling = undefined;
    tracked.failure = undefined;
    tracked.attempts = 0;
    const previous = tracked.current;
    if (previous?.image.digest === prepared.digest) {
      log.info({ environmentId, image: reference, digest: prepared.digest }, 'image unchanged');
    } else {
      const unpin = store.pin(prepared.digest);
      tracked.current = { image: registryImage(prepared, this.options.learner), unpin };
      previous?.unpin();
      log.info(
        { environmentId, image: reference, digest: prepared.digest, previousDigest: previous?.image.digest },
        previous ? 'image updated: rolling the runners' : 'image ready',
      );
      this.options.events.state(environmentId, 'ready');
      this.options.events.ready(environmentId, previous !== undefined);
    }
    // Started from the cache: now look for a newer digest, as the policy asks (a failure keeps the cached one).
    if (fromCache && this.options.policy === 'always') void this.#pull(environmentId, tracked, 'always', log, false);
  }

  #failed(environmentId: number, tracked: Tracked, error: unknown, policy: PullPolicy, log: ContextLogger, fromCache: boolean): void {
    const failure = error instanceof Error ? error : new Error(String(error));
    const reason = failure instanceof ImageError ? failure.reason : 'error';
    // After a restart without the image in the cache, the registry is the next place to look.
    if (fromCache && policy === 'never' && this.options.policy !== 'never' && reason === 'not-cached') {
      void this.#pull(environmentId, tracked, this.options.policy, log, false);
      return;
    }
    if (tracked.current) {
      // The image in use stays; only the check for a newer one failed.
      log.warn(
        { environmentId, image: tracked.reference, reason, err: failure },
        'cannot check the image for a newer digest: the runners keep the one they have',
      );
      return;
    }
    tracked.failure = failure;
    const definite = failure instanceof ImageError && failure.definite;
    if (definite) {
      log.error({ environmentId, image: tracked.reference, reason, err: failure }, 'cannot prepare the image: no runners until the environment is put again');
      this.options.events.state(environmentId, 'failed', `${reason}: ${failure.message}`);
      return;
    }
    const delay = Math.min(MAX_RETRY_MS, FIRST_RETRY_MS * 2 ** Math.min(tracked.attempts - 1, 20));
    log.warn({ environmentId, image: tracked.reference, reason, err: failure, retryInMs: delay }, 'cannot prepare the image yet: retrying');
    this.options.events.state(environmentId, 'pulling', `retrying after ${reason}: ${failure.message}`);
    tracked.retryTimer = setTimeout(() => {
      tracked.retryTimer = undefined;
      if (this.#tracked.get(environmentId) === tracked) void this.#pull(environmentId, tracked, this.options.policy, this.#logger, false);
    }, delay);
    tracked.retryTimer.unref();
  }

  /* The environment is gone or no longer on a registry image: its pull stops and its image is unpinned. */
  forget(environmentId: number): void {
    const tracked = this.#tracked.get(environmentId);
    if (!tracked) return;
    this.#tracked.delete(environmentId);
    tracked.pulling?.abort();
    tracked.pulling = undefined;
    clearTimeout(tracked.retryTimer);
    tracked.current?.unpin();
  }

  close(): void {
    this.#closed = true;
    for (const environmentId of [...this.#tracked.keys()]) this.forget(environmentId);
  }
}
