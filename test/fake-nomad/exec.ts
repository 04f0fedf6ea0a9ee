import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import type { Writable } from 'node:stream';
import type { WebSocket } from 'ws';
import type { AllocRecord, Cluster } from './cluster.js';
import { isObject } from './model.js';
import type { NomadSpec } from './spec.js';

/*
 * Nomad's alloc exec over WebSocket (nomad-notes section 2): validation in Nomad's order with its
 * close reasons, then a real local process (argv, no shell) in the allocation's directory, output
 * in ≤1 KiB base64 frames, `stdout close`, `stderr close`, `exited`, and a dropped connection
 * without close frame.
 */

export interface ExecRequest {
  allocId: string;
  task: string | undefined;
  command: string[];
  tty: boolean;
}

const outputChunkBytes = 1024;
/* tty=true runs the command on a real pseudo-terminal through this helper (Docker's exec with a TTY). */
const PTY_HELPER = fileURLToPath(new URL('./pty-exec.py', import.meta.url));
/* The system's python, not a version manager's shim that would cost every exec a second. */
const PYTHON = existsSync('/usr/bin/python3') ? '/usr/bin/python3' : 'python3';
const closePolicy = 1008;
const closeInternal = 1011;

export function handleExec(socket: WebSocket, request: ExecRequest, cluster: Cluster, spec: NomadSpec | undefined, violations: string[]): void {
  const send = (frame: Record<string, unknown>): void => {
    if (spec !== undefined) violations.push(...spec.execServerFrame(frame));
    if (socket.readyState === socket.OPEN) socket.send(JSON.stringify(frame));
  };
  const refuse = (code: number, reason: string): void => socket.close(code, reason);

  const record = cluster.allocs.get(request.allocId);
  if (record === undefined) return refuse(closePolicy, `Unknown allocation "${request.allocId}"`);
  const status = String(record.alloc['ClientStatus']);
  if (status === 'complete' || status === 'failed' || status === 'lost') {
    return refuse(closePolicy, `exec not possible, client status of allocation ${request.allocId} is ${status}`);
  }
  if (request.task === undefined || request.task === '') return refuse(closePolicy, 'must provide task name');
  if (!record.taskNames.includes(request.task)) return refuse(closePolicy, `unknown task name "${request.task}"`);
  const states = record.alloc['TaskStates'];
  const candidate: unknown = isObject(states) ? states[request.task] : undefined;
  const state = isObject(candidate) ? candidate : undefined;
  if (state === undefined || state['StartedAt'] === undefined) return refuse(closePolicy, `task "${request.task}" not started yet.`);
  if (state['State'] !== 'running' || record.dir === undefined) return refuse(closePolicy, `task "${request.task}" is not running.`);
  const [file, ...args] = request.command;
  if (file === undefined) return refuse(closePolicy, 'command is not present');

  runProcess(socket, record, request, file, args, send, spec, violations);
}

