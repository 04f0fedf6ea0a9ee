import { randomBytes } from 'node:crypto';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { indexOf, type TestImage } from '../support/test-images.js';

/*
 * An in-process OCI distribution registry on loopback, faithful to what a client sees of Docker Hub
 * and the CNCF distribution registry:
 * - `GET /v2/` answers 401 with a Bearer challenge when auth is on; a token comes from the realm
 *   (anonymous, or Basic credentials when the registry has a user), `{token, access_token, expires_in}`;
 * - manifests by tag or digest, GET and HEAD, with Docker-Content-Digest, answered only in a media
 *   type the client's Accept lists (else 404 MANIFEST_UNKNOWN, as distribution does for an OCI index);
 * - blobs answer 307 to a second server (the "CDN", another origin) that serves the bytes and records
 *   whether any Authorization header reached it;
 * - faults: slow bodies, 404s, 5xx, blobs served with wrong bytes (digest mismatch).
 * Errors carry distribution's JSON body `{errors: [{code, message}]}`.
 */

interface StoredManifest {
  bytes: Buffer;
  mediaType: string;
}

interface Repository {
  tags: Map<string, string>;
  manifests: Map<string, StoredManifest>;
  blobs: Map<string, Buffer>;
}

export interface RecordedRequest {
  server: 'registry' | 'cdn';
  method: string;
  path: string;
  authorization: string | undefined;
  accept: string | undefined;
}

export interface FakeRegistryOptions {
  /* Require Bearer tokens from the token endpoint (Docker Hub's flow). */
  auth?: boolean;
  /* With auth: the token endpoint wants these Basic credentials; without them it grants nothing. */
  credentials?: { username: string; password: string };
}

export interface Faults {
  /* Bytes per second of blob bodies (0: no limit). */
  bytesPerSecond: number;
  /* Digests of blobs the CDN serves with one byte changed. */
  corruptBlobs: Set<string>;
  /* Manifest answers 503 this many more times. */
  manifestFailures: number;
  /* Blobs answer 404 (gone from storage). */
  missingBlobs: Set<string>;
  /* Manifests (by digest) served with a byte more than their digest covers. */
  corruptManifests: Set<string>;
}

function errorBody(code: string, message: string): string {
  return JSON.stringify({ errors: [{ code, message, detail: null }] });
}

export class FakeRegistry {
  readonly requests: RecordedRequest[] = [];
  readonly faults: Faults = { bytesPerSecond: 0, corruptBlobs: new Set(), manifestFailures: 0, missingBlobs: new Set(), corruptManifests: new Set() };
  readonly #repositories = new Map<string, Repository>();
  readonly #tokens = new Set<string>();
  readonly #registry: Server;
  readonly #cdn: Server;
  #registryPort = 0;
  #cdnPort = 0;

  private constructor(private readonly options: FakeRegistryOptions) {
    this.#registry = createServer((request, response) => this.#handleRegistry(request, response));
    this.#cdn = createServer((request, response) => this.#handleCdn(request, response));
  }

  static async start(options: FakeRegistryOptions = {}): Promise<FakeRegistry> {
    const registry = new FakeRegistry(options);
    registry.#registryPort = await listen(registry.#registry);
    registry.#cdnPort = await listen(registry.#cdn);
    return registry;
  }

  /* `127.0.0.1:<port>`: the registry part of an image reference. */
  get host(): string {
    return `127.0.0.1:${this.#registryPort}`;
  }

  get cdnHost(): string {
    return `127.0.0.1:${this.#cdnPort}`;
  }

  /*
   * Serves an image as name:tag. With `index`, the tag names an image index (OCI or Docker manifest
   * list) whose linux/amd64 entry is the image. Returns the digest the tag resolves to.
   */
  push(name: string, tag: string, image: TestImage, options: { index?: 'oci' | 'docker' } = {}): string {
    const repository = this.#repository(name);
    for (const [digest, bytes] of image.blobs) repository.blobs.set(digest, bytes);
    const manifest = image.blobs.get(image.manifestDigest);
    if (!manifest) throw new Error('the image has no manifest blob');
    repository.manifests.set(image.manifestDigest, { bytes: manifest, mediaType: image.manifestMediaType });
    if (!options.index) {
      repository.tags.set(tag, image.manifestDigest);
      return image.manifestDigest;
    }
    const index = indexOf(image, options.index);
    repository.manifests.set(index.otherManifest.digest, { bytes: index.otherManifest.bytes, mediaType: image.manifestMediaType });
    repository.manifests.set(index.digest, { bytes: index.bytes, mediaType: index.mediaType });
    repository.tags.set(tag, index.digest);
    return index.digest;
  }

