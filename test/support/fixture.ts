import { after, before } from 'node:test';
import { CodeOceanClient } from './codeocean-client.js';
import { startDaemon, type Daemon, type DaemonOptions } from './daemon.js';

export interface DaemonFixture {
  readonly daemon: Daemon;
  readonly client: CodeOceanClient;
}

/*
 * One daemon per test file keeps the suite fast; its log goes to stderr at the end because with
 * `logger.level: warn` anything it printed is a lead when a test fails.
 */
export function useDaemon(options: DaemonOptions = {}, setup?: (fixture: DaemonFixture) => Promise<void>): DaemonFixture {
  let daemon: Daemon | undefined;
  let client: CodeOceanClient | undefined;
  before(async () => {
    daemon = await startDaemon(options);
    client = new CodeOceanClient(daemon.baseUrl, options.token);
    // Runs inside the same hook: separate root-level hooks are not ordered reliably by Node 20.
    await setup?.(fixture);
  });
  after(async () => {
    if (daemon === undefined) return;
    const logs = daemon.logs().trim();
    try {
      await daemon.stop();
    } finally {
      if (logs.length > 0) process.stderr.write(`--- daemon output (${daemon.baseUrl}) ---\n${logs.slice(-8000)}\n`);
    }
  });
  const fixture: DaemonFixture = {
    get daemon(): Daemon {
      if (daemon === undefined) throw new Error('daemon did not start (see the before hook failure)');
      return daemon;
    },
    get client(): CodeOceanClient {
      if (client === undefined) throw new Error('daemon did not start (see the before hook failure)');
      return client;
    },
  };
  return fixture;
}
