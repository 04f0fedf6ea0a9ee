import { mkdirSync, writeFileSync } from 'node:fs';
import { dirname, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import { REPO_ROOT } from '../test/support/daemon.js';
import { describeError, type CaseRunner } from './cases/common.js';
import { burstClaims, codeoceanSession } from './cases/codeocean.js';
import { imagePull, imageRootStart } from './cases/images.js';
import { seccompStart } from './cases/sandbox.js';
import { claimCopyReturn, executeTrue, throughput } from './cases/local.js';
import { nomadClaim, nomadScale } from './cases/nomad.js';
import { idleRunners, poolRefill100, poolRefill100Network } from './cases/pool.js';
import { streamConcurrent, streamSingle } from './cases/streaming.js';
import type { Baseline } from './lib/baselines.js';
import { BenchContext, type CaseResult, type JsonValue } from './lib/context.js';
import { machineDescription } from './lib/system.js';

/*
 * npm run bench [-- --case NAME[,NAME]] [--n N] [--duration S] [--json PATH] [--quick] [--profile DIR]
 * Starts the real daemon, runs each case with warm-up against baselines measured in the same run,
 * prints a table and writes bench/results/latest.json.
 */

/*
 * Run order: the memory case comes before the streaming cases, whose 100 MB of buffers would
 * otherwise stay in the daemon's RSS and be charged to idle runners.
 */
const CASES: Record<string, CaseRunner> = {
  claim_copy_return: claimCopyReturn,
  execute_true: executeTrue,
  idle_runners: idleRunners,
  pool_refill_100: poolRefill100,
  pool_refill_100_network: poolRefill100Network,
  image_root_start: imageRootStart,
  throughput,
  codeocean_session: codeoceanSession,
  burst_claims: burstClaims,
  stream_single: streamSingle,
  stream_concurrent: streamConcurrent,
  nomad_claim: nomadClaim,
  image_pull: imagePull,
  nomad_scale: nomadScale,
  seccomp_start: seccompStart,
};

const USAGE = `usage: npm run bench -- [--case NAME[,NAME…]]… [--n N] [--duration S] [--json PATH] [--quick] [--profile DIR]
--profile DIR: the local daemon writes a V8 CPU profile into DIR (summarise it with bench/profile-summary.ts)
cases: ${Object.keys(CASES).join(', ')}`;

function parseOptions(): { cases: string[]; n: number | undefined; durationS: number; json: string; quick: boolean; profileDir: string | undefined } {
  const { values } = parseArgs({
    options: {
      case: { type: 'string', multiple: true },
      n: { type: 'string' },
      duration: { type: 'string', default: '20' },
      json: { type: 'string', default: 'bench/results/latest.json' },
      quick: { type: 'boolean', default: false },
      profile: { type: 'string' },
      help: { type: 'boolean', short: 'h', default: false },
    },
  });
  if (values.help) {
    console.log(USAGE);
    process.exit(0);
  }
  const cases = (values.case ?? [])
    .flatMap((entry) => entry.split(','))
    .map((entry) => entry.trim())
    .filter((entry) => entry !== '');
  for (const name of cases) {
    if (!(name in CASES)) throw new Error(`unknown case "${name}"\n${USAGE}`);
  }
  const n = values.n === undefined ? undefined : Number(values.n);
  if (n !== undefined && (!Number.isInteger(n) || n < 1)) throw new Error(`--n must be a positive integer\n${USAGE}`);
  const durationS = Number(values.duration);
  if (!Number.isFinite(durationS) || durationS <= 0) throw new Error(`--duration must be a positive number of seconds\n${USAGE}`);
  return {
    cases: cases.length > 0 ? [...new Set(cases)] : Object.keys(CASES),
    n,
    durationS,
    json: resolve(REPO_ROOT, values.json),
    quick: values.quick,
    profileDir: values.profile === undefined ? undefined : resolve(REPO_ROOT, values.profile),
  };
}

function cell(value: JsonValue | undefined): string {
  if (value === undefined || value === null) return '-';
  if (typeof value === 'number') return Number.isInteger(value) ? String(value) : value.toFixed(value >= 100 ? 0 : value >= 10 ? 1 : 2);
  return String(value);
}

const COLUMNS = ['case', 'n', 'p50 ms', 'p90 ms', 'p99 ms', 'max ms', 'ops/s', 'errors', 'baseline p50 ms', 'ratio', 'extra'] as const;

/* Per-case figures that matter more than latency (bandwidth, losses, memory), shown in the last column. */
function extras(name: string, result: CaseResult): string {
  const keys: Record<string, string[]> = {
    claim_copy_return: ['claim_copy_p50_ms', 'claim_p50_ms', 'copy_p50_ms', 'return_p50_ms'],
    throughput: [
      'clients',
      'overload_errors',
      'pool_min_idle',
      'baseline_ops_per_s',
      'ratio_rate',
      'claim_p50_ms',
      'copy_p50_ms',
      'execute_p50_ms',
      'return_p50_ms',
    ],
    stream_single: ['mb_per_s', 'baseline_mb_per_s', 'terminal_mb_per_s', 'of_terminal'],
    stream_concurrent: ['mb_per_s', 'baseline_mb_per_s', 'terminal_mb_per_s', 'of_terminal', 'lost_bytes', 'lost_exits'],
    idle_runners: [
      'rss_mb_before',
      'rss_mb_at_1000',
      'host_mb_per_runner',
      'host_mb_per_runner_fills',
      'host_mb_per_runner_removals',
      'charged_mb_per_runner_at_1000',
      'reached_at_1000',
      'fill_ms_at_1000',
    ],
    codeocean_session: ['learners', 'lost_exits', 'lost_bytes', 'baseline_ops_per_s', 'ratio_rate', 'baseline_p99_ms', 'ratio_p99'],
    burst_claims: ['claims', 'served', 'overload_errors', 'all_served_ms', 'baseline_ms', 'ratio_served', 'api_p99_ms'],
    nomad_scale: [
      'runners',
      'recovered_runners',
      'start_ms',
      'recovery_ms',
      'rss_mb',
      'rss_mb_after_storm',
      'storm_events_per_s',
      'baseline_p99_ms',
      'resync_ms',
      'fill_ms',
    ],
    nomad_claim: ['refill_ms', 'refill_after_claims_ms', 'pool_size'],
    image_pull: ['unpacked_mb', 'download_mb', 'mb_per_s', 'baseline_mb_per_s'],
  };
  return (keys[name] ?? [])
    .filter((key) => result[key] !== undefined)
    .map((key) => `${key}=${cell(result[key])}`)
    .join(' ');
}

function renderTable(results: Record<string, CaseResult>, baselines: Record<string, Baseline>): string {
  const rows: string[][] = [];
  for (const [name, result] of Object.entries(results)) {
    rows.push([
      name,
      cell(result.n),
      cell(result.p50_ms),
      cell(result.p90_ms),
      cell(result.p99_ms),
      cell(result.max_ms),
      cell(result.ops_per_s),
      cell(result.errors),
      cell(result.baseline_p50_ms),
      cell(result.ratio_p50),
      extras(name, result),
    ]);
  }
  for (const [name, baseline] of Object.entries(baselines)) {
    const extra = baseline.mb_per_s !== undefined ? `mb_per_s=${cell(baseline.mb_per_s)} ` : '';
    rows.push([
      `baseline: ${name}`,
      cell(baseline.n),
      cell(baseline.p50_ms),
      cell(baseline.p90_ms),
      cell(baseline.p99_ms),
      cell(baseline.max_ms),
      cell(baseline.ops_per_s),
      '-',
      '-',
      '-',
      `${extra}(${baseline.what})`,
    ]);
  }
  const header = [...COLUMNS];
  const widths = header.map((title, index) => Math.max(3, title.length, ...rows.map((row) => (index === header.length - 1 ? 0 : (row[index] ?? '').length))));
  const line = (row: readonly string[]): string =>
    `| ${row.map((value, index) => (index === row.length - 1 ? value : value.padEnd(widths[index] ?? 0))).join(' | ')} |`;
  return [line(header), line(header.map((_, index) => '-'.repeat(index === header.length - 1 ? 5 : (widths[index] ?? 3)))), ...rows.map(line)].join('\n');
}

async function main(): Promise<void> {
  const options = parseOptions();
  if (options.profileDir !== undefined) mkdirSync(options.profileDir, { recursive: true });
  const context = new BenchContext({ n: options.n, durationS: options.durationS, quick: options.quick, profileDir: options.profileDir });
  let interrupted = false;
  const onSignal = (signal: NodeJS.Signals): void => {
    if (interrupted) return;
    interrupted = true;
    process.stderr.write(`\n${signal}: stopping everything the bench started…\n`);
    void context.cleanup().finally(() => process.exit(130));
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);

  const machine = machineDescription();
  const date = new Date().toISOString();
  const started = Date.now();
  const results: Record<string, CaseResult> = {};
  const failures: string[] = [];
  console.log(`poseidon-ts bench on ${machine}${options.quick ? ' (quick)' : ''}`);
  try {
    for (const name of options.cases) {
      const runner = CASES[name];
      if (runner === undefined) continue;
      const caseStart = Date.now();
      process.stdout.write(`${name} … `);
      try {
        results[name] = await runner(context);
        console.log(`done in ${((Date.now() - caseStart) / 1000).toFixed(1)} s`);
      } catch (error) {
        // A broken case must not cost the others their figures; it is reported and the run fails.
        failures.push(`${name}: ${describeError(error)}`);
        console.log(`FAILED: ${describeError(error)}`);
      }
      if (interrupted) return;
    }
  } finally {
    const problems = await context.cleanup();
    for (const problem of problems) console.error(`cleanup: ${problem}`);
  }
  const baselines = await context.baselines();
  const output = { machine, date, ...(options.quick ? { quick: true } : {}), cases: results, baselines };
  mkdirSync(dirname(options.json), { recursive: true });
  writeFileSync(options.json, `${JSON.stringify(output, null, 2)}\n`);
  console.log(`\n${renderTable(results, baselines)}\n`);
  console.log(`${Object.keys(results).length} case(s) in ${((Date.now() - started) / 1000).toFixed(0)} s; results in ${options.json}`);
  if (failures.length > 0) {
    for (const failure of failures) console.error(`FAILED ${failure}`);
    process.exitCode = 1;
  }
}

main().catch((error: unknown) => {
  console.error(describeError(error));
  process.exitCode = 1;
});
