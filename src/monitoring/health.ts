import type { Config } from '../config/schema.js';
import type { EnvironmentStatistics } from '../dto/environment.js';
import type { Instruments } from './metrics.js';

export interface HealthOptions {
  /* server.alert.prewarmingpoolthreshold: the part of each pool that should be idle; 0 disables the pool check. */
  threshold: number;
  /* server.alert.depletiongraceperiod: how long a pool may stay below the threshold before it counts as depleted. */
  graceMs: number;
  /* server.alert.buildfailurethreshold: consecutive failed builds after which an environment's runners cannot be built. */
  buildFailureThreshold: number;
}

export interface HealthProblem {
  /* For the 503 body: names every environment and the cause. */
  message: string;
}

interface BelowThreshold {
  since: number;
  /* A resize restarts the clock: the pool is filling towards a new size, not depleted. */
  poolSize: number;
}

interface BuildFailures {
  streak: number;
  lastError: string;
}

/*
 * Decides what /health answers. A pool below its threshold is normal for a while after an
 * environment is created or resized (builds take time) and while claims outpace refills for a
 * moment; only a pool that stays below for longer than the grace period is reported, and so is an
 * environment whose runners keep failing to build, whatever its pool looks like. It listens to
 * runner builds (as an Instruments) and samples the pools; the app samples them periodically so
 * that the grace period runs whether or not anyone polls /health.
 */
export class HealthMonitor implements Pick<Instruments, 'runnerBuilt' | 'imageState'> {
  readonly #below = new Map<number, BelowThreshold>();
  readonly #failures = new Map<number, BuildFailures>();
  /* Environments whose image is being pulled: their empty pools are waiting, not depleted. */
  readonly #pulling = new Map<number, string | undefined>();
  /* Environments whose image cannot be had (unknown, denied): a failure until they are put again. */
  readonly #imageFailures = new Map<number, string>();

  constructor(
    private readonly options: HealthOptions,
    private readonly now: () => number = Date.now,
  ) {}

  runnerBuilt(environmentId: number, _seconds: number, error?: unknown): void {
    if (error === undefined) {
      this.#failures.delete(environmentId);
      return;
    }
    const previous = this.#failures.get(environmentId);
    const message = error instanceof Error ? error.message : String(error);
    this.#failures.set(environmentId, { streak: (previous?.streak ?? 0) + 1, lastError: message });
  }

  imageState(environmentId: number, state: 'pulling' | 'ready' | 'failed', detail?: string): void {
    this.#pulling.delete(environmentId);
    this.#imageFailures.delete(environmentId);
    // The pool starts filling once the image is there: its grace period starts then, too.
    this.#below.delete(environmentId);
    if (state === 'pulling') this.#pulling.set(environmentId, detail);
    if (state === 'failed') this.#imageFailures.set(environmentId, detail ?? 'unknown reason');
  }

  /* Environments whose image is being pulled, with the last transient failure if any (not a health problem). */
  pulls(): Array<{ environmentId: number; detail: string | undefined }> {
    return [...this.#pulling].sort(([a], [b]) => a - b).map(([environmentId, detail]) => ({ environmentId, detail }));
  }

  /* Records which pools are below their threshold, and since when. */
  observe(statistics: EnvironmentStatistics[]): void {
    const now = this.now();
    const present = new Set<number>();
    for (const stats of statistics) {
      present.add(stats.id);
      if (!this.#isBelow(stats) || this.#pulling.has(stats.id) || this.#imageFailures.has(stats.id)) {
        this.#below.delete(stats.id);
        continue;
      }
      const known = this.#below.get(stats.id);
      if (!known || known.poolSize !== stats.prewarmingPoolSize) this.#below.set(stats.id, { since: now, poolSize: stats.prewarmingPoolSize });
    }
    // Deleted environments are forgotten, also their build failures.
    for (const id of this.#below.keys()) if (!present.has(id)) this.#below.delete(id);
    for (const id of this.#failures.keys()) if (!present.has(id)) this.#failures.delete(id);
    for (const id of this.#pulling.keys()) if (!present.has(id)) this.#pulling.delete(id);
    for (const id of this.#imageFailures.keys()) if (!present.has(id)) this.#imageFailures.delete(id);
  }

  /* Observes the pools and returns what is wrong, or undefined when healthy. */
  check(statistics: EnvironmentStatistics[]): HealthProblem | undefined {
    this.observe(statistics);
    const now = this.now();
    const problems: string[] = [];
    for (const [id, detail] of [...this.#imageFailures].sort(([a], [b]) => a - b)) {
      problems.push(`the image of execution environment ${id} cannot be prepared (${detail})`);
    }
    const unbuildable = [...this.#failures].filter(([, failures]) => failures.streak >= this.options.buildFailureThreshold).sort(([a], [b]) => a - b);
    for (const [id, failures] of unbuildable) {
      problems.push(`runners of execution environment ${id} cannot be built (${failures.streak} failures in a row, last: ${failures.lastError})`);
    }
    const depleted = [...this.#below]
      .filter(([id, below]) => now - below.since >= this.options.graceMs && !unbuildable.some(([failing]) => failing === id))
      .sort(([a], [b]) => a - b);
    if (depleted.length > 0) {
      const ids = depleted.map(([id]) => id).join(', ');
      const seconds = Math.round(this.options.graceMs / 1000);
      problems.push(`prewarming pool below ${this.options.threshold * 100}% for longer than ${seconds} s for execution environment(s) ${ids}`);
    }
    return problems.length > 0 ? { message: problems.join('; ') } : undefined;
  }

  #isBelow(stats: EnvironmentStatistics): boolean {
    const threshold = this.options.threshold;
    return threshold > 0 && stats.prewarmingPoolSize > 0 && stats.idleRunners / stats.prewarmingPoolSize < threshold;
  }
}

/* The monitor server.alert describes. */
export function healthMonitorFor(alert: Config['server']['alert']): HealthMonitor {
  return new HealthMonitor({
    threshold: alert.prewarmingpoolthreshold,
    graceMs: alert.depletiongraceperiod * 1000,
    buildFailureThreshold: alert.buildfailurethreshold,
  });
}
