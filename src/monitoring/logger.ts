import pino, { type DestinationStream, type Logger, type LoggerOptions } from 'pino';
import pretty from 'pino-pretty';
import type { Config } from '../config/schema.js';

/*
 * Every path a token could be logged under: pino replaces them whatever object is logged. Request
 * lines never carry headers, so Poseidon-Token can only appear through a mistake; this catches it.
 */
const REDACTED_PATHS = [
  'token',
  '*.token',
  'config.server.token',
  'config.nomad.token',
  'headers["poseidon-token"]',
  'req.headers["poseidon-token"]',
  'headers["x-nomad-token"]',
];

export function loggerOptions(config: Pick<Config['logger'], 'level' | 'formatter'>): LoggerOptions {
  return {
    level: config.level,
    base: { service: 'poseidon-ts' },
    timestamp: pino.stdTimeFunctions.isoTime,
    // "level":"info" rather than 30: readable with grep and by log shippers without a mapping.
    // pino-pretty prints the name itself and needs the number, so only JSON gets the label.
    ...(config.formatter === 'json' ? { formatters: { level: (label: string) => ({ level: label }) } } : {}),
    redact: { paths: REDACTED_PATHS, censor: '[redacted]' },
  };
}

/*
 * Text lines for people (Poseidon's TextFormatter), one per entry, synchronously written so that a
 * crash or exit loses nothing; JSON (one object per line) for machines.
 */
function destination(config: Pick<Config['logger'], 'formatter'>, fd: number): DestinationStream {
  if (config.formatter === 'text') {
    return pretty({
      sync: true,
      colorize: false,
      singleLine: true,
      translateTime: "UTC:yyyy-mm-dd'T'HH:MM:ss.l'Z'",
      ignore: 'pid,hostname,service',
      destination: fd,
    });
  }
  return pino.destination({ dest: fd, sync: true });
}

/* Standard output for the daemon; commands whose answer is on standard output (`poseidon pull`) log to standard error (2). */
export function createLogger(config: Pick<Config['logger'], 'level' | 'formatter'>, fd = 1): Logger {
  return pino(loggerOptions(config), destination(config, fd));
}

/*
 * What code below the API logs through when it acts for a request: Fastify's request.log (which
 * carries the request id) or, for background work, the daemon's own logger. Both fit.
 */
export interface ContextLogger {
  info(object: object, message: string): void;
  warn(object: object, message: string): void;
  error(object: object, message: string): void;
  debug(object: object, message: string): void;
  child(bindings: Record<string, unknown>): ContextLogger;
}
