import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { after, before, describe, test } from 'node:test';
import { AgentRequestError, type AgentClient, type AgentExecOptions, OUTPUT_AFTER_EXIT_MS } from '../src/local/agent/agent-client.js';
import { EventType, encodeFrame, FrameParser } from '../src/local/frames.js';
import { type AgentSandbox, startAgentSandbox } from './support/agent-sandbox.js';
import { seccompProgram } from '../src/local/seccomp.js';
import type { FileHeader } from '../src/dto/runner.js';
import { parseFindOutput } from '../src/runner/workspace-files.js';

/*
 * The in-sandbox agent, started the way the daemon starts it: as the command of a real bwrap
 * sandbox, with exactly its capabilities. Every test talks to it through AgentClient.
 */

const ENV = { PATH: '/usr/local/bin:/usr/bin:/bin', LANG: 'C.UTF-8' };
const UNPRIVILEGED: AgentExecOptions = { env: ENV, privileged: false };
const PRIVILEGED: AgentExecOptions = { env: ENV, privileged: true };
const KEPT_CAPS_MASK = 0x4fbn; // chown dac_override fowner fsetid kill setgid setuid net_bind_service

interface Ran {
  exitCode: number;
  stdout: string;
  stderr: string;
}

async function run(client: AgentClient, script: string, options: AgentExecOptions = UNPRIVILEGED, stdin?: string): Promise<Ran> {
  let stdout = '';
  let stderr = '';
  const execution = client.exec(['/bin/sh', '-c', script], options, {
    onStdout: (chunk) => (stdout += chunk.toString()),
    onStderr: (chunk) => (stderr += chunk.toString()),
  });
  if (stdin !== undefined) {
    execution.writeStdin(Buffer.from(stdin));
    execution.closeStdin();
  }
  const { exitCode } = await execution.result;
  return { exitCode, stdout, stderr };
}

function capability(status: string, name: string): bigint {
  const match = new RegExp(`^${name}:\\s*([0-9a-f]+)$`, 'm').exec(status);
  assert.ok(match?.[1], `${name} missing from /proc/self/status`);
  return BigInt(`0x${match[1]}`);
}

/* Host pids of a process's descendants, from /proc. */
function descendantsOf(pid: number): number[] {
  const children = readFileSync(`/proc/${pid}/task/${pid}/children`, 'utf8').trim().split(' ').filter(Boolean).map(Number);
  return children.flatMap((child) => [child, ...descendantsOf(child)]);
}

