import { NomadError } from './errors.js';

/*
 * A counting semaphore with a bounded, first-come queue and a bounded wait. Nomad refuses the
 * connections of a client past http_max_conns_per_client (100 by default) with a 429, so the
 * client holds its own HTTP calls and exec sessions below that and queues the rest; a caller that
 * cannot even queue, or waits too long, gets NOMAD_OVERLOAD (CodeOcean retries on it).
 */
export class ConnectionLimiter {
  #inUse = 0;
  readonly #waiting: Array<{ grant: () => void }> = [];

  constructor(
    /* What the slots are for, in error messages ("HTTP calls", "exec sessions"). */
    private readonly what: string,
    readonly slots: number,
    private readonly maxQueued: number,
    private readonly maxWaitMs: number,
    /* Told the slots in use and the callers waiting after every change, for metrics. */
    private readonly onChange: (inUse: number, queued: number) => void = () => undefined,
  ) {}

  get inUse(): number {
    return this.#inUse;
  }

  get queued(): number {
    return this.#waiting.length;
  }

  /* Resolves with the release function once a slot is free. */
  acquire(signal?: AbortSignal): Promise<() => void> {
    if (signal?.aborted === true) return Promise.reject(abortReason(signal));
    if (this.#inUse < this.slots && this.#waiting.length === 0) {
      this.#inUse += 1;
      this.#changed();
      return Promise.resolve(this.#releaser());
    }
    if (this.#waiting.length >= this.maxQueued) {
      return Promise.reject(this.#overload(`the queue is full (${this.maxQueued} waiting)`));
    }
    return new Promise<() => void>((resolve, reject) => {
      const entry = {
        grant: () => {
          cleanup();
          this.#inUse += 1;
          this.#changed();
          resolve(this.#releaser());
        },
      };
      const leave = (error: unknown): void => {
        cleanup();
        const index = this.#waiting.indexOf(entry);
        if (index >= 0) this.#waiting.splice(index, 1);
        this.#changed();
        reject(error);
      };
      const timer = setTimeout(() => leave(this.#overload(`none became free within ${this.maxWaitMs} ms`)), this.maxWaitMs);
      const onAbort = (): void => leave(abortReason(signal));
      const cleanup = (): void => {
        clearTimeout(timer);
        signal?.removeEventListener('abort', onAbort);
      };
      signal?.addEventListener('abort', onAbort, { once: true });
      this.#waiting.push(entry);
      this.#changed();
    });
  }

  async run<T>(task: () => Promise<T>, signal?: AbortSignal): Promise<T> {
    const release = await this.acquire(signal);
    try {
      return await task();
    } finally {
      release();
    }
  }

  #releaser(): () => void {
    let released = false;
    return () => {
      if (released) return;
      released = true;
      this.#inUse -= 1;
      const next = this.#waiting.shift();
      if (next === undefined) this.#changed();
      else next.grant();
    };
  }

  #changed(): void {
    this.onChange(this.#inUse, this.#waiting.length);
  }

  #overload(detail: string): NomadError {
    return new NomadError('NOMAD_OVERLOAD', `Nomad is busy: all ${this.slots} ${this.what} allowed per Nomad address are in use and ${detail}`, {
      operation: this.what,
    });
  }
}

function abortReason(signal: AbortSignal | undefined): Error {
  const reason: unknown = signal?.reason;
  return reason instanceof Error ? reason : new Error('aborted');
}
