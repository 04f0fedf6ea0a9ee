import type { ContextLogger } from '../monitoring/logger.js';
import type { Runner } from './runner.js';

/* The part of a runner only its environment uses: lifetime and inactivity. */
export interface ManagedRunner extends Runner {
  /* Arms (or with 0 disarms) the inactivity timer; onExpire runs once when it fires. */
  setInactivityTimeout(seconds: number, onExpire: () => void): void;
  /* Seconds of inactivity allowed; 0 when unlimited. */
  inactivityTimeout(): number;
  /* `log`: the requesting client's logger when a request caused it, for its request id. */
  destroy(reason: string, log?: ContextLogger): Promise<void>;
  readonly destroyed: boolean;
}

/* Inactivity bookkeeping shared by every backend's runner. */
export abstract class InactivityTrackingRunner
  implements Pick<ManagedRunner, 'setInactivityTimeout' | 'inactivityTimeout' | 'touch' | 'beginExecution' | 'endExecution'>
{
  #timeoutSeconds = 0;
  #timer: NodeJS.Timeout | undefined;
  #onExpire: (() => void) | undefined;
  #activeExecutions = 0;

  setInactivityTimeout(seconds: number, onExpire: () => void): void {
    this.#timeoutSeconds = seconds;
    this.#onExpire = onExpire;
    this.touch();
  }

  inactivityTimeout(): number {
    return this.#timeoutSeconds;
  }

  touch(): void {
    if (this.#timer) clearTimeout(this.#timer);
    this.#timer = undefined;
    const onExpire = this.#onExpire;
    if (this.#timeoutSeconds > 0 && onExpire) {
      this.#timer = setTimeout(() => (this.#activeExecutions > 0 ? this.touch() : onExpire()), this.#timeoutSeconds * 1000);
      this.#timer.unref();
    }
  }

  /* A running execution is activity: the timer cannot expire until it ended. */
  beginExecution(): void {
    this.#activeExecutions += 1;
  }

  endExecution(): void {
    this.#activeExecutions = Math.max(0, this.#activeExecutions - 1);
    this.touch();
  }

  protected stopInactivityTimer(): void {
    if (this.#timer) clearTimeout(this.#timer);
    this.#timer = undefined;
    this.#onExpire = undefined;
  }
}
