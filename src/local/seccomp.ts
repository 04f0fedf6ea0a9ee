import { readFileSync } from 'node:fs';
import { SECCOMP_PROGRAM } from './binaries.js';

/*
 * The seccomp filter of every sandbox: the raw BPF program (struct sock_filter[], 8 bytes per
 * instruction) that agent/build/poseidon-seccomp-bpf writes from the policy in
 * agent/seccomp-policy.c. Give it to bwrap through a pipe, `--seccomp FD`: bwrap loads it into the
 * sandbox's first process and every process of the runner inherits it.
 */

const SOCK_FILTER_SIZE = 8;
/* The kernel's limit on one filter (BPF_MAXINSNS). */
const MAX_INSTRUCTIONS = 4096;

let cached: Buffer | undefined;

/*
 * The program's bytes, read once (ensureAgentBuilt() makes and refreshes the file). Throws if the
 * file is missing or not a plausible program: a sandbox must never start without its filter.
 */
export function seccompProgram(): Buffer {
  if (cached !== undefined) return cached;
  let program: Buffer;
  try {
    program = readFileSync(SECCOMP_PROGRAM);
  } catch (error) {
    throw new Error(
      `the sandbox seccomp program ${SECCOMP_PROGRAM} cannot be read (${(error as Error).message}); ` +
        'build it with scripts/setup.sh or make -C agent (needs libseccomp-dev)',
    );
  }
  const instructions = program.length / SOCK_FILTER_SIZE;
  if (program.length === 0 || !Number.isInteger(instructions) || instructions > MAX_INSTRUCTIONS) {
    throw new Error(`the sandbox seccomp program ${SECCOMP_PROGRAM} is not a BPF program (${program.length} bytes); rebuild it with make -C agent`);
  }
  cached = program;
  return program;
}
