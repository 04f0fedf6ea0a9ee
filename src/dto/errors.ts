export const errorCodes = [
  'NOMAD_UNREACHABLE',
  'NOMAD_OVERLOAD',
  'NOMAD_INTERNAL_SERVER_ERROR',
  'PREWARMING_POOL_DEPLETING',
  'UNKNOWN',
  'BAD_REQUEST',
  'UNAUTHORIZED',
  'NOT_FOUND',
  'RUNNER_GONE',
  'FILE_NOT_AVAILABLE',
  'PAYLOAD_TOO_LARGE',
  'UNSUPPORTED_MEDIA_TYPE',
] as const;
export type ErrorCode = (typeof errorCodes)[number];

export interface ErrorBody {
  message: string;
  errorCode: ErrorCode;
}
