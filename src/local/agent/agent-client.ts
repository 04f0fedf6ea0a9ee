import { Readable, type Writable } from 'node:stream';
import {
  EventType,
  encodeFrame,
  FLAG_PRIVILEGED,
  FLAG_RECURSIVE,
  type Frame,
  FrameParser,
  PayloadWriter,
  PROTOCOL_VERSION,
  RequestType,
} from './frames.js';

/*
 * Client of the in-sandbox agent (agent/poseidon-agent.c): one per sandbox, over the agent's stdin
 * (requests) and stdout (events). The wire format is documented in ./frames.ts.
 *
 * Backpressure is per operation: pauseOutput() asks the agent to stop reading that execution's
 * pipes (its process then blocks on a full pipe), and a read() stream pauses its file the same
 * way, so one slow consumer never stalls another execution or a file operation of the runner.
 */

/* Output still arriving after the process exited belongs to it; silence this long ends the wait. */
export const OUTPUT_SETTLE_MS = 100;
export const AGENT_WORKSPACE = '/workspace';
/* uid/gid of unprivileged requests unless told otherwise: nobody/nogroup, as in the sandbox. */
const DEFAULT_UID = 65534;
const DEFAULT_GID = 65534;

/* A request the agent answered with a non-zero status: status is an errno value, message names the path. */
export class AgentRequestError extends Error {
  constructor(
    readonly status: number,
    message: string,
  ) {
    super(message);
    this.name = 'AgentRequestError';
  }
}

/* The agent is gone (the sandbox died or close() was called); every pending operation fails with this. */
export class AgentClosedError extends Error {
  constructor(message = 'the sandbox agent is gone') {
    super(message);
    this.name = 'AgentClosedError';
  }
}

export interface AgentExecOptions {
  /* The complete environment: the agent does not pass its own on. */
  env: Record<string, string>;
  cwd?: string;
  /* Privileged runs as root with the kept capabilities; otherwise as uid/gid without any. */
  privileged: boolean;
  /* Defaults: 0/0 when privileged (capabilities survive only for uid 0), else 65534/65534. */
  uid?: number;
  gid?: number;
}

export interface AgentExecHandlers {
  onStdout(chunk: Buffer): void;
  onStderr(chunk: Buffer): void;
}

export interface AgentExecution {
  writeStdin(data: Buffer): void;
  closeStdin(): void;
  /* SIGKILL to the execution's process group (its whole tree unless something called setsid). */
  kill(): void;
  /* Per execution: the agent stops reading its pipes until resumeOutput(). */
  pauseOutput(): void;
  resumeOutput(): void;
  /*
   * Resolves after EXIT and either OUTPUT_CLOSED or OUTPUT_SETTLE_MS without output (background
   * processes may hold the pipes open); exitCode is the status or 128 + signal. Rejects with
   * AgentRequestError if the command could not be started, AgentClosedError if the agent died.
   */
  readonly result: Promise<{ exitCode: number }>;
}

export interface AgentIdentity {
  privileged: boolean;
  uid?: number;
  gid?: number;
}

export interface AgentFileCopy {
  /* Relative paths are under /workspace. */
  path: string;
  isDirectory: boolean;
  content: Buffer;
}

export interface AgentFileUpdate {
  /* './*' is every non-dot entry of /workspace; anything else a literal path, removed recursively. */
  delete: string[];
  copy: AgentFileCopy[];
}

/* What the client does with the events of one operation. */
interface Operation {
  onFrame(frame: Frame): void;
  onClose(error: Error): void;
}

export class AgentClient {
  readonly ready: Promise<void>;
  readonly #input: Writable;
  readonly #output: Readable;
  readonly #parser = new FrameParser();
  readonly #operations = new Map<number, Operation>();
  #nextId = 1;
  #closed: Error | undefined;
  #onReady: (() => void) | undefined;
  #onReadyFailed: ((error: Error) => void) | undefined;

