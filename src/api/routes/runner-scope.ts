import type { FastifyPluginAsyncZod } from 'fastify-type-provider-zod';
import { z } from 'zod';
import { runnerIdParamSchema } from '../../dto/runner.js';
import type { Runner } from '../../runner/runner.js';
import type { RunnerAccessor } from '../dependencies.js';

declare module 'fastify' {
  interface FastifyRequest {
    /*
     * The runner of a `/runners/:runnerId/...` route, resolved by runnerScope's pre-handler before
     * the route runs. Declared here, next to the plugin that provides it; only routes registered
     * inside that scope may read it (elsewhere reading it throws).
     */
    runner: Runner;
  }
}

const params = z.object({ runnerId: runnerIdParamSchema });

/*
 * The scope of every route that acts on one runner (as Poseidon's findRunnerMiddleware): an unknown
 * or expired runner answers 410, never 404, before any route code runs, and every use counts as
 * activity for the inactivity timeout. Register it with `{ prefix: '/runners/:runnerId' }`.
 */
export function runnerScope(runners: RunnerAccessor, routes: FastifyPluginAsyncZod): FastifyPluginAsyncZod {
  return async (scope) => {
    // A getter over a per-request map: a reference value must not be shared between requests, and
    // reading it where the hook did not run is a programming error that should say so, not yield null.
    const resolved = new WeakMap<object, Runner>();
    scope.decorateRequest('runner', {
      getter() {
        const runner = resolved.get(this);
        if (!runner) throw new Error('request.runner is only set inside runnerScope');
        return runner;
      },
    });
    scope.addHook('preHandler', async (request) => {
      // The route's own params schema has validated this already; parsing again only gives the type.
      const { runnerId } = params.parse(request.params);
      const runner = runners.get(runnerId);
      runner.touch();
      resolved.set(request, runner);
    });
    await scope.register(routes);
  };
}
