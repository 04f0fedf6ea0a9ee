import { isAscii, isUtf8 } from 'node:buffer';

/*
 * Turns one stream's output bytes into Poseidon's WebSocket message {"type":"stdout","data":"…"}:
 * its JSON text, byte for byte what JSON.stringify of the decoded text gives, escaped straight
 * from the bytes. Decoding every chunk to a string, JSON.stringify and the socket's re-encoding to
 * UTF-8 were most of the daemon's CPU per streamed byte (profile of bench stream_concurrent);
 * valid UTF-8 needs only its control characters, '"' and '\' escaped, since no byte of a
 * multi-byte sequence is below 0x80.
 *
 * A character split between two chunks is held back until its last byte comes, as a
 * StringDecoder would; invalid UTF-8 (rare: binary output) takes the decoding path, so every
 * invalid sequence becomes U+FFFD exactly as before.
 */

/* 1 for the bytes JSON must escape: C0 controls, '"' and '\'. */
const NEEDS_ESCAPE = new Uint8Array(256);
/* The letter of a two-character escape ("\n"), 0 where JSON.stringify writes \u00XX. */
const SHORT_ESCAPE = new Uint8Array(256);
for (let byte = 0; byte < 0x20; byte++) NEEDS_ESCAPE[byte] = 1;
NEEDS_ESCAPE[0x22] = 1;
NEEDS_ESCAPE[0x5c] = 1;
for (const [byte, letter] of [
  [0x08, 'b'],
  [0x09, 't'],
  [0x0a, 'n'],
  [0x0c, 'f'],
  [0x0d, 'r'],
  [0x22, '"'],
  [0x5c, '\\'],
] as const)
  SHORT_ESCAPE[byte] = letter.charCodeAt(0);
const HEX_DIGITS = Buffer.from('0123456789abcdef', 'latin1');
const BACKSLASH = 0x5c;
/* The longest escape, \u00XX, is 6 bytes for 1. */
const MAX_ESCAPE_GROWTH = 6;

/* How many bytes at the end of `bytes` start a UTF-8 character that is not complete yet. */
export function incompleteUtf8Tail(bytes: Buffer): number {
  for (let back = 1; back <= Math.min(3, bytes.length); back++) {
    const byte = bytes[bytes.length - back] as number;
    if ((byte & 0xc0) === 0x80) continue;
    const length = byte >> 5 === 0x06 ? 2 : byte >> 4 === 0x0e ? 3 : byte >> 3 === 0x1e ? 4 : 1;
    return length > back ? back : 0;
  }
  return 0;
}

function writeEscape(target: Buffer, offset: number, byte: number): number {
  let at = offset;
  target[at++] = BACKSLASH;
  const letter = SHORT_ESCAPE[byte] as number;
  if (letter !== 0) {
    target[at++] = letter;
  } else {
    target[at++] = 0x75; // u00XX
    target[at++] = 0x30;
    target[at++] = 0x30;
    target[at++] = HEX_DIGITS[byte >> 4] as number;
    target[at++] = HEX_DIGITS[byte & 0x0f] as number;
  }
  return at;
}

function writeBytes(source: Buffer, from: number, to: number, target: Buffer, offset: number): number {
  let at = offset;
  for (let i = from; i < to; i++) {
    const byte = source[i] as number;
    if (NEEDS_ESCAPE[byte] === 0) target[at++] = byte;
    else at = writeEscape(target, at, byte);
  }
  return at;
}

/*
 * Escapes valid UTF-8 into `target` from `offset` as a JSON string's inside; returns the new
 * offset. Four bytes at a time: one test per word finds whether any byte is below 0x20, '"' or
 * '\' (the "has a byte less than / equal to" bit tricks), and a word without one is copied whole,
 * which makes this about twice as fast as a byte loop on text.
 */
