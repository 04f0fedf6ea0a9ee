import { spawn, spawnSync } from 'node:child_process';
import { closeSync, mkdtempSync, openSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import Fastify from 'fastify';
import pino from 'pino';
import { createCgroupManager, type RunnerCgroup } from '../../src/local/cgroups.js';
import { DEFAULT_PATH } from '../../src/local/runner-image.js';
import { DataFd, sandboxBwrapArguments } from '../../src/local/sandbox.js';
import { sandboxAccounts } from '../../src/local/sandbox-accounts.js';
import { seccompProgram } from '../../src/local/seccomp.js';
import { BenchClient } from './client.js';
import { nowMs, round, summarize, type Summary } from './stats.js';

/*
 * The physical limits each case is compared with, measured in the same run because a shared VM's
 * speed drifts between runs: ratios within one run stay meaningful where absolute times do not.
 */

export interface Baseline extends Summary {
  what: string;
  ops_per_s?: number;
  mb_per_s?: number;
}

/*
 * A raw sandbox with the isolation of a runner, so that the comparison is like for like: the same
 * namespaces (user and network ones included, made by bwrap here and by the spawner in the daemon),
 * the same root, /proc masks, sized scratch file systems, capabilities and seccomp program, with
 * /bin/true as pid 1 instead of the agent. What the daemon adds on top (cgroups, the spawner, the
 * agent's handshake, bookkeeping) is its overhead.
 */
const RAW_SANDBOX_SHAPE = { rootfs: undefined, accounts: sandboxAccounts({ uid: 1000, gid: 1000 }), memoryLimitMiB: 512, workspaceSizeMiB: 256 };

export const RAW_BWRAP_ARGS = ['--unshare-user', '--uid', '0', '--gid', '0', '--unshare-net', ...sandboxBwrapArguments(RAW_SANDBOX_SHAPE), '--', '/bin/true'];

export const RAW_SANDBOX_WHAT = "raw bwrap sandboxes of /bin/true with a runner's namespaces (user, net, pid, ipc, uts, cgroup), root, mounts and seccomp";

/* The blobs bwrap reads at its data fds (passwd, group, seccomp), written once, opened per spawn. */
let dataFiles: Array<{ fd: number; path: string }> | undefined;

function rawDataFiles(): Array<{ fd: number; path: string }> {
  if (dataFiles !== undefined) return dataFiles;
  const directory = mkdtempSync(join(tmpdir(), 'bench-raw-sandbox-'));
  const accounts = sandboxAccounts({ uid: 1000, gid: 1000 });
  const blobs: Array<[number, string | Buffer]> = [
    [DataFd.passwd, accounts.passwd],
    [DataFd.group, accounts.group],
    [DataFd.seccomp, seccompProgram()],
  ];
  dataFiles = blobs.map(([fd, bytes]) => {
    const path = join(directory, String(fd));
    writeFileSync(path, bytes);
    return { fd, path };
  });
  process.once('exit', () => rmSync(directory, { recursive: true, force: true }));
  return dataFiles;
}

function runRawSandbox(bwrap: string): Promise<number> {
  const files = rawDataFiles();
  const opened = files.map((file) => ({ fd: file.fd, handle: openSync(file.path, 'r') }));
  const stdio: Array<'ignore' | number> = ['ignore', 'ignore', 'ignore'];
  for (const { fd, handle } of opened) {
    while (stdio.length < fd) stdio.push('ignore');
    stdio[fd] = handle;
  }
  return new Promise<number>((resolve, reject) => {
    const child = spawn(bwrap, RAW_BWRAP_ARGS, { stdio });
    for (const { handle } of opened) closeSync(handle);
    child.once('error', reject);
    child.once('exit', (code) => resolve(code ?? -1));
  });
}

export async function rawBwrapOnce(bwrap = 'bwrap'): Promise<void> {
  const code = await runRawSandbox(bwrap);
  if (code !== 0) throw new Error(`raw bwrap exited with ${code}`);
}

export async function rawBwrapSpawn(n: number, bwrap = 'bwrap'): Promise<Baseline> {
  await rawBwrapOnce(bwrap);
  const samples: number[] = [];
  for (let i = 0; i < n; i++) {
    const start = nowMs();
    await rawBwrapOnce(bwrap);
    samples.push(nowMs() - start);
  }
  const summary = summarize(samples);
  return { what: `one at a time: ${RAW_SANDBOX_WHAT}`, ...summary, ops_per_s: round(1000 / Math.max(summary.p50_ms, 0.001), 1) };
}

/* Many raw sandboxes at once for a fixed time: the most sandboxes per second this host can start. */
export async function rawBwrapParallel(durationMs: number, concurrency: number, bwrap = 'bwrap'): Promise<Baseline> {
  const samples: number[] = [];
  const deadline = Date.now() + durationMs;
  const started = nowMs();
  await Promise.all(
    Array.from({ length: concurrency }, async () => {
      while (Date.now() < deadline) {
        const start = nowMs();
        await rawBwrapOnce(bwrap);
        samples.push(nowMs() - start);
      }
    }),
  );
  const elapsed = (nowMs() - started) / 1000;
  return { what: `${concurrency} at a time: ${RAW_SANDBOX_WHAT}`, ...summarize(samples), ops_per_s: round(samples.length / elapsed, 1) };
}

/* `count` raw sandboxes, `concurrency` at a time: what refilling a pool of that size costs at least. */
export async function rawBwrapBatch(count: number, concurrency: number, bwrap = 'bwrap'): Promise<number> {
  let next = 0;
  const start = nowMs();
  await Promise.all(
    Array.from({ length: Math.min(concurrency, count) }, async () => {
      while (next < count) {
        next += 1;
        await rawBwrapOnce(bwrap);
      }
    }),
  );
  return nowMs() - start;
}

const STREAM_LINE = '0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ';

/* The command every streaming case runs: printable ASCII, so byte counts survive JSON framing unchanged. */
export function streamCommand(bytes: number): string {
  return `yes ${STREAM_LINE} | head -c ${bytes}`;
}

/* What the daemon streams of it: executions write to a terminal, which sends every "\n" as "\r\n". */
export function terminalBytes(bytes: number): number {
  return bytes + Math.floor(bytes / (STREAM_LINE.length + 1));
}

/*
 * Reads the command's output straight from its stdout, with nothing between: from a pipe in Node
 * (what output could reach without a terminal), or from a terminal's master (terminal-read.c,
 * the kernel's own ceiling for a program whose stdout is a terminal, as every execution's is).
 */
export type OutputChannel = 'pipe' | 'terminal';

let terminalReader: string | undefined;

/* Compiles bench/lib/terminal-read.c once per run (gcc comes with the set-up script). */
function terminalReaderBinary(): string {
  if (terminalReader !== undefined) return terminalReader;
  const directory = mkdtempSync(join(tmpdir(), 'poseidon-bench-'));
  process.once('exit', () => rmSync(directory, { recursive: true, force: true }));
  const output = join(directory, 'terminal-read');
  const source = fileURLToPath(new URL('terminal-read.c', import.meta.url));
  const compiled = spawnSync('gcc', ['-O2', '-o', output, source], { encoding: 'utf8' });
  if (compiled.status !== 0) throw new Error(`cannot compile ${source}: ${compiled.stderr}`);
  terminalReader = output;
  return output;
}

export function outputReadOnce(bytes: number, channel: OutputChannel = 'pipe'): Promise<number> {
  return new Promise((resolve, reject) => {
    const expected = channel === 'pipe' ? bytes : terminalBytes(bytes);
    const child =
      channel === 'pipe'
        ? spawn('/bin/sh', ['-c', streamCommand(bytes)], { stdio: ['ignore', 'pipe', 'ignore'] })
        : spawn(terminalReaderBinary(), [streamCommand(bytes)], { stdio: ['ignore', 'pipe', 'ignore'] });
    let received = 0;
    let report = '';
    child.stdout.on('data', (chunk: Buffer) => {
      if (channel === 'pipe') received += chunk.length;
      else report += chunk.toString();
    });
    child.once('error', reject);
    child.once('close', () => {
      if (channel === 'terminal') received = Number(report);
      if (received !== expected) reject(new Error(`${channel} read ${received} of ${expected} bytes`));
      else resolve(received);
    });
  });
}

/* One round of `streams` reads of `bytes` each, at once: how long it took. */
export async function outputReadRound(bytes: number, streams = 1, channel: OutputChannel = 'pipe'): Promise<number> {
  const start = nowMs();
  await Promise.all(Array.from({ length: streams }, () => outputReadOnce(bytes, channel)));
  return nowMs() - start;
}

/* The baseline of rounds measured by outputReadRound, here or alternating with a case's rounds. */
export function outputReadBaseline(samples: number[], bytes: number, streams = 1, channel: OutputChannel = 'pipe', note = ''): Baseline {
  const summary = summarize(samples);
  const mb = (bytes * streams) / 1e6;
  const source = channel === 'pipe' ? 'pipe' : 'terminal (pty master)';
  return {
    what: `${streams === 1 ? `raw ${source} read of ${mb} MB` : `raw ${source} reads, ${streams} × ${bytes / 1e6} MB at once`}${note}`,
    ...summary,
    mb_per_s: round(mb / (Math.max(summary.p50_ms, 0.001) / 1000), 1),
  };
}

export async function outputRead(n: number, bytes: number, streams = 1, channel: OutputChannel = 'pipe'): Promise<Baseline> {
  await outputReadOnce(Math.min(bytes, 1024 * 1024), channel);
  const samples: number[] = [];
  for (let i = 0; i < n; i++) samples.push(await outputReadRound(bytes, streams, channel));
  return outputReadBaseline(samples, bytes, streams, channel);
}

/* An in-process Fastify no-op route over real HTTP with the same client: the cost of one request. */
export async function fastifyNoop(n: number): Promise<Baseline> {
  const app = Fastify({ logger: false });
  app.get('/noop', async (_request, reply) => reply.code(204).send());
  await app.listen({ host: '127.0.0.1', port: 0 });
  const address = app.server.address();
  if (address === null || typeof address === 'string') throw new Error('no Fastify address');
  const client = new BenchClient(`http://127.0.0.1:${address.port}`, 4);
  try {
    for (let i = 0; i < 50; i++) await client.rawGet('/noop');
    const samples: number[] = [];
    for (let i = 0; i < n; i++) {
      const start = nowMs();
      const status = await client.rawGet('/noop');
      samples.push(nowMs() - start);
      if (status !== 204) throw new Error(`no-op route answered ${status}`);
    }
    const summary = summarize(samples);
    return { what: 'in-process Fastify no-op route over HTTP', ...summary, ops_per_s: round(1000 / Math.max(summary.p50_ms, 0.001), 1) };
  } finally {
    await client.close();
    await app.close();
  }
}

/*
 * The program of a codeocean_session round: reads a typed line and prints 2 KB (32 lines of 64
 * bytes), from three small files as CodeOcean copies an exercise.
 */
export const SESSION_INPUT = 'learner\n';
export const SESSION_OUTPUT_BYTES = 2048;
export const SESSION_FILES = [
  {
    path: 'main.py',
    content:
      'from helper import line_of\n\ngreeting = open("greeting.txt").read().strip()\nname = input()\nfor i in range(32):\n    print(line_of(greeting, name, i))\n',
  },
  { path: 'helper.py', content: 'def line_of(greeting, name, i):\n    return (f"{i:02d} {greeting}, {name}! " * 8)[:63]\n' },
  { path: 'greeting.txt', content: 'Hello\n' },
];

/* agent/poseidon-spawner.c's SANDBOX_NICE: every sandbox process runs at this nice level. */
const SANDBOX_NICE = 10;

function pythonOnce(directory: string, cgroup: RunnerCgroup | undefined): Promise<number> {
  return new Promise((resolve, reject) => {
    /*
     * Like a runner's execution: /bin/sh -c joins a cgroup with a runner's limits under the daemon's
     * cgroup parent, then execs the program at the sandboxes' nice level (the spawner's SANDBOX_NICE),
     * with the sandbox's PATH (the same python3, not a version manager's shim of the bench user). On a
     * shared host, other load then weighs on the baseline as on learner code.
     */
    const script = `for f in "$@"; do echo $$ > "$f"; done; exec nice -n ${SANDBOX_NICE} python3 main.py`;
    const child = spawn('/bin/sh', ['-c', script, 'sh', ...(cgroup?.procsFiles ?? [])], {
      cwd: directory,
      env: { PATH: DEFAULT_PATH, LANG: 'C.UTF-8' },
      stdio: ['pipe', 'pipe', 'ignore'],
    });
    let received = 0;
    child.stdout.on('data', (chunk: Buffer) => (received += chunk.length));
    child.once('error', reject);
    child.stdin.end(SESSION_INPUT);
    child.once('close', (code) => {
      if (code !== 0 || received !== SESSION_OUTPUT_BYTES) reject(new Error(`python3 exited ${String(code)} after ${received} bytes`));
      else resolve(received);
    });
  });
}

/* The session's Python program started directly on the host, `concurrency` at a time, for a while. */
export async function pythonOnHost(concurrency: number, durationMs: number, cgroupParent: string): Promise<Baseline> {
  const directory = mkdtempSync(join(tmpdir(), 'bench-python-'));
  const manager = await createCgroupManager('auto', cgroupParent, pino({ level: 'silent' }));
  // One cgroup per worker, as each learner's runner has its own (the bench environments' limits).
  const cgroups = await Promise.all(
    Array.from({ length: concurrency }, (_, index) =>
      manager.create(`bench-baseline-${process.pid}-${index}`, { memoryBytes: 512 * 1024 * 1024, cpuShares: 2000, pids: 512 }),
    ),
  );
  try {
    for (const file of SESSION_FILES) writeFileSync(join(directory, file.path), file.content);
    await pythonOnce(directory, cgroups[0]);
    const samples: number[] = [];
    const deadline = Date.now() + durationMs;
    const started = nowMs();
    await Promise.all(
      Array.from({ length: concurrency }, async (_, index) => {
        while (Date.now() < deadline) {
          const start = nowMs();
          await pythonOnce(directory, cgroups[index]);
          samples.push(nowMs() - start);
        }
      }),
    );
    const elapsed = (nowMs() - started) / 1000;
    return {
      what: `the same Python program on the host (sh -c, the sandboxes' nice level, a runner's cgroup each), ${concurrency} at a time`,
      ...summarize(samples),
      ops_per_s: round(samples.length / elapsed, 1),
    };
  } finally {
    rmSync(directory, { recursive: true, force: true });
    await Promise.all(cgroups.map((cgroup) => cgroup?.destroy()));
  }
}
