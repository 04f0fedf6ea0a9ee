import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { lstatSync, readdirSync, readFileSync, realpathSync } from 'node:fs';
import { mkdir, writeFile } from 'node:fs/promises';
import path from 'node:path';
import zlib, { gzipSync } from 'node:zlib';
import tar from 'tar-stream';

/*
 * Container images the tests build themselves, offline: a tiny root of busybox-static and, on top
 * of it, one with the host's Python (the binary, the libraries it loads, its standard library).
 * Each has two layers, the second of which removes a file of the first (whiteout), replaces a
 * directory (opaque), hard-links across layers, and tries to escape the root through a symlink.
 * The result is an OCI image layout on disk (what skopeo and umoci read) and its blobs in memory
 * (what the fake registry serves). Builds are deterministic: the same options give the same digests.
 */

export const MEDIA_TYPES = {
  ociIndex: 'application/vnd.oci.image.index.v1+json',
  ociManifest: 'application/vnd.oci.image.manifest.v1+json',
  ociConfig: 'application/vnd.oci.image.config.v1+json',
  ociLayerGzip: 'application/vnd.oci.image.layer.v1.tar+gzip',
  ociLayer: 'application/vnd.oci.image.layer.v1.tar',
  ociLayerZstd: 'application/vnd.oci.image.layer.v1.tar+zstd',
  dockerManifestList: 'application/vnd.docker.distribution.manifest.list.v2+json',
  dockerManifest: 'application/vnd.docker.distribution.manifest.v2+json',
  dockerConfig: 'application/vnd.docker.container.image.v1+json',
  dockerLayerGzip: 'application/vnd.docker.image.rootfs.diff.tar.gzip',
} as const;

/* What every test image's config and files promise; tests assert on these. */
export const TEST_IMAGE = {
  marker: 'POSEIDON_TEST_MARKER',
  path: '/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin',
  workingDir: '/workspace',
  /* The account Poseidon runs unprivileged commands as. */
  user: { name: 'user', uid: 1000, gid: 1000, home: '/workspace' },
  /* In layer 1, removed by a whiteout in layer 2. */
  whiteoutPath: '/etc/removed-by-whiteout',
  /* Layer 1 fills it with `lower`, layer 2 makes it opaque and adds `upper`. */
  opaqueDirectory: '/usr/share/opaque',
  /* Layer 2: a symlink to escapeTarget, then a file through it. */
  escapeLink: '/escape',
  escapeFile: 'pwned',
  /* Layer 2: a hard link to a file of layer 1. */
  hardLink: '/etc/os-release.hardlink',
} as const;

/* Fixed so that builds are reproducible. */
const MTIME = new Date('2024-01-02T03:04:05Z');

export interface TestImageOptions {
  /* Include the host's Python (/usr/bin/python3) in layer 2. */
  python?: boolean | 'full';
  /* Value of the marker variable and VERSION_ID of /etc/os-release: a different value gives a different digest. */
  marker?: string;
  /*
   * Host directory an unpacker following the escape symlink literally would write into; the tests
   * make it and check it stays empty. It is written into the layer as an absolute path.
   */
  escapeTarget?: string;
  /* The image's Config.User (unset in openHPI's images). */
  user?: string;
  /* Media types of the manifest, config and layers. */
  format?: 'oci' | 'docker';
  /* Layers as plain tar instead of gzip. */
  uncompressed?: boolean;
  /*
   * Layers as zstd (tar+zstd), compressed with Node's zlib where it has zstd; without it the layers
   * are gzip bytes under the zstd media type, which a client must refuse before reading them.
   */
  zstd?: boolean;
  /* The tag recorded in the layout's index.json. */
  tag?: string;
}

export interface Descriptor {
  mediaType: string;
  digest: string;
  size: number;
  platform?: { architecture: string; os: string; variant?: string };
  annotations?: Record<string, string>;
}

export interface TestImage {
  /* OCI image layout (oci-layout, index.json, blobs/sha256/...). */
  layoutDirectory: string;
  tag: string;
  manifestDigest: string;
  manifestMediaType: string;
  configDigest: string;
  layers: Descriptor[];
  /* Every blob (manifest, config, layers) by digest. */
  blobs: Map<string, Buffer>;
  /* Uncompressed bytes of all layers: what an unpack writes, roughly. */
  unpackedBytes: number;
}

interface Entry {
  name: string;
  type: 'file' | 'directory' | 'symlink' | 'link' | 'character-device';
  mode?: number;
  uid?: number;
  gid?: number;
  content?: Buffer;
  linkname?: string;
}

export function digestOf(bytes: Buffer): string {
  return `sha256:${createHash('sha256').update(bytes).digest('hex')}`;
}