function writeEscaped(source: Buffer, target: Buffer, offset: number): number {
  const words = new DataView(source.buffer, source.byteOffset, source.length);
  const out = new DataView(target.buffer, target.byteOffset, target.length);
  const wordEnd = source.length - 3;
  let at = offset;
  let i = 0;
  for (; i < wordEnd; i += 4) {
    const word = words.getInt32(i, true);
    const quote = word ^ 0x22222222;
    const backslash = word ^ 0x5c5c5c5c;
    const special = ((word - 0x20202020) & ~word) | ((quote - 0x01010101) & ~quote) | ((backslash - 0x01010101) & ~backslash);
    if ((special & 0x80808080) === 0) {
      out.setInt32(at, word, true);
      at += 4;
    } else {
      at = writeBytes(source, i, i + 4, target, at);
    }
  }
  return writeBytes(source, i, source.length, target, at);
}

/*
 * Escaping writes into `scratch` first. ASCII output (the usual case) then leaves as a string,
 * which V8 allocates young and frees cheaply; other text gets an exact-size copy carved from a
 * shared slab, as Node's own Buffer pool does for small buffers: an ArrayBuffer per message is
 * external memory, whose growth makes V8 run full collections (a third of the daemon's CPU when
 * every message was one, in a perf profile of bench stream_single).
 */
let scratch = Buffer.allocUnsafe(0);
/* Chunks of one message laid end to end, when there are several. */
let joined = Buffer.allocUnsafe(0);
const SLAB_BYTES = 1024 * 1024;
let slab = Buffer.allocUnsafeSlow(0);
let slabUsed = 0;

function carve(source: Buffer, length: number): Buffer {
  if (length > SLAB_BYTES / 4) {
    const own = Buffer.allocUnsafeSlow(length);
    source.copy(own, 0, 0, length);
    return own;
  }
  if (slabUsed + length > slab.length) {
    slab = Buffer.allocUnsafeSlow(SLAB_BYTES);
    slabUsed = 0;
  }
  const message = slab.subarray(slabUsed, slabUsed + length);
  source.copy(message, 0, 0, length);
  // Eight-byte aligned, as Node aligns its pool.
  slabUsed += (length + 7) & ~7;
  return message;
}

function join(chunks: Buffer[], length: number): Buffer {
  if (chunks.length === 1) return chunks[0] as Buffer;
  if (joined.length < length) joined = Buffer.allocUnsafeSlow(Math.max(length, 2 * joined.length));
  let at = 0;
  for (const chunk of chunks) at += chunk.copy(joined, at);
  return joined.subarray(0, length);
}

export class OutputMessageEncoder {
  readonly #prefix: Buffer;
  readonly #suffix = Buffer.from('"}', 'latin1');
  #chunks: Buffer[] = [];
  #bytes = 0;

  constructor(readonly type: 'stdout' | 'stderr') {
    this.#prefix = Buffer.from(`{"type":"${type}","data":"`, 'latin1');
  }

  /* Bytes pushed and not yet taken (a held-back partial character included). */
  get pendingBytes(): number {
    return this.#bytes;
  }

  push(chunk: Buffer): void {
    if (chunk.length === 0) return;
    this.#chunks.push(chunk);
    this.#bytes += chunk.length;
  }

  /*
   * The message for everything pushed so far, or undefined if there is no text to send yet. A
   * partial character at the end stays for the next call, unless `end`: then it is invalid and
   * becomes U+FFFD.
   */
  take(end = false): Buffer | string | undefined {
    if (this.#bytes === 0) return undefined;
    const all = join(this.#chunks, this.#bytes);
    const held = end ? 0 : incompleteUtf8Tail(all);
    const body = all.subarray(0, all.length - held);
    // The held bytes may sit in the shared join buffer: they are copied out before it is reused.
    this.#chunks = held > 0 ? [Buffer.from(all.subarray(all.length - held))] : [];
    this.#bytes = held;
    if (body.length === 0) return undefined;
    if (!isUtf8(body)) return JSON.stringify({ type: this.type, data: body.toString('utf8') });
    const bound = this.#prefix.length + body.length * MAX_ESCAPE_GROWTH + this.#suffix.length;
    if (scratch.length < bound) scratch = Buffer.allocUnsafeSlow(Math.max(bound, 2 * scratch.length));
    let at = this.#prefix.copy(scratch, 0);
    at = writeEscaped(body, scratch, at);
    at += this.#suffix.copy(scratch, at);
    return isAscii(body) ? scratch.toString('latin1', 0, at) : carve(scratch, at);
  }
}
