import type { FastifyPluginAsync } from 'fastify';
import { z } from 'zod';
import { environmentIdSchema, environmentPutBodySchema } from '../../dto/environment.js';
import { queryBoolean } from '../../dto/runner.js';
import { BadRequestError } from '../../runner/errors.js';
import type { AppDependencies } from '../app.js';
import { parseInput } from '../validation.js';

const environmentParamsSchema = z.object({ executionEnvironmentId: environmentIdSchema });
/* `fetch` re-reads from the executor in Poseidon; our cache is always current, so it is accepted and ignored. */
const fetchQuerySchema = z.strictObject({ fetch: queryBoolean.optional() });

export const environmentRoutes: FastifyPluginAsync<AppDependencies> = async (app, { manager }) => {
  app.get('/execution-environments', async (request) => {
    parseInput(fetchQuerySchema, request.query, 'query');
    return { executionEnvironments: manager.environments() };
  });

  app.get('/execution-environments/:executionEnvironmentId', async (request) => {
    const { executionEnvironmentId } = parseInput(environmentParamsSchema, request.params, 'execution environment id');
    parseInput(fetchQuerySchema, request.query, 'query');
    return manager.environment(executionEnvironmentId);
  });

  app.put('/execution-environments/:executionEnvironmentId', async (request, reply) => {
    const { executionEnvironmentId } = parseInput(environmentParamsSchema, request.params, 'execution environment id');
    const body = parseInput(environmentPutBodySchema, request.body, 'execution environment');
    if (body.id !== undefined && body.id !== executionEnvironmentId) {
      throw new BadRequestError(`the body's id ${body.id} differs from the path's id ${executionEnvironmentId}`);
    }
    const outcome = await manager.putEnvironment({ ...body, id: executionEnvironmentId });
    return reply.code(outcome === 'created' ? 201 : 204).send();
  });

  app.delete('/execution-environments/:executionEnvironmentId', async (request, reply) => {
    const { executionEnvironmentId } = parseInput(environmentParamsSchema, request.params, 'execution environment id');
    await manager.deleteEnvironment(executionEnvironmentId);
    return reply.code(204).send();
  });
};
