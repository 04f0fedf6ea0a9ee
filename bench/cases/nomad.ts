import { BenchClient, environmentSpec } from '../lib/client.js';
import { until, type BenchContext, type CaseResult } from '../lib/context.js';
import { freePort, startDaemon } from '../../test/support/daemon.js';
import { nowMs, round, sleep, summarize, timeSequential } from '../lib/stats.js';
import { rssMb, startFakeNomadProcess } from '../lib/system.js';
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

/*
 * The Nomad backend at a large installation's size: the fake Nomad (lean: no validation, no history)
 * holding `environments` × `perEnvironment` runner jobs. A first daemon builds them; a second one
 * starts against them and recovers every runner; then claims are timed during an event storm, and
 * the resync after an event-stream gap (the fake forgets its event buffer) is timed.
 */
export async function nomadScale(context: BenchContext): Promise<CaseResult> {
  const environments = context.quick ? 3 : 200;
  const perEnvironment = context.quick ? 4 : 50;
  const total = environments * perEnvironment;
  const stormSeconds = context.quick ? 1 : 10;
  const eventsPerSecond = 1000;
  const fake = await startFakeNomadProcess(await freePort(), { lean: true });
  context.onCleanup('fake Nomad (scale)', () => fake.stop());
  const config = {
    nomad: { enabled: true, address: '127.0.0.1', port: fake.port, requesttimeout: 10_000 },
    local: { enabled: false },
    runners: { refillconcurrency: 64, buildconcurrency: 128 },
  };
  const errors = new ErrorLog();
  const ids = Array.from({ length: environments }, (_, index) => 1000 + index);
  const idleTotal = async (client: BenchClient): Promise<number> =>
    Object.values(await client.statistics()).reduce((sum, pool) => sum + (ids.includes(pool.id) ? pool.idleRunners + pool.usedRunners : 0), 0);

  // 1. A first daemon creates the environments and fills their pools: the runner jobs stay in Nomad after it stops.
  const first = await context.startDaemon('Nomad daemon (fill)', config);
  const fillStart = nowMs();
  for (let next = 0; next < ids.length; next += 16) {
    await Promise.all(ids.slice(next, next + 16).map((id) => first.client.putEnvironment(environmentSpec(id, perEnvironment))));
  }
  const filled = await until(async () => (await idleTotal(first.client)) >= total, Date.now() + (context.quick ? 60_000 : 600_000), 500);
  const fillMs = nowMs() - fillStart;
  if (!filled) throw new Error(`the fill reached only ${await idleTotal(first.client)} of ${total} runners`);
  await first.client.close();
  await first.daemon.stop();

  // 2. A new daemon starts against Nomad's 10,000 runner jobs: start (answering /health) and full recovery.
  const startBegin = nowMs();
  // At info, as operators run it: the resync's end is read from its log line.
  const profile = context.options.profileDir;
  const daemon = await startDaemon({
    config: { ...config, logger: { level: 'info' } },
    startTimeoutMs: 300_000,
    ...(profile === undefined ? {} : { entry: 'bench/lib/profiled-cli.ts', env: { BENCH_PROFILE_DIR: profile } }),
  });
  const startMs = nowMs() - startBegin;
  const client = new BenchClient(daemon.origin);
  context.onCleanup('Nomad daemon (recovery)', async () => {
    await client.close().catch(() => undefined);
    await daemon.stop();
  });
  const recovered = await until(async () => (await idleTotal(client)) >= total, Date.now() + 300_000, 100);
  const recoveryMs = nowMs() - startBegin;
  const recoveredRunners = await idleTotal(client);
  if (!recovered) errors.add(new Error(`recovered only ${recoveredRunners} of ${total} runners`));
  await sleep(context.quick ? 100 : 2000);
  const rss = rssMb(daemon.pid);

  // 3. Claims at the same pace without, then with the fake publishing allocation updates at eventsPerSecond.
  const held: string[] = [];
  const claimsWanted = Math.min(Math.floor((total - environments) / 2), context.quick ? 5 : 1000);
  // Claims spread over time and environments, as learners arrive; none may empty a pool.
  const claimFor = async (seconds: number, offset: number): Promise<number[]> => {
    const latencies: number[] = [];
    const began = nowMs();
    for (let i = 0; i < claimsWanted && nowMs() - began < seconds * 1000; i++) {
      const start = nowMs();
      try {
        held.push(await client.claim(ids[(offset + i) % ids.length] ?? 0, 600));
        latencies.push(nowMs() - start);
      } catch (error) {
        errors.add(error);
      }
      await sleep(Math.max(0, (seconds * 1000) / claimsWanted - (nowMs() - start)));
    }
    while (nowMs() - began < seconds * 1000) await sleep(50);
    return latencies;
  };
  const quiet = summarize(await claimFor(stormSeconds, 0));
  const stormBefore = (await fake.control('GET', '/event-storm')) as { events: number };
  await fake.control('POST', '/event-storm', { perSecond: eventsPerSecond, seconds: stormSeconds });
  const stormStart = nowMs();
  const samples = await claimFor(stormSeconds, Math.floor(ids.length / 2));
  const stormAfter = (await fake.control('GET', '/event-storm')) as { events: number };
  const stormRate = (stormAfter.events - stormBefore.events) / ((nowMs() - stormStart) / 1000);
  const rssAfterStorm = rssMb(daemon.pid);

  // 4. The event stream breaks and the fake has forgotten its buffer: the daemon must notice the gap and resync.
  const logOffset = daemon.logs().length;
  const dropped = Date.now();
  await fake.control('POST', '/event-stream/drop', { clearBuffer: true });
  const resyncBudgetS = context.quick ? 30 : 300;
  const resync = await until(async () => resyncTimes(daemon.logs().slice(logOffset)).loaded !== undefined, Date.now() + resyncBudgetS * 1000, 50);
  const times = resyncTimes(daemon.logs().slice(logOffset));
  if (!resync) errors.add(new Error(`no resync after the event-stream gap within ${resyncBudgetS} s`));

  const baseline = await httpBaseline(context);
  return {
    ...latencyResult(samples, errors.count, undefined, baseline),
    environments,
    runners: total,
    recovered_runners: recoveredRunners,
    fill_ms: round(fillMs, 0),
    start_ms: round(startMs, 0),
    recovery_ms: round(recoveryMs, 0),
    rss_mb: round(rss ?? 0, 1),
    rss_mb_after_storm: round(rssAfterStorm ?? 0, 1),
    storm_events_per_s: round(stormRate, 0),
    resync_ms: times.loaded !== undefined && times.gap !== undefined ? times.loaded - times.gap : -1,
    resync_after_drop_ms: times.loaded !== undefined ? times.loaded - dropped : -1,
    // A shared host's scheduling tail hits the no-op route as well: the claim p99 is read against it.
    baseline_p99_ms: baseline.p99_ms,
    // The same claims without the storm: what the storm itself adds.
    quiet_claim_p50_ms: quiet.p50_ms,
    quiet_claim_p99_ms: quiet.p99_ms,
    ratio_p99: baseline.p99_ms > 0 ? round((summarize(samples).p99_ms || 0) / baseline.p99_ms, 2) : 0,
    fake_rss_mb: round((fake.pid === undefined ? undefined : rssMb(fake.pid)) ?? 0, 1),
    ...(errors.samples.length > 0 ? { error_samples: errors.samples } : {}),
  };
}

/* From the daemon's JSON log: when it reported the gap, and when the resync that followed ended. */
function resyncTimes(log: string): { gap: number | undefined; loaded: number | undefined } {
  let gap: number | undefined;
  let loaded: number | undefined;
  for (const line of log.split('\n')) {
    if (!line.startsWith('{')) continue;
    let entry: { msg?: string; time?: string };
    try {
      entry = JSON.parse(line) as { msg?: string; time?: string };
    } catch {
      continue;
    }
    const time = entry.time === undefined ? undefined : Date.parse(entry.time);
    if (entry.msg?.startsWith('Nomad events may have been missed') && gap === undefined) gap = time;
    else if (entry.msg === 'Nomad state loaded' && gap !== undefined && loaded === undefined) loaded = time;
  }
  return { gap, loaded };
}
