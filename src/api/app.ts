import { randomUUID } from 'node:crypto';
import { readFileSync } from 'node:fs';
import type { IncomingMessage } from 'node:http';
import type { Socket } from 'node:net';
import websocket from '@fastify/websocket';
import Fastify, {
  type FastifyError,
  type FastifyInstance,
  type FastifyRequest,
  type FastifySchemaValidationError,
  type FastifyServerOptions,
  LogController,
} from 'fastify';
import { serializerCompiler, validatorCompiler } from 'fastify-type-provider-zod';
import type { Config } from '../config/schema.js';
import type { ErrorBody, ErrorCode } from '../dto/errors.js';
import { healthMonitorFor } from '../monitoring/health.js';
import { Metrics } from '../monitoring/metrics.js';
import { authenticatedScope } from './authentication.js';
import type { AppDependencies, RouteDependencies } from './dependencies.js';
import { answerOf } from './errors.js';
import { API_PREFIX, registerOpenApi } from './openapi.js';
import { environmentRoutes } from './routes/environments.js';
import { metricsRoutes, miscellaneousRoutes, statisticsRoutes } from './routes/miscellaneous.js';
import { runnerRoutes } from './routes/runners.js';

export { API_PREFIX } from './openapi.js';
export type { AppDependencies } from './dependencies.js';

const STATUS_ERROR_CODES: Record<number, ErrorCode> = {
  400: 'BAD_REQUEST',
  401: 'UNAUTHORIZED',
  404: 'NOT_FOUND',
  410: 'RUNNER_GONE',
  413: 'PAYLOAD_TOO_LARGE',
  415: 'UNSUPPORTED_MEDIA_TYPE',
  424: 'FILE_NOT_AVAILABLE',
};

const BODY_DISCARD_MS = 10_000;
/* How often the health monitor looks at the pools, so its grace period runs without anyone polling /health. */
const HEALTH_SAMPLE_MS = 1_000;

/*
 * A caller's X-Request-Id is taken when it is a plausible id (a proxy's or CodeOcean's UUID); anything
 * else, also an over-long or multi-line value that would garble the log, gets a fresh UUID.
 */
const REQUEST_ID = /^[A-Za-z0-9._:@/+=-]{1,128}$/;
export const REQUEST_ID_HEADER = 'x-request-id';

function requestId(request: IncomingMessage): string {
  const presented = request.headers[REQUEST_ID_HEADER];
  return typeof presented === 'string' && REQUEST_ID.test(presented) ? presented : randomUUID();
}

/* Probes answer every few seconds; at info they would bury everything else. */
const PROBE_ROUTES = new Set([`${API_PREFIX}/health`, `${API_PREFIX}/version`, '/metrics']);

/* The route template (`/api/v1/runners/:runnerId/files`) keeps ids out of metric labels. */
function routeLabel(url: string | undefined): string {
  return url ?? 'unmatched';
}
const SHUTDOWN_GRACE_MS = 2_000;

function discardBody(stream: IncomingMessage, timeoutMs: number): Promise<void> {
  if (stream.readableEnded || stream.destroyed) return Promise.resolve();
  return new Promise((resolve) => {
    const timer = setTimeout(done, timeoutMs);
    function done(): void {
      clearTimeout(timer);
      stream.off('end', done);
      stream.off('error', done);
      resolve();
    }
    stream.on('end', done);
    stream.on('error', done);
    stream.resume();
  });
}

function tlsOptions(config: Config): Pick<FastifyServerOptions, never> | { https: { key: Buffer; cert: Buffer; ca?: Buffer } } {
  const tls = config.server.tls;
  if (!tls.active) return {};
  if (!tls.certfile || !tls.keyfile) throw new Error('server.tls.active needs server.tls.certfile and server.tls.keyfile');
  return {
    https: {
      key: readFileSync(tls.keyfile),
      cert: readFileSync(tls.certfile),
      ...(tls.cafile ? { ca: readFileSync(tls.cafile) } : {}),
    },
  };
}

