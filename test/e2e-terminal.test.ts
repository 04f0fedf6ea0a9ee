import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import type WebSocket from 'ws';
import { CodeOceanClient, environmentSpec, type ExecutionResult } from './support/codeocean-client.js';
import type { WsMessage } from './support/contract.js';
import { startDaemon, type ConfigTree, type Daemon } from './support/daemon.js';
import { startFakeNomad, type FakeNomad } from './fake-nomad/index.js';

/*
 * Same program, same messages: every execution has a terminal for stdin and stdout and stderr kept
 * apart, on the local backend (the agent's pty) and on Nomad (exec with tty=true plus Poseidon's
 * stderr FIFO, against the fake Nomad, which runs execs on a real pty). Each program runs on both;
 * the WebSocket messages are compared after joining consecutive messages of one type (chunking is
 * the transport's), and checked against what a terminal gives.
 */

const TOKEN = 'terminal-token';
const ENV_ID = 31;
/* The same interpreter on both: the fake Nomad runs on the host, whose PATH may hold a shim first. */
const PY = '/usr/bin/python3';

interface Backend {
  name: string;
  daemon: Daemon;
  client: CodeOceanClient;
  runnerId: string;
}

let fake: FakeNomad | undefined;
const backends: Backend[] = [];

async function backend(name: string, config: ConfigTree): Promise<Backend> {
  const daemon = await startDaemon({ token: TOKEN, config });
  const client = new CodeOceanClient(daemon.baseUrl, TOKEN);
  const created = await client.putEnvironment(environmentSpec(ENV_ID, { prewarmingPoolSize: 1 }));
  assert.ok(created.status === 201 || created.status === 204, created.text);
  return { name, daemon, client, runnerId: await client.claim(ENV_ID, 300, 60_000) };
}

before(async () => {
  fake = await startFakeNomad({ heartbeatMs: 200 });
  backends.push(await backend('local', {}));
  backends.push(await backend('nomad', { nomad: { enabled: true, address: '127.0.0.1', port: fake.port, requesttimeout: 3000 }, local: { enabled: false } }));
});

after(async () => {
  for (const { daemon } of backends) await daemon.stop().catch(() => undefined);
  await fake?.close();
});

/* Consecutive messages of one type joined: how output is cut into messages is not behaviour. */
function joined(messages: WsMessage[]): Array<{ type: string; data?: unknown }> {
  const result: Array<{ type: string; data?: unknown }> = [];
  for (const message of messages) {
    const last = result[result.length - 1];
    const data = 'data' in message ? message.data : undefined;
    if (last && last.type === message.type && (message.type === 'stdout' || message.type === 'stderr')) last.data = `${String(last.data)}${String(data)}`;
    else result.push(data === undefined ? { type: message.type } : { type: message.type, data });
  }
  return result;
}

/* Sends each input once its trigger has appeared in the output (a prompt), as a learner would type it. */
function typing(inputs: Array<{ after: string; send: string }>): (message: WsMessage, socket: WebSocket) => void {
  let output = '';
  let next = 0;
  return (message, socket) => {
    if (message.type === 'stdout' || message.type === 'stderr') output += message.data;
    for (let input = inputs[next]; input !== undefined && output.includes(input.after); input = inputs[next]) {
      socket.send(input.send, { binary: false });
      output = output.slice(output.indexOf(input.after) + input.after.length);
      next += 1;
    }
  };
}

interface Case {
  name: string;
  command: string;
  inputs?: Array<{ after: string; send: string }>;
  timeLimit?: number;
  check(messages: Array<{ type: string; data?: unknown }>, result: ExecutionResult): void;
}

