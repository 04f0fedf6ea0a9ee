import { environmentSpec } from '../lib/client.js';
import { until, type BenchContext, type CaseResult } from '../lib/context.js';
import { freePort } from '../../test/support/daemon.js';
import { nowMs, round, timeSequential } from '../lib/stats.js';
import { startFakeNomadProcess } from '../lib/system.js';
import { ENV, ErrorLog, httpBaseline, latencyResult } from './common.js';

/*
 * The Nomad backend against the fake Nomad with 200 ms per call (Poseidon's measured cost of one
 * synchronous Nomad call): a claim from a filled pool should cost an HTTP round trip, not a Nomad call.
 */

const NOMAD_LATENCY_MS = 200;

export async function nomadClaim(context: BenchContext): Promise<CaseResult> {
  const fake = await startFakeNomadProcess(await freePort());
  context.onCleanup('fake Nomad', () => fake.stop());
  await fake.setLatency(NOMAD_LATENCY_MS);
  const { client } = await context.startDaemon('Nomad daemon', {
    nomad: { enabled: true, address: '127.0.0.1', port: fake.port, requesttimeout: 5000 },
    local: { enabled: false },
  });
  const n = context.n(50);
  const warmups = context.quick ? 1 : 3;
  // Every claim of the run fits in the pool, so no claim can meet an empty pool while being timed.
  const poolSize = n + warmups + (context.quick ? 1 : 10);
  const spec = environmentSpec(ENV.nomad, poolSize);
  const errors = new ErrorLog();
  const idle = async (): Promise<number> => (await client.poolOf(ENV.nomad))?.idleRunners ?? 0;

  const fillStart = nowMs();
  await client.putEnvironment(spec);
  const filled = await until(async () => (await idle()) >= poolSize, Date.now() + 60_000, 20);
  const refillMs = nowMs() - fillStart;
  if (!filled) errors.add(new Error(`pool reached only ${await idle()} of ${poolSize} in 60 s`));

  const held: string[] = [];
  for (let i = 0; i < warmups; i++) held.push(await client.claim(ENV.nomad));
  await until(async () => (await idle()) >= poolSize, Date.now() + 30_000, 20);

  const samples = await timeSequential(
    async () => {
      held.push(await client.claim(ENV.nomad));
    },
    { n, deadline: Date.now() + 30_000, onError: (error) => errors.add(error) },
  );
  // The pool refills in the background after the claims; time until it is whole again.
  const refillAfterStart = nowMs();
  const refilledAfter = await until(async () => (await idle()) >= poolSize, Date.now() + 60_000, 20);
  const refillAfterMs = nowMs() - refillAfterStart;
  await Promise.all(held.map((runnerId) => client.returnRunner(runnerId).catch(() => undefined)));
  await client.deleteEnvironment(ENV.nomad).catch(() => undefined);

  const baseline = await httpBaseline(context);
  return {
    ...latencyResult(samples, errors.count, undefined, baseline),
    nomad_latency_ms: NOMAD_LATENCY_MS,
    pool_size: poolSize,
    refill_ms: round(refillMs, 0),
    refill_after_claims_ms: refilledAfter ? round(refillAfterMs, 0) : -1,
    refilled_runners: samples.length,
    ...(errors.samples.length > 0 ? { error_samples: errors.samples } : {}),
  };
}
