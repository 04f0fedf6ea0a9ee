/*
 * Where an idle runner's host memory goes (not a test): node --import tsx bench/idle-accounting.ts [N] [CYCLES]
 * Starts the local daemon, fills a pool of N (default 200) idle runners CYCLES times (default 3) and prints, per runner:
 * each sandbox process's private memory (smaps_rollup), kernel stacks and page tables, the kernel
 * slab caches that grew, per-cpu memory and page cache, next to the drop in MemAvailable.
 */
import { readdirSync, readFileSync } from 'node:fs';
import { parentOf, startDaemon } from '../test/support/daemon.js';
import { BenchClient, environmentSpec } from './lib/client.js';
import { until } from './lib/context.js';
import { sleep } from './lib/stats.js';
import { daemonPid } from './lib/system.js';

const size = Number(process.argv[2] ?? 200);
const KIB = 1024;

function meminfo(): Record<string, number> {
  const values: Record<string, number> = {};
  for (const line of readFileSync('/proc/meminfo', 'utf8').split('\n')) {
    const match = /^(\S+):\s+(\d+)/.exec(line);
    if (match?.[1] !== undefined) values[match[1]] = Number(match[2]) * KIB;
  }
  return values;
}

/* Bytes each slab cache holds in its slabs (what the kernel cannot give back without freeing objects). */
function slabs(): Record<string, number> {
  const values: Record<string, number> = {};
  for (const line of readFileSync('/proc/slabinfo', 'utf8').split('\n').slice(2)) {
    const fields = line.split(/\s+/);
    const name = fields[0];
    const pagesPerSlab = Number(fields[5]);
    const numSlabs = Number(fields[14]);
    if (name && Number.isFinite(numSlabs)) values[name] = (values[name] ?? 0) + numSlabs * pagesPerSlab * 4096;
  }
  return values;
}

function children(): Map<number, number[]> {
  const map = new Map<number, number[]>();
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    const parent = parentOf(Number(entry));
    if (parent === undefined) continue;
    map.set(parent, [...(map.get(parent) ?? []), Number(entry)]);
  }
  return map;
}

function fields(file: string): Record<string, number> {
  const values: Record<string, number> = {};
  try {
    for (const line of readFileSync(file, 'utf8').split('\n')) {
      const match = /^(\w+):\s+(\d+) kB/.exec(line);
      if (match?.[1] !== undefined) values[match[1]] = Number(match[2]) * KIB;
    }
  } catch {
    // Gone meanwhile.
  }
  return values;
}

function comm(pid: number): string {
  try {
    return readFileSync(`/proc/${pid}/comm`, 'utf8').trim();
  } catch {
    return '?';
  }
}

interface ProcessFigures {
  count: number;
  rss: number;
  pss: number;
  privateDirty: number;
  anon: number;
  pageTables: number;
  kernelStack: number;
}

/* The sandbox processes below the spawner, by depth (1 = outer bwrap, 2 = sandbox pid 1, ...). */
function sandboxProcesses(daemon: number): Map<string, ProcessFigures> {
  const tree = children();
  const spawner = (tree.get(daemon) ?? []).find((pid) => comm(pid).startsWith('poseidon-spawn'));
  const groups = new Map<string, ProcessFigures>();
  if (spawner === undefined) return groups;
  const visit = (pid: number, depth: number): void => {
    const key = `depth ${depth}: ${comm(pid)}`;
    const status = fields(`/proc/${pid}/status`);
    const rollup = fields(`/proc/${pid}/smaps_rollup`);
    const group = groups.get(key) ?? { count: 0, rss: 0, pss: 0, privateDirty: 0, anon: 0, pageTables: 0, kernelStack: 0 };
    group.count += 1;
    group.rss += status.VmRSS ?? 0;
    group.pss += rollup.Pss ?? 0;
    group.privateDirty += (rollup.Private_Dirty ?? 0) + (rollup.Private_Clean ?? 0);
    group.anon += rollup.Anonymous ?? 0;
    group.pageTables += status.VmPTE ?? 0;
    // Every task has a THREAD_SIZE kernel stack (16 KiB on x86-64), shown in meminfo's KernelStack only.
    group.kernelStack += 16 * KIB;
    groups.set(key, group);
    for (const child of tree.get(pid) ?? []) visit(child, depth + 1);
  };
  for (const child of tree.get(spawner) ?? []) visit(child, 1);
  return groups;
}

const mb = (bytes: number): string => (bytes / 1024 / 1024).toFixed(3);
const kb = (bytes: number): string => (bytes / 1024).toFixed(1);

/* Waits until unreclaimable slab stops moving: ended namespaces are freed asynchronously. */
async function settle(): Promise<void> {
  let last = meminfo().SUnreclaim ?? 0;
  for (let i = 0; i < 30; i++) {
    await sleep(1000);
    const now = meminfo().SUnreclaim ?? 0;
    if (Math.abs(now - last) < 1024 * 1024) return;
    last = now;
  }
}

