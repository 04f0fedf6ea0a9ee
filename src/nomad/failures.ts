import { BackendError, DomainError, RunnerNotFoundError } from '../runner/errors.js';
import { NomadError, NomadExecError } from './client/errors.js';

/*
 * The one translation of a Nomad client failure into a domain error. With a runner id, an exec that
 * Nomad refused because the allocation is unknown means that runner is gone.
 */
export function domainErrorOf(error: unknown, runnerId?: string): Error {
  if (error instanceof DomainError) return error;
  if (runnerId !== undefined && isAllocationUnknown(error)) return new RunnerNotFoundError(runnerId);
  if (error instanceof NomadError) {
    const kind =
      error.errorCode === 'NOMAD_UNREACHABLE' ? 'backend-unreachable' : error.errorCode === 'NOMAD_OVERLOAD' ? 'backend-overloaded' : 'backend-failed';
    return new BackendError(error.message, kind, { cause: error });
  }
  return error instanceof Error ? error : new Error(String(error));
}

export function isAllocationUnknown(error: unknown): boolean {
  return error instanceof NomadExecError && error.allocationUnknown;
}
