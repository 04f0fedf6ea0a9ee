import type { IncomingMessage } from 'node:http';
import type { Logger } from 'pino';
import WebSocket from 'ws';
import { z } from 'zod';
import { NomadExecError, errorCodeOf } from './errors.js';
import type { NomadHttp } from './http.js';

export type StdinSource = AsyncIterable<Buffer | Uint8Array | string>;

export interface ExecOptions {
  /* Sent as stdin frames, then `stdin close`. Without it stdin is closed at once, so commands reading it see EOF. */
  readonly stdin?: StdinSource;
  readonly onStdout?: (chunk: Buffer) => void;
  readonly onStderr?: (chunk: Buffer) => void;
  readonly tty?: boolean;
  /* With tty: sent as `tty_size` once the session is open, as Nomad's CLI does (Docker's default is 0x0). */
  readonly ttySize?: { readonly height: number; readonly width: number };
  /* Aborting drops the session; the process may keep running in the allocation (as with Nomad itself). */
  readonly signal?: AbortSignal;
  /* Application heartbeat `{}` so that idle sessions are not cut by proxies. */
  readonly heartbeatMs?: number;
}

/* Nomad sends at most 1 KiB per output frame; we send larger stdin frames because Nomad sets no read limit. */
const stdinFrameBytes = 32 * 1024;

const outputFrameSchema = z.looseObject({
  stdout: z.looseObject({ data: z.string().optional(), close: z.boolean().optional() }).optional(),
  stderr: z.looseObject({ data: z.string().optional(), close: z.boolean().optional() }).optional(),
  exited: z.boolean().optional(),
  // Protobuf-style omitempty: exit code 0 arrives as `result: {}`.
  result: z.looseObject({ exit_code: z.number().int().optional() }).optional(),
});

/*
 * Runs `command` (argv, no shell) in a task of an allocation through Nomad's exec WebSocket and
 * resolves with the exit code. Rejects with a NomadExecError when Nomad refuses (close reason) or
 * when the session ends without an exit frame.
 */
