import { existsSync } from 'node:fs';
import type { Logger } from 'pino';
import { HELP, parseArguments, UsageError } from './cli-arguments.js';
import { ConfigError, loadConfiguration } from './config/load.js';
import { type Daemon, packageVersion, startDaemon } from './daemon.js';
import { pullImages } from './local/images/pull-command.js';
import { createLogger } from './monitoring/logger.js';
import { createErrorReporter, type ErrorReporter } from './monitoring/sentry.js';

/* How long cleaning up after an uncaught exception may take before the process exits anyway. */
const FATAL_CLEANUP_MS = 10_000;
/* How long the report of a fatal error to Sentry may take (within FATAL_CLEANUP_MS). */
const FATAL_FLUSH_MS = 2_000;

function exitAfterFatal(logger: Logger, daemon: Daemon | undefined, errors: ErrorReporter | undefined, what: string, error: unknown): void {
  logger.fatal({ err: error }, `${what}: shutting down`);
  errors?.capture(error, { fatal: what });
  const timer = setTimeout(() => process.exit(1), FATAL_CLEANUP_MS);
  timer.unref();
  // Sandboxes, cgroups and the runner network are removed even now, the report is sent, then the exit says it failed.
  void (daemon ? daemon.close() : Promise.resolve())
    .catch(() => undefined)
    .then(() => errors?.flush(FATAL_FLUSH_MS))
    .finally(() => process.exit(1));
}

async function main(): Promise<void> {
  const values = parseArguments(process.argv.slice(2));
  if (values.help) {
    process.stdout.write(HELP);
    return;
  }
  if (values.version) {
    process.stdout.write(`${packageVersion()}\n`);
    return;
  }
  const configFile = values.config ?? (existsSync('configuration.yaml') ? 'configuration.yaml' : undefined);
  const { config, warnings } = await loadConfiguration(configFile);
  if (values.pull) {
    // The answer is on standard output, so the log goes to standard error.
    const failed = await pullImages(values.pull, config.local, createLogger(config.logger, 2), (line) => process.stdout.write(line));
    process.exitCode = failed > 0 ? 1 : 0;
    return;
  }
  const logger = createLogger(config.logger);
  logger.info({ configFile: configFile ?? '(defaults)' }, 'configuration loaded');
  for (const warning of warnings) logger.warn({ key: warning.key }, warning.message);
  const errors = await createErrorReporter(config.sentry, packageVersion());
  if (errors)
    logger.info(
      { environment: config.sentry.environment ?? 'production', release: config.sentry.release ?? packageVersion() },
      'errors are reported to Sentry',
    );

  let daemon: Daemon | undefined;
  let fatal = false;
  const onFatal = (what: string) => (error: unknown) => {
    if (fatal) return;
    fatal = true;
    exitAfterFatal(logger, daemon, errors, what, error);
  };
  process.on('uncaughtException', onFatal('uncaught exception'));
  process.on('unhandledRejection', onFatal('unhandled promise rejection'));

  // Signals that arrive while starting wait until the daemon is there to drain.
  let stopSignal: NodeJS.Signals | undefined;
  const stop = (signal: NodeJS.Signals): void => {
    if (stopSignal !== undefined) {
      logger.warn({ signal }, 'second stop signal: ending running executions now');
      daemon?.hurry();
      return;
    }
    stopSignal = signal;
    logger.info({ signal }, 'shutting down');
    if (daemon) drainAndExit(daemon, signal);
  };
  const drainAndExit = (running: Daemon, signal: NodeJS.Signals): void => {
    running.drain(signal).then(
      () => process.exit(0),
      (error: unknown) => {
        logger.error({ err: error }, 'shutdown failed');
        process.exit(1);
      },
    );
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
  process.on('SIGHUP', () => {
    logger.info({ signal: 'SIGHUP', configFile: configFile ?? '(defaults)' }, 'reloading the configuration');
    loadConfiguration(configFile).then(
      (reloaded) => daemon?.reload(reloaded.config),
      (error: unknown) => logger.error({ err: error }, 'cannot reload the configuration: keeping the current one'),
    );
  });

  daemon = await startDaemon(config, logger, errors);
  if (stopSignal !== undefined) drainAndExit(daemon, stopSignal);
}

main().catch((error: unknown) => {
  const known = error instanceof ConfigError || error instanceof UsageError;
  const message = known ? error.message : error instanceof Error ? (error.stack ?? error.message) : String(error);
  process.stderr.write(`poseidon-ts: ${message}\n`);
  process.exit(error instanceof UsageError ? 2 : 1);
});
