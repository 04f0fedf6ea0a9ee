import { type Baseline, rawBwrapBatch } from '../lib/baselines.js';
import { type BenchClient, type EnvironmentSpec, environmentSpec } from '../lib/client.js';
import { until, type BenchContext, type CaseResult } from '../lib/context.js';
import { nowMs, round, sleep, summarize } from '../lib/stats.js';
import { cgroupChargedMb, memAvailableMb, rssMb, settleKernelMemory } from '../lib/system.js';
import { ENV, ErrorLog } from './common.js';

/* Prewarmed pools: what idle runners cost in memory, and how fast an empty pool fills. */

/* The daemon's default runners.refillconcurrency: the raw baseline starts sandboxes as many at a time. */
const REFILL_CONCURRENCY = 8;

export async function idleRunners(context: BenchContext): Promise<CaseResult> {
  const { client, pid, daemon } = await context.local();
  // Nominal sizes name the JSON keys; --quick uses tiny pools under the same keys (see `sizes`).
  const nominal = [10, 100, 1000] as const;
  const actual = context.quick ? [2, 3, 4] : [...nominal];
  const waitBudgetMs = context.quick ? 20_000 : 100_000;
  const errors = new ErrorLog();
  await client.deleteEnvironment(ENV.idle);
  await settleKernelMemory(context.quick ? 2000 : 20_000);
  const memBefore = memAvailableMb();
  const chargedBefore = cgroupChargedMb(daemon.cgroupParent);
  const rssBefore = pid === undefined ? undefined : rssMb(pid);
  const result: CaseResult = { n: 0, errors: 0, sizes: actual, rss_mb_before: round(rssBefore ?? 0, 1) };
  const caseDeadline = Date.now() + waitBudgetMs;
  let largest = 0;
  try {
    for (const [index, size] of actual.entries()) {
      const key = nominal[index] ?? size;
      const start = nowMs();
      await client.putEnvironment(environmentSpec(ENV.idle, size));
      let idle = 0;
      // The large pool may not fill on a slow host: bounded wait, and the figure says what was reached.
      const full = await until(
        async () => {
          idle = (await client.poolOf(ENV.idle))?.idleRunners ?? 0;
          return idle >= size;
        },
        caseDeadline,
        250,
      );
      const fillMs = nowMs() - start;
      // Let freshly started sandboxes settle (page faults, lazy allocations) before reading memory.
      await sleep(context.quick ? 200 : 1500);
      await settleKernelMemory(context.quick ? 2000 : 20_000);
      const rss = pid === undefined ? undefined : rssMb(pid);
      const hostDelta = memBefore - memAvailableMb();
      const charged = cgroupChargedMb(daemon.cgroupParent);
      result[`rss_mb_at_${key}`] = round(rss ?? 0, 1);
      result[`host_mb_per_runner_at_${key}`] = idle > 0 ? round(hostDelta / idle, 2) : 0;
      if (charged !== undefined && chargedBefore !== undefined && idle > 0)
        result[`charged_mb_per_runner_at_${key}`] = round((charged - chargedBefore) / idle, 2);
      result[`reached_at_${key}`] = idle;
      result[`fill_ms_at_${key}`] = round(fillMs, 0);
      result.n = idle;
      largest = idle;
      if (!full) errors.add(new Error(`pool of ${size} reached only ${idle} idle runners within the wait budget`));
    }
  } finally {
    const start = nowMs();
    const memFull = memAvailableMb();
    await client.deleteEnvironment(ENV.idle).catch((error: unknown) => errors.add(error));
    result.teardown_ms = round(nowMs() - start, 0);
    /*
     * The same memory seen from the other side: what the host got back once the pool was gone. Other
     * sessions on a shared host move MemAvailable too; a fill and a release figure that agree say the
     * noise was small, ones that differ say by how much.
     */
    await settleKernelMemory(context.quick ? 2000 : 30_000);
    if (largest > 0) result.host_mb_released_per_runner = round((memAvailableMb() - memFull) / largest, 2);
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
