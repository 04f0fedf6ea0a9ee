import { spawn, type ChildProcess } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { cpus, release, totalmem } from 'node:os';
import { processesMatching, REPO_ROOT } from '../../test/support/daemon.js';
import { round, sleep } from './stats.js';

/* Host facts and process memory, read from /proc so the figures match what the kernel accounts. */

export function machineDescription(): string {
  const list = cpus();
  const model = list[0]?.model.trim() ?? 'unknown cpu';
  const gib = (totalmem() / 1024 ** 3).toFixed(1);
  return `${model}, ${list.length} cores, ${gib} GiB RAM, Linux ${release()}`;
}

function statusField(pid: number, field: string): number | undefined {
  try {
    const line = readFileSync(`/proc/${pid}/status`, 'utf8')
      .split('\n')
      .find((entry) => entry.startsWith(`${field}:`));
    const kib = line === undefined ? undefined : Number(/(\d+)/.exec(line)?.[1]);
    return kib === undefined || Number.isNaN(kib) ? undefined : kib / 1024;
  } catch {
    return undefined;
  }
}

export function rssMb(pid: number): number | undefined {
  return statusField(pid, 'VmRSS');
}

function meminfoMb(field: string): number {
  const line = readFileSync('/proc/meminfo', 'utf8')
    .split('\n')
    .find((entry) => entry.startsWith(`${field}:`));
  return Number(/(\d+)/.exec(line ?? '')?.[1] ?? 0) / 1024;
}

export function memAvailableMb(): number {
  return meminfoMb('MemAvailable');
}

/*
 * Waits until the kernel's unreclaimable slab stops moving (under 1 MB in a second, at most
 * timeoutMs): namespaces of sandboxes that just ended are freed asynchronously (network
 * namespaces by a workqueue, after RCU grace periods), and a host figure read meanwhile charges
 * or credits another case's teardown to this one.
 */
export async function settleKernelMemory(timeoutMs = 20_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  let last = meminfoMb('SUnreclaim');
  while (Date.now() < deadline) {
    await sleep(1000);
    const now = meminfoMb('SUnreclaim');
    if (Math.abs(now - last) < 1) return;
    last = now;
  }
}

/*
 * What the kernel charged to the runner cgroups below parent: their processes' pages, page tables,
 * kernel stacks and the kernel objects it accounts to a cgroup (namespaces, mounts, inodes, most
 * slab). Unaccounted kernel memory is not in it, reclaimable caches are: not the host figure, but
 * one that no other process on the host can disturb.
 */
export function cgroupChargedMb(parent: string): number | undefined {
  for (const file of [`/sys/fs/cgroup/memory/${parent}/memory.usage_in_bytes`, `/sys/fs/cgroup/${parent}/memory.current`]) {
    try {
      return Number(readFileSync(file, 'utf8').trim()) / 1024 / 1024;
    } catch {
      // The other cgroup version, or no cgroups.
    }
  }
  return undefined;
}

/* The daemon's node process, found by its unique config path (the harness does not expose its pid). */
export function daemonPid(configPath: string): number | undefined {
  return processesMatching(configPath).find((pid) => {
    try {
      const argv0 = readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0')[0] ?? '';
      return argv0 === process.execPath || argv0.endsWith('/node') || argv0 === 'node';
    } catch {
      return false;
    }
  });
}

export interface FakeNomadProcess {
  port: number;
  origin: string;
  pid: number | undefined;
  setLatency(ms: number): Promise<void>;
  /* POST/GET on the fake's control API (test/fake-nomad/server.ts), JSON both ways. */
  control(method: 'GET' | 'POST' | 'PUT', path: string, body?: unknown): Promise<unknown>;
  stop(): Promise<void>;
}

/*
 * The fake Nomad runs as its own process so that its work (job bookkeeping, spec validation, event
 * stream) neither steals the bench client's event loop nor distorts the claim latencies it measures.
 */
