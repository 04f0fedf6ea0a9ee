import assert from 'node:assert/strict';
import { posix } from 'node:path';
import WebSocket from 'ws';
import { assertMatchesSwagger, assertRequestMatchesSwagger, assertWebSocketMessage, type HttpMethod, type Json, type WsMessage } from './contract.js';
import type { ExecutionEnvironmentSpec } from '../../src/dto/environment.js';

/*
 * Mirrors CodeOcean's Runner::Strategy::Poseidon (see codeocean-contract.md): the same default
 * headers on every request, the same body shapes, and every answer checked against the swagger.
 * Tests that need to misbehave on purpose use `request` with `validate: false`.
 */

export interface ApiResponse {
  status: number;
  headers: Headers;
  /** Parsed JSON when the body parses, otherwise undefined. */
  body: Json | undefined;
  text: string;
  raw: Buffer;
}

export interface RequestOptions {
  query?: Record<string, string>;
  /** Serialised as JSON. */
  body?: Json;
  /** Sent verbatim instead of `body` (malformed JSON, huge bodies). */
  rawBody?: string;
  /** Replaces or, with value null, removes default headers. */
  headers?: Record<string, string | null>;
  /** Validate the answer against the swagger (default true). */
  validate?: boolean;
}

/* The body of PUT /execution-environments/{id}: the daemon's own DTO, so the two cannot drift apart. */
export type EnvironmentSpec = ExecutionEnvironmentSpec;

export interface FileListEntry {
  name: string;
  entryType?: string;
  size: number;
  modificationTime: number;
  owner?: string;
  group?: string;
  permissions?: string;
  linkTarget?: string;
}

export interface ExecutionResult {
  messages: WsMessage[];
  stdout: string;
  stderr: string;
  /** `data` of every `error` message. */
  errors: string[];
  exitCode: number | undefined;
  gotTimeout: boolean;
  /** True when `exit` or `timeout` arrived before the server closed the socket. */
  terminalBeforeClose: boolean;
  /** True when the server (not our guard timer) closed the connection. */
  closedByServer: boolean;
  closeCode: number | undefined;
  /** Messages that failed the WebSocket schema, as raw text. */
  invalidMessages: string[];
  /** Set when the upgrade was refused; the HTTP status of that refusal. */
  upgradeStatus: number | undefined;
}

export interface WebSocketOptions {
  /** Text frames sent once the socket is open, each verbatim (CodeOcean appends `\n` itself). */
  stdin?: string[];
  /** Guard against a daemon that never closes; the socket is terminated afterwards. */
  guardMs?: number;
  /** Called for every valid message, e.g. to send stdin after a prompt appeared. */
  onMessage?: (message: WsMessage, socket: WebSocket) => void;
  headers?: Record<string, string>;
}

export const DEFAULT_IMAGE = 'openhpi/co_execenv_python:3.8';

export function environmentSpec(id: number, overrides: Partial<EnvironmentSpec> = {}): EnvironmentSpec {
  return {
    id,
    image: DEFAULT_IMAGE,
    prewarmingPoolSize: 1,
    cpuLimit: 20,
    memoryLimit: 256,
    networkAccess: false,
    exposedPorts: [],
    ...overrides,
  };
}

function parseJson(text: string): Json | undefined {
  if (text.length === 0) return undefined;
  try {
    return JSON.parse(text) as Json;
  } catch {
    return undefined;
  }
}

export class CodeOceanClient {
  constructor(
    readonly baseUrl: string,
    readonly token: string | undefined,
  ) {}

  /** The headers Faraday sends on every request, GET and DELETE included. */
  defaultHeaders(): Record<string, string> {
    const headers: Record<string, string> = { 'Content-Type': 'application/json' };
    // CodeOcean sends the header even when its token is blank; an empty value is what it would send.
    headers['Poseidon-Token'] = this.token ?? '';
    return headers;
  }

  async request(method: HttpMethod, pathTemplate: string, params: Record<string, string> = {}, options: RequestOptions = {}): Promise<ApiResponse> {
    let path = pathTemplate;
    for (const [name, value] of Object.entries(params)) path = path.replace(`{${name}}`, encodeURIComponent(value));
    assert.ok(!path.includes('{'), `unfilled path parameter in ${path}`);
    const url = new URL(this.baseUrl + path);
    for (const [key, value] of Object.entries(options.query ?? {})) url.searchParams.set(key, value);

    const headers: Record<string, string> = this.defaultHeaders();
    for (const [key, value] of Object.entries(options.headers ?? {})) {
      if (value === null) delete headers[key];
      else headers[key] = value;
    }
    let body: string | undefined;
    if (options.rawBody !== undefined) body = options.rawBody;
    else if (options.body !== undefined) body = JSON.stringify(options.body);

    const response = await fetch(url, { method, headers, body, signal: AbortSignal.timeout(60_000) });
    const raw = Buffer.from(await response.arrayBuffer());
    const text = raw.toString('utf8');
    const result: ApiResponse = { status: response.status, headers: response.headers, body: parseJson(text), text, raw };
    if (options.validate !== false) {
      const contentType = response.headers.get('content-type');
      // A JSON content type with an unparsable body is exactly CodeOcean's UnexpectedResponse.
      if (contentType?.includes('application/json') === true && text.length > 0) {
        assert.ok(result.body !== undefined, `${method} ${path} answered ${response.status} with a JSON content type but unparsable body: ${text}`);
      }
      assertMatchesSwagger(method, pathTemplate, response.status, result.body, contentType);
    }
    return result;
  }

