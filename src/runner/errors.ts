/*
 * Domain errors say what went wrong, not how to answer it: each carries a kind, and the API alone
 * (src/api/errors.ts) turns a kind into an HTTP status and errorCode. Backends pick kinds only.
 */
export type ErrorKind =
  /* The runner does not exist (any more): never claimed, returned, timed out or lost. */
  | 'runner-gone'
  | 'environment-unknown'
  /* The pool of the environment is empty right now; the client may retry shortly. */
  | 'no-idle-runner'
  /* A file or directory of the workspace cannot be listed or read, or a listing is past its cap. */
  | 'workspace-unreadable'
  /* The workspace refused an update (a path outside it, a read-only file, ...). */
  | 'workspace-unwritable'
  | 'bad-request'
  /* The backend (Nomad) cannot be reached. */
  | 'backend-unreachable'
  /* The backend answered, but with a failure. */
  | 'backend-failed'
  /* Too many calls to the backend at once (its connection limit); the client may retry shortly. */
  | 'backend-overloaded'
  /* Anything else that went wrong in a backend. */
  | 'backend-error';

export type BackendErrorKind = Extract<ErrorKind, `backend-${string}`>;

export class DomainError extends Error {
  constructor(
    readonly kind: ErrorKind,
    message: string,
    options?: ErrorOptions,
  ) {
    super(message, options);
    this.name = new.target.name;
  }
}

export class RunnerNotFoundError extends DomainError {
  constructor(runnerId: string) {
    super('runner-gone', `runner ${runnerId} does not exist (any more)`);
  }
}

export class EnvironmentNotFoundError extends DomainError {
  constructor(environmentId: number) {
    super('environment-unknown', `execution environment ${environmentId} does not exist`);
  }
}

export class NoIdleRunnerError extends DomainError {
  constructor(environmentId: number) {
    super('no-idle-runner', `no idle runner is available for execution environment ${environmentId}; try again shortly`);
  }
}

/* A claim whose client went away while it waited; the runner it got is destroyed. Nobody reads the answer. */
export class ClaimCancelledError extends DomainError {
  constructor(environmentId: number) {
    super('no-idle-runner', `the claim for execution environment ${environmentId} was cancelled: its client went away`);
  }
}

/*
 * A claim while the daemon drains. For the client it is an empty pool (500 NOMAD_OVERLOAD), the one
 * answer CodeOcean shows a learner as "try again later" (NotAvailable) instead of an internal error.
 */
export class ShuttingDownError extends DomainError {
  constructor(reason: string) {
    super('no-idle-runner', `poseidon-ts is shutting down (${reason}) and hands out no runners; try again shortly`);
  }
}

export class FileNotAvailableError extends DomainError {
  constructor(message: string) {
    super('workspace-unreadable', message);
  }
}

/* A listing past its entry or byte cap. */
export class ListingTooLargeError extends FileNotAvailableError {}

export class WorkspaceUpdateError extends DomainError {
  constructor(message: string) {
    super('workspace-unwritable', message);
  }
}

export class BadRequestError extends DomainError {
  constructor(message: string) {
    super('bad-request', message);
  }
}

export class BackendError extends DomainError {
  constructor(message: string, kind: BackendErrorKind = 'backend-error', options?: ErrorOptions) {
    super(kind, message, options);
  }
}
