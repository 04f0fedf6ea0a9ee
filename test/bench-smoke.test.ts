import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { REPO_ROOT } from './support/daemon.js';

/*
 * Runs every bench case once with tiny sizes (--quick) and checks only the shape of the results:
 * timings on a shared machine are for `npm run bench` to report, never for `npm test` to assert.
 */

const LATENCY_KEYS = ['n', 'p50_ms', 'p90_ms', 'p99_ms', 'max_ms', 'ops_per_s', 'errors', 'baseline', 'baseline_p50_ms', 'ratio_p50'];

/* The terminal ceiling (measured alternating with the timed rounds) and CPU per MB on both ends. */
const STREAM_KEYS = ['terminal_mb_per_s', 'of_terminal', 'daemon_cpu_ms_per_mb', 'client_cpu_ms_per_mb'];

const EXPECTED: Record<string, string[]> = {
  claim_copy_return: LATENCY_KEYS,
  execute_true: LATENCY_KEYS,
  throughput: LATENCY_KEYS,
  stream_single: [...LATENCY_KEYS, 'mb_per_s', ...STREAM_KEYS],
  stream_concurrent: [...LATENCY_KEYS, 'mb_per_s', 'lost_bytes', 'lost_exits', ...STREAM_KEYS],
  idle_runners: [
    'n',
    'errors',
    'rss_mb_at_10',
    'rss_mb_at_100',
    'rss_mb_at_1000',
    'host_mb_per_runner',
    'host_mb_per_runner_fills',
    'host_mb_per_runner_removals',
  ],
  pool_refill_100: LATENCY_KEYS,
  nomad_claim: LATENCY_KEYS,
  seccomp_start: LATENCY_KEYS,
  image_pull: [...LATENCY_KEYS, 'mb_per_s', 'baseline_mb_per_s', 'unpacked_mb'],
  codeocean_session: [...LATENCY_KEYS, 'lost_exits', 'lost_bytes', 'baseline_ops_per_s', 'ratio_rate', 'ratio_p99'],
  burst_claims: ['n', 'p50_ms', 'p99_ms', 'errors', 'served', 'overload_errors', 'all_served_ms', 'baseline_ms', 'ratio_served', 'api_p99_ms'],
  nomad_scale: [...LATENCY_KEYS, 'recovered_runners', 'start_ms', 'recovery_ms', 'rss_mb', 'storm_events_per_s', 'resync_ms', 'baseline_p99_ms'],
};

test('every bench case runs with --quick and reports the documented keys', { timeout: 170_000 }, async () => {
  const dir = mkdtempSync(join(tmpdir(), 'bench-smoke-'));
  const jsonPath = join(dir, 'results.json');
  try {
    const { code, output } = await new Promise<{ code: number | null; output: string }>((resolve, reject) => {
      const child = spawn(process.execPath, ['--import', 'tsx', 'bench/run.ts', '--quick', '--json', jsonPath], {
        cwd: REPO_ROOT,
        env: Object.fromEntries(Object.entries(process.env).filter(([key]) => !key.startsWith('POSEIDON_'))),
        stdio: ['ignore', 'pipe', 'pipe'],
      });
      let text = '';
      child.stdout.on('data', (chunk: Buffer) => (text += chunk.toString()));
      child.stderr.on('data', (chunk: Buffer) => (text += chunk.toString()));
      child.once('error', reject);
      child.once('close', (exitCode) => resolve({ code: exitCode, output: text }));
    });
    assert.equal(code, 0, output);
    const results = JSON.parse(readFileSync(jsonPath, 'utf8')) as { machine?: unknown; date?: unknown; cases?: Record<string, Record<string, unknown>> };
    assert.equal(typeof results.machine, 'string');
    assert.ok(typeof results.date === 'string' && !Number.isNaN(Date.parse(results.date)), `date: ${String(results.date)}`);
    for (const [name, keys] of Object.entries(EXPECTED)) {
      const result = results.cases?.[name];
      assert.ok(result !== undefined, `case ${name} produced no result:\n${output}`);
      for (const key of keys) assert.ok(key in result, `case ${name} lacks "${key}": ${JSON.stringify(result)}`);
      assert.equal(typeof result['n'], 'number');
      assert.ok((result['n'] as number) >= 1, `case ${name} measured nothing: ${JSON.stringify(result)}`);
    }
    for (const name of ['stream_single', 'stream_concurrent']) {
      const result = results.cases?.[name] ?? {};
      // Read from /proc in 10 ms ticks, which --quick's few MB may not reach: a number, maybe 0.
      for (const key of ['daemon_cpu_ms_per_mb', 'client_cpu_ms_per_mb'])
        assert.ok(Number.isFinite(result[key]) && (result[key] as number) >= 0, `${name} ${key}: ${JSON.stringify(result)}`);
      assert.ok((result['terminal_mb_per_s'] as number) > 0, `${name}: ${JSON.stringify(result)}`);
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