async function tarOf(entries: Entry[]): Promise<Buffer> {
  const pack = tar.pack();
  const chunks: Buffer[] = [];
  pack.on('data', (chunk: unknown) => {
    chunks.push(chunk as Buffer);
  });
  const done = new Promise<void>((resolve, reject) => {
    pack.on('end', resolve);
    pack.on('error', reject);
  });
  for (const entry of entries) {
    const header = {
      name: entry.name,
      type: entry.type,
      mode: entry.mode ?? (entry.type === 'directory' ? 0o755 : entry.type === 'symlink' ? 0o777 : 0o644),
      uid: entry.uid ?? 0,
      gid: entry.gid ?? 0,
      uname: '',
      gname: '',
      mtime: MTIME,
      linkname: entry.linkname,
      size: entry.type === 'file' ? (entry.content?.length ?? 0) : 0,
      ...(entry.type === 'character-device' ? { devmajor: 1, devminor: 3 } : {}),
    };
    await new Promise<void>((resolve, reject) => {
      const callback = (error?: Error | null): void => (error ? reject(error) : resolve());
      if (entry.type === 'file') pack.entry(header, entry.content ?? Buffer.alloc(0), callback);
      else pack.entry(header, callback);
    });
  }
  pack.finalize();
  await done;
  return Buffer.concat(chunks);
}

function directories(...names: string[]): Entry[] {
  return names.map((name) => ({ name, type: 'directory' }));
}

function passwd(): string {
  const { user } = TEST_IMAGE;
  return [
    'root:x:0:0:root:/root:/bin/sh',
    `${user.name}:x:${user.uid}:${user.gid}:${user.name}:${user.home}:/bin/sh`,
    'nobody:x:65534:65534:nobody:/nonexistent:/bin/false',
    '',
  ].join('\n');
}

function group(): string {
  const { user } = TEST_IMAGE;
  return ['root:x:0:', 'shadow:x:42:', `${user.name}:x:${user.gid}:`, 'nogroup:x:65534:', ''].join('\n');
}

function busyboxLayer(marker: string): Entry[] {
  const busybox = readFileSync('/bin/busybox');
  const applets = execFileSync('/bin/busybox', ['--list-full'], { encoding: 'utf8' })
    .split('\n')
    .filter((line) => line !== '' && line !== 'bin/busybox')
    .sort();
  const entries: Entry[] = [
    ...directories('bin/', 'etc/', 'root/', 'sbin/', 'usr/', 'usr/bin/', 'usr/sbin/', 'usr/share/', 'usr/share/opaque/', 'var/', 'home/'),
    { name: 'root/', type: 'directory', mode: 0o700 },
    { name: 'var/tmp/', type: 'directory', mode: 0o1777 },
    { name: 'bin/busybox', type: 'file', mode: 0o755, content: busybox },
    ...applets.map((applet): Entry => ({ name: applet, type: 'symlink', linkname: path.relative(path.dirname(`/${applet}`), '/bin/busybox') })),
    { name: 'etc/passwd', type: 'file', content: Buffer.from(passwd()) },
    { name: 'etc/group', type: 'file', content: Buffer.from(group()) },
    { name: 'etc/shadow', type: 'file', mode: 0o640, gid: 42, content: Buffer.from('root:*:19000:0:99999:7:::\n') },
    { name: 'etc/os-release', type: 'file', content: Buffer.from(`NAME="Poseidon test image"\nID=poseidon-test\nVERSION_ID=${marker}\n`) },
    { name: TEST_IMAGE.whiteoutPath.slice(1), type: 'file', content: Buffer.from('this file is removed by layer 2\n') },
    { name: `${TEST_IMAGE.opaqueDirectory.slice(1)}/lower`, type: 'file', content: Buffer.from('hidden by the opaque directory of layer 2\n') },
    { name: 'home/user/', type: 'directory', mode: 0o750, uid: TEST_IMAGE.user.uid, gid: TEST_IMAGE.user.gid },
    { name: 'home/user/owned', type: 'file', mode: 0o600, uid: TEST_IMAGE.user.uid, gid: TEST_IMAGE.user.gid, content: Buffer.from('owned by user\n') },
    // Device nodes are never created by an unpacker that runs sandboxes on the result.
    { name: 'etc/null-device', type: 'character-device', mode: 0o666 },
  ];
  // De-duplicate: the mode-carrying entries above override plain directories.
  const byName = new Map<string, Entry>();
  for (const entry of entries) byName.set(entry.name, entry);
  return [...byName.values()];
}

