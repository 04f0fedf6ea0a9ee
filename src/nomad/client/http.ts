import type { Dispatcher } from 'undici';
import { readFileSync } from 'node:fs';
import type { Readable } from 'node:stream';
import { setTimeout as sleep } from 'node:timers/promises';
import type { Logger } from 'pino';
import { Pool } from 'undici';
import type { z } from 'zod';
import type { NomadConfig } from '../../config/schema.js';
import { type NomadConnectionKind, nomadEndpoint, secondsSince } from '../../monitoring/metrics.js';
import { NomadError, unreachable } from './errors.js';
import { ConnectionLimiter } from './limiter.js';

export type QueryValue = string | number | boolean | readonly string[] | undefined;
export type Query = Readonly<Record<string, QueryValue>>;

export interface RetryPolicy {
  /* Extra attempts after the first one, only for idempotent calls. */
  readonly retries: number;
  readonly baseDelayMs: number;
  readonly maxDelayMs: number;
}

/* Told about every single HTTP attempt (latency and failure), for metrics; ids are stripped from the path first. */
export type CallObserver = (method: string, endpoint: string, seconds: number, error?: { errorCode?: string }) => void;

/* Told the connections in use and the callers queued for one, by kind, after every change. */
export type ConnectionObserver = (kind: NomadConnectionKind, inUse: number, queued: number) => void;

export const defaultRetryPolicy: RetryPolicy = { retries: 3, baseDelayMs: 100, maxDelayMs: 2_000 };

export interface TlsMaterial {
  readonly ca?: Buffer;
  readonly cert?: Buffer;
  readonly key?: Buffer;
}

interface CallOptions<S extends z.ZodType> {
  readonly query?: Query;
  readonly body?: unknown;
  readonly schema: S;
  /* A 404 means "gone" for reads of single objects; the caller gets undefined instead of an error. */
  readonly notFoundIsUndefined?: boolean;
  /* Safe to repeat: reads, and purging deregistrations (Nomad answers 200 for a missing job). */
  readonly idempotent?: boolean;
}

export interface StreamResponse {
  readonly body: Readable;
}

/*
 * How nomad.maxconnections is shared: a quarter (at least 2) for the HTTP pool, one of which the
 * event stream keeps, the rest for exec sessions, which each hold a connection of their own.
 */
export function connectionShares(maxConnections: number): { pool: number; calls: number; execs: number } {
  const pool = Math.max(2, Math.round(maxConnections / 4));
  return { pool, calls: pool - 1, execs: maxConnections - pool };
}

/*
 * The HTTP side of the Nomad client: one undici Pool per Nomad address (keep-alive connection
 * reuse) with a bounded number of connections, the token header and namespace parameter on every
 * call, per-call timeouts, and retries with exponential backoff for idempotent calls and for
 * Nomad's 429 (connection limit).
 */
export class NomadHttp {
  readonly baseUrl: URL;
  readonly tls: TlsMaterial;
  readonly token: string | undefined;
  readonly namespace: string;
  private readonly pool: Pool;
  private readonly calls: ConnectionLimiter;
  /* Exec sessions are WebSockets outside the pool; ExecutorApi.exec holds one of these per session. */
  readonly execs: ConnectionLimiter;
  private readonly timeoutMs: number;
  private closed = false;

  constructor(
    config: NomadConfig,
    private readonly logger: Logger,
    private readonly retry: RetryPolicy = defaultRetryPolicy,
    private readonly onCall: CallObserver = () => undefined,
    onConnections: ConnectionObserver = () => undefined,
  ) {
    const scheme = config.tls.active ? 'https' : 'http';
    const host = config.address.includes(':') && !config.address.startsWith('[') ? `[${config.address}]` : config.address;
    this.baseUrl = new URL(`${scheme}://${host}:${config.port}`);
    this.tls = config.tls.active ? readTlsMaterial(config.tls) : {};
    this.token = config.token;
    this.namespace = config.namespace;
    this.timeoutMs = config.requesttimeout;
    const shares = connectionShares(config.maxconnections);
    this.calls = new ConnectionLimiter('HTTP calls', shares.calls, config.maxqueued, this.timeoutMs, (inUse, queued) => onConnections('http', inUse, queued));
    this.execs = new ConnectionLimiter('exec sessions', shares.execs, config.maxqueued, this.timeoutMs, (inUse, queued) =>
      onConnections('exec', inUse, queued),
    );
    this.pool = new Pool(this.baseUrl.origin, {
      connections: shares.pool,
      connect: { ...this.tls, timeout: this.timeoutMs },
      headersTimeout: this.timeoutMs,
      bodyTimeout: this.timeoutMs,
      keepAliveTimeout: 30_000,
    });
  }

  headers(): Record<string, string> {
    // No Accept-Encoding: Nomad would gzip and undici's request() does not decompress.
    const headers: Record<string, string> = { accept: 'application/json' };
    if (this.token !== undefined) headers['x-nomad-token'] = this.token;
    return headers;
  }

  pathWithQuery(path: string, query: Query = {}): string {
    const params = new URLSearchParams();
    for (const [key, value] of Object.entries(query)) {
      if (value === undefined) continue;
      if (Array.isArray(value)) for (const item of value) params.append(key, item);
      else params.append(key, String(value));
    }
    params.set('namespace', this.namespace);
    return `${path}?${params.toString()}`;
  }

