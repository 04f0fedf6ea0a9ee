import { existsSync, mkdirSync, readFileSync, rmdirSync, writeFileSync } from 'node:fs';
import { mkdir, readdir, readFile, rmdir, stat, writeFile } from 'node:fs/promises';
import path from 'node:path';
import type { Logger } from 'pino';
import type { CgroupMode } from '../config/schema.js';

export interface ResourceLimits {
  /* Bytes, socket buffers included; 0 leaves the cgroup without a memory limit (callers never ask for that). */
  memoryBytes: number;
  /*
   * Relative CPU weight, as Nomad's cpu MHz become Docker cpu_shares: a soft share that lets an
   * idle host's CPU be used, but divides it proportionally under contention. 0 means default.
   */
  cpuShares: number;
  pids: number;
}

/* One runner's cgroup(s): a process joins by writing its pid into every file of procsFiles. */
export interface RunnerCgroup {
  readonly procsFiles: string[];
  /*
   * Gives the claimed runner whatever it went without while idle (v1: its own memory cgroup, with
   * the limit) and moves the sandbox's processes into it (idle, that is its agent, which forks every
   * execution afterwards). Must succeed before the runner runs any learner code.
   */
  claim(): void;
  /* How many OOM kills happened in this cgroup so far. */
  oomKills(): Promise<number>;
  /* Kills what is left inside and removes the cgroup. */
  destroy(): Promise<void>;
}

export interface CgroupManager {
  readonly version: 'v1' | 'v2' | 'off';
  create(name: string, limits: ResourceLimits): Promise<RunnerCgroup | undefined>;
}

/*
 * A runner cgroup is populated within milliseconds of its creation (the spawner joins it before
 * anything else); one that has been empty for this long belongs to no live sandbox.
 */
const STALE_CGROUP_AGE_MS = 2_000;

/*
 * Runner cgroups an earlier daemon could not remove (it was SIGKILLed: its sandboxes died with it,
 * their cgroups stayed). A populated one may be a live daemon's sharing the parent, and is kept.
 */
async function removeStaleCgroups(parents: string[]): Promise<number> {
  let removed = 0;
  for (const parent of parents) {
    const entries = await readdir(parent, { withFileTypes: true }).catch(() => []);
    for (const entry of entries) {
      if (!entry.isDirectory()) continue;
      const directory = path.join(parent, entry.name);
      const procs = await readFile(path.join(directory, 'cgroup.procs'), 'utf8').catch(() => 'unreadable');
      const age = Date.now() - ((await stat(directory).catch(() => undefined))?.mtimeMs ?? Date.now());
      if (procs.trim() !== '' || age < STALE_CGROUP_AGE_MS) continue;
      if (
        await rmdir(directory).then(
          () => true,
          () => false,
        )
      )
        removed += 1;
    }
  }
  return removed;
}

const CGROUP_ROOT = '/sys/fs/cgroup';
/* The kernel's bounds for v1 cpu.shares, and runc's mapping of them onto v2 cpu.weight. */
const MIN_SHARES = 2;
const MAX_SHARES = 262_144;
function sharesToWeight(shares: number): number {
  return Math.round(1 + ((shares - MIN_SHARES) * 9999) / (MAX_SHARES - MIN_SHARES));
}
function clampShares(shares: number): number {
  return Math.min(MAX_SHARES, Math.max(MIN_SHARES, Math.round(shares)));
}

const NO_LIMITS_FIX =
  'no working cgroups, so runners would have no memory, CPU or process limits: run as root with /sys/fs/cgroup writable ' +
  '(in Docker: -v /sys/fs/cgroup:/sys/fs/cgroup:rw, see the README), or set local.cgroups: off to run without limits on purpose';

export async function createCgroupManager(mode: CgroupMode, parent: string, logger: Logger): Promise<CgroupManager> {
  const version = mode === 'auto' ? detectVersion() : mode;
  try {
    if (version === 'v2' || version === 'v1') {
      const manager = version === 'v2' ? await CgroupV2Manager.open(parent) : await CgroupV1Manager.open(parent);
      const removed = await removeStaleCgroups(manager.parentDirectories());
      if (removed > 0) logger.info({ removed }, 'removed runner cgroups left by an earlier daemon');
      return manager;
    }
  } catch (error) {
    if (mode !== 'auto') throw new Error(`cgroups ${mode} requested but unusable: ${String(error)}`);
    throw new Error(`${NO_LIMITS_FIX} (cgroups ${version} detected but unusable: ${String(error)})`);
  }
  // Fail closed: serving learner code without limits needs an explicit local.cgroups: off.
  if (mode === 'auto') throw new Error(`${NO_LIMITS_FIX} (no cgroup v1 or v2 hierarchy found under ${CGROUP_ROOT})`);
  logger.warn(
    '!!! NO CGROUPS: runners have NO memory, CPU or process limits. A learner program can exhaust this host. ' +
      'Run as root on a host with cgroup v1 or v2 to enable limits. !!!',
  );
  return { version: 'off', create: async () => undefined };
}

