import type { ChildProcess } from 'node:child_process';
import { constants as osConstants } from 'node:os';
import { PassThrough } from 'node:stream';
import type { Logger } from 'pino';
import type { ExecutionRequest, FileHeader, FileUpdate, MappedPort } from '../dto/runner.js';
import { BadRequestError, FileNotAvailableError } from '../runner/errors.js';
import { InactivityTrackingRunner, type ManagedRunner } from '../runner/managed-runner.js';
import type { ExecutionOutput, ExecutionProcess, ExecutionResult, FileContent, ListFilesOptions } from '../runner/runner.js';
import { buildArchive, listCommand, parseFindOutput, readCommand, updateCommand, WORKSPACE } from '../runner/workspace-files.js';
import { SANDBOX_PATH, type Sandbox } from './sandbox.js';

/* Output still arriving after the process exited belongs to it; silence this long ends the wait. */
const OUTPUT_SETTLE_MS = 100;

const BASE_ENVIRONMENT: Record<string, string> = {
  PATH: SANDBOX_PATH,
  HOME: WORKSPACE,
  LANG: 'C.UTF-8',
  // Output goes to a pipe, not a TTY: without this, Python would hold prompts back in its buffer.
  PYTHONUNBUFFERED: '1',
  CODEOCEAN: 'true',
};

export function exitCodeOf(code: number | null, signal: NodeJS.Signals | null): number {
  if (code !== null) return code & 0xff;
  const signalNumber = signal ? osConstants.signals[signal] : undefined;
  return 128 + (signalNumber ?? 9);
}

export class LocalRunner extends InactivityTrackingRunner implements ManagedRunner {
  #destroyed = false;
  readonly #logger: Logger;

  constructor(
    readonly id: string,
    readonly environmentId: number,
    private readonly sandbox: Sandbox,
    private readonly ports: MappedPort[],
    logger: Logger,
  ) {
    super();
    this.#logger = logger.child({ runnerId: id, environmentId });
  }

  get destroyed(): boolean {
    return this.#destroyed || !this.sandbox.alive;
  }

  mappedPorts(): MappedPort[] {
    return this.ports;
  }

