import { spawn } from 'node:child_process';
import { seccompProgram } from '../../src/local/seccomp.js';
import { minimalSandboxArguments } from '../../test/support/agent-sandbox.js';
import type { BenchContext, CaseResult } from '../lib/context.js';
import { nowMs, summarize } from '../lib/stats.js';
import { ErrorLog, latencyResult } from './common.js';

/*
 * seccomp_start: what loading the sandbox's seccomp program adds to a bwrap start (/bin/true in a
 * minimal sandbox), against the same start without it. The two kinds alternate, so drift in the
 * machine's load falls on both alike.
 */
function startBwrap(program: Buffer | undefined): Promise<number> {
  return new Promise((resolve, reject) => {
    const began = nowMs();
    const child = spawn('bwrap', [...minimalSandboxArguments(), ...(program ? ['--seccomp', '3'] : []), '--', '/bin/true'], {
      stdio: program ? ['ignore', 'ignore', 'inherit', 'pipe'] : ['ignore', 'ignore', 'inherit'],
    });
    if (program) (child.stdio[3] as NodeJS.WritableStream).end(program);
    child.once('error', reject);
    child.once('exit', (code) => (code === 0 ? resolve(nowMs() - began) : reject(new Error(`bwrap exited ${String(code)}`))));
  });
}

export async function seccompStart(context: BenchContext): Promise<CaseResult> {
  const program = seccompProgram();
  const n = context.n(50);
  const errors = new ErrorLog();
  const without: number[] = [];
  const withFilter: number[] = [];
  for (let i = 0; i < 3; i++) await startBwrap(i % 2 === 0 ? program : undefined);
  for (let i = 0; i < n; i++) {
    try {
      without.push(await startBwrap(undefined));
      withFilter.push(await startBwrap(program));
    } catch (error) {
      errors.add(error);
    }
  }
  const baseline = await context.baseline('bwrap_minimal_start', async () => ({
    what: 'the same bwrap start without --seccomp, interleaved with the case',
    ...summarize(without),
  }));
  return latencyResult(withFilter, errors.count, undefined, baseline);
}