function detectVersion(): 'v1' | 'v2' | 'off' {
  if (existsSync(path.join(CGROUP_ROOT, 'cgroup.controllers'))) return 'v2';
  if (existsSync(path.join(CGROUP_ROOT, 'memory', 'cgroup.procs'))) return 'v1';
  return 'off';
}

async function readCounter(file: string, key: string): Promise<number> {
  try {
    const content = readFileSync(file, 'utf8');
    const line = content.split('\n').find((candidate) => candidate.startsWith(`${key} `));
    return line ? Number(line.split(' ')[1]) : 0;
  } catch {
    return 0;
  }
}

/*
 * Runner cgroups are made, limited and removed with synchronous calls. Every call is a
 * microsecond-scale operation on an in-memory kernel file system, while each asynchronous one costs a
 * round trip through libuv's four-thread pool (a wake-up, a context switch, a promise): with a
 * runner built and removed per claim, that machinery cost more CPU than the kernel's work, and a
 * pool busy with slow disk I/O (image unpacking, the state store) would stall every sandbox build.
 */

/* rmdir, and whether the directory is gone; EBUSY (still populated) is the one expected failure. */
function removed(directory: string): boolean {
  try {
    rmdirSync(directory);
    return true;
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') return true;
    if (code === 'EBUSY') return false;
    throw error;
  }
}

/*
 * Removes the directories; those still populated have their processes killed until they are empty.
 * A sandbox's processes are normally gone when this runs (its pid namespace ended with bwrap), so
 * the common path is one rmdir per directory, without reading cgroup.procs.
 */
async function emptyAndRemove(directories: string[]): Promise<void> {
  let remaining = directories;
  for (let attempt = 0; attempt < 50 && remaining.length > 0; attempt += 1) {
    if (attempt > 0) await new Promise((resolve) => setTimeout(resolve, 20));
    remaining = remaining.filter((directory) => {
      try {
        if (removed(directory)) return false;
        for (const pid of readFileSync(path.join(directory, 'cgroup.procs'), 'utf8').split('\n').filter(Boolean)) {
          try {
            process.kill(Number(pid), 'SIGKILL');
          } catch {
            // Already gone.
          }
        }
        return true;
      } catch {
        // Unreadable, or not removable for another reason: killing cannot help, so the directory is left.
        return false;
      }
    });
  }
}

class CgroupV1Manager implements CgroupManager {
  readonly version = 'v1';

  private constructor(private readonly parents: { memory: string; pids: string; cpu?: string }) {}

  static async open(parent: string): Promise<CgroupV1Manager> {
    const parents = {
      memory: path.join(CGROUP_ROOT, 'memory', parent),
      pids: path.join(CGROUP_ROOT, 'pids', parent),
      cpu: existsSync(path.join(CGROUP_ROOT, 'cpu', 'cgroup.procs')) ? path.join(CGROUP_ROOT, 'cpu', parent) : undefined,
    };
    for (const directory of Object.values(parents)) if (directory) await mkdir(directory, { recursive: true });
    // Hierarchical accounting makes a runner's limit cover all its descendants.
    await writeFile(path.join(parents.memory, 'memory.use_hierarchy'), '1').catch(() => undefined);
    return new CgroupV1Manager(parents);
  }

  parentDirectories(): string[] {
    return Object.values(this.parents).filter((directory): directory is string => directory !== undefined);
  }