interface Snapshot {
  mem: Record<string, number>;
  slab: Record<string, number>;
  rss: number;
  /* The runner cgroups' charges (v1): nothing else on the host moves these. */
  charged: Record<string, number>;
}

function charged(parent: string): Record<string, number> {
  const base = `/sys/fs/cgroup/memory/${parent}`;
  const values: Record<string, number> = {};
  try {
    for (const line of readFileSync(`${base}/memory.stat`, 'utf8').split('\n')) {
      const [key, value] = line.split(' ');
      if (key?.startsWith('total_') && value !== undefined) values[key] = Number(value);
    }
    values.usage = Number(readFileSync(`${base}/memory.usage_in_bytes`, 'utf8'));
    values.kmem = Number(readFileSync(`${base}/memory.kmem.usage_in_bytes`, 'utf8'));
  } catch {
    // No v1 memory controller here.
  }
  return values;
}

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor((sorted.length - 1) / 2)] ?? 0;
}

/*
 * Other sessions on a shared host move every host-wide figure; each fill and each removal of the
 * pool is one sample of every delta, and the median of them is printed.
 */
const cycles = Number(process.argv[3] ?? 3);
const daemon = await startDaemon({ config: {}, startTimeoutMs: 30_000 });
const client = new BenchClient(daemon.origin);
try {
  const pid = daemonPid(daemon.configPath);
  if (pid === undefined) throw new Error('daemon pid not found');
  const snapshot = (): Snapshot => ({ mem: meminfo(), slab: slabs(), rss: fields(`/proc/${pid}/status`).VmRSS ?? 0, charged: charged(daemon.cgroupParent) });
  const deltas: Array<{ full: Snapshot; empty: Snapshot }> = [];
  let processes = new Map<string, ProcessFigures>();
  await settle();
  let empty = snapshot();
  for (let cycle = 0; cycle < cycles; cycle++) {
    await client.putEnvironment(environmentSpec(4, size));
    const full = await until(async () => ((await client.poolOf(4))?.idleRunners ?? 0) >= size, Date.now() + 120_000, 250);
    if (!full) throw new Error(`pool did not reach ${size}`);
    await sleep(2000);
    await settle();
    const filled = snapshot();
    deltas.push({ full: filled, empty });
    processes = sandboxProcesses(pid);
    await client.putEnvironment(environmentSpec(4, 0));
    await until(async () => ((await client.poolOf(4))?.idleRunners ?? 0) === 0, Date.now() + 60_000, 250);
    await settle();
    empty = snapshot();
    deltas.push({ full: filled, empty });
  }
  const delta = (of: (snap: Snapshot) => number): number => median(deltas.map(({ full, empty: before }) => of(full) - of(before)));

  const per = (bytes: number): string => `${kb(bytes / size).padStart(8)} KiB`;
  console.log(`${size} idle runners; figures per runner, medians of ${deltas.length} fills and removals\n`);
  console.log(`MemAvailable drop         ${per(-delta((snap) => snap.mem.MemAvailable ?? 0))}`);
  console.log(`daemon RSS growth         ${per(delta((snap) => snap.rss))}`);
  for (const key of ['AnonPages', 'Shmem', 'Cached', 'Slab', 'SReclaimable', 'SUnreclaim', 'KernelStack', 'PageTables', 'Percpu', 'VmallocUsed']) {
    console.log(`meminfo ${key.padEnd(17)} ${per(delta((snap) => snap.mem[key] ?? 0))}`);
  }
  console.log('\ncharged to the runner cgroups (v1 memory controller):');
  for (const key of ['usage', 'kmem', 'total_rss', 'total_cache', 'total_shmem', 'total_mapped_file']) {
    console.log(`  ${key.padEnd(24)} ${per(delta((snap) => snap.charged[key] ?? 0))}`);
  }
  console.log('\nprocesses (sum over sandboxes, per runner):');
  for (const [key, figures] of [...processes.entries()].sort()) {
    console.log(
      `  ${key.padEnd(28)} n=${(figures.count / size).toFixed(2)} rss ${per(figures.rss)} pss ${per(figures.pss)} private ${per(figures.privateDirty)} anon ${per(figures.anon)} pte ${per(figures.pageTables)} kstack ${per(figures.kernelStack)}`,
    );
  }
  console.log('\nslab caches that grew (per runner):');
  const caches = Object.keys(deltas[0]?.full.slab ?? {})
    .map((name) => [name, delta((snap) => snap.slab[name] ?? 0)] as const)
    .filter(([, bytes]) => bytes > 512 * size)
    .sort((a, b) => b[1] - a[1]);
  let total = 0;
  for (const [name, bytes] of caches) {
    total += bytes;
    console.log(`  ${name.padEnd(28)} ${per(bytes)}`);
  }
  console.log(`  ${'(sum of these)'.padEnd(28)} ${per(total)}   total MB ${mb(total)}`);
} finally {
  await client.deleteEnvironment(4).catch(() => undefined);
  await client.close().catch(() => undefined);
  await daemon.stop();
}
