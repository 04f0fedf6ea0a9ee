/*
 * Latency summaries. Percentiles use the nearest-rank method so that p99 of a small sample is a
 * value that was actually observed, not an interpolation between two outliers.
 */

export interface Summary {
  n: number;
  p50_ms: number;
  p90_ms: number;
  p99_ms: number;
  max_ms: number;
}

export function percentile(sorted: readonly number[], p: number): number {
  if (sorted.length === 0) return 0;
  const rank = Math.min(sorted.length, Math.max(1, Math.ceil((p / 100) * sorted.length)));
  return sorted[rank - 1] ?? 0;
}

export function summarize(samples: readonly number[]): Summary {
  const sorted = [...samples].sort((a, b) => a - b);
  return {
    n: sorted.length,
    p50_ms: round(percentile(sorted, 50)),
    p90_ms: round(percentile(sorted, 90)),
    p99_ms: round(percentile(sorted, 99)),
    max_ms: round(sorted[sorted.length - 1] ?? 0),
  };
}

/* Three significant decimals are far below the noise of a shared VM; more would only look precise. */
export function round(value: number, digits = 3): number {
  const factor = 10 ** digits;
  return Math.round(value * factor) / factor;
}

export function nowMs(): number {
  return Number(process.hrtime.bigint()) / 1e6;
}

export interface SequentialOptions {
  n: number;
  /* Date.now() after which no new iteration starts. */
  deadline: number;
  /* A failed iteration is reported here and not timed. */
  onError(error: unknown): void;
  /* Untimed work before each iteration. */
  beforeEach?(): Promise<void>;
}

/* Runs `once` up to n times in a row (or until the deadline) and returns the durations of those that succeeded. */
export async function timeSequential(once: (iteration: number) => Promise<void>, options: SequentialOptions): Promise<number[]> {
  const samples: number[] = [];
  for (let i = 0; i < options.n && Date.now() < options.deadline; i++) {
    await options.beforeEach?.();
    const start = nowMs();
    try {
      await once(i);
      samples.push(nowMs() - start);
    } catch (error) {
      options.onError(error);
    }
  }
  return samples;
}

export const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));