  /* input: the agent's stdin; output: the agent's stdout. */
  constructor(input: Writable, output: Readable) {
    this.#input = input;
    this.#output = output;
    this.ready = new Promise<void>((resolve, reject) => {
      this.#onReady = resolve;
      this.#onReadyFailed = reject;
    });
    // A caller that never awaits ready must not get an unhandled rejection when the agent dies.
    this.ready.catch(() => undefined);
    // Writing to a dead agent fails; the close of its stdout reports that once, to everyone.
    input.on('error', (error: Error) => this.#shutDown(new AgentClosedError(`the sandbox agent is gone: ${error.message}`)));
    output.on('data', (chunk: Buffer) => this.#onData(chunk));
    output.on('error', (error: Error) => this.#shutDown(new AgentClosedError(`the sandbox agent is gone: ${error.message}`)));
    output.on('close', () => this.#shutDown(new AgentClosedError()));
    output.on('end', () => this.#shutDown(new AgentClosedError()));
  }

  get closed(): boolean {
    return this.#closed !== undefined;
  }

  exec(argv: string[], options: AgentExecOptions, handlers: AgentExecHandlers): AgentExecution {
    const id = this.#allocateId();
    const uid = options.uid ?? (options.privileged ? 0 : DEFAULT_UID);
    const gid = options.gid ?? (options.privileged ? 0 : DEFAULT_GID);
    const payload = new PayloadWriter()
      .u8(options.privileged ? FLAG_PRIVILEGED : 0)
      .u32(uid)
      .u32(gid)
      .str(options.cwd ?? AGENT_WORKSPACE)
      .u32(argv.length);
    for (const argument of argv) payload.str(argument);
    const env = Object.entries(options.env);
    payload.u32(env.length);
    for (const [key, value] of env) payload.str(`${key}=${value}`);

    let exitCode: number | undefined;
    let outputClosed = false;
    let paused = false;
    let settleTimer: NodeJS.Timeout | undefined;
    let finished = false;
    let resolveResult: (result: { exitCode: number }) => void = () => undefined;
    let rejectResult: (error: Error) => void = () => undefined;
    const result = new Promise<{ exitCode: number }>((resolve, reject) => {
      resolveResult = resolve;
      rejectResult = reject;
    });

    const finish = (): void => {
      if (finished || exitCode === undefined) return;
      finished = true;
      if (settleTimer) clearTimeout(settleTimer);
      // Later output of background processes still comes as events of this id; it is dropped here.
      this.#operations.delete(id);
      resolveResult({ exitCode });
    };
    /* While paused, output is only held back, not over: silence then means nothing. */
    const armSettle = (): void => {
      if (exitCode === undefined || finished) return;
      if (settleTimer) clearTimeout(settleTimer);
      settleTimer = paused ? undefined : setTimeout(finish, OUTPUT_SETTLE_MS);
    };

    this.#operations.set(id, {
      onFrame: (frame) => {
        switch (frame.type) {
          case EventType.stdout:
            handlers.onStdout(frame.payload);
            armSettle();
            break;
          case EventType.stderr:
            handlers.onStderr(frame.payload);
            armSettle();
            break;
          case EventType.exit:
            exitCode = frame.payload.readUInt32LE(0);
            if (outputClosed) finish();
            else armSettle();
            break;
          case EventType.outputClosed:
            outputClosed = true;
            finish();
            break;
          case EventType.result: {
            // Only sent for an execution that could not be started.
            finished = true;
            this.#operations.delete(id);
            const { status, message } = decodeResult(frame.payload);
            rejectResult(new AgentRequestError(status, message));
            break;
          }
          default:
            break;
        }
      },
      onClose: (error) => {
        if (settleTimer) clearTimeout(settleTimer);
        if (!finished) {
          finished = true;
          rejectResult(error);
        }
      },
    });
    this.#failIfClosed(id);
    this.#send(RequestType.exec, id, payload.toBuffer());

    return {
      writeStdin: (data) => {
        // An empty STDIN frame means "close": empty data is simply nothing to write.
        if (data.length > 0 && !finished) this.#send(RequestType.stdin, id, data);
      },
      closeStdin: () => {
        if (!finished) this.#send(RequestType.stdin, id);
      },
      kill: () => {
        if (!finished) this.#send(RequestType.kill, id);
      },
      pauseOutput: () => {
        if (paused || finished) return;
        paused = true;
        if (settleTimer) clearTimeout(settleTimer);
        settleTimer = undefined;
        this.#send(RequestType.pause, id);
      },
      resumeOutput: () => {
        if (!paused || finished) return;
        paused = false;
        this.#send(RequestType.resume, id);
        armSettle();
      },
      result,
    };
  }

  /* Deletes, then copies, in one request; rejects with AgentRequestError naming the failing path. */
  async updateFiles(update: AgentFileUpdate): Promise<void> {
    const payload = new PayloadWriter().u32(update.delete.length);
    for (const entry of update.delete) payload.str(entry);
    payload.u32(update.copy.length);
    for (const copy of update.copy) payload.u8(copy.isDirectory ? 1 : 0).str(copy.path).bytes(copy.content);
    await this.#request(RequestType.files, payload.toBuffer(), () => undefined);
  }

  /*
   * The raw listing: per entry the 8 NUL-terminated fields of find -printf '%y\0%s\0%T@\0%M\0%u\0%g\0%p\0%l\0',
   * the start path first, paths printed as find prints them. Parse with parseFindOutput.
   */
  async list(path: string, recursive: boolean, identity: AgentIdentity = { privileged: true }): Promise<Buffer> {
    const chunks: Buffer[] = [];
    const payload = identityPayload(identity, recursive ? FLAG_RECURSIVE : 0).str(path).toBuffer();
    await this.#request(RequestType.list, payload, (frame) => {
      if (frame.type === EventType.listing) chunks.push(frame.payload);
    });
    return Buffer.concat(chunks);
  }

  /*
   * A regular file (symlinks followed): its size, then its bytes as a stream. Rejects with
   * AgentRequestError if it is missing or not a regular file. Destroying the stream cancels the read.
   */
  read(path: string, identity: AgentIdentity = { privileged: true }): Promise<{ size: number; stream: Readable }> {
    const id = this.#allocateId();
    return new Promise((resolve, reject) => {
      let paused = false;
      let ended = false;
      let sized = false;
      const stream = new Readable({
        read: () => {
          if (paused && !ended) {
            paused = false;
            this.#send(RequestType.resume, id);
          }
        },
        destroy: (error, callback) => {
          if (!ended) {
            ended = true;
            this.#operations.delete(id);
            this.#send(RequestType.kill, id);
          }
          callback(error);
        },
      });
      this.#operations.set(id, {
        onFrame: (frame) => {
          switch (frame.type) {
            case EventType.fileSize:
              sized = true;
              resolve({ size: Number(frame.payload.readBigUInt64LE(0)), stream });
              break;
            case EventType.data:
              if (!stream.push(frame.payload) && !paused && !ended) {
                paused = true;
                this.#send(RequestType.pause, id);
              }
              break;
            case EventType.result: {
              ended = true;
              this.#operations.delete(id);
              const { status, message } = decodeResult(frame.payload);
              const error = new AgentRequestError(status, message);
              if (!sized) {
                // Nobody holds the stream yet: the promise carries the error.
                reject(error);
                stream.destroy();
              } else if (status === 0) stream.push(null);
              else stream.destroy(stream.listenerCount('error') > 0 ? error : undefined);
              break;
            }
            default:
              break;
          }
        },
        onClose: (error) => {
          ended = true;
          reject(error);
          // An error on a stream nobody listens to would crash the process; then it just ends.
          stream.destroy(sized && stream.listenerCount('error') > 0 ? error : undefined);
        },
      });
      this.#failIfClosed(id);
      this.#send(RequestType.read, id, identityPayload(identity, 0).str(path).toBuffer());
    });
  }

  /* Ends the agent's stdin: the agent kills its executions and exits, which ends the sandbox. */
  close(): void {
    this.#input.end();
    this.#shutDown(new AgentClosedError('the sandbox agent was closed'));
  }

  /* An operation started after the agent died fails at once instead of waiting forever. */
  #failIfClosed(id: number): void {
    const operation = this.#operations.get(id);
    if (!this.#closed || !operation) return;
    this.#operations.delete(id);
    operation.onClose(this.#closed);
  }

  #allocateId(): number {
    const id = this.#nextId;
    // Id 0 is READY's; the u32 space is large enough that a live id is never reused.
    this.#nextId = this.#nextId >= 0xffff_ffff ? 1 : this.#nextId + 1;
    return id;
  }

  #send(type: number, id: number, payload?: Buffer): void {
    if (this.#closed) return;
    this.#input.write(encodeFrame(type, id, payload));
  }

  /* A request answered by one RESULT, with other events of its id going to onEvent first. */
  #request(type: number, payload: Buffer, onEvent: (frame: Frame) => void): Promise<void> {
    if (this.#closed) return Promise.reject(this.#closed);
    const id = this.#allocateId();
    return new Promise((resolve, reject) => {
      this.#operations.set(id, {
        onFrame: (frame) => {
          if (frame.type !== EventType.result) {
            onEvent(frame);
            return;
          }
          this.#operations.delete(id);
          const { status, message } = decodeResult(frame.payload);
          if (status === 0) resolve();
          else reject(new AgentRequestError(status, message));
        },
        onClose: reject,
      });
      this.#send(type, id, payload);
    });
  }

  #onData(chunk: Buffer): void {
    let frames: Frame[];
    try {
      frames = this.#parser.push(chunk);
    } catch (error) {
      this.#shutDown(new AgentClosedError(`the sandbox agent sent garbage: ${(error as Error).message}`));
      this.#output.destroy();
      return;
    }
    for (const frame of frames) {
      if (frame.type === EventType.ready) {
        const version = frame.payload.length >= 4 ? frame.payload.readUInt32LE(0) : 0;
        if (version === PROTOCOL_VERSION) this.#onReady?.();
        else this.#onReadyFailed?.(new AgentClosedError(`the sandbox agent speaks protocol ${version}, not ${PROTOCOL_VERSION}`));
        continue;
      }
      this.#operations.get(frame.id)?.onFrame(frame);
    }
  }

  #shutDown(error: Error): void {
    if (this.#closed) return;
    this.#closed = error;
    this.#onReadyFailed?.(error);
    const operations = [...this.#operations.values()];
    this.#operations.clear();
    for (const operation of operations) operation.onClose(error);
  }
}

function identityPayload(identity: AgentIdentity, extraFlags: number): PayloadWriter {
  return new PayloadWriter()
    .u8((identity.privileged ? FLAG_PRIVILEGED : 0) | extraFlags)
    .u32(identity.uid ?? (identity.privileged ? 0 : DEFAULT_UID))
    .u32(identity.gid ?? (identity.privileged ? 0 : DEFAULT_GID));
}

function decodeResult(payload: Buffer): { status: number; message: string } {
  return { status: payload.readUInt32LE(0), message: payload.subarray(4).toString('utf8') };
}
