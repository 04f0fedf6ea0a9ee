/*
 * Every way a Nomad call can go wrong collapses into one error class, so that the API layer can
 * translate it into Poseidon's error codes without knowing about undici or ws internals.
 */

/* NOMAD_OVERLOAD: our own connection limit for Nomad (see limiter.ts) is exhausted. */
export type NomadErrorCode = 'NOMAD_UNREACHABLE' | 'NOMAD_INTERNAL_SERVER_ERROR' | 'NOMAD_OVERLOAD';

export interface NomadErrorDetails {
  /* HTTP status of Nomad's answer, when there was one. */
  readonly status?: number;
  /* Method and path (without query) of the failed call, for logs. */
  readonly operation?: string;
  readonly cause?: unknown;
}

export class NomadError extends Error {
  readonly errorCode: NomadErrorCode;
  readonly status: number | undefined;
  readonly operation: string | undefined;

  constructor(errorCode: NomadErrorCode, message: string, details: NomadErrorDetails = {}) {
    super(message, details.cause === undefined ? undefined : { cause: details.cause });
    this.name = 'NomadError';
    this.errorCode = errorCode;
    this.status = details.status;
    this.operation = details.operation;
  }

  /* Transport failures, 5xx answers and Nomad's connection limit may heal by themselves; other 4xx answers will not. */
  get retryable(): boolean {
    if (this.errorCode === 'NOMAD_OVERLOAD') return false;
    return this.errorCode === 'NOMAD_UNREACHABLE' || this.status === undefined || this.status >= 500 || this.tooManyConnections;
  }

  /*
   * Nomad's answer past http_max_conns_per_client: written when the connection is accepted, before
   * any request is read (command/agent/http.go), so repeating even a write is safe.
   */
  get tooManyConnections(): boolean {
    return this.status === 429;
  }
}

/*
 * Exec failures carry the WebSocket close information, because Nomad reports exec errors only as
 * close reasons (e.g. `Unknown allocation "<id>"`) and the runner logic must react to them.
 */
export class NomadExecError extends NomadError {
  readonly closeCode: number | undefined;
  readonly closeReason: string;

  /* The socket ended without an exit frame: the command may or may not have finished. */
  readonly exitUnknown: boolean;

  constructor(
    errorCode: NomadErrorCode,
    message: string,
    close: { code?: number; reason?: string; exitUnknown?: boolean; cause?: unknown; status?: number } = {},
  ) {
    super(errorCode, message, { operation: 'exec', cause: close.cause, ...(close.status === undefined ? {} : { status: close.status }) });
    this.name = 'NomadExecError';
    this.closeCode = close.code;
    this.closeReason = close.reason ?? '';
    this.exitUnknown = close.exitUnknown ?? false;
  }

  /* The allocation no longer exists (job purged, alloc replaced): the runner is gone. */
  get allocationUnknown(): boolean {
    return this.closeReason.includes('Unknown allocation');
  }

  /* The ACL token is unknown or may not exec (Nomad says so in the close reason, after the upgrade). */
  get permissionDenied(): boolean {
    return /Permission denied|ACL token (not found|expired|is invalid)/.test(this.closeReason);
  }

  /* The task is restarting or stopped; retrying later may work. */
  get taskNotRunning(): boolean {
    return /is not running|not started yet|client status of allocation/.test(this.closeReason);
  }
}

/* Turns a transport-level exception (connect refused, timeout, TLS) into a NomadError. */
export function unreachable(operation: string, cause: unknown): NomadError {
  const detail = cause instanceof Error ? `${errorCodeOf(cause) ?? cause.name}: ${cause.message}` : String(cause);
  return new NomadError('NOMAD_UNREACHABLE', `Nomad is unreachable (${operation}): ${detail}`, { operation, cause });
}

export function errorCodeOf(error: Error): string | undefined {
  const code: unknown = (error as Error & { code?: unknown }).code;
  return typeof code === 'string' ? code : undefined;
}
