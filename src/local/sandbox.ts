import { existsSync } from 'node:fs';
import { WORKSPACE } from '../runner/workspace-files.js';
import { AgentClient } from './agent/agent-client.js';
import { agentCapabilityArguments } from './binaries.js';
import type { RunnerCgroup } from './cgroups.js';
import { hostSystemArguments } from './host-root.js';
import type { IdRange } from './id-ranges.js';
import { DEFAULT_PATH } from './runner-image.js';
import { AGENT_FD, describeExit, idmappedPath, type SpawnedProcess, type SpawnerClient } from './spawner-client.js';

export interface SandboxOptions {
  bwrap: string;
  /*
   * Root file system directory of the image (absolute), mounted idmapped into the sandbox's user
   * namespace so that its files keep their image owners; undefined means the host's system directories.
   */
  rootfs: string | undefined;
  /* passwd and group laid over the root's (always given for the host's system directories). */
  accounts: { passwd: string; group: string } | undefined;
  /* Host ids of the sandbox's user namespace: its root is ids.base on the host. */
  ids: IdRange;
  /* Caps /workspace, /tmp and /dev/shm so that filling them ends in ENOSPC, not an OOM kill. */
  memoryLimitMiB: number;
  workspaceSizeMiB: number;
  cgroup: RunnerCgroup | undefined;
  /* The BPF program every process of the sandbox runs under (bubblewrap's --seccomp). */
  seccompProgram: Buffer;
  /* Starts the sandbox's processes without forking the daemon. */
  spawner: SpawnerClient;
  onCleanupError: (error: unknown) => void;
}

const READY_TIMEOUT_MS = 15_000;
const MEBIBYTE = 1024 * 1024;

/* Where bubblewrap reads its data blobs; fds 0-3 are the agent's connection, stderr and the agent. */
export const DataFd = { passwd: 4, group: 5, seccomp: 6 } as const;

/*
 * /proc as Docker leaves it by default. These paths are read-only: bind mounts of themselves (a
 * sysctl shows the values of the reader's own namespaces, whichever proc it is read through);
 * bubblewrap skips them inside a user namespace, where they look read-only to its access check
 * but the user namespace's own sysctls (user.max_user_namespaces, say) are writable by its root.
 */
const READ_ONLY_PROC_PATHS = ['/proc/sys', '/proc/sysrq-trigger', '/proc/irq', '/proc/bus', '/proc/fs'];
/*
 * These files leak host kernel state or keys and are hidden behind an empty read-only file, these
 * directories behind an empty read-only tmpfs.
 */
/* Only those this kernel has: bubblewrap cannot mount over a missing file of /proc. */
const MASKED_PROC_FILES = ['/proc/kcore', '/proc/keys', '/proc/timer_list', '/proc/sched_debug', '/proc/timer_stats', '/proc/latency_stats'].filter((file) =>
  existsSync(file),
);
const MASKED_PROC_DIRECTORIES = ['/proc/acpi', '/proc/scsi'].filter((directory) => existsSync(directory));

function procArguments(): string[] {
  return [
    '--proc',
    '/proc',
    ...MASKED_PROC_FILES.flatMap((file) => ['--ro-bind-try', '/dev/null', file]),
    ...MASKED_PROC_DIRECTORIES.flatMap((directory) => ['--perms', '0555', '--tmpfs', directory, '--remount-ro', directory]),
    ...READ_ONLY_PROC_PATHS.flatMap((entry) => ['--ro-bind-try', entry, entry]),
  ];
}

/*
 * Each of the three writable file systems is a tmpfs whose pages count against the runner's
 * memory; together they stay below its limit, so a learner filling them gets ENOSPC first.
 */
function scratchSizes(options: SandboxShape): { workspace: number; tmp: number; shm: number } {
  const memory = options.memoryLimitMiB;
  return {
    workspace: Math.max(1, Math.min(options.workspaceSizeMiB, Math.floor(memory / 2))) * MEBIBYTE,
    tmp: Math.max(1, Math.min(options.workspaceSizeMiB, Math.floor(memory / 4))) * MEBIBYTE,
    shm: Math.max(1, Math.min(64, Math.floor(memory / 8))) * MEBIBYTE,
  };
}

/* What a sandbox's mounts depend on; the bench builds its like-for-like raw baseline from the same. */
export type SandboxShape = Pick<SandboxOptions, 'rootfs' | 'accounts' | 'memoryLimitMiB' | 'workspaceSizeMiB'>;

/*
 * bubblewrap's arguments up to the program: namespaces (but the user and network namespaces, which
 * the spawner makes), root, /proc, scratch file systems, capabilities and the seccomp fd.
 */
