import { StringDecoder } from 'node:string_decoder';
import type { FastifyBaseLogger } from 'fastify';
import type { WebSocket } from 'ws';
import type { ExecutionRequest } from '../dto/runner.js';
import type { WebSocketMessage } from '../dto/websocket.js';
import type { ExecutionProcess, Runner } from '../runner/runner.js';

export interface SessionOptions {
  maxOutputBytes: number;
  logger: FastifyBaseLogger;
}

/* Output is paused above the high mark of unsent WebSocket data and resumed below the low one. */
const HIGH_WATER_BYTES = 8 * 1024 * 1024;
const LOW_WATER_BYTES = 1024 * 1024;

/*
 * One execution streamed over one WebSocket, with Poseidon's guarantees: `start` first, then
 * output, and always `exit` or `timeout` before the server closes; the time limit is ours to
 * enforce, and a client that leaves ends the execution.
 */
export async function runExecutionSession(socket: WebSocket, runner: Runner, request: ExecutionRequest, options: SessionOptions): Promise<void> {
  const logger = options.logger;
  const started = Date.now();
  let outputBytes = 0;
  let outputLimitReported = false;
  let paused = false;
  let finished = false;
  let execution: ExecutionProcess | undefined;

  const send = (message: WebSocketMessage): void => {
    if (socket.readyState !== socket.OPEN) return;
    socket.send(JSON.stringify(message), () => {
      if (paused && socket.bufferedAmount < LOW_WATER_BYTES) {
        paused = false;
        execution?.resumeOutput();
      }
    });
    if (!paused && socket.bufferedAmount > HIGH_WATER_BYTES) {
      paused = true;
      execution?.pauseOutput();
    }
  };
  const close = (): void => {
    finished = true;
    if (socket.readyState === socket.OPEN) socket.close(1000);
  };

  const forward = (type: 'stdout' | 'stderr') => {
    const decoder = new StringDecoder('utf8');
    return {
      write(chunk: Buffer): void {
        if (finished) return;
        outputBytes += chunk.length;
        if (outputBytes > options.maxOutputBytes) {
          if (!outputLimitReported) {
            outputLimitReported = true;
            send({ type: 'error', data: `output limit of ${options.maxOutputBytes} bytes exceeded: further output is dropped` });
          }
          return;
        }
        const data = decoder.write(chunk);
        if (data) send({ type, data });
      },
      flush(): void {
        const data = decoder.end();
        if (data && !finished) send({ type, data });
      },
    };
  };
  const stdout = forward('stdout');
  const stderr = forward('stderr');

  runner.beginExecution();
  send({ type: 'start' });
  try {
    execution = await runner.execute(request, { onStdout: stdout.write, onStderr: stderr.write });
  } catch (error) {
    logger.error({ err: error }, 'execution could not start');
    send({ type: 'error', data: `the execution could not start: ${(error as Error).message}` });
    runner.endExecution();
    close();
    return;
  }
  const running = execution;
  let timedOut = false;
  const timer =
    request.timeLimit > 0
      ? setTimeout(() => {
          timedOut = true;
          running.kill();
          send({ type: 'timeout' });
          close();
        }, request.timeLimit * 1000)
      : undefined;

  socket.on('message', (data: Buffer, isBinary: boolean) => {
    // Poseidon accepts text frames only; their bytes go to stdin verbatim.
    if (isBinary) return;
    running.writeStdin(data);
    runner.touch();
  });
  socket.on('close', () => {
    if (!finished) {
      logger.info({ runnerId: runner.id }, 'client left: execution killed');
      finished = true;
      running.kill();
    }
  });

  const result = await running.result;
  if (timer) clearTimeout(timer);
  runner.endExecution();
  stdout.flush();
  stderr.flush();
  const durationMs = Date.now() - started;
  if (timedOut) {
    logger.info({ runnerId: runner.id, durationMs, timeLimit: request.timeLimit }, 'execution timed out');
    return;
  }
  if (result.kind === 'exited') send({ type: 'exit', data: result.exitCode });
  else if (result.kind === 'oomKilled') send({ type: 'exit', data: 137 });
  else send({ type: 'error', data: result.message });
  logger.info({ runnerId: runner.id, durationMs, result }, 'execution finished');
  close();
}
