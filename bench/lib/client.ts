import { Pool } from 'undici';
import WebSocket from 'ws';
import type { ExecutionEnvironmentSpec } from '../../src/dto/environment.js';

/*
 * A lean CodeOcean-like client for the timed path: keep-alive connections from an undici Pool and
 * raw `ws`, with no schema validation, so the figures measure the daemon rather than the checker
 * used by the e2e tests.
 */

/* The body of PUT /execution-environments/{id}: the daemon's own DTO, so the two cannot drift apart. */
export type EnvironmentSpec = ExecutionEnvironmentSpec;

export interface PoolStatistics {
  id: number;
  prewarmingPoolSize: number;
  idleRunners: number;
  usedRunners: number;
}

export interface FileCopy {
  path: string;
  content?: string;
}

export interface ExecutionOutcome {
  exitCode: number | undefined;
  timedOut: boolean;
  stdoutBytes: number;
  stderrBytes: number;
  /* `error` messages from the daemon (e.g. output cap reached). */
  errors: string[];
}

export class ApiError extends Error {
  constructor(
    readonly status: number,
    readonly errorCode: string | undefined,
    message: string,
  ) {
    super(message);
  }
}

const JSON_HEADERS = { 'content-type': 'application/json' };

export function environmentSpec(id: number, prewarmingPoolSize: number, networkAccess = false): EnvironmentSpec {
  return { id, image: 'bench', prewarmingPoolSize, cpuLimit: 2000, memoryLimit: 512, networkAccess, exposedPorts: [] };
}

export class BenchClient {
  readonly #pool: Pool;
  readonly #prefix = '/api/v1';

  constructor(origin: string, connections = 128) {
    // Enough sockets that concurrent clients never queue behind each other inside the client.
    this.#pool = new Pool(origin, { connections, pipelining: 1, keepAliveTimeout: 30_000 });
  }

  async close(): Promise<void> {
    await this.#pool.close();
  }

  async #call(method: 'GET' | 'PUT' | 'POST' | 'PATCH' | 'DELETE', path: string, body?: unknown): Promise<{ status: number; text: string }> {
    const response = await this.#pool.request({
      method,
      path: this.#prefix + path,
      headers: body === undefined ? {} : JSON_HEADERS,
      body: body === undefined ? null : JSON.stringify(body),
      headersTimeout: 60_000,
      bodyTimeout: 60_000,
    });
    // The body must always be consumed, or the keep-alive socket is never handed back to the pool.
    const text = await response.body.text();
    return { status: response.statusCode, text };
  }

  async #expect(method: 'GET' | 'PUT' | 'POST' | 'PATCH' | 'DELETE', path: string, accepted: number[], body?: unknown): Promise<string> {
    const { status, text } = await this.#call(method, path, body);
    if (!accepted.includes(status)) {
      let errorCode: string | undefined;
      try {
        const parsed = JSON.parse(text) as { errorCode?: unknown };
        if (typeof parsed.errorCode === 'string') errorCode = parsed.errorCode;
      } catch {
        // Not JSON: the status alone describes the failure.
      }
      throw new ApiError(status, errorCode, `${method} ${path} answered ${status}: ${text.slice(0, 200)}`);
    }
    return text;
  }

  async putEnvironment(spec: EnvironmentSpec): Promise<void> {
    await this.#expect('PUT', `/execution-environments/${spec.id}`, [201, 204], spec);
  }

  async deleteEnvironment(id: number): Promise<void> {
    await this.#expect('DELETE', `/execution-environments/${id}`, [204, 404]);
  }

  async statistics(): Promise<Record<string, PoolStatistics>> {
    return JSON.parse(await this.#expect('GET', '/statistics/execution-environments', [200])) as Record<string, PoolStatistics>;
  }

  async poolOf(id: number): Promise<PoolStatistics | undefined> {
    return (await this.statistics())[String(id)];
  }

  async claim(environmentId: number, inactivityTimeout = 120): Promise<string> {
    const text = await this.#expect('POST', '/runners', [200], { executionEnvironmentId: environmentId, inactivityTimeout });
    return (JSON.parse(text) as { runnerId: string }).runnerId;
  }

  async copyFiles(runnerId: string, copy: FileCopy[], deleteAll = true): Promise<void> {
    await this.#expect('PATCH', `/runners/${encodeURIComponent(runnerId)}/files`, [204], { delete: deleteAll ? ['./*'] : [], copy });
  }

  async returnRunner(runnerId: string): Promise<void> {
    await this.#expect('DELETE', `/runners/${encodeURIComponent(runnerId)}`, [204]);
  }

  async execute(runnerId: string, command: string, timeLimit = 60): Promise<string> {
    const text = await this.#expect('POST', `/runners/${encodeURIComponent(runnerId)}/execute`, [200], {
      command,
      timeLimit,
      privilegedExecution: false,
      environment: {},
    });
    return (JSON.parse(text) as { websocketUrl: string }).websocketUrl;
  }

  /* Only used for the HTTP-overhead baseline: any route, no prefix. */
  async rawGet(path: string): Promise<number> {
    const response = await this.#pool.request({ method: 'GET', path });
    await response.body.text();
    return response.statusCode;
  }

  /* Runs one command end-to-end: POST execute, connect, read until `exit`/`timeout` and close. */
  /* `stdin` is sent as one text frame once the WebSocket is open, as a learner typing a line. */
  async run(runnerId: string, command: string, options: { timeLimit?: number; guardMs?: number; stdin?: string } = {}): Promise<ExecutionOutcome> {
    const url = await this.execute(runnerId, command, options.timeLimit ?? 60);
    return readExecution(url, options.guardMs ?? 90_000, options.stdin);
  }
}