export async function startFakeNomadProcess(port: number, options: { lean?: boolean } = {}): Promise<FakeNomadProcess> {
  const args = ['--import', 'tsx', 'test/fake-nomad/main.ts', '--port', String(port), '--heartbeat-ms', '1000', ...(options.lean === true ? ['--lean'] : [])];
  const child: ChildProcess = spawn(process.execPath, args, {
    cwd: REPO_ROOT,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let output = '';
  child.stdout?.on('data', (chunk: Buffer) => (output += chunk.toString()));
  child.stderr?.on('data', (chunk: Buffer) => (output += chunk.toString()));
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  const origin = `http://127.0.0.1:${port}`;
  const stop = async (): Promise<void> => {
    if (child.exitCode !== null || child.signalCode !== null) return;
    child.kill('SIGTERM');
    // Generous: at 10,000 allocations the fake needs seconds to remove their directories before it exits.
    const done = await Promise.race([exited.then(() => true), sleep(30_000).then(() => false)]);
    if (!done) {
      child.kill('SIGKILL');
      await exited;
    }
  };
  const deadline = Date.now() + 20_000;
  while (!output.includes('listening')) {
    if (child.exitCode !== null) throw new Error(`fake Nomad exited during start-up:\n${output}`);
    if (Date.now() > deadline) {
      await stop();
      throw new Error(`fake Nomad did not start within 20 s:\n${output}`);
    }
    await sleep(50);
  }
  const control = async (method: 'GET' | 'POST' | 'PUT', path: string, body?: unknown): Promise<unknown> => {
    const response = await fetch(`${origin}/__control${path}`, {
      method,
      ...(body === undefined ? {} : { headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) }),
    });
    if (!response.ok) throw new Error(`fake Nomad control ${method} ${path} answered ${response.status}`);
    return response.json();
  };
  return {
    port,
    origin,
    pid: child.pid,
    setLatency: async (ms) => void (await control('PUT', '/latency', { ms })),
    control,
    stop,
  };
}

/* /proc's clock ticks: USER_HZ, 100 on every Linux. */
const CLOCK_TICKS_PER_S = 100;

/* CPU time (user + system, every thread) a process has used so far, in ms; undefined once it is gone. */
export function processCpuMs(pid: number): number | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return ((Number(fields[11]) + Number(fields[12])) * 1000) / CLOCK_TICKS_PER_S;
  } catch {
    return undefined;
  }
}

/*
 * CPU time the daemon and this process (the bench's WebSocket clients) spend within measured
 * stretches: unlike rates on a shared machine, CPU per MB hardly moves with other sessions' load.
 */
export class CpuMeter {
  #daemonMs = 0;
  #clientMs = 0;
  #measured = 0;

  constructor(private readonly daemonPid: number | undefined) {}

  async measure<T>(work: () => Promise<T>): Promise<T> {
    const daemonBefore = this.daemonPid === undefined ? undefined : processCpuMs(this.daemonPid);
    const clientBefore = process.cpuUsage();
    this.#measured += 1;
    try {
      return await work();
    } finally {
      const client = process.cpuUsage(clientBefore);
      this.#clientMs += (client.user + client.system) / 1000;
      const daemonAfter = this.daemonPid === undefined ? undefined : processCpuMs(this.daemonPid);
      if (daemonBefore !== undefined && daemonAfter !== undefined) this.#daemonMs += daemonAfter - daemonBefore;
    }
  }

  /* mbEach: the MB one measured stretch moves. */
  perMb(mbEach: number): { daemon_cpu_ms_per_mb: number; client_cpu_ms_per_mb: number } {
    const mb = Math.max(this.#measured * mbEach, 1e-9);
    return { daemon_cpu_ms_per_mb: round(this.#daemonMs / mb, 2), client_cpu_ms_per_mb: round(this.#clientMs / mb, 2) };
  }
}
