import assert from 'node:assert/strict';
import { randomInt } from 'node:crypto';
import { chmodSync, chownSync, existsSync, readdirSync, readFileSync, readlinkSync, statSync } from 'node:fs';
import { join } from 'node:path';
import type { CodeOceanClient, ExecutionResult } from './codeocean-client.js';
import { descendantsOf, parentOf, processesMatching, REPO_ROOT, type Daemon } from './daemon.js';
import { waitFor } from './wait.js';

/*
 * Helpers of the security suite (test/security): every attack runs as a learner program through the
 * public API, and its effect is judged from the host side (host /proc, host cgroups, host device
 * nodes), so a probe fails when a protection is merely claimed but not in force.
 */

/* Learner code in Python without quoting trouble: the source travels base64-encoded in the command. */
export function pythonCommand(source: string): string {
  return `python3 -c "import base64; exec(base64.b64decode('${Buffer.from(source).toString('base64')}'))"`;
}

export function runPython(
  client: CodeOceanClient,
  runnerId: string,
  source: string,
  options: { privilegedExecution?: boolean; timeLimit?: number; guardMs?: number } = {},
): Promise<ExecutionResult> {
  return client.run(runnerId, pythonCommand(source), {
    timeLimit: options.timeLimit ?? 20,
    guardMs: options.guardMs ?? 40_000,
    privilegedExecution: options.privilegedExecution,
  });
}

/* Python prelude: a raw syscall that reports the errno name, for probes that must fail with EPERM. */
export const PY_SYSCALL = `
import ctypes, errno, os, platform
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
ARCH = platform.machine()
NR = {
  'x86_64': dict(keyctl=250, add_key=248, request_key=249, io_uring_setup=425, perf_event_open=298, userfaultfd=323, bpf=321, pidfd_open=434, pidfd_getfd=438, unshare=272, mount=165, setns=308),
  'aarch64': dict(keyctl=219, add_key=217, request_key=218, io_uring_setup=425, perf_event_open=241, userfaultfd=282, bpf=280, pidfd_open=434, pidfd_getfd=438, unshare=97, mount=40, setns=268),
}[ARCH]
def sys(name, *args):
    ctypes.set_errno(0)
    result = libc.syscall(NR[name], *args)
    err = ctypes.get_errno()
    return result, (errno.errorcode.get(err, str(err)) if result < 0 else 'OK')
`;

/** The daemon's pid: the node process started with this daemon's configuration file. */
export function daemonPid(daemon: Daemon): number {
  const pids = processesMatching(daemon.configPath).filter((pid) => {
    try {
      const argv = readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0');
      return (argv[0] ?? '').endsWith('node') && argv.includes('--config');
    } catch {
      return false;
    }
  });
  assert.equal(pids.length, 1, `expected one daemon process for ${daemon.configPath}, found ${pids.join(', ')}`);
  return pids[0] as number;
}

export function statusField(pid: number, field: string): string {
  const line = readFileSync(`/proc/${pid}/status`, 'utf8')
    .split('\n')
    .find((candidate) => candidate.startsWith(`${field}:`));
  assert.ok(line !== undefined, `no ${field} in /proc/${pid}/status`);
  return line.slice(field.length + 1).trim();
}

/** A /proc/<pid>/status size field (VmRSS, VmHWM) in bytes. */
export function statusBytes(pid: number, field: string): number {
  return Number(statusField(pid, field).split(/\s+/)[0]) * 1024;
}

/** Real, effective, saved and filesystem ids of a host process, as the host sees them. */
export function hostIds(pid: number): { uids: number[]; gids: number[] } {
  return {
    uids: statusField(pid, 'Uid').split(/\s+/).map(Number),
    gids: statusField(pid, 'Gid').split(/\s+/).map(Number),
  };
}

export interface IdMapping {
  inside: number;
  outside: number;
  count: number;
}

/** /proc/<pid>/uid_map (or gid_map) read from the host: ids inside, host ids outside. */
export function idMap(pid: number, kind: 'uid' | 'gid'): IdMapping[] {
  return readFileSync(`/proc/${pid}/${kind}_map`, 'utf8')
    .trim()
    .split('\n')
    .map((line) => line.trim().split(/\s+/).map(Number))
    .map(([inside = 0, outside = 0, count = 0]) => ({ inside, outside, count }));
}

/** True when the process lives in a user namespace of its own, not the host's. */
export function hasOwnUserNamespace(pid: number): boolean {
  const map = idMap(pid, 'uid');
  return !(map.length === 1 && map[0]?.inside === 0 && map[0]?.outside === 0 && map[0]?.count === 4294967295);
}

export function hostAccountIds(file: '/etc/passwd' | '/etc/group'): Set<number> {
  return new Set(
    readFileSync(file, 'utf8')
      .split('\n')
      .filter((line) => line.includes(':'))
      .map((line) => Number(line.split(':')[2])),
  );
}

const CLOCK_TICKS = 100;

/** CPU time (user + system) a host process used so far, in seconds. */
export function cpuSeconds(pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  // Fields after the comm: state is index 0, utime 11, stime 12 (man 5 proc, minus the first two).
  return (Number(fields[11]) + Number(fields[12])) / CLOCK_TICKS;
}

