import type { FastifyPluginAsync, FastifyRequest } from 'fastify';
import { z } from 'zod';
import {
  claimRequestSchema,
  executeRequestSchema,
  listFilesQuerySchema,
  rawFileQuerySchema,
  updateFilesRequestSchema,
  websocketQuerySchema,
} from '../../dto/runner.js';
import { ApiError } from '../../runner/errors.js';
import { ExecutionStore } from '../../runner/execution-store.js';
import type { Runner } from '../../runner/runner.js';
import type { AppDependencies } from '../app.js';
import { runExecutionSession } from '../execution-session.js';
import { parseInput } from '../validation.js';

const runnerParamsSchema = z.object({ runnerId: z.string().min(1).max(256) });

export const runnerRoutes: FastifyPluginAsync<AppDependencies> = async (app, { manager, config }) => {
  const executions = new ExecutionStore(config.server.websocketurltimeout);

  /* Every runner route starts here: an unknown runner is gone (410), never 404, and any use is activity. */
  const runnerOf = (request: FastifyRequest): Runner => {
    const { runnerId } = parseInput(runnerParamsSchema, request.params, 'runner id');
    const runner = manager.get(runnerId);
    runner.touch();
    return runner;
  };

  app.post('/runners', async (request) => {
    const claim = parseInput(claimRequestSchema, request.body, 'runner request');
    const runner = await manager.claim(claim.executionEnvironmentId, claim.inactivityTimeout);
    return { runnerId: runner.id, mappedPorts: runner.mappedPorts() };
  });

  app.delete('/runners/:runnerId', async (request, reply) => {
    const runner = runnerOf(request);
    await manager.return(runner);
    return reply.code(204).send();
  });

  app.patch('/runners/:runnerId/files', async (request, reply) => {
    const runner = runnerOf(request);
    const update = parseInput(updateFilesRequestSchema, request.body, 'file update');
    await runner.updateFileSystem(update);
    return reply.code(204).send();
  });

  app.get('/runners/:runnerId/files', async (request) => {
    const runner = runnerOf(request);
    const query = parseInput(listFilesQuerySchema, request.query, 'query');
    return { files: await runner.listFileSystem(query) };
  });

  app.get('/runners/:runnerId/files/raw', async (request, reply) => {
    const runner = runnerOf(request);
    const query = parseInput(rawFileQuerySchema, request.query, 'query');
    const content = await runner.getFileContent(query.path, query.privilegedExecution);
    return reply
      .header('Content-Length', content.size)
      .header('Content-Type', 'application/octet-stream')
      .send(content.stream);
  });

  app.post('/runners/:runnerId/execute', async (request) => {
    const runner = runnerOf(request);
    const execution = parseInput(executeRequestSchema, request.body, 'execution request');
    const executionId = executions.add(runner.id, execution);
    const scheme = config.server.tls.active ? 'wss' : 'ws';
    const host = request.headers.host ?? `${config.server.address}:${config.server.port}`;
    const path = `/api/v1/runners/${encodeURIComponent(runner.id)}/websocket?executionID=${executionId}`;
    return { websocketUrl: `${scheme}://${host}${path}` };
  });

  app.get(
    '/runners/:runnerId/websocket',
    {
      websocket: true,
      // Checked before the upgrade, so a bad request gets a plain HTTP status.
      preValidation: async (request) => {
        const runner = runnerOf(request);
        const { executionID } = parseInput(websocketQuerySchema, request.query, 'query');
        const execution = executions.take(runner.id, executionID);
        if (!execution) throw new ApiError(404, 'NOT_FOUND', `execution ${executionID} is unknown, expired or already connected`);
        request.execution = { runner, request: execution };
      },
    },
    (socket, request) => {
      const pending = request.execution;
      if (!pending) {
        socket.close(1011);
        return;
      }
      void runExecutionSession(socket, pending.runner, pending.request, {
        maxOutputBytes: config.runners.maxoutputbytes,
        logger: request.log,
      }).catch((error: unknown) => {
        request.log.error({ err: error }, 'execution session failed');
        socket.close(1011);
      });
    },
  );
};
