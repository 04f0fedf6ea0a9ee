import { type Baseline, outputRead, outputReadBaseline, outputReadOnce, outputReadRound, streamCommand, terminalBytes } from '../lib/baselines.js';
import { environmentSpec, type ExecutionOutcome } from '../lib/client.js';
import { fillPool, type BenchContext, type CaseResult } from '../lib/context.js';
import { nowMs, round, timeSequential } from '../lib/stats.js';
import { CpuMeter } from '../lib/system.js';
import { ENV, ErrorLog, latencyResult } from './common.js';

/* WebSocket stdout streaming: one big stream, then many at once; every byte and every exit counted. */

const MB = 1_000_000;
/*
 * The terminal reads, which the cases are held to, run right before each timed round: other load
 * on a shared machine drifts within seconds, and both sides of the ratio then see the same.
 */
const ALTERNATING = ', alternating with the timed rounds';

export async function streamSingle(context: BenchContext): Promise<CaseResult> {
  const { client, pid } = await context.local();
  const cpu = new CpuMeter(pid);
  const bytes = context.quick ? 1 * MB : 100 * MB;
  const n = context.n(3);
  await fillPool(client, environmentSpec(ENV.main, context.quick ? 3 : 30), 60_000);
  const runnerId = await client.claim(ENV.main);
  const errors = new ErrorLog();
  let samples: number[];
  let lostBytes = 0;
  const terminalRuns: number[] = [];
  const terminalRound = async (): Promise<void> => {
    terminalRuns.push(await outputReadRound(bytes, 1, 'terminal'));
  };
  try {
    await client.run(runnerId, streamCommand(MB), { guardMs: 30_000 }).catch((error: unknown) => errors.add(error));
    errors.count = 0;
    const once = async (): Promise<void> => {
      const outcome = await cpu.measure(() => client.run(runnerId, streamCommand(bytes), { guardMs: 60_000 }));
      lostBytes += Math.max(0, terminalBytes(bytes) - outcome.stdoutBytes);
      if (outcome.stdoutBytes !== terminalBytes(bytes) || outcome.exitCode !== 0) {
        throw new Error(
          `received ${outcome.stdoutBytes} of ${terminalBytes(bytes)} bytes, exit ${String(outcome.exitCode)}, errors ${outcome.errors.join('; ')}`,
        );
      }
    };
    await outputReadOnce(MB, 'terminal');
    samples = await timeSequential(once, { n, deadline: Date.now() + 60_000, onError: (error) => errors.add(error), beforeEach: terminalRound });
  } finally {
    await client.returnRunner(runnerId).catch(() => undefined);
  }
  const baseline = await context.baseline(`pipe_read_${bytes}`, () => outputRead(context.quick ? 1 : 3, bytes));
  const terminal = await context.baseline(`terminal_read_${bytes}`, async () => outputReadBaseline(terminalRuns, bytes, 1, 'terminal', ALTERNATING));
  const result = latencyResult(samples, errors.count, undefined, baseline);
  const mbPerS = round(bytes / MB / (Math.max(result.p50_ms ?? 0, 0.001) / 1000), 1);
  return {
    ...result,
    mb_per_s: mbPerS,
    bytes,
    lost_bytes: lostBytes,
    baseline_mb_per_s: baseline.mb_per_s ?? 0,
    ...terminalCeiling(mbPerS, terminal),
    ...cpu.perMb(bytes / MB),
    ...(errors.samples.length > 0 ? { error_samples: errors.samples } : {}),
  };
}