function hostProcessExists(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

describe('frame parser', () => {
  test('handles partial and coalesced chunks', () => {
    const frames = [
      encodeFrame(EventType.stdout, 7, Buffer.from('hello')),
      encodeFrame(EventType.outputClosed, 7),
      encodeFrame(EventType.exit, 8, Buffer.from([1, 0, 0, 0])),
    ];
    const bytes = Buffer.concat(frames);
    for (const size of [1, 2, 3, 5, 9, 13, bytes.length]) {
      const parser = new FrameParser();
      const seen = [];
      for (let offset = 0; offset < bytes.length; offset += size) seen.push(...parser.push(bytes.subarray(offset, offset + size)));
      assert.deepEqual(
        seen.map((frame) => [frame.type, frame.id, frame.payload.toString('hex')]),
        [
          [EventType.stdout, 7, Buffer.from('hello').toString('hex')],
          [EventType.outputClosed, 7, ''],
          [EventType.exit, 8, '01000000'],
        ],
        `chunk size ${size}`,
      );
    }
  });
});

describe('sandbox agent', () => {
  let sandbox: AgentSandbox;
  let client: AgentClient;
  before(async () => {
    sandbox = await startAgentSandbox();
    client = sandbox.client;
  });
  after(async () => {
    await sandbox?.stop();
  });

  test('exec: stdout, stderr, stdin and the exit code', async () => {
    const result = await run(client, 'read line; echo "out:$line"; echo "err:$line" >&2; exit 42', UNPRIVILEGED, 'hello\n');
    assert.deepEqual(result, { exitCode: 42, stdout: 'out:hello\n', stderr: 'err:hello\n' });
  });

  test('exec: only the given environment and cwd', async () => {
    const result = await run(client, 'env | sort; pwd', { env: { PATH: '/bin', ONLY: 'this' }, privileged: false, cwd: '/tmp' });
    assert.equal(result.stdout, 'ONLY=this\nPATH=/bin\nPWD=/tmp\n/tmp\n');
  });

  test('exec: a missing command fails with 127 and a message', async () => {
    let stderr = '';
    const execution = client.exec(['no-such-command'], UNPRIVILEGED, { onStdout: () => undefined, onStderr: (chunk) => (stderr += chunk.toString()) });
    assert.equal((await execution.result).exitCode, 127);
    assert.match(stderr, /no-such-command: No such file or directory/);
  });

  test('exec: unprivileged runs as 65534 without any capability', async () => {
    const result = await run(client, 'id -u; id -g; id -G; cat /proc/self/status; cat /proc/self/oom_score_adj');
    const [uid, gid, groups] = result.stdout.split('\n');
    assert.deepEqual([uid, gid, groups], ['65534', '65534', '65534']);
    for (const set of ['CapInh', 'CapPrm', 'CapEff', 'CapBnd', 'CapAmb']) assert.equal(capability(result.stdout, set), 0n, set);
    assert.match(result.stdout, /^NoNewPrivs:\s*1$/m);
    assert.match(result.stdout, /\n500\n$/, 'learner code is raised above the agent for the OOM killer');
  });

  test('exec: privileged runs as root with only the kept capabilities', async () => {
    const result = await run(client, 'id -u; cat /proc/self/status', PRIVILEGED);
    assert.equal(result.stdout.split('\n')[0], '0');
    for (const set of ['CapPrm', 'CapEff', 'CapBnd']) assert.equal(capability(result.stdout, set), KEPT_CAPS_MASK, set);
    assert.equal(capability(result.stdout, 'CapInh'), 0n);
    assert.equal(capability(result.stdout, 'CapAmb'), 0n);
    assert.match(result.stdout, /^NoNewPrivs:\s*1$/m);
    // Kept: chown. Not kept: mknod, sys_admin (mount).
    const probe = await run(
      client,
      'touch /tmp/f && chown 65534 /tmp/f && echo chown-ok; mknod /tmp/n c 1 3 2>/dev/null || echo mknod-denied; mount -t tmpfs x /mnt 2>/dev/null || echo mount-denied',
      PRIVILEGED,
    );
    assert.equal(probe.stdout, 'chown-ok\nmknod-denied\nmount-denied\n');
  });

  test('exec: kill gives 128 + signal and reaches the whole process group', async () => {
    await assertKillEndsTree(client, 'sleep 100 & echo started; wait', UNPRIVILEGED);
  });

  test('exec: a background process holding the output does not block the result', async () => {
    const started = Date.now();
    // Far shorter than the background sleep, with room for a loaded machine.
    const result = await run(client, 'sleep 60 & echo done');
    assert.equal(result.exitCode, 0);
    assert.equal(result.stdout, 'done\n');
    assert.ok(Date.now() - started < 20_000, `took ${Date.now() - started} ms`);
    await run(client, 'pkill -x sleep || true', PRIVILEGED);
  });

  test('exec: concurrent executions keep their output apart', async () => {
    const results = await Promise.all(
      Array.from({ length: 8 }, (_, index) => run(client, `for i in 1 2 3 4 5; do echo ${index}-$i; sleep 0.0$index; done; exit ${index}`)),
    );
    results.forEach((result, index) => {
      assert.equal(result.exitCode, index);
      assert.equal(result.stdout, [1, 2, 3, 4, 5].map((i) => `${index}-${i}\n`).join(''));
    });
  });

  test('exec: large output arrives whole and in order, also while paused for a while', async () => {
    const chunks: Buffer[] = [];
    const execution = client.exec(['/bin/sh', '-c', 'head -c 3000000 /dev/zero | tr "\\0" x; echo end'], UNPRIVILEGED, {
      onStdout: (chunk) => chunks.push(chunk),
      onStderr: () => undefined,
    });
    execution.pauseOutput();
    await new Promise((resolve) => setTimeout(resolve, 300));
    const whilePaused = chunks.reduce((sum, chunk) => sum + chunk.length, 0);
    assert.ok(whilePaused < 1_000_000, `paused, yet ${whilePaused} bytes arrived`);
    execution.resumeOutput();
    assert.equal((await execution.result).exitCode, 0);
    const output = Buffer.concat(chunks).toString();
    assert.equal(output.length, 3_000_004);
    assert.ok(output.endsWith('xend\n'));
  });

  test('files: ./* spares dotfiles, literal deletes, nested directories 1777, files 0744 owned by root', async () => {
    await client.updateFiles({
      delete: [],
      copy: [
        { path: '.hidden', isDirectory: false, content: Buffer.from('keep') },
        { path: 'old.txt', isDirectory: false, content: Buffer.from('old') },
        { path: 'olddir/x', isDirectory: false, content: Buffer.from('x') },
        { path: '/tmp/literal/inner', isDirectory: false, content: Buffer.from('y') },
      ],
    });
    await client.updateFiles({
      delete: ['./*', '/tmp/literal'],
      copy: [
        { path: 'src/main/App.java', isDirectory: false, content: Buffer.from('class App {}\n') },
        { path: 'empty/', isDirectory: true, content: Buffer.alloc(0) },
        { path: '/workspace/abs.txt', isDirectory: false, content: Buffer.alloc(0) },
      ],
    });
    const result = await run(
      client,
      'cd /workspace && find . -mindepth 1 -printf "%p %m %u:%g %s\\n" | sort; [ -e /tmp/literal ] || echo literal-gone; cat .hidden src/main/App.java',
    );
    assert.equal(
      result.stdout,
      [
        './.hidden 744 root:root 4',
        './abs.txt 744 root:root 0',
        './empty 1777 root:root 40',
        './src 1777 root:root 60',
        './src/main 1777 root:root 60',
        './src/main/App.java 744 root:root 13',
        'literal-gone',
        'keepclass App {}',
        '',
      ].join('\n'),
    );
  });

  test('files: a read-only path gives an error naming it, and the unprivileged learner can read copies', async () => {
    await assert.rejects(
      client.updateFiles({ delete: [], copy: [{ path: '/usr/evil', isDirectory: false, content: Buffer.from('x') }] }),
      (error: unknown) => error instanceof AgentRequestError && error.status !== 0 && /\/usr\/evil: Read-only file system/.test(error.message),
    );
    await client.updateFiles({ delete: [], copy: [{ path: 'readable.txt', isDirectory: false, content: Buffer.from('yes') }] });
    assert.equal((await run(client, 'cat readable.txt; echo more >> readable.txt 2>/dev/null || echo no-write')).stdout, 'yesno-write\n');
  });

  test('list: the same fields and paths as GNU find', async () => {
    await client.updateFiles({
      delete: ['./*'],
      copy: [
        { path: 'd/b.txt', isDirectory: false, content: Buffer.from('bee') },
        { path: 'a.txt', isDirectory: false, content: Buffer.from('a') },
      ],
    });
    await run(client, 'ln -s d/b.txt link && mkfifo fifo && mkdir -p d/e && chmod 4755 a.txt && touch d/e/f', PRIVILEGED);
    for (const [start, recursive] of [
      ['./', true],
      ['./', false],
      ['d', true],
      ['/workspace/d/', true],
      ['link', false],
    ] as const) {
      const fromAgent = await client.list(start, recursive);
      const fromFind = await run(
        client,
        `find ${start} ${recursive ? '' : '-maxdepth 1'} -printf '%y\\0%s\\0%T@\\0%M\\0%u\\0%g\\0%p\\0%l\\0' | od -An -v -tx1`,
      );
      const findBytes = Buffer.from(fromFind.stdout.replace(/\s+/g, ''), 'hex');
      // Parsed entries keep whole seconds of %T@, whose fractions differ in digits (find prints 10, the agent 9).
      const sorted = (entries: FileHeader[]): FileHeader[] => [...entries].sort((a, b) => a.name.localeCompare(b.name));
      assert.deepEqual(sorted(fromAgent), sorted(parseFindOutput(findBytes)), `find ${start} recursive=${recursive}`);
    }
    const entries = await client.list('./', true);
    assert.equal(entries[0]?.name, './', 'the start directory comes first');
    const link = entries.find((entry) => entry.name === './link');
    assert.deepEqual(
      { ...link, modificationTime: 0 },
      {
        name: './link',
        entryType: 'l',
        linkTarget: 'd/b.txt',
        size: 7,
        modificationTime: 0,
        permissions: 'rwxrwxrwx',
        owner: 'root',
        group: 'root',
      },
    );
    assert.equal(entries.find((entry) => entry.name === './a.txt')?.permissions, 'rwsr-xr-x');
    assert.equal(entries.find((entry) => entry.name === './fifo')?.entryType, 'p');
  });

  test('list: a missing start path fails; an unprivileged listing checks access as the learner', async () => {
    await assert.rejects(
      client.list('missing', true),
      (error: unknown) => error instanceof AgentRequestError && /cannot list missing: No such file/.test(error.message),
    );
    await run(client, 'mkdir -p /tmp/secret/inner && chmod 700 /tmp/secret', PRIVILEGED);
    const privileged = await client.list('/tmp/secret', true);
    assert.deepEqual(
      privileged.map((entry) => entry.name),
      ['/tmp/secret', '/tmp/secret/inner'],
    );
    await assert.rejects(client.list('/tmp/secret', true, { privileged: false }), /cannot list \/tmp\/secret: Permission denied/);
    const visible = await client.list('/tmp', false, { privileged: false });
    assert.ok(
      visible.some((entry) => entry.name === '/tmp/secret'),
      'the directory itself is listed',
    );
  });

  test('read: an existing file, a large one, a missing one, a directory and a FIFO', async () => {
    await client.updateFiles({ delete: [], copy: [{ path: 'r/hello.txt', isDirectory: false, content: Buffer.from('hello world') }] });
    const small = await client.read('r/hello.txt');
    assert.equal(small.size, 11);
    assert.equal(Buffer.concat(await small.stream.toArray()).toString(), 'hello world');

    await run(client, 'head -c 5000000 /dev/urandom > big.bin');
    const big = await client.read('/workspace/big.bin');
    assert.equal(big.size, 5_000_000);
    const bytes = Buffer.concat(await big.stream.toArray());
    assert.equal(bytes.length, 5_000_000);
    const check = await run(client, 'md5sum < big.bin');
    const { createHash } = await import('node:crypto');
    assert.equal(check.stdout.split(' ')[0], createHash('md5').update(bytes).digest('hex'));

    await assert.rejects(
      client.read('r/missing'),
      (error: unknown) => error instanceof AgentRequestError && /cannot read r\/missing: No such file/.test(error.message),
    );
    await assert.rejects(client.read('r'), (error: unknown) => error instanceof AgentRequestError && /not a regular file/.test(error.message));
    await run(client, 'mkfifo r/pipe');
    await assert.rejects(client.read('r/pipe'), (error: unknown) => error instanceof AgentRequestError && /not a regular file/.test(error.message));

    // Unprivileged reads are checked as the learner.
    await run(client, 'echo secret > /tmp/root-only && chmod 600 /tmp/root-only', PRIVILEGED);
    await assert.rejects(client.read('/tmp/root-only', { privileged: false }), /Permission denied/);
    assert.equal((await client.read('/tmp/root-only')).size, 7);

    // A stream given up early cancels the read, and the agent goes on serving.
    const cancelled = await client.read('big.bin');
    cancelled.stream.destroy();
    assert.equal((await run(client, 'echo alive')).stdout, 'alive\n');
  });
});

describe('agent lifetime', () => {
  test('closing its stdin kills every execution and ends the sandbox', async () => {
    const sandbox = await startAgentSandbox();
    try {
      let stdout = '';
      const execution = sandbox.client.exec(['/bin/sh', '-c', 'echo $$; exec sleep 1000'], UNPRIVILEGED, {
        onStdout: (chunk) => (stdout += chunk.toString()),
        onStderr: () => undefined,
      });
      while (!stdout.includes('\n')) await new Promise((resolve) => setTimeout(resolve, 5));
      // Find the host pid of the sleep: a child of the agent, which is a child of bwrap's pid 1.
      const bwrapPid = sandbox.child.pid ?? 0;
      const sleepPid = descendantsOf(bwrapPid).find((pid) => readFileSync(`/proc/${pid}/comm`, 'utf8').trim() === 'sleep');
      assert.ok(sleepPid, 'the sleep runs');
      const result = execution.result.catch((error: Error) => error);
      await sandbox.stop();
      assert.equal(sandbox.child.exitCode !== null || sandbox.child.signalCode !== null, true);
      // The kernel tears a pid namespace down asynchronously after its init died: allow it a moment.
      const deadline = Date.now() + 3000;
      while (hostProcessExists(sleepPid) && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 20));
      assert.equal(hostProcessExists(sleepPid), false, 'the execution died with the agent');
      assert.ok((await result) instanceof Error, 'the pending result rejects');
      await assert.rejects(sandbox.client.list('.', false), /agent/);
    } finally {
      sandbox.child.kill('SIGKILL');
    }
  });
});

