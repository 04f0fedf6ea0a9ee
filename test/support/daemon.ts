import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { randomBytes, randomInt } from 'node:crypto';
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { stringify } from 'yaml';

/*
 * Starts the real daemon exactly as an operator would (`node --import tsx src/cli.ts --config FILE`),
 * on a free port and with a throw-away state directory, so every e2e test exercises the real
 * process, real sockets and real sandboxes rather than an in-process app.
 */

export const REPO_ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');

export type ConfigTree = { [key: string]: ConfigValue };
export type ConfigValue = string | number | boolean | null | ConfigValue[] | ConfigTree;

export interface DaemonOptions {
  /** Sets `server.token`; the client must then send it as Poseidon-Token. */
  token?: string;
  /** Deep-merged over the harness's base configuration (keys as in src/config/schema.ts). */
  config?: ConfigTree;
  /** Extra environment variables for the daemon process (e.g. POSEIDON_* overrides). */
  env?: Record<string, string>;
  /** Parent of the temporary directory; defaults to the OS temp dir. */
  baseDir?: string;
  /** Script to run instead of src/cli.ts; lets the harness be checked against a stand-in. */
  entry?: string;
  /** How long to wait for /health to answer at all. */
  startTimeoutMs?: number;
  /** The daemon leads a process group of its own, so a test can signal the whole group (as systemd or Ctrl-C do). */
  detached?: boolean;
  /** The command-line arguments after the entry script (default `--config <configPath>`). */
  args?: (configPath: string) => string[];
  /**
   * Written verbatim as the configuration file instead of the merged tree (e.g. Poseidon's own
   * file); the harness's own settings (port, state dir, cgroups, network) then come as POSEIDON_*
   * variables, which win over the file.
   */
  configText?: string;
}

export interface DaemonExit {
  code: number | null;
  signal: NodeJS.Signals | null;
}

export interface Daemon {
  baseUrl: string;
  /** `http://127.0.0.1:<port>` without the API prefix, for WebSocket checks. */
  origin: string;
  port: number;
  token: string | undefined;
  /** The daemon's process id (with `detached`, also its process group's). */
  pid: number;
  /** Resolves when the daemon process has exited. */
  exited: Promise<DaemonExit>;
  /** Temp dir holding the config and the state dir; removed by stop(). */
  tempDir: string;
  configPath: string;
  stateDir: string;
  /** local.cgroupparent: where its runners' cgroups are (TEST_CGROUP_PARENT keeps checkouts apart). */
  cgroupParent: string;
  /** Everything the daemon wrote to stdout and stderr so far. */
  logs(): string;
  /** PIDs of this daemon's sandboxes' outer host processes (the spawner's children). */
  sandboxPids(): number[];
  stop(): Promise<void>;
}

export async function freePort(): Promise<number> {
  return new Promise((resolvePort, reject) => {
    const server = createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const address = server.address();
      if (address === null || typeof address === 'string') {
        server.close();
        reject(new Error('could not read the port of a probe socket'));
        return;
      }
      const { port } = address;
      server.close(() => resolvePort(port));
    });
  });
}

function isTree(value: ConfigValue | undefined): value is ConfigTree {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

function deepMerge(base: ConfigTree, override: ConfigTree): ConfigTree {
  const merged: ConfigTree = { ...base };
  for (const [key, value] of Object.entries(override)) {
    const current = merged[key];
    merged[key] = isTree(current) && isTree(value) ? deepMerge(current, value) : value;
  }
  return merged;
}

/** Reads /proc directly because `ps` output formats differ between distributions. */
export function processesMatching(needle: string): number[] {
  const pids: number[] = [];
  let entries: string[];
  try {
    entries = readdirSync('/proc');
  } catch {
    return pids;
  }
  for (const entry of entries) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const cmdline = readFileSync(`/proc/${entry}/cmdline`, 'utf8').split('\0').join(' ');
      if (cmdline.includes(needle)) pids.push(Number(entry));
    } catch {
      // The process exited between readdir and read; it cannot be a leftover.
    }
  }
  return pids;
}

function argv0Of(pid: number | undefined): string {
  try {
    return readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0')[0] ?? '';
  } catch {
    return '';
  }
}

