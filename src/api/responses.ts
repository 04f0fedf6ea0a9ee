import { errorBodySchema, serverErrorBodySchema } from '../dto/errors.js';

/* What each error status means on this API; one wording for every route that can answer it. */
const ERROR_DESCRIPTIONS = {
  400: 'The request is invalid: a body, path or query parameter does not follow the schema',
  401: 'Missing or wrong Poseidon-Token header',
  404: 'The entity with the given identifier does not exist',
  410: 'The runner is not available any longer; request a new one',
  413: 'The request body is larger than server.bodylimit',
  415: 'The request body is not application/json',
  424: 'The file is not available',
  500: 'The request could not be handled; errorCode says why (NOMAD_OVERLOAD: no idle runner, retry)',
  503: 'A prewarming pool is below its threshold',
} as const;
export type ErrorStatus = keyof typeof ERROR_DESCRIPTIONS;

interface ErrorResponse {
  description: string;
  content: { 'application/json': { schema: typeof errorBodySchema | typeof serverErrorBodySchema } };
}

/* The `{message, errorCode}` responses a route declares, in the provider's content-type form so each gets its description. */
export function errorResponses<S extends ErrorStatus>(...statuses: S[]): Record<S, ErrorResponse> {
  const responses = {} as Record<S, ErrorResponse>;
  for (const status of statuses) {
    const schema = status >= 500 ? serverErrorBodySchema : errorBodySchema;
    responses[status] = { description: ERROR_DESCRIPTIONS[status], content: { 'application/json': { schema } } };
  }
  return responses;
}

/* Every protected route can also be refused or fail unexpectedly. */
export const PROTECTED_ERRORS = [401, 500] as const;
