import {
  chmodSync,
  closeSync,
  createReadStream,
  createWriteStream,
  fchmodSync,
  fchownSync,
  futimesSync,
  lchownSync,
  linkSync,
  lstatSync,
  lutimesSync,
  mkdirSync,
  openSync,
  readlinkSync,
  type Stats,
  symlinkSync,
  writeSync,
} from 'node:fs';
import { lstat, readdir, rm } from 'node:fs/promises';
import path from 'node:path';
import type { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { setImmediate as nextTurn } from 'node:timers/promises';
import zlib from 'node:zlib';
import tar, { type Header } from 'tar-stream';
import { ImageError } from './image-store.js';
import type { LayerCompression } from './manifest.js';

/*
 * Applies image layers (tar streams) onto a root directory as the OCI image spec describes:
 * whiteouts (`.wh.<name>`) remove what lower layers made, opaque markers (`.wh..wh..opq`) empty a
 * directory of lower layers' entries, later entries replace earlier ones. Every path is resolved
 * inside the root, symlinks included (a symlink to /outside followed by a file through it lands in
 * <root>/outside), so a hostile layer writes nothing outside the root. Ownership is kept as
 * numeric ids 0..65535; then the mode, then the modification time. Device nodes and FIFOs are
 * skipped (a sandbox gets its own /dev), and so are setuid and setgid bits of files: sandboxes run
 * with no_new_privs, and a setuid-root file of an image must never lie on the host.
 */

const MAX_SYMLINK_HOPS = 255;
const MAX_ID = 65535;
const WHITEOUT_PREFIX = '.wh.';
const OPAQUE_MARKER = '.wh..wh..opq';
/*
 * Files up to this size are collected in memory and written with synchronous calls on one file
 * descriptor: most entries of an image are small files, and six threadpool round trips for each
 * (open, write, close, chown, chmod, utimes) made unpacking twice as slow as umoci. Larger files
 * stream, so that neither memory nor one blocking write grows with them.
 */
const IN_MEMORY_FILE_MAX = 1024 * 1024;
/*
 * An entry blocks the event loop for well under a millisecond, but one decompressed chunk holds
 * dozens of entries (a run of symlinks, say) that would all run in one turn: after this long
 * without a turn the unpack gives the loop one, so that the daemon's API stays responsive.
 */
const YIELD_AFTER_MS = 2;

/* Gives the event loop a turn once YIELD_AFTER_MS have passed since the last one. */
class TurnTaker {
  #since = performance.now();

  async maybeYield(): Promise<void> {
    if (performance.now() - this.#since < YIELD_AFTER_MS) return;
    await nextTurn();
    this.#since = performance.now();
  }
}

export interface LayerStats {
  entries: number;
  /* Bytes of file contents written. */
  bytes: number;
  /* Entries left out, with why (device nodes, FIFOs, unknown types). */
  skipped: string[];
}

function invalid(reference: string, message: string): ImageError {
  return new ImageError('invalid-image', reference, `${reference}: ${message}`);
}

const zstdDecompress = (zlib as unknown as { createZstdDecompress?: () => NodeJS.ReadWriteStream }).createZstdDecompress;

/* Refuses layers this Node.js cannot decompress, before anything is downloaded. */
export function checkDecompressible(compression: LayerCompression, reference: string): void {
  if (compression === 'zstd' && !zstdDecompress) {
    throw new ImageError(
      'unsupported',
      reference,
      `${reference}: the image has zstd-compressed layers, which this Node.js (${process.version}) cannot decompress (Node.js 22.15 or later can); use a gzip variant of the image`,
    );
  }
}

function decompressor(compression: LayerCompression, reference: string): NodeJS.ReadWriteStream | undefined {
  checkDecompressible(compression, reference);
  if (compression === 'none') return undefined;
  if (compression === 'gzip') return zlib.createGunzip();
  return zstdDecompress?.();
}

/*
 * The in-root path ('a/b', '' for the root) of the directory named by `parts`, following symlinks
 * as the kernel would if the root were `/`: an absolute target restarts at the root, `..` stops
 * there. Missing directories are made (0755, root) when onCreate is given (it learns each one),
 * else the answer is undefined. A component that is not a directory is an invalid image.
 */
export async function resolveInsideRoot(root: string, parts: string[], reference: string, onCreate?: (inRoot: string) => void): Promise<string | undefined> {
  return resolveInsideRootSync(root, parts, reference, onCreate);
}

/*
 * resolveInsideRoot with synchronous calls: one lstat per component (a few more for symlinks),
 * bounded by the path's length and MAX_SYMLINK_HOPS, so it blocks the event loop only briefly.
 */
function resolveInsideRootSync(root: string, parts: string[], reference: string, onCreate?: (inRoot: string) => void): string | undefined {
  let resolved: string[] = [];
  const pending = [...parts];
  let hops = 0;
  while (pending.length > 0) {
    const part = pending.shift() ?? '';
    if (part === '' || part === '.') continue;
    if (part === '..') {
      resolved.pop();
      continue;
    }
    const candidate = [...resolved, part];
    const host = path.join(root, ...candidate);
    let stat = lstatSync(host, { throwIfNoEntry: false });
    if (!stat) {
      if (!onCreate) return undefined;
      mkdirSync(host, { mode: 0o755 });
      onCreate(candidate.join('/'));
      stat = lstatSync(host);
    }
    if (stat.isSymbolicLink()) {
      hops += 1;
      if (hops > MAX_SYMLINK_HOPS) throw invalid(reference, `too many symbolic links resolving /${parts.join('/')}`);
      const target = readlinkSync(host);
      if (target.startsWith('/')) resolved = [];
      pending.unshift(...target.split('/'));
      continue;
    }
    if (!stat.isDirectory()) throw invalid(reference, `/${parts.join('/')}: /${candidate.join('/')} is not a directory`);
    resolved = candidate;
  }
  return resolved.join('/');
}

export async function lstatOrUndefined(file: string): Promise<Stats | undefined> {
  try {
    return await lstat(file);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw error;
  }
}

/* Unpacks one layer blob (a file) onto root. */
export async function unpackLayerFile(root: string, blob: string, compression: LayerCompression, reference: string, signal?: AbortSignal): Promise<LayerStats> {
  const source: Readable = createReadStream(blob, { highWaterMark: 1024 * 1024 });
  const stage = decompressor(compression, reference);
  const extract = tar.extract();
  const layer = new LayerWriter(root, reference);
  const turns = new TurnTaker();
  const feeding = stage ? pipeline(source, stage, extract) : pipeline(source, extract);
  // A broken stream ends the iteration below with its error; this keeps it from being unhandled meanwhile.
  feeding.catch(() => undefined);
  try {
    for await (const entry of extract) {
      signal?.throwIfAborted();
      await layer.apply(entry.header, entry);
      await turns.maybeYield();
    }
    await feeding;
  } catch (error) {
    source.destroy();
    if (error instanceof ImageError || signal?.aborted) throw error;
    const code = (error as NodeJS.ErrnoException).code;
    // Disk full or a permission problem is the host's, not the image's.
    if (code === 'ENOSPC' || code === 'EACCES' || code === 'EPERM' || code === 'EROFS' || code === 'EDQUOT') throw error;
    throw invalid(reference, `a layer cannot be unpacked: ${(error as Error).message}`);
  }
  await layer.finish();
  return layer.stats;
}

/* An entry's contents: read (a file's) or skipped with resume(). */
type EntryBody = AsyncIterable<unknown> & { resume(): unknown };

/* The state of unpacking one layer: what it touched, which directory times to set last. */
class LayerWriter {
  readonly stats: LayerStats = { entries: 0, bytes: 0, skipped: [] };
  /* In-root paths ('a/b') this layer created or wrote under; whiteouts and opaque markers never remove them. */
  readonly #touched = new Set<string>();
  /* Directory in-root path as named by entries -> its resolved in-root path. Cleared whenever a directory or symlink is replaced. */
  readonly #resolved = new Map<string, string>();
  /* Directory times are set after the layer, since adding entries changes them. */
  readonly #directoryTimes: Array<{ file: string; mtime: Date }> = [];

  constructor(
    private readonly root: string,
    private readonly reference: string,
  ) {}

  #host(inRoot: string): string {
    return inRoot === '' ? this.root : path.join(this.root, inRoot);
  }

  #touch(inRoot: string): void {
    let current = inRoot;
    while (current !== '' && !this.#touched.has(current)) {
      this.#touched.add(current);
      current = path.posix.dirname(current);
      if (current === '.') current = '';
    }
  }

  /* The in-root path of a directory named by `parts` (see resolveInsideRoot); missing directories are created when `create`. */
  #resolveDirectory(parts: string[], create: boolean): string | undefined {
    const key = parts.join('/');
    const known = this.#resolved.get(key);
    if (known !== undefined) return known;
    const result = resolveInsideRootSync(this.root, parts, this.reference, create ? (created) => this.#touch(created) : undefined);
    if (result !== undefined) this.#resolved.set(key, result);
    return result;
  }

  /* Removes an entry of the root (a directory with its contents). */
  async #remove(inRoot: string, stat: Stats): Promise<void> {
    if (stat.isDirectory() || stat.isSymbolicLink()) this.#resolved.clear();
    await rm(this.#host(inRoot), { recursive: true, force: true });
  }

  /* What lower layers left in a directory goes; what this layer wrote there stays (at any depth). */
  async #removeLower(inRoot: string): Promise<void> {
    for (const name of await readdir(this.#host(inRoot))) {
      const child = inRoot === '' ? name : `${inRoot}/${name}`;
      const stat = await lstat(this.#host(child));
      if (!this.#touched.has(child)) await this.#remove(child, stat);
      else if (stat.isDirectory()) await this.#removeLower(child);
    }
  }

  async apply(header: Header, body: EntryBody): Promise<void> {
    this.stats.entries += 1;
    const parts = header.name.split('/').filter((part: string) => part !== '' && part !== '.');
    const base = parts.pop();
    if (base === undefined) {
      // The root itself ('./'): only its metadata.
      body.resume();
      if (header.type === 'directory') {
        this.#metadata(this.root, header);
        this.#directoryTimes.push({ file: this.root, mtime: header.mtime ?? new Date(0) });
      }
      return;
    }
    if (base === '..') {
      body.resume();
      this.stats.skipped.push(`${header.name}: names a parent directory`);
      return;
    }
    if (base.startsWith(WHITEOUT_PREFIX)) {
      body.resume();
      await this.#whiteout(parts, base);
      return;
    }
    const parent = this.#resolveDirectory(parts, true);
    const inRoot = parent === '' ? base : `${parent}/${base}`;
    const target = this.#host(inRoot);
    const existing = lstatSync(target, { throwIfNoEntry: false });
    switch (header.type) {
      case 'directory': {
        body.resume();
        if (existing && !existing.isDirectory()) await this.#remove(inRoot, existing);
        if (!existing?.isDirectory()) mkdirSync(target, { mode: 0o700 });
        this.#touch(inRoot);
        this.#metadata(target, header);
        this.#directoryTimes.push({ file: target, mtime: header.mtime ?? new Date(0) });
        return;
      }
      case 'file':
      case 'contiguous-file': {
        if (existing) await this.#remove(inRoot, existing);
        this.#touch(inRoot);
        const size = header.size ?? 0;
        if (size <= IN_MEMORY_FILE_MAX) {
          this.#writeFile(target, header, await collect(body));
        } else {
          // O_EXCL: never through a symlink someone left at the name.
          await pipeline(body, createWriteStream(target, { flags: 'wx', mode: 0o600 }));
          this.#metadata(target, header);
        }
        this.stats.bytes += size;
        return;
      }
      case 'symlink': {
        body.resume();
        if (existing) await this.#remove(inRoot, existing);
        this.#touch(inRoot);
        symlinkSync(header.linkname ?? '', target);
        this.#metadata(target, header);
        return;
      }
      case 'link': {
        body.resume();
        const linkParts = (header.linkname ?? '').split('/').filter((part: string) => part !== '' && part !== '.');
        const linkBase = linkParts.pop();
        const linkParent = linkBase === undefined ? undefined : this.#resolveDirectory(linkParts, false);
        const source = linkParent === undefined || linkBase === undefined ? undefined : this.#host(linkParent === '' ? linkBase : `${linkParent}/${linkBase}`);
        const sourceStat = source === undefined ? undefined : lstatSync(source, { throwIfNoEntry: false });
        if (source === undefined || !sourceStat || sourceStat.isDirectory()) {
          throw invalid(this.reference, `hard link /${header.name} points to /${header.linkname ?? ''}, which is not a file of the image`);
        }
        if (source === target) return;
        if (existing) await this.#remove(inRoot, existing);
        this.#touch(inRoot);
        linkSync(source, target);
        return;
      }
      default: {
        body.resume();
        this.stats.skipped.push(`/${header.name}: ${header.type ?? 'unknown type'}`);
        return;
      }
    }
  }

  async #whiteout(parts: string[], base: string): Promise<void> {
    const directory = this.#resolveDirectory(parts, false);
    if (directory === undefined) return;
    if (base === OPAQUE_MARKER) {
      await this.#removeLower(directory);
      return;
    }
    const name = base.slice(WHITEOUT_PREFIX.length);
    if (name === '' || name === '.' || name === '..') return;
    const inRoot = directory === '' ? name : `${directory}/${name}`;
    if (this.#touched.has(inRoot)) return;
    const existing = lstatSync(this.#host(inRoot), { throwIfNoEntry: false });
    if (existing) await this.#remove(inRoot, existing);
  }

  /* The entry's owner, mode and time; an owner outside 0..MAX_ID is an invalid image. */
  #attributes(header: Header): { uid: number; gid: number; mode: number; mtime: Date } {
    const uid = header.uid ?? 0;
    const gid = header.gid ?? 0;
    if (uid < 0 || uid > MAX_ID || gid < 0 || gid > MAX_ID) {
      throw invalid(this.reference, `/${header.name} is owned by ${uid}:${gid}, outside 0..${MAX_ID}`);
    }
    let mode = (header.mode ?? 0o644) & 0o7777;
    if (header.type !== 'directory') mode &= ~0o6000;
    return { uid, gid, mode, mtime: header.mtime ?? new Date(0) };
  }

  /* Ownership, then mode (chown clears setuid bits), then times. */
  #metadata(target: string, header: Header): void {
    const { uid, gid, mode, mtime } = this.#attributes(header);
    lchownSync(target, uid, gid);
    if (header.type !== 'symlink') chmodSync(target, mode);
    lutimesSync(target, mtime, mtime);
  }

  /* A file's contents and metadata through one descriptor, in #metadata's order. */
  #writeFile(target: string, header: Header, content: Buffer): void {
    const { uid, gid, mode, mtime } = this.#attributes(header);
    // O_EXCL: never through a symlink someone left at the name.
    const fd = openSync(target, 'wx', 0o600);
    try {
      for (let written = 0; written < content.length; ) written += writeSync(fd, content, written);
      fchownSync(fd, uid, gid);
      fchmodSync(fd, mode);
      futimesSync(fd, mtime, mtime);
    } finally {
      closeSync(fd);
    }
  }

  /* Directory times last, so that adding their entries did not change them again. */
  async finish(): Promise<void> {
    const turns = new TurnTaker();
    for (const { file, mtime } of this.#directoryTimes) {
      if (lstatSync(file, { throwIfNoEntry: false })?.isDirectory()) lutimesSync(file, mtime, mtime);
      await turns.maybeYield();
    }
  }
}

/* An entry's whole contents (a small file's), as one buffer. */
async function collect(body: EntryBody): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const chunk of body) chunks.push(chunk as Buffer);
  return chunks.length === 1 ? (chunks[0] as Buffer) : Buffer.concat(chunks);
}
