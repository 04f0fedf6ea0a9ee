import { cpus } from 'node:os';
import { fastifyNoop, rawBwrapParallel, rawBwrapSpawn, type Baseline } from '../lib/baselines.js';
import type { FileCopy } from '../lib/client.js';
import type { BenchContext, CaseResult } from '../lib/context.js';
import { nowMs, percentile, round, summarize } from '../lib/stats.js';

export type CaseRunner = (context: BenchContext) => Promise<CaseResult>;

/* Environment ids, one per case family, so no case drains or refills another case's pool. */
export const ENV = { main: 1, throughput: 2, concurrent: 3, idle: 4, refill: 5, nomad: 6, session: 7, burst: 8 } as const;

export const CORES = cpus().length;

/* Ten small files as CodeOcean sends a learner's exercise: a few hundred bytes each, one in a folder. */
export function submissionFiles(round = 0): FileCopy[] {
  return Array.from({ length: 10 }, (_, index) => ({
    path: index === 9 ? `lib/helper_${index}.py` : `file_${index}.py`,
    content: Buffer.from(`# submission ${round}, file ${index}\n${'print("hello")\n'.repeat(20)}`).toString('base64'),
  }));
}

export function bwrapSpawnBaseline(context: BenchContext): Promise<Baseline> {
  return context.baseline('bwrap_spawn', () => rawBwrapSpawn(context.quick ? 3 : 50));
}

export function bwrapParallelBaseline(context: BenchContext): Promise<Baseline> {
  return context.baseline('bwrap_spawn_parallel', () => rawBwrapParallel(context.quick ? 500 : 3000, CORES * 2));
}

export function httpBaseline(context: BenchContext): Promise<Baseline> {
  return context.baseline('http_noop', () => fastifyNoop(context.quick ? 20 : 1000));
}

/* The latency summary of `samples` plus its comparison with a baseline measured in the same run. */
/* elapsedMs defaults to the time spent in the samples themselves (sequential cases). */
export function latencyResult(
  samples: number[],
  errors: number,
  elapsedMs = samples.reduce((sum, sample) => sum + sample, 0),
  baseline?: Baseline,
): CaseResult {
  const summary = summarize(samples);
  const result: CaseResult = {
    ...summary,
    ops_per_s: round(samples.length / Math.max(elapsedMs / 1000, 1e-9), 1),
    errors,
  };
  if (baseline !== undefined) {
    result.baseline = baseline.what;
    result.baseline_p50_ms = baseline.p50_ms;
    result.ratio_p50 = baseline.p50_ms > 0 ? round(summary.p50_ms / baseline.p50_ms, 2) : 0;
  }
  return result;
}

export function describeError(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

/* Keeps the first few distinct error messages so a failing run says why without flooding the JSON. */
export class ErrorLog {
  count = 0;
  readonly samples: string[] = [];

  add(error: unknown): void {
    this.count += 1;
    const text = describeError(error).slice(0, 200);
    if (this.samples.length < 5 && !this.samples.includes(text)) this.samples.push(text);
  }
}

/* Per-request durations inside a composite operation, so a slow case shows which request is slow. */
export class StepTimes {
  readonly #samples = new Map<string, number[]>();

  async time<T>(step: string, work: () => Promise<T>): Promise<T> {
    const start = nowMs();
    const value = await work();
    const list = this.#samples.get(step) ?? [];
    list.push(nowMs() - start);
    this.#samples.set(step, list);
    return value;
  }

  clear(): void {
    this.#samples.clear();
  }

  p50(step: string): number {
    return round(
      percentile(
        [...(this.#samples.get(step) ?? [])].sort((a, b) => a - b),
        50,
      ),
    );
  }

  /* p50 of the sum of several steps per iteration; steps are recorded in the same order each time. */
  sumP50(steps: string[]): number {
    const lists = steps.map((step) => this.#samples.get(step) ?? []);
    const count = Math.min(...lists.map((list) => list.length));
    const sums = Array.from({ length: count }, (_, index) => lists.reduce((total, list) => total + (list[index] ?? 0), 0));
    return round(
      percentile(
        sums.sort((a, b) => a - b),
        50,
      ),
    );
  }

  p50s(): Record<string, number> {
    return Object.fromEntries([...this.#samples.keys()].map((step) => [`${step}_p50_ms`, this.p50(step)]));
  }
}
