import type { ErrorEvent } from '@sentry/node';
import type { Config } from '../config/schema.js';

/*
 * Error reporting to Sentry (Poseidon's `sentry` section): on when sentry.dsn is set, off (no SDK,
 * no network) otherwise. The client is this process's own, not the SDK's global one: nothing is
 * instrumented, no handlers are installed, and no tracing or profiling runs. What is reported is
 * what the daemon logs at error or fatal: requests that failed with an unexpected 5xx, and the
 * uncaught exceptions and rejections that end the process. Events carry the error and its stack,
 * the request's method and route; never bodies, headers (Poseidon-Token), query strings or output.
 */
export interface ErrorReporter {
  /* Reports an error; `context` names where it happened (tags, never secrets). */
  capture(error: unknown, context?: Record<string, string>): void;
  /* Sends what is queued, for at most timeoutMs; true when everything went. */
  flush(timeoutMs: number): Promise<boolean>;
}

export type SentryConfig = Config['sentry'];

/* What may stay in a request of an event: nothing the client sent but the method and the path. */
function scrub(event: ErrorEvent): ErrorEvent {
  if (event.request) {
    const url = event.request.url?.split('?', 1)[0];
    event.request = { ...(event.request.method ? { method: event.request.method } : {}), ...(url ? { url } : {}) };
  }
  delete event.user;
  if (event.breadcrumbs) event.breadcrumbs = [];
  return event;
}

/* Loads the SDK only when a DSN is set: without one, nothing of Sentry is even imported. */
export async function createErrorReporter(config: SentryConfig, version: string): Promise<ErrorReporter | undefined> {
  if (!config.dsn) return undefined;
  const { defaultStackParser, getDefaultIntegrations, makeNodeTransport, NodeClient, Scope } = await import('@sentry/node');
  const client = new NodeClient({
    dsn: config.dsn,
    environment: config.environment ?? 'production',
    release: config.release ?? version,
    ...(config.dist !== undefined ? { dist: config.dist } : {}),
    ...(config.servername !== undefined ? { serverName: config.servername } : {}),
    debug: config.debug,
    attachStacktrace: config.attachstacktrace,
    ...(config.samplerate !== undefined ? { sampleRate: config.samplerate } : {}),
    ...(config.maxbreadcrumbs !== undefined ? { maxBreadcrumbs: config.maxbreadcrumbs } : {}),
    ...(config.ignoreerrors !== undefined ? { ignoreErrors: config.ignoreerrors } : {}),
    sendDefaultPii: false,
    transport: makeNodeTransport,
    stackParser: defaultStackParser,
    // Only the integrations that shape events (dedupe, linked errors, filters, context); none that
    // hooks into the process (uncaught exceptions, http, console): those stay the daemon's.
    integrations: getDefaultIntegrations({}).filter((integration) =>
      ['InboundFilters', 'EventFilters', 'FunctionToString', 'LinkedErrors', 'Dedupe', 'Context', 'Modules', 'NodeContext'].includes(integration.name),
    ),
    beforeSend: scrub,
  });
  const scope = new Scope();
  scope.setClient(client);
  client.init();
  return {
    capture(error, context) {
      scope.captureException(error, context ? { captureContext: { tags: context } } : undefined);
    },
    flush: async (timeoutMs) => client.flush(timeoutMs),
  };
}
