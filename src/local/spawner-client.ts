import { type ChildProcess, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { readdir, rm } from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { encodeFrame, type Frame, FrameParser } from './frames.js';

/*
 * Client of agent/poseidon-spawner.c: starts processes without forking the daemon. Forking a large
 * Node process costs milliseconds of the main thread (page tables are copied synchronously), so
 * the daemon forks once, to start the spawner, which then forks every sandbox.
 *
 * A spawned process gets a unix socket connected to the daemon as its stdin and stdout: the spawner's
 * child connects to the daemon's listening socket (in a private 0700 directory) and first writes
 * a random key that names its spawn. Its stderr goes to the spawner, which reports the first bytes
 * with the exit status.
 */

const Request = { spawn: 0x01, kill: 0x02, detach: 0x03 } as const;
const SOCKET_DIRECTORY_PREFIX = 'poseidon-spawner-';

/*
 * A daemon that was SIGKILLed could not remove its socket directory. One whose socket nobody
 * listens on any more is such a leftover; a live daemon's socket answers and is left alone.
 */
export async function removeStaleSocketDirectories(parent: string = os.tmpdir()): Promise<number> {
  const names = (await readdir(parent).catch(() => [] as string[])).filter((name) => name.startsWith(SOCKET_DIRECTORY_PREFIX));
  let removed = 0;
  for (const name of names) {
    const directory = path.join(parent, name);
    const listening = await new Promise<boolean>((resolve) => {
      const probe = net.connect(path.join(directory, 'socket'));
      probe.once('connect', () => {
        probe.destroy();
        resolve(true);
      });
      probe.once('error', (error: NodeJS.ErrnoException) => resolve(error.code !== 'ECONNREFUSED' && error.code !== 'ENOENT'));
    });
    if (!listening) {
      await rm(directory, { recursive: true, force: true });
      removed += 1;
    }
  }
  return removed;
}
const Event = { started: 0x81, failed: 0x82, exited: 0x83, detached: 0x84 } as const;
const KEY_LEN = 16;
const CONNECTION_GRACE_MS = 50;

/* What the spawner sets up in the child before it execs (see agent/poseidon-spawner.c). */
export interface SpawnOptions {
  /* cgroup.procs files the child joins first, while it is still host root. */
  cgroupProcsFiles?: string[];
  /* A new user namespace whose ids 0..count-1 are host ids base..base+count-1; the child is its root. */
  userNamespace?: { base: number; count: number };
  /*
   * Directories (absolute, at most 4) mounted read-only at idmappedPath(index), in a private mount
   * namespace, with the new user namespace as their idmap: what is owned by uid k on disk belongs to
   * uid k inside it. Needs userNamespace, and a file system with idmapped mounts (ext4, xfs, btrfs, tmpfs).
   */
  idmapped?: string[];
  /* A new network namespace with loopback up, owned by the host's user namespace. */
  networkNamespace?: boolean;
  /* The agent at fd AGENT_FD (the spawner must have been given its path). */
  agent?: boolean;
  /* Blobs the child gets as pipes at these fds (fd > 3), read to EOF by what it execs. */
  data?: Array<{ fd: number; bytes: Buffer }>;
}

/* Where the spawned process finds the index-th of SpawnOptions.idmapped (IDMAPPED_DIR in the spawner). */
export function idmappedPath(index: number): string {
  return `/tmp/.poseidon-idmapped/${index}`;
}

/* Where a spawned process finds the agent with `agent: true`. */
export const AGENT_FD = 3;
const Flag = { userNamespace: 1, networkNamespace: 2, agent: 4 } as const;

export interface SpawnExit {
  /* Exit code, or null if a signal ended the process. */
  code: number | null;
  signal: NodeJS.Signals | number | null;
  /* The first bytes the process wrote to stderr; the error message if it never ran. */
  stderr: string;
}

/* One process started by the spawner. */
export class SpawnedProcess {
  pid: number | undefined;
  #exit: SpawnExit | undefined;
  readonly exited: Promise<SpawnExit>;
  /* Its stdin and stdout, as one duplex socket; rejects if the process ended before connecting. */
  readonly connection: Promise<net.Socket>;
  #detached: Array<() => void> = [];
  #resolveExit!: (exit: SpawnExit) => void;
  #resolveConnection!: (socket: net.Socket) => void;
  #rejectConnection!: (error: Error) => void;

  constructor(
    readonly id: number,
    readonly key: string,
    private readonly client: SpawnerClient,
  ) {
    this.exited = new Promise((resolve) => {
      this.#resolveExit = resolve;
    });
    this.connection = new Promise((resolve, reject) => {
      this.#resolveConnection = resolve;
      this.#rejectConnection = reject;
    });
    this.connection.catch(() => undefined);
  }

  get exitStatus(): SpawnExit | undefined {
    return this.#exit;
  }

  /* SIGKILL; exited resolves once the spawner reaped the process. */
  kill(): void {
    if (this.#exit === undefined) this.client.kill(this.id);
  }

  /*
   * For a process that has become a mere waiter for its only child (bubblewrap once the sandbox
   * runs): the spawner adopts that child and ends the waiter. Resolves once `pid` names the
   * process now held (unchanged if there was not exactly one child); kill() and exited follow it.
   */
  detach(): Promise<void> {
    if (this.#exit !== undefined) return Promise.resolve();
    return new Promise((resolve) => {
      this.#detached.push(resolve);
      if (this.#detached.length === 1) this.client.detach(this.id);
    });
  }

  /** @internal */
  adopted(pid: number): void {
    this.pid = pid;
    for (const resolve of this.#detached.splice(0)) resolve();
  }

  /** @internal */
  connected(socket: net.Socket): void {
    this.#resolveConnection(socket);
  }

  /** @internal */
  ended(exit: SpawnExit): void {
    if (this.#exit !== undefined) return;
    this.#exit = exit;
    this.#resolveExit(exit);
    for (const resolve of this.#detached.splice(0)) resolve();
    this.#rejectConnection(new Error(`the process exited before connecting: ${describeExit(exit)}`));
  }
}

export function describeExit(exit: SpawnExit): string {
  return String(exit.signal ?? exit.code);
}

export class SpawnerClient {
  #child: ChildProcess | undefined;
  #server: net.Server | undefined;
  #directory: string | undefined;
  #socketPath = '';
  #parser = new FrameParser();
  #nextId = 1;
  #closed = false;
  readonly #processes = new Map<number, SpawnedProcess>();
  readonly #awaitingConnection = new Map<string, SpawnedProcess>();

  constructor(
    private readonly binary: string,
    private readonly onSpawnerDied: (message: string) => void = (message) => console.error(message),
    /* The sandbox agent, which the spawner keeps in memory for `agent: true` spawns. */
    private readonly agentBinary?: string,
  ) {}

  /* Starts a process: argv[0] must be an absolute path (there is no PATH lookup). */
  spawn(argv: string[], env: Record<string, string>, options: SpawnOptions = {}): SpawnedProcess {
    if (this.#closed) throw new Error('the sandbox spawner was closed');
    const child = this.#ensureStarted();
    const id = this.#nextId;
    this.#nextId = this.#nextId >= 0xffff_ffff ? 1 : this.#nextId + 1;
    const key = randomBytes(KEY_LEN);
    const spawned = new SpawnedProcess(id, key.toString('hex'), this);
    this.#processes.set(id, spawned);
    this.#awaitingConnection.set(spawned.key, spawned);
    const envList = Object.entries(env).map(([name, value]) => `${name}=${value}`);
    const flags = (options.userNamespace ? Flag.userNamespace : 0) | (options.networkNamespace ? Flag.networkNamespace : 0) | (options.agent ? Flag.agent : 0);
    const header = Buffer.alloc(12);
    header.writeUInt32LE(flags, 0);
    header.writeUInt32LE(options.userNamespace?.base ?? 0, 4);
    header.writeUInt32LE(options.userNamespace?.count ?? 0, 8);
    const data = options.data ?? [];
    const dataCount = Buffer.alloc(4);
    dataCount.writeUInt32LE(data.length);
    const dataParts = data.flatMap(({ fd, bytes }) => {
      const head = Buffer.alloc(8);
      head.writeUInt32LE(fd, 0);
      head.writeUInt32LE(bytes.length, 4);
      return [head, bytes];
    });
    const parts: Buffer[] = [
      key,
      header,
      stringList(options.cgroupProcsFiles ?? []),
      stringList(argv),
      stringList(envList),
      stringList(options.idmapped ?? []),
      dataCount,
      ...dataParts,
    ];
    child.stdin?.write(encodeFrame(Request.spawn, id, Buffer.concat(parts)));
    this.#updateRef();
    return spawned;
  }

  /** @internal */
  kill(id: number): void {
    if (this.#processes.has(id)) this.#child?.stdin?.write(encodeFrame(Request.kill, id));
  }

  /** @internal */
  detach(id: number): void {
    if (this.#processes.has(id)) this.#child?.stdin?.write(encodeFrame(Request.detach, id));
  }

  /* Ends the spawner, which kills every process it started, and removes the socket. */
  async close(): Promise<void> {
    this.#closed = true;
    const child = this.#child;
    if (child && child.exitCode === null && child.signalCode === null) {
      const exited = new Promise((resolve) => child.once('exit', resolve));
      child.ref();
      child.stdin?.end();
      await exited;
    }
    await new Promise<void>((resolve) => (this.#server ? this.#server.close(() => resolve()) : resolve()));
    this.#server = undefined;
    if (this.#directory) rmSync(this.#directory, { recursive: true, force: true });
    this.#directory = undefined;
  }

  #ensureStarted(): ChildProcess {
    if (!this.#server) {
      // mkdtemp makes the directory 0700: only the daemon's user can connect.
      this.#directory = mkdtempSync(path.join(os.tmpdir(), SOCKET_DIRECTORY_PREFIX));
      this.#socketPath = path.join(this.#directory, 'socket');
      this.#server = net.createServer((socket) => this.#onConnection(socket));
      this.#server.on('error', (error) => this.onSpawnerDied(`the sandbox spawner's socket failed: ${error.message}`));
      // Binding a unix socket is synchronous: connections are accepted before 'listening'.
      this.#server.listen(this.#socketPath);
      this.#server.unref();
    }
    if (this.#child) return this.#child;
    const child = spawn(this.binary, [this.#socketPath, ...(this.agentBinary ? [this.agentBinary] : [])], { stdio: ['pipe', 'pipe', 'inherit'], env: {} });
    this.#child = child;
    this.#parser = new FrameParser();
    child.stdout?.on('data', (chunk: Buffer) => this.#onData(chunk));
    child.stdin?.on('error', () => undefined);
    child.once('error', (error) => this.#onSpawnerExit(child, `cannot start the sandbox spawner: ${error.message}`));
    child.once('exit', (code, signal) => this.#onSpawnerExit(child, `the sandbox spawner exited (${signal ?? code})`));
    // The daemon's own servers keep it alive; an idle spawner must not (see #updateRef).
    child.unref();
    (child.stdin as net.Socket | null)?.unref();
    (child.stdout as net.Socket | null)?.unref();
    return child;
  }

  #onConnection(socket: net.Socket): void {
    let received = Buffer.alloc(0);
    const fail = (): void => {
      socket.destroy();
    };
    socket.on('error', fail);
    const onData = (chunk: Buffer): void => {
      received = Buffer.concat([received, chunk]);
      if (received.length < KEY_LEN) return;
      socket.off('data', onData);
      socket.off('error', fail);
      socket.pause();
      const spawned = this.#awaitingConnection.get(received.subarray(0, KEY_LEN).toString('hex'));
      if (!spawned) {
        socket.destroy();
        return;
      }
      this.#awaitingConnection.delete(spawned.key);
      if (received.length > KEY_LEN) socket.unshift(received.subarray(KEY_LEN));
      spawned.connected(socket);
    };
    socket.on('data', onData);
  }

  #onData(chunk: Buffer): void {
    let frames: Frame[];
    try {
      frames = this.#parser.push(chunk);
    } catch (error) {
      this.onSpawnerDied(`the sandbox spawner sent garbage: ${(error as Error).message}`);
      this.#child?.kill('SIGKILL');
      return;
    }
    for (const frame of frames) {
      const spawned = this.#processes.get(frame.id);
      if (!spawned) continue;
      if (frame.type === Event.started) {
        spawned.pid = frame.payload.readInt32LE(0);
      } else if (frame.type === Event.detached) {
        spawned.adopted(frame.payload.readInt32LE(0));
      } else if (frame.type === Event.failed) {
        this.#ended(spawned, { code: null, signal: null, stderr: frame.payload.toString('utf8') });
      } else if (frame.type === Event.exited) {
        const status = frame.payload.readInt32LE(0);
        const stderr = frame.payload.subarray(4).toString('utf8');
        const signal = status & 0x7f;
        this.#ended(spawned, signal === 0 ? { code: (status >> 8) & 0xff, signal: null, stderr } : { code: null, signal: signalName(signal), stderr });
      }
    }
  }

  #ended(spawned: SpawnedProcess, exit: SpawnExit): void {
    this.#processes.delete(spawned.id);
    if (this.#awaitingConnection.has(spawned.key)) {
      // A process that connected and exited at once: its connection may still wait to be accepted.
      setTimeout(() => {
        this.#awaitingConnection.delete(spawned.key);
        spawned.ended(exit);
        this.#updateRef();
      }, CONNECTION_GRACE_MS);
      return;
    }
    spawned.ended(exit);
    this.#updateRef();
  }

  /* Processes waiting to be started or reaped keep the daemon alive; an idle spawner does not. */
  #updateRef(): void {
    const child = this.#child;
    const stdout = child?.stdout as net.Socket | null | undefined;
    if (this.#processes.size > 0 || this.#awaitingConnection.size > 0) {
      child?.ref();
      stdout?.ref();
    } else {
      child?.unref();
      stdout?.unref();
    }
  }

  /* Its children died with it (PR_SET_PDEATHSIG): all of them end now; the next spawn starts a new one. */
  #onSpawnerExit(child: ChildProcess, message: string): void {
    if (this.#child !== child) return;
    this.#child = undefined;
    if (!this.#closed) this.onSpawnerDied(`${message}: all its sandboxes are gone`);
    for (const spawned of [...this.#processes.values()]) this.#ended(spawned, { code: null, signal: 'SIGKILL', stderr: message });
  }
}

function stringList(list: string[]): Buffer {
  const parts: Buffer[] = [];
  const count = Buffer.alloc(4);
  count.writeUInt32LE(list.length);
  parts.push(count);
  for (const item of list) {
    const bytes = Buffer.from(item, 'utf8');
    const length = Buffer.alloc(4);
    length.writeUInt32LE(bytes.length);
    parts.push(length, bytes);
  }
  return Buffer.concat(parts);
}

function signalName(signal: number): NodeJS.Signals | number {
  const entry = Object.entries(os.constants.signals).find(([, number]) => number === signal);
  return entry ? (entry[0] as NodeJS.Signals) : signal;
}
