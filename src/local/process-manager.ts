import type { Logger } from 'pino';
import type { LocalConfig } from '../config/schema.js';
import type { ExecutionEnvironmentSpec } from '../dto/environment.js';
import type { CgroupManager } from './cgroups.js';
import { SPAWNER_BINARY } from './agent/standalone.js';
import { Sandbox } from './sandbox.js';
import { removeStaleSocketDirectories, SpawnerClient } from './spawner-client.js';

/* Told about sandboxes coming and going: a sandbox that ends on its own is a lost runner. */
export interface SandboxDelegate {
  sandboxReady(id: string): void;
  sandboxExited(id: string): void;
}

const MEGABYTE = 1024 * 1024;

/*
 * Starts and tracks live sandboxes (after Nex's process manager): each is prepared before any
 * workload arrives, so handing one out costs nothing.
 */
export class SandboxProcessManager {
  readonly #sandboxes = new Map<string, Sandbox>();
  #lameDuck = false;
  /* Forks the sandboxes, so that the daemon does not fork itself for each one. */
  readonly #spawner: SpawnerClient;

  constructor(
    private readonly config: LocalConfig,
    private readonly cgroups: CgroupManager,
    private readonly logger: Logger,
    private readonly agentBinary: string,
    private readonly delegate: SandboxDelegate,
    spawnerBinary: string = SPAWNER_BINARY,
  ) {
    this.#spawner = new SpawnerClient(spawnerBinary, (message) => this.logger.error(message));
    void removeStaleSocketDirectories().then((removed) => {
      if (removed > 0) logger.info({ removed }, 'removed socket directories left by an earlier daemon');
    });
  }

  list(): string[] {
    return [...this.#sandboxes.keys()];
  }

  lookup(id: string): Sandbox | undefined {
    return this.#sandboxes.get(id);
  }

  /* Builds a live sandbox for an environment: cgroup with its limits, namespaces, file systems. */
  async prepare(id: string, spec: ExecutionEnvironmentSpec): Promise<Sandbox> {
    if (this.#lameDuck) throw new Error('the sandbox manager is shutting down');
    const cgroup = await this.cgroups.create(id, {
      memoryBytes: spec.memoryLimit * MEGABYTE,
      // Poseidon's cpuLimit (MHz) becomes Nomad's CPU, i.e. Docker cpu_shares; the same share here.
      cpuShares: spec.cpuLimit,
      pids: this.config.pidslimit,
    });
    let sandbox: Sandbox;
    try {
      sandbox = await Sandbox.start({
        bwrap: this.config.bwrap,
        agent: this.agentBinary,
        rootfs: this.config.images[spec.image],
        networkAccess: spec.networkAccess,
        workspaceSizeMiB: this.config.workspacesize,
        cgroup,
        spawner: this.#spawner,
      });
    } catch (error) {
      await cgroup?.destroy();
      throw error;
    }
    this.#sandboxes.set(id, sandbox);
    sandbox.onExit(() => {
      this.#sandboxes.delete(id);
      this.delegate.sandboxExited(id);
    });
    this.logger.debug({ runnerId: id }, 'sandbox ready');
    this.delegate.sandboxReady(id);
    return sandbox;
  }

  async stopProcess(id: string): Promise<void> {
    await this.#sandboxes.get(id)?.destroy();
  }

  /* No new sandboxes from now on; running ones keep serving until stopped. */
  enterLameDuck(): void {
    this.#lameDuck = true;
  }

  async stop(): Promise<void> {
    this.enterLameDuck();
    await Promise.allSettled([...this.#sandboxes.values()].map((sandbox) => sandbox.destroy()));
    await this.#spawner.close();
  }
}
