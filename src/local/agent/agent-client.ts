import { Readable, type Writable } from 'node:stream';
import type { FileHeader } from '../../dto/runner.js';
import { FindOutputParser } from '../../runner/workspace-files.js';
import {
  EventType,
  encodeFrame,
  FLAG_PRIVILEGED,
  FLAG_RECURSIVE,
  FLAG_TTY,
  FLAG_TTY_STDERR,
  type Frame,
  FrameParser,
  MAX_EVENT_REST,
  PayloadWriter,
  PROTOCOL_VERSION,
  RequestType,
} from '../frames.js';

/*
 * Client of the in-sandbox agent (agent/poseidon-agent.c): one per sandbox, over the agent's stdin
 * (requests) and stdout (events). The wire format is documented in ../frames.ts.
 *
 * Backpressure is per operation: pauseOutput() asks the agent to stop reading that execution's
 * pipes (its process then blocks on a full pipe), and a read() stream pauses its file the same
 * way, so one slow consumer never stalls another execution or a file operation of the runner.
 *
 * The agent is not trusted: privileged learner code runs as root beside it and might forge its
 * frames. Every event is checked (length, type, order, id) before it is used; a frame that breaks
 * the protocol ends the connection with an AgentProtocolError (the agent then sees EOF and ends the
 * sandbox), and nothing ever throws out of the stream handler, which would end the whole daemon.
 */

/* Output still arriving after the process exited belongs to it; silence this long ends the wait. */
export const OUTPUT_SETTLE_MS = 100;
/*
 * ...but never longer than this after the exit (unpaused): what the process itself wrote fits in
 * its pipes, so output that goes on is a background process's, which would otherwise hold the
 * execution open forever.
 */
export const OUTPUT_AFTER_EXIT_MS = 1000;
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

/* The agent sent something the protocol does not allow; the connection was ended because of it. */
export class AgentProtocolError extends AgentClosedError {
  constructor(message: string) {
    super(`the sandbox agent broke the protocol: ${message}`);
    this.name = 'AgentProtocolError';
  }
}

/* Thrown inside the decoder only, caught in #onData: one exit for every kind of violation. */
function violation(message: string): never {
  throw new AgentProtocolError(message);
}

/*
 * Bounds of one listing, sent with the request so the agent stops there (E2BIG) instead of
 * building a listing the daemon cannot hold. Bytes count the raw find -printf fields.
 */
export interface AgentListLimits {
  maxEntries: number;
  maxBytes: number;
}

export const DEFAULT_LIST_LIMITS: AgentListLimits = { maxEntries: 50_000, maxBytes: 32 * 2 ** 20 };

/* errno values the daemon tells apart. */
export const E2BIG = 7;

