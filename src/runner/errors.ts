import type { ErrorCode } from '../dto/errors.js';

/* Errors that carry their own HTTP meaning; the API layer maps them without knowing the backend. */
export class ApiError extends Error {
  constructor(
    readonly statusCode: number,
    readonly errorCode: ErrorCode,
    message: string,
  ) {
    super(message);
    this.name = new.target.name;
  }
}

export class RunnerNotFoundError extends ApiError {
  constructor(runnerId: string) {
    super(410, 'RUNNER_GONE', `runner ${runnerId} does not exist (any more)`);
  }
}

export class EnvironmentNotFoundError extends ApiError {
  constructor(environmentId: number) {
    super(404, 'NOT_FOUND', `execution environment ${environmentId} does not exist`);
  }
}

export class NoIdleRunnerError extends ApiError {
  constructor(environmentId: number) {
    super(500, 'NOMAD_OVERLOAD', `no idle runner is available for execution environment ${environmentId}; try again shortly`);
  }
}

export class FileNotAvailableError extends ApiError {
  constructor(message: string) {
    super(424, 'FILE_NOT_AVAILABLE', message);
  }
}

/* A listing past its entry or byte cap: 424 is what CodeOcean takes as "no files", so it carries on. */
export class ListingTooLargeError extends ApiError {
  constructor(message: string) {
    super(424, 'FILE_NOT_AVAILABLE', message);
  }
}

export class BadRequestError extends ApiError {
  constructor(message: string) {
    super(400, 'BAD_REQUEST', message);
  }
}

export class BackendError extends ApiError {
  constructor(message: string, errorCode: ErrorCode = 'UNKNOWN') {
    super(500, errorCode, message);
  }
}