  onSandboxExit(listener: () => void): void {
    this.sandbox.onExit(() => {
      if (!this.#destroyed) listener();
    });
  }

  async execute(request: ExecutionRequest, output: ExecutionOutput): Promise<ExecutionProcess> {
    const child = this.sandbox.exec(['/bin/sh', '-c', request.command], {
      privileged: request.privilegedExecution,
      env: { ...BASE_ENVIRONMENT, ...request.environment },
    });
    child.stdout?.on('data', (chunk: Buffer) => output.onStdout(chunk));
    child.stderr?.on('data', (chunk: Buffer) => output.onStderr(chunk));
    // A process that ends without reading its stdin makes later writes fail; that is not an error.
    child.stdin?.on('error', () => undefined);
    return {
      writeStdin: (data) => {
        if (child.stdin?.writable) child.stdin.write(data);
      },
      kill: () => killTree(child),
      pauseOutput: () => {
        child.stdout?.pause();
        child.stderr?.pause();
      },
      resumeOutput: () => {
        child.stdout?.resume();
        child.stderr?.resume();
      },
      result: waitForResult(child),
    };
  }

  async updateFileSystem(update: FileUpdate): Promise<void> {
    const archive = update.copy.length > 0 ? await buildArchive(update.copy) : undefined;
    const result = await this.#run(updateCommand(update, archive !== undefined), { privileged: true, stdin: archive });
    if (result.exitCode !== 0) throw new BadRequestError(`updating files failed: ${result.stderr.trim() || `exit ${result.exitCode}`}`);
  }

  async listFileSystem(options: ListFilesOptions): Promise<FileHeader[]> {
    const { start, argv } = listCommand(options.path, options.recursive);
    const result = await this.#run(argv, { privileged: options.privilegedExecution });
    const entries = parseFindOutput(result.stdout).filter((entry, index) => !(index === 0 && entry.name === start && entry.entryType === 'd'));
    if (result.exitCode !== 0 && entries.length === 0) {
      throw new FileNotAvailableError(`cannot list ${options.path}: ${result.stderr.trim() || `exit ${result.exitCode}`}`);
    }
    return entries;
  }

  async getFileContent(requestedPath: string, privilegedExecution: boolean): Promise<FileContent> {
    const child = this.sandbox.exec(readCommand(requestedPath), {
      privileged: privilegedExecution,
      env: BASE_ENVIRONMENT,
    });
    child.stdin?.end();
    let stderr = '';
    child.stderr?.setEncoding('utf8').on('data', (text: string) => (stderr += text));
    const exited = waitForResult(child);
    const stdout = child.stdout;
    if (!stdout) throw new FileNotAvailableError('cannot read file');
    // The first line is the size (for Content-Length); the rest is the file, streamed as it comes.
    const size = await new Promise<number | undefined>((resolve) => {
      let head = Buffer.alloc(0);
      const onData = (chunk: Buffer): void => {
        head = Buffer.concat([head, chunk]);
        const newline = head.indexOf(10);
        if (newline < 0) return;
        stdout.off('data', onData);
        stdout.pause();
        const rest = head.subarray(newline + 1);
        if (rest.length > 0) stdout.unshift(rest);
        resolve(Number(head.subarray(0, newline).toString('utf8')));
      };
      stdout.on('data', onData);
      void exited.then(() => resolve(undefined));
    });
    if (size === undefined || !Number.isSafeInteger(size)) {
      killTree(child);
      throw new FileNotAvailableError(`cannot read ${requestedPath}: ${stderr.trim() || 'no such file'}`);
    }
    const stream = new PassThrough();
    stdout.pipe(stream);
    stream.on('close', () => killTree(child));
    return { size, stream };
  }

  async destroy(reason: string): Promise<void> {
    if (this.#destroyed) return;
    this.#destroyed = true;
    this.stopInactivityTimer();
    await this.sandbox.destroy();
    this.#logger.info({ reason }, 'runner destroyed');
  }

  /* Runs a helper command to completion, collecting its output. */
  async #run(argv: string[], options: { privileged: boolean; stdin?: Buffer }): Promise<{ exitCode: number; stdout: Buffer; stderr: string }> {
    const child = this.sandbox.exec(argv, { privileged: options.privileged, env: BASE_ENVIRONMENT });
    const stdout: Buffer[] = [];
    let stderr = '';
    child.stdout?.on('data', (chunk: Buffer) => stdout.push(chunk));
    child.stderr?.setEncoding('utf8').on('data', (text: string) => (stderr += text));
    child.stdin?.on('error', () => undefined);
    child.stdin?.end(options.stdin);
    const result = await waitForResult(child);
    return { exitCode: result.kind === 'exited' ? result.exitCode : 1, stdout: Buffer.concat(stdout), stderr };
  }
}

function killTree(child: ChildProcess): void {
  if (child.pid === undefined || child.exitCode !== null || child.signalCode !== null) return;
  try {
    // The execution runs in its own process group (spawned detached), so this reaches its whole tree.
    process.kill(-child.pid, 'SIGKILL');
  } catch {
    child.kill('SIGKILL');
  }
}

/*
 * Resolves once the process exited and its output drained. Background processes may keep the
 * pipes open forever, so after the exit the wait ends when no output came for a short while.
 */
function waitForResult(child: ChildProcess): Promise<ExecutionResult> {
  return new Promise((resolve) => {
    let settleTimer: NodeJS.Timeout | undefined;
    let exitCode: number | undefined;
    const finish = (): void => {
      if (settleTimer) clearTimeout(settleTimer);
      child.stdout?.destroy();
      child.stderr?.destroy();
      resolve({ kind: 'exited', exitCode: exitCode ?? 1 });
    };
    const armSettle = (): void => {
      if (exitCode === undefined) return;
      if (settleTimer) clearTimeout(settleTimer);
      settleTimer = setTimeout(finish, OUTPUT_SETTLE_MS);
    };
    child.stdout?.on('data', armSettle);
    child.stderr?.on('data', armSettle);
    child.once('error', (error) => resolve({ kind: 'failed', message: `cannot start the command: ${error.message}` }));
    child.once('exit', (code, signal) => {
      exitCode = exitCodeOf(code, signal);
      armSettle();
    });
    child.once('close', finish);
  });
}

