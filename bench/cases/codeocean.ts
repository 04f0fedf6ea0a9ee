import { pythonOnHost, rawBwrapBatch, SESSION_FILES, SESSION_INPUT, SESSION_OUTPUT_BYTES } from '../lib/baselines.js';
import { ApiError, BenchClient, environmentSpec, type FileCopy } from '../lib/client.js';
import { fillPool, type BenchContext, type CaseResult } from '../lib/context.js';
import { nowMs, percentile, round, sleep, summarize } from '../lib/stats.js';
import { CORES, ENV, ErrorLog, latencyResult } from './common.js';

/*
 * CodeOcean's load as it is: a learner keeps one runner per environment and reuses it for every run
 * (PATCH the exercise files, execute, read the output) until it expires; a class start claims many
 * runners at once.
 */

const SESSION_COMMAND = 'python3 main.py';

/* What the WebSocket carries: the terminal echoes the typed line, and sends every "\n" as "\r\n". */
const TERMINAL_OUTPUT_BYTES = Buffer.byteLength(SESSION_INPUT.replace(/\n/g, '\r\n')) + SESSION_OUTPUT_BYTES + SESSION_OUTPUT_BYTES / 64;

function sessionFiles(): FileCopy[] {
  return SESSION_FILES.map((file) => ({ path: file.path, content: Buffer.from(file.content).toString('base64') }));
}

export async function codeoceanSession(context: BenchContext): Promise<CaseResult> {
  const { client, daemon } = await context.local();
  const learners = context.quick ? 3 : 50;
  const durationMs = (context.quick ? Math.min(context.options.durationS, 2) : context.options.durationS) * 1000;
  const spec = environmentSpec(ENV.session, learners);
  const reached = await fillPool(client, spec, 90_000);
  if (reached < learners) throw new Error(`the pool for ${learners} learners reached only ${reached}`);
  const runners = await Promise.all(Array.from({ length: learners }, () => client.claim(ENV.session, 600)));
  const errors = new ErrorLog();
  const samples: number[] = [];
  let lostExits = 0;
  let lostBytes = 0;
  const files = sessionFiles();
  const round_ = async (runnerId: string): Promise<void> => {
    await client.copyFiles(runnerId, files);
    let outcome: Awaited<ReturnType<BenchClient['run']>> | undefined;
    try {
      outcome = await client.run(runnerId, SESSION_COMMAND, { guardMs: 60_000, stdin: SESSION_INPUT });
    } catch (error) {
      lostExits += 1;
      lostBytes += TERMINAL_OUTPUT_BYTES;
      throw error;
    }
    const missing = Math.max(0, TERMINAL_OUTPUT_BYTES - outcome.stdoutBytes);
    lostBytes += missing;
    if (outcome.exitCode === undefined) lostExits += 1;
    if (outcome.exitCode !== 0 || missing > 0) {
      throw new Error(`exit ${String(outcome.exitCode)}, ${outcome.stdoutBytes} of ${TERMINAL_OUTPUT_BYTES} bytes, stderr ${outcome.stderrBytes} bytes`);
    }
  };
  let elapsed = 0;
  try {
    // One round per learner first: connections, the Python in the page cache and code paths warm.
    await Promise.all(runners.map((runnerId) => round_(runnerId).catch((error: unknown) => errors.add(error))));
    errors.count = 0;
    lostExits = 0;
    lostBytes = 0;
    const started = nowMs();
    const deadline = Date.now() + durationMs;
    await Promise.all(
      runners.map(async (runnerId) => {
        while (Date.now() < deadline) {
          const start = nowMs();
          try {
            await round_(runnerId);
            samples.push(nowMs() - start);
          } catch (error) {
            errors.add(error);
          }
        }
      }),
    );
    elapsed = nowMs() - started;
  } finally {
    await Promise.all(runners.map((runnerId) => client.returnRunner(runnerId).catch(() => undefined)));
    await client.deleteEnvironment(ENV.session).catch(() => undefined);
  }
  const baseline = await context.baseline(`python_on_host_${learners}`, () =>
    pythonOnHost(learners, context.quick ? 1000 : Math.min(durationMs, 10_000), daemon.cgroupParent),
  );
  const result = latencyResult(samples, errors.count, elapsed, baseline);
  const baselineRate = baseline.ops_per_s ?? 0;
  return {
    ...result,
    learners,
    lost_exits: lostExits,
    lost_bytes: lostBytes,
    bytes_per_execution: TERMINAL_OUTPUT_BYTES,
    baseline_ops_per_s: baselineRate,
    baseline_p99_ms: baseline.p99_ms,
    ratio_rate: baselineRate > 0 ? round((result.ops_per_s ?? 0) / baselineRate, 2) : 0,
    ratio_p99: baseline.p99_ms > 0 ? round((result.p99_ms ?? 0) / baseline.p99_ms, 2) : 0,
    ...(errors.samples.length > 0 ? { error_samples: errors.samples } : {}),
  };
}

