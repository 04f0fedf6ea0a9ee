import { type Baseline, rawBwrapBatch } from '../lib/baselines.js';
import { type BenchClient, type EnvironmentSpec, environmentSpec } from '../lib/client.js';
import { until, type BenchContext, type CaseResult } from '../lib/context.js';
import { nowMs, percentile, round, sleep, summarize } from '../lib/stats.js';
import { cgroupChargedMb, memAvailableMb, rssMb, settleKernelMemory } from '../lib/system.js';
import { ENV, ErrorLog } from './common.js';

/* Prewarmed pools: what idle runners cost in memory, and how fast an empty pool fills. */

/* The daemon's default runners.refillconcurrency: the raw baseline starts sandboxes as many at a time. */
const REFILL_CONCURRENCY = 8;

/* Waits (bounded) until the idle pool holds `size` runners; returns how many it reached. */
async function fillIdlePool(client: BenchClient, size: number, deadline: number): Promise<number> {
  await client.putEnvironment(environmentSpec(ENV.idle, size));
  let idle = 0;
  await until(
    async () => {
      idle = (await client.poolOf(ENV.idle))?.idleRunners ?? 0;
      return idle >= size;
    },
    deadline,
    250,
  );
  return idle;
}

/*
 * Host memory per idle runner. MemAvailable is the whole host's figure, so on a host shared with
 * other sessions it moves with their work too (tens of MB within a fill, either way). The largest
 * pool is therefore filled and removed several times, each fill and each removal a sample of the
 * same cost (taken once the kernel's slab settled), and the median is reported, with the spread.
 * The memory charged to the runner cgroups is reported beside it: what the kernel accounts to them
 * (not all of its objects; reclaimable caches included), which nothing else on the host can move.
 */
export async function idleRunners(context: BenchContext): Promise<CaseResult> {
  const { client, pid, daemon } = await context.local();
  // Nominal sizes name the JSON keys; --quick uses tiny pools under the same keys (see `sizes`).
  const nominal = [10, 100, 1000] as const;
  const actual = context.quick ? [2, 3, 4] : [...nominal];
  const cycles = context.n(3);
  const settleMs = context.quick ? 1000 : 30_000;
  const errors = new ErrorLog();
  await client.deleteEnvironment(ENV.idle);
  await settleKernelMemory(settleMs);
  let memEmpty = memAvailableMb();
  const chargedBefore = cgroupChargedMb(daemon.cgroupParent);
  const rssBefore = pid === undefined ? undefined : rssMb(pid);
  const result: CaseResult = { n: 0, errors: 0, sizes: actual, rss_mb_before: round(rssBefore ?? 0, 1) };
  const largestKey = nominal[nominal.length - 1];
  const fills: number[] = [];
  const releases: number[] = [];
  try {
    for (const [index, size] of actual.entries()) {
      const key = nominal[index] ?? size;
      const start = nowMs();
      // The large pool may not fill on a slow host: bounded wait, and the figure says what was reached.
      const idle = await fillIdlePool(client, size, Date.now() + (context.quick ? 20_000 : 100_000));
      const fillMs = nowMs() - start;
      // Let freshly started sandboxes settle (page faults, lazy allocations) before reading memory.
      await sleep(context.quick ? 200 : 1500);
      await settleKernelMemory(settleMs);
      const rss = pid === undefined ? undefined : rssMb(pid);
      const hostDelta = memEmpty - memAvailableMb();
      const charged = cgroupChargedMb(daemon.cgroupParent);
      result[`rss_mb_at_${key}`] = round(rss ?? 0, 1);
      result[`host_mb_per_runner_at_${key}`] = idle > 0 ? round(hostDelta / idle, 2) : 0;
      if (charged !== undefined && chargedBefore !== undefined && idle > 0)
        result[`charged_mb_per_runner_at_${key}`] = round((charged - chargedBefore) / idle, 2);
      result[`reached_at_${key}`] = idle;
      result[`fill_ms_at_${key}`] = round(fillMs, 0);
      result.n = idle;
      if (idle < size) errors.add(new Error(`pool of ${size} reached only ${idle} idle runners within the wait budget`));
      if (key === largestKey && idle > 0) fills.push(hostDelta / idle);
    }
    const largest = actual[actual.length - 1] ?? 0;
    for (let cycle = 0; cycle < cycles; cycle++) {
      // The removal of a full pool: what the host gets back.
      const memFull = memAvailableMb();
      await client.putEnvironment(environmentSpec(ENV.idle, 0));
      await until(async () => ((await client.poolOf(ENV.idle))?.idleRunners ?? 0) === 0, Date.now() + 60_000, 250);
      await settleKernelMemory(settleMs);
      memEmpty = memAvailableMb();
      releases.push((memEmpty - memFull) / largest);
      if (cycle === cycles - 1) break;
      // And another fill of the same size.
      const idle = await fillIdlePool(client, largest, Date.now() + (context.quick ? 20_000 : 100_000));
      await sleep(context.quick ? 200 : 1500);
      await settleKernelMemory(settleMs);
      if (idle > 0) fills.push((memEmpty - memAvailableMb()) / idle);
    }
  } finally {
    const start = nowMs();
    await client.deleteEnvironment(ENV.idle).catch((error: unknown) => errors.add(error));
    result.teardown_ms = round(nowMs() - start, 0);
  }
  const sorted = [...fills, ...releases].sort((a, b) => a - b);
  if (sorted.length > 0) {
    result.host_mb_per_runner = round(percentile(sorted, 50), 2);
    // In the order taken: a gap between fills and removals that persists is memory the host did not get back.
    result.host_mb_per_runner_fills = fills.map((sample) => round(sample, 2));
    result.host_mb_per_runner_removals = releases.map((sample) => round(sample, 2));
  }
  result.errors = errors.count;
  if (errors.samples.length > 0) result.error_samples = errors.samples;
  return result;
}

