import { WORKSPACE } from '../runner/workspace-files.js';
import { AgentClient } from './agent/agent-client.js';
import { AGENT_SANDBOX_PATH, agentCapabilityArguments } from './agent/standalone.js';
import type { RunnerCgroup } from './cgroups.js';
import { hostSystemArguments } from './host-root.js';
import { describeExit, type SpawnedProcess, type SpawnerClient } from './spawner-client.js';

export interface SandboxOptions {
  bwrap: string;
  /* The agent binary on the host, bind-mounted read-only into the sandbox. */
  agent: string;
  /* Root file system directory of the image; undefined means the host's system directories. */
  rootfs: string | undefined;
  networkAccess: boolean;
  workspaceSizeMiB: number;
  cgroup: RunnerCgroup | undefined;
  /* Starts the sandbox's processes without forking the daemon. */
  spawner: SpawnerClient;
}

export const SANDBOX_PATH = '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin';

/*
 * Joins the cgroups listed first, then execs the rest: a process must be inside its runner's
 * cgroup before it can fork, or a fork bomb could escape the pids limit.
 */
const ENTER_CGROUPS_THEN_EXEC = 'n=$1; shift; while [ "$n" -gt 0 ]; do echo $$ > "$1" || exit 125; shift; n=$((n-1)); done; exec "$@"';

const READY_TIMEOUT_MS = 15_000;

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
    private readonly bwrapProcess: SpawnedProcess,
    readonly agent: AgentClient,
    private readonly cgroup: RunnerCgroup | undefined,
  ) {
    void bwrapProcess.exited.then(() => {
      this.#exited = true;
      for (const listener of this.#exitListeners.splice(0)) listener();
    });
  }

  /* The spawner forks and execs the sandbox, so the daemon (a large process) never forks itself. */
  static async start(options: SandboxOptions): Promise<Sandbox> {
    const procsFiles = options.cgroup?.procsFiles ?? [];
    const child = options.spawner.spawn(
      ['/bin/sh', '-c', ENTER_CGROUPS_THEN_EXEC, 'poseidon-enter', String(procsFiles.length), ...procsFiles, options.bwrap, ...bwrapArguments(options)],
      { PATH: SANDBOX_PATH },
    );
    const exited = child.exited.then((exit) =>
      exit.code === null && exit.signal === null
        ? `cannot start bubblewrap: ${exit.stderr}`
        : `bubblewrap exited (${describeExit(exit)}) before the sandbox was ready`,
    );
    let agent: AgentClient | undefined;
    let timer: NodeJS.Timeout | undefined;
    const failure = await Promise.race([
      child.connection.then((socket) => {
        agent = new AgentClient(socket, socket);
        // The handshake paused the socket; the client's listeners are in place now.
        socket.resume();
        return agent.ready;
      }).then(() => undefined),
      exited,
      new Promise<string>((resolve) => {
        timer = setTimeout(() => resolve('the sandbox did not become ready in time'), READY_TIMEOUT_MS);
      }),
    ]).catch((error: unknown) => `the sandbox agent failed: ${String(error)}`);
    clearTimeout(timer);
    if (failure !== undefined) {
      child.kill();
      // bwrap's message comes with its exit status; a stuck spawner must not hang the caller.
      const exit = await Promise.race([child.exited, new Promise<undefined>((resolve) => setTimeout(() => resolve(undefined), 2000).unref())]);
      void child.connection.then((socket) => socket.destroy(), () => undefined);
      throw new Error(`${failure}: ${exit?.stderr.trim() || 'no message'}`);
    }
    if (!agent) throw new Error('the sandbox agent is missing');
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
      this.bwrapProcess.kill();
      await exited;
    }
    await this.cgroup?.destroy();
  }
}
