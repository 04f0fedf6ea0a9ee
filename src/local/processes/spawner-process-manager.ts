import { accessSync, constants } from 'node:fs';
import path from 'node:path';
import type { Logger } from 'pino';
import type { LocalConfig } from '../../config/schema.js';
import type { ExecutionEnvironmentSpec } from '../../dto/environment.js';
import type { CgroupManager } from '../cgroups.js';
import { SPAWNER_BINARY } from '../binaries.js';
import { hostIdsInRange, IDS_PER_RUNNER, IdRangeAllocator } from '../id-ranges.js';
import type { RunnerImage } from '../runner-image.js';
import { Sandbox } from '../sandbox.js';
import { seccompProgram } from '../seccomp.js';
import { removeStaleSocketDirectories, SpawnerClient } from '../spawner-client.js';
import type { ProcessDelegate, ProcessManager } from './process-manager.js';

const MEGABYTE = 1024 * 1024;

/* Bubblewrap sandboxes forked by the spawner, each in its own cgroup and user namespace id range. */
export class SpawnerProcessManager implements ProcessManager {
  readonly #sandboxes = new Map<string, Sandbox>();
  #lameDuck = false;
  /* Forks the sandboxes, so that the daemon does not fork itself for each one. */
  readonly #spawner: SpawnerClient;
  readonly #ids: IdRangeAllocator;
  readonly #bwrap: string;
  /* Read at start: a daemon whose sandboxes would run without their filter must not start. */
  readonly #seccomp = seccompProgram();

  constructor(
    private readonly config: LocalConfig,
    private readonly cgroups: CgroupManager,
    private readonly logger: Logger,
    agentBinary: string,
    private readonly delegate: ProcessDelegate,
    spawnerBinary: string = SPAWNER_BINARY,
  ) {
    this.#spawner = new SpawnerClient(spawnerBinary, (message) => this.logger.error(message), agentBinary);
    this.#ids = new IdRangeAllocator(config.idmapbase, config.idmapslots);
    const idsEnd = config.idmapbase + config.idmapslots * IDS_PER_RUNNER;
    const clashes = hostIdsInRange(config.idmapbase, idsEnd);
    if (clashes.length > 0) {
      throw new Error(
        `local.idmapbase/idmapslots: host ids ${config.idmapbase}..${idsEnd - 1} are in use, so a runner's root could be a host account: ${clashes.join(', ')}`,
      );
    }
    this.#bwrap = resolveExecutable(config.bwrap);
    void removeStaleSocketDirectories().then((removed) => {
      if (removed > 0) logger.info({ removed }, 'removed socket directories left by an earlier daemon');
    });
  }

  async prepare(id: string, spec: ExecutionEnvironmentSpec, image: RunnerImage): Promise<Sandbox> {
    if (this.#lameDuck) throw new Error('the sandbox manager is shutting down');
    // 0 is "not set", never unlimited: such environments get the configured defaults.
    const memoryLimitMiB = spec.memoryLimit > 0 ? spec.memoryLimit : this.config.defaultmemorylimit;
    const cgroup = await this.cgroups.create(id, {
      memoryBytes: memoryLimitMiB * MEGABYTE,
      // Poseidon's cpuLimit (MHz) becomes Nomad's CPU, i.e. Docker cpu_shares; the same share here.
      cpuShares: spec.cpuLimit > 0 ? spec.cpuLimit : this.config.defaultcpulimit,
      pids: this.config.pidslimit,
    });
    const ids = this.#ids.allocate();
    let sandbox: Sandbox;
    try {
      sandbox = await Sandbox.start({
        bwrap: this.#bwrap,
        rootfs: image.rootDirectory,
        accounts: image.accounts,
        ids,
        memoryLimitMiB,
        workspaceSizeMiB: this.config.workspacesize,
        cgroup,
        seccompProgram: this.#seccomp,
        spawner: this.#spawner,
        onCleanupError: (error) => this.logger.warn({ runnerId: id, err: error }, 'cannot remove the cgroup of an ended sandbox'),
      });
    } catch (error) {
      this.#ids.release(ids);
      await cgroup?.destroy();
      throw error;
    }
    this.#sandboxes.set(id, sandbox);
    sandbox.onExit(() => {
      this.#sandboxes.delete(id);
      // Its ids are free once its last process is gone, which emptying its cgroup waits for.
      void sandbox.destroy().finally(() => this.#ids.release(ids));
      this.delegate.sandboxExited(id);
    });
    this.logger.debug({ runnerId: id, hostIdBase: ids.base }, 'sandbox ready');
    this.delegate.sandboxReady(id);
    return sandbox;
  }

  async stopProcess(id: string): Promise<void> {
    await this.#sandboxes.get(id)?.destroy();
  }

  enterLameDuck(): void {
    this.#lameDuck = true;
  }

  async stop(): Promise<void> {
    this.enterLameDuck();
    await Promise.allSettled([...this.#sandboxes.values()].map((sandbox) => sandbox.destroy()));
    await this.#spawner.close();
  }
}

/* The spawner execs without a PATH search, so bubblewrap's path is resolved once, here. */
function resolveExecutable(name: string): string {
  if (name.includes('/')) return path.resolve(name);
  for (const directory of (process.env.PATH ?? '/usr/local/bin:/usr/bin:/bin').split(':')) {
    const candidate = path.join(directory || '.', name);
    try {
      accessSync(candidate, constants.X_OK);
      return candidate;
    } catch {
      // not here; try the next directory
    }
  }
  throw new Error(`local.bwrap: ${name} is not in PATH (run scripts/setup.sh)`);
}