export async function streamConcurrent(context: BenchContext): Promise<CaseResult> {
  const { client, pid } = await context.local();
  const cpu = new CpuMeter(pid);
  const streams = context.quick ? 5 : 50;
  const bytes = context.quick ? 64 * 1024 : 2 * MB;
  const n = context.n(3);
  // One runner per stream, as 50 learners would each run their own code.
  const spec = environmentSpec(ENV.concurrent, streams);
  const reached = await fillPool(client, spec, 60_000);
  if (reached < streams) throw new Error(`pool for concurrent streams reached only ${reached} of ${streams}`);
  const runners = await Promise.all(Array.from({ length: streams }, () => client.claim(ENV.concurrent)));
  const errors = new ErrorLog();
  const samples: number[] = [];
  let lostBytes = 0;
  let lostExits = 0;
  let timed = 0;
  const terminalRuns: number[] = [];
  try {
    const round_ = async (size: number): Promise<{ outcomes: Array<ExecutionOutcome | undefined>; elapsed: number }> => {
      const start = nowMs();
      const outcomes = await Promise.all(
        runners.map((runnerId) =>
          client.run(runnerId, streamCommand(size), { guardMs: 60_000 }).catch((error: unknown) => {
            errors.add(error);
            return undefined;
          }),
        ),
      );
      return { outcomes, elapsed: nowMs() - start };
    };
    await round_(4096);
    await outputReadRound(64 * 1024, streams, 'terminal');
    errors.count = 0;
    const deadline = Date.now() + 60_000;
    for (let i = 0; i < n && Date.now() < deadline; i++) {
      terminalRuns.push(await outputReadRound(bytes, streams, 'terminal'));
      const { outcomes, elapsed } = await cpu.measure(() => round_(bytes));
      let complete = true;
      for (const outcome of outcomes) {
        if (outcome === undefined || outcome.exitCode === undefined) {
          lostExits += 1;
          complete = false;
        }
        const received = outcome?.stdoutBytes ?? 0;
        if (received !== terminalBytes(bytes)) complete = false;
        lostBytes += Math.max(0, terminalBytes(bytes) - received);
        // What a short stream ended with, so that a lost byte can be traced to its cause.
        if (outcome !== undefined && (received !== terminalBytes(bytes) || (outcome.exitCode ?? 0) !== 0)) {
          complete = false;
          const sample = `received ${received} of ${terminalBytes(bytes)} bytes, exit ${String(outcome.exitCode)}, errors ${outcome.errors.join('; ')}`;
          if (errors.samples.length < 5) errors.samples.push(sample);
        }
      }
      if (complete) {
        samples.push(elapsed);
        timed += elapsed;
      } else {
        errors.count += 1;
      }
    }
  } finally {
    await Promise.all(runners.map((runnerId) => client.returnRunner(runnerId).catch(() => undefined)));
    await client.deleteEnvironment(ENV.concurrent).catch(() => undefined);
  }
  const baseline = await context.baseline(`pipe_read_${streams}x${bytes}`, () => outputRead(context.quick ? 1 : 3, bytes, streams));
  const terminal = await context.baseline(`terminal_read_${streams}x${bytes}`, async () =>
    outputReadBaseline(terminalRuns, bytes, streams, 'terminal', ALTERNATING),
  );
  const result = latencyResult(samples, errors.count, timed, baseline);
  const mbPerS = round((bytes * streams) / MB / (Math.max(result.p50_ms ?? 0, 0.001) / 1000), 1);
  return {
    ...result,
    mb_per_s: mbPerS,
    streams,
    bytes_per_stream: bytes,
    lost_bytes: lostBytes,
    lost_exits: lostExits,
    baseline_mb_per_s: baseline.mb_per_s ?? 0,
    ...terminalCeiling(mbPerS, terminal),
    ...cpu.perMb((bytes * streams) / MB),
    ...(errors.samples.length > 0 ? { error_samples: errors.samples } : {}),
  };
}

/*
 * Every execution writes to a terminal, and the kernel moves a terminal's output 4 KiB per
 * wake-up of its reader: a raw read from a pty master is the ceiling no daemon can pass, so the
 * cases report their rate against it besides the pipe's.
 */
function terminalCeiling(mbPerS: number, terminal: Baseline): { terminal_mb_per_s: number; of_terminal: number } {
  const ceiling = terminal.mb_per_s ?? 0;
  return { terminal_mb_per_s: ceiling, of_terminal: ceiling > 0 ? round(mbPerS / ceiling, 2) : 0 };
}
