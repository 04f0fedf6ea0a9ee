import type { FastifyPluginAsyncZod } from 'fastify-type-provider-zod';
import { z } from 'zod';
import { environmentIdParamSchema, environmentListSchema, environmentPutBodySchema, executionEnvironmentSchema } from '../../dto/environment.js';
import { queryBoolean } from '../../dto/runner.js';
import { BadRequestError } from '../../runner/errors.js';
import type { RouteDependencies } from '../dependencies.js';
import { errorResponses, PROTECTED_ERRORS } from '../responses.js';

const params = z.strictObject({ executionEnvironmentId: environmentIdParamSchema });
/* `fetch` re-reads from the executor in Poseidon; our cache is always current, so it is accepted and ignored. */
const querystring = z.strictObject({
  fetch: queryBoolean.optional().describe('Accepted for compatibility and ignored: the cache is always current'),
});
const tags = ['execution environment'];

export const environmentRoutes: FastifyPluginAsyncZod<RouteDependencies> = async (app, { manager }) => {
  app.get(
    '/execution-environments',
    {
      schema: {
        summary: 'List execution environments',
        tags,
        querystring,
        response: { 200: environmentListSchema.describe('All execution environments'), ...errorResponses(400, ...PROTECTED_ERRORS) },
      },
    },
    async () => ({ executionEnvironments: manager.environments() }),
  );

  app.get(
    '/execution-environments/:executionEnvironmentId',
    {
      schema: {
        summary: 'Show an execution environment',
        tags,
        params,
        querystring,
        response: { 200: executionEnvironmentSchema, ...errorResponses(400, 404, ...PROTECTED_ERRORS) },
      },
    },
    async (request) => manager.environment(request.params.executionEnvironmentId),
  );

  app.put(
    '/execution-environments/:executionEnvironmentId',
    {
      schema: {
        summary: 'Create or replace the execution environment',
        description: "Changing only prewarmingPoolSize resizes the pool at once; any other change destroys the environment's runners and rebuilds them.",
        tags,
        params,
        body: environmentPutBodySchema,
        response: {
          201: z.undefined().describe('The execution environment did not exist and was created'),
          204: z.undefined().describe('The execution environment was replaced'),
          ...errorResponses(400, 413, 415, ...PROTECTED_ERRORS),
        },
      },
    },
    async (request, reply) => {
      const { executionEnvironmentId } = request.params;
      const body = request.body;
      if (body.id !== undefined && body.id !== executionEnvironmentId) {
        throw new BadRequestError(`the body's id ${body.id} differs from the path's id ${executionEnvironmentId}`);
      }
      const outcome = await manager.putEnvironment({ ...body, id: executionEnvironmentId }, request.log);
      return reply.code(outcome === 'created' ? 201 : 204).send();
    },
  );

  app.delete(
    '/execution-environments/:executionEnvironmentId',
    {
      schema: {
        summary: 'Delete the execution environment',
        description: 'Destroys all its runners.',
        tags,
        params,
        response: { 204: z.undefined().describe('The execution environment was deleted'), ...errorResponses(400, 404, ...PROTECTED_ERRORS) },
      },
    },
    async (request, reply) => {
      await manager.deleteEnvironment(request.params.executionEnvironmentId, request.log);
      return reply.code(204).send();
    },
  );
};
