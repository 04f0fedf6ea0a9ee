/*
 * How many runners one backend builds at once, over all its environments. A pool's own refill is
 * capped per environment (runners.refillconcurrency); a pool with claims waiting may use every free
 * slot, so a burst is served as fast as the host builds sandboxes (or Nomad starts jobs). The total
 * stays bounded (runners.buildconcurrency): a class start in 200 environments must not starve the
 * API of CPU, and builds beyond what the host can run in parallel only make each one slower.
 */

interface Hungry {
  /* Has claims waiting: served before pools that only top up. */
  urgent: boolean;
  retry: () => void;
}

export class BuildSlots {
  #used = 0;
  /* Environments that wanted a slot and found none, in the order they asked (a Map keeps it). */
  readonly #hungry = new Map<object, Hungry>();

  constructor(readonly capacity: number) {}

  get inUse(): number {
    return this.#used;
  }

  /*
   * A slot, or false; then `retry` runs when one frees up (urgent owners first, the others in turn),
   * so no environment has to poll.
   */
  take(owner: object, urgent: boolean, retry: () => void): boolean {
    if (this.#used < this.capacity) {
      this.#used += 1;
      return true;
    }
    const known = this.#hungry.get(owner);
    this.#hungry.delete(owner);
    this.#hungry.set(owner, { urgent: urgent || (known?.urgent ?? false), retry });
    return false;
  }

  /* Whether `owner` is queued for a slot: its builds will come, though none runs right now. */
  waiting(owner: object): boolean {
    return this.#hungry.has(owner);
  }

  /* The owner wants no slot any more (deleted, drained). */
  forget(owner: object): void {
    this.#hungry.delete(owner);
  }

  release(): void {
    this.#used = Math.max(0, this.#used - 1);
    // An owner woken up may need no build any more: then the next one gets the slot.
    while (this.#used < this.capacity && this.#hungry.size > 0) {
      let next: [object, Hungry] | undefined;
      for (const entry of this.#hungry) {
        next ??= entry;
        if (entry[1].urgent) {
          next = entry;
          break;
        }
      }
      if (next === undefined) return;
      this.#hungry.delete(next[0]);
      // It takes what it can and queues again, at the end, if it still lacks runners.
      next[1].retry();
    }
  }
}
