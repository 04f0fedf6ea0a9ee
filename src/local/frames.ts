/*
 * Wire format of the sandbox agent (agent/poseidon-agent.c documents the same, keep both in step).
 *
 * Frame, both directions: u32 LE length-of-rest | u8 type | u32 LE id | payload   (length-of-rest = 5 + payload)
 * "bytes" = u32 LE length + data; "str" = bytes of UTF-8 without NUL.
 *
 * Requests (daemon -> agent):
 *   EXEC   u8 flags | u32 uid | u32 gid | str cwd | u32 argc | argc*str | u32 envc | envc*str("K=V")
 *   STDIN  raw data; empty closes stdin            KILL   empty (an execution: SIGKILL its group; a READ: cancel)
 *   FILES  u32 n | n*str delete | u32 m | m*(u8 isDirectory | str path | bytes content)
 *   LIST   u8 flags | u32 uid | u32 gid | u32 maxEntries | u32 maxBytes | str path
 *   READ   u8 flags | u32 uid | u32 gid | str path
 *   PAUSE / RESUME  empty: stop / go on reading that execution's output or that READ's file
 *   DISCARD empty: the execution is over for the daemon; its later output is read and dropped, no more events
 *   flags: bit0 privileged, bit1 recursive (LIST only), bit2 tty, bit3 tty stderr (EXEC only)
 *   tty: stdin and stdout are a pseudo-terminal (80x24, controlling terminal of the execution's
 *   session; its output arrives as STDOUT); stderr stays a pipe whose "\n" arrive as "\r\n",
 *   unless bit3 puts stderr on the terminal too. An empty STDIN then writes the terminal's EOF
 *   character (^D) instead of closing anything.
 * Events (agent -> daemon):
 *   READY u32 version (id 0) | STDOUT raw | STDERR raw | EXIT u32 code | OUTPUT_CLOSED empty
 *   RESULT u32 status (0 ok, else errno) + UTF-8 message | LISTING raw find -printf fields
 *   FILE_SIZE u64 | DATA raw
 *   A LISTING event may end in the middle of an entry or field; the next one goes on from there.
 *   Past maxEntries or maxBytes the agent stops and answers RESULT E2BIG.
 * No event is longer than MAX_EVENT_REST: the agent is not trusted (privileged learner code might
 * forge frames), so the daemon never buffers more than that for one.
 */

export const RequestType = {
  exec: 0x01,
  stdin: 0x02,
  kill: 0x03,
  files: 0x04,
  list: 0x05,
  read: 0x06,
  pause: 0x07,
  resume: 0x08,
  discard: 0x09,
} as const;

export const EventType = {
  ready: 0x80,
  stdout: 0x81,
  stderr: 0x82,
  exit: 0x83,
  outputClosed: 0x84,
  result: 0x85,
  listing: 0x86,
  fileSize: 0x87,
  data: 0x88,
} as const;

export const FLAG_PRIVILEGED = 1;
export const FLAG_RECURSIVE = 2;
export const FLAG_TTY = 4;
export const FLAG_TTY_STDERR = 8;
/* 3: EXEC's tty flags; an older agent would silently run such an execution with pipes. */
export const PROTOCOL_VERSION = 3;
const HEADER_LENGTH = 9;
/* The agent refuses larger frames; so does the parser, since a bad length would make it wait forever. */
export const MAX_FRAME_REST = 2 ** 30;
/* The agent's events carry at most one 64 KiB chunk (DATA, output, LISTING) or a short RESULT. */
export const MAX_EVENT_REST = 5 + 2 ** 17;

export interface Frame {
  type: number;
  id: number;
  payload: Buffer;
}

/* Builds request payloads field by field. */
export class PayloadWriter {
  readonly #parts: Buffer[] = [];

  u8(value: number): this {
    this.#parts.push(Buffer.from([value]));
    return this;
  }

  u32(value: number): this {
    const buffer = Buffer.alloc(4);
    buffer.writeUInt32LE(value >>> 0);
    this.#parts.push(buffer);
    return this;
  }

  bytes(data: Buffer): this {
    this.u32(data.length);
    this.#parts.push(data);
    return this;
  }

  /* The agent turns strings into C strings: a NUL inside would cut them, so it rejects them. */
  str(text: string): this {
    return this.bytes(Buffer.from(text, 'utf8'));
  }

  toBuffer(): Buffer {
    return Buffer.concat(this.#parts);
  }
}

export function encodeFrame(type: number, id: number, payload: Buffer = Buffer.alloc(0)): Buffer {
  const header = Buffer.alloc(HEADER_LENGTH);
  header.writeUInt32LE(5 + payload.length, 0);
  header.writeUInt8(type, 4);
  header.writeUInt32LE(id >>> 0, 5);
  return payload.length > 0 ? Buffer.concat([header, payload]) : header;
}

export class FrameError extends Error {}

/*
 * Splits a byte stream into frames, whatever the chunking: a chunk may hold several frames or a
 * piece of one. Pieces are only joined once a frame is complete, so a large frame costs one copy.
 */
export class FrameParser {
  #chunks: Buffer[] = [];
  #buffered = 0;

  /* maxRest: the longest frame the peer may send; a longer length is an error, not a wait. */
  constructor(private readonly maxRest: number = MAX_FRAME_REST) {}

  push(chunk: Buffer): Frame[] {
    this.#chunks.push(chunk);
    this.#buffered += chunk.length;
    const frames: Frame[] = [];
    for (;;) {
      if (this.#buffered < 4) break;
      const head = this.#peek(4);
      const rest = head.readUInt32LE(0);
      if (rest < 5 || rest > this.maxRest) throw new FrameError(`bad frame length ${rest}`);
      if (this.#buffered < 4 + rest) break;
      const frame = this.#take(4 + rest);
      frames.push({ type: frame.readUInt8(4), id: frame.readUInt32LE(5), payload: frame.subarray(HEADER_LENGTH) });
    }
    return frames;
  }

  #peek(length: number): Buffer {
    const first = this.#chunks[0];
    if (first && first.length >= length) return first;
    const joined = Buffer.concat(this.#chunks);
    this.#chunks = [joined];
    return joined;
  }

  #take(length: number): Buffer {
    const joined = this.#peek(length);
    const frame = joined.subarray(0, length);
    const remainder = joined.subarray(length);
    this.#chunks = remainder.length > 0 ? [remainder] : [];
    this.#buffered -= length;
    return frame;
  }
}
