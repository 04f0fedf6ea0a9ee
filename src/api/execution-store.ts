import { randomUUID } from 'node:crypto';
import type { ExecutionRequest } from '../dto/runner.js';

interface PendingExecution {
  runnerId: string;
  request: ExecutionRequest;
  timer: NodeJS.Timeout;
}

/* Executions announced by POST /execute and waiting for their single WebSocket connection. */
export class ExecutionStore {
  readonly #pending = new Map<string, PendingExecution>();

  constructor(private readonly expirySeconds: number) {}

  add(runnerId: string, request: ExecutionRequest): string {
    const executionId = randomUUID();
    const timer = setTimeout(() => this.#pending.delete(executionId), this.expirySeconds * 1000);
    timer.unref();
    this.#pending.set(executionId, { runnerId, request, timer });
    return executionId;
  }

  /* Hands the execution out once: a second connection with the same id finds nothing. */
  take(runnerId: string, executionId: string): ExecutionRequest | undefined {
    const pending = this.#pending.get(executionId);
    if (!pending || pending.runnerId !== runnerId) return undefined;
    clearTimeout(pending.timer);
    this.#pending.delete(executionId);
    return pending.request;
  }

  size(): number {
    return this.#pending.size;
  }
}
