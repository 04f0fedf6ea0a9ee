import { type ChildProcess, execFile, spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';

const run = promisify(execFile);

const REGISTRY_BINARY = '/usr/bin/docker-registry';
const SKOPEO = '/usr/bin/skopeo';

/* Debian's docker-registry (the CNCF distribution registry) and skopeo to push: both or neither. */
export function realRegistryAvailable(): boolean {
  return existsSync(REGISTRY_BINARY) && existsSync(SKOPEO);
}

async function freePort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const address = server.address();
  await new Promise<void>((resolve) => server.close(() => resolve()));
  if (address === null || typeof address === 'string') throw new Error('no port');
  return address.port;
}

/*
 * The real registry on loopback, storage in a temporary directory; stop() kills it and removes
 * the directory. Anonymous and plain HTTP, as a site mirror often is.
 */
export class RealRegistry {
  private constructor(
    private readonly child: ChildProcess,
    private readonly directory: string,
    readonly host: string,
    private readonly output: () => string,
  ) {}

  static async start(): Promise<RealRegistry> {
    const directory = await mkdtemp(path.join(tmpdir(), 'poseidon-registry-'));
    const port = await freePort();
    const config = path.join(directory, 'config.yml');
    await writeFile(
      config,
      [
        'version: 0.1',
        'log: { level: warn }',
        `storage: { filesystem: { rootdirectory: ${path.join(directory, 'storage')} }, delete: { enabled: true } }`,
        `http: { addr: "127.0.0.1:${port}" }`,
        '',
      ].join('\n'),
    );
    const child = spawn(REGISTRY_BINARY, ['serve', config], { stdio: ['ignore', 'pipe', 'pipe'] });
    let output = '';
    child.stdout?.on('data', (chunk: Buffer) => {
      output += chunk.toString();
    });
    child.stderr?.on('data', (chunk: Buffer) => {
      output += chunk.toString();
    });
    const registry = new RealRegistry(child, directory, `127.0.0.1:${port}`, () => output);
    try {
      await registry.#waitReady();
    } catch (error) {
      await registry.stop();
      throw error;
    }
    return registry;
  }

  async #waitReady(): Promise<void> {
    for (let attempt = 0; attempt < 200; attempt += 1) {
      if (this.child.exitCode !== null) throw new Error(`docker-registry exited: ${this.output()}`);
      try {
        const response = await fetch(`http://${this.host}/v2/`);
        if (response.ok) return;
      } catch {
        // Not listening yet.
      }
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
    throw new Error(`docker-registry did not answer: ${this.output()}`);
  }

  /* Pushes an OCI image layout's tag as name:tag with skopeo (which keeps the digests). */
  async push(layoutDirectory: string, layoutTag: string, name: string, tag: string): Promise<void> {
    await run(SKOPEO, ['copy', '--quiet', '--dest-tls-verify=false', `oci:${layoutDirectory}:${layoutTag}`, `docker://${this.host}/${name}:${tag}`], {
      env: { ...process.env, HOME: this.directory },
    });
  }

  async stop(): Promise<void> {
    if (this.child.exitCode === null && this.child.signalCode === null) {
      const exited = new Promise((resolve) => this.child.once('exit', resolve));
      this.child.kill('SIGKILL');
      await exited;
    }
    await rm(this.directory, { recursive: true, force: true });
  }
}
