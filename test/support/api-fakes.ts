import { Readable } from 'node:stream';
import type { FastifyInstance } from 'fastify';
import pino, { type Logger } from 'pino';
import { buildApp } from '../../src/api/app.js';
import type { EnvironmentAccessor, RunnerAccessor } from '../../src/api/dependencies.js';
import { parseConfig } from '../../src/config/load.js';
import type { HealthMonitor } from '../../src/monitoring/health.js';
import type { Metrics } from '../../src/monitoring/metrics.js';
import type { ErrorReporter } from '../../src/monitoring/sentry.js';
import type { EnvironmentStatistics, ExecutionEnvironmentSpec } from '../../src/dto/environment.js';
import type { ExecutionRequest, FileHeader, FileUpdate, MappedPort } from '../../src/dto/runner.js';
import type { PutOutcome } from '../../src/runner/accessor-handler.js';
import { BackendError, EnvironmentNotFoundError, FileNotAvailableError, NoIdleRunnerError, RunnerNotFoundError } from '../../src/runner/errors.js';
import type { ExecutionOutput, ExecutionProcess, ExecutionResult, FileContent, ListFilesOptions, Runner } from '../../src/runner/runner.js';

/*
 * In-memory stand-ins for what the routes depend on (RunnerAccessor, EnvironmentAccessor, Runner),
 * so the API can be driven with app.inject in milliseconds, without root, sandboxes or Nomad.
 */

export class FakeRunner implements Runner {
  readonly files = new Map<string, string>();
  readonly updates: FileUpdate[] = [];
  readonly executions: ExecutionRequest[] = [];
  touches = 0;
  /* Set to make the next file operation fail as a backend would. */
  failFiles: Error | undefined;

  constructor(
    readonly id: string,
    readonly environmentId: number,
    private readonly ports: MappedPort[] = [],
  ) {}

  mappedPorts(): MappedPort[] {
    return this.ports;
  }

  async updateFileSystem(update: FileUpdate): Promise<void> {
    if (this.failFiles) throw this.failFiles;
    this.updates.push(update);
    for (const copy of update.copy) this.files.set(copy.path, Buffer.from(copy.content ?? '', 'base64').toString());
  }

  async listFileSystem(options: ListFilesOptions): Promise<FileHeader[]> {
    if (this.failFiles) throw this.failFiles;
    if (options.path !== './') throw new FileNotAvailableError(`cannot list ${options.path}`);
    return [...this.files].map(([name, content]) => ({
      name: `./${name}`,
      entryType: '-',
      size: content.length,
      modificationTime: 1_700_000_000,
      permissions: 'rwxr--r--',
      owner: 'root',
      group: 'root',
    }));
  }

  async getFileContent(path: string): Promise<FileContent> {
    const content = this.files.get(path);
    if (content === undefined) throw new FileNotAvailableError(`cannot read ${path}`);
    return { size: Buffer.byteLength(content), stream: Readable.from([Buffer.from(content)]) };
  }

  async execute(request: ExecutionRequest, output: ExecutionOutput): Promise<ExecutionProcess> {
    this.executions.push(request);
    output.onStdout(Buffer.from(`ran ${request.command}\n`));
    const result: Promise<ExecutionResult> = Promise.resolve({ kind: 'exited', exitCode: 0 });
    return { writeStdin: () => {}, kill: () => {}, pauseOutput: () => {}, resumeOutput: () => {}, result };
  }

  touch(): void {
    this.touches += 1;
  }

  beginExecution(): void {}
  endExecution(): void {}
}

export class FakeManager implements RunnerAccessor, EnvironmentAccessor {
  readonly specs = new Map<number, ExecutionEnvironmentSpec>();
  readonly runners = new Map<string, FakeRunner>();
  readonly returned: string[] = [];
  /* Claims answer NOMAD_OVERLOAD while this is 0. */
  idle = 1;
  /* Set to make every backend call fail, as an unreachable Nomad would. */
  failure: Error | undefined;
  #next = 0;

  async claim(environmentId: number, _inactivityTimeout: number): Promise<Runner> {
    if (this.failure) throw this.failure;
    if (!this.specs.has(environmentId)) throw new EnvironmentNotFoundError(environmentId);
    if (this.idle === 0) throw new NoIdleRunnerError(environmentId);
    this.#next += 1;
    const runner = new FakeRunner(`${environmentId}-runner-${this.#next}`, environmentId, [{ exposedPort: 8080, hostAddress: '127.0.0.1:40000' }]);
    this.runners.set(runner.id, runner);
    return runner;
  }

  get(runnerId: string): FakeRunner {
    const runner = this.runners.get(runnerId);
    if (!runner) throw new RunnerNotFoundError(runnerId);
    return runner;
  }

  async return(runner: Runner): Promise<void> {
    if (!this.runners.delete(runner.id)) throw new RunnerNotFoundError(runner.id);
    this.returned.push(runner.id);
  }

  environments(): ExecutionEnvironmentSpec[] {
    return [...this.specs.values()];
  }

  environment(environmentId: number): ExecutionEnvironmentSpec {
    const spec = this.specs.get(environmentId);
    if (!spec) throw new EnvironmentNotFoundError(environmentId);
    return spec;
  }

  async putEnvironment(spec: ExecutionEnvironmentSpec): Promise<PutOutcome> {
    if (this.failure) throw this.failure;
    const outcome = this.specs.has(spec.id) ? 'replaced' : 'created';
    this.specs.set(spec.id, spec);
    return outcome;
  }

  async deleteEnvironment(environmentId: number): Promise<void> {
    if (!this.specs.delete(environmentId)) throw new EnvironmentNotFoundError(environmentId);
  }

  statistics(): EnvironmentStatistics[] {
    return this.environments().map((spec) => ({
      id: spec.id,
      prewarmingPoolSize: spec.prewarmingPoolSize,
      idleRunners: this.idle,
      usedRunners: this.runners.size,
    }));
  }
}

export const unreachable = (): BackendError => new BackendError('Nomad is unreachable', 'backend-unreachable');

export interface InjectOptions {
  token?: string;
  /* Configuration overrides, as the YAML would give them. */
  server?: Record<string, unknown>;
  /* Silent unless given (e.g. one writing into an array, to check log lines). */
  logger?: Logger;
  metrics?: Metrics;
  health?: HealthMonitor;
  errors?: ErrorReporter;
}

export async function buildInjectApp(options: InjectOptions = {}): Promise<{ app: FastifyInstance; manager: FakeManager }> {
  const manager = new FakeManager();
  const server = { ...options.server, ...(options.token ? { token: options.token } : {}) };
  const app = await buildApp({
    config: parseConfig({ server }),
    manager,
    logger: options.logger ?? pino({ level: 'silent' }),
    version: '1.2.3',
    ...(options.metrics ? { metrics: options.metrics } : {}),
    ...(options.health ? { health: options.health } : {}),
    ...(options.errors ? { errors: options.errors } : {}),
  });
  await app.ready();
  return { app, manager };
}
