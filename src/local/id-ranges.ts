import { readFileSync } from 'node:fs';

/*
 * Host uid/gid ranges for runners' user namespaces, as LXC's unprivileged containers and
 * Podman's --userns=auto hand them out: every live runner owns one range that no other runner
 * and no host account uses, so root in a sandbox is an unprivileged host id and two runners'
 * learners are different host users (separate keyrings, inotify and process quotas).
 *
 * Ranges live only in this process: a restart frees all of them, as the sandboxes that used
 * them die with the daemon.
 */

/* Ids per runner: 0..65535 inside, so images with the usual users (nobody = 65534) work. */
export const IDS_PER_RUNNER = 65536;

export interface IdRange {
  base: number;
  count: number;
}

export class IdRangeExhaustedError extends Error {}

export class IdRangeAllocator {
  readonly #free: number[] = [];
  readonly #used = new Set<number>();

  constructor(
    readonly base: number,
    readonly slots: number,
  ) {
    const end = base + slots * IDS_PER_RUNNER;
    if (base < IDS_PER_RUNNER || end > 0xffff_fffe) throw new Error(`the id range ${base}..${end - 1} must lie within ${IDS_PER_RUNNER}..4294967294`);
    // Reverse, so pop() hands out the lowest range first.
    for (let slot = slots - 1; slot >= 0; slot--) this.#free.push(base + slot * IDS_PER_RUNNER);
  }

  allocate(): IdRange {
    const base = this.#free.pop();
    if (base === undefined) throw new IdRangeExhaustedError(`all ${this.slots} user namespace id ranges are in use`);
    this.#used.add(base);
    return { base, count: IDS_PER_RUNNER };
  }

  release(range: IdRange): void {
    if (this.#used.delete(range.base)) this.#free.push(range.base);
  }

  get inUse(): number {
    return this.#used.size;
  }
}

/*
 * Host accounts whose id falls into [base, end): a runner's root would be that account. Read from
 * the host's passwd and group files, and the subordinate id files other container tools allocate from.
 */
export function hostIdsInRange(base: number, end: number): string[] {
  const clashes: string[] = [];
  for (const file of ['/etc/passwd', '/etc/group']) {
    for (const [name, , id] of fieldsOf(file)) {
      const value = Number(id);
      if (name && Number.isInteger(value) && value >= base && value < end) clashes.push(`${file}: ${name} (${value})`);
    }
  }
  for (const file of ['/etc/subuid', '/etc/subgid']) {
    for (const [name, start, count] of fieldsOf(file)) {
      const first = Number(start);
      const last = first + Number(count) - 1;
      if (name && Number.isInteger(first) && Number.isInteger(last) && first < end && last >= base) clashes.push(`${file}: ${name} (${first}..${last})`);
    }
  }
  return clashes;
}

/* The colon-separated fields of each line; a missing file has none. */
function fieldsOf(file: string): string[][] {
  try {
    return readFileSync(file, 'utf8')
      .split('\n')
      .map((line) => line.split(':'));
  } catch {
    return [];
  }
}