  async call<S extends z.ZodType>(
    method: 'GET' | 'POST' | 'PUT' | 'DELETE',
    path: string,
    options: CallOptions<S> & { notFoundIsUndefined: true },
  ): Promise<z.infer<S> | undefined>;
  async call<S extends z.ZodType>(method: 'GET' | 'POST' | 'PUT' | 'DELETE', path: string, options: CallOptions<S>): Promise<z.infer<S>>;
  async call<S extends z.ZodType>(method: 'GET' | 'POST' | 'PUT' | 'DELETE', path: string, options: CallOptions<S>): Promise<z.infer<S> | undefined> {
    for (let attempt = 1; ; attempt++) {
      const started = process.hrtime.bigint();
      try {
        const result = await this.calls.run(() => this.callOnce(method, path, options));
        this.onCall(method, nomadEndpoint(path), secondsSince(started));
        return result;
      } catch (error) {
        this.onCall(method, nomadEndpoint(path), secondsSince(started), { errorCode: error instanceof NomadError ? error.errorCode : undefined });
        if (!(error instanceof NomadError) || !error.retryable || this.closed) throw error;
        const attempts = options.idempotent === true || error.tooManyConnections ? this.attempts : 1;
        if (attempt >= attempts) throw error;
        const delay = this.backoff(attempt);
        this.logger.warn({ err: error, attempt, delay }, 'Nomad call failed, retrying');
        await sleep(delay);
      }
    }
  }

  /* Attempts a call or exec may make for a retryable failure, and the jittered delay before attempt + 1. */
  get attempts(): number {
    return this.retry.retries + 1;
  }

  backoff(attempt: number): number {
    return Math.min(this.retry.maxDelayMs, this.retry.baseDelayMs * 2 ** (attempt - 1)) * (0.75 + Math.random() * 0.5);
  }

  private async callOnce<S extends z.ZodType>(method: string, path: string, options: CallOptions<S>): Promise<z.infer<S> | undefined> {
    const operation = `${method} ${path}`;
    let response: Dispatcher.ResponseData;
    try {
      response = await this.pool.request({
        method,
        path: this.pathWithQuery(path, options.query),
        headers: options.body === undefined ? this.headers() : { ...this.headers(), 'content-type': 'application/json' },
        body: options.body === undefined ? undefined : JSON.stringify(options.body),
        signal: AbortSignal.timeout(this.timeoutMs),
      });
    } catch (error) {
      throw unreachable(operation, error);
    }
    let text: string;
    try {
      text = await response.body.text();
    } catch (error) {
      throw unreachable(operation, error);
    }
    const status = response.statusCode;
    if (status === 404 && options.notFoundIsUndefined === true) return undefined;
    if (status < 200 || status >= 300) {
      throw new NomadError('NOMAD_INTERNAL_SERVER_ERROR', `Nomad answered ${status} to ${operation}: ${text.trim() || '(empty body)'}`, {
        status,
        operation,
      });
    }
    let json: unknown;
    try {
      json = JSON.parse(text);
    } catch (error) {
      throw new NomadError('NOMAD_INTERNAL_SERVER_ERROR', `Nomad sent invalid JSON to ${operation}`, { status, operation, cause: error });
    }
    const parsed = options.schema.safeParse(json);
    if (!parsed.success) {
      const issues = parsed.error.issues
        .slice(0, 3)
        .map((issue) => `${issue.path.join('.')}: ${issue.message}`)
        .join('; ');
      throw new NomadError('NOMAD_INTERNAL_SERVER_ERROR', `Nomad's answer to ${operation} has an unexpected shape: ${issues}`, {
        status,
        operation,
        cause: parsed.error,
      });
    }
    return parsed.data;
  }

  /*
   * Opens a long-lived streaming GET (the event stream). `idleTimeoutMs` is undici's bodyTimeout,
   * which restarts on every chunk and so works as a watchdog for a silently dead connection.
   */
  async stream(path: string, query: Query, idleTimeoutMs: number, signal: AbortSignal): Promise<StreamResponse> {
    const operation = `GET ${path}`;
    let response: Dispatcher.ResponseData;
    try {
      response = await this.pool.request({
        method: 'GET',
        path: this.pathWithQuery(path, query),
        headers: this.headers(),
        headersTimeout: this.timeoutMs,
        bodyTimeout: idleTimeoutMs,
        signal,
      });
    } catch (error) {
      throw unreachable(operation, error);
    }
    if (response.statusCode !== 200) {
      const text = await response.body.text().catch(() => '');
      throw new NomadError('NOMAD_INTERNAL_SERVER_ERROR', `Nomad answered ${response.statusCode} to ${operation}: ${text.trim()}`, {
        status: response.statusCode,
        operation,
      });
    }
    return { body: response.body };
  }

  async close(): Promise<void> {
    this.closed = true;
    await this.pool.destroy();
  }
}

function readTlsMaterial(tls: NomadConfig['tls']): TlsMaterial {
  // Read once at start: a missing file is a configuration error better reported immediately.
  return {
    ...(tls.cafile === undefined ? {} : { ca: readFileSync(tls.cafile) }),
    ...(tls.certfile === undefined ? {} : { cert: readFileSync(tls.certfile) }),
    ...(tls.keyfile === undefined ? {} : { key: readFileSync(tls.keyfile) }),
  };
}
