import assert from 'node:assert/strict';
import { chmodSync, statSync } from 'node:fs';
import { after, before, describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { AgentRequestError, type AgentClient, type AgentExecOptions, E2BIG } from '../src/local/agent/agent-client.js';
import { type AgentSandbox, startAgentSandbox } from './support/agent-sandbox.js';

/*
 * The agent's file operations against what learner code can leave in a sandbox: links out of the
 * workspace, device nodes, FIFOs, sockets, /proc magic links, deep trees, huge listings, and
 * background output after an execution. Device probes use /dev/full (never /dev/null) and put its
 * mode back should it ever change.
 */

const ENV = { PATH: '/usr/local/bin:/usr/bin:/bin', LANG: 'C.UTF-8' };
const UNPRIVILEGED: AgentExecOptions = { env: ENV, privileged: false };
const PRIVILEGED: AgentExecOptions = { env: ENV, privileged: true };

async function run(
  client: AgentClient,
  script: string,
  options: AgentExecOptions = UNPRIVILEGED,
): Promise<{ exitCode: number; stdout: string; stderr: string }> {
  let stdout = '';
  let stderr = '';
  const execution = client.exec(['/bin/sh', '-c', script], options, {
    onStdout: (chunk) => (stdout += chunk.toString()),
    onStderr: (chunk) => (stderr += chunk.toString()),
  });
  const { exitCode } = await execution.result;
  return { exitCode, stdout, stderr };
}

function copyFile(client: AgentClient, path: string, content = 'x'): Promise<void> {
  return client.updateFiles({ delete: [], copy: [{ path, isDirectory: false, content: Buffer.from(content) }] });
}

const refused =
  (pattern: RegExp) =>
  (error: unknown): boolean =>
    error instanceof AgentRequestError && pattern.test(error.message);

describe('agent file operations stay confined', () => {
  let sandbox: AgentSandbox;
  let client: AgentClient;
  const hostFull = statSync('/dev/full');
  before(async () => {
    sandbox = await startAgentSandbox();
    client = sandbox.client;
  });
  after(async () => {
    await sandbox?.stop();
    // A failed probe must not leave the host changed.
    const now = statSync('/dev/full');
    if (now.mode !== hostFull.mode) chmodSync('/dev/full', hostFull.mode & 0o7777);
    assert.equal(now.mode, hostFull.mode, 'the host /dev/full kept its mode');
    assert.equal(now.uid, hostFull.uid, 'the host /dev/full kept its owner');
  });

  test('a copy to a device, directly or through a learner link, is refused and changes nothing', async () => {
    const inside = async (): Promise<string> => (await run(client, 'stat -c "%a %u %g" /dev/full')).stdout;
    const modeBefore = await inside();
    await run(client, 'ln -s /dev d');
    await assert.rejects(copyFile(client, 'd/full'), refused(/cannot write d\/full: not a regular file/));
    await assert.rejects(copyFile(client, '/dev/full'), refused(/not a regular file/));
    await assert.rejects(copyFile(client, '/workspace/d/../dev/full'), refused(/not a regular file/));
    // A directory copy onto the link is not a chmod 1777 of /dev.
    await assert.rejects(
      client.updateFiles({ delete: [], copy: [{ path: 'd/', isDirectory: true, content: Buffer.alloc(0) }] }),
      refused(/cannot write d\/: not a directory/),
    );
    assert.equal(await inside(), modeBefore);
    assert.equal(statSync('/dev/full').mode, hostFull.mode);
    await assert.rejects(client.read('d/full'), refused(/not a regular file/));
  });

  test('a FIFO is refused at once, and so is a socket', async () => {
    await run(client, 'mkfifo fifo && perl -MIO::Socket::UNIX -e \'IO::Socket::UNIX->new(Type => SOCK_STREAM(), Local => "sock", Listen => 1) or die $!\'');
    const started = Date.now();
    await assert.rejects(copyFile(client, 'fifo'), refused(/cannot write fifo: not a regular file/));
    assert.ok(Date.now() - started < 10_000, 'the write to a FIFO did not hang');
    await assert.rejects(copyFile(client, 'sock'), refused(/cannot write sock: not a regular file/));
    await assert.rejects(client.read('fifo'), refused(/not a regular file/));
    assert.equal((await run(client, '[ -p fifo ] && [ -S sock ] && echo kept')).stdout, 'kept\n');
  });

  test('/proc magic links lead nowhere', async () => {
    await assert.rejects(copyFile(client, '/proc/self/root/workspace/escape'), refused(/Too many levels of symbolic links/));
    await assert.rejects(client.read('/proc/1/root/etc/hostname'), refused(/Too many levels of symbolic links/));
    await run(client, 'ln -s /proc/self/root r');
    await assert.rejects(copyFile(client, 'r/workspace/escape'), refused(/Too many levels of symbolic links/));
  });

  test('links made by learner code resolve inside the sandbox, as they do for its programs', async () => {
    await run(client, 'mkdir -p /tmp/target && ln -s /tmp/target t && ln -s ../../../../../tmp/target up');
    await copyFile(client, 't/through-link', 'a');
    await copyFile(client, 'up/through-dots', 'b');
    assert.equal((await run(client, 'cat /tmp/target/through-link /tmp/target/through-dots')).stdout, 'ab');
    // Overwriting a file through a final link would write wherever it points: a link is not a regular file.
    await run(client, 'ln -s /tmp/target/through-link direct');
    await assert.rejects(copyFile(client, 'direct'), refused(/not a regular file/));
  });

  test('deletion removes links, never what they point to, and ./* spares dotfiles', async () => {
    await run(
      client,
      'mkdir -p /tmp/keep/inner && touch /tmp/keep/inner/f /tmp/keep/g && ln -s /tmp/keep k && ln -s /tmp/keep .dotlink && mkdir sub && ln -s /tmp/keep sub/k',
    );
    await client.updateFiles({ delete: ['k', 'sub'], copy: [] });
    assert.equal(
      (await run(client, 'ls /tmp/keep /tmp/keep/inner; [ -e k ] || [ -L k ] || echo k-gone; [ -e sub ] || echo sub-gone')).stdout,
      '/tmp/keep:\ng\ninner\n\n/tmp/keep/inner:\nf\nk-gone\nsub-gone\n',
    );
    await run(client, 'ln -s /tmp/keep k2');
    await client.updateFiles({ delete: ['./*'], copy: [] });
    assert.equal((await run(client, 'ls -A /workspace; ls /tmp/keep')).stdout, '.dotlink\ng\ninner\n');
    // Through a link in the parent, inside the sandbox: what rm -rf k/inner would remove.
    await client.updateFiles({ delete: ['.dotlink/inner'], copy: [] });
    assert.equal((await run(client, 'ls /tmp/keep')).stdout, 'g\n');
    await assert.rejects(client.updateFiles({ delete: ['/'], copy: [] }), refused(/cannot delete \/: Invalid argument/));
    await assert.rejects(client.updateFiles({ delete: ['sub/..'], copy: [] }), refused(/Invalid argument/));
  });

  test('a chain of thousands of directories (paths past PATH_MAX) is listed and deleted', async () => {
    const made = await run(
      client,
      'mkdir deep && cd deep && perl -e \'for (1..3000) { mkdir "ab" or die $!; chdir "ab" or die $! } open my $f, ">", "leaf" or die $!\' && echo made',
    );
    assert.equal(made.stdout, 'made\n', made.stderr);
    const entries = await client.list('deep', true);
    assert.equal(entries.length, 3002);
    const leaf = entries.at(-1);
    assert.equal(leaf?.name, `deep/${'ab/'.repeat(3000)}leaf`);
    assert.ok((leaf?.name.length ?? 0) > 4096);
    await client.updateFiles({ delete: ['deep'], copy: [] });
    assert.equal((await run(client, '[ -e deep ] || echo gone')).stdout, 'gone\n');
    await run(client, 'mkdir deep2 && cd deep2 && perl -e \'for (1..5000) { mkdir "ab" or die $!; chdir "ab" or die $! }\'');
    // Deeper, the paths alone pass the byte cap: a clear error, not a crash.
    await assert.rejects(client.list('deep2', true), (error: unknown) => error instanceof AgentRequestError && error.status === E2BIG);
    await client.updateFiles({ delete: ['./*'], copy: [] });
    assert.equal((await run(client, 'ls /workspace')).stdout, '');
  });

  test('a listing past its caps stops with E2BIG; the agent goes on serving', async () => {
    await run(client, 'mkdir many && cd many && i=0; while [ $i -lt 300 ]; do : > "file-with-a-rather-long-name-$i"; i=$((i+1)); done');
    await assert.rejects(
      client.list('many', true, { privileged: true }, { maxEntries: 100, maxBytes: 2 ** 20 }),
      (error: unknown) => error instanceof AgentRequestError && error.status === E2BIG && error.message === 'the listing has more than 100 entries',
    );
    await assert.rejects(
      client.list('many', true, { privileged: true }, { maxEntries: 1000, maxBytes: 4096 }),
      (error: unknown) => error instanceof AgentRequestError && error.status === E2BIG && error.message === 'the listing has more than 4096 bytes',
    );
    assert.equal((await client.list('many', true)).length, 301);
    assert.equal((await client.list('many', true, { privileged: true }, { maxEntries: 301, maxBytes: 2 ** 20 })).length, 301);
  });

  test('output of background processes after the execution ended is dropped by the agent; they run on', async () => {
    const stdout = sandbox.child.stdout;
    assert.ok(stdout);
    const result = await run(client, '(while true; do echo xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx; done) & echo started');
    assert.equal(result.exitCode, 0);
    await sleep(100); // what was in flight before DISCARD arrived
    let bytes = 0;
    const count = (chunk: Buffer): void => void (bytes += chunk.length);
    stdout.on('data', count);
    await sleep(500);
    stdout.off('data', count);
    assert.ok(bytes < 1000, `${bytes} bytes of events after the execution ended`);
    // The writer still runs: its output is read (not left to fill the pipe) and dropped.
    const alive = await run(client, 'ps -eo stat=,args= | grep "[s]h -c (while" | head -1');
    assert.match(alive.stdout, /^[RS]/, 'the background loop runs');
    await run(client, 'pkill -f "while true" || true', PRIVILEGED);
  });
});
