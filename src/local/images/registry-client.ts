import { createHash } from 'node:crypto';
import { createWriteStream } from 'node:fs';
import { Transform, type TransformCallback } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { Agent, type Dispatcher, request } from 'undici';
import type { RegistryConfig } from '../../config/schema.js';
import { ImageError, type ImageErrorReason } from './image-store.js';
import {
  type Descriptor,
  DIGEST_PATTERN,
  IMAGE_MANIFEST_MEDIA_TYPES,
  type ImageManifest,
  INDEX_MEDIA_TYPES,
  imageManifestSchema,
  indexSchema,
  MANIFEST_MEDIA_TYPES,
  pickPlatform,
} from './manifest.js';
import { DOCKER_HUB, formatReference, type ImageReference } from './reference.js';

/*
 * A pull-only client of the OCI distribution API: manifests by tag or digest (Accept negotiation,
 * an index narrowed to linux/amd64), tag re-checks with HEAD, blobs streamed to a file while their
 * digest is checked, Bearer tokens from the registry's token endpoint (anonymous or with Basic
 * credentials), redirects followed without the credentials when they lead to another origin.
 */

const ACCEPT = Object.values(MANIFEST_MEDIA_TYPES).join(', ');
const MAX_REDIRECTS = 5;
const MAX_MANIFEST_BYTES = 4 * 1024 * 1024;
/* Registries that give no expires_in mean 60 s (the distribution token spec). */
const DEFAULT_TOKEN_SECONDS = 60;

export interface ResolvedImage {
  /* What the reference named at the registry: an index or a manifest (the tag's current digest). */
  topDigest: string;
  /* The linux/amd64 image manifest. */
  manifestDigest: string;
  manifestBytes: Buffer;
  manifest: ImageManifest;
}

interface Endpoint {
  /* `https://registry-1.docker.io`: where /v2/ is. */
  base: string;
  credentials: { username: string; password: string } | undefined;
  plainHttpAllowed: boolean;
}

interface Challenge {
  scheme: string;
  parameters: Map<string, string>;
}

function isLoopbackHost(host: string): boolean {
  const name = host.replace(/:[0-9]+$/, '');
  return name === 'localhost' || name === '[::1]' || /^127\.[0-9]+\.[0-9]+\.[0-9]+$/.test(name);
}

/* `Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/python:pull"` */
export function parseChallenge(header: string): Challenge | undefined {
  const match = /^\s*(\w+)\s*(.*)$/s.exec(header);
  if (!match) return undefined;
  const parameters = new Map<string, string>();
  for (const parameter of (match[2] ?? '').matchAll(/(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))/g)) {
    parameters.set((parameter[1] ?? '').toLowerCase(), (parameter[2] ?? parameter[3] ?? '').replace(/\\(.)/g, '$1'));
  }
  return { scheme: (match[1] ?? '').toLowerCase(), parameters };
}

function failure(reason: ImageErrorReason, reference: ImageReference, message: string, cause?: unknown): ImageError {
  return new ImageError(reason, formatReference(reference), `${formatReference(reference)}: ${message}`, cause === undefined ? undefined : { cause });
}

/* The registry's own words, from distribution's `{errors: [{code, message}]}` or a token endpoint's `{details}`. */
async function registryMessage(body: Dispatcher.ResponseData['body']): Promise<string> {
  const text = (await body.text().catch(() => '')).slice(0, 2000);
  try {
    const parsed = JSON.parse(text) as { errors?: Array<{ code?: string; message?: string }>; details?: string; message?: string };
    const first = parsed.errors?.[0];
    if (first) return [first.code, first.message].filter(Boolean).join(': ');
    if (parsed.details || parsed.message) return String(parsed.details ?? parsed.message);
  } catch {
    // Not JSON: the text itself, if short.
  }
  return text.trim().slice(0, 200);
}

interface Sent {
  statusCode: number;
  headers: Dispatcher.ResponseData['headers'];
  body: Dispatcher.ResponseData['body'];
}

export class RegistryClient {
  readonly #registries: ReadonlyMap<string, RegistryConfig>;
  readonly #dispatcher: Agent;
  /* `registry base|repository` -> Authorization header value and when it expires. */
  readonly #authorizations = new Map<string, { header: string; expiresAt: number }>();

  constructor(registries: Record<string, RegistryConfig>) {
    this.#registries = new Map(Object.entries(registries));
    this.#dispatcher = new Agent({ headersTimeout: 30_000, bodyTimeout: 60_000, connectTimeout: 15_000 });
  }

  async close(): Promise<void> {
    await this.#dispatcher.close();
  }

