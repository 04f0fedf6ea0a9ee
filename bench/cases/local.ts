import { ApiError, environmentSpec } from '../lib/client.js';
import { fillPool, until, type BenchContext, type CaseResult } from '../lib/context.js';
import { nowMs, round, sleep, timeSequential } from '../lib/stats.js';
import { bwrapParallelBaseline, bwrapSpawnBaseline, ENV, ErrorLog, latencyResult, StepTimes, submissionFiles } from './common.js';

/* The request paths CodeOcean drives before and during every run, on the local backend. */

const MAIN_POOL = 30;
const MAIN_POOL_QUICK = 3;

/* The shared pool of the single-client cases; filled once, then topped up between iterations. */
async function mainPool(context: BenchContext): Promise<number> {
  const { client } = await context.local();
  const size = context.quick ? MAIN_POOL_QUICK : MAIN_POOL;
  await fillPool(client, environmentSpec(ENV.main, size), 60_000);
  return size;
}

/*
 * A claim must never meet an empty pool inside the timed path (the daemon would answer 500
 * NOMAD_OVERLOAD): when the pool runs low, wait for the refill outside the timer.
 */
async function keepPoolAboveLow(context: BenchContext, poolSize: number): Promise<void> {
  const { client } = await context.local();
  const low = Math.max(1, Math.floor(poolSize / 4));
  const pool = await client.poolOf(ENV.main);
  if ((pool?.idleRunners ?? 0) >= low) return;
  await until(async () => ((await client.poolOf(ENV.main))?.idleRunners ?? 0) >= poolSize / 2, Date.now() + 30_000);
}

export async function claimCopyReturn(context: BenchContext): Promise<CaseResult> {
  const { client } = await context.local();
  const poolSize = await mainPool(context);
  const n = context.n(200);
  const errors = new ErrorLog();
  const steps = new StepTimes();
  const once = async (iteration: number): Promise<void> => {
    const runnerId = await steps.time('claim', () => client.claim(ENV.main));
    try {
      await steps.time('copy', () => client.copyFiles(runnerId, submissionFiles(iteration)));
    } finally {
      await steps.time('return', () => client.returnRunner(runnerId));
    }
  };
  for (let i = 0; i < (context.quick ? 1 : 5); i++) await once(-1 - i).catch((error: unknown) => errors.add(error));
  errors.count = 0;
  steps.clear();
  const samples = await timeSequential(once, {
    n,
    deadline: Date.now() + 60_000,
    onError: (error) => errors.add(error),
    beforeEach: () => keepPoolAboveLow(context, poolSize),
  });
  const baseline = await bwrapSpawnBaseline(context);
  return {
    ...latencyResult(samples, errors.count, undefined, baseline),
    // The target is on claim + copy; the return (sandbox teardown) is reported apart.
    claim_copy_p50_ms: steps.sumP50(['claim', 'copy']),
    ...steps.p50s(),
    ...(errors.samples.length > 0 ? { error_samples: errors.samples } : {}),
  };
}

export async function executeTrue(context: BenchContext): Promise<CaseResult> {
  const { client } = await context.local();
  await mainPool(context);
  const n = context.n(200);
  const errors = new ErrorLog();
  const runnerId = await client.claim(ENV.main);
  let samples: number[];
  try {
    const once = async (): Promise<void> => {
      const outcome = await client.run(runnerId, 'true', { guardMs: 30_000 });
      if (outcome.exitCode !== 0) throw new Error(`true exited with ${String(outcome.exitCode)}`);
    };
    for (let i = 0; i < (context.quick ? 1 : 10); i++) await once().catch(() => undefined);
    samples = await timeSequential(once, { n, deadline: Date.now() + 45_000, onError: (error) => errors.add(error) });
  } finally {
    await client.returnRunner(runnerId).catch(() => undefined);
  }
  const baseline = await bwrapSpawnBaseline(context);
  return { ...latencyResult(samples, errors.count, undefined, baseline), ...(errors.samples.length > 0 ? { error_samples: errors.samples } : {}) };
}

export async function throughput(context: BenchContext): Promise<CaseResult> {
  const { client } = await context.local();
  const clients = context.quick ? 2 : 16;
  const poolSize = context.quick ? 4 : 200;
  const durationMs = (context.quick ? Math.min(context.options.durationS, 2) : context.options.durationS) * 1000;
  const spec = environmentSpec(ENV.throughput, poolSize);
  const reached = await fillPool(client, spec, 90_000);
  const errors = new ErrorLog();
  let overloads = 0;
  let minIdle = reached;
  const samples: number[] = [];
  const steps = new StepTimes();

  const cycle = async (iteration: number): Promise<void> => {
    let runnerId: string;
    try {
      runnerId = await steps.time('claim', () => client.claim(ENV.throughput));
    } catch (error) {
      if (error instanceof ApiError && error.errorCode === 'NOMAD_OVERLOAD') overloads += 1;
      throw error;
    }
    try {
      await steps.time('copy', () => client.copyFiles(runnerId, submissionFiles(iteration)));
      const outcome = await steps.time('execute', () => client.run(runnerId, 'true', { guardMs: 30_000 }));
      if (outcome.exitCode !== 0) throw new Error(`true exited with ${String(outcome.exitCode)}`);
    } finally {
      await steps.time('return', () => client.returnRunner(runnerId));
    }
  };

  // One cycle per client first, so connections and code paths are warm when the clock starts.
  await Promise.all(Array.from({ length: clients }, (_, index) => cycle(-1 - index).catch(() => undefined)));
  await fillPool(client, spec, 30_000);
  steps.clear();

  const started = nowMs();
  const deadline = Date.now() + durationMs;
  let watching = true;
  const watcher = (async () => {
    while (watching) {
      const idle = (await client.poolOf(ENV.throughput).catch(() => undefined))?.idleRunners;
      if (idle !== undefined) minIdle = Math.min(minIdle, idle);
      await sleep(250);
    }
  })();
  await Promise.all(
    Array.from({ length: clients }, async (_, index) => {
      for (let i = 0; Date.now() < deadline; i++) {
        const start = nowMs();
        try {
          await cycle(index * 1_000_000 + i);
          samples.push(nowMs() - start);
        } catch (error) {
          // NOMAD_OVERLOAD (no runner came within the claim wait) is counted apart, not as an error.
          if (!(error instanceof ApiError && error.errorCode === 'NOMAD_OVERLOAD')) errors.add(error);
          // An empty pool answers at once; a short pause keeps a failing client from spinning.
          await sleep(20);
        }
      }
    }),
  );
  const elapsed = nowMs() - started;
  watching = false;
  await watcher;
  await client.deleteEnvironment(ENV.throughput).catch(() => undefined);

  const baseline = await bwrapSpawnBaseline(context);
  const parallel = await bwrapParallelBaseline(context);
  return {
    ...latencyResult(samples, errors.count, elapsed, baseline),
    clients,
    duration_s: round(elapsed / 1000, 1),
    pool_size: poolSize,
    pool_min_idle: minIdle,
    overload_errors: overloads,
    ...steps.p50s(),
    baseline_ops_per_s: parallel.ops_per_s ?? 0,
    baseline_ops_what: parallel.what,
    // The target: cycles per second against the raw parallel sandbox rate of the same run.
    ratio_rate: (parallel.ops_per_s ?? 0) > 0 ? round(samples.length / (elapsed / 1000) / (parallel.ops_per_s ?? 1), 2) : 0,
    ...(errors.samples.length > 0 ? { error_samples: errors.samples } : {}),
  };
}
