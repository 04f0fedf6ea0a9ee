import assert from 'node:assert/strict';
import { afterEach, beforeEach, describe, test } from 'node:test';
import { PassThrough } from 'node:stream';
import { setImmediate as tick } from 'node:timers/promises';
import { AgentClient, AgentClosedError, AgentProtocolError } from '../src/local/agent/agent-client.js';
import { EventType, encodeFrame, MAX_EVENT_REST, PROTOCOL_VERSION } from '../src/local/frames.js';

/*
 * The daemon's side of the agent protocol, fed hostile input: privileged learner code runs as root
 * beside the agent and might write frames of its own. Whatever arrives, nothing may throw out of
 * the decoder (that would end the whole daemon), and a violation ends that one connection with an
 * AgentProtocolError. No sandbox: a PassThrough pair stands in for the agent's stdin and stdout.
 */

interface Harness {
  client: AgentClient;
  /* What the client wrote to the "agent" (ended or destroyed on a violation). */
  input: PassThrough;
  /* Where the test writes the "agent's" events. */
  output: PassThrough;
  /* Every operation started, settled or not. */
  settled: Array<Promise<unknown>>;
}

function u32(value: number): Buffer {
  const buffer = Buffer.alloc(4);
  buffer.writeUInt32LE(value >>> 0);
  return buffer;
}

const READY = encodeFrame(EventType.ready, 0, u32(PROTOCOL_VERSION));

/* A client with one operation of each kind pending: exec id 1, list 2, read 3, files 4. */
function harness(): Harness {
  const input = new PassThrough();
  const output = new PassThrough();
  input.resume(); // the requests go nowhere
  const client = new AgentClient(input, output);
  const execution = client.exec(['true'], { env: {}, privileged: false }, { onStdout: () => undefined, onStderr: () => undefined });
  const settled: Array<Promise<unknown>> = [
    client.ready,
    execution.result,
    client.list('.', true),
    client.read('file').then(({ stream }) => {
      stream.on('error', () => undefined);
      stream.resume();
      return new Promise((resolve) => stream.on('close', resolve));
    }),
    client.updateFiles({ delete: [], copy: [] }),
  ].map((promise) =>
    promise.then(
      () => 'ok',
      (error: unknown) => error,
    ),
  );
  return { client, input, output, settled };
}

/* Deterministic, so a failure reproduces: mulberry32. */
function random(seed: number): () => number {
  let state = seed >>> 0;
  return () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 2 ** 32;
  };
}

let uncaught: unknown[] = [];
const record = (error: unknown): void => void uncaught.push(error);

