/*
 * Work that several callers wait for at once (one image's unpack, one blob's download): it runs
 * once, under a signal of its own that aborts only when every caller waiting for it has given up.
 * A caller whose own signal aborts stops waiting at once; the others are unaffected. Progress
 * reports go to every caller still waiting.
 */

interface Task<T, P> {
  promise: Promise<T>;
  controller: AbortController;
  waiters: number;
  listeners: Set<(progress: P) => void>;
}

export class SharedTasks<T, P> {
  readonly #tasks = new Map<string, Task<T, P>>();

  has(key: string): boolean {
    return this.#tasks.has(key);
  }

  keys(): IterableIterator<string> {
    return this.#tasks.keys();
  }

  get size(): number {
    return this.#tasks.size;
  }

  /* Settles once every task running now has. */
  async settled(): Promise<void> {
    await Promise.allSettled([...this.#tasks.values()].map((task) => task.promise));
  }

  run(
    key: string,
    work: (signal: AbortSignal, progress: (report: P) => void) => Promise<T>,
    signal?: AbortSignal,
    onProgress?: (report: P) => void,
  ): Promise<T> {
    if (signal?.aborted) return Promise.reject(signal.reason);
    let task = this.#tasks.get(key);
    if (!task) {
      const controller = new AbortController();
      const listeners = new Set<(progress: P) => void>();
      const started: Task<T, P> = { promise: Promise.resolve() as Promise<T>, controller, waiters: 0, listeners };
      started.promise = work(controller.signal, (report) => {
        for (const listener of listeners) listener(report);
      }).finally(() => this.#tasks.delete(key));
      // Waiters observe it; this keeps a task nobody waits for any more from being an unhandled rejection.
      started.promise.catch(() => undefined);
      this.#tasks.set(key, started);
      task = started;
    }
    const current = task;
    current.waiters += 1;
    if (onProgress) current.listeners.add(onProgress);
    return new Promise<T>((resolve, reject) => {
      let waiting = true;
      const leave = (): void => {
        waiting = false;
        current.waiters -= 1;
        if (onProgress) current.listeners.delete(onProgress);
        signal?.removeEventListener('abort', onAbort);
      };
      const onAbort = (): void => {
        if (!waiting) return;
        leave();
        if (current.waiters === 0) current.controller.abort(signal?.reason);
        reject(signal?.reason);
      };
      signal?.addEventListener('abort', onAbort, { once: true });
      current.promise.then(
        (value) => {
          if (!waiting) return;
          leave();
          resolve(value);
        },
        (error: unknown) => {
          if (!waiting) return;
          leave();
          reject(error);
        },
      );
    });
  }
}