/*
 * A class start: many claims at once on a small pool, with the claim wait on (the daemon's default
 * runners.claimtimeout). Every claim should be served, none answered NOMAD_OVERLOAD, in about the
 * time the host needs to build the missing sandboxes; the API should stay responsive meanwhile.
 */
export async function burstClaims(context: BenchContext): Promise<CaseResult> {
  const { daemon, client } = await context.local();
  const claims = context.quick ? 8 : 200;
  const poolSize = context.quick ? 2 : 20;
  const buildConcurrency = Math.max(8, 4 * CORES);
  const missing = claims - poolSize;
  // The raw build is timed right before and right after the burst: on a shared host the load drifts.
  const rawBefore = await rawBwrapBatch(missing, buildConcurrency);
  await fillPool(client, environmentSpec(ENV.burst, poolSize), 60_000);
  // Its own connections, one per claim, so that no claim queues inside the client.
  const burstClient = new BenchClient(daemon.origin, claims + 8);
  const errors = new ErrorLog();
  let overloads = 0;
  const latencies: number[] = [];
  const held: string[] = [];
  const apiLatencies: number[] = [];
  let probing = true;
  let servedMs = 0;
  try {
    // The API's answer time while the burst is being built: a health check every 20 ms.
    const probe = (async () => {
      while (probing) {
        const start = nowMs();
        await burstClient.rawGet('/api/v1/health').catch(() => undefined);
        apiLatencies.push(nowMs() - start);
        await sleep(20);
      }
    })();
    const started = nowMs();
    await Promise.all(
      Array.from({ length: claims }, async () => {
        const start = nowMs();
        try {
          held.push(await burstClient.claim(ENV.burst, 600));
          latencies.push(nowMs() - start);
        } catch (error) {
          if (error instanceof ApiError && error.errorCode === 'NOMAD_OVERLOAD') overloads += 1;
          else errors.add(error);
        }
      }),
    );
    servedMs = nowMs() - started;
    probing = false;
    await probe;
  } finally {
    probing = false;
    await Promise.all(held.map((runnerId) => client.returnRunner(runnerId).catch(() => undefined)));
    await client.deleteEnvironment(ENV.burst).catch(() => undefined);
    await burstClient.close();
  }
  const rawAfter = await rawBwrapBatch(missing, buildConcurrency);
  const baseline = await context.baseline(`bwrap_batch_${missing}x${buildConcurrency}`, async () => ({
    what: `${missing} raw sandboxes, ${buildConcurrency} at a time (runners.buildconcurrency's default), timed before and after the burst`,
    ...summarize([(rawBefore + rawAfter) / 2]),
  }));
  const summary = summarize(latencies);
  const apiSorted = [...apiLatencies].sort((a, b) => a - b);
  return {
    ...summary,
    ops_per_s: round(latencies.length / Math.max(servedMs / 1000, 1e-9), 1),
    errors: errors.count,
    claims,
    pool_size: poolSize,
    served: latencies.length,
    overload_errors: overloads,
    all_served_ms: round(servedMs, 0),
    baseline: baseline.what,
    baseline_ms: baseline.p50_ms,
    ratio_served: baseline.p50_ms > 0 ? round(servedMs / baseline.p50_ms, 2) : 0,
    api_p50_ms: round(percentile(apiSorted, 50)),
    api_p99_ms: round(percentile(apiSorted, 99)),
    ...(errors.samples.length > 0 ? { error_samples: errors.samples } : {}),
  };
}