describe('agent frames from a hostile agent', () => {
  beforeEach(() => {
    uncaught = [];
    process.on('uncaughtException', record);
  });
  afterEach(() => {
    process.off('uncaughtException', record);
    assert.deepEqual(uncaught, [], 'nothing escaped the decoder');
  });

  /* Feeds the frames, then checks the connection ended with a protocol error and everything pending failed with it. */
  async function expectViolation(frames: Buffer[], pattern: RegExp): Promise<void> {
    const { client, input, output, settled } = harness();
    const closed = new Promise<Error>((resolve) => client.onClose(resolve));
    for (const frame of frames) output.write(frame);
    const error = await closed;
    assert.ok(error instanceof AgentProtocolError, `a protocol error, not ${String(error)}`);
    assert.ok(error instanceof AgentClosedError, 'callers see the agent as gone');
    assert.match(error.message, pattern);
    assert.ok(client.closed);
    assert.ok(input.destroyed, 'the connection to the agent was ended');
    for (const outcome of await Promise.all(settled.slice(1))) {
      assert.ok(outcome === 'ok' || outcome instanceof Error, `settled: ${String(outcome)}`);
    }
    await assert.rejects(client.list('.', false), AgentClosedError);
  }

  test('a RESULT with an empty payload (the forged frame of issue 8) ends the connection, not the daemon', async () => {
    await expectViolation([READY, encodeFrame(EventType.result, 2)], /RESULT of 0 bytes/);
    await expectViolation([READY, encodeFrame(EventType.result, 1, Buffer.from([1, 0]))], /RESULT of 2 bytes/);
  });

  test('short or long fixed-size payloads', async () => {
    await expectViolation([READY, encodeFrame(EventType.exit, 1)], /EXIT of 0 bytes/);
    await expectViolation([READY, encodeFrame(EventType.exit, 1, Buffer.alloc(8))], /EXIT of 8 bytes/);
    await expectViolation([READY, encodeFrame(EventType.fileSize, 3, Buffer.alloc(4))], /FILE_SIZE of 4 bytes/);
    await expectViolation([encodeFrame(EventType.ready, 0)], /malformed READY/);
    await expectViolation([READY, encodeFrame(EventType.outputClosed, 1, Buffer.from('x'))], /has a payload/);
  });

  test('events out of order or twice', async () => {
    await expectViolation([READY, encodeFrame(EventType.data, 3, Buffer.from('x'))], /DATA of 3 before FILE_SIZE/);
    await expectViolation([READY, encodeFrame(EventType.exit, 1, u32(0)), encodeFrame(EventType.exit, 1, u32(0))], /exited twice/);
    await expectViolation(
      [READY, encodeFrame(EventType.stdout, 1, Buffer.from('x')), encodeFrame(EventType.result, 1, u32(2))],
      /RESULT 2 for execution 1 that started/,
    );
    await expectViolation([READY, READY], /READY twice/);
    await expectViolation([encodeFrame(EventType.stdout, 1, Buffer.from('x'))], /before READY/);
    const size = Buffer.alloc(8);
    size.writeBigUInt64LE(2n);
    await expectViolation(
      [READY, encodeFrame(EventType.fileSize, 3, size), encodeFrame(EventType.data, 3, Buffer.from('abc'))],
      /more data than the announced 2 bytes/,
    );
    await expectViolation([READY, encodeFrame(EventType.fileSize, 3, Buffer.alloc(8, 0xff))], /a file size of/);
    await expectViolation([READY, encodeFrame(EventType.listing, 1, Buffer.from('x'))], /event 0x86 for execution 1/);
    await expectViolation([READY, encodeFrame(EventType.stdout, 4, Buffer.from('x'))], /for a FILES request/);
    await expectViolation([READY, encodeFrame(EventType.listing, 2, Buffer.from('f\0')), encodeFrame(EventType.result, 2, u32(0))], /ends inside an entry/);
  });

  test('unknown ids and types, huge lengths', async () => {
    await expectViolation([READY, encodeFrame(EventType.stdout, 99, Buffer.from('x'))], /id 99, which was never used/);
    await expectViolation([READY, encodeFrame(0x42, 1)], /unknown event type 0x42/);
    await expectViolation([READY, encodeFrame(EventType.stdout, 0, Buffer.from('x'))], /never used/);
    const huge = Buffer.alloc(9);
    huge.writeUInt32LE(MAX_EVENT_REST + 1, 0);
    await expectViolation([READY, huge], /bad frame length/);
    await expectViolation([READY, Buffer.from([3, 0, 0, 0, 0x85])], /bad frame length 3/);
  });

  test('late events of an operation that is over are dropped, not a violation', async () => {
    const { client, output, settled } = harness();
    output.write(READY);
    output.write(encodeFrame(EventType.result, 4, u32(0)));
    output.write(encodeFrame(EventType.listing, 4, Buffer.from('late')));
    output.write(encodeFrame(EventType.result, 4, u32(0)));
    await tick();
    assert.equal(client.closed, false);
    output.end();
    await Promise.all(settled);
    assert.ok(client.closed);
  });

  test('thousands of random and truncated frames never throw and end in a closed client with a clear error', async () => {
    const next = random(0x5eed);
    const types = [...Object.values(EventType), 0x00, 0x01, 0x7f, 0x89, 0xff];
    const sizes = [0, 1, 2, 3, 4, 5, 7, 8, 9, 16];
    let violations = 0;
    for (let round = 0; round < 600; round++) {
      const { client, output, settled } = harness();
      const frames: Buffer[] = [];
      if (next() < 0.9) frames.push(READY);
      const count = 1 + Math.floor(next() * 12);
      for (let i = 0; i < count; i++) {
        const type = types[Math.floor(next() * types.length)] ?? 0;
        const id = Math.floor(next() * 7);
        const payload = Buffer.alloc(sizes[Math.floor(next() * sizes.length)] ?? 0);
        for (let j = 0; j < payload.length; j++) payload[j] = next() < 0.5 ? 0 : Math.floor(next() * 256);
        let frame = encodeFrame(type, id, payload);
        if (next() < 0.1) frame = frame.subarray(0, Math.floor(next() * frame.length)); // truncated
        if (next() < 0.03 && frame.length >= 4) frame.writeUInt32LE(Math.floor(next() * 2 ** 32), 0); // any length
        frames.push(frame);
      }
      // Random chunking: the decoder must not care where the reads split the stream.
      const bytes = Buffer.concat(frames);
      for (let offset = 0; offset < bytes.length; ) {
        const size = 1 + Math.floor(next() * 24);
        output.write(bytes.subarray(offset, offset + size));
        offset += size;
      }
      await tick();
      output.end();
      const outcomes = await Promise.all(settled);
      assert.ok(client.closed, `round ${round}: closed`);
      const reason = await new Promise<Error>((resolve) => client.onClose(resolve));
      assert.ok(reason instanceof AgentClosedError, `round ${round}: ${String(reason)}`);
      assert.ok(reason.message.length > 0);
      if (reason instanceof AgentProtocolError) violations++;
      for (const outcome of outcomes) assert.ok(outcome === 'ok' || outcome instanceof Error, `round ${round}: ${String(outcome)}`);
    }
    assert.ok(violations > 300, `most rounds break the protocol (${violations})`);
  });
});