  private async send(method: HttpMethod, pathTemplate: string, params: Record<string, string>, body: Json, options: RequestOptions = {}): Promise<ApiResponse> {
    assertRequestMatchesSwagger(method, pathTemplate, body);
    return this.request(method, pathTemplate, params, { ...options, body });
  }

  health(): Promise<ApiResponse> {
    return this.request('GET', '/health');
  }

  version(): Promise<ApiResponse> {
    return this.request('GET', '/version');
  }

  statistics(): Promise<ApiResponse> {
    return this.request('GET', '/statistics/execution-environments');
  }

  listEnvironments(): Promise<ApiResponse> {
    return this.request('GET', '/execution-environments');
  }

  getEnvironment(id: number): Promise<ApiResponse> {
    return this.request('GET', '/execution-environments/{executionEnvironmentId}', { executionEnvironmentId: String(id) });
  }

  /** CodeOcean's body includes `id` although it is also in the path. */
  putEnvironment(spec: EnvironmentSpec): Promise<ApiResponse> {
    return this.send('PUT', '/execution-environments/{executionEnvironmentId}', { executionEnvironmentId: String(spec.id) }, { ...spec });
  }

  deleteEnvironment(id: number): Promise<ApiResponse> {
    return this.request('DELETE', '/execution-environments/{executionEnvironmentId}', { executionEnvironmentId: String(id) });
  }

  claimRunner(executionEnvironmentId: number, inactivityTimeout = 180): Promise<ApiResponse> {
    return this.send('POST', '/runners', {}, { executionEnvironmentId, inactivityTimeout });
  }

  /**
   * Claims and insists on success, returning the runner id. Like CodeOcean's environment
   * validation (up to 60 attempts 1 s apart), it retries while the pool reports NOMAD_OVERLOAD,
   * because a freshly created pool is allowed to be empty for a moment.
   */
  async claim(executionEnvironmentId: number, inactivityTimeout = 180, patienceMs = 30_000): Promise<string> {
    const deadline = Date.now() + patienceMs;
    let response = await this.claimRunner(executionEnvironmentId, inactivityTimeout);
    while (response.status === 500 && isOverload(response.body) && Date.now() < deadline) {
      await new Promise((resolve) => setTimeout(resolve, 250));
      response = await this.claimRunner(executionEnvironmentId, inactivityTimeout);
    }
    assert.equal(response.status, 200, `POST /runners failed: ${response.status} ${response.text}`);
    const body = response.body;
    assert.ok(typeof body === 'object' && body !== null && !Array.isArray(body));
    const runnerId = body.runnerId;
    assert.ok(typeof runnerId === 'string' && runnerId.length > 0, `empty runnerId in ${response.text}`);
    return runnerId;
  }

  deleteRunner(runnerId: string): Promise<ApiResponse> {
    return this.request('DELETE', '/runners/{runnerId}', { runnerId });
  }

  /**
   * What CodeOcean sends before every run: one `{path: "dir/"}` per distinct directory, then every
   * file base64-encoded, with `delete: ["./*"]` to clean the workspace first.
   */
  copySubmission(runnerId: string, files: Record<string, string | Buffer>, deletePaths: string[] = ['./*']): Promise<ApiResponse> {
    const directories = new Set<string>();
    for (const path of Object.keys(files)) {
      const dir = posix.dirname(path);
      if (dir !== '.' && dir !== '') directories.add(`${dir}/`);
    }
    const copy: Json[] = [...directories].map((path) => ({ path }));
    for (const [path, content] of Object.entries(files)) {
      copy.push({ path, content: Buffer.from(content).toString('base64') });
    }
    return this.patchFiles(runnerId, { copy, delete: deletePaths });
  }

  patchFiles(runnerId: string, body: Json): Promise<ApiResponse> {
    return this.send('PATCH', '/runners/{runnerId}/files', { runnerId }, body);
  }

  listFiles(runnerId: string, options: { path?: string; recursive?: boolean; privilegedExecution?: boolean } = {}): Promise<ApiResponse> {
    return this.request(
      'GET',
      '/runners/{runnerId}/files',
      { runnerId },
      {
        query: {
          path: options.path ?? './',
          recursive: String(options.recursive ?? true),
          privilegedExecution: String(options.privilegedExecution ?? false),
        },
      },
    );
  }

  downloadRaw(runnerId: string, path: string, privilegedExecution = false): Promise<ApiResponse> {
    return this.request(
      'GET',
      '/runners/{runnerId}/files/raw',
      { runnerId },
      {
        query: { path, privilegedExecution: String(privilegedExecution) },
      },
    );
  }

