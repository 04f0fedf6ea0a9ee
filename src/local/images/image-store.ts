import { DomainError } from '../../runner/errors.js';

/*
 * The contract between the image store (registry client, cache, unpacker) and the runner side.
 * A runner needs only a PreparedImage: a read-only root directory that already has every mount
 * point the sandbox uses, and the image's runtime settings with its accounts resolved.
 */

/* `always` resolves the tag at every prepare, `ifnotpresent` only when nothing is cached for the reference, `never` never goes to a registry. */
export type PullPolicy = 'always' | 'ifnotpresent' | 'never';

/* The settings of the image's OCI config that a runner applies. */
export interface ImageRuntimeConfig {
  /* `KEY=value` entries, in the image's order (Config.Env). */
  env: string[];
  /* Config.User as written: `name`, `uid`, `name:group`, `uid:gid`; undefined when empty. */
  user: string | undefined;
  /* Config.WorkingDir; undefined when empty. */
  workingDir: string | undefined;
}

/* An account of the image's own /etc/passwd (ids as inside the image). */
export interface ImageAccount {
  name: string;
  uid: number;
  gid: number;
  home: string;
}

export interface ImageAccounts {
  /* The account named `user` (openHPI's images; Poseidon runs unprivileged commands as it), if the image has one. */
  user: ImageAccount | undefined;
  /*
   * Config.User resolved against the image's /etc/passwd and /etc/group: undefined when User is
   * empty or names an account or group the image lacks (the store logs that). A numeric uid
   * the image has no entry for gets gid 0 unless a group is given, as in Docker; its name is then undefined.
   */
  configured: { uid: number; gid: number; name: string | undefined } | undefined;
}

export interface PreparedImage {
  /* The reference as normalised: `registry/repository[:tag][@digest]`. */
  reference: string;
  /* The manifest digest (`sha256:<hex>`) the root was unpacked from. */
  digest: string;
  /*
   * The unpacked, read-only root. Files keep the image's numeric uids and gids (0..65535) on disk.
   * It has /proc, /dev, /tmp, /workspace, /etc, /etc/passwd, /etc/group and /.poseidon, so bwrap
   * never has to create a mount point on it.
   */
  rootDirectory: string;
  config: ImageRuntimeConfig;
  accounts: ImageAccounts;
}

/* Bytes of one layer so far; `total` is the layer's size from the manifest. */
export interface PullProgress {
  reference: string;
  layer: string;
  downloaded: number;
  total: number;
  /* `download` while bytes arrive, `cached` when the blob was there already, `unpack` once its entries are written. */
  phase: 'download' | 'cached' | 'unpack';
}

export interface PrepareOptions {
  policy: PullPolicy;
  signal?: AbortSignal;
  onProgress?: (progress: PullProgress) => void;
}

export interface GarbageCollection {
  /* Manifest digests whose roots were removed. */
  removedImages: string[];
  removedBlobs: number;
  freedBytes: number;
}

export interface ImageStore {
  /*
   * Resolves the reference (per the policy), downloads and verifies what is missing, unpacks once
   * (concurrent callers of one digest share the work) and records the config. Rejects with an
   * ImageError.
   */
  prepare(reference: string, options: PrepareOptions): Promise<PreparedImage>;
  /* Pins an image while an environment or a live runner uses it; the returned function unpins (once). */
  pin(digest: string): () => void;
  /* Removes unpinned images past the configured policy, then blobs no kept image refers to. Never a pinned image. */
  collectGarbage(): Promise<GarbageCollection>;
  /* Stops the periodic collection and waits for pulls under way. */
  close(): Promise<void>;
}

/* Why an image could not be prepared; `definite` ones will not change by retrying with the same reference. */
export type ImageErrorReason =
  /* The reference cannot be parsed. */
  | 'bad-reference'
  /* The registry does not know the repository, tag or digest. */
  | 'not-found'
  /* The registry refused the credentials (or their absence). */
  | 'access-denied'
  /* A manifest or blob did not hash to its digest. */
  | 'digest-mismatch'
  /* The registry cannot be reached, timed out, or answered 5xx / 429. */
  | 'registry-unavailable'
  /* pullpolicy `never` and the image is not in the cache. */
  | 'not-cached'
  /* A media type, compression (zstd without Node support) or platform the store cannot use. */
  | 'unsupported'
  /* The image is malformed (bad manifest, config or layer). */
  | 'invalid-image'
  /* The cache under local.statedir cannot be written (disk full, permissions). */
  | 'cache-unwritable';

const DEFINITE: ReadonlySet<ImageErrorReason> = new Set(['bad-reference', 'not-found', 'access-denied', 'unsupported', 'invalid-image', 'not-cached']);

export class ImageError extends DomainError {
  readonly definite: boolean;

  constructor(
    readonly reason: ImageErrorReason,
    readonly reference: string,
    message: string,
    options?: ErrorOptions,
  ) {
    super(reason === 'bad-reference' ? 'bad-request' : reason === 'registry-unavailable' ? 'backend-unreachable' : 'backend-failed', message, options);
    this.definite = DEFINITE.has(reason);
  }
}