  #endpoint(reference: ImageReference): Endpoint {
    const config = this.#registries.get(reference.registry);
    const credentials = config?.username ? { username: config.username, password: config.password ?? '' } : undefined;
    if (config?.mirror) return { base: config.mirror, credentials, plainHttpAllowed: true };
    const host = reference.registry === DOCKER_HUB ? 'registry-1.docker.io' : reference.registry;
    const plain = config?.insecure === true || isLoopbackHost(host);
    return { base: `${plain ? 'http' : 'https'}://${host}`, credentials, plainHttpAllowed: plain };
  }

  /*
   * The tag's current digest from a HEAD (Docker Hub counts GETs of manifests against its rate
   * limit, HEADs not); undefined when the registry sends no Docker-Content-Digest.
   */
  async headDigest(reference: ImageReference, signal?: AbortSignal): Promise<string | undefined> {
    const response = await this.#send(reference, `manifests/${reference.digest ?? reference.tag ?? 'latest'}`, 'HEAD', { accept: ACCEPT }, signal);
    await response.body.dump();
    if (response.statusCode !== 200) throw await this.#statusFailure(reference, response, 'manifest');
    const digest = response.headers['docker-content-digest'];
    return typeof digest === 'string' && DIGEST_PATTERN.test(digest) ? digest : undefined;
  }

  /* The linux/amd64 image manifest the reference names, every document checked against its digest. */
  async resolve(reference: ImageReference, signal?: AbortSignal): Promise<ResolvedImage> {
    const top = await this.#fetchManifest(reference, reference.digest ?? reference.tag ?? 'latest', reference.digest, signal);
    if (INDEX_MEDIA_TYPES.has(top.mediaType)) {
      const index = indexSchema.safeParse(JSON.parse(top.bytes.toString('utf8')));
      if (!index.success) throw failure('invalid-image', reference, `the image index is malformed: ${index.error.issues[0]?.message ?? ''}`);
      const entry = pickPlatform(index.data.manifests);
      if (!entry) {
        const platforms = index.data.manifests.map((item) => `${item.platform?.os ?? '?'}/${item.platform?.architecture ?? '?'}`).join(', ');
        throw failure('unsupported', reference, `the image has no linux/amd64 variant (only ${platforms || 'none'})`);
      }
      const platform = await this.#fetchManifest(reference, entry.digest, entry.digest, signal);
      return { topDigest: top.digest, ...this.#imageManifest(reference, platform) };
    }
    return { topDigest: top.digest, ...this.#imageManifest(reference, top) };
  }

  #imageManifest(
    reference: ImageReference,
    document: { bytes: Buffer; mediaType: string; digest: string },
  ): { manifestDigest: string; manifestBytes: Buffer; manifest: ImageManifest } {
    if (!IMAGE_MANIFEST_MEDIA_TYPES.has(document.mediaType)) throw failure('unsupported', reference, `unsupported manifest media type ${document.mediaType}`);
    const manifest = imageManifestSchema.safeParse(JSON.parse(document.bytes.toString('utf8')));
    if (!manifest.success) throw failure('invalid-image', reference, `the image manifest is malformed: ${manifest.error.issues[0]?.message ?? ''}`);
    return { manifestDigest: document.digest, manifestBytes: document.bytes, manifest: manifest.data };
  }

  async #fetchManifest(
    reference: ImageReference,
    tagOrDigest: string,
    expectedDigest: string | undefined,
    signal: AbortSignal | undefined,
  ): Promise<{ bytes: Buffer; mediaType: string; digest: string }> {
    const response = await this.#send(reference, `manifests/${tagOrDigest}`, 'GET', { accept: ACCEPT }, signal);
    if (response.statusCode !== 200) throw await this.#statusFailure(reference, response, 'manifest');
    const chunks: Buffer[] = [];
    let size = 0;
    for await (const chunk of response.body) {
      size += (chunk as Buffer).length;
      if (size > MAX_MANIFEST_BYTES) {
        response.body.destroy();
        throw failure('invalid-image', reference, `the manifest is larger than ${MAX_MANIFEST_BYTES} bytes`);
      }
      chunks.push(chunk as Buffer);
    }
    const bytes = Buffer.concat(chunks);
    const digest = `sha256:${createHash('sha256').update(bytes).digest('hex')}`;
    const announced = response.headers['docker-content-digest'];
    for (const [what, expected] of [
      ['requested', expectedDigest],
      ['announced', typeof announced === 'string' && DIGEST_PATTERN.test(announced) ? announced : undefined],
    ] as const) {
      if (expected !== undefined && expected !== digest) {
        throw failure('digest-mismatch', reference, `the manifest ${tagOrDigest} has digest ${digest}, not the ${what} ${expected}`);
      }
    }
    let mediaType =
      String(response.headers['content-type'] ?? '')
        .split(';')[0]
        ?.trim() ?? '';
    try {
      // The document's own mediaType wins over a registry's generic Content-Type.
      const declared = (JSON.parse(bytes.toString('utf8')) as { mediaType?: unknown }).mediaType;
      if (typeof declared === 'string' && declared !== '') mediaType = declared;
      else if (!INDEX_MEDIA_TYPES.has(mediaType) && !IMAGE_MANIFEST_MEDIA_TYPES.has(mediaType)) {
        mediaType = (JSON.parse(bytes.toString('utf8')) as { manifests?: unknown }).manifests
          ? MANIFEST_MEDIA_TYPES.ociIndex
          : MANIFEST_MEDIA_TYPES.ociManifest;
      }
    } catch (error) {
      throw failure('invalid-image', reference, `the manifest ${tagOrDigest} is not JSON`, error);
    }
    return { bytes, mediaType, digest };
  }

  /*
   * Streams a blob into `file` (created, must not exist), checking size and digest as bytes
   * arrive; on any failure the caller removes the file. onBytes gets the running total.
   */
  async downloadBlob(reference: ImageReference, descriptor: Descriptor, file: string, onBytes: (total: number) => void, signal?: AbortSignal): Promise<void> {
    const response = await this.#send(reference, `blobs/${descriptor.digest}`, 'GET', {}, signal);
    if (response.statusCode !== 200) throw await this.#statusFailure(reference, response, `blob ${descriptor.digest}`);
    const hash = createHash('sha256');
    let total = 0;
    const check = new Transform({
      transform(chunk: Buffer, _encoding, callback: TransformCallback) {
        total += chunk.length;
        if (total > descriptor.size) {
          callback(failure('digest-mismatch', reference, `blob ${descriptor.digest} is longer than the ${descriptor.size} bytes its manifest says`));
          return;
        }
        hash.update(chunk);
        onBytes(total);
        callback(null, chunk);
      },
    });
    try {
      await pipeline(response.body, check, createWriteStream(file, { flags: 'wx', mode: 0o600 }), { signal });
    } catch (error) {
      if (error instanceof ImageError) throw error;
      if (signal?.aborted) throw error;
      throw failure('registry-unavailable', reference, `downloading blob ${descriptor.digest} failed: ${(error as Error).message}`, error);
    }
    const digest = `sha256:${hash.digest('hex')}`;
    if (total !== descriptor.size || digest !== descriptor.digest) {
      throw failure(
        'digest-mismatch',
        reference,
        `blob ${descriptor.digest} arrived as ${total} bytes with digest ${digest} (expected ${descriptor.size} bytes)`,
      );
    }
  }

  async #statusFailure(reference: ImageReference, response: Sent, what: string): Promise<ImageError> {
    const message = await registryMessage(response.body);
    const detail = `${what}: the registry answered ${response.statusCode}${message ? ` (${message})` : ''}`;
    if (response.statusCode === 404) return failure('not-found', reference, `not found at the registry: ${detail}`);
    if (response.statusCode === 401 || response.statusCode === 403) {
      return failure('access-denied', reference, `access denied (a private image needs credentials in local.registries, or it does not exist): ${detail}`);
    }
    if (response.statusCode === 429 || response.statusCode >= 500) return failure('registry-unavailable', reference, `the registry is unavailable: ${detail}`);
    return failure('invalid-image', reference, `unexpected answer: ${detail}`);
  }

  /* A request under /v2/<repository>/, authorising on the registry's challenge, following redirects. */
  async #send(reference: ImageReference, path: string, method: 'GET' | 'HEAD', headers: Record<string, string>, signal?: AbortSignal): Promise<Sent> {
    const endpoint = this.#endpoint(reference);
    const url = `${endpoint.base}/v2/${reference.repository}/${path}`;
    const key = `${endpoint.base}|${reference.repository}`;
    const cached = this.#authorizations.get(key);
    const authorization = cached && cached.expiresAt > Date.now() ? cached.header : undefined;
    let response = await this.#follow(reference, url, method, headers, authorization, signal);
    if (response.statusCode !== 401) return response;
    const challengeHeader = response.headers['www-authenticate'];
    await response.body.dump();
    const challenge = parseChallenge(Array.isArray(challengeHeader) ? (challengeHeader[0] ?? '') : (challengeHeader ?? ''));
    const fresh = await this.#authorize(reference, endpoint, challenge, signal);
    if (fresh === undefined) return response;
    this.#authorizations.set(key, fresh);
    response = await this.#follow(reference, url, method, headers, fresh.header, signal);
    return response;
  }

  async #authorize(
    reference: ImageReference,
    endpoint: Endpoint,
    challenge: Challenge | undefined,
    signal: AbortSignal | undefined,
  ): Promise<{ header: string; expiresAt: number } | undefined> {
    const basic = endpoint.credentials
      ? `Basic ${Buffer.from(`${endpoint.credentials.username}:${endpoint.credentials.password}`).toString('base64')}`
      : undefined;
    if (challenge?.scheme === 'basic') return basic ? { header: basic, expiresAt: Number.POSITIVE_INFINITY } : undefined;
    if (challenge?.scheme !== 'bearer') return undefined;
    const realm = challenge.parameters.get('realm');
    if (!realm) throw failure('registry-unavailable', reference, 'the registry asked for a token but named no realm to get it from');
    let tokenUrl: URL;
    try {
      tokenUrl = new URL(realm);
    } catch (error) {
      throw failure('registry-unavailable', reference, `the registry's token realm ${realm} is not a URL`, error);
    }
    const service = challenge.parameters.get('service');
    if (service) tokenUrl.searchParams.set('service', service);
    tokenUrl.searchParams.set('scope', `repository:${reference.repository}:pull`);
    // Credentials travel only encrypted, or to loopback and hosts configured as insecure.
    const mayCarryCredentials = tokenUrl.protocol === 'https:' || (endpoint.plainHttpAllowed && tokenUrl.host === new URL(endpoint.base).host);
    let response: Dispatcher.ResponseData;
    try {
      response = await request(tokenUrl, {
        method: 'GET',
        headers: basic && mayCarryCredentials ? { authorization: basic } : {},
        dispatcher: this.#dispatcher,
        signal,
      });
    } catch (error) {
      if (signal?.aborted) throw error;
      throw failure('registry-unavailable', reference, `cannot reach the token endpoint ${tokenUrl.origin}: ${(error as Error).message}`, error);
    }
    if (response.statusCode !== 200) {
      const message = await registryMessage(response.body);
      const reason = response.statusCode === 401 || response.statusCode === 403 ? 'access-denied' : 'registry-unavailable';
      throw failure(reason, reference, `the token endpoint refused a pull token (${response.statusCode}${message ? `: ${message}` : ''})`);
    }
    const body = (await response.body.json().catch(() => ({}))) as { token?: unknown; access_token?: unknown; expires_in?: unknown };
    const token = typeof body.token === 'string' && body.token !== '' ? body.token : typeof body.access_token === 'string' ? body.access_token : '';
    if (token === '') throw failure('registry-unavailable', reference, 'the token endpoint answered without a token');
    const seconds = typeof body.expires_in === 'number' && body.expires_in > 0 ? body.expires_in : DEFAULT_TOKEN_SECONDS;
    // Renewed a little early, so that a token does not expire between check and use.
    return { header: `Bearer ${token}`, expiresAt: Date.now() + Math.max(1, seconds - 10) * 1000 };
  }

  /* One request and its redirects; Authorization only ever goes to the origin it was made for. */
  async #follow(
    reference: ImageReference,
    url: string,
    method: 'GET' | 'HEAD',
    headers: Record<string, string>,
    authorization: string | undefined,
    signal: AbortSignal | undefined,
  ): Promise<Sent> {
    const origin = new URL(url).origin;
    let current = new URL(url);
    for (let hop = 0; ; hop += 1) {
      const sendAuthorization = authorization !== undefined && current.origin === origin;
      let response: Dispatcher.ResponseData;
      try {
        response = await request(current, {
          method,
          headers: { ...headers, ...(sendAuthorization ? { authorization } : {}) },
          dispatcher: this.#dispatcher,
          signal,
        });
      } catch (error) {
        if (signal?.aborted) throw error;
        throw failure('registry-unavailable', reference, `cannot reach ${current.origin}: ${(error as Error).message}`, error);
      }
      const location = response.headers.location;
      if (![301, 302, 303, 307, 308].includes(response.statusCode) || typeof location !== 'string') return response;
      await response.body.dump();
      if (hop >= MAX_REDIRECTS) throw failure('registry-unavailable', reference, `more than ${MAX_REDIRECTS} redirects from ${url}`);
      const next = new URL(location, current);
      if (next.protocol !== 'https:' && next.protocol !== 'http:')
        throw failure('registry-unavailable', reference, `redirect to an unsupported URL ${next.protocol}`);
      current = next;
    }
  }
}