export interface AgentExecOptions {
  /* The complete environment: the agent does not pass its own on. */
  env: Record<string, string>;
  cwd?: string;
  /* Privileged runs as root with the kept capabilities; otherwise as uid/gid without any. */
  privileged: boolean;
  /* Defaults: 0/0 when privileged (capabilities survive only for uid 0), else 65534/65534. */
  uid?: number;
  gid?: number;
  /*
   * A pseudo-terminal for stdin and stdout (see frames.ts): echo, "\r\n" and line editing are the
   * terminal's, and closeStdin() types ^D. stderr: 'pipe' keeps it apart (lines end in "\r\n" as
   * on the terminal), 'terminal' merges it into stdout. Default: pipes for all three.
   */
  tty?: { stderr: 'pipe' | 'terminal' };
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
   * processes may hold the pipes open), at the latest OUTPUT_AFTER_EXIT_MS after EXIT; then the
   * agent drops what comes later (DISCARD). exitCode is the status or 128 + signal. Rejects with
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
  readonly #parser = new FrameParser(MAX_EVENT_REST);
  readonly #operations = new Map<number, Operation>();
  #nextId = 1;
  /* Once ids wrapped around, every id counts as issued. */
  #wrapped = false;
  #readySeen = false;
  #closed: Error | undefined;
  readonly #closeListeners: Array<(error: Error) => void> = [];
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

  /* Called once with the reason the connection ended (at once if it has already). */
  onClose(listener: (error: Error) => void): void {
    if (this.#closed) listener(this.#closed);
    else this.#closeListeners.push(listener);
  }

  exec(argv: string[], options: AgentExecOptions, handlers: AgentExecHandlers): AgentExecution {
    const id = this.#allocateId();
    const uid = options.uid ?? (options.privileged ? 0 : DEFAULT_UID);
    const gid = options.gid ?? (options.privileged ? 0 : DEFAULT_GID);
    const payload = new PayloadWriter()
      .u8((options.privileged ? FLAG_PRIVILEGED : 0) | (options.tty ? FLAG_TTY : 0) | (options.tty?.stderr === 'terminal' ? FLAG_TTY_STDERR : 0))
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
    let deadlineTimer: NodeJS.Timeout | undefined;
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
      if (deadlineTimer) clearTimeout(deadlineTimer);
      this.#operations.delete(id);
      // Background processes may still write to the pipes: the agent reads and drops that output
      // from now on, so it is never framed, sent and decoded for nobody.
      if (!outputClosed) this.#send(RequestType.discard, id);
      resolveResult({ exitCode });
    };
    /* While paused, output is only held back, not over: silence then means nothing. */
    const armSettle = (): void => {
      if (exitCode === undefined || finished) return;
      if (settleTimer) clearTimeout(settleTimer);
      settleTimer = paused ? undefined : setTimeout(finish, OUTPUT_SETTLE_MS);
      if (!paused && !deadlineTimer) deadlineTimer = setTimeout(finish, OUTPUT_AFTER_EXIT_MS);
    };

    let started = false;
    this.#operations.set(id, {
      onFrame: (frame) => {
        switch (frame.type) {
          case EventType.stdout:
          case EventType.stderr:
            if (outputClosed) violation(`output of execution ${id} after its end`);
            started = true;
            if (frame.type === EventType.stdout) handlers.onStdout(frame.payload);
            else handlers.onStderr(frame.payload);
            armSettle();
            break;
          case EventType.exit:
            if (exitCode !== undefined) violation(`execution ${id} exited twice`);
            exitCode = decodeU32(frame, 'EXIT');
            started = true;
            if (outputClosed) finish();
            else armSettle();
            break;
          case EventType.outputClosed:
            if (frame.payload.length !== 0) violation(`OUTPUT_CLOSED of ${id} has a payload`);
            if (outputClosed) violation(`output of execution ${id} closed twice`);
            outputClosed = true;
            started = true;
            finish();
            break;
          case EventType.result: {
            // Only sent, with a failure, for an execution that could not be started.
            const { status, message } = decodeResult(frame);
            if (started || status === 0) violation(`RESULT ${status} for execution ${id} that started`);
            finished = true;
            this.#operations.delete(id);
            rejectResult(new AgentRequestError(status, message));
            break;
          }
          default:
            violation(`event 0x${frame.type.toString(16)} for execution ${id}`);
        }
      },
      onClose: (error) => {
        if (settleTimer) clearTimeout(settleTimer);
        if (deadlineTimer) clearTimeout(deadlineTimer);
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
        if (deadlineTimer) clearTimeout(deadlineTimer);
        settleTimer = deadlineTimer = undefined;
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
    for (const copy of update.copy)
      payload
        .u8(copy.isDirectory ? 1 : 0)
        .str(copy.path)
        .bytes(copy.content);
    await this.#request(RequestType.files, payload.toBuffer(), (frame) => violation(`event 0x${frame.type.toString(16)} for a FILES request`));
  }

  /*
   * The entries as GNU find -printf would print them, the start path first. Parsed as the chunks
   * arrive, so memory is bounded by limits (what the agent may send) rather than by the tree.
   * Past a limit: AgentRequestError with status E2BIG.
   */
  async list(
    path: string,
    recursive: boolean,
    identity: AgentIdentity = { privileged: true },
    limits: AgentListLimits = DEFAULT_LIST_LIMITS,
  ): Promise<FileHeader[]> {
    const entries: FileHeader[] = [];
    const parser = new FindOutputParser();
    let bytes = 0;
    const payload = identityPayload(identity, recursive ? FLAG_RECURSIVE : 0)
      .u32(limits.maxEntries)
      .u32(limits.maxBytes)
      .str(path)
      .toBuffer();
    await this.#request(
      RequestType.list,
      payload,
      (frame) => {
        if (frame.type !== EventType.listing) violation(`event 0x${frame.type.toString(16)} for a LIST request`);
        bytes += frame.payload.length;
        if (bytes > limits.maxBytes) violation(`a listing of more than ${limits.maxBytes} bytes`);
        parser.push(frame.payload, (entry) => {
          if (entries.length >= limits.maxEntries) violation(`a listing of more than ${limits.maxEntries} entries`);
          entries.push(entry);
        });
      },
      (status) => {
        if (status === 0 && parser.pending) violation('a listing that ends inside an entry');
      },
    );
    return entries;
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
      let size = 0;
      let received = 0;
      this.#operations.set(id, {
        onFrame: (frame) => {
          switch (frame.type) {
            case EventType.fileSize: {
              if (sized) violation(`FILE_SIZE of ${id} twice`);
              if (frame.payload.length !== 8) violation(`FILE_SIZE of ${frame.payload.length} bytes`);
              const announced = frame.payload.readBigUInt64LE(0);
              if (announced > BigInt(Number.MAX_SAFE_INTEGER)) violation(`a file size of ${announced}`);
              sized = true;
              size = Number(announced);
              resolve({ size, stream });
              break;
            }
            case EventType.data:
              if (!sized) violation(`DATA of ${id} before FILE_SIZE`);
              received += frame.payload.length;
              // More than announced would break the Content-Length already sent.
              if (received > size) violation(`more data than the announced ${size} bytes`);
              if (!stream.push(frame.payload) && !paused && !ended) {
                paused = true;
                this.#send(RequestType.pause, id);
              }
              break;
            case EventType.result: {
              const { status, message } = decodeResult(frame);
              if (!sized && status === 0) violation(`RESULT 0 of ${id} before FILE_SIZE`);
              ended = true;
              this.#operations.delete(id);
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
              violation(`event 0x${frame.type.toString(16)} for READ ${id}`);
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
    if (this.#nextId >= 0xffff_ffff) {
      this.#nextId = 1;
      this.#wrapped = true;
    } else this.#nextId += 1;
    return id;
  }

  /* An id this client handed out; events of one that is over arrive late and are dropped. */
  #issued(id: number): boolean {
    return id !== 0 && (this.#wrapped || id < this.#nextId);
  }

  #send(type: number, id: number, payload?: Buffer): void {
    if (this.#closed) return;
    this.#input.write(encodeFrame(type, id, payload));
  }

  /*
   * A request answered by one RESULT, with other events of its id going to onEvent first;
   * onResult may still refuse the RESULT (it throws a violation).
   */
  #request(type: number, payload: Buffer, onEvent: (frame: Frame) => void, onResult: (status: number) => void = () => undefined): Promise<void> {
    if (this.#closed) return Promise.reject(this.#closed);
    const id = this.#allocateId();
    return new Promise((resolve, reject) => {
      this.#operations.set(id, {
        onFrame: (frame) => {
          if (frame.type !== EventType.result) {
            onEvent(frame);
            return;
          }
          const { status, message } = decodeResult(frame);
          onResult(status);
          this.#operations.delete(id);
          if (status === 0) resolve();
          else reject(new AgentRequestError(status, message));
        },
        onClose: reject,
      });
      this.#send(type, id, payload);
    });
  }

  /* Never throws: whatever goes wrong in decoding ends this connection, not the daemon. */
  #onData(chunk: Buffer): void {
    if (this.#closed) return;
    try {
      for (const frame of this.#parser.push(chunk)) {
        this.#onFrame(frame);
        // A handler may have closed the client; what follows is for nobody.
        if (this.#closed) return;
      }
    } catch (error) {
      const reason = error instanceof AgentProtocolError ? error : new AgentProtocolError(error instanceof Error ? error.message : String(error));
      this.#shutDown(reason);
      // Ending the connection makes the agent see EOF: it kills everything and the sandbox ends.
      this.#input.destroy();
      this.#output.destroy();
    }
  }

  #onFrame(frame: Frame): void {
    if (!KNOWN_EVENTS.has(frame.type)) violation(`unknown event type 0x${frame.type.toString(16)}`);
    if (frame.type === EventType.ready) {
      if (this.#readySeen) violation('READY twice');
      if (frame.id !== 0 || frame.payload.length !== 4) violation('a malformed READY');
      this.#readySeen = true;
      const version = frame.payload.readUInt32LE(0);
      if (version !== PROTOCOL_VERSION) violation(`protocol ${version}, not ${PROTOCOL_VERSION}`);
      this.#onReady?.();
      return;
    }
    if (!this.#readySeen) violation(`event 0x${frame.type.toString(16)} before READY`);
    const operation = this.#operations.get(frame.id);
    if (operation) operation.onFrame(frame);
    else if (!this.#issued(frame.id)) violation(`event 0x${frame.type.toString(16)} for id ${frame.id}, which was never used`);
    // Otherwise a late event of an operation that is over (output before DISCARD arrived, data of a cancelled read).
  }

  #shutDown(error: Error): void {
    if (this.#closed) return;
    this.#closed = error;
    this.#onReadyFailed?.(error);
    const operations = [...this.#operations.values()];
    this.#operations.clear();
    for (const operation of operations) operation.onClose(error);
    for (const listener of this.#closeListeners.splice(0)) listener(error);
  }
}

const KNOWN_EVENTS: ReadonlySet<number> = new Set(Object.values(EventType));

function identityPayload(identity: AgentIdentity, extraFlags: number): PayloadWriter {
  return new PayloadWriter()
    .u8((identity.privileged ? FLAG_PRIVILEGED : 0) | extraFlags)
    .u32(identity.uid ?? (identity.privileged ? 0 : DEFAULT_UID))
    .u32(identity.gid ?? (identity.privileged ? 0 : DEFAULT_GID));
}

function decodeResult(frame: Frame): { status: number; message: string } {
  if (frame.payload.length < 4) violation(`RESULT of ${frame.payload.length} bytes for id ${frame.id}`);
  return { status: frame.payload.readUInt32LE(0), message: frame.payload.subarray(4).toString('utf8') };
}

function decodeU32(frame: Frame, name: string): number {
  if (frame.payload.length !== 4) violation(`${name} of ${frame.payload.length} bytes for id ${frame.id}`);
  return frame.payload.readUInt32LE(0);
}
