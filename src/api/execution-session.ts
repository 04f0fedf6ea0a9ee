import type { FastifyBaseLogger } from 'fastify';
import type { WebSocket } from 'ws';
import type { ExecutionRequest } from '../dto/runner.js';
import { executionOutcome, type ExecutionOutcome, type Metrics } from '../monitoring/metrics.js';
import type { WebSocketMessage } from '../dto/websocket.js';
import type { ExecutionProcess, Runner } from '../runner/runner.js';
import { OutputMessageEncoder } from './output-message.js';

export interface SessionOptions {
  maxOutputBytes: number;
  logger: FastifyBaseLogger;
  metrics: Metrics;
}

/* Output is paused above the high mark of unsent WebSocket data and resumed below the low one. */
const HIGH_WATER_BYTES = 8 * 1024 * 1024;
const LOW_WATER_BYTES = 1024 * 1024;
/*
 * Output bytes of one event-loop turn go out as one message, up to about this many: the message
 * then stays below 128 KiB, the size from which V8 gives every string a mapping of its own
 * (mapped, faulted in and unmapped per message, on the client too). Measured in bench
 * stream_single and stream_concurrent: 64 KiB slowed the single stream, 256 KiB cost more CPU.
 */
const COALESCE_LIMIT = 120 * 1024;

/*
 * One execution streamed over one WebSocket, with Poseidon's guarantees: `start` first, then
 * output, and always `exit` or `timeout` before the server closes; the time limit is ours to
 * enforce, and a client that leaves ends the execution.
 */
export async function runExecutionSession(socket: WebSocket, runner: Runner, request: ExecutionRequest, options: SessionOptions): Promise<void> {
  const logger = options.logger.child({ runnerId: runner.id, environmentId: runner.environmentId });
  const metrics = options.metrics;
  const started = Date.now();
  const record = (outcome: ExecutionOutcome): void => metrics.execution(runner.environmentId, outcome, (Date.now() - started) / 1000);
  let outputBytes = 0;
  let outputLimitReported = false;
  let paused = false;
  let finished = false;
  let execution: ExecutionProcess | undefined;

  /* A message's JSON text, as a string or already as UTF-8 bytes: both go out as text frames. */
  const sendText = (text: string | Buffer): void => {
    if (socket.readyState !== socket.OPEN) return;
    socket.send(text, { binary: false }, () => {
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
  const send = (message: WebSocketMessage): void => sendText(JSON.stringify(message));
  const close = (): void => {
    finished = true;
    if (socket.readyState === socket.OPEN) socket.close(1000);
  };

  /*
   * A terminal hands the agent at most 4 KiB per read, so output arrives as many small chunks;
   * those that arrive in one turn of the event loop go out as one message per stream (in the
   * order they came), which keeps the cost per message off a fast writer's throughput without
   * delaying a prompt. Messages are built as bytes (output-message.ts), never as strings.
   */
  let pending: OutputMessageEncoder | undefined;
  let flushScheduled = false;
  const flushPending = (end = false): void => {
    flushScheduled = false;
    if (pending === undefined) return;
    const message = pending.take(end);
    if (pending.pendingBytes === 0) pending = undefined;
    if (message !== undefined && !finished) sendText(message);
  };
  const enqueue = (encoder: OutputMessageEncoder, chunk: Buffer): void => {
    if (pending !== undefined && pending !== encoder) flushPending();
    pending = encoder;
    encoder.push(chunk);
    if (encoder.pendingBytes >= COALESCE_LIMIT) flushPending();
    else if (!flushScheduled) {
      flushScheduled = true;
      setImmediate(flushPending);
    }
  };

  const forward = (type: 'stdout' | 'stderr') => {
    const encoder = new OutputMessageEncoder(type);
    return {
      write(chunk: Buffer): void {
        if (finished) return;
        outputBytes += chunk.length;
        metrics.bytes(runner.environmentId, type, chunk.length);
        if (outputBytes > options.maxOutputBytes) {
          if (!outputLimitReported) {
            outputLimitReported = true;
            flushPending();
            send({ type: 'error', data: `output limit of ${options.maxOutputBytes} bytes exceeded: further output is dropped` });
          }
          return;
        }
        enqueue(encoder, chunk);
      },
      /* The end of the output: a character still incomplete is sent as U+FFFD. */
      flush(): void {
        if (pending !== undefined && pending !== encoder) flushPending();
        if (encoder.pendingBytes === 0) return;
        pending = encoder;
        flushPending(true);
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
    record('error');
    runner.endExecution();
    close();
    return;
  }
  const running = execution;
  // The command and limits, never the environment variables: CodeOcean may pass secrets in them.
  logger.info({ command: request.command.slice(0, 200), timeLimit: request.timeLimit, privilegedExecution: request.privilegedExecution }, 'execution started');
  let timedOut = false;
  let cancelled = false;
  const timer =
    request.timeLimit > 0
      ? setTimeout(() => {
          timedOut = true;
          running.kill();
          flushPending();
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
      logger.info({}, 'client left: execution killed');
      finished = true;
      cancelled = true;
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
    record('timeout');
    logger.info({ durationMs, timeLimit: request.timeLimit }, 'execution timed out');
    return;
  }
  record(cancelled ? 'cancelled' : executionOutcome(result));
  if (result.kind === 'exited') send({ type: 'exit', data: result.exitCode });
  else if (result.kind === 'oomKilled') send({ type: 'exit', data: 137 });
  else send({ type: 'error', data: result.message });
  logger.info({ durationMs, result }, 'execution finished');
  close();
}
