import type { FastifyPluginAsyncZod } from 'fastify-type-provider-zod';
import { z } from 'zod';
import { type EnvironmentStatistics, statisticsResponseSchema } from '../../dto/environment.js';
import type { AppDependencies } from '../dependencies.js';
import { errorResponses, PROTECTED_ERRORS } from '../responses.js';

const tags = ['miscellaneous'];

/* Open routes: CodeOcean's own health check calls /health, and the version is no secret. */
export const miscellaneousRoutes: FastifyPluginAsyncZod<AppDependencies> = async (app, { manager, config, version }) => {
  app.get(
    '/health',
    {
      schema: {
        summary: 'Check if the API is available',
        description: 'Also 503 while a prewarming pool is below server.alert.prewarmingpoolthreshold.',
        tags,
        response: { 204: z.undefined().describe('Everything okay'), ...errorResponses(500, 503) },
      },
    },
    async (_request, reply) => {
      const threshold = config.server.alert.prewarmingpoolthreshold;
      const depleted = manager
        .statistics()
        .filter((stats) => threshold > 0 && stats.prewarmingPoolSize > 0 && stats.idleRunners / stats.prewarmingPoolSize < threshold);
      if (depleted.length > 0) {
        const ids = depleted.map((stats) => stats.id).join(', ');
        return reply.code(503).send({
          message: `prewarming pool below ${threshold * 100}% for execution environment(s) ${ids}`,
          errorCode: 'PREWARMING_POOL_DEPLETING',
        });
      }
      return reply.code(204).send();
    },
  );

  app.get(
    '/version',
    {
      schema: {
        summary: 'Retrieve the version of poseidon-ts',
        tags,
        response: { 200: z.string().describe('The version, as a JSON string'), ...errorResponses(500) },
      },
    },
    // Fastify sends a string payload as it is (text/plain unless typed), so the JSON string is made here.
    async (_request, reply) => reply.code(200).type('application/json').send(JSON.stringify(version)),
  );
};

export const statisticsRoutes: FastifyPluginAsyncZod<AppDependencies> = async (app, { manager }) => {
  app.get(
    '/statistics/execution-environments',
    {
      schema: {
        summary: 'Retrieve the statistics about the execution environments',
        description: 'The current availability and usage of runners, keyed by execution environment id.',
        tags,
        response: { 200: statisticsResponseSchema.describe('Statistics per execution environment'), ...errorResponses(...PROTECTED_ERRORS) },
      },
    },
    async () => {
      const byId: Record<string, EnvironmentStatistics> = {};
      for (const stats of manager.statistics()) byId[String(stats.id)] = stats;
      return byId;
    },
  );
};
