import { type ChildProcess, spawn } from 'node:child_process';
import { WORKSPACE } from '../runner/workspace-files.js';
import { AgentClient } from './agent/agent-client.js';
import { AGENT_SANDBOX_PATH, agentCapabilityArguments } from './agent/standalone.js';
import type { RunnerCgroup } from './cgroups.js';
import { hostSystemArguments } from './host-root.js';

export interface SandboxOptions {
  bwrap: string;
  /* The agent binary on the host, bind-mounted read-only into the sandbox. */
  agent: string;
  /* Root file system directory of the image; undefined means the host's system directories. */
  rootfs: string | undefined;
  networkAccess: boolean;
  workspaceSizeMiB: number;
  cgroup: RunnerCgroup | undefined;
}

export const SANDBOX_PATH = '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin';

/*
 * Joins the cgroups listed first, then execs the rest: a process must be inside its runner's
 * cgroup before it can fork, or a fork bomb could escape the pids limit.
 */
const ENTER_CGROUPS_THEN_EXEC = 'n=$1; shift; while [ "$n" -gt 0 ]; do echo $$ > "$1" || exit 125; shift; n=$((n-1)); done; exec "$@"';

const READY_TIMEOUT_MS = 15_000;
/* Output of a failing bwrap kept for the error message. */
const STDERR_KEEP = 4096;

function bwrapArguments(options: SandboxOptions): string[] {
  const tmpfsBytes = String(options.workspaceSizeMiB * 1024 * 1024);
  return [
    '--unshare-pid', '--unshare-ipc', '--unshare-uts', '--unshare-cgroup-try',
    ...(options.networkAccess ? [] : ['--unshare-net']),
    '--die-with-parent', '--new-session', '--hostname', 'runner',
    ...(options.rootfs ? ['--ro-bind', options.rootfs, '/'] : hostSystemArguments()),
    '--proc', '/proc', '--dev', '/dev',
    '--perms', '1777', '--size', tmpfsBytes, '--tmpfs', WORKSPACE,
    '--perms', '1777', '--size', tmpfsBytes, '--tmpfs', '/tmp',
    '--ro-bind', options.agent, AGENT_SANDBOX_PATH,
    '--chdir', WORKSPACE, '--clearenv', '--setenv', 'PATH', SANDBOX_PATH,
    ...agentCapabilityArguments(),
    '--', AGENT_SANDBOX_PATH,
  ];
}

/*
 * A live bubblewrap sandbox: its namespaces, root file system, workspace and cgroup exist before
 * any workload. Its first process is the agent, which does file operations itself and starts
 * every execution, so executions inherit the sandbox and its cgroup, and files and background
 * processes persist between executions of one runner.
 */
export class Sandbox {
  #exited = false;
  readonly #exitListeners: Array<() => void> = [];

  private constructor(
    private readonly bwrapProcess: ChildProcess,
    readonly agent: AgentClient,
    private readonly cgroup: RunnerCgroup | undefined,
  ) {
    bwrapProcess.once('exit', () => {
      this.#exited = true;
      for (const listener of this.#exitListeners.splice(0)) listener();
    });
  }

  static async start(options: SandboxOptions): Promise<Sandbox> {
    const procsFiles = options.cgroup?.procsFiles ?? [];
    const child = spawn(
      '/bin/sh',
      ['-c', ENTER_CGROUPS_THEN_EXEC, 'poseidon-enter', String(procsFiles.length), ...procsFiles, options.bwrap, ...bwrapArguments(options)],
      { stdio: ['pipe', 'pipe', 'pipe'], env: { PATH: SANDBOX_PATH } },
    );
    let stderr = '';
    child.stderr?.setEncoding('utf8').on('data', (text: string) => {
      if (stderr.length < STDERR_KEEP) stderr += text;
    });
    const exited = new Promise<string>((resolve) => {
      child.once('error', (error) => resolve(`cannot start bubblewrap: ${error.message}`));
      child.once('exit', (code, signal) => resolve(`bubblewrap exited (${signal ?? code}) before the sandbox was ready`));
    });
    const { stdin, stdout } = child;
    if (!stdin || !stdout) throw new Error('bubblewrap has no stdio pipes');
    const agent = new AgentClient(stdin, stdout);
    let timer: NodeJS.Timeout | undefined;
    const failure = await Promise.race([
      agent.ready.then(() => undefined),
      exited,
      new Promise<string>((resolve) => {
        timer = setTimeout(() => resolve('the sandbox did not become ready in time'), READY_TIMEOUT_MS);
      }),
    ]).catch((error: unknown) => `the sandbox agent failed: ${String(error)}`);
    clearTimeout(timer);
    if (failure !== undefined) {
      child.kill('SIGKILL');
      await new Promise((resolve) => setImmediate(resolve));
      throw new Error(`${failure}: ${stderr.trim() || 'no message'}`);
    }
    return new Sandbox(child, agent, options.cgroup);
  }

  get alive(): boolean {
    return !this.#exited;
  }

  onExit(listener: () => void): void {
    if (this.#exited) listener();
    else this.#exitListeners.push(listener);
  }

  /* Ends every process of the sandbox and removes its cgroup. */
  async destroy(): Promise<void> {
    if (!this.#exited) {
      const exited = new Promise<void>((resolve) => this.onExit(resolve));
      // The sandbox's pid 1 dies with bwrap, and the kernel then kills everything in its pid namespace.
      this.bwrapProcess.kill('SIGKILL');
      await exited;
    }
    await this.cgroup?.destroy();
  }
}
