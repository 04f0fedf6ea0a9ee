import { readdirSync, rmdirSync } from 'node:fs';
import path from 'node:path';

/* Where a daemon with this local.cgroupparent keeps its runners' cgroups, for v1 and v2 alike. */
function parentDirectories(parent: string): string[] {
  return ['', 'memory', 'pids', 'cpu', 'cpu,cpuacct'].map((controller) => path.join('/sys/fs/cgroup', controller, parent));
}

/** The runner cgroups (child directories) below a cgroup parent, over every controller. */
export function runnerCgroups(parent: string): string[] {
  return parentDirectories(parent).flatMap((directory) => {
    try {
      return readdirSync(directory, { withFileTypes: true })
        .filter((entry) => entry.isDirectory())
        .map((entry) => path.join(directory, entry.name));
    } catch {
      return [];
    }
  });
}

/** Removes a test's own cgroup parent (and any empty runner cgroup a failed test left in it). */
export function removeCgroupParent(parent: string): void {
  for (const cgroup of runnerCgroups(parent)) {
    try {
      rmdirSync(cgroup);
    } catch {
      // Still populated or already gone; nothing a test can do about it here.
    }
  }
  for (const directory of parentDirectories(parent)) {
    try {
      rmdirSync(directory);
    } catch {
      // Not there for this controller.
    }
  }
}