/* Fills an emptied pool of `size` n times; the time from the resize to a full pool, per fill. */
async function refillTimes(context: BenchContext, size: number, networkAccess: boolean, errors: ErrorLog, beforeEach?: () => Promise<void>): Promise<number[]> {
  const { client } = await context.local();
  return fillTimes(client, context, (poolSize) => environmentSpec(ENV.refill, poolSize, networkAccess), size, errors, beforeEach);
}

/* Fills the emptied pool of the environment `specOf` describes n times; the time to a full pool, per fill. */
export async function fillTimes(
  client: BenchClient,
  context: BenchContext,
  specOf: (poolSize: number) => EnvironmentSpec,
  size: number,
  errors: ErrorLog,
  /* Untimed work right before each fill, with the pool empty (an interleaved baseline). */
  beforeEach?: () => Promise<void>,
): Promise<number[]> {
  const n = context.n(3);
  const samples: number[] = [];
  const environmentId = specOf(0).id;
  const idleCount = async (): Promise<number> => (await client.poolOf(environmentId))?.idleRunners ?? 0;
  try {
    await client.putEnvironment(specOf(0));
    const caseDeadline = Date.now() + 90_000;
    for (let i = 0; i < n && Date.now() < caseDeadline; i++) {
      // Empty the pool and let the destruction finish, so the refill does not compete with it.
      await client.putEnvironment(specOf(0));
      await until(async () => (await idleCount()) === 0, Date.now() + 10_000);
      await sleep(context.quick ? 100 : 1000);
      await beforeEach?.();
      const start = nowMs();
      // Only the pool size changes, so the daemon resizes the existing environment's pool.
      await client.putEnvironment(specOf(size));
      const full = await until(async () => (await idleCount()) >= size, Date.now() + 30_000, 10);
      const elapsed = nowMs() - start;
      if (full) samples.push(elapsed);
      else errors.add(new Error(`pool reached only ${await idleCount()} of ${size} in 30 s`));
    }
  } finally {
    await client.deleteEnvironment(environmentId).catch((error: unknown) => errors.add(error));
  }
  await sleep(context.quick ? 100 : 1000);
  return samples;
}

export async function poolRefill100(context: BenchContext): Promise<CaseResult> {
  const size = context.quick ? 5 : 100;
  const errors = new ErrorLog();
  // Each refill right after a raw batch, under the same conditions (the kernel may still be tearing
  // down an earlier case's sandboxes, other sessions' load drifts): the two alternate.
  const runs: number[] = [];
  const samples = await refillTimes(context, size, false, errors, async () => {
    runs.push(await rawBwrapBatch(size, REFILL_CONCURRENCY));
  });
  const baselineMs = await context.baseline(`bwrap_batch_${size}`, async () => ({
    what: `${size} raw sandboxes (a runner's namespaces, mounts and seccomp), ${REFILL_CONCURRENCY} at a time, alternating with the refills`,
    ...summarize(runs),
  }));
  return refillResult(samples, size, baselineMs, errors);
}

/* A refill case's row: fills per second of the pool, and the ratio to its same-run baseline. */
export function refillResult(samples: number[], size: number, baseline: Baseline, errors: ErrorLog): CaseResult {
  const summary = summarize(samples);
  return {
    ...summary,
    ops_per_s: round(size / Math.max((summary.p50_ms || 1) / 1000, 1e-9), 1),
    errors: errors.count,
    pool_size: size,
    baseline: baseline.what,
    baseline_p50_ms: baseline.p50_ms,
    ratio_p50: baseline.p50_ms > 0 ? round(summary.p50_ms / baseline.p50_ms, 2) : 0,
    ...(errors.samples.length > 0 ? { error_samples: errors.samples } : {}),
  };
}

/*
 * What a private network (veth, address, routes, port relays) adds to building runners with
 * networkAccess: the same refill with and without it, in the same run; the difference per runner.
 */
export async function poolRefill100Network(context: BenchContext): Promise<CaseResult> {
  const size = context.quick ? 5 : 100;
  const errors = new ErrorLog();
  const baseline = await context.baseline(`pool_refill_${size}_without_network`, async () => ({
    what: `the same refill of ${size} runners without networkAccess`,
    ...summarize(await refillTimes(context, size, false, errors)),
  }));
  const result = refillResult(await refillTimes(context, size, true, errors), size, baseline, errors);
  return withAddedPerRunner(result, baseline, size);
}

/* What each runner costs on top of the baseline's fill of the same size. */
export function withAddedPerRunner(result: CaseResult, baseline: Baseline, size: number): CaseResult {
  return { ...result, added_ms_per_runner: round(((result.p50_ms ?? 0) - baseline.p50_ms) / size, 2) };
}