const VALIDATION_SUBJECTS: Record<string, string> = { body: 'body', params: 'path parameter', querystring: 'query', headers: 'header' };

/* A schema failure names each offending field, as the hand-written checks before it did; the error handler makes it a 400. */
function formatSchemaErrors(errors: FastifySchemaValidationError[], dataVar: string): Error {
  const subject = VALIDATION_SUBJECTS[dataVar] ?? dataVar;
  const problems = errors.map((error) => `${error.instancePath.slice(1).replaceAll('/', '.') || subject}: ${error.message ?? 'invalid'}`);
  return new Error(`invalid ${subject}: ${problems.join('; ')}`);
}

/*
 * A client that breaks the WebSocket protocol (an oversized or malformed frame) is the client's
 * fault: a warning without a stack, and the connection is cut (which ends its execution).
 */
function onWebSocketError(error: Error, socket: { terminate(): void }, request: FastifyRequest): void {
  const code = (error as NodeJS.ErrnoException).code;
  if (typeof code === 'string' && code.startsWith('WS_ERR_'))
    request.log.warn({ code, reason: error.message }, 'WebSocket client broke the protocol: connection cut');
  else request.log.error({ err: error }, 'WebSocket connection failed');
  socket.terminate();
}

/* Builds the API without listening, so tests and the CLI share one factory. */
export async function buildApp(appDependencies: AppDependencies): Promise<FastifyInstance> {
  const { config, logger } = appDependencies;
  const dependencies: RouteDependencies = {
    ...appDependencies,
    metrics: appDependencies.metrics ?? new Metrics({ processMetrics: false }),
    health: appDependencies.health ?? healthMonitorFor(config.server.alert),
  };
  const { metrics, health, manager } = dependencies;
  metrics.observePools(() => manager.statistics());
  const app = Fastify({
    loggerInstance: logger,
    // Our own onResponse hook writes the single line per request.
    logController: new LogController({ disableRequestLogging: true, requestIdLogLabel: 'requestId' }),
    bodyLimit: config.server.bodylimit,
    // Read (and checked) by requestId itself rather than taken verbatim by Fastify.
    requestIdHeader: false,
    genReqId: requestId,
    schemaErrorFormatter: formatSchemaErrors,
    ...tlsOptions(config),
  }) as unknown as FastifyInstance;
  // Every route validates and serializes with its zod schemas; the same schemas make the OpenAPI document.
  app.setValidatorCompiler(validatorCompiler);
  app.setSerializerCompiler(serializerCompiler);

  // CodeOcean sends `Content-Type: application/json` with body-less GETs and DELETEs; an empty body is no body.
  const parseJson = app.getDefaultJsonParser('error', 'error');
  app.removeContentTypeParser('application/json');
  app.addContentTypeParser('application/json', { parseAs: 'string' }, (request, body, done) => {
    const text = body.toString();
    if (text.trim() === '') {
      done(null, undefined);
      return;
    }
    parseJson(request, text, done);
  });

  // The id is echoed, so a client (or a proxy) can quote it when it reports a problem.
  app.addHook('onRequest', async (request, reply) => {
    reply.header(REQUEST_ID_HEADER, request.id);
  });

  // One log line and one metric sample per request, with its id, client, outcome and duration.
  app.addHook('onResponse', async (request, reply) => {
    const route = routeLabel(request.routeOptions.url);
    metrics.httpRequest(request.method, route, reply.statusCode, reply.elapsedTime / 1000);
    const line = {
      method: request.method,
      url: request.url,
      statusCode: reply.statusCode,
      durationMs: Math.round(reply.elapsedTime * 10) / 10,
      remoteAddress: request.ip,
      userAgent: request.headers['user-agent'],
    };
    if (PROBE_ROUTES.has(route) && reply.statusCode < 400) request.log.debug(line, 'request');
    else request.log.info(line, 'request');
  });

  // The pools are sampled in the background so that "below the threshold since" is known when /health is asked.
  const sampler = setInterval(() => health.observe(manager.statistics()), HEALTH_SAMPLE_MS);
  sampler.unref();
  app.addHook('onClose', async () => clearInterval(sampler));

  app.setErrorHandler(async (error: FastifyError | Error, request, reply) => {
    const answer = answerOf(error);
    const statusCode = answer?.statusCode ?? (error as FastifyError).statusCode ?? 500;
    const known = answer !== undefined || (statusCode >= 400 && statusCode < 500);
    const body: ErrorBody = {
      message: known ? error.message : 'internal error; see the daemon log',
      errorCode: answer?.errorCode ?? STATUS_ERROR_CODES[statusCode] ?? 'UNKNOWN',
    };
    if ((error as FastifyError).code === 'FST_ERR_CTP_BODY_TOO_LARGE') {
      // Answering before the client finished sending would break its connection (EPIPE) and it
      // would never see the 413; so the rest is read and dropped, for a bounded time.
      await discardBody(request.raw, BODY_DISCARD_MS);
      reply.header('Connection', 'close');
    }
    // A refused WebSocket upgrade must not leave its socket open (it would hold up shutdown).
    if (request.headers.upgrade) {
      reply.header('Connection', 'close');
      metrics.websocketUpgrade('refused');
      request.log.info(
        { url: request.url, statusCode, reason: error.message, remoteAddress: request.ip, userAgent: request.headers['user-agent'] },
        'websocket upgrade refused',
      );
    }
    if (statusCode >= 500 && answer === undefined) {
      request.log.error({ err: error }, 'request failed');
      // The route, not the URL: ids stay out; headers, bodies and tokens are never sent.
      appDependencies.errors?.capture(error, { method: request.method, route: request.routeOptions.url ?? 'unknown', statusCode: String(statusCode) });
    } else if (statusCode >= 500) request.log.warn({ statusCode, errorCode: body.errorCode, reason: error.message }, 'request failed');
    else request.log.info({ statusCode, errorCode: body.errorCode, reason: error.message }, 'request rejected');
    return reply.code(statusCode).send(body);
  });

  app.setNotFoundHandler((request, reply) => {
    reply.code(404).send({ message: `no route ${request.method} ${request.url.split('?', 1)[0]}`, errorCode: 'NOT_FOUND' } satisfies ErrorBody);
  });

  // Shutdown waits for open connections; whatever is still open after a grace period is cut.
  const sockets = new Set<Socket>();
  app.server.on('connection', (socket: Socket) => {
    sockets.add(socket);
    socket.once('close', () => sockets.delete(socket));
  });
  app.addHook('preClose', async () => {
    setTimeout(() => {
      for (const socket of sockets) socket.destroy();
    }, SHUTDOWN_GRACE_MS).unref();
  });

  await registerOpenApi(app, dependencies.version);
  // At the root, where Prometheus looks by default; behind the token unless server.metrics.requiretoken is false.
  if (config.server.metrics.enabled) {
    if (config.server.metrics.requiretoken) {
      await app.register(authenticatedScope, { token: config.server.token, routes: [async (scope) => scope.register(metricsRoutes, dependencies)] });
    } else {
      await app.register(metricsRoutes, dependencies);
    }
  }
  await app.register(websocket, { options: { maxPayload: 1024 * 1024 }, errorHandler: onWebSocketError });
  // @fastify/websocket hides WebSocket routes from the document; ours is part of the API (Poseidon
  // documents it too), so it is shown again. Runs after the plugin's own onRoute hook.
  app.addHook('onRoute', (route) => {
    if (route.websocket) route.schema = { ...route.schema, hide: false };
  });
  await app.register(
    async (api) => {
      // Open: CodeOcean's load balancer probes /health, and the version is no secret.
      await api.register(miscellaneousRoutes, dependencies);
      await api.register(authenticatedScope, {
        token: config.server.token,
        routes: [
          async (scope) => scope.register(statisticsRoutes, dependencies),
          async (scope) => scope.register(environmentRoutes, dependencies),
          async (scope) => scope.register(runnerRoutes, dependencies),
        ],
      });
    },
    { prefix: API_PREFIX },
  );
  return app;
}
