import type { Logger } from 'pino';
import type { LocalConfig } from '../config/schema.js';
import type { ExecutionEnvironmentSpec } from '../dto/environment.js';
import { EnvironmentPools } from '../environment/environment-pools.js';
import type { ContextLogger } from '../monitoring/logger.js';
import { AccessorHandler, type PutOutcome } from '../runner/accessor-handler.js';
import type { Runner } from '../runner/runner.js';
import { environmentIdOfRunner, newRunnerId } from '../runner/runner-id.js';
import { ensureAgentBuilt } from './binaries.js';
import type { CgroupManager } from './cgroups.js';
import { EnvironmentImages } from './environment-images.js';
import { EnvironmentStore } from './environment-store.js';
import { FileImageStore } from './images/file-image-store.js';
import type { ImageStore } from './images/image-store.js';
import { LocalRunner } from './local-runner.js';
import type { RunnerImage } from './runner-image.js';
import type { Sandbox } from './sandbox.js';
import { type AttachedNetwork, createRunnerNetworks, runnerNetworkOptions, type RunnerNetworks } from './network/index.js';
import type { ProcessManager } from './processes/process-manager.js';
import { SpawnerProcessManager } from './processes/spawner-process-manager.js';

/* The last handler in the chain: runners are bubblewrap sandboxes on this host. */
export class LocalAccessorHandler extends AccessorHandler {
  readonly name = 'local';
  readonly #logger: Logger;
  readonly #store: EnvironmentStore;
  protected readonly pools: EnvironmentPools<LocalRunner>;
  readonly #processes: ProcessManager;
  /* The environments' root file systems: the host's, a directory, or a registry image being pulled or ready. */
  readonly #images: EnvironmentImages;
  /* Pulled images under local.statedir/images, shared by the environments that use them. */
  readonly #imageStore: ImageStore;
  /* The private network of runners with networkAccess; set up at load, removed at shutdown. */
  #networks: Promise<RunnerNetworks> | undefined;

