import { z } from 'zod';

/* The media types a manifest GET accepts, most specific first (the four Docker Hub serves). */
export const MANIFEST_MEDIA_TYPES = {
  ociIndex: 'application/vnd.oci.image.index.v1+json',
  dockerManifestList: 'application/vnd.docker.distribution.manifest.list.v2+json',
  ociManifest: 'application/vnd.oci.image.manifest.v1+json',
  dockerManifest: 'application/vnd.docker.distribution.manifest.v2+json',
} as const;

export const INDEX_MEDIA_TYPES: ReadonlySet<string> = new Set([MANIFEST_MEDIA_TYPES.ociIndex, MANIFEST_MEDIA_TYPES.dockerManifestList]);
export const IMAGE_MANIFEST_MEDIA_TYPES: ReadonlySet<string> = new Set([MANIFEST_MEDIA_TYPES.ociManifest, MANIFEST_MEDIA_TYPES.dockerManifest]);

export type LayerCompression = 'gzip' | 'zstd' | 'none';

/* Layer media types and how their bytes are compressed; anything else is refused as unsupported. */
const LAYER_COMPRESSION: ReadonlyMap<string, LayerCompression> = new Map([
  ['application/vnd.oci.image.layer.v1.tar', 'none'],
  ['application/vnd.oci.image.layer.v1.tar+gzip', 'gzip'],
  ['application/vnd.oci.image.layer.v1.tar+zstd', 'zstd'],
  ['application/vnd.oci.image.layer.nondistributable.v1.tar', 'none'],
  ['application/vnd.oci.image.layer.nondistributable.v1.tar+gzip', 'gzip'],
  ['application/vnd.oci.image.layer.nondistributable.v1.tar+zstd', 'zstd'],
  ['application/vnd.docker.image.rootfs.diff.tar', 'none'],
  ['application/vnd.docker.image.rootfs.diff.tar.gzip', 'gzip'],
  ['application/vnd.docker.image.rootfs.foreign.diff.tar.gzip', 'gzip'],
]);

export function layerCompression(mediaType: string): LayerCompression | undefined {
  return LAYER_COMPRESSION.get(mediaType);
}

export const DIGEST_PATTERN = /^sha256:[0-9a-f]{64}$/;

export const descriptorSchema = z.object({
  mediaType: z.string().min(1),
  digest: z.string().regex(DIGEST_PATTERN, 'expected a sha256 digest'),
  size: z.number().int().min(0),
  platform: z.object({ architecture: z.string(), os: z.string(), variant: z.string().optional() }).optional(),
});
export type Descriptor = z.infer<typeof descriptorSchema>;

export const indexSchema = z.object({
  schemaVersion: z.literal(2),
  mediaType: z.string().optional(),
  manifests: z.array(descriptorSchema),
});

export const imageManifestSchema = z.object({
  schemaVersion: z.literal(2),
  mediaType: z.string().optional(),
  config: descriptorSchema,
  layers: z.array(descriptorSchema),
});
export type ImageManifest = z.infer<typeof imageManifestSchema>;

/* The parts of an OCI/Docker image config a runner uses. */
export const imageConfigSchema = z.object({
  architecture: z.string().optional(),
  os: z.string().optional(),
  config: z
    .object({
      Env: z.array(z.string()).nullish(),
      User: z.string().nullish(),
      WorkingDir: z.string().nullish(),
    })
    .nullish(),
  rootfs: z.object({ type: z.string(), diff_ids: z.array(z.string()) }).optional(),
});
export type ImageConfigDocument = z.infer<typeof imageConfigSchema>;

/* The linux/amd64 entry of an index; a plain amd64 entry wins over one with a variant. */
export function pickPlatform(manifests: Descriptor[]): Descriptor | undefined {
  const candidates = manifests.filter((entry) => entry.platform?.os === 'linux' && entry.platform.architecture === 'amd64');
  return candidates.find((entry) => entry.platform?.variant === undefined) ?? candidates[0];
}