function runProcess(
  socket: WebSocket,
  record: AllocRecord,
  request: ExecRequest,
  file: string,
  args: string[],
  send: (frame: Record<string, unknown>) => void,
  spec: NomadSpec | undefined,
  violations: string[],
): void {
  const dir = record.dir ?? '/';
  const [command, commandArgs] = request.tty ? [PYTHON, [PTY_HELPER, file, ...args]] : [file, args];
  const child = spawn(command, commandArgs, {
    cwd: dir,
    // Own process group, so killing the "container" takes the whole process tree with it.
    detached: true,
    stdio: ['pipe', 'pipe', 'pipe', 'pipe'],
    env: {
      // What Docker adds for an exec with a TTY.
      ...(request.tty ? { TERM: 'xterm' } : {}),
      PATH: process.env['PATH'] ?? '/usr/local/bin:/usr/bin:/bin',
      HOME: dir,
      LANG: 'C.UTF-8',
      NOMAD_ALLOC_ID: String(record.alloc['ID']),
      NOMAD_ALLOC_NAME: String(record.alloc['Name']),
      NOMAD_JOB_ID: record.jobId,
      NOMAD_JOB_NAME: record.jobId,
      NOMAD_GROUP_NAME: record.group,
      NOMAD_TASK_NAME: request.task ?? '',
      NOMAD_NAMESPACE: record.namespace,
      NOMAD_ALLOC_DIR: dir,
      NOMAD_TASK_DIR: dir,
    },
  });
  record.processes.add(child);
  let spawnError: Error | undefined;

  const forward = (stream: 'stdout' | 'stderr', bytes: Buffer): void => {
    for (let offset = 0; offset < bytes.length; offset += outputChunkBytes) {
      send({ [stream]: { data: bytes.subarray(offset, offset + outputChunkBytes).toString('base64') } });
    }
  };
  // With a TTY everything comes from the terminal, as stdout frames; the helper's stderr only
  // names the command's process group, which goes with the container.
  child.stdout.on('data', (chunk: Buffer) => forward('stdout', chunk));
  let helperLines = '';
  let ttyGroup: number | undefined;
  child.stderr.on('data', (chunk: Buffer) => {
    if (!request.tty) return forward('stderr', chunk);
    if (ttyGroup !== undefined) return;
    helperLines += chunk.toString('utf8');
    const match = /^(\d+)\n/.exec(helperLines);
    if (match?.[1] !== undefined) {
      ttyGroup = Number(match[1]);
      record.ttyGroups.add(ttyGroup);
    }
  });
  const control = child.stdio[3] as Writable | null;
  control?.on('error', () => undefined);
  child.stdin.on('error', () => undefined); // EPIPE when the process exits before reading all stdin.
  child.on('error', (error: Error) => {
    spawnError = error;
  });
  child.on('close', (code: number | null, signal: NodeJS.Signals | null) => {
    record.processes.delete(child);
    let exitCode = code ?? 0;
    if (signal !== null) exitCode = 128 + signalNumber(signal);
    if (ttyGroup !== undefined) record.ttyGroups.delete(ttyGroup);
    if (spawnError !== undefined) {
      // Docker's answer to a missing executable: a message and exit code 126/127.
      forward('stderr', Buffer.from(`exec: "${file}": executable file not found in $PATH\n`));
      exitCode = (spawnError as Error & { code?: string }).code === 'ENOENT' ? 127 : 126;
    }
    send({ stdout: { close: true } });
    send({ stderr: { close: true } });
    send(exitCode === 0 ? { exited: true, result: {} } : { exited: true, result: { exit_code: exitCode } });
    // Nomad drops the connection after the exit frame instead of sending a close frame.
    setImmediate(() => socket.terminate());
  });

  socket.on('message', (data: Buffer, isBinary: boolean) => {
    let frame: unknown;
    try {
      frame = JSON.parse(data.toString('utf8'));
    } catch {
      socket.close(closeInternal, 'unexpected message type');
      return;
    }
    if (spec !== undefined) violations.push(...spec.execClientFrame(frame));
    if (isBinary || !isObject(frame)) return;
    const stdin = frame['stdin'];
    if (isObject(stdin)) {
      if (typeof stdin['data'] === 'string' && child.stdin.writable) child.stdin.write(Buffer.from(stdin['data'], 'base64'));
      if (stdin['close'] === true) child.stdin.end();
    }
    const size = frame['tty_size'];
    if (request.tty && isObject(size) && typeof size['height'] === 'number' && typeof size['width'] === 'number') {
      control?.write(`${size['height']} ${size['width']}\n`);
    }
    // `{}` heartbeats need no action.
  });
}

function signalNumber(signal: NodeJS.Signals): number {
  const numbers: Partial<Record<NodeJS.Signals, number>> = { SIGHUP: 1, SIGINT: 2, SIGQUIT: 3, SIGKILL: 9, SIGSEGV: 11, SIGPIPE: 13, SIGTERM: 15 };
  return numbers[signal] ?? 0;
}
