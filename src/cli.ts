import { existsSync } from 'node:fs';
import { parseArgs } from 'node:util';
import { ConfigError, loadConfig } from './config/load.js';
import { packageVersion, startDaemon } from './daemon.js';
import { createLogger } from './monitoring/logger.js';

const HELP = `poseidon-ts: a Poseidon-compatible runner daemon for CodeOcean

Usage: poseidon [--config FILE]

Options:
  -c, --config FILE  YAML configuration (default: ./configuration.yaml if present, else built-in defaults)
  -h, --help         show this help
  -v, --version      print the version

Every key can be overridden by an environment variable: POSEIDON_<SECTION>_<KEY>,
e.g. POSEIDON_SERVER_PORT=7200, POSEIDON_SERVER_TOKEN=secret, POSEIDON_LOGGER_LEVEL=debug.
See configuration.example.yaml for all keys.
`;

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      config: { type: 'string', short: 'c' },
      help: { type: 'boolean', short: 'h' },
      version: { type: 'boolean', short: 'v' },
    },
  });
  if (values.help) {
    process.stdout.write(HELP);
    return;
  }
  if (values.version) {
    process.stdout.write(`${packageVersion()}\n`);
    return;
  }
  const configFile = values.config ?? (existsSync('configuration.yaml') ? 'configuration.yaml' : undefined);
  const config = await loadConfig(configFile);
  const logger = createLogger(config.logger);
  logger.info({ configFile: configFile ?? '(defaults)' }, 'configuration loaded');
  const daemon = await startDaemon(config, logger);

  let stopping = false;
  const stop = (signal: NodeJS.Signals): void => {
    if (stopping) return;
    stopping = true;
    logger.info({ signal }, 'shutting down');
    daemon.close().then(
      () => process.exit(0),
      (error: unknown) => {
        logger.error({ err: error }, 'shutdown failed');
        process.exit(1);
      },
    );
  };
  process.once('SIGTERM', stop);
  process.once('SIGINT', stop);
}

main().catch((error: unknown) => {
  const message = error instanceof ConfigError ? error.message : error instanceof Error ? (error.stack ?? error.message) : String(error);
  process.stderr.write(`poseidon-ts: ${message}\n`);
  process.exit(1);
});
