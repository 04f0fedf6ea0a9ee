import { type ChildProcess, execFileSync, spawn } from 'node:child_process';
import { existsSync, statSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { hostSystemArguments } from '../host-root.js';
import type { Writable } from 'node:stream';
import { sandboxAccounts } from '../sandbox-accounts.js';
import { AgentClient } from './agent-client.js';

/*
 * How bubblewrap must start the agent, and a minimal sandbox around it for tests and measurements
 * (no cgroup, host system directories only). The daemon's Sandbox builds the full argument list.
 */

export const AGENT_SOURCE_DIR = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../../agent');
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
  'CAP_CHOWN', 'CAP_DAC_OVERRIDE', 'CAP_DAC_READ_SEARCH', 'CAP_FOWNER', 'CAP_FSETID', 'CAP_KILL',
  'CAP_SETGID', 'CAP_SETUID', 'CAP_SETPCAP', 'CAP_NET_BIND_SERVICE',
];

export function agentCapabilityArguments(): string[] {
  return ['--cap-drop', 'ALL', ...AGENT_CAPABILITIES.flatMap((capability) => ['--cap-add', capability])];
}

/* Both binaries include the shared frame reader, so a change to it makes them stale too. */
const SHARED_SOURCES = ['frame-reader.h'];

function isStale(binary: string, sourceName: string): boolean {
  if (!existsSync(binary)) return true;
  const built = statSync(binary).mtimeMs;
  return [sourceName, ...SHARED_SOURCES]
    .map((name) => path.join(AGENT_SOURCE_DIR, name))
    .some((source) => existsSync(source) && statSync(source).mtimeMs > built);
}

/*
 * Builds the agent and the spawner if missing or older than their sources (needs gcc, make and
 * libc6-dev); returns the agent's path (the spawner's is SPAWNER_BINARY).
 */
export function ensureAgentBuilt(): string {
  if (isStale(AGENT_BINARY, 'poseidon-agent.c') || isStale(SPAWNER_BINARY, 'poseidon-spawner.c')) {
    try {
      execFileSync('make', ['-C', AGENT_SOURCE_DIR, '--no-print-directory'], { stdio: ['ignore', 'pipe', 'pipe'] });
    } catch (error) {
      const output = (error as { stderr?: Buffer }).stderr?.toString() ?? String(error);
      throw new Error(`cannot build the sandbox agent (run scripts/setup.sh, or make -C agent): ${output}`);
    }
  }
  return AGENT_BINARY;
}

export interface AgentSandbox {
  child: ChildProcess;
  client: AgentClient;
  /* Closes the agent's stdin and waits for bwrap to exit (SIGKILL after a grace period). */
  stop(): Promise<void>;
}

/* A sandbox like the daemon's (host /usr read-only, private /workspace and /tmp), running the agent. */
export async function startAgentSandbox(extraArguments: string[] = []): Promise<AgentSandbox> {
  const agent = ensureAgentBuilt();
  const system = hostSystemArguments();
  const child = spawn(
    'bwrap',
    [
      '--unshare-pid', '--unshare-ipc', '--unshare-uts', '--unshare-net', '--unshare-cgroup-try',
      '--die-with-parent', '--new-session', '--hostname', 'runner',
      ...system,
      '--perms', '0644', '--ro-bind-data', '3', '/etc/passwd', '--perms', '0644', '--ro-bind-data', '4', '/etc/group',
      '--proc', '/proc', '--dev', '/dev',
      '--perms', '1777', '--tmpfs', '/workspace',
      '--perms', '1777', '--tmpfs', '/tmp',
      '--ro-bind', agent, AGENT_SANDBOX_PATH,
      ...extraArguments,
      '--chdir', '/workspace', '--clearenv',
      ...agentCapabilityArguments(),
      '--', AGENT_SANDBOX_PATH,
    ],
    { stdio: ['pipe', 'pipe', 'inherit', 'pipe', 'pipe'] },
  );
  const accounts = sandboxAccounts({ uid: 65534, gid: 65534 });
  (child.stdio[3] as Writable | null)?.end(accounts.passwd);
  (child.stdio[4] as Writable | null)?.end(accounts.group);
  const { stdin, stdout } = child;
  if (!stdin || !stdout) throw new Error('bwrap has no stdio pipes');
  const client = new AgentClient(stdin, stdout);
  const exited = new Promise<void>((resolve) => {
    if (child.exitCode !== null || child.signalCode !== null) resolve();
    else child.once('exit', () => resolve());
  });
  const stop = async (): Promise<void> => {
    client.close();
    const timer = setTimeout(() => child.kill('SIGKILL'), 2000);
    await exited;
    clearTimeout(timer);
  };
  try {
    await client.ready;
  } catch (error) {
    child.kill('SIGKILL');
    await exited;
    throw error;
  }
  return { child, client, stop };
}
