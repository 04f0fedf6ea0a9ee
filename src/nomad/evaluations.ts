import type { Logger } from 'pino';
import { BackendError } from '../runner/errors.js';
import type { AllocationMetric, Evaluation } from './client/api-types.js';

/* Nomad's final evaluation statuses (structs.EvalStatusComplete, EvalStatusFailed, EvalStatusCancelled). */
const finalStatuses = new Set(['complete', 'failed', 'canceled']);

/* Why Nomad found no node: none in the job's datacenters and pool, all ruled out by constraints or drivers, or all full. */
export type PlacementCause = 'no_nodes' | 'constraints' | 'resources';

/*
 * Nomad evaluated a registration and could not place all its allocations (Poseidon's
 * ErrPlacingAllocations). The message names Nomad's reasons the way `nomad job run` prints them.
 */
export class PlacementError extends BackendError {
  constructor(
    message: string,
    readonly placementCause: PlacementCause,
    readonly blockedEvaluation: string | undefined,
  ) {
    super(message, 'backend-failed');
  }
}

function causeOf(metric: AllocationMetric): PlacementCause {
  if ((metric.NodesEvaluated ?? 0) === 0) return 'no_nodes';
  return (metric.NodesExhausted ?? 0) > 0 ? 'resources' : 'constraints';
}

/* command/monitor.go formatAllocMetrics, one clause per line it would print. */
function describeMetric(metric: AllocationMetric): string[] {
  const lines: string[] = [];
  if ((metric.NodesEvaluated ?? 0) === 0) lines.push('No nodes were eligible for evaluation');
  for (const [datacenter, available] of Object.entries(metric.NodesAvailable ?? {})) {
    if (available === 0) lines.push(`No nodes are available in datacenter "${datacenter}"`);
  }
  for (const [nodeClass, count] of Object.entries(metric.ClassFiltered ?? {})) lines.push(`Class "${nodeClass}": ${count} nodes excluded by filter`);
  for (const [constraint, count] of Object.entries(metric.ConstraintFiltered ?? {}))
    lines.push(`Constraint "${constraint}": ${count} nodes excluded by filter`);
  if ((metric.NodesExhausted ?? 0) > 0) lines.push(`Resources exhausted on ${metric.NodesExhausted} nodes`);
  for (const [nodeClass, count] of Object.entries(metric.ClassExhausted ?? {})) lines.push(`Class "${nodeClass}" exhausted on ${count} nodes`);
  for (const [dimension, count] of Object.entries(metric.DimensionExhausted ?? {})) lines.push(`Dimension "${dimension}" exhausted on ${count} nodes`);
  for (const dimension of metric.QuotaExhausted ?? []) lines.push(`Quota limit hit "${dimension}"`);
  return lines;
}

/*
 * What a finished evaluation of a registration means for its caller (Poseidon's checkEvaluation):
 * undefined when everything was placed, a PlacementError when task groups could not be placed, a
 * BackendError when the evaluation itself failed or was cancelled.
 */
export function evaluationFailure(evaluation: Evaluation, jobId: string): BackendError | undefined {
  const failed = Object.entries(evaluation.FailedTGAllocs ?? {});
  if (failed.length === 0) {
    if (evaluation.Status === 'complete') return undefined;
    const description = evaluation.StatusDescription ? `: ${evaluation.StatusDescription}` : '';
    return new BackendError(`Nomad's evaluation "${evaluation.ID}" of job "${jobId}" ended with status "${evaluation.Status}"${description}`, 'backend-failed');
  }
  const groups = failed.map(([group, metric]) => {
    const count = 1 + (metric.CoalescedFailures ?? 0);
    return `task group "${group}" (failed to place ${count} allocation${count === 1 ? '' : 's'}): ${describeMetric(metric).join('; ')}`;
  });
  const blocked = evaluation.BlockedEval ? `; evaluation "${evaluation.BlockedEval}" waiting for additional capacity to place remainder` : '';
  const [firstMetric] = failed.map(([, metric]) => metric);
  return new PlacementError(
    `Nomad could not place job "${jobId}": evaluation "${evaluation.ID}" finished with status "${evaluation.Status}" but failed to place all allocations: ${groups.join(' | ')}${blocked}`,
    firstMetric === undefined ? 'resources' : causeOf(firstMetric),
    evaluation.BlockedEval || undefined,
  );
}

/* How long after a registration Nomad is asked directly, should the stream not have told us yet. */
const DIRECT_CHECK_MS = 1_000;
/* Finished evaluations seen before anybody asked (a registration's answer can come after its evaluation's event). */
const RECENT_LIMIT = 4_096;

/*
 * Follows the evaluations of the registrations this daemon makes. Results come from the Evaluation
 * events of the stream the handler already reads; an evaluation the stream has not reported after a
 * second, after a gap, or at the deadline is asked for directly (GET /v1/evaluation/:id).
 */
export class EvaluationTracker {
  readonly #waiting = new Map<string, (evaluation: Evaluation) => void>();
  readonly #recent = new Map<string, Evaluation>();

  constructor(
    private readonly fetchEvaluation: (evalId: string) => Promise<Evaluation | undefined>,
    private readonly logger: Logger,
    /* Poseidon's RegisterTimeout: 10 s. */
    private readonly timeoutMs = 10_000,
  ) {}

  observe(evaluation: Evaluation): void {
    if (!finalStatuses.has(evaluation.Status)) return;
    const waiter = this.#waiting.get(evaluation.ID);
    if (waiter !== undefined) {
      waiter(evaluation);
      return;
    }
    this.#recent.set(evaluation.ID, evaluation);
    if (this.#recent.size > RECENT_LIMIT) {
      const oldest = this.#recent.keys().next();
      if (!oldest.done) this.#recent.delete(oldest.value);
    }
  }

  /* Events may have been missed: every evaluation still waited for is asked for directly. */
  recheck(): void {
    for (const evalId of this.#waiting.keys()) void this.#check(evalId);
  }

  /* The finished evaluation, or undefined when Nomad had not finished it within the timeout. */
  settle(evalId: string): Promise<Evaluation | undefined> {
    const seen = this.#recent.get(evalId);
    if (seen !== undefined) {
      this.#recent.delete(evalId);
      return Promise.resolve(seen);
    }
    return new Promise((resolve) => {
      const timers = [
        setTimeout(() => void this.#check(evalId), DIRECT_CHECK_MS),
        setTimeout(() => {
          void this.#check(evalId).then(() => {
            if (!this.#waiting.has(evalId)) return;
            this.#waiting.delete(evalId);
            resolve(undefined);
          });
        }, this.timeoutMs),
      ];
      this.#waiting.set(evalId, (evaluation) => {
        for (const timer of timers) clearTimeout(timer);
        this.#waiting.delete(evalId);
        resolve(evaluation);
      });
    });
  }

  async #check(evalId: string): Promise<void> {
    try {
      const evaluation = await this.fetchEvaluation(evalId);
      if (evaluation !== undefined && finalStatuses.has(evaluation.Status)) this.#waiting.get(evalId)?.(evaluation);
    } catch (error) {
      this.logger.warn({ err: error, evalId }, 'reading an evaluation from Nomad failed');
    }
  }

  /* Shutdown: nobody waits any more (and no timer holds the process). */
  close(): void {
    for (const [evalId, waiter] of [...this.#waiting]) waiter({ ID: evalId, Status: 'canceled', StatusDescription: 'daemon shutting down' });
  }
}