function argv0(pid: number): string {
  try {
    return readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0')[0] ?? '';
  } catch {
    return '';
  }
}

/**
 * The host process that owns the sandbox holding `pid`: the spawner's child on its chain of parents
 * (the sandbox's pid 1 once started; bubblewrap before). Killing it ends the whole sandbox.
 */
export function sandboxOwner(pid: number): number | undefined {
  let current: number | undefined = pid;
  for (let depth = 0; current !== undefined && current > 1 && depth < 64; depth++) {
    const parent = parentOf(current);
    if (parent !== undefined && argv0(parent).endsWith('poseidon-spawner')) return current;
    current = parent;
  }
  return undefined;
}

/** A unique argument for `sleep`, so the host can find exactly that process in /proc. */
export function sleepMarker(): string {
  return `${600 + randomInt(300)}.${randomInt(1e9)}`;
}

export interface MarkedProcess {
  /** Host pid of the marked `sleep`. */
  pid: number;
  /** Everything the execution printed before the sleep, e.g. `id -u`. */
  execution: Promise<ExecutionResult>;
  /** Kills the marked process from the host and waits for the execution to end. */
  finish(): Promise<ExecutionResult>;
}

/**
 * Runs `prefix; exec sleep <marker>` in the runner and finds that sleep on the host, so tests can read
 * what the host knows about a sandbox process (its host uid, its namespace) while it lives.
 */
export async function startMarkedProcess(client: CodeOceanClient, runnerId: string, prefix: string, privilegedExecution: boolean): Promise<MarkedProcess> {
  const marker = sleepMarker();
  // No stream checks: a test may kill the whole sandbox, and then no exit message can come.
  const execution = client
    .websocketUrl(runnerId, `${prefix}; exec sleep ${marker}`, 60, privilegedExecution)
    .then((url) => client.connect(url, { guardMs: 90_000 }));
  // Only once the shell has exec'd sleep: the shell's own command line carries the marker too, and
  // killing it early would cut off the prefix's output.
  const sleeping = (): number[] => processesMatching(`sleep ${marker}`).filter((pid) => /(^|\/)sleep$/.test(argv0(pid)));
  const pids = await waitFor(
    async () => sleeping(),
    (found) => found.length > 0,
    `the marked sleep ${marker} to appear on the host`,
    20_000,
    50,
  );
  const pid = pids[0] as number;
  return {
    pid,
    execution,
    finish: async () => {
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        // Already gone.
      }
      return execution;
    },
  };
}

/** Host directories of a runner's cgroup(s), whichever version the host has. */
export function runnerCgroupDirectories(runnerId: string): string[] {
  const parent = process.env.TEST_CGROUP_PARENT ?? 'poseidon-ts';
  if (existsSync('/sys/fs/cgroup/cgroup.controllers')) return [join('/sys/fs/cgroup', parent, runnerId)];
  return ['memory', 'pids', 'cpu']
    .filter((controller) => existsSync(join('/sys/fs/cgroup', controller, parent)))
    .map((controller) => join('/sys/fs/cgroup', controller, parent, runnerId));
}

export interface NodeState {
  mode: number;
  uid: number;
  gid: number;
}

export function nodeState(path: string): NodeState {
  const stat = statSync(path);
  return { mode: stat.mode, uid: stat.uid, gid: stat.gid };
}

/**
 * Puts a host device node back as it was (probes never leave the host changed) and reports whether it
 * had to: a changed node is a failed test even though it was repaired.
 */
export function restoreNode(path: string, before: NodeState): string | undefined {
  const after = nodeState(path);
  if (after.mode === before.mode && after.uid === before.uid && after.gid === before.gid) return undefined;
  chownSync(path, before.uid, before.gid);
  chmodSync(path, before.mode & 0o7777);
  return `host ${path} changed from mode ${(before.mode & 0o7777).toString(8)} ${before.uid}:${before.gid} to ${(after.mode & 0o7777).toString(8)} ${after.uid}:${after.gid} (restored)`;
}

/** Host paths no runner may see: the checkout, the daemon's temp and state dirs, the agent binary's directory. */
export function hostPathsOf(daemon: Daemon): string[] {
  return [REPO_ROOT, daemon.tempDir, daemon.stateDir, join(REPO_ROOT, 'agent')];
}

/** Host pid of the sandbox's pid 1 (the agent), found from any process inside the sandbox. */
export function sandboxInit(pidInside: number): number | undefined {
  const owner = sandboxOwner(pidInside);
  if (owner === undefined) return undefined;
  return [owner, ...descendantsOf(owner)].find((pid) => {
    try {
      const nspid = statusField(pid, 'NSpid').split(/\s+/);
      return nspid.length > 1 && nspid[nspid.length - 1] === '1';
    } catch {
      return false;
    }
  });
}

/** Where a host process's executable is, as the host sees it (a memfd shows as /memfd:NAME). */
export function hostExecutable(pid: number): string {
  try {
    return readlinkSync(`/proc/${pid}/exe`);
  } catch (error) {
    return `unreadable: ${String(error)}`;
  }
}

export function readdirOrEmpty(path: string): string[] {
  try {
    return readdirSync(path);
  } catch {
    return [];
  }
}
