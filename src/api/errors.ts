import type { ErrorCode } from '../dto/errors.js';
import { DomainError, type ErrorKind } from '../runner/errors.js';

export interface HttpAnswer {
  readonly statusCode: number;
  readonly errorCode: ErrorCode;
}

/* The one place where a domain error becomes an HTTP answer; the codes are Poseidon's, as CodeOcean branches on them. */
export const ERROR_ANSWERS: Readonly<Record<ErrorKind, HttpAnswer>> = {
  'runner-gone': { statusCode: 410, errorCode: 'RUNNER_GONE' },
  'environment-unknown': { statusCode: 404, errorCode: 'NOT_FOUND' },
  // Poseidon's answer to an empty pool; CodeOcean retries on NOMAD_OVERLOAD.
  'no-idle-runner': { statusCode: 500, errorCode: 'NOMAD_OVERLOAD' },
  // 424 is what CodeOcean takes as "no files", so it carries on.
  'workspace-unreadable': { statusCode: 424, errorCode: 'FILE_NOT_AVAILABLE' },
  'workspace-unwritable': { statusCode: 400, errorCode: 'BAD_REQUEST' },
  'bad-request': { statusCode: 400, errorCode: 'BAD_REQUEST' },
  'backend-unreachable': { statusCode: 500, errorCode: 'NOMAD_UNREACHABLE' },
  'backend-failed': { statusCode: 500, errorCode: 'NOMAD_INTERNAL_SERVER_ERROR' },
  'backend-overloaded': { statusCode: 500, errorCode: 'NOMAD_OVERLOAD' },
  'backend-error': { statusCode: 500, errorCode: 'UNKNOWN' },
};

/* An answer only the API layer gives (no token, an unknown execution): it names its status itself. */
export class HttpError extends Error {
  constructor(
    readonly statusCode: number,
    readonly errorCode: ErrorCode,
    message: string,
  ) {
    super(message);
    this.name = 'HttpError';
  }
}

/* The status and code for an error the application raised on purpose; undefined for anything else. */
export function answerOf(error: unknown): HttpAnswer | undefined {
  if (error instanceof HttpError) return error;
  if (error instanceof DomainError) return ERROR_ANSWERS[error.kind];
  return undefined;
}
