import type { FastifyPluginAsync } from 'fastify';
import type { EnvironmentStatistics } from '../../dto/environment.js';
import type { AppDependencies } from '../app.js';

export const miscellaneousRoutes: FastifyPluginAsync<AppDependencies> = async (app, { manager, config, version }) => {
  app.get('/health', async (_request, reply) => {
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
  });

  app.get('/version', async (_request, reply) => reply.type('application/json').send(JSON.stringify(version)));

  app.get('/statistics/execution-environments', async () => {
    const byId: Record<string, EnvironmentStatistics> = {};
    for (const stats of manager.statistics()) byId[String(stats.id)] = stats;
    return byId;
  });
};
