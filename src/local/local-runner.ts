import type { Logger } from 'pino';
import type { ContextLogger } from '../monitoring/logger.js';
import type { ExecutionRequest, FileHeader, FileUpdate, MappedPort } from '../dto/runner.js';
import { FileNotAvailableError, ListingTooLargeError, RunnerNotFoundError, WorkspaceUpdateError } from '../runner/errors.js';
import { InactivityTrackingRunner, type ManagedRunner } from '../runner/managed-runner.js';
import type { ExecutionOutput, ExecutionProcess, ExecutionResult, FileContent, ListFilesOptions } from '../runner/runner.js';
import { WORKSPACE } from '../runner/workspace-files.js';
import {
  AgentClosedError,
  type AgentIdentity,
  type AgentListLimits,
  AgentProtocolError,
  AgentRequestError,
  DEFAULT_LIST_LIMITS,
  E2BIG,
} from './agent/agent-client.js';
import type { RunnerImage } from './runner-image.js';
import type { Sandbox } from './sandbox.js';

/* A runner of the local backend: a live sandbox whose agent does the work. */
export class LocalRunner extends InactivityTrackingRunner implements ManagedRunner {
  #destroyed = false;
  #childLogger: Logger | undefined;

  constructor(
    readonly id: string,
    readonly environmentId: number,
    private readonly sandbox: Sandbox,
    private readonly ports: MappedPort[],
    /* What the sandbox was built on: who unprivileged commands run as, and their variables. */
    private readonly image: Pick<RunnerImage, 'learner' | 'environment'>,
    private readonly parentLogger: Logger,
    private readonly listLimits: AgentListLimits = DEFAULT_LIST_LIMITS,
    /* server.interactivestderr: stderr apart from the terminal (true) or on it (false). */
    private readonly interactiveStderr = true,
  ) {
    super();
    // Learner code (privileged, beside the agent) may have forged frames: worth one warning, with the runner's id.
    sandbox.agent.onClose((error) => {
      if (error instanceof AgentProtocolError) this.#logger.warn({ err: error.message }, 'agent connection ended: protocol violation');
    });
  }

  /* Made on first use: an idle runner never logs, and a child logger per runner adds up over a pool. */
  get #logger(): Logger {
    this.#childLogger ??= this.parentLogger.child({ runnerId: this.id, environmentId: this.environmentId });
    return this.#childLogger;
  }

  /* A closed agent connection ends the runner at once (410), before its sandbox has even exited. */
  get destroyed(): boolean {
    return this.#destroyed || !this.sandbox.alive || this.sandbox.agent.closed;
  }

  mappedPorts(): MappedPort[] {
    return this.ports;
  }

  #identity(privileged: boolean): AgentIdentity {
    return privileged ? { privileged } : { privileged, uid: this.image.learner.uid, gid: this.image.learner.gid };
  }

  async execute(request: ExecutionRequest, output: ExecutionOutput): Promise<ExecutionProcess> {
    const execution = this.sandbox.agent.exec(
      ['/bin/sh', '-c', request.command],
      // A terminal for stdin and stdout, as Poseidon's executions have (Nomad exec with tty=true).
      {
        env: { ...this.image.environment(request.privilegedExecution), ...request.environment },
        cwd: WORKSPACE,
        tty: { stderr: this.interactiveStderr ? 'pipe' : 'terminal' },
        ...this.#identity(request.privilegedExecution),
      },
      { onStdout: output.onStdout, onStderr: output.onStderr },
    );
    const result: Promise<ExecutionResult> = execution.result.then(
      ({ exitCode }) => ({ kind: 'exited', exitCode }),
      (error: unknown) => ({ kind: 'failed', message: error instanceof Error ? error.message : String(error) }),
    );
    return {
      writeStdin: (data) => execution.writeStdin(data),
      kill: () => execution.kill(),
      pauseOutput: () => execution.pauseOutput(),
      resumeOutput: () => execution.resumeOutput(),
      result,
    };
  }

  async updateFileSystem(update: FileUpdate): Promise<void> {
    try {
      await this.sandbox.agent.updateFiles({
        delete: update.delete,
        copy: update.copy.map((copy) => ({
          path: copy.path,
          isDirectory: copy.path.endsWith('/'),
          content: Buffer.from(copy.content ?? '', 'base64'),
        })),
      });
    } catch (error) {
      if (error instanceof AgentRequestError) throw new WorkspaceUpdateError(`updating files failed: ${error.message}`);
      throw this.#gone(error);
    }
  }

  async listFileSystem(options: ListFilesOptions): Promise<FileHeader[]> {
    let listing: FileHeader[];
    try {
      listing = await this.sandbox.agent.list(options.path, options.recursive, this.#identity(options.privilegedExecution), this.listLimits);
    } catch (error) {
      if (error instanceof AgentRequestError && error.status === E2BIG) throw new ListingTooLargeError(error.message);
      if (error instanceof AgentRequestError) throw new FileNotAvailableError(`cannot list ${options.path}: ${error.message}`);
      throw this.#gone(error);
    }
    // Like find, the agent lists the start directory itself first; CodeOcean wants its contents.
    return listing.filter((entry, index) => !(index === 0 && entry.entryType === 'd' && entry.name === options.path));
  }

  async getFileContent(path: string, privilegedExecution: boolean): Promise<FileContent> {
    try {
      return await this.sandbox.agent.read(path, this.#identity(privilegedExecution));
    } catch (error) {
      if (error instanceof AgentRequestError) throw new FileNotAvailableError(`cannot read ${path}: ${error.message}`);
      throw this.#gone(error);
    }
  }

  /* The agent's connection ended under a request: the runner is gone for the caller (410). */
  #gone(error: unknown): unknown {
    return error instanceof AgentClosedError ? new RunnerNotFoundError(this.id) : error;
  }

  /* Called when a claim takes this runner, before it is handed out (see RunnerCgroup.claim). */
  claimed(): void {
    this.sandbox.claim();
  }

  async destroy(reason: string, log?: ContextLogger): Promise<void> {
    if (this.#destroyed) return;
    this.#destroyed = true;
    this.stopInactivityTimer();
    await this.sandbox.destroy();
    // On a client's request the line carries its request id.
    (log?.child({ runnerId: this.id, environmentId: this.environmentId }) ?? this.#logger).info({ reason }, 'runner destroyed');
  }
}