  /*
   * An idle runner runs no learner code, so it has no memory cgroup of its own: its sandbox joins the
   * memory parent, and claim() makes the runner's memory cgroup. Every memory cgroup costs the kernel
   * a shrinker map sized by the most superblocks the host ever had (each sandbox mounts several),
   * about 0.15 MB per cgroup here, for each of a thousand idle runners. pids and cpu cost little
   * and limit the sandbox from its first process on.
   */
  async create(name: string, limits: ResourceLimits): Promise<RunnerCgroup> {
    const memory = path.join(this.parents.memory, name);
    const pids = path.join(this.parents.pids, name);
    const cpu = this.parents.cpu ? path.join(this.parents.cpu, name) : undefined;
    const directories = [pids, ...(cpu ? [cpu] : [])];
    // Only what this call made is removed on failure: a name that exists already is someone else's.
    const made: string[] = [];
    try {
      for (const directory of directories) {
        mkdirSync(directory);
        made.push(directory);
      }
      writeFileSync(path.join(pids, 'pids.max'), String(limits.pids));
      if (cpu && limits.cpuShares > 0) writeFileSync(path.join(cpu, 'cpu.shares'), String(clampShares(limits.cpuShares)));
    } catch (error) {
      await emptyAndRemove(made);
      throw error;
    }
    const claim = (): void => {
      if (made.includes(memory)) return;
      mkdirSync(memory);
      made.push(memory);
      if (limits.memoryBytes > 0) {
        writeFileSync(path.join(memory, 'memory.limit_in_bytes'), String(limits.memoryBytes));
        // Without this, a runner could swap instead of being OOM-killed at its limit.
        optionalWrite(path.join(memory, 'memory.memsw.limit_in_bytes'), String(limits.memoryBytes), () => true);
        /*
         * v1 does not charge socket buffers to memory.limit_in_bytes: without this, a runner that fills
         * loopback TCP connections without reading them pins gigabytes of host kernel memory. The
         * kernel only accounts sockets created after this limit is set, so it is written here, before
         * the runner's process joins the cgroup. (Kernels built without kmem accounting lack the file.)
         */
        optionalWrite(path.join(memory, 'memory.kmem.tcp.limit_in_bytes'), String(limits.memoryBytes), (code) => code === 'ENOENT');
      }
      // The pids cgroup holds every process of the sandbox since its first: move them all.
      const processes = readFileSync(path.join(pids, 'cgroup.procs'), 'utf8').split('\n').filter(Boolean);
      if (processes.length === 0) throw new Error(`runner cgroup ${name} has no process to claim`);
      /*
       * A process listed a moment ago may have ended since (bubblewrap's own process leaves soon after
       * the sandbox starts, and a claim can come right after the build): ESRCH, nothing to move. The
       * claim fails only when no process could be moved, so a dead sandbox is never handed out.
       */
      let moved = 0;
      for (const pid of processes) {
        try {
          writeFileSync(path.join(memory, 'cgroup.procs'), pid);
          moved += 1;
        } catch (error) {
          if ((error as NodeJS.ErrnoException).code !== 'ESRCH') throw error;
        }
      }
      if (moved === 0) throw new Error(`runner cgroup ${name}: every process ended before the claim`);
    };
    return {
      procsFiles: [path.join(this.parents.memory, 'cgroup.procs'), ...directories.map((directory) => path.join(directory, 'cgroup.procs'))],
      claim,
      oomKills: () => readCounter(path.join(memory, 'memory.oom_control'), 'oom_kill'),
      destroy: () => emptyAndRemove(made),
    };
  }
}

/* A limit the kernel may lack: `tolerated` says which error codes leave the cgroup without it. */
function optionalWrite(file: string, value: string, tolerated: (code: string | undefined) => boolean): void {
  try {
    writeFileSync(file, value);
  } catch (error) {
    if (!tolerated((error as NodeJS.ErrnoException).code)) throw error;
  }
}

class CgroupV2Manager implements CgroupManager {
  readonly version = 'v2';

  private constructor(private readonly parent: string) {}

  static async open(parent: string): Promise<CgroupV2Manager> {
    const directory = path.join(CGROUP_ROOT, parent);
    await mkdir(directory, { recursive: true });
    const available = (await readFile(path.join(CGROUP_ROOT, 'cgroup.controllers'), 'utf8')).split(/\s+/);
    const wanted = ['memory', 'pids', 'cpu'].filter((controller) => available.includes(controller));
    const enable = wanted.map((controller) => `+${controller}`).join(' ');
    await writeFile(path.join(CGROUP_ROOT, 'cgroup.subtree_control'), enable);
    await writeFile(path.join(directory, 'cgroup.subtree_control'), enable);
    return new CgroupV2Manager(directory);
  }

  parentDirectories(): string[] {
    return [this.parent];
  }

  async create(name: string, limits: ResourceLimits): Promise<RunnerCgroup> {
    const directory = path.join(this.parent, name);
    mkdirSync(directory);
    try {
      if (limits.memoryBytes > 0) {
        // v2 charges socket buffers to memory.max itself (the "sock" line of memory.stat): no separate TCP limit.
        writeFileSync(path.join(directory, 'memory.max'), String(limits.memoryBytes));
        optionalWrite(path.join(directory, 'memory.swap.max'), '0', () => true);
      }
      writeFileSync(path.join(directory, 'pids.max'), String(limits.pids));
      if (limits.cpuShares > 0) writeFileSync(path.join(directory, 'cpu.weight'), String(sharesToWeight(clampShares(limits.cpuShares))));
    } catch (error) {
      await emptyAndRemove([directory]);
      throw error;
    }
    return {
      procsFiles: [path.join(directory, 'cgroup.procs')],
      // v2 forbids processes in the parent, which enables the controllers for its children: limited from the start.
      claim: () => undefined,
      oomKills: () => readCounter(path.join(directory, 'memory.events'), 'oom_kill'),
      destroy: async () => {
        optionalWrite(path.join(directory, 'cgroup.kill'), '1', () => true);
        await emptyAndRemove([directory]);
      },
    };
  }
}