interface WsMessage {
  type: string;
  data?: unknown;
}

/*
 * Reads an execution's WebSocket to its end. Resolves on `exit`/`timeout` without waiting for the
 * server's close frame, because CodeOcean also treats `exit` as the end of a run.
 */
export function readExecution(url: string, guardMs: number, stdin?: string): Promise<ExecutionOutcome> {
  return new Promise((resolve, reject) => {
    const outcome: ExecutionOutcome = { exitCode: undefined, timedOut: false, stdoutBytes: 0, stderrBytes: 0, errors: [] };
    const socket = new WebSocket(url, { perMessageDeflate: false });
    let settled = false;
    const finish = (error?: Error): void => {
      if (settled) return;
      settled = true;
      clearTimeout(guard);
      if (error !== undefined) {
        socket.terminate();
        reject(error);
      } else {
        resolve(outcome);
      }
    };
    const guard = setTimeout(() => finish(new Error(`no exit within ${guardMs} ms on ${url}`)), guardMs);
    if (stdin !== undefined) socket.once('open', () => socket.send(stdin));
    socket.on('message', (raw: WebSocket.RawData, isBinary: boolean) => {
      if (isBinary) return;
      const message = JSON.parse(raw.toString()) as WsMessage;
      if (message.type === 'stdout' && typeof message.data === 'string') outcome.stdoutBytes += Buffer.byteLength(message.data);
      else if (message.type === 'stderr' && typeof message.data === 'string') outcome.stderrBytes += Buffer.byteLength(message.data);
      else if (message.type === 'error') outcome.errors.push(String(message.data));
      else if (message.type === 'exit') {
        outcome.exitCode = typeof message.data === 'number' ? message.data : Number(message.data);
        finish();
      } else if (message.type === 'timeout') {
        outcome.timedOut = true;
        finish();
      }
    });
    socket.on('error', (error: Error) => finish(error));
    socket.on('unexpected-response', (_request, response) => finish(new Error(`WebSocket upgrade refused with ${response.statusCode}`)));
    socket.on('close', () => finish(new Error('WebSocket closed before exit')));
  });
}
