import { type ChildProcess, spawn } from 'node:child_process';
import type { Writable } from 'node:stream';
import { AgentClient } from '../../src/local/agent/agent-client.js';
import { AGENT_SANDBOX_PATH, agentCapabilityArguments, ensureAgentBuilt } from '../../src/local/binaries.js';
import { hostSystemArguments } from '../../src/local/host-root.js';
import { sandboxAccounts } from '../../src/local/sandbox-accounts.js';

/*
 * A minimal sandbox around the agent for tests and measurements (no cgroup, no spawner, host system
 * directories only); the daemon's own sandboxes are src/local/sandbox.ts.
 */

export interface AgentSandbox {
  child: ChildProcess;
  client: AgentClient;
  /* Closes the agent's stdin and waits for bwrap to exit (SIGKILL after a grace period). */
  stop(): Promise<void>;
}

/* The namespaces of every test sandbox; the host's system read-only, /proc and /dev come after. */
export function testSandboxNamespaces(): string[] {
  return ['--unshare-pid', '--unshare-ipc', '--unshare-uts', '--unshare-net', '--die-with-parent', '--new-session'];
}

/* A minimal bwrap sandbox on the host's system directories, before its command. */
export function minimalSandboxArguments(): string[] {
  return [...testSandboxNamespaces(), ...hostSystemArguments(), '--proc', '/proc', '--dev', '/dev'];
}

/* The tail of a test sandbox's bwrap arguments: the agent binary mounted read-only and run in /workspace with a clear environment. */
export function agentCommandArguments(agent: string): string[] {
  return ['--ro-bind', agent, AGENT_SANDBOX_PATH, '--chdir', '/workspace', '--clearenv', ...agentCapabilityArguments(), '--', AGENT_SANDBOX_PATH];
}

/*
 * A sandbox like the daemon's (host /usr read-only, private /workspace and /tmp), running the agent;
 * with options.seccomp, bwrap loads that BPF program (seccompProgram()) through an extra pipe, fd 5.
 */
export async function startAgentSandbox(extraArguments: string[] = [], options: { seccomp?: Buffer } = {}): Promise<AgentSandbox> {
  const agent = ensureAgentBuilt();
  const child = spawn(
    'bwrap',
    [
      ...testSandboxNamespaces(),
      '--unshare-cgroup-try',
      '--hostname',
      'runner',
      ...hostSystemArguments(),
      '--perms',
      '0644',
      '--ro-bind-data',
      '3',
      '/etc/passwd',
      '--perms',
      '0644',
      '--ro-bind-data',
      '4',
      '/etc/group',
      '--proc',
      '/proc',
      '--dev',
      '/dev',
      '--perms',
      '1777',
      '--tmpfs',
      '/workspace',
      '--perms',
      '1777',
      '--tmpfs',
      '/tmp',
      ...extraArguments,
      ...(options.seccomp ? ['--seccomp', '5'] : []),
      ...agentCommandArguments(agent),
    ],
    { stdio: ['pipe', 'pipe', 'inherit', 'pipe', 'pipe', ...(options.seccomp ? (['pipe'] as const) : [])] },
  );
  // bwrap reads each blob to end of file; if it died first, its exit is reported below.
  const accounts = sandboxAccounts({ uid: 65534, gid: 65534 });
  const blobs = [accounts.passwd, accounts.group, ...(options.seccomp ? [options.seccomp] : [])];
  blobs.forEach((blob, index) => {
    const pipe = child.stdio[3 + index] as Writable | null | undefined;
    pipe?.on('error', () => undefined);
    pipe?.end(blob);
  });
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
