import { spawn, spawnSync } from 'node:child_process';
import { existsSync, lstatSync, mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import Fastify from 'fastify';
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

const HOST_SYSTEM_DIRS = ['usr', 'bin', 'sbin', 'lib', 'lib32', 'lib64', 'libx32', 'opt'];

/* The same root as a runner built from the host (src/local/sandbox.ts): /usr read-only, merged-/usr links. */
function hostRootArgs(): string[] {
  const args: string[] = [];
  for (const entry of HOST_SYSTEM_DIRS) {
    const hostPath = `/${entry}`;
    if (!existsSync(hostPath)) continue;
    if (lstatSync(hostPath).isSymbolicLink()) args.push('--symlink', `usr/${entry}`, hostPath);
    else args.push('--ro-bind', hostPath, hostPath);
  }
  return args;
}

export const RAW_BWRAP_ARGS = [
  '--unshare-pid',
  '--unshare-ipc',
  '--unshare-uts',
  '--unshare-net',
  '--die-with-parent',
  ...hostRootArgs(),
  '--proc',
  '/proc',
  '--dev',
  '/dev',
  '--tmpfs',
  '/workspace',
  '--chdir',
  '/workspace',
  '--',
  '/bin/sh',
  '-c',
  'true',
];

function runToExit(file: string, args: string[]): Promise<number> {
  return new Promise((resolve, reject) => {
    const child = spawn(file, args, { stdio: 'ignore' });
    child.once('error', reject);
    child.once('exit', (code) => resolve(code ?? -1));
  });
}

export async function rawBwrapOnce(bwrap = 'bwrap'): Promise<void> {
  const code = await runToExit(bwrap, RAW_BWRAP_ARGS);
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
  return { what: 'raw bwrap spawn of /bin/sh -c true, same namespaces and root', ...summary, ops_per_s: round(1000 / Math.max(summary.p50_ms, 0.001), 1) };
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
  return { what: `raw bwrap spawns, ${concurrency} at a time`, ...summarize(samples), ops_per_s: round(samples.length / elapsed, 1) };
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
  const output = join(mkdtempSync(join(tmpdir(), 'poseidon-bench-')), 'terminal-read');
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

export async function outputRead(n: number, bytes: number, streams = 1, channel: OutputChannel = 'pipe'): Promise<Baseline> {
  await outputReadOnce(Math.min(bytes, 1024 * 1024), channel);
  const samples: number[] = [];
  for (let i = 0; i < n; i++) {
    const start = nowMs();
    await Promise.all(Array.from({ length: streams }, () => outputReadOnce(bytes, channel)));
    samples.push(nowMs() - start);
  }
  const summary = summarize(samples);
  const mb = (bytes * streams) / 1e6;
  const source = channel === 'pipe' ? 'pipe' : 'terminal (pty master)';
  return {
    what: streams === 1 ? `raw ${source} read of ${mb} MB` : `raw ${source} reads, ${streams} × ${bytes / 1e6} MB at once`,
    ...summary,
    mb_per_s: round(mb / (Math.max(summary.p50_ms, 0.001) / 1000), 1),
  };
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
