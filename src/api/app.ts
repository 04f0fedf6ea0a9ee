import { readFileSync } from 'node:fs';
import type { IncomingMessage } from 'node:http';
import type { Socket } from 'node:net';
import websocket from '@fastify/websocket';
import Fastify, {
  type FastifyError,
  type FastifyInstance,
  type FastifySchemaValidationError,
  type FastifyServerOptions,
  LogController,
} from 'fastify';
import { serializerCompiler, validatorCompiler } from 'fastify-type-provider-zod';
import type { Config } from '../config/schema.js';
import type { ErrorBody, ErrorCode } from '../dto/errors.js';
import { authenticatedScope } from './authentication.js';
import type { AppDependencies } from './dependencies.js';
import { answerOf } from './errors.js';
import { API_PREFIX, registerOpenApi } from './openapi.js';
import { environmentRoutes } from './routes/environments.js';
import { miscellaneousRoutes, statisticsRoutes } from './routes/miscellaneous.js';
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

/* Builds the API without listening, so tests and the CLI share one factory. */
export async function buildApp(dependencies: AppDependencies): Promise<FastifyInstance> {
  const { config, logger } = dependencies;
  const app = Fastify({
    loggerInstance: logger,
    // Our own onResponse hook writes the single line per request.
    logController: new LogController({ disableRequestLogging: true }),
    bodyLimit: config.server.bodylimit,
    requestIdHeader: false,
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

  // One log line per request, with its id, outcome and duration.
  app.addHook('onResponse', async (request, reply) => {
    request.log.info(
      { method: request.method, url: request.url, statusCode: reply.statusCode, durationMs: Math.round(reply.elapsedTime * 10) / 10 },
      'request',
    );
  });

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
    if (request.headers.upgrade) reply.header('Connection', 'close');
    if (statusCode >= 500 && answer === undefined) request.log.error({ err: error }, 'request failed');
    else if (statusCode >= 500) request.log.warn({ statusCode, errorCode: body.errorCode, reason: error.message }, 'request failed');
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
  await app.register(websocket, { options: { maxPayload: 1024 * 1024 } });
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
