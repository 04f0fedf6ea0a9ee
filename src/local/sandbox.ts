import { type ChildProcess, spawn } from 'node:child_process';
import { existsSync, lstatSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import type { Readable } from 'node:stream';
import { WORKSPACE } from '../runner/workspace-files.js';
import type { RunnerCgroup } from './cgroups.js';

export interface SandboxOptions {
  bwrap: string;
  /* Root file system directory of the image; undefined means the host's system directories. */
  rootfs: string | undefined;
  networkAccess: boolean;
  workspaceSizeMiB: number;
  cgroup: RunnerCgroup | undefined;
  uid: number;
  gid: number;
}

export interface SandboxExecOptions {
  privileged: boolean;
  env: Record<string, string>;
}

export const SANDBOX_PATH = '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin';

/*
 * Only these host files are visible in a sandbox built from the host's system: enough for
 * programs and name resolution, nothing that holds secrets (no shadow, no daemon config).
 */
const HOST_ETC_ENTRIES = [
  'alternatives', 'ca-certificates', 'ca-certificates.conf', 'ssl', 'ld.so.cache', 'ld.so.conf', 'ld.so.conf.d',
  'localtime', 'timezone', 'passwd', 'group', 'nsswitch.conf', 'hosts', 'resolv.conf', 'host.conf', 'mime.types',
  'java-17-openjdk', 'java-21-openjdk', 'python3', 'python3.11', 'fonts', 'profile', 'bash.bashrc', 'environment',
  'locale.alias', 'locale.gen', 'protocols', 'services', 'magic', 'inputrc', 'ssh/ssh_config',
];
const HOST_SYSTEM_DIRS = ['usr', 'bin', 'sbin', 'lib', 'lib32', 'lib64', 'libx32', 'opt'];

/* Capabilities a privileged command keeps: those of a default container, minus the risky ones. */
const PRIVILEGED_CAPABILITIES = ['chown', 'dac_override', 'fowner', 'fsetid', 'kill', 'setgid', 'setuid', 'net_bind_service'];

/*
 * Joins the cgroups listed first, then execs the rest: a process must be inside its runner's
 * cgroup before it can fork, or a fork bomb could escape the pids limit.
 */
const ENTER_CGROUPS_THEN_EXEC = 'n=$1; shift; while [ "$n" -gt 0 ]; do echo $$ > "$1" || exit 125; shift; n=$((n-1)); done; exec "$@"';

const READY_TIMEOUT_MS = 15_000;

function hostSystemArgs(): string[] {
  const args: string[] = [];
  for (const entry of HOST_SYSTEM_DIRS) {
    const hostPath = `/${entry}`;
    if (!existsSync(hostPath)) continue;
    const stat = lstatSync(hostPath);
    // Merged-/usr hosts link /bin to usr/bin; the sandbox gets the same link.
    if (stat.isSymbolicLink()) args.push('--symlink', `usr/${entry}`, hostPath);
    else args.push('--ro-bind', hostPath, hostPath);
  }
  for (const entry of HOST_ETC_ENTRIES) args.push('--ro-bind-try', `/etc/${entry}`, `/etc/${entry}`);
  return args;
}

function bwrapArguments(options: SandboxOptions): string[] {
  const tmpfsBytes = String(options.workspaceSizeMiB * 1024 * 1024);
  return [
    '--unshare-pid', '--unshare-ipc', '--unshare-uts', '--unshare-cgroup-try',
    ...(options.networkAccess ? [] : ['--unshare-net']),
    '--die-with-parent', '--new-session', '--hostname', 'runner',
    ...(options.rootfs ? ['--ro-bind', options.rootfs, '/'] : hostSystemArgs()),
    '--proc', '/proc', '--dev', '/dev',
    '--perms', '1777', '--size', tmpfsBytes, '--tmpfs', WORKSPACE,
    '--perms', '1777', '--size', tmpfsBytes, '--tmpfs', '/tmp',
    '--chdir', WORKSPACE, '--clearenv', '--setenv', 'PATH', SANDBOX_PATH,
    '--info-fd', '3',
    '--', 'sleep', 'infinity',
  ];
}

/*
 * A live bubblewrap sandbox: its namespaces, root file system, workspace and cgroup exist
 * before any workload. Every execution enters it, so files and background processes persist
 * between executions of one runner.
 */
export class Sandbox {
  #exited = false;
  readonly #exitListeners: Array<() => void> = [];

  private constructor(
    private readonly bwrapProcess: ChildProcess,
    /* Host pid of the sandbox's first process; its namespaces, root and cwd are the sandbox's. */
    readonly initPid: number,
    private readonly options: SandboxOptions,
  ) {
    bwrapProcess.once('exit', () => {
      this.#exited = true;
      for (const listener of this.#exitListeners) listener();
    });
  }

  static async start(options: SandboxOptions): Promise<Sandbox> {
    const procsFiles = options.cgroup?.procsFiles ?? [];
    const child = spawn(
      '/bin/sh',
      ['-c', ENTER_CGROUPS_THEN_EXEC, 'poseidon-enter', String(procsFiles.length), ...procsFiles, options.bwrap, ...bwrapArguments(options)],
      { stdio: ['ignore', 'ignore', 'pipe', 'pipe'], env: { PATH: SANDBOX_PATH } },
    );
    let stderr = '';
    child.stderr?.setEncoding('utf8').on('data', (text: string) => {
      if (stderr.length < 4096) stderr += text;
    });
    try {
      const info = await readInfo(child, () => stderr);
      const initPid = await waitForFirstChild(info, child);
      return new Sandbox(child, initPid, options);
    } catch (error) {
      child.kill('SIGKILL');
      throw error;
    }
  }

  get alive(): boolean {
    return !this.#exited;
  }

  onExit(listener: () => void): void {
    if (this.#exited) listener();
    else this.#exitListeners.push(listener);
  }

  /* Starts argv inside the sandbox, in a process group of its own so its whole tree can be killed. */
  exec(argv: string[], options: SandboxExecOptions): ChildProcess {
    const procsFiles = this.options.cgroup?.procsFiles ?? [];
    const identity = options.privileged
      ? [`--bounding-set=-all,${PRIVILEGED_CAPABILITIES.map((cap) => `+${cap}`).join(',')}`]
      : [`--reuid=${this.options.uid}`, `--regid=${this.options.gid}`, '--clear-groups', '--bounding-set=-all'];
    return spawn(
      '/bin/sh',
      [
        '-c', ENTER_CGROUPS_THEN_EXEC, 'poseidon-enter', String(procsFiles.length), ...procsFiles,
        'nsenter', `--target=${this.initPid}`, '--mount', '--pid', '--ipc', '--uts', '--net', '--root', '--wd', '--',
        'setpriv', ...identity, '--inh-caps=-all', '--no-new-privs', '--', ...argv,
      ],
      { stdio: ['pipe', 'pipe', 'pipe'], env: options.env, detached: true },
    );
  }

  /* Ends every process of the sandbox and removes its cgroup. */
  async destroy(): Promise<void> {
    if (!this.#exited) {
      const exited = new Promise<void>((resolve) => this.onExit(resolve));
      // The sandbox's pid 1 dies with bwrap, and the kernel then kills everything in its pid namespace.
      this.bwrapProcess.kill('SIGKILL');
      await exited;
    }
    await this.options.cgroup?.destroy();
  }
}

interface BwrapInfo {
  'child-pid': number;
}

function readInfo(child: ChildProcess, stderr: () => string): Promise<BwrapInfo> {
  const infoStream = child.stdio[3] as Readable | null;
  return new Promise((resolve, reject) => {
    let text = '';
    const timer = setTimeout(() => fail(new Error('bubblewrap did not start in time')), READY_TIMEOUT_MS);
    const fail = (error: Error): void => {
      clearTimeout(timer);
      reject(error);
    };
    child.once('error', (error) => fail(new Error(`cannot start bubblewrap: ${error.message}`)));
    child.once('exit', (code, signal) =>
      fail(new Error(`bubblewrap exited (${signal ?? code}) before the sandbox was ready: ${stderr().trim() || 'no message'}`)),
    );
    infoStream?.setEncoding('utf8');
    infoStream?.on('data', (chunk: string) => {
      text += chunk;
      try {
        const info = JSON.parse(text) as BwrapInfo;
        if (typeof info['child-pid'] === 'number') {
          clearTimeout(timer);
          infoStream.destroy();
          resolve(info);
        }
      } catch {
        // Incomplete JSON: wait for the rest.
      }
    });
  });
}

/*
 * bwrap forks the sleeping command only after the root file system and mounts are set up,
 * so its appearance under bwrap's pid-1 reaper means the sandbox is ready.
 */
async function waitForFirstChild(info: BwrapInfo, child: ChildProcess): Promise<number> {
  const reaper = info['child-pid'];
  const deadline = Date.now() + READY_TIMEOUT_MS;
  while (Date.now() < deadline) {
    if (child.exitCode !== null || child.signalCode !== null) throw new Error('bubblewrap exited while starting');
    const children = await readFile(`/proc/${reaper}/task/${reaper}/children`, 'utf8').catch(() => '');
    const first = Number(children.trim().split(' ')[0]);
    if (first > 0) return first;
    await new Promise((resolve) => setTimeout(resolve, 2));
  }
  throw new Error('bubblewrap sandbox did not become ready in time');
}