  /** CodeOcean never sends `environment`. */
  execute(runnerId: string, command: string, timeLimit = 10, privilegedExecution = false): Promise<ApiResponse> {
    return this.send('POST', '/runners/{runnerId}/execute', { runnerId }, { command, timeLimit, privilegedExecution });
  }

  async websocketUrl(runnerId: string, command: string, timeLimit = 10, privilegedExecution = false): Promise<string> {
    const response = await this.execute(runnerId, command, timeLimit, privilegedExecution);
    assert.equal(response.status, 200, `POST execute failed: ${response.status} ${response.text}`);
    const body = response.body;
    assert.ok(typeof body === 'object' && body !== null && !Array.isArray(body));
    const url = body.websocketUrl;
    assert.ok(typeof url === 'string' && url.length > 0, `empty websocketUrl in ${response.text}`);
    return url;
  }

  /** Connects to the URL verbatim, as CodeOcean does, and collects the whole stream. */
  connect(websocketUrl: string, options: WebSocketOptions = {}): Promise<ExecutionResult> {
    const result: ExecutionResult = {
      messages: [],
      stdout: '',
      stderr: '',
      errors: [],
      exitCode: undefined,
      gotTimeout: false,
      terminalBeforeClose: false,
      closedByServer: false,
      closeCode: undefined,
      invalidMessages: [],
      upgradeStatus: undefined,
    };
    return new Promise((resolveResult) => {
      const headers: Record<string, string> = { 'Poseidon-Token': this.token ?? '', ...options.headers };
      const socket = new WebSocket(websocketUrl, { headers });
      let settled = false;
      const finish = (): void => {
        if (settled) return;
        settled = true;
        clearTimeout(guard);
        resolveResult(result);
      };
      const guard = setTimeout(() => {
        socket.terminate();
        finish();
      }, options.guardMs ?? 30_000);
      socket.on('unexpected-response', (_request, response) => {
        result.upgradeStatus = response.statusCode;
        response.resume();
        socket.terminate();
        finish();
      });
      socket.on('open', () => {
        for (const frame of options.stdin ?? []) socket.send(frame, { binary: false });
      });
      socket.on('message', (data, isBinary) => {
        const text = Buffer.isBuffer(data) ? data.toString('utf8') : Buffer.from(data as ArrayBuffer).toString('utf8');
        let parsed: Json;
        try {
          parsed = JSON.parse(text) as Json;
          assert.ok(!isBinary, 'binary frame');
          assertWebSocketMessage(parsed);
        } catch {
          result.invalidMessages.push(text);
          return;
        }
        const message: WsMessage = parsed;
        result.messages.push(message);
        switch (message.type) {
          case 'stdout':
            result.stdout += message.data;
            break;
          case 'stderr':
            result.stderr += message.data;
            break;
          case 'error':
            result.errors.push(message.data);
            break;
          case 'exit':
            result.exitCode = message.data;
            result.terminalBeforeClose = true;
            break;
          case 'timeout':
            result.gotTimeout = true;
            result.terminalBeforeClose = true;
            break;
          case 'start':
            break;
        }
        options.onMessage?.(message, socket);
      });
      socket.on('close', (code) => {
        result.closeCode = code;
        if (!settled) result.closedByServer = true;
        finish();
      });
      socket.on('error', () => {
        // 'close' follows and settles; a refused upgrade is recorded in 'unexpected-response'.
        setTimeout(finish, 50);
      });
    });
  }

  /** execute + connect, asserting the schema and the exit/timeout-before-close rule. */
  async run(
    runnerId: string,
    command: string,
    options: WebSocketOptions & { timeLimit?: number; privilegedExecution?: boolean } = {},
  ): Promise<ExecutionResult> {
    const url = await this.websocketUrl(runnerId, command, options.timeLimit ?? 10, options.privilegedExecution ?? false);
    const result = await this.connect(url, options);
    assertStreamIsWellFormed(result, command);
    return result;
  }
}

function isOverload(body: Json | undefined): boolean {
  return typeof body === 'object' && body !== null && !Array.isArray(body) && body.errorCode === 'NOMAD_OVERLOAD';
}

export function assertStreamIsWellFormed(result: ExecutionResult, what: string): void {
  assert.equal(result.upgradeStatus, undefined, `${what}: WebSocket upgrade refused with ${String(result.upgradeStatus)}`);
  assert.deepEqual(result.invalidMessages, [], `${what}: messages violating the WebSocket schema`);
  assert.ok(result.closedByServer, `${what}: the server did not close the socket within the guard time; got ${JSON.stringify(result.messages)}`);
  assert.ok(result.terminalBeforeClose, `${what}: server closed without exit/timeout; got ${JSON.stringify(result.messages)}`);
}

export function fileEntries(response: ApiResponse): FileListEntry[] {
  const body = response.body;
  assert.ok(typeof body === 'object' && body !== null && !Array.isArray(body), `file listing is not an object: ${response.text}`);
  const files = body.files;
  assert.ok(Array.isArray(files), `file listing has no files array: ${response.text}`);
  // Shape already validated by the swagger (plus owner/group/permissions), so the cast is sound.
  return files as unknown as FileListEntry[];
}
