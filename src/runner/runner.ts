import type { Readable } from 'node:stream';
import type { ExecutionRequest, FileHeader, FileUpdate, MappedPort } from '../dto/runner.js';

export interface ExecutionOutput {
  onStdout(chunk: Buffer): void;
  onStderr(chunk: Buffer): void;
}

/* How an execution ended, as the WebSocket reports it. */
export type ExecutionResult = { kind: 'exited'; exitCode: number } | { kind: 'oomKilled' } | { kind: 'failed'; message: string };

/* A started process in a runner; the caller owns its time limit. */
export interface ExecutionProcess {
  writeStdin(data: Buffer): void;
  /* Kills the whole process tree of this execution. */
  kill(): void;
  /* Backpressure: stop reading output while the client is slow, and go on afterwards. */
  pauseOutput(): void;
  resumeOutput(): void;
  readonly result: Promise<ExecutionResult>;
}

export interface FileContent {
  size: number;
  stream: Readable;
}

export interface ListFilesOptions {
  path: string;
  recursive: boolean;
  privilegedExecution: boolean;
}

/* What the API needs from a runner, whichever backend runs it. */
export interface Runner {
  readonly id: string;
  readonly environmentId: number;
  mappedPorts(): MappedPort[];
  updateFileSystem(update: FileUpdate): Promise<void>;
  listFileSystem(options: ListFilesOptions): Promise<FileHeader[]>;
  getFileContent(path: string, privilegedExecution: boolean): Promise<FileContent>;
  execute(request: ExecutionRequest, output: ExecutionOutput): Promise<ExecutionProcess>;
  /* Activity resets the inactivity timer; the API calls this on every runner request. */
  touch(): void;
  /* Brackets an execution, during which the runner never counts as inactive. */
  beginExecution(): void;
  endExecution(): void;
}
