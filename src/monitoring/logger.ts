import pino, { type Logger } from 'pino';
import type { Config } from '../config/schema.js';

export function createLogger(config: Config['logger']): Logger {
  return pino({
    level: config.level,
    base: { service: 'poseidon-ts' },
    timestamp: pino.stdTimeFunctions.isoTime,
    // A configured token must never reach a log line, whatever object is logged.
    redact: { paths: ['token', '*.token', 'config.server.token', 'config.nomad.token', 'headers["poseidon-token"]'], censor: '[redacted]' },
  });
}
