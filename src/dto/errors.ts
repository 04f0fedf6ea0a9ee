import { z } from 'zod';

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
export const errorCodeSchema = z.enum(errorCodes);
export type ErrorCode = z.infer<typeof errorCodeSchema>;

/* Every error the API answers: CodeOcean reads `message`, and branches on `errorCode` for 500s. */
export const errorBodySchema = z
  .strictObject({
    message: z.string().describe('Explanation on why the request could not be handled'),
    errorCode: errorCodeSchema.describe('Machine readable error description'),
  })
  .meta({ id: 'Error' });
export type ErrorBody = z.infer<typeof errorBodySchema>;

/* The codes a 5xx carries: Poseidon's list, the ones CodeOcean branches on (NOMAD_OVERLOAD: retry later). */
export const serverErrorCodes = ['NOMAD_UNREACHABLE', 'NOMAD_OVERLOAD', 'NOMAD_INTERNAL_SERVER_ERROR', 'PREWARMING_POOL_DEPLETING', 'UNKNOWN'] as const;

export const serverErrorBodySchema = z
  .strictObject({
    message: z.string().describe('Explanation on why the request could not be handled'),
    errorCode: z.enum(serverErrorCodes).describe('Machine readable error description'),
  })
  .meta({ id: 'ServerError' });
