import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { StringDecoder } from 'node:string_decoder';
import { describe, test } from 'node:test';
import { incompleteUtf8Tail, OutputMessageEncoder } from '../src/api/output-message.js';

/*
 * The WebSocket output messages are built as bytes: they must be exactly the UTF-8 of
 * JSON.stringify({type, data}) with data decoded as a StringDecoder decodes the same chunks.
 */

function reference(chunks: Buffer[]): string {
  const decoder = new StringDecoder('utf8');
  let data = '';
  for (const chunk of chunks) data += decoder.write(chunk);
  data += decoder.end();
  return data;
}

/* Feeds chunks, taking a message after every `takeEvery` chunks, and returns the decoded data of all messages. */
/* A message as the client receives it: the UTF-8 bytes of a text frame. */
function bytesOf(message: Buffer | string): Buffer {
  return typeof message === 'string' ? Buffer.from(message, 'utf8') : message;
}

function encoded(type: 'stdout' | 'stderr', chunks: Buffer[], takeEvery: number): { data: string; messages: Buffer[] } {
  const encoder = new OutputMessageEncoder(type);
  const messages: Buffer[] = [];
  chunks.forEach((chunk, index) => {
    encoder.push(chunk);
    if ((index + 1) % takeEvery === 0) {
      const message = encoder.take();
      if (message) messages.push(bytesOf(message));
    }
  });
  const last = encoder.take(true);
  if (last) messages.push(bytesOf(last));
  let data = '';
  for (const message of messages) {
    const parsed = JSON.parse(message.toString('utf8')) as { type: string; data: string };
    assert.deepEqual(Object.keys(parsed), ['type', 'data']);
    assert.equal(parsed.type, type);
    data += parsed.data;
  }
  return { data, messages };
}

function split(bytes: Buffer, sizes: number[]): Buffer[] {
  const chunks: Buffer[] = [];
  let at = 0;
  for (let i = 0; at < bytes.length; i++) {
    const size = sizes[i % sizes.length] as number;
    chunks.push(bytes.subarray(at, at + size));
    at += size;
  }
  return chunks;
}

describe('output messages built as bytes', () => {
  test('are byte for byte JSON.stringify of the text, every control character and quote escaped', () => {
    const every = Buffer.from(Array.from({ length: 128 }, (_, byte) => byte));
    const text = Buffer.concat([every, Buffer.from('"quoted" \\ back\\slash \r\n naïve € 𝄞 \u2028 end', 'utf8')]);
    const encoder = new OutputMessageEncoder('stderr');
    encoder.push(text);
    const message = encoder.take();
    assert.ok(message);
    assert.deepEqual(bytesOf(message), Buffer.from(JSON.stringify({ type: 'stderr', data: text.toString('utf8') }), 'utf8'));
  });

  test('match JSON.stringify on random text at every alignment and length', () => {
    const alphabet = [...Array.from({ length: 128 }, (_, code) => String.fromCharCode(code)), 'é', '€', '𝄞', '\u2028', '\u007f'];
    for (let round = 0; round < 300; round++) {
      const length = round % 70;
      let text = '';
      // Mostly plain letters, as output is, so that whole words without a special byte come up too.
      for (let i = 0; i < length; i++) text += Math.random() < 0.7 ? 'abcdefgh'[i % 8] : alphabet[Math.floor(Math.random() * alphabet.length)];
      const bytes = Buffer.from(text, 'utf8');
      for (let shift = 0; shift < 4; shift++) {
        // A chunk that starts at any offset inside its ArrayBuffer, as frame payloads do.
        const backing = Buffer.alloc(bytes.length + shift);
        bytes.copy(backing, shift);
        const encoder = new OutputMessageEncoder('stdout');
        encoder.push(backing.subarray(shift));
        const message = encoder.take(true);
        const expected = length === 0 ? '' : JSON.stringify({ type: 'stdout', data: text });
        assert.equal(message === undefined ? '' : bytesOf(message).toString('utf8'), expected, `text ${JSON.stringify(text)} at offset ${shift}`);
      }
    }
  });

  test('keep a character split between chunks whole, whatever the split', () => {
    const text = Buffer.from('a€b𝄞cé\r\n'.repeat(40), 'utf8');
    for (const sizes of [[1], [2], [3], [5, 1, 7], [4096]]) {
      const chunks = split(text, sizes);
      for (const takeEvery of [1, 2, 3]) {
        const { data, messages } = encoded('stdout', chunks, takeEvery);
        assert.equal(data, text.toString('utf8'), `sizes ${sizes.join(',')} take every ${takeEvery}`);
        // No message may carry half a character: each one is valid UTF-8 on its own and decodes without U+FFFD.
        for (const message of messages) assert.ok(!message.toString('utf8').includes('\ufffd'));
      }
    }
  });

  test('decode invalid UTF-8 and a character cut off at the end as a StringDecoder does', () => {
    const samples = [
      Buffer.from([0x61, 0xff, 0x62, 0xc0, 0x80, 0xed, 0xa0, 0x80, 0x63]),
      Buffer.from([0x61, 0xe2, 0x82]),
      Buffer.from([0xf0, 0x9d, 0x84]),
      Buffer.from([0x80, 0x80, 0x80, 0x80]),
      Buffer.from([0xf8, 0x88, 0x80, 0x80, 0x80]),
    ];
    for (let seed = 0; seed < 200; seed++) samples.push(randomBytes(1 + (seed % 97)));
    for (const bytes of samples) {
      for (const sizes of [[1], [2], [3], [bytes.length]]) {
        const chunks = split(bytes, sizes);
        assert.equal(encoded('stdout', chunks, 1).data, reference(chunks), `bytes ${bytes.toString('hex')} in chunks of ${sizes.join(',')}`);
      }
    }
  });

  test('hold back only the start of an incomplete character', () => {
    assert.equal(incompleteUtf8Tail(Buffer.from('abc')), 0);
    assert.equal(incompleteUtf8Tail(Buffer.from([0x61, 0xe2])), 1);
    assert.equal(incompleteUtf8Tail(Buffer.from([0x61, 0xe2, 0x82])), 2);
    assert.equal(incompleteUtf8Tail(Buffer.from([0x61, 0xe2, 0x82, 0xac])), 0);
    assert.equal(incompleteUtf8Tail(Buffer.from([0xf0, 0x9d, 0x84])), 3);
    assert.equal(incompleteUtf8Tail(Buffer.from([0xf0, 0x9d, 0x84, 0x9e])), 0);
    assert.equal(incompleteUtf8Tail(Buffer.from([0x80, 0x80, 0x80])), 0);
    assert.equal(incompleteUtf8Tail(Buffer.from([0xff])), 0);
  });
});
