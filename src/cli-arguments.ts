import { parseArgs } from 'node:util';

export const HELP = `poseidon-ts: a Poseidon-compatible runner daemon for CodeOcean

Usage: poseidon [--config FILE]
       poseidon pull [--config FILE] IMAGE...

Commands:
  pull IMAGE...      fetch images from their registries into the local backend's image cache
                     (local.statedir/images) and exit: prepulls images too large for CodeOcean's
                     60-second window, or fills the cache of a site whose local.pullpolicy is never.
                     Prints one line per image: the reference, its digest and its root directory.

Options:
  -c, --config FILE  YAML configuration (default: ./configuration.yaml if present, else built-in defaults);
                     Poseidon's spelling -config FILE works too
  -h, --help         show this help
  -v, --version      print the version

Every key can be overridden by an environment variable: POSEIDON_<SECTION>_<KEY>,
e.g. POSEIDON_SERVER_PORT=7200, POSEIDON_SERVER_TOKEN=secret, POSEIDON_LOGGER_LEVEL=debug.
See configuration.example.yaml for all keys; Poseidon's own configuration file works unchanged.

Signals: SIGTERM and SIGINT drain (see server.shutdowntimeout) and exit 0, a second one ends
running executions at once; SIGHUP re-reads the log level and the TLS certificates.
`;

/*
 * Poseidon is a Go program: its flags are written with one dash (`-config FILE`, `-config=FILE`).
 * Those become their GNU spelling, so that a Poseidon unit file works unchanged.
 */
export function normaliseArguments(args: string[]): string[] {
  return args.map((arg) => (/^-(config|help|version)(=|$)/.test(arg) ? `-${arg}` : arg));
}

export class UsageError extends Error {}

const OPTIONS = {
  config: { type: 'string', short: 'c' },
  help: { type: 'boolean', short: 'h' },
  version: { type: 'boolean', short: 'v' },
} as const;

export interface CliArguments {
  config?: string;
  help?: boolean;
  version?: boolean;
  /* `pull`: the images to fetch. */
  pull?: string[];
}

export function parseArguments(args: string[]): CliArguments {
  let parsed: ReturnType<typeof parseArgs<{ options: typeof OPTIONS; allowPositionals: true }>>;
  try {
    parsed = parseArgs({ args: normaliseArguments(args), options: OPTIONS, allowPositionals: true });
  } catch (error) {
    throw new UsageError(`${(error as Error).message}\n\n${HELP}`);
  }
  const [command, ...operands] = parsed.positionals;
  if (command === undefined) return parsed.values;
  if (command !== 'pull') throw new UsageError(`unknown command "${command}"\n\n${HELP}`);
  if (operands.length === 0 && !parsed.values.help) throw new UsageError(`pull needs at least one IMAGE\n\n${HELP}`);
  return { ...parsed.values, pull: operands };
}
