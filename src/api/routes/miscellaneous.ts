import type { FastifyPluginAsyncZod } from 'fastify-type-provider-zod';
import { z } from 'zod';
import { type EnvironmentStatistics, statisticsResponseSchema } from '../../dto/environment.js';
import type { RouteDependencies } from '../dependencies.js';
import { errorResponses, PROTECTED_ERRORS } from '../responses.js';

const tags = ['miscellaneous'];

/* Open routes: CodeOcean's own health check calls /health, and the version is no secret. */
export const miscellaneousRoutes: FastifyPluginAsyncZod<RouteDependencies> = async (app, { manager, health, version }) => {
  app.get(
    '/health',
    {
      schema: {
        summary: 'Check if the API is available',
        description:
          'Also 503 when a prewarming pool stayed below server.alert.prewarmingpoolthreshold for longer than server.alert.depletiongraceperiod seconds, ' +
          "or when an environment's runners failed to build server.alert.buildfailurethreshold times in a row, or when an environment's image cannot be had (unknown, access denied); " +
          'the message names the environments and the cause. Also 503 while the daemon drains before a shutdown. ' +
          'While images are being pulled (no failure: their pools wait), the 204 carries a Poseidon-Image-Pulls header naming the environments.',
        tags,
        response: { 204: z.undefined().describe('Everything okay'), ...errorResponses(500, 503) },
      },
    },
    async (_request, reply) => {
      // A draining daemon takes itself out of its load balancer's rotation at once.
      if (manager.lameDuck !== undefined) {
        return reply.code(503).send({ message: `poseidon-ts is shutting down (${manager.lameDuck})`, errorCode: 'UNKNOWN' });
      }
      const problem = health.check(manager.statistics());
      if (problem) return reply.code(503).send({ message: problem.message, errorCode: 'PREWARMING_POOL_DEPLETING' });
      const pulls = health.pulls();
      if (pulls.length > 0) {
        const described = pulls.map(({ environmentId, detail }) => (detail ? `${environmentId} (${detail})` : String(environmentId)));
        // Header values are one line of visible ASCII: a registry's message must not break the answer.
        reply.header('Poseidon-Image-Pulls', `execution environment(s) ${described.join(', ')}`.replace(/[^\x20-\x7e]/g, '?').slice(0, 2000));
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

export const statisticsRoutes: FastifyPluginAsyncZod<RouteDependencies> = async (app, { manager }) => {
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

/* Prometheus' scrape target, at the root (not under /api/v1), where Prometheus looks by default. */
export const metricsRoutes: FastifyPluginAsyncZod<RouteDependencies> = async (app, { metrics }) => {
  app.get(
    '/metrics',
    {
      schema: {
        summary: 'Prometheus metrics',
        description:
          'Prometheus text exposition format: HTTP requests, claims, executions, runner pools and builds, WebSocket connections, bytes transferred, Nomad calls and process metrics. ' +
          'Needs the token unless server.metrics.requiretoken is false; absent when server.metrics.enabled is false.',
        tags,
        // The only route outside /api/v1.
        servers: [{ url: '/' }],
        response: {
          200: { description: 'The metrics', content: { 'text/plain; version=0.0.4': { schema: z.string() } } },
          ...errorResponses(...PROTECTED_ERRORS),
        },
      },
    },
    async (_request, reply) =>
      reply
        .code(200)
        .type(metrics.contentType())
        .send(await metrics.scrape()),
  );
};
