import { readFileSync } from 'node:fs';
import { availableParallelism } from 'node:os';
import type { Server as HttpsServer } from 'node:https';
import type { FastifyInstance, FastifyListenOptions } from 'fastify';
import type { Logger } from 'pino';
import { buildApp } from './api/app.js';
import type { Config } from './config/schema.js';
import { createCgroupManager } from './local/cgroups.js';
import { LocalAccessorHandler } from './local/local-handler.js';
import { healthMonitorFor } from './monitoring/health.js';
import { fanOut, Metrics } from './monitoring/metrics.js';
import type { ErrorReporter } from './monitoring/sentry.js';
import { NomadAccessorHandler } from './nomad/nomad-handler.js';
import type { AccessorHandler } from './runner/accessor-handler.js';
import { systemdListenFds } from './service/systemd.js';

export interface Daemon {
  app: FastifyInstance;
  manager: AccessorHandler;
  /* The address the server listens on, e.g. http://127.0.0.1:7200. */
  url: string;
  /*
   * Lame duck, then stop: /health answers 503 and claims are refused at once, running executions
   * may finish for server.shutdowntimeout seconds, the ones still running then get an `error`
   * naming the shutdown and a close with 1001, and finally every sandbox is removed.
   */
  drain(reason: string): Promise<void>;
  /* Ends the grace period of a drain now (a second signal). */
  hurry(): void;
  /* Stops at once: listeners, connections and every runner. */
  close(): Promise<void>;
  /* Applies what can change without a restart: the log level and the TLS certificates. */
  reload(config: Config): void;
}

export function packageVersion(): string {
  const manifest = JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8')) as { version: string };
  return manifest.version;
}

/* The chain: backends earlier in the list get the first say; local is always last. */
async function buildManager(config: Config, logger: Logger): Promise<AccessorHandler> {
  const cgroups = await createCgroupManager(config.local.cgroups, config.local.cgroupparent, logger);
  logger.info({ cgroups: cgroups.version }, 'local sandbox limits');
  const { refillconcurrency, buildconcurrency } = config.runners;
  const buildConcurrency = buildconcurrency > 0 ? buildconcurrency : Math.max(refillconcurrency, 4 * availableParallelism());
  const handlers: AccessorHandler[] = [
    new LocalAccessorHandler(config.local, cgroups, refillconcurrency, logger, {
      interactiveStderr: config.server.interactivestderr,
      claimTimeout: config.runners.claimtimeout,
      buildConcurrency,
    }),
  ];
  // Nomad goes first: with it enabled it owns every new environment, local keeps the ones it stored.
  if (config.nomad.enabled)
    handlers.unshift(
      new NomadAccessorHandler(config.nomad, refillconcurrency, logger, {
        interactiveStderr: config.server.interactivestderr,
        claimTimeout: config.runners.claimtimeout,
        buildConcurrency,
      }),
    );
  for (let index = 0; index < handlers.length - 1; index += 1) handlers[index]?.setNextHandler(handlers[index + 1] as AccessorHandler);
  return handlers[0] as AccessorHandler;
}

/*
 * Bounds on client connections (Poseidon: 15 s to read a request, 60 s idle): a client that stalls
 * its headers or body is answered 408 and cut off instead of holding a connection indefinitely.
 */
function applyConnectionLimits(app: FastifyInstance, config: Config): void {
  const requestMs = Math.round(config.server.requesttimeout * 1000);
  app.server.requestTimeout = requestMs;
  app.server.headersTimeout = requestMs;
  app.server.keepAliveTimeout = Math.round(config.server.idletimeout * 1000);
  // Node checks those timeouts on this interval (30 s by default, read when listening starts);
  // it is only an option of createServer in the types, hence the assignment.
  Object.assign(app.server, { connectionsCheckingInterval: Math.min(1000, requestMs) });
}

