import { createHash, timingSafeEqual } from 'node:crypto';
import type { FastifyPluginAsync } from 'fastify';
import { HttpError } from './errors.js';

function digest(value: string): Buffer {
  return createHash('sha256').update(value).digest();
}

/* Compares digests, so neither the content nor the length of the token leaks through timing. */
export function tokenMatches(expected: string, presented: string | string[] | undefined): boolean {
  if (typeof presented !== 'string') return false;
  return timingSafeEqual(digest(expected), digest(presented));
}

/* The name of the security scheme in the OpenAPI document, as Poseidon's swagger names it. */
export const SECURITY_SCHEME = 'poseidonAuthToken';

export interface AuthenticatedScopeOptions {
  /* server.token; without one every request passes (the daemon warns about that at start). */
  token: string | undefined;
  /* The protected routes: registered inside this scope, so the hook covers exactly them. */
  routes: FastifyPluginAsync[];
}

/*
 * A plugin scope, not a global hook with an allow-list of open URLs: Fastify's encapsulation
 * applies the check to every route registered inside and to nothing outside, so a new route is
 * protected by where it is registered, not by remembering a list.
 */
export const authenticatedScope: FastifyPluginAsync<AuthenticatedScopeOptions> = async (scope, { token, routes }) => {
  // The document says so on every route of the scope, whatever this daemon's configuration.
  scope.addHook('onRoute', (route) => {
    route.schema = { ...route.schema, security: [{ [SECURITY_SCHEME]: [] }] };
  });
  if (token) {
    scope.addHook('onRequest', async (request) => {
      if (!tokenMatches(token, request.headers['poseidon-token'])) {
        throw new HttpError(401, 'UNAUTHORIZED', 'missing or wrong Poseidon-Token header');
      }
    });
  }
  for (const plugin of routes) await scope.register(plugin);
};