/*
 * Executions with a terminal (EXEC flag tty), as the daemon runs every learner execution: in a
 * sandbox under the seccomp filter, so opening /dev/ptmx, TIOCGPTPEER and TIOCSCTTY are shown to
 * pass it, and as the learner's uid, who must be able to use (and reopen) the slave.
 */
describe('sandbox agent: terminal executions', () => {
  let sandbox: AgentSandbox;
  let client: AgentClient;
  const LEARNER: AgentExecOptions = { env: { ...ENV, TERM: 'xterm' }, privileged: false, uid: 1000, gid: 1000, tty: { stderr: 'pipe' } };
  before(async () => {
    sandbox = await startAgentSandbox([], { seccomp: seccompProgram() });
    client = sandbox.client;
  });
  after(async () => {
    await sandbox?.stop();
  });

  test('stdin and stdout are the controlling terminal, 80x24, owned by the learner; stderr is a pipe', async () => {
    const script = 'test -t 0 && test -t 1 && ! test -t 2 && echo tty; stat -c %u:%a "$(tty)"; stty size; echo x > /dev/tty; ps -o tty= -p $$';
    const result = await run(client, script, LEARNER);
    assert.deepEqual(result, { exitCode: 0, stdout: 'tty\r\n1000:620\r\n24 80\r\nx\r\npts/0\r\n', stderr: '' });
  });

  test("echo, \\r\\n and line discipline are the terminal's; stderr lines end in \\r\\n too", async () => {
    let stdout = '';
    let stderr = '';
    const execution = client.exec(['/bin/sh', '-c', 'printf "name? "; read name; echo "hi $name"; echo "oops" >&2'], LEARNER, {
      onStdout: (chunk) => (stdout += chunk.toString()),
      onStderr: (chunk) => (stderr += chunk.toString()),
    });
    while (!stdout.includes('name? ')) await new Promise((resolve) => setTimeout(resolve, 5));
    execution.writeStdin(Buffer.from('ab\x7fc\n')); // DEL is the terminal's erase character
    assert.equal((await execution.result).exitCode, 0);
    assert.equal(stdout, 'name? ab\b \bc\r\nhi ac\r\n');
    assert.equal(stderr, 'oops\r\n');
  });

  test('stderr on the terminal when asked', async () => {
    const result = await run(client, 'echo out; echo err >&2', { ...LEARNER, tty: { stderr: 'terminal' } });
    assert.deepEqual(result, { exitCode: 0, stdout: 'out\r\nerr\r\n', stderr: '' });
  });

  test('output still in the terminal when the process ends while paused comes before its exit', async () => {
    let stdout = '';
    const execution = client.exec(['/bin/sh', '-c', 'echo $$ > /tmp/leader; read go; head -c 8000 /dev/zero | tr "\\0" y'], LEARNER, {
      onStdout: (chunk) => (stdout += chunk.toString()),
      onStderr: () => undefined,
    });
    // PAUSE reaches the agent before the line that lets the process write: its 8,000 bytes stay
    // in the terminal, unread, until RESUME.
    execution.pauseOutput();
    execution.writeStdin(Buffer.from('go\n'));
    // Ends once the agent reaped the paused process (kill -0 holds for a zombie).
    const reaped = await run(
      client,
      'while [ ! -s /tmp/leader ]; do sleep 0.01; done; p=$(cat /tmp/leader); while kill -0 "$p" 2>/dev/null; do sleep 0.01; done',
      LEARNER,
    );
    assert.equal(reaped.exitCode, 0);
    // The agent stopped right after RESUME is sent: an EXIT sent ahead of the held-back output
    // would end the execution after the daemon's short wait for late output, losing that output.
    const agentPid = descendantsOf(sandbox.child.pid ?? 0).find((pid) => readFileSync(`/proc/${pid}/comm`, 'utf8').trim() === 'agent');
    assert.ok(agentPid, 'the agent runs');
    process.kill(agentPid, 'SIGSTOP');
    let ended = false;
    try {
      execution.resumeOutput();
      const result = execution.result.then(() => (ended = true));
      await Promise.race([result, new Promise((resolve) => setTimeout(resolve, OUTPUT_AFTER_EXIT_MS + 1000))]);
      assert.equal(ended, false, 'the execution ended while its output was still unread');
    } finally {
      process.kill(agentPid, 'SIGCONT');
    }
    assert.equal((await execution.result).exitCode, 0);
    assert.equal(stdout, `go\r\n${'y'.repeat(8000)}`);
  });

  test('closing stdin types ^D: EOF for a reader at the start of a line', async () => {
    const result = await run(client, 'cat; echo "cat ended $?"', LEARNER, 'line\n');
    assert.equal(result.stdout, 'line\r\nline\r\ncat ended 0\r\n');
  });

  test("the terminal's ^C and ^\\ signal the foreground process group", async () => {
    let stdout = '';
    const execution = client.exec(['/bin/sh', '-c', 'trap "echo quit; exit 3" QUIT; echo ready; while :; do sleep 0.05; done'], LEARNER, {
      onStdout: (chunk) => (stdout += chunk.toString()),
      onStderr: () => undefined,
    });
    while (!stdout.includes('ready')) await new Promise((resolve) => setTimeout(resolve, 5));
    execution.writeStdin(Buffer.from([0x1c])); // Poseidon's way to stop an execution: SIGQUIT through the terminal
    assert.equal((await execution.result).exitCode, 3);
    assert.match(stdout, /quit/);
  });

  test('kill still ends the whole process tree', async () => {
    await assertKillEndsTree(client, 'trap "" HUP; (trap "" HUP; sleep 100) & sleep 100 & echo started; wait', LEARNER);
  });

  test('binary output passes the terminal (with \\n as \\r\\n)', async () => {
    const chunks: Buffer[] = [];
    const execution = client.exec(['/bin/sh', '-c', 'printf "\\377\\376\\000A\\nB"'], LEARNER, {
      onStdout: (chunk) => chunks.push(chunk),
      onStderr: () => undefined,
    });
    await execution.result;
    assert.deepEqual(Buffer.concat(chunks), Buffer.from([0xff, 0xfe, 0x00, 0x41, 0x0d, 0x0a, 0x42]));
  });
});

/* Starts a script that prints "started" and leaves sleeps behind, kills it: 137, and no sleep survives. */
async function assertKillEndsTree(client: AgentClient, script: string, options: AgentExecOptions): Promise<void> {
  let stdout = '';
  const execution = client.exec(['/bin/sh', '-c', script], options, {
    onStdout: (chunk) => (stdout += chunk.toString()),
    onStderr: () => undefined,
  });
  while (!stdout.includes('started')) await new Promise((resolve) => setTimeout(resolve, 5));
  execution.kill();
  assert.equal((await execution.result).exitCode, 137);
  const left = await run(client, 'ps -eo comm= | grep -c "^sleep$" || true');
  assert.equal(left.stdout.trim(), '0', 'every sleep was killed with the group');
}