async function listen(app: FastifyInstance, config: Config, logger: Logger): Promise<string> {
  if (!config.server.systemdsocketactivation) return app.listen({ host: config.server.address, port: config.server.port });
  const fds = systemdListenFds();
  if (fds.length === 0) {
    throw new Error(
      'server.systemdsocketactivation is on, but systemd passed no socket (LISTEN_FDS/LISTEN_PID unset): start the daemon through its .socket unit, or turn it off',
    );
  }
  if (fds.length > 1) logger.warn({ fds }, 'systemd passed several sockets; only the first is served');
  // Node serves a listening socket it inherited given {fd}; Fastify passes the options through.
  const options: FastifyListenOptions & { fd: number } = { fd: fds[0] ?? 3, host: config.server.address };
  const url = await app.listen(options);
  logger.info({ fd: fds[0] }, 'serving the socket systemd passed');
  return url;
}

const POLL_MS = 50;
/* After the grace period, how long closing handshakes of cut executions may take. */
const CLOSE_HANDSHAKE_MS = 1_000;

export async function startDaemon(config: Config, logger: Logger, errors?: ErrorReporter): Promise<Daemon> {
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
  let app: FastifyInstance;
  let url: string;
  try {
    await manager.load();
    app = await buildApp({ config, manager, logger, version: packageVersion(), metrics, health, errors });
    applyConnectionLimits(app, config);
    url = await listen(app, config, logger);
  } catch (error) {
    // A start that fails half-way (e.g. the port is taken) removes what it set up: sandboxes, cgroups, the runner network.
    await manager.shutdown().catch(() => undefined);
    throw error;
  }
  logger.info({ url }, 'poseidon-ts listening');

  let closing: Promise<void> | undefined;
  let draining: Promise<void> | undefined;
  let hurry: (() => void) | undefined;
  let hurried = false;
  const close = (): Promise<void> => {
    closing ??= (async () => {
      manager.enterLameDuck('stopping');
      await app.close();
      await manager.shutdown();
      logger.info('poseidon-ts stopped');
    })();
    return closing;
  };

  /* Executions are the open WebSockets: a session closes its socket as soon as its execution ended. */
  const executions = (): number => app.websocketServer.clients.size;

  const drain = (reason: string): Promise<void> => {
    draining ??= (async () => {
      const graceMs = config.server.shutdowntimeout * 1000;
      manager.enterLameDuck(reason);
      logger.info(
        { reason, runningExecutions: executions(), graceSeconds: config.server.shutdowntimeout },
        'draining: no new runners; running executions may finish',
      );
      const deadline = Date.now() + graceMs;
      while (executions() > 0 && Date.now() < deadline && !hurried) {
        await new Promise<void>((resolve) => {
          hurry = resolve;
          setTimeout(resolve, Math.min(POLL_MS, Math.max(0, deadline - Date.now())));
        });
      }
      const cut = [...app.websocketServer.clients];
      if (cut.length > 0) {
        logger.warn({ reason, executions: cut.length }, 'executions still running after the grace period: ending them');
        const message = JSON.stringify({
          type: 'error',
          data: `poseidon-ts is shutting down (${reason}): the execution was ended ${hurried ? 'at once' : `after a grace period of ${config.server.shutdowntimeout} s`}`,
        });
        // 1001 "going away": the server ends the connection, not the execution's own exit.
        for (const socket of cut) socket.send(message, () => socket.close(1001, 'poseidon-ts is shutting down'));
        const closeDeadline = Date.now() + CLOSE_HANDSHAKE_MS;
        while (executions() > 0 && Date.now() < closeDeadline) await new Promise((resolve) => setTimeout(resolve, POLL_MS));
      }
      await close();
    })();
    return draining;
  };

  const reload = (next: Config): void => {
    const previousLevel = logger.level;
    logger.level = next.logger.level;
    const tls = next.server.tls;
    let certificates = 'unchanged';
    if (config.server.tls.active && tls.active && tls.certfile && tls.keyfile) {
      // New connections get the new certificates; open ones keep theirs.
      (app.server as unknown as HttpsServer).setSecureContext({
        key: readFileSync(tls.keyfile),
        cert: readFileSync(tls.certfile),
        ...(tls.cafile ? { ca: readFileSync(tls.cafile) } : {}),
      });
      certificates = 'reloaded';
    }
    logger.info(
      { previousLevel, level: logger.level, certificates },
      'configuration reloaded (SIGHUP): log level and TLS certificates; other keys need a restart',
    );
  };

  return {
    app,
    manager,
    url,
    drain,
    hurry: () => {
      hurried = true;
      hurry?.();
    },
    close,
    reload,
  };
}
