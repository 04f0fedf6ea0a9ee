import { readFileSync } from 'node:fs';
import type { FastifyInstance } from 'fastify';
import type { Logger } from 'pino';
import { buildApp } from './api/app.js';
import type { Config } from './config/schema.js';
import { createCgroupManager } from './local/cgroups.js';
import { LocalAccessorHandler } from './local/local-handler.js';
import { healthMonitorFor } from './monitoring/health.js';
import { fanOut, Metrics } from './monitoring/metrics.js';
import { NomadAccessorHandler } from './nomad/nomad-handler.js';
import type { AccessorHandler } from './runner/accessor-handler.js';

export interface Daemon {
  app: FastifyInstance;
  manager: AccessorHandler;
  /* The address the server listens on, e.g. http://127.0.0.1:7200. */
  url: string;
  close(): Promise<void>;
}

export function packageVersion(): string {
  const manifest = JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8')) as { version: string };
  return manifest.version;
}

/* The chain: backends earlier in the list get the first say; local is always last. */
async function buildManager(config: Config, logger: Logger): Promise<AccessorHandler> {
  const cgroups = await createCgroupManager(config.local.cgroups, config.local.cgroupparent, logger);
  logger.info({ cgroups: cgroups.version }, 'local sandbox limits');
  const handlers: AccessorHandler[] = [new LocalAccessorHandler(config.local, cgroups, config.runners.refillconcurrency, logger, { interactiveStderr: config.server.interactivestderr })];
  // Nomad goes first: with it enabled it owns every new environment, local keeps the ones it stored.
  if (config.nomad.enabled) handlers.unshift(new NomadAccessorHandler(config.nomad, config.runners.refillconcurrency, logger, { interactiveStderr: config.server.interactivestderr }));
  for (let index = 0; index < handlers.length - 1; index += 1) handlers[index]?.setNextHandler(handlers[index + 1] as AccessorHandler);
  return handlers[0] as AccessorHandler;
}

export async function startDaemon(config: Config, logger: Logger): Promise<Daemon> {
  if (config.server.token === undefined) {
    logger.warn(
      `!!! NO API TOKEN (server.token / POSEIDON_SERVER_TOKEN is not set): anyone who can reach ${config.server.address}:${config.server.port} ` +
        'can create environments and runners and run code in them, privileged code included, and delete every environment. ' +
        'Set server.token to the token CodeOcean sends. !!!',
    );
  }
  const manager = await buildManager(config, logger);
  const metrics = new Metrics();
  const health = healthMonitorFor(config.server.alert);
  // Before load, so that the first pool fill after a restart is measured and watched too.
  manager.instrument(fanOut(metrics, health));
  await manager.load();
  const app = await buildApp({ config, manager, logger, version: packageVersion(), metrics, health });
  const url = await app.listen({ host: config.server.address, port: config.server.port });
  logger.info({ url }, 'poseidon-ts listening');
  let closing: Promise<void> | undefined;
  return {
    app,
    manager,
    url,
    close: () => {
      closing ??= (async () => {
        await app.close();
        await manager.shutdown();
        logger.info('poseidon-ts stopped');
      })();
      return closing;
    },
  };
}
