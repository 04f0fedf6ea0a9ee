import { Readable } from 'node:stream';
import type { FastifyPluginAsyncZod } from 'fastify-type-provider-zod';
import { z } from 'zod';
import {
  claimRequestSchema,
  claimResponseSchema,
  executeRequestSchema,
  executeResponseSchema,
  type ExecutionRequest,
  listFilesQuerySchema,
  listFilesResponseSchema,
  rawFileQuerySchema,
  runnerIdParamSchema,
  updateFilesRequestSchema,
  websocketQuerySchema,
} from '../../dto/runner.js';
import { secondsSince } from '../../monitoring/metrics.js';
import { DomainError } from '../../runner/errors.js';
import type { RouteDependencies } from '../dependencies.js';
import { HttpError } from '../errors.js';
import { ExecutionStore } from '../execution-store.js';
import { runExecutionSession } from '../execution-session.js';
import { errorResponses, PROTECTED_ERRORS } from '../responses.js';
import { runnerScope } from './runner-scope.js';

declare module 'fastify' {
  interface FastifyRequest {
    /* Set by the WebSocket route's pre-upgrade check; only that route reads it. */
    execution: ExecutionRequest | null;
  }
}

const tags = ['runner'];
const params = z.strictObject({ runnerId: runnerIdParamSchema });