export function execInAllocation(
  http: NomadHttp,
  logger: Logger,
  timeoutMs: number,
  allocationId: string,
  task: string,
  command: readonly string[],
  options: ExecOptions = {},
): Promise<number> {
  const url = new URL(
    http.pathWithQuery(`/v1/client/allocation/${encodeURIComponent(allocationId)}/exec`, {
      task,
      command: JSON.stringify(command),
      tty: options.tty ?? false,
    }),
    http.baseUrl,
  );
  url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';

  return new Promise<number>((resolve, reject) => {
    const headers: Record<string, string> = {};
    if (http.token !== undefined) headers['x-nomad-token'] = http.token;
    const socket = new WebSocket(url, {
      headers,
      perMessageDeflate: false,
      handshakeTimeout: timeoutMs,
      ...http.tls,
    });
    let settled = false;
    let opened = false;
    let heartbeat: NodeJS.Timeout | undefined;

    const finish = (outcome: { exitCode: number } | { error: Error }): void => {
      if (settled) return;
      settled = true;
      clearInterval(heartbeat);
      options.signal?.removeEventListener('abort', onAbort);
      // Nomad drops the TCP connection itself after the exit frame; terminating just frees our side sooner.
      socket.terminate();
      if ('exitCode' in outcome) resolve(outcome.exitCode);
      else reject(outcome.error);
    };
    const onAbort = (): void => {
      const reason: unknown = options.signal?.reason;
      finish({ error: reason instanceof Error ? reason : new Error('exec aborted') });
    };
    if (options.signal?.aborted === true) {
      onAbort();
      return;
    }
    options.signal?.addEventListener('abort', onAbort, { once: true });

    socket.on('unexpected-response', (_request, response: IncomingMessage) => {
      // Nomad 1.10 rejects malformed exec parameters (and ACL failures) before the upgrade.
      const chunks: Buffer[] = [];
      response.on('data', (chunk: Buffer) => chunks.push(chunk));
      response.on('error', () => undefined);
      response.on('end', () => {
        const text = Buffer.concat(chunks).toString('utf8').trim();
        finish({
          error: new NomadExecError('NOMAD_INTERNAL_SERVER_ERROR', `Nomad refused exec with ${response.statusCode ?? '?'}: ${text}`, {
            reason: text,
            ...(response.statusCode === undefined ? {} : { status: response.statusCode }),
          }),
        });
      });
    });

    socket.on('error', (error: Error) => {
      if (opened) {
        logger.debug({ err: error, allocationId }, 'Nomad exec socket error');
        return;
      }
      finish({
        error: new NomadExecError('NOMAD_UNREACHABLE', `Nomad is unreachable for exec: ${errorCodeOf(error) ?? error.name}: ${error.message}`, {
          cause: error,
        }),
      });
    });

    socket.on('open', () => {
      opened = true;
      heartbeat = setInterval(() => socket.send('{}'), options.heartbeatMs ?? 10_000);
      if (options.tty === true && options.ttySize !== undefined) socket.send(JSON.stringify({ tty_size: options.ttySize }));
      void pumpStdin(socket, options.stdin, () => settled).catch((error: unknown) => {
        logger.warn({ err: error, allocationId }, 'Reading exec stdin failed; closing stdin');
        if (!settled && socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify({ stdin: { close: true } }));
      });
    });

    socket.on('message', (data: WebSocket.RawData, isBinary: boolean) => {
      if (isBinary) return;
      let frame: z.infer<typeof outputFrameSchema>;
      try {
        frame = outputFrameSchema.parse(JSON.parse(rawToString(data)));
      } catch {
        logger.warn({ allocationId }, 'Nomad exec sent an unparsable frame; ignoring it');
        return;
      }
      if (frame.stdout?.data !== undefined && frame.stdout.data !== '') options.onStdout?.(Buffer.from(frame.stdout.data, 'base64'));
      if (frame.stderr?.data !== undefined && frame.stderr.data !== '') options.onStderr?.(Buffer.from(frame.stderr.data, 'base64'));
      if (frame.exited === true) finish({ exitCode: frame.result?.exit_code ?? 0 });
    });

    socket.on('close', (code: number, reasonBuffer: Buffer) => {
      const reason = reasonBuffer.toString('utf8');
      if (reason !== '' && (code === 1008 || code === 1011)) {
        const error = new NomadExecError('NOMAD_INTERNAL_SERVER_ERROR', `Nomad exec failed: ${reason}`, { code, reason });
        // A Nomad server checks the token only after the upgrade and closes with 1011 "Permission denied".
        const message = error.permissionDenied
          ? `Nomad refused the exec (${reason}): nomad.token is unknown to Nomad or lacks the alloc-exec capability in namespace ${http.namespace}`
          : error.message;
        finish({ error: new NomadExecError('NOMAD_INTERNAL_SERVER_ERROR', message, { code, reason }) });
        return;
      }
      // Known Nomad bugs end sessions with close 1000 or a bare EOF before the exit frame (#14595, #9892).
      finish({
        error: new NomadExecError(
          'NOMAD_INTERNAL_SERVER_ERROR',
          `Nomad exec session ended without an exit code (close ${code}${reason === '' ? '' : `: ${reason}`})`,
          {
            code,
            reason,
            exitUnknown: true,
          },
        ),
      });
    });
  });
}

async function pumpStdin(socket: WebSocket, stdin: StdinSource | undefined, stopped: () => boolean): Promise<void> {
  if (stdin !== undefined) {
    for await (const chunk of stdin) {
      if (stopped() || socket.readyState !== WebSocket.OPEN) return;
      const bytes = typeof chunk === 'string' ? Buffer.from(chunk) : Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength);
      for (let offset = 0; offset < bytes.length; offset += stdinFrameBytes) {
        const frame = JSON.stringify({ stdin: { data: bytes.subarray(offset, offset + stdinFrameBytes).toString('base64') } });
        // Waiting for the send callback keeps a fast producer from piling up data in ws's buffer.
        await new Promise<void>((resolve, reject) => socket.send(frame, (error) => (error ? reject(error) : resolve())));
      }
    }
  }
  if (!stopped() && socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify({ stdin: { close: true } }));
}

function rawToString(data: WebSocket.RawData): string {
  if (Array.isArray(data)) return Buffer.concat(data).toString('utf8');
  if (data instanceof ArrayBuffer) return Buffer.from(data).toString('utf8');
  return data.toString('utf8');
}