export function sandboxBwrapArguments(options: SandboxShape): string[] {
  const sizes = scratchSizes(options);
  return [
    // The network namespace and the user namespace come from the spawner (see its SPAWN request).
    '--unshare-pid',
    '--unshare-ipc',
    '--unshare-uts',
    '--unshare-cgroup-try',
    /*
     * The agent is pid 1: no other process of the sandbox holds its connection to the daemon. No
     * --die-with-parent: once the agent is ready the spawner adopts it and ends bubblewrap's waiting
     * process (see Sandbox.start), which would otherwise kill it. The agent ends with the daemon
     * through its connection (EOF) and with the spawner through the spawner's kill of its children.
     */
    '--new-session',
    '--as-pid-1',
    '--hostname',
    'runner',
    ...(options.rootfs ? ['--ro-bind', idmappedPath(0), '/'] : hostSystemArguments()),
    ...(options.accounts
      ? ['--perms', '0644', '--ro-bind-data', String(DataFd.passwd), '/etc/passwd', '--perms', '0644', '--ro-bind-data', String(DataFd.group), '/etc/group']
      : []),
    ...procArguments(),
    '--dev',
    '/dev',
    '--perms',
    '1777',
    '--size',
    String(sizes.shm),
    '--tmpfs',
    '/dev/shm',
    '--perms',
    '1777',
    '--size',
    String(sizes.workspace),
    '--tmpfs',
    WORKSPACE,
    '--perms',
    '1777',
    '--size',
    String(sizes.tmp),
    '--tmpfs',
    '/tmp',
    '--chdir',
    WORKSPACE,
    '--clearenv',
    '--setenv',
    'PATH',
    DEFAULT_PATH,
    ...agentCapabilityArguments(),
    '--seccomp',
    String(DataFd.seccomp),
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
  /* Settles once the sandbox ended and its cgroup is gone, however it ended. */
  readonly #cleanedUp: Promise<void>;

  private constructor(
    /* bubblewrap until the agent is ready, then the agent itself (the sandbox's pid 1), adopted by the spawner. */
    private readonly hostProcess: SpawnedProcess,
    readonly agent: AgentClient,
    private readonly cgroup: RunnerCgroup | undefined,
    onCleanupError: (error: unknown) => void,
  ) {
    this.#cleanedUp = hostProcess.exited.then(async () => {
      this.#exited = true;
      // Reported dead because the spawner died: its adopted agent lives on until its connection ends.
      agent.close();
      for (const listener of this.#exitListeners.splice(0)) listener();
      await cgroup?.destroy().catch(onCleanupError);
    });
  }

  /* The spawner forks and execs the sandbox, so the daemon (a large process) never forks itself. */
  static async start(options: SandboxOptions): Promise<Sandbox> {
    const accounts = options.accounts;
    const child = options.spawner.spawn(
      [options.bwrap, ...sandboxBwrapArguments(options), '--', `/proc/self/fd/${AGENT_FD}`],
      { PATH: DEFAULT_PATH },
      {
        cgroupProcsFiles: options.cgroup?.procsFiles ?? [],
        userNamespace: options.ids,
        idmapped: options.rootfs ? [options.rootfs] : [],
        networkNamespace: true,
        agent: true,
        data: [
          ...(accounts
            ? [
                { fd: DataFd.passwd, bytes: Buffer.from(accounts.passwd) },
                { fd: DataFd.group, bytes: Buffer.from(accounts.group) },
              ]
            : []),
          { fd: DataFd.seccomp, bytes: options.seccompProgram },
        ],
      },
    );
    const exited = child.exited.then((exit) =>
      exit.code === null && exit.signal === null
        ? `cannot start bubblewrap: ${exit.stderr}`
        : `bubblewrap exited (${describeExit(exit)}) before the sandbox was ready`,
    );
    let agent: AgentClient | undefined;
    let timer: NodeJS.Timeout | undefined;
    const failure = await Promise.race([
      child.connection
        .then((socket) => {
          agent = new AgentClient(socket, socket);
          // The handshake paused the socket; the client's listeners are in place now.
          socket.resume();
          return agent.ready;
        })
        .then(() => undefined),
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
      void child.connection.then(
        (socket) => socket.destroy(),
        () => undefined,
      );
      throw new Error(`${failure}: ${exit?.stderr.trim() || 'no message'}`);
    }
    if (!agent) throw new Error('the sandbox agent is missing');
    /*
     * bubblewrap's own process now only waits for the agent: about 0.2 MB of host memory per idle
     * runner (its libraries' private pages, page tables, kernel stack). The spawner adopts the agent
     * and ends it, so a runner is one host process; a sandbox that died meanwhile is reported as usual.
     */
    await child.detach();
    return new Sandbox(child, agent, options.cgroup, options.onCleanupError);
  }

  /* A host process inside the sandbox's network namespace (its pid 1, the agent, once started). */
  get processId(): number | undefined {
    return this.hostProcess.pid;
  }

  /* Before the first learner code: the limits an idle sandbox went without (see RunnerCgroup.claim). */
  claim(): void {
    this.cgroup?.claim();
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
    // SIGKILL to the sandbox's pid 1 (or to bwrap, with which it dies): the kernel then kills everything in its pid namespace.
    if (!this.#exited) this.hostProcess.kill();
    await this.#cleanedUp;
  }
}