const CASES: Case[] = [
  {
    name: 'an input prompt and the echo of what was typed',
    command: `${PY} -c 'name = input("name? "); print("hello", name)'`,
    inputs: [{ after: 'name? ', send: 'Ada\n' }],
    // CPython's input() writes its prompt to stderr when it reads a terminal without readline:
    // in Poseidon too, where it arrives through the stderr FIFO.
    check: (messages) =>
      assert.deepEqual(messages, [
        { type: 'start' },
        { type: 'stderr', data: 'name? ' },
        { type: 'stdout', data: 'Ada\r\nhello Ada\r\n' },
        { type: 'exit', data: 0 },
      ]),
  },
  {
    name: 'stdout and stderr interleaved, apart',
    command: 'echo out1; sleep 0.3; echo err1 >&2; sleep 0.3; echo out2; sleep 0.3; echo err2 >&2; exit 4',
    check: (messages) =>
      assert.deepEqual(messages, [
        { type: 'start' },
        { type: 'stdout', data: 'out1\r\n' },
        { type: 'stderr', data: 'err1\r\n' },
        { type: 'stdout', data: 'out2\r\n' },
        { type: 'stderr', data: 'err2\r\n' },
        { type: 'exit', data: 4 },
      ]),
  },
  {
    name: "line endings are the terminal's: \\n becomes \\r\\n",
    command: "printf 'a\\nb\\r\\nc'",
    check: (messages) => assert.deepEqual(messages, [{ type: 'start' }, { type: 'stdout', data: 'a\r\nb\r\r\nc' }, { type: 'exit', data: 0 }]),
  },
  {
    name: 'isatty: stdin and stdout are a terminal, stderr is not',
    command: `${PY} -c 'import os; print(os.isatty(0), os.isatty(1), os.isatty(2), os.environ["TERM"])'`,
    check: (messages) => assert.deepEqual(messages, [{ type: 'start' }, { type: 'stdout', data: 'True True False xterm\r\n' }, { type: 'exit', data: 0 }]),
  },
  {
    name: 'a Python REPL fed two lines',
    command: `${PY} -q`,
    inputs: [
      { after: '>>> ', send: 'x = 6 * 7\n' },
      { after: '>>> ', send: 'print(x)\n' },
      { after: '>>> ', send: 'exit()\n' },
    ],
    check: (messages) => {
      const stdout = messages
        .filter((m) => m.type === 'stdout')
        .map((m) => String(m.data))
        .join('');
      const stderr = messages
        .filter((m) => m.type === 'stderr')
        .map((m) => String(m.data))
        .join('');
      assert.match(stdout + stderr, /x = 6 \* 7\r\n/, 'the typed line is echoed');
      assert.match(stdout, /print\(x\)\r\n42\r\n/);
      assert.deepEqual(messages[messages.length - 1], { type: 'exit', data: 0 });
    },
  },
  {
    name: 'a program reading until EOF: ^D at the start of a line ends stdin',
    command: `${PY} -c 'import sys; data = sys.stdin.read(); print(len(data), repr(data))'`,
    inputs: [
      { after: '', send: 'one\n' },
      { after: 'one\r\n', send: 'two\n\x04' },
    ],
    check: (messages) =>
      assert.deepEqual(messages, [{ type: 'start' }, { type: 'stdout', data: "one\r\ntwo\r\n8 'one\\ntwo\\n'\r\n" }, { type: 'exit', data: 0 }]),
  },
  {
    name: 'binary and invalid UTF-8 output',
    command: "printf '\\377\\376ok\\000\\342\\202\\254\\n'",
    check: (messages) => assert.deepEqual(messages, [{ type: 'start' }, { type: 'stdout', data: '\ufffd\ufffdok\u0000€\r\n' }, { type: 'exit', data: 0 }]),
  },
  {
    name: 'a long line',
    command: "head -c 200000 /dev/zero | tr '\\0' x; echo",
    check: (messages) => assert.deepEqual(messages, [{ type: 'start' }, { type: 'stdout', data: `${'x'.repeat(200_000)}\r\n` }, { type: 'exit', data: 0 }]),
  },
  {
    // Messages are escaped from the bytes (src/api/output-message.ts): 420 KB, several messages
    // and many agent frames, so characters of 2, 3 and 4 bytes are cut between chunks somewhere.
    name: 'a long run of multi-byte characters, quotes, backslashes and control characters',
    command: `${PY} -c "import sys; sys.stdout.buffer.write(b'\\xc3\\xa9\\xe2\\x82\\xac\\xf0\\x9d\\x84\\x9e\\x22\\x5c\\x09\\x01x' * 30000 + b'\\n')"`,
    check: (messages) =>
      assert.deepEqual(messages, [{ type: 'start' }, { type: 'stdout', data: `${'é€𝄞"\\\t\x01x'.repeat(30_000)}\r\n` }, { type: 'exit', data: 0 }]),
  },
  {
    name: 'a time limit',
    command: 'echo started; sleep 30',
    timeLimit: 1,
    check: (messages, result) => {
      assert.deepEqual(messages, [{ type: 'start' }, { type: 'stdout', data: 'started\r\n' }, { type: 'timeout' }]);
      assert.equal(result.gotTimeout, true);
    },
  },
];

describe('executions have a terminal, and both backends send the same messages', () => {
  for (const entry of CASES) {
    test(entry.name, async () => {
      const outcomes = await Promise.all(
        backends.map(async ({ name, client, runnerId }) => {
          const result = await client.run(runnerId, entry.command, {
            timeLimit: entry.timeLimit ?? 10,
            guardMs: 20_000,
            ...(entry.inputs ? { onMessage: typing(entry.inputs) } : {}),
          });
          return { name, result, messages: joined(result.messages) };
        }),
      );
      for (const { name, result, messages } of outcomes) {
        try {
          entry.check(messages, result);
        } catch (error) {
          throw new Error(`${name}: ${(error as Error).message}\n${JSON.stringify(messages)}`);
        }
      }
      const [local, nomad] = outcomes;
      assert.deepEqual(nomad?.messages, local?.messages, 'the same messages on both backends');
    });
  }
});