  constructor(
    private readonly config: LocalConfig,
    cgroups: CgroupManager,
    refillConcurrency: number,
    logger: Logger,
    /* server.interactivestderr: stderr apart from the executions' terminal (default) or on it. */
    /* runners.claimtimeout: seconds a claim on an empty pool waits for a runner being built (0: none). */
    /* runners.buildconcurrency: sandboxes built at once over all environments. */
    /* imageStore: pulls and unpacks registry images (default: a FileImageStore under local.statedir/images). */
    private readonly options: { interactiveStderr?: boolean; claimTimeout?: number; buildConcurrency?: number; imageStore?: ImageStore } = {},
  ) {
    super();
    this.#logger = logger.child({ backend: 'local' });
    this.#store = new EnvironmentStore(config.statedir);
    // Its pull progress goes to the instruments the chain has then (metrics), like runner builds.
    this.#imageStore = options.imageStore ?? FileImageStore.fromConfig(config, this.#logger, () => this.instruments);
    this.#images = new EnvironmentImages({
      images: config.images,
      policy: config.pullpolicy,
      learner: { uid: config.uid, gid: config.gid },
      store: this.#imageStore,
      logger: this.#logger,
      events: {
        ready: (environmentId, rolled) => {
          const environment = this.pools.get(environmentId);
          if (rolled) environment?.renewIdle('image updated');
          else environment?.refill();
        },
        state: (environmentId, state, detail) => this.instruments.imageState?.(environmentId, state, detail),
      },
    });
    this.pools = new EnvironmentPools({
      runners: { createRunner: (spec) => this.#createRunner(spec), canBuild: (spec) => this.#images.canBuild(spec) },
      // A change is on disk before it is in the pools: a failed PUT or DELETE changes nothing and can be retried.
      storage: {
        put: (spec) => this.#store.put(spec).catch((error: unknown) => this.#storeFailed(error, spec.id, 'store')),
        delete: (environmentId) => this.#store.delete(environmentId).catch((error: unknown) => this.#storeFailed(error, environmentId, 'delete')),
      },
      refillConcurrency,
      ...(options.buildConcurrency === undefined ? {} : { buildConcurrency: options.buildConcurrency }),
      claimTimeoutSeconds: options.claimTimeout ?? 0,
      logger: this.#logger,
      instruments: () => this.instruments,
    });
    this.#processes = new SpawnerProcessManager(config, cgroups, this.#logger, ensureAgentBuilt(), {
      sandboxReady: (runnerId) => this.#logger.info({ runnerId, environmentId: environmentIdOfRunner(runnerId) }, 'runner ready'),
      sandboxExited: (runnerId) => {
        // A runner destroyed on purpose has left its pool already; only a lost one is still there.
        if (this.pools.forget(runnerId)) {
          this.#logger.warn({ runnerId, environmentId: environmentIdOfRunner(runnerId) }, 'sandbox ended unexpectedly: runner removed');
        }
      },
    });
  }

  #storeFailed(error: unknown, environmentId: number, change: string): never {
    this.#logger.error(
      { err: error, environmentId, statedir: this.config.statedir },
      `cannot ${change} the environment in the state directory: nothing changed`,
    );
    throw error;
  }

  /* The local backend takes every environment no earlier handler wanted. */
  acceptsEnvironment(): boolean {
    return this.config.enabled;
  }

  protected async claimOwn(environmentId: number, inactivityTimeout: number, log?: ContextLogger, signal?: AbortSignal): Promise<Runner | undefined> {
    const runner = await this.pools.claim(environmentId, inactivityTimeout, log, signal);
    if (runner === undefined) return undefined;
    try {
      runner.claimed();
    } catch (error) {
      // Without its limits the runner must not run learner code: it goes, and the claim fails.
      this.pools.return(runner, log);
      throw new Error(`cannot apply the claimed runner's limits: ${String(error)}`);
    }
    return runner;
  }

  protected async returnOwn(runner: Runner, log?: ContextLogger): Promise<void> {
    this.pools.return(runner, log);
  }

  protected async putOwnEnvironment(spec: ExecutionEnvironmentSpec, log?: ContextLogger): Promise<PutOutcome> {
    const outcome = await this.pools.put(spec, log);
    // Answered at once, as Poseidon does: the image is pulled (or checked for a new digest) in the background.
    this.#images.track(spec, { log });
    return outcome;
  }

  protected async deleteOwnEnvironment(environmentId: number, log?: ContextLogger): Promise<void> {
    await this.pools.delete(environmentId, log);
    this.#images.forget(environmentId);
  }

  /*
   * A runner on the environment's current image. If the image rolled to a new digest while the
   * sandbox started, the runner is already stale: it is replaced by one on the new image.
   */
  async #createRunner(spec: ExecutionEnvironmentSpec): Promise<LocalRunner> {
    for (;;) {
      const image = this.#images.imageFor(spec);
      const runner = await this.#createRunnerOn(spec, image);
      if (this.#images.isCurrent(spec, image)) return runner;
      await runner.destroy('image updated while the runner was built');
    }
  }

  async #createRunnerOn(spec: ExecutionEnvironmentSpec, image: RunnerImage): Promise<LocalRunner> {
    const id = newRunnerId(spec.id);
    const unpin = this.#images.pinForRunner(image);
    let sandbox: Sandbox;
    try {
      sandbox = await this.#processes.prepare(id, spec, image);
    } catch (error) {
      unpin();
      throw error;
    }
    sandbox.onExit(unpin);
    let network: AttachedNetwork | undefined;
    if (spec.networkAccess) {
      try {
        if (this.#networks === undefined || sandbox.processId === undefined) throw new Error('no runner network');
        network = await (await this.#networks).attach(id, sandbox.processId, spec.exposedPorts);
      } catch (error) {
        await this.#processes.stopProcess(id);
        throw error;
      }
      const attached = network;
      sandbox.onExit(
        () => void attached.detach().catch((error: unknown) => this.#logger.error({ runnerId: id, err: error }, 'cannot detach a runner network')),
      );
    }
    return new LocalRunner(
      id,
      spec.id,
      sandbox,
      network?.mappedPorts ?? [],
      image,
      this.#logger,
      {
        maxEntries: this.config.maxlistingentries,
        maxBytes: this.config.maxlistingbytes,
      },
      this.options.interactiveStderr ?? true,
    );
  }

  protected async loadOwn(): Promise<void> {
    if (!this.config.enabled) return;
    // Checked before anything is set up, so that a refused start leaves nothing behind.
    await this.#store.checkWritable();
    const specs = await this.#store.load();
    if (this.#store.recovered) this.#logger.warn(this.#store.recovered);
    this.#networks = createRunnerNetworks(runnerNetworkOptions(this.config, this.#logger));
    // Without it only runners with networkAccess fail (they get no network, never the host's).
    await this.#networks.catch((error: unknown) =>
      this.#logger.error({ err: error }, 'cannot set up the runner network: environments with networkAccess get no runners'),
    );
    for (const spec of specs) {
      this.pools.start(spec);
      // Registry images start from the cache, without the network; the policy decides about newer digests.
      this.#images.track(spec, { fromCache: true });
    }
    this.#logger.info({ environments: specs.length }, 'environments loaded');
  }

  protected override enterLameDuckOwn(): void {
    this.pools.stopRefilling();
  }

  protected async shutdownOwn(): Promise<void> {
    this.#processes.enterLameDuck();
    this.#images.close();
    await this.#imageStore.close();
    await this.pools.shutdown();
    await this.#processes.stop();
    await this.#networks?.then(
      (networks) => networks.close(),
      () => undefined,
    );
  }
}