/* A sandbox's outer host process: a child of the spawner (bubblewrap while it starts, then the sandbox's pid 1). */
export function isSandboxOwner(pid: number): boolean {
  return argv0Of(parentOf(pid)).endsWith('poseidon-spawner') && argv0Of(pid) !== '';
}

/** The parent pid of a live process, undefined once it is gone. */
export function parentOf(pid: number): number | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    // comm may contain spaces and parentheses, so fields are counted from the last ')'.
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return Number(fields[1]);
  } catch {
    return undefined;
  }
}

/** Every live process below `root`, found through /proc parent links. */
export function descendantsOf(root: number): number[] {
  const children = new Map<number, number[]>();
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    const parent = parentOf(Number(entry));
    if (parent === undefined) continue;
    const list = children.get(parent) ?? [];
    list.push(Number(entry));
    children.set(parent, list);
  }
  const found: number[] = [];
  const queue = [root];
  while (queue.length > 0) {
    const next = queue.shift();
    if (next === undefined) break;
    for (const child of children.get(next) ?? []) {
      found.push(child);
      queue.push(child);
    }
  }
  return found;
}

function describePid(pid: number): string {
  try {
    return `${pid} (${readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0').join(' ').trim().slice(0, 120)})`;
  } catch {
    return String(pid);
  }
}

function alive(pid: number): boolean {
  try {
    // A zombie still has a /proc entry but is harmless; only running leftovers count.
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) !== 'Z';
  } catch {
    return false;
  }
}

