import { type ChildProcess, spawn } from 'node:child_process';
import { createInterface } from 'node:readline';
import type { ConfigTree } from './daemon.js';
import { REPO_ROOT } from './daemon.js';

/*
 * The Nomad agent a test talks to, named the way Nomad's CLI names it: NOMAD_ADDR (http[s]://host:port),
 * NOMAD_TOKEN, NOMAD_NAMESPACE, NOMAD_CACERT, NOMAD_CLIENT_CERT, NOMAD_CLIENT_KEY. Without NOMAD_ADDR,
 * the fake Nomad is started as a process of its own and reached through the very same variables, so
 * the path a real cluster takes runs in every `npm test`.
 */
export interface NomadTarget {
  /* Whether it is the fake started here (false: an external agent from NOMAD_ADDR). */
  readonly fake: boolean;
  readonly env: Readonly<Record<string, string | undefined>>;
  /* The daemon's `nomad` configuration for this agent. */
  readonly config: ConfigTree;
  stop(): Promise<void>;
}

export function nomadConfig(env: Readonly<Record<string, string | undefined>>): ConfigTree {
  const address = env['NOMAD_ADDR'];
  if (address === undefined || address === '') throw new Error('NOMAD_ADDR is not set');
  const url = new URL(address);
  if (url.protocol !== 'http:' && url.protocol !== 'https:') throw new Error(`NOMAD_ADDR must be http:// or https://, not ${address}`);
  const tls: ConfigTree = { active: url.protocol === 'https:' };
  if (env['NOMAD_CACERT']) tls['cafile'] = env['NOMAD_CACERT'];
  if (env['NOMAD_CLIENT_CERT']) tls['certfile'] = env['NOMAD_CLIENT_CERT'];
  if (env['NOMAD_CLIENT_KEY']) tls['keyfile'] = env['NOMAD_CLIENT_KEY'];
  return {
    enabled: true,
    address: url.hostname.replace(/^\[(.*)\]$/, '$1'),
    port: url.port === '' ? 4646 : Number(url.port),
    ...(env['NOMAD_TOKEN'] ? { token: env['NOMAD_TOKEN'] } : {}),
    ...(env['NOMAD_NAMESPACE'] ? { namespace: env['NOMAD_NAMESPACE'] } : {}),
    tls,
    // A real agent answers across a network, and pulls images for its first allocations.
    requesttimeout: 10_000,
  };
}

/* NOMAD_ADDR's agent, or (without it) the fake Nomad as its own process behind the same variables. */
export async function nomadTarget(): Promise<NomadTarget> {
  if (process.env['NOMAD_ADDR'] !== undefined && process.env['NOMAD_ADDR'] !== '') {
    const env = { ...process.env };
    return { fake: false, env, config: nomadConfig(env), stop: async () => undefined };
  }
  if (process.env['NOMAD_TEST_REQUIRE_ADDR'] === '1') throw new Error('set NOMAD_ADDR (and NOMAD_TOKEN) to the Nomad agent to test against');
  const token = 'fake-nomad-agent-token';
  const child = spawn(process.execPath, ['--import', 'tsx', 'test/fake-nomad/main.ts', '--port', '0', '--token', token, '--heartbeat-ms', '200'], {
    cwd: REPO_ROOT,
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  const url = await listeningUrl(child);
  const env = { NOMAD_ADDR: url, NOMAD_TOKEN: token };
  return {
    fake: true,
    env,
    config: nomadConfig(env),
    stop: async () => {
      if (child.exitCode !== null || child.signalCode !== null) return;
      const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
      child.kill('SIGTERM');
      await exited;
    },
  };
}

function listeningUrl(child: ChildProcess): Promise<string> {
  return new Promise((resolve, reject) => {
    if (child.stdout === null) return reject(new Error('the fake Nomad has no stdout'));
    const lines = createInterface({ input: child.stdout });
    const onExit = (code: number | null): void => reject(new Error(`the fake Nomad exited (${code}) before listening`));
    child.once('exit', onExit);
    lines.on('line', (line) => {
      const match = /listening on (http:\/\/\S+)/.exec(line);
      if (match?.[1] === undefined) return;
      child.off('exit', onExit);
      resolve(match[1]);
    });
  });
}
