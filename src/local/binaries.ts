import { execFileSync } from 'node:child_process';
import { existsSync, statSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

/*
 * The sandbox agent, the spawner and the seccomp program: where they are built, how bubblewrap must
 * start the agent, and the build itself. The daemon's Sandbox builds the full argument list.
 */

export const AGENT_SOURCE_DIR = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../agent');
export const AGENT_BINARY = path.join(AGENT_SOURCE_DIR, 'build/poseidon-agent');
/* Forks the sandboxes for the daemon (agent/poseidon-spawner.c), built along with the agent. */
export const SPAWNER_BINARY = path.join(AGENT_SOURCE_DIR, 'build/poseidon-spawner');
/* Where the agent is bind-mounted in the sandbox; the mount point must exist in an image's root. */
export const AGENT_SANDBOX_PATH = '/.poseidon/agent';

/*
 * What the agent itself needs: the kept capabilities of privileged executions (a child can only
 * keep what the agent has), setpcap to shrink its children's bounding sets, and dac_read_search so
 * privileged listings and reads see every file. As real root without a user namespace, bwrap
 * otherwise keeps every capability the daemon has; --cap-drop ALL makes the set exact.
 */
export const AGENT_CAPABILITIES = [
  'CAP_CHOWN',
  'CAP_DAC_OVERRIDE',
  'CAP_DAC_READ_SEARCH',
  'CAP_FOWNER',
  'CAP_FSETID',
  'CAP_KILL',
  'CAP_SETGID',
  'CAP_SETUID',
  'CAP_SETPCAP',
  'CAP_NET_BIND_SERVICE',
];

export function agentCapabilityArguments(): string[] {
  return ['--cap-drop', 'ALL', ...AGENT_CAPABILITIES.flatMap((capability) => ['--cap-add', capability])];
}

/*
 * The seccomp program of every sandbox (raw BPF for bwrap --seccomp), written at build time by
 * build/poseidon-seccomp-bpf from the policy in seccomp-policy.c; read it with seccompProgram().
 */
export const SECCOMP_PROGRAM = path.join(AGENT_SOURCE_DIR, 'build/seccomp.bpf');

/* What each output is made from: the agent and the spawner both include the shared frame reader. */
const BUILT_FROM: ReadonlyArray<[output: string, sources: string[]]> = [
  // The Makefile chooses the agent's libc (musl): a change there rebuilds it.
  [AGENT_BINARY, ['poseidon-agent.c', 'frame-reader.h', 'errno-text.h', 'Makefile']],
  [SPAWNER_BINARY, ['poseidon-spawner.c', 'frame-reader.h']],
  [SECCOMP_PROGRAM, ['seccomp-policy.c']],
];

function isStale(output: string, sources: string[]): boolean {
  if (!existsSync(output)) return true;
  const built = statSync(output).mtimeMs;
  return sources.map((name) => path.join(AGENT_SOURCE_DIR, name)).some((source) => existsSync(source) && statSync(source).mtimeMs > built);
}

/*
 * Builds the agent, the spawner and the seccomp program if missing or older than their sources
 * (needs gcc, make, libc6-dev, musl-tools and libseccomp-dev); returns the agent's path (the others are
 * SPAWNER_BINARY and SECCOMP_PROGRAM).
 */
export function ensureAgentBuilt(): string {
  if (BUILT_FROM.some(([output, sources]) => isStale(output, sources))) {
    try {
      execFileSync('make', ['-C', AGENT_SOURCE_DIR, '--no-print-directory'], { stdio: ['ignore', 'pipe', 'pipe'] });
    } catch (error) {
      const output = (error as { stderr?: Buffer }).stderr?.toString() ?? String(error);
      throw new Error(`cannot build the sandbox agent (run scripts/setup.sh, or make -C agent): ${output}`);
    }
  }
  return AGENT_BINARY;
}
