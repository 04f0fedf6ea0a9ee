import { spawn } from 'node:child_process';
import { existsSync, lstatSync } from 'node:fs';
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

/* Reads the same command's output straight from a pipe in Node: the ceiling for streaming it. */
export function pipeReadOnce(bytes: number): Promise<number> {
  return new Promise((resolve, reject) => {
    const child = spawn('/bin/sh', ['-c', streamCommand(bytes)], { stdio: ['ignore', 'pipe', 'ignore'] });
    let received = 0;
    child.stdout.on('data', (chunk: Buffer) => (received += chunk.length));
    child.once('error', reject);
    child.once('close', () => {
      if (received !== bytes) reject(new Error(`pipe read ${received} of ${bytes} bytes`));
      else resolve(received);
    });
  });
}

export async function pipeRead(n: number, bytes: number, streams = 1): Promise<Baseline> {
  await pipeReadOnce(Math.min(bytes, 1024 * 1024));
  const samples: number[] = [];
  for (let i = 0; i < n; i++) {
    const start = nowMs();
    await Promise.all(Array.from({ length: streams }, () => pipeReadOnce(bytes)));
    samples.push(nowMs() - start);
  }
  const summary = summarize(samples);
  const mb = (bytes * streams) / 1e6;
  return {
    what: streams === 1 ? `raw pipe read of ${mb} MB` : `raw pipe reads, ${streams} × ${bytes / 1e6} MB at once`,
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