  untag(name: string, tag: string): void {
    this.#repositories.get(name)?.tags.delete(tag);
  }

  /* Every Authorization header the CDN received (it must receive none). */
  cdnAuthorizations(): string[] {
    return this.requests.filter((request) => request.server === 'cdn' && request.authorization !== undefined).map((request) => request.authorization ?? '');
  }

  async close(): Promise<void> {
    await Promise.all([this.#registry, this.#cdn].map((server) => closeServer(server)));
  }

  #repository(name: string): Repository {
    let repository = this.#repositories.get(name);
    if (!repository) {
      repository = { tags: new Map(), manifests: new Map(), blobs: new Map() };
      this.#repositories.set(name, repository);
    }
    return repository;
  }

  #record(server: 'registry' | 'cdn', request: IncomingMessage): void {
    this.requests.push({
      server,
      method: request.method ?? 'GET',
      path: request.url ?? '/',
      authorization: request.headers.authorization,
      accept: request.headers.accept,
    });
  }

  #challenge(response: ServerResponse, scope: string | undefined): void {
    const realm = `http://${this.host}/token`;
    const scopePart = scope ? `,scope="${scope}"` : '';
    response.writeHead(401, {
      'content-type': 'application/json',
      'www-authenticate': `Bearer realm="${realm}",service="fake-registry"${scopePart}`,
      'docker-distribution-api-version': 'registry/2.0',
    });
    response.end(errorBody('UNAUTHORIZED', 'authentication required'));
  }

  #authorized(request: IncomingMessage): boolean {
    if (!this.options.auth) return true;
    const header = request.headers.authorization ?? '';
    return header.startsWith('Bearer ') && this.#tokens.has(header.slice('Bearer '.length));
  }

  #handleToken(request: IncomingMessage, response: ServerResponse, url: URL): void {
    const credentials = this.options.credentials;
    if (credentials) {
      const header = request.headers.authorization ?? '';
      const given = header.startsWith('Basic ') ? Buffer.from(header.slice('Basic '.length), 'base64').toString('utf8') : '';
      if (given !== `${credentials.username}:${credentials.password}`) {
        response.writeHead(401, { 'content-type': 'application/json' });
        response.end(JSON.stringify({ details: 'incorrect username or password' }));
        return;
      }
    }
    if (url.searchParams.get('service') !== 'fake-registry' || !url.searchParams.get('scope')?.endsWith(':pull')) {
      response.writeHead(400, { 'content-type': 'application/json' });
      response.end(JSON.stringify({ details: 'service and a pull scope are required' }));
      return;
    }
    const token = randomBytes(16).toString('hex');
    this.#tokens.add(token);
    response.writeHead(200, { 'content-type': 'application/json' });
    // Docker Hub sends both names; some registries only one.
    response.end(JSON.stringify({ token, access_token: token, expires_in: 300, issued_at: new Date().toISOString() }));
  }

  #handleRegistry(request: IncomingMessage, response: ServerResponse): void {
    this.#record('registry', request);
    const url = new URL(request.url ?? '/', `http://${this.host}`);
    if (url.pathname === '/token') {
      this.#handleToken(request, response, url);
      return;
    }
    if (url.pathname === '/v2/' || url.pathname === '/v2') {
      if (!this.#authorized(request)) {
        this.#challenge(response, undefined);
        return;
      }
      response.writeHead(200, { 'content-type': 'application/json', 'docker-distribution-api-version': 'registry/2.0' });
      response.end('{}');
      return;
    }
    const match = /^\/v2\/(.+)\/(manifests|blobs)\/([^/]+)$/.exec(url.pathname);
    if (!match || (request.method !== 'GET' && request.method !== 'HEAD')) {
      response.writeHead(404, { 'content-type': 'application/json' });
      response.end(errorBody('NOT_FOUND', 'no such route'));
      return;
    }
    const [, name = '', kind, reference = ''] = match;
    if (!this.#authorized(request)) {
      this.#challenge(response, `repository:${name}:pull`);
      return;
    }
    const repository = this.#repositories.get(name);
    if (!repository) {
      response.writeHead(404, { 'content-type': 'application/json' });
      response.end(errorBody('NAME_UNKNOWN', `repository name not known to registry: ${name}`));
      return;
    }
    if (kind === 'manifests') this.#handleManifest(request, response, repository, reference);
    else this.#handleBlob(response, repository, reference);
  }

  #handleManifest(request: IncomingMessage, response: ServerResponse, repository: Repository, reference: string): void {
    if (this.faults.manifestFailures > 0) {
      this.faults.manifestFailures -= 1;
      response.writeHead(503, { 'content-type': 'application/json' });
      response.end(errorBody('UNAVAILABLE', 'service unavailable'));
      return;
    }
    const digest = reference.startsWith('sha256:') ? reference : repository.tags.get(reference);
    const manifest = digest ? repository.manifests.get(digest) : undefined;
    if (!digest || !manifest) {
      response.writeHead(404, { 'content-type': 'application/json' });
      response.end(errorBody('MANIFEST_UNKNOWN', `manifest unknown: ${reference}`));
      return;
    }
    const accepted = (request.headers.accept ?? '').split(',').map((type) => type.split(';')[0]?.trim());
    if (!accepted.includes(manifest.mediaType)) {
      response.writeHead(404, { 'content-type': 'application/json' });
      response.end(errorBody('MANIFEST_UNKNOWN', `manifest of type ${manifest.mediaType} found, but the Accept header does not support it`));
      return;
    }
    const bytes = this.faults.corruptManifests.has(digest) ? Buffer.concat([manifest.bytes, Buffer.from(' ')]) : manifest.bytes;
    response.writeHead(200, { 'content-type': manifest.mediaType, 'content-length': bytes.length, 'docker-content-digest': digest });
    response.end(request.method === 'HEAD' ? undefined : bytes);
  }

  #handleBlob(response: ServerResponse, repository: Repository, digest: string): void {
    if (!repository.blobs.has(digest) || this.faults.missingBlobs.has(digest)) {
      response.writeHead(404, { 'content-type': 'application/json' });
      response.end(errorBody('BLOB_UNKNOWN', `blob unknown to registry: ${digest}`));
      return;
    }
    // Like Docker Hub: the blob lives on another origin, reached with a signed URL and no credentials.
    const name = [...this.#repositories].find(([, candidate]) => candidate === repository)?.[0] ?? '';
    response.writeHead(307, { location: `http://${this.cdnHost}/blobs/${encodeURIComponent(name)}/${digest}?signature=${randomBytes(8).toString('hex')}` });
    response.end();
  }

  #handleCdn(request: IncomingMessage, response: ServerResponse): void {
    this.#record('cdn', request);
    const url = new URL(request.url ?? '/', `http://${this.cdnHost}`);
    const match = /^\/blobs\/([^/]+)\/(sha256:[0-9a-f]{64})$/.exec(url.pathname);
    const bytes = match ? this.#repositories.get(decodeURIComponent(match[1] ?? ''))?.blobs.get(match[2] ?? '') : undefined;
    if (!match || !bytes || !url.searchParams.get('signature')) {
      response.writeHead(404, { 'content-type': 'text/plain' });
      response.end('not found');
      return;
    }
    let body = bytes;
    if (this.faults.corruptBlobs.has(match[2] ?? '')) {
      body = Buffer.from(bytes);
      body[body.length - 1] = (body[body.length - 1] ?? 0) ^ 0xff;
    }
    response.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': body.length });
    if (request.method === 'HEAD') {
      response.end();
      return;
    }
    void sendSlowly(response, body, this.faults.bytesPerSecond);
  }
}

/* Sends in chunks of a tenth of a second's worth (all at once without a limit). */
async function sendSlowly(response: ServerResponse, body: Buffer, bytesPerSecond: number): Promise<void> {
  if (bytesPerSecond <= 0) {
    response.end(body);
    return;
  }
  const chunk = Math.max(1, Math.floor(bytesPerSecond / 10));
  for (let offset = 0; offset < body.length; offset += chunk) {
    if (response.destroyed) return;
    response.write(body.subarray(offset, offset + chunk));
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  response.end();
}

function listen(server: Server): Promise<number> {
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => resolve((server.address() as AddressInfo).port));
  });
}

function closeServer(server: Server): Promise<void> {
  return new Promise((resolve) => {
    server.closeAllConnections();
    server.close(() => resolve());
  });
}
