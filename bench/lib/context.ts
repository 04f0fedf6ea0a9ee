import { startDaemon, type ConfigTree, type Daemon } from '../../test/support/daemon.js';
import type { Baseline } from './baselines.js';
import { BenchClient, type EnvironmentSpec } from './client.js';
import { daemonPid } from './system.js';
import { sleep } from './stats.js';

export type JsonValue = string | number | boolean | null | JsonValue[] | { [key: string]: JsonValue };

/* One case's entry in bench/results/latest.json; fields that do not apply are left out. */
export interface CaseResult {
  n: number;
  p50_ms?: number;
  p90_ms?: number;
  p99_ms?: number;
  max_ms?: number;
  ops_per_s?: number;
  errors: number;
  baseline?: string;
  baseline_p50_ms?: number;
  ratio_p50?: number;
  [extra: string]: JsonValue | undefined;
}

export interface RunOptions {
  /* Iterations per case; undefined = each case's default. */
  n: number | undefined;
  durationS: number;
  quick: boolean;
  /* When set, the local daemon runs with --cpu-prof and writes its profile here on exit. */
  profileDir?: string | undefined;
}

export interface RunningDaemon {
  daemon: Daemon;
  client: BenchClient;
  pid: number | undefined;
}

/*
 * Everything a case shares with the others: one local daemon per run (started on first use), the
 * baselines (each measured once, when the first case needs it), and a cleanup stack that runs on
 * success, on errors and on Ctrl-C, so no daemon, sandbox or fake Nomad outlives the run.
 */
export class BenchContext {
  readonly #cleanups: Array<{ name: string; run: () => Promise<void> }> = [];
  readonly #baselines = new Map<string, Promise<Baseline>>();
  #local: Promise<RunningDaemon> | undefined;

  constructor(readonly options: RunOptions) {}

  /* The case's own default n, or the --n override; --quick forces 1. */
  n(defaultN: number): number {
    if (this.options.quick) return 1;
    return this.options.n ?? defaultN;
  }

  get quick(): boolean {
    return this.options.quick;
  }

  onCleanup(name: string, run: () => Promise<void>): void {
    this.#cleanups.push({ name, run });
  }

  async cleanup(): Promise<string[]> {
    const problems: string[] = [];
    while (this.#cleanups.length > 0) {
      const entry = this.#cleanups.pop();
      if (entry === undefined) break;
      try {
        await entry.run();
      } catch (error) {
        problems.push(`${entry.name}: ${error instanceof Error ? error.message : String(error)}`);
      }
    }
    return problems;
  }

  baseline(key: string, measure: () => Promise<Baseline>): Promise<Baseline> {
    let pending = this.#baselines.get(key);
    if (pending === undefined) {
      pending = measure();
      this.#baselines.set(key, pending);
    }
    return pending;
  }

  async baselines(): Promise<Record<string, Baseline>> {
    const entries = await Promise.all([...this.#baselines.entries()].map(async ([key, value]) => [key, await value] as const));
    return Object.fromEntries(entries);
  }

  async startDaemon(name: string, config: ConfigTree, extra: { env?: Record<string, string>; entry?: string } = {}): Promise<RunningDaemon> {
    const daemon = await startDaemon({ config, ...extra, startTimeoutMs: 30_000 });
    const client = new BenchClient(daemon.origin);
    this.onCleanup(name, async () => {
      await client.close().catch(() => undefined);
      await daemon.stop();
    });
    return { daemon, client, pid: daemonPid(daemon.configPath) };
  }

  /* The local-backend daemon with built-in defaults, as an operator would run it. */
  local(): Promise<RunningDaemon> {
    const profile = this.options.profileDir;
    this.#local ??= this.startDaemon(
      'local daemon',
      {},
      profile === undefined ? {} : { entry: 'bench/lib/profiled-cli.ts', env: { BENCH_PROFILE_DIR: profile } },
    );
    return this.#local;
  }
}

/* Waits until `predicate` holds or the deadline passes; returns whether it held. */
export async function until(predicate: () => Promise<boolean>, deadline: number, intervalMs = 25): Promise<boolean> {
  for (;;) {
    if (await predicate()) return true;
    if (Date.now() >= deadline) return false;
    await sleep(intervalMs);
  }
}

/* Creates (or resizes) an environment and waits until its pool is full; returns the idle count reached. */
export async function fillPool(client: BenchClient, spec: EnvironmentSpec, timeoutMs: number): Promise<number> {
  await client.putEnvironment(spec);
  let idle = 0;
  await until(async () => {
    idle = (await client.poolOf(spec.id))?.idleRunners ?? 0;
    return idle >= spec.prewarmingPoolSize;
  }, Date.now() + timeoutMs);
  return idle;
}
