import { startFakeNomad, type FakeNomad } from '../fake-nomad/index.js';
import { CodeOceanClient } from './codeocean-client.js';
import { startDaemon, type ConfigTree, type Daemon } from './daemon.js';

/* What the end-to-end tests of the Nomad backend share. */

/* The daemon's configuration for the Nomad backend alone, against the fake Nomad on `port`. */
export function nomadOnly(port: number, nomad: ConfigTree = {}): ConfigTree {
  return { nomad: { enabled: true, address: '127.0.0.1', port, requesttimeout: 3000, ...nomad }, local: { enabled: false } };
}

/*
 * Stops the daemon, then what else the test started (the fake Nomad), even when a stop fails. The
 * daemon's output is shown with NOMAD_E2E_LOGS set, or always with `showLogs`.
 */
export async function stopNomadTest(daemon: Daemon | undefined, stopOthers: () => Promise<void>, showLogs = false): Promise<void> {
  const logs = daemon?.logs().trim() ?? '';
  try {
    await daemon?.stop();
  } finally {
    await stopOthers();
    if (logs.length > 0 && (showLogs || process.env['NOMAD_E2E_LOGS'] !== undefined)) process.stderr.write(`--- daemon output ---\n${logs.slice(-8000)}\n`);
  }
}

export interface PoolStatistics {
  idleRunners: number;
  usedRunners: number;
}

export async function poolStatistics(client: CodeOceanClient, environmentId: number): Promise<PoolStatistics | undefined> {
  const response = await client.request('GET', '/statistics/execution-environments', {});
  const body = response.body as Record<string, PoolStatistics> | undefined;
  return body?.[String(environmentId)];
}

/* The fake Nomad and the daemon on it, with a CodeOcean client of the daemon. */
export async function startNomadTest(token: string, nomad: ConfigTree = {}): Promise<{ fake: FakeNomad; daemon: Daemon; client: CodeOceanClient }> {
  const fake = await startFakeNomad({ heartbeatMs: 200 });
  const daemon = await startDaemon({ token, config: nomadOnly(fake.port, nomad) });
  return { fake, daemon, client: new CodeOceanClient(daemon.baseUrl, token) };
}
