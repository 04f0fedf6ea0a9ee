import type { ChildProcess } from 'node:child_process';
import { constants as osConstants } from 'node:os';
import path from 'node:path';
import { PassThrough } from 'node:stream';
import type { Logger } from 'pino';
import tar from 'tar-stream';
import type { ExecutionRequest, FileEntryType, FileHeader, FileUpdate, MappedPort } from '../dto/runner.js';
import { fileEntryTypes } from '../dto/runner.js';
import { BadRequestError, FileNotAvailableError } from '../runner/errors.js';
import { InactivityTrackingRunner, type ManagedRunner } from '../runner/managed-runner.js';
import type { ExecutionOutput, ExecutionProcess, ExecutionResult, FileContent, ListFilesOptions } from '../runner/runner.js';
import { SANDBOX_PATH, type Sandbox, WORKSPACE } from './sandbox.js';

/* Output still arriving after the process exited belongs to it; silence this long ends the wait. */
const OUTPUT_SETTLE_MS = 100;
const DIRECTORY_MODE = 0o1777;
const FILE_MODE = 0o744;

const BASE_ENVIRONMENT: Record<string, string> = {
  PATH: SANDBOX_PATH,
  HOME: WORKSPACE,
  LANG: 'C.UTF-8',
  // Output goes to a pipe, not a TTY: without this, Python would hold prompts back in its buffer.
  PYTHONUNBUFFERED: '1',
  CODEOCEAN: 'true',
};

/*
 * Deletes first, then extracts the tar on stdin at the sandbox root. Positional arguments
 * carry the paths, so no path is ever parsed by the shell.
 */
const UPDATE_SCRIPT = [
  'set -e',
  `cd ${WORKSPACE}`,
  'glob=$1; literal=$2; extract=$3; shift 3',
  // The exact entry ./* is Poseidon's glob over the workspace, which spares dotfiles.
  'if [ "$glob" = 1 ]; then rm -rf -- ./*; fi',
  'while [ "$literal" -gt 0 ]; do rm -rf -- "$1"; shift; literal=$((literal-1)); done',
  'if [ "$extract" = 1 ]; then tar -x -p --same-owner -f - -C /; fi',
].join('\n');

const READ_SCRIPT = '[ -f "$1" ] && [ -r "$1" ] || { echo "$1 is not a readable regular file" >&2; exit 1; }; stat -L -c %s -- "$1" && exec cat -- "$1"';

const FIND_FORMAT = '%y\\0%s\\0%T@\\0%M\\0%u\\0%g\\0%p\\0%l\\0';
const FIND_FIELDS = 8;

export function exitCodeOf(code: number | null, signal: NodeJS.Signals | null): number {
  if (code !== null) return code & 0xff;
  const signalNumber = signal ? osConstants.signals[signal] : undefined;
  return 128 + (signalNumber ?? 9);
}

/* Resolves a request path the way Poseidon does: relative to the workspace, absolute as given. */
export function sandboxPath(requested: string): string {
  return path.posix.normalize(path.posix.isAbsolute(requested) ? requested : `${WORKSPACE}/${requested}`);
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
    const globDelete = update.delete.includes('./*');
    const literalDeletes = update.delete.filter((entry) => entry !== './*');
    const archive = update.copy.length > 0 ? await buildArchive(update.copy) : undefined;
    const result = await this.#run(
      ['/bin/sh', '-c', UPDATE_SCRIPT, 'update', globDelete ? '1' : '0', String(literalDeletes.length), archive ? '1' : '0', ...literalDeletes],
      { privileged: true, stdin: archive },
    );
    if (result.exitCode !== 0) throw new BadRequestError(`updating files failed: ${result.stderr.trim() || `exit ${result.exitCode}`}`);
  }

  async listFileSystem(options: ListFilesOptions): Promise<FileHeader[]> {
    // find reads a leading '-' as an option; a './' prefix keeps such a name a path.
    const start = options.path.startsWith('-') ? `./${options.path}` : options.path;
    const result = await this.#run(
      ['find', start, ...(options.recursive ? [] : ['-maxdepth', '1']), '-printf', FIND_FORMAT],
      { privileged: options.privilegedExecution },
    );
    const entries = parseFindOutput(result.stdout).filter((entry, index) => !(index === 0 && entry.name === start && entry.entryType === 'd'));
    if (result.exitCode !== 0 && entries.length === 0) {
      throw new FileNotAvailableError(`cannot list ${options.path}: ${result.stderr.trim() || `exit ${result.exitCode}`}`);
    }
    return entries;
  }

  async getFileContent(requestedPath: string, privilegedExecution: boolean): Promise<FileContent> {
    const child = this.sandbox.exec(['/bin/sh', '-c', READ_SCRIPT, 'read', requestedPath], {
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

async function buildArchive(copies: FileUpdate['copy']): Promise<Buffer> {
  const pack = tar.pack();
  const chunks: Buffer[] = [];
  pack.on('data', (chunk: unknown) => {
    if (Buffer.isBuffer(chunk)) chunks.push(chunk);
  });
  const done = new Promise<void>((resolve, reject) => {
    pack.on('end', resolve);
    pack.on('error', reject);
  });
  const directories = new Set<string>();
  const addDirectory = (target: string): void => {
    if (target === WORKSPACE || target === '/' || directories.has(target)) return;
    if (target.startsWith(`${WORKSPACE}/`)) addDirectory(path.posix.dirname(target));
    directories.add(target);
    pack.entry({ name: target.slice(1), type: 'directory', mode: DIRECTORY_MODE, uid: 0, gid: 0 });
  };
  for (const copy of copies) {
    const target = sandboxPath(copy.path);
    if (target === '/') throw new BadRequestError(`cannot write to ${copy.path}`);
    if (copy.path.endsWith('/')) {
      addDirectory(target);
      continue;
    }
    if (target.startsWith(`${WORKSPACE}/`)) addDirectory(path.posix.dirname(target));
    const content = Buffer.from(copy.content ?? '', 'base64');
    pack.entry({ name: target.slice(1), type: 'file', mode: FILE_MODE, uid: 0, gid: 0, size: content.length }, content);
  }
  pack.finalize();
  await done;
  return Buffer.concat(chunks);
}

const FIND_TYPES: Record<string, FileEntryType> = { f: '-', d: 'd', l: 'l', p: 'p', s: 's', c: 'c', b: 'b', D: 'D' };

export function parseFindOutput(output: Buffer): FileHeader[] {
  const fields = output.toString('utf8').split('\0');
  const entries: FileHeader[] = [];
  for (let offset = 0; offset + FIND_FIELDS <= fields.length; offset += FIND_FIELDS) {
    const [type = '?', size, time, mode = '', owner = '', group = '', name = '', linkTarget = ''] = fields.slice(offset, offset + FIND_FIELDS);
    const entryType = FIND_TYPES[type] ?? (fileEntryTypes.includes(type as FileEntryType) ? (type as FileEntryType) : '?');
    entries.push({
      name,
      entryType,
      ...(entryType === 'l' ? { linkTarget } : {}),
      size: Number(size) || 0,
      modificationTime: Math.floor(Number(time) || 0),
      permissions: mode.slice(1),
      owner,
      group,
    });
  }
  return entries;
}