/* Files of the host's Python: the interpreter, the libraries it and its extension modules load, the standard library. */
function pythonEntries(full: boolean): Entry[] {
  const entries = new Map<string, Entry>();
  const addDirectoryChain = (name: string): void => {
    const parts = name.split('/');
    for (let index = 1; index < parts.length; index += 1) {
      const directory = `${parts.slice(0, index).join('/')}/`;
      if (!entries.has(directory)) entries.set(directory, { name: directory, type: 'directory' });
    }
  };
  const addFile = (hostPath: string, imagePath = hostPath): void => {
    const name = imagePath.slice(1);
    addDirectoryChain(name);
    const stat = lstatSync(hostPath);
    entries.set(name, { name, type: 'file', mode: stat.mode & 0o7777, content: readFileSync(realpathSync(hostPath)) });
  };
  const interpreter = realpathSync('/usr/bin/python3');
  addFile(interpreter, '/usr/bin/python3.11');
  entries.set('usr/bin/python3', { name: 'usr/bin/python3', type: 'symlink', linkname: 'python3.11' });
  // Merged /usr: the interpreter asks for /lib64/ld-linux-x86-64.so.2, ldd names /lib/... paths.
  entries.set('lib', { name: 'lib', type: 'symlink', linkname: 'usr/lib' });
  entries.set('lib64', { name: 'lib64', type: 'symlink', linkname: 'usr/lib64' });
  const stdlib = '/usr/lib/python3.11';
  const skipped = new Set(['test', 'config-3.11-x86_64-linux-gnu', 'idlelib', 'tkinter', 'turtledemo', 'ensurepip', 'lib2to3', 'site-packages']);
  const minimalPackages = new Set(['encodings', 'collections', 'importlib', 're', 'json', 'lib-dynload']);
  const extensionModules: string[] = [];
  const walk = (directory: string, top: boolean): void => {
    for (const name of readdirSync(directory).sort()) {
      const hostPath = path.join(directory, name);
      const stat = lstatSync(hostPath);
      if (stat.isDirectory()) {
        if (name === '__pycache__' || (top && skipped.has(name)) || (top && !full && !minimalPackages.has(name))) continue;
        walk(hostPath, false);
      } else if (stat.isFile()) {
        if (!top && !full && !name.endsWith('.py') && !name.endsWith('.so')) continue;
        addFile(hostPath);
        if (name.endsWith('.so')) extensionModules.push(hostPath);
      }
    }
  };
  walk(stdlib, true);
  for (const library of sharedLibraries([interpreter, ...extensionModules])) addFile(library);
  return [...entries.values()].sort((a, b) => a.name.localeCompare(b.name));
}