export const runnerRoutes: FastifyPluginAsyncZod<RouteDependencies> = async (app, dependencies) => {
  const { manager, config, metrics } = dependencies;
  const executions = new ExecutionStore(config.server.websocketurltimeout);

  app.post(
    '/runners',
    {
      schema: {
        summary: 'Provide a runner',
        description:
          'Claims an idle runner of the execution environment; with none idle it waits up to runners.claimtimeout for one being built (500 NOMAD_OVERLOAD when none came).',
        tags,
        body: claimRequestSchema,
        response: { 200: claimResponseSchema.describe('A runner was reserved'), ...errorResponses(400, 404, 413, 415, ...PROTECTED_ERRORS) },
      },
    },
    async (request, reply) => {
      const environmentId = request.body.executionEnvironmentId;
      const started = process.hrtime.bigint();
      // A claim may wait for a runner being built; a client that hangs up meanwhile must not get one.
      const clientGone = new AbortController();
      const onClose = (): void => {
        if (!reply.raw.writableEnded) clientGone.abort();
      };
      reply.raw.once('close', onClose);
      try {
        const runner = await manager.claim(environmentId, request.body.inactivityTimeout, request.log, clientGone.signal);
        metrics.claim(environmentId, 'success', secondsSince(started));
        return { runnerId: runner.id, mappedPorts: runner.mappedPorts() };
      } catch (error) {
        const kind = error instanceof DomainError ? error.kind : undefined;
        const outcome = kind === 'no-idle-runner' ? 'no_idle_runner' : kind === 'environment-unknown' ? 'environment_not_found' : 'error';
        metrics.claim(environmentId, outcome, secondsSince(started));
        throw error;
      } finally {
        reply.raw.off('close', onClose);
      }
    },
  );

  // Every route below acts on one runner, which the scope resolves first (410 when it is gone).
  await app.register(
    runnerScope(manager, async (scope) => {
      scope.delete(
        // '' is the prefix itself, /runners/:runnerId, without a trailing slash.
        '',
        {
          schema: {
            summary: 'Destroy the runner',
            description: 'The runner is no longer in use and is destroyed.',
            tags,
            params,
            response: { 204: z.undefined().describe('Success'), ...errorResponses(400, 410, ...PROTECTED_ERRORS) },
          },
        },
        async (request, reply) => {
          await manager.return(request.runner, request.log);
          return reply.code(204).send();
        },
      );

      scope.patch(
        '/files',
        {
          schema: {
            summary: "Manipulate the runner's file system",
            description:
              'Deletes the given paths first (exactly `./*` empties the workspace but spares dotfiles; any other entry is a literal path), then copies the files; a path ending in / is a directory (mode 1777); files get mode 0744.',
            tags,
            params,
            body: updateFilesRequestSchema,
            response: { 204: z.undefined().describe('All files were saved'), ...errorResponses(400, 410, 413, 415, 424, ...PROTECTED_ERRORS) },
          },
        },
        async (request, reply) => {
          await request.runner.updateFileSystem(request.body);
          const uploaded = request.body.copy.reduce((sum, file) => sum + (file.content ? Buffer.byteLength(file.content, 'base64') : 0), 0);
          metrics.bytes(request.runner.environmentId, 'upload', uploaded);
          return reply.code(204).send();
        },
      );

      scope.get(
        '/files',
        {
          schema: {
            summary: 'List the file system',
            tags,
            params,
            querystring: listFilesQuerySchema,
            response: { 200: listFilesResponseSchema.describe('The listing'), ...errorResponses(400, 410, 424, ...PROTECTED_ERRORS) },
          },
        },
        async (request) => ({ files: await request.runner.listFileSystem(request.query) }),
      );

      scope.get(
        '/files/raw',
        {
          schema: {
            summary: 'Download a file',
            description: 'Streams the file with Content-Length.',
            tags,
            params,
            querystring: rawFileQuerySchema,
            response: {
              200: {
                description: 'The file',
                content: { 'application/octet-stream': { schema: z.instanceof(Readable).meta({ type: 'string', format: 'binary' }) } },
              },
              ...errorResponses(400, 410, 424, ...PROTECTED_ERRORS),
            },
          },
        },
        async (request, reply) => {
          const content = await request.runner.getFileContent(request.query.path, request.query.privilegedExecution);
          // Counted as announced: a client that hangs up early is rare enough not to need a byte-counting stream.
          metrics.bytes(request.runner.environmentId, 'download', content.size);
          return reply.header('Content-Length', content.size).header('Content-Type', 'application/octet-stream').send(content.stream);
        },
      );

      scope.post(
        '/execute',
        {
          schema: {
            summary: 'Execute a command',
            description: 'Prepares an execution and returns the WebSocket URL that starts it (single use, expires after server.websocketurltimeout s).',
            tags,
            params,
            body: executeRequestSchema,
            response: { 200: executeResponseSchema.describe('The WebSocket URL to connect to'), ...errorResponses(400, 410, 413, 415, ...PROTECTED_ERRORS) },
          },
        },
        async (request) => {
          const runner = request.runner;
          const executionId = executions.add(runner.id, request.body);
          const scheme = config.server.tls.active ? 'wss' : 'ws';
          const host = request.headers.host ?? `${config.server.address}:${config.server.port}`;
          const path = `/api/v1/runners/${encodeURIComponent(runner.id)}/websocket?executionID=${executionId}`;
          return { websocketUrl: `${scheme}://${host}${path}` };
        },
      );

      scope.decorateRequest('execution', null);
      scope.get(
        '/websocket',
        {
          websocket: true,
          schema: {
            summary: 'Connect to an execution',
            description:
              "A WebSocket: `start`, `stdout`/`stderr`, then `exit` (0-255) or `timeout`, and the server closes (Poseidon's websocket.schema.json). Text frames from the client go to the process's stdin.",
            tags,
            params,
            querystring: websocketQuerySchema,
            response: {
              101: z.undefined().describe('Switching protocols to WebSocket'),
              ...errorResponses(400, 404, 410, ...PROTECTED_ERRORS),
            },
          },
          // Checked before the upgrade, so a bad request gets a plain HTTP status.
          preHandler: async (request) => {
            const execution = executions.take(request.runner.id, request.query.executionID);
            if (!execution) throw new HttpError(404, 'NOT_FOUND', `execution ${request.query.executionID} is unknown, expired or already connected`);
            request.execution = execution;
          },
        },
        (socket, request) => {
          const execution = request.execution;
          if (!execution) {
            socket.close(1011);
            return;
          }
          // The upgrade never reaches onResponse (the socket is taken over), so its request line is written here.
          metrics.websocketUpgrade('accepted');
          request.log.info(
            {
              method: request.method,
              url: request.url,
              statusCode: 101,
              runnerId: request.runner.id,
              remoteAddress: request.ip,
              userAgent: request.headers['user-agent'],
            },
            'websocket upgrade accepted',
          );
          const closed = metrics.websocketOpened();
          socket.once('close', closed);
          void runExecutionSession(socket, request.runner, execution, {
            maxOutputBytes: config.runners.maxoutputbytes,
            logger: request.log,
            metrics,
          }).catch((error: unknown) => {
            request.log.error({ err: error }, 'execution session failed');
            socket.close(1011);
          });
        },
      );
    }),
    { prefix: '/runners/:runnerId' },
  );
};