/* What a daemon that was SIGKILLed (or whose start failed) could not remove: its bridge and table. */
function removeRunnerNetwork(config: ConfigTree): void {
  const network = (config.local as ConfigTree | undefined)?.network as ConfigTree | undefined;
  for (const command of [
    ['ip', 'link', 'del', String(network?.bridge)],
    ['nft', 'delete', 'table', 'inet', String(network?.table)],
  ]) {
    if (!command.includes('undefined')) spawnSync(command[0] as string, command.slice(1), { stdio: 'ignore' });
  }
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

export async function startDaemon(options: DaemonOptions = {}): Promise<Daemon> {
  const tempDir = mkdtempSync(join(options.baseDir ?? tmpdir(), 'poseidon-e2e-'));
  const stateDir = join(tempDir, 'state');
  const configPath = join(tempDir, 'config.yaml');
  const port = await freePort();
  const networkId = randomBytes(4).toString('hex');

  const base: ConfigTree = {
    server: { address: '127.0.0.1', port },
    logger: { level: 'warn' },
    // Parallel checkouts on one host keep their runners' cgroups apart with TEST_CGROUP_PARENT.
    local: {
      statedir: stateDir,
      cgroupparent: process.env.TEST_CGROUP_PARENT ?? 'poseidon-ts',
      // Tests' environments run on the host's system unless a test maps their image (never a registry by accident).
      images: { '*': 'host' },
      // A runner network of its own per daemon (a shared name would make each start remove the
      // other's), and no uplinks: test daemons never switch on forwarding of the host's interfaces.
      network: { bridge: `ptd${networkId}`, table: `pts_daemon_${networkId}`, subnet: `10.218.${randomInt(0, 256)}.0/24`, uplinks: [] },
    },
  };
  if (options.token !== undefined) {
    base.server = { ...(base.server as ConfigTree), token: options.token };
  }
  const config = deepMerge(base, options.config ?? {});
  writeFileSync(configPath, options.configText ?? stringify(config), { mode: 0o600 });
  const baseEnvironment: Record<string, string> = {};
  if (options.configText !== undefined) {
    const local = config.local as ConfigTree;
    const network = local.network as ConfigTree;
    Object.assign(baseEnvironment, {
      POSEIDON_SERVER_ADDRESS: '127.0.0.1',
      POSEIDON_SERVER_PORT: String(port),
      POSEIDON_LOCAL_STATEDIR: String(local.statedir),
      POSEIDON_LOCAL_CGROUPPARENT: String(local.cgroupparent),
      POSEIDON_LOCAL_NETWORK_BRIDGE: String(network.bridge),
      POSEIDON_LOCAL_NETWORK_TABLE: String(network.table),
      POSEIDON_LOCAL_NETWORK_SUBNET: String(network.subnet),
      POSEIDON_LOCAL_NETWORK_UPLINKS: '[]',
      ...(options.token !== undefined ? { POSEIDON_SERVER_TOKEN: options.token } : {}),
    });
  }

  let output = '';
  const child: ChildProcess = spawn(
    process.execPath,
    ['--import', 'tsx', options.entry ?? 'src/cli.ts', ...(options.args?.(configPath) ?? ['--config', configPath])],
    {
      cwd: REPO_ROOT,
      detached: options.detached ?? false,
      // A POSEIDON_* variable leaking from the developer's shell would silently override the file.
      env: {
        ...Object.fromEntries(Object.entries(process.env).filter(([key]) => !key.startsWith('POSEIDON_'))),
        ...baseEnvironment,
        ...options.env,
      },
      stdio: ['ignore', 'pipe', 'pipe'],
    },
  );
  child.stdout?.on('data', (chunk: Buffer) => {
    output += chunk.toString('utf8');
  });
  child.stderr?.on('data', (chunk: Buffer) => {
    output += chunk.toString('utf8');
  });
  let exited = false;
  let exitDescription = '';
  const exitStatus = new Promise<DaemonExit>((resolveExit) => {
    child.once('exit', (code, signal) => {
      exited = true;
      exitDescription = `code ${String(code)}, signal ${String(signal)}`;
      resolveExit({ code, signal });
    });
  });
  const exitPromise = exitStatus.then(() => undefined);

  const origin = `http://127.0.0.1:${port}`;
  const baseUrl = `${origin}/api/v1`;

  const stop = async (): Promise<void> => {
    // Snapshot the process tree first: once the daemon is gone its orphans are reparented away.
    const tree = child.pid !== undefined && !exited ? descendantsOf(child.pid) : [];
    let forced = false;
    if (!exited) {
      child.kill('SIGTERM');
      const killed = await Promise.race([exitPromise.then(() => true), sleep(5000).then(() => false)]);
      if (!killed) {
        forced = true;
        child.kill('SIGKILL');
        await exitPromise;
      }
    }
    // Sandboxes die asynchronously after their parent; give them a moment before judging.
    const leftovers = (): number[] => tree.filter(alive);
    let survivors = leftovers();
    for (let i = 0; i < 20 && survivors.length > 0; i++) {
      await sleep(250);
      survivors = leftovers();
    }
    const described = survivors.map(describePid);
    for (const pid of survivors) {
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        // Already gone.
      }
    }
    rmSync(tempDir, { recursive: true, force: true, maxRetries: 3 });
    removeRunnerNetwork(config);
    if (forced && survivors.length === 0) {
      throw new Error('daemon did not exit within 5 s of SIGTERM and had to be SIGKILLed');
    }
    if (survivors.length > 0) {
      throw new Error(
        `daemon left ${survivors.length} process(es) behind after exit (${forced ? 'it ignored SIGTERM for 5 s and was SIGKILLed' : `exited on SIGTERM: ${exitDescription}`}): ${described.join('; ')}`,
      );
    }
  };

  const deadline = Date.now() + (options.startTimeoutMs ?? 20_000);
  for (;;) {
    if (exited) {
      rmSync(tempDir, { recursive: true, force: true });
      removeRunnerNetwork(config);
      throw new Error(`daemon exited during start-up (${exitDescription}). Output:\n${output}`);
    }
    try {
      await fetch(`${baseUrl}/health`, { signal: AbortSignal.timeout(1000) });
      break;
    } catch {
      if (Date.now() > deadline) {
        await stop().catch(() => undefined);
        throw new Error(`daemon did not answer /health within the start timeout. Output:\n${output}`);
      }
      await sleep(150);
    }
  }

  return {
    baseUrl,
    origin,
    port,
    token: options.token,
    pid: child.pid ?? -1,
    exited: exitStatus,
    tempDir,
    configPath,
    stateDir,
    cgroupParent: String((config.local as ConfigTree).cgroupparent),
    logs: () => output,
    sandboxPids: () => (child.pid !== undefined && !exited ? descendantsOf(child.pid).filter(isSandboxOwner) : []),
    stop,
  };
}