/* The libraries ldd finds for these binaries, by their paths under /usr (the image has merged /usr). */
function sharedLibraries(binaries: string[]): string[] {
  const found = new Set<string>();
  for (const binary of binaries) {
    const output = execFileSync('ldd', [binary], { encoding: 'utf8' });
    for (const match of output.matchAll(/(?:=>\s*)?(\/\S+)\s+\(0x/g)) {
      const library = match[1] ?? '';
      found.add(library.startsWith('/usr/') ? library : `/usr${library}`);
    }
  }
  return [...found].sort();
}

function changesLayer(options: TestImageOptions): Entry[] {
  const entries: Entry[] = [
    ...directories('etc/', 'usr/', 'usr/share/', 'workspace/'),
    { name: `etc/.wh.${path.basename(TEST_IMAGE.whiteoutPath)}`, type: 'file' },
    { name: `${TEST_IMAGE.opaqueDirectory.slice(1)}/`, type: 'directory' },
    { name: `${TEST_IMAGE.opaqueDirectory.slice(1)}/.wh..wh..opq`, type: 'file' },
    { name: `${TEST_IMAGE.opaqueDirectory.slice(1)}/upper`, type: 'file', content: Buffer.from('from layer 2\n') },
    { name: TEST_IMAGE.hardLink.slice(1), type: 'link', linkname: 'etc/os-release' },
    // A name longer than the 100 bytes of a plain tar header (a PAX header carries it).
    { name: `usr/share/${'long-name-'.repeat(12)}.txt`, type: 'file', content: Buffer.from('long\n') },
  ];
  if (options.python) entries.push(...pythonEntries(options.python === 'full'));
  if (options.escapeTarget) {
    entries.push(
      { name: TEST_IMAGE.escapeLink.slice(1), type: 'symlink', linkname: options.escapeTarget },
      { name: `${TEST_IMAGE.escapeLink.slice(1)}/${TEST_IMAGE.escapeFile}`, type: 'file', content: Buffer.from('escaped\n') },
    );
  }
  // Directories before their contents, as an image builder writes them.
  const byName = new Map<string, Entry>();
  for (const entry of entries) byName.set(entry.name, entry);
  return [...byName.values()];
}

/* Builds an image and writes it as an OCI image layout into `directory` (created). */
export async function buildTestImage(directory: string, options: TestImageOptions = {}): Promise<TestImage> {
  const marker = options.marker ?? 'v1';
  const tag = options.tag ?? 'latest';
  const docker = options.format === 'docker';
  const blobs = new Map<string, Buffer>();
  const store = (bytes: Buffer): string => {
    const digest = digestOf(bytes);
    blobs.set(digest, bytes);
    return digest;
  };
  const layers: Descriptor[] = [];
  const diffIds: string[] = [];
  let unpackedBytes = 0;
  for (const entries of [busyboxLayer(marker), changesLayer(options)]) {
    const plain = await tarOf(entries);
    unpackedBytes += plain.length;
    diffIds.push(digestOf(plain));
    const zstd = (zlib as unknown as { zstdCompressSync?: (bytes: Buffer) => Buffer }).zstdCompressSync;
    const blob = options.uncompressed ? plain : options.zstd && zstd ? zstd(plain) : gzipSync(plain, { level: 6 });
    const mediaType = options.uncompressed
      ? MEDIA_TYPES.ociLayer
      : options.zstd
        ? MEDIA_TYPES.ociLayerZstd
        : docker
          ? MEDIA_TYPES.dockerLayerGzip
          : MEDIA_TYPES.ociLayerGzip;
    layers.push({ mediaType, digest: store(blob), size: blob.length });
  }
  const config = {
    created: MTIME.toISOString(),
    architecture: 'amd64',
    os: 'linux',
    config: {
      Env: [`PATH=${TEST_IMAGE.path}`, `${TEST_IMAGE.marker}=${marker}`, 'LANG=C.UTF-8'],
      Cmd: ['/bin/sh'],
      WorkingDir: TEST_IMAGE.workingDir,
      ...(options.user ? { User: options.user } : {}),
    },
    rootfs: { type: 'layers', diff_ids: diffIds },
    history: [{ created: MTIME.toISOString(), created_by: 'poseidon-ts test image builder' }],
  };
  const configBytes = Buffer.from(JSON.stringify(config));
  const configDigest = store(configBytes);
  const manifestMediaType = docker ? MEDIA_TYPES.dockerManifest : MEDIA_TYPES.ociManifest;
  const manifest = {
    schemaVersion: 2,
    mediaType: manifestMediaType,
    config: { mediaType: docker ? MEDIA_TYPES.dockerConfig : MEDIA_TYPES.ociConfig, digest: configDigest, size: configBytes.length },
    layers,
  };
  const manifestBytes = Buffer.from(JSON.stringify(manifest));
  const manifestDigest = store(manifestBytes);
  await writeLayout(directory, blobs, {
    schemaVersion: 2,
    mediaType: MEDIA_TYPES.ociIndex,
    manifests: [
      {
        mediaType: manifestMediaType,
        digest: manifestDigest,
        size: manifestBytes.length,
        platform: { architecture: 'amd64', os: 'linux' },
        annotations: { 'org.opencontainers.image.ref.name': tag },
      },
    ],
  });
  return { layoutDirectory: directory, tag, manifestDigest, manifestMediaType, configDigest, layers, blobs, unpackedBytes };
}

async function writeLayout(directory: string, blobs: Map<string, Buffer>, index: unknown): Promise<void> {
  await mkdir(path.join(directory, 'blobs', 'sha256'), { recursive: true });
  await writeFile(path.join(directory, 'oci-layout'), JSON.stringify({ imageLayoutVersion: '1.0.0' }));
  await writeFile(path.join(directory, 'index.json'), JSON.stringify(index));
  for (const [digest, bytes] of blobs) await writeFile(path.join(directory, 'blobs', 'sha256', digest.slice('sha256:'.length)), bytes);
}

/*
 * An image index over this image and a fake arm64 one (whose manifest points at the same config):
 * a client must pick linux/amd64 from it.
 */
export function indexOf(
  image: TestImage,
  format: 'oci' | 'docker' = 'oci',
): { bytes: Buffer; digest: string; mediaType: string; otherManifest: { digest: string; bytes: Buffer } } {
  const amd64 = image.blobs.get(image.manifestDigest);
  if (!amd64) throw new Error('the image has no manifest blob');
  const arm64 = Buffer.from(amd64.toString('utf8').replace('{', '{"annotations":{"fake":"arm64"},'));
  const arm64Digest = digestOf(arm64);
  const mediaType = format === 'docker' ? MEDIA_TYPES.dockerManifestList : MEDIA_TYPES.ociIndex;
  const bytes = Buffer.from(
    JSON.stringify({
      schemaVersion: 2,
      mediaType,
      manifests: [
        { mediaType: image.manifestMediaType, digest: arm64Digest, size: arm64.length, platform: { architecture: 'arm64', os: 'linux', variant: 'v8' } },
        { mediaType: image.manifestMediaType, digest: image.manifestDigest, size: amd64.length, platform: { architecture: 'amd64', os: 'linux' } },
      ],
    }),
  );
  return { bytes, digest: digestOf(bytes), mediaType, otherManifest: { digest: arm64Digest, bytes: arm64 } };
}
