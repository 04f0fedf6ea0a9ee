import { spawn } from 'node:child_process';
import { existsSync, readdirSync, rmSync } from 'node:fs';
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

/*
 * Exec failures of real Nomad, switched on by a test for the execs whose command matches:
 * - missing-exited: the connection drops after the output, without the `exited` frame (nomad#9892);
 * - close-1000: a normal close before the `exited` frame (nomad#14595), when the command ends or,
 *   with `afterMs`, that long after it started (the command keeps running);
 * - truncate-tail: the last `bytes` of output are lost, the exit frame still comes (nomad#27146,
 *   Docker's exec inspect returning before the output copy finished);
 * - delay-start: the command starts `afterMs` late, or once `until` settles (a slow Docker exec
 *   create; Docker starts the exec even when the client is gone by then).
 */
export type ExecFaultKind = 'missing-exited' | 'close-1000' | 'truncate-tail' | 'delay-start';

export interface ExecFault {
  readonly kind: ExecFaultKind;
  /* Matched against the command's argv joined with spaces; every exec when absent. */
  readonly match?: RegExp;
  readonly afterMs?: number;
  /* delay-start: the command starts when this settles (in-process tests), instead of after afterMs. */
  readonly until?: Promise<unknown>;
  readonly bytes?: number;
  /* How many matching execs it applies to; unlimited when absent. */
  readonly times?: number;
}

interface RunningExec {
  readonly command: readonly string[];
  /* The command's process group (a tty exec's session, else the detached child's); unset before it starts. */
  group: () => number | undefined;
}

/* The execs running in each allocation, for OOM kills of single processes. */
const runningExecs = new WeakMap<AllocRecord, Set<RunningExec>>();

/*
 * What Docker on cgroup v2 usually shows for an OOM in an exec: the kernel kills the exec'd process
 * (exit 137), the task keeps running, no task event, no restart. Returns how many execs it killed.
 */
export function oomKillExecs(record: AllocRecord, match: RegExp | undefined): number {
  let killed = 0;
  for (const exec of runningExecs.get(record) ?? []) {
    if (match !== undefined && !match.test(exec.command.join(' '))) continue;
    const group = exec.group();
    if (group === undefined) continue;
    try {
      process.kill(-group, 'SIGKILL');
      killed += 1;
    } catch {
      // already gone
    }
  }
  return killed;
}

/*
 * A container's /tmp goes with it, but the fake's execs share the host's. So the names in /tmp that
 * execs pass (the daemon's pid, exit and kill files, its stderr FIFOs) are noted per allocation, and
 * every file under them is removed with the allocation's "container".
 */
const containerTmpNames = new WeakMap<AllocRecord, Set<string>>();
const TMP_NAME = /^\/tmp\/((?:\.poseidon-|stderr_)[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})/;

function noteTmpNames(record: AllocRecord, command: readonly string[]): void {
  for (const part of command) {
    const name = TMP_NAME.exec(part)?.[1];
    if (name === undefined) continue;
    const names = containerTmpNames.get(record) ?? new Set<string>();
    containerTmpNames.set(record, names.add(name));
  }
}

export function removeContainerTmp(record: AllocRecord): void {
  const names = containerTmpNames.get(record);
  if (names === undefined || names.size === 0) return;
  containerTmpNames.delete(record);
  for (const entry of readdirSync('/tmp')) {
    if ([...names].some((name) => entry.startsWith(name))) rmSync(`/tmp/${entry}`, { force: true });
  }
}

/* The argv of every exec of the allocation that is running or about to start (delay-start). */
export function runningExecCommands(record: AllocRecord): string[][] {
  return [...(runningExecs.get(record) ?? [])].map((exec) => [...exec.command]);
}

function registerExec(record: AllocRecord, command: readonly string[]): { exec: RunningExec; done: () => void } {
  const execs = runningExecs.get(record) ?? new Set<RunningExec>();
  runningExecs.set(record, execs);
  const exec: RunningExec = { command, group: () => undefined };
  execs.add(exec);
  return { exec, done: () => execs.delete(exec) };
}

const outputChunkBytes = 1024;
/* tty=true runs the command on a real pseudo-terminal through this helper (Docker's exec with a TTY). */
const PTY_HELPER = fileURLToPath(new URL('./pty-exec.py', import.meta.url));
/* The system's python, not a version manager's shim that would cost every exec a second. */
const PYTHON = existsSync('/usr/bin/python3') ? '/usr/bin/python3' : 'python3';
const closePolicy = 1008;
const closeInternal = 1011;

export function handleExec(
  socket: WebSocket,
  request: ExecRequest,
  cluster: Cluster,
  spec: NomadSpec | undefined,
  violations: string[],
  fault: ExecFault | undefined,
): void {
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

  noteTmpNames(record, request.command);
  const registration = registerExec(record, request.command);
  if (fault?.kind === 'delay-start') {
    const start = (): void => {
      if (record.dir !== undefined) runProcess(socket, record, request, file, args, send, spec, violations, undefined, registration);
      else registration.done();
    };
    if (fault.until !== undefined) void fault.until.finally(start);
    else setTimeout(start, fault.afterMs ?? 1_000);
    return;
  }
  runProcess(socket, record, request, file, args, send, spec, violations, fault, registration);
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
  fault: ExecFault | undefined,
  registration: { exec: RunningExec; done: () => void },
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
  let ttyGroup: number | undefined;
  registration.exec.group = () => (request.tty ? ttyGroup : child.pid);
  if (fault?.kind === 'close-1000' && fault.afterMs !== undefined) setTimeout(() => socket.close(1000), fault.afterMs);

  const forward = (stream: 'stdout' | 'stderr', bytes: Buffer): void => {
    for (let offset = 0; offset < bytes.length; offset += outputChunkBytes) {
      send({ [stream]: { data: bytes.subarray(offset, offset + outputChunkBytes).toString('base64') } });
    }
  };
  // truncate-tail holds the newest `bytes` of stdout back and drops them at the end.
  let heldBack = Buffer.alloc(0);
  const forwardStdout = (chunk: Buffer): void => {
    if (fault?.kind !== 'truncate-tail') return forward('stdout', chunk);
    heldBack = Buffer.concat([heldBack, chunk]);
    const keep = fault.bytes ?? 1;
    if (heldBack.length > keep) {
      forward('stdout', heldBack.subarray(0, heldBack.length - keep));
      heldBack = heldBack.subarray(heldBack.length - keep);
    }
  };
  // With a TTY everything comes from the terminal, as stdout frames; the helper's stderr only
  // names the command's process group, which goes with the container.
  child.stdout.on('data', forwardStdout);
  let helperLines = '';
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
    registration.done();
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
    if (fault?.kind === 'close-1000' && fault.afterMs === undefined) {
      socket.close(1000);
      return;
    }
    if (fault?.kind !== 'missing-exited') send(exitCode === 0 ? { exited: true, result: {} } : { exited: true, result: { exit_code: exitCode } });
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
