import { randomUUID } from 'node:crypto';
import { PassThrough } from 'node:stream';
import { setTimeout as sleep } from 'node:timers/promises';
import type { Logger } from 'pino';
import type { ContextLogger } from '../monitoring/logger.js';
import type { ExecutionRequest, FileHeader, FileUpdate, MappedPort } from '../dto/runner.js';
import { BackendError, FileNotAvailableError, RunnerNotFoundError, WorkspaceUpdateError } from '../runner/errors.js';
import { InactivityTrackingRunner, type ManagedRunner } from '../runner/managed-runner.js';
import type { ExecutionOutput, ExecutionProcess, ExecutionResult, FileContent, ListFilesOptions } from '../runner/runner.js';
import { parseFindOutput, WORKSPACE } from '../runner/workspace-files.js';
import type { PortMapping } from './client/api-types.js';
import type { StdinSource } from './client/exec.js';
import { NomadExecError } from './client/errors.js';
import type { ExecutorApi } from './client/executor-api.js';
import { domainErrorOf, isAllocationUnknown } from './failures.js';
import { defaultTaskName } from './job-template.js';
import { buildArchive, listCommand, readCommand, splitAnnounced, updateCommand } from './workspace-commands.js';

/*
 * Unprivileged commands run as the image's `user` through /sbin/setuser, Poseidon's convention for
 * openHPI's images. Images without setuser run them as the task's own user, so such images should
 * declare a non-root USER (documented in the README).
 */
const AS_USER = 'if [ "$1" = 0 ] && [ -x /sbin/setuser ]; then shift; exec /sbin/setuser user "$@"; fi; shift; exec "$@"';

/*
 * Wraps a learner's command. Records the wrapper's pid so that a kill can reach the process group
 * from a second exec (Nomad offers no signal for an exec session), removes Nomad's variables as
 * Poseidon does, and runs the command with the request's variables and CODEOCEAN=true. Its files
 * share one stem: <stem>.pid while it runs; <stem>.kill, a kill that came before the pid file; and
 * <stem>.exit, the status, for when Nomad's session ends without its exit frame (nomad#9892, #14595).
 * $5 names the exit files of earlier executions whose status arrived, removed here at no extra exec.
 */
const EXECUTE_SCRIPT = [
  'stem=$1; privileged=$2; command=$3; fifo=$4; stale=$5; shift 5',
  'echo $$ > "$stem.pid"',
  '[ -z "$stale" ] || rm -f $stale',
  // Interactive stderr as in Poseidon: wait for the FIFO the stderr exec makes (for 5 s at most:
  // without it stderr stays on the terminal), then send stderr there instead of the terminal.
  'if [ -n "$fifo" ]; then i=0; until [ -e "$fifo" ] || [ $i -ge 500 ]; do sleep 0.01; i=$((i+1)); done; [ -e "$fifo" ] && exec 2> "$fifo"; fi',
  // A kill sets the mark before it reads the pid file, and we wrote the pid file before reading the
  // mark: either the kill finds our pid or we find its mark. Leaving closes the FIFO, so its cat ends.
  'if [ -e "$stem.kill" ]; then rm -f "$stem.kill" "$stem.pid"; exit 137; fi',
  'for variable in $(env | sed -n "s/^\\(NOMAD_[A-Za-z0-9_]*\\)=.*/\\1/p" 2>/dev/null); do unset "$variable"; done',
  'if [ "$privileged" = 0 ] && [ -x /sbin/setuser ]; then /sbin/setuser user env CODEOCEAN=true "$@" /bin/sh -c "$command"',
  'else env CODEOCEAN=true "$@" /bin/sh -c "$command"; fi',
  'status=$?; echo $status > "$stem.exit.new" && mv -f "$stem.exit.new" "$stem.exit"; rm -f "$stem.pid"; exit $status',
].join('\n');

/*
 * Kills what EXECUTE_SCRIPT started. Only a process that leads its own group is killed as a group:
 * otherwise the group may be the container's, and killing it would take the runner down. Without a
 * pid file yet, the mark stops the wrapper before it runs the command.
 */
const KILL_SCRIPT = [
  'stem=$1',
  '[ -e "$stem.exit" ] && exit 0',
  ': > "$stem.kill"',
  'pid=$(cat "$stem.pid" 2>/dev/null) || exit 0',
  'rm -f "$stem.pid" "$stem.kill"',
  'group=$(sed "s/.*) //" "/proc/$pid/stat" 2>/dev/null | cut -d" " -f3)',
  // dash's kill knows no `--`; `-9 -<pid>` addresses the group in every POSIX shell.
  'if [ "$group" = "$pid" ]; then kill -9 "-$pid" 2>/dev/null; else kill -9 "$pid" 2>/dev/null; fi',
  'exit 0',
].join('\n');

/*
 * Reads an execution's status from EXECUTE_SCRIPT's exit file once it is there, waiting while the
 * wrapper still runs (Nomad may end the session before the command ends). Exits 3 when the status
 * cannot be known: the wrapper died without writing it, or never started within 5 s.
 */
const RECOVER_EXIT_SCRIPT = [
  'stem=$1; waited=0',
  'while :; do',
  '  if [ -e "$stem.exit" ]; then cat "$stem.exit"; exit 0; fi',
  '  if pid=$(cat "$stem.pid" 2>/dev/null) && [ -n "$pid" ]; then',
  '    kill -0 "$pid" 2>/dev/null || [ -e "$stem.exit" ] || exit 3',
  '  else',
  '    waited=$((waited+1)); [ $waited -ge 50 ] && { [ -e "$stem.exit" ] && continue; exit 3; }',
  '  fi',
  '  sleep 0.1',
  'done',
].join('\n');

/*
 * The stderr half of interactive stderr, Poseidon's "mkfifo F && (cat F; rm F)": run as the learner
 * (so the learner's command may open the FIFO) in a second exec with a TTY, whose output is the
 * execution's stderr. cat ends when every writer closed the FIFO, i.e. with the execution.
 */
const STDERR_SCRIPT = 'mkfifo "$1" && { cat "$1"; rm -f "$1"; }';

/* How long the stderr exec may take to end after the execution did (a background writer may hold the FIFO). */
const STDERR_AFTER_EXIT_MS = 1_000;

/* Poseidon sends no size (0x0 in Docker); a sane one for programs that ask, the local backend's too. */
const TTY_SIZE = { height: 24, width: 80 };

/* Where the workspace goes when the image's working directory is the root (never empty `/` with ./*). */
const FALLBACK_WORKSPACE = WORKSPACE;

/* Read execs per download (the first and its resumptions) and runs of an idempotent helper exec. */
const DOWNLOAD_ATTEMPTS = 4;
const HELPER_EXEC_ATTEMPTS = 3;

/* Docker reports some OOM kills as 128; the allocation's OOM event may follow the exit that closely. */
const OOM_CONFIRMATION_MS = 1_000;

export interface NomadRunnerOptions {
  readonly id: string;
  readonly environmentId: number;
  readonly allocationId: string;
  readonly ports: readonly PortMapping[];
  readonly restarts: number;
}

/* A pushable async iterable: the WebSocket's stdin frames, fed into an exec session. */
class StdinQueue implements AsyncIterable<Buffer> {
  readonly #chunks: Buffer[] = [];
  #ended = false;
  #wake: (() => void) | undefined;

  push(chunk: Buffer): void {
    if (this.#ended) return;
    this.#chunks.push(chunk);
    this.#wake?.();
  }

  end(): void {
    this.#ended = true;
    this.#wake?.();
  }

  async *[Symbol.asyncIterator](): AsyncIterator<Buffer> {
    for (;;) {
      const next = this.#chunks.shift();
      if (next !== undefined) {
        yield next;
        continue;
      }
      if (this.#ended) return;
      await new Promise<void>((resolve) => (this.#wake = resolve));
      this.#wake = undefined;
    }
  }
}

/* A runner is one Nomad job with one allocation; everything runs through allocation exec. */
export class NomadRunner extends InactivityTrackingRunner implements ManagedRunner {
  readonly id: string;
  readonly environmentId: number;
  readonly allocationId: string;
  /* Task restarts seen when the runner was adopted; a higher count means the container restarted. */
  readonly restarts: number;
  #destroyed = false;
  #oomKilled = false;
  #workspace: Promise<string> | undefined;
  /* Meta writes and the final purge are serialised, so a late meta write never re-creates a purged job. */
  #jobOperations: Promise<void> = Promise.resolve();
  readonly #executions = new Set<AbortController>();
  /* Exit files of executions whose status arrived in the exit frame; the next execution removes them. */
  readonly #staleExitFiles: string[] = [];
  readonly #ports: MappedPort[];
  readonly #parentLogger: Logger;
  #childLogger: Logger | undefined;

  constructor(
    options: NomadRunnerOptions,
    private readonly api: ExecutorApi,
    logger: Logger,
    private readonly onGone: (runner: NomadRunner, reason: string) => void,
    /* server.interactivestderr: stderr through a FIFO and a second exec (true), or on the terminal. */
    private readonly interactiveStderr = true,
  ) {
    super();
    this.id = options.id;
    this.environmentId = options.environmentId;
    this.allocationId = options.allocationId;
    this.restarts = options.restarts;
    this.#ports = options.ports.map((port) => ({ exposedPort: port.To || Number(port.Label), hostAddress: `${port.HostIP}:${port.Value}` }));
    this.#parentLogger = logger;
  }

  /* Made on first use: most idle runners never log, and a child logger per runner adds up at 10,000. */
  get #logger(): Logger {
    this.#childLogger ??= this.#parentLogger.child({ runnerId: this.id, environmentId: this.environmentId, allocationId: this.allocationId });
    return this.#childLogger;
  }

  get destroyed(): boolean {
    return this.#destroyed;
  }

  mappedPorts(): MappedPort[] {
    return this.#ports;
  }

  /* The allocation was OOM-killed; an execution ending with 128 then reports 137. */
  markOomKilled(): void {
    this.#oomKilled = true;
  }

  /*
   * Queues a Nomad job operation after the earlier ones. Used for the "used" meta write after a
   * claim: it is off the claim's path, retried with backoff, and only logged when it fails.
   */
  enqueueJobWrite(what: string, write: () => Promise<void>, attempts = 5): void {
    this.#jobOperations = this.#jobOperations.then(async () => {
      for (let attempt = 1; attempt <= attempts; attempt += 1) {
        if (this.#destroyed) return;
        try {
          await write();
          this.#logger.debug({ what }, 'runner job updated');
          return;
        } catch (error) {
          const level = attempt === attempts ? 'error' : 'warn';
          this.#logger[level]({ err: error, what, attempt }, 'updating the runner job in Nomad failed');
          if (attempt < attempts) await sleep(Math.min(5_000, 200 * 2 ** attempt), undefined, { ref: false });
        }
      }
    });
  }

  async execute(request: ExecutionRequest, output: ExecutionOutput): Promise<ExecutionProcess> {
    this.#assertAlive();
    const stem = `/tmp/.poseidon-${randomUUID()}`;
    const environment = Object.entries(request.environment).map(([key, value]) => `${key}=${value}`);
    const fifo = this.interactiveStderr ? `/tmp/stderr_${randomUUID()}.fifo` : '';
    const stale = this.#staleExitFiles.splice(0).join(' ');
    const argv = ['/bin/sh', '-c', EXECUTE_SCRIPT, 'execute', stem, request.privilegedExecution ? '1' : '0', request.command, fifo, stale, ...environment];
    const stdin = new StdinQueue();
    const abort = new AbortController();
    this.#executions.add(abort);
    let killed = false;
    // Started first, as in Poseidon: the execution waits for its FIFO. Its terminal's output is our stderr.
    const stderrAbort = new AbortController();
    this.#executions.add(stderrAbort);
    const stderrSession =
      fifo === ''
        ? Promise.resolve(0)
        : this.api
            .exec(this.allocationId, defaultTaskName, asUser(['/bin/sh', '-c', STDERR_SCRIPT, 'stderr', fifo], request.privilegedExecution), {
              tty: true,
              onStdout: (chunk) => output.onStderr(chunk),
              signal: stderrAbort.signal,
            })
            .catch((error: unknown) => {
              if (!stderrAbort.signal.aborted) this.#logger.warn({ err: error }, 'the stderr exec of an execution failed');
              return 0;
            });
    // Every execution has a terminal, as in Poseidon (Nomad exec with tty=true): with it, stderr
    // not split off comes as stdout too.
    const session = this.api.exec(this.allocationId, defaultTaskName, argv, {
      stdin,
      tty: true,
      ttySize: TTY_SIZE,
      onStdout: (chunk) => output.onStdout(chunk),
      onStderr: (chunk) => output.onStderr(chunk),
      signal: abort.signal,
    });
    /* Poseidon waits for the stderr exec before it reports the exit, so no stderr comes after it. */
    const stderrDone = async (): Promise<void> => {
      const timer = setTimeout(() => stderrAbort.abort(new Error('stderr exec outlived its execution')), STDERR_AFTER_EXIT_MS);
      await stderrSession;
      clearTimeout(timer);
    };
    const result = (async (): Promise<ExecutionResult> => {
      try {
        const exitCode = await session
          .then(
            (code) => {
              this.#staleExitFiles.push(`${stem}.exit`);
              return code;
            },
            (error: unknown) => (killed || !isExitUnknown(error) ? Promise.reject(error) : this.#recoverExitCode(stem, error, abort.signal)),
          )
          .finally(stderrDone);
        if (exitCode === 137 || (exitCode === 128 && (await this.#confirmOom()))) return this.#oomKilled ? { kind: 'oomKilled' } : { kind: 'exited', exitCode };
        return { kind: 'exited', exitCode: exitCode & 0xff };
      } catch (error) {
        if (killed) return { kind: 'exited', exitCode: 137 };
        if (this.#oomKilled) return { kind: 'oomKilled' };
        return { kind: 'failed', message: this.#describeExecFailure(error) };
      } finally {
        stdin.end();
        this.#executions.delete(abort);
        this.#executions.delete(stderrAbort);
      }
    })();
    return {
      writeStdin: (data) => stdin.push(Buffer.from(data)),
      kill: () => {
        if (killed) return;
        killed = true;
        abort.abort(new Error('execution killed'));
        stderrAbort.abort(new Error('execution killed'));
        void this.#exec(['/bin/sh', '-c', KILL_SCRIPT, 'kill', stem]).catch((error: unknown) => {
          this.#logger.warn({ err: error }, 'killing the execution in the allocation failed');
        });
      },
      // Nomad's exec protocol has no flow control; output is forwarded as it arrives.
      pauseOutput: () => undefined,
      resumeOutput: () => undefined,
      result,
    };
  }

  async updateFileSystem(update: FileUpdate): Promise<void> {
    const workspace = await this.#workspaceDirectory();
    const archive = update.copy.length > 0 ? await buildArchive(update.copy, workspace) : undefined;
    const result = await this.#exec(updateCommand(update, archive !== undefined, workspace), { stdin: archive });
    if (result.exitCode !== 0) throw new WorkspaceUpdateError(`updating files failed: ${result.stderr.trim() || `exit ${result.exitCode}`}`);
  }

  async listFileSystem(options: ListFilesOptions): Promise<FileHeader[]> {
    const { start, argv } = listCommand(options.path, options.recursive);
    const result = await this.#exec(asUser(argv, options.privilegedExecution), { complete: listingComplete });
    const listing = splitAnnounced(result.stdout);
    const status = listing?.status ?? result.exitCode;
    const entries = parseFindOutput(listing?.body ?? Buffer.alloc(0)).filter(
      (entry, index) => !(index === 0 && entry.name === start && entry.entryType === 'd'),
    );
    if (status !== 0 && entries.length === 0) {
      throw new FileNotAvailableError(`cannot list ${options.path}: ${result.stderr.trim() || `exit ${status ?? 'unknown'}`}`);
    }
    return entries;
  }

  /*
   * Streams a file after its announced size. When Nomad loses the tail of the output (nomad#27146)
   * or drops the session, the rest is read from where it stopped, a few times; a download that
   * still falls short ends with an error, which cuts the response short of its Content-Length.
   */
  async getFileContent(requestedPath: string, privilegedExecution: boolean): Promise<FileContent> {
    this.#assertAlive();
    const abort = new AbortController();
    const stream = new PassThrough();
    stream.on('close', () => abort.abort(new Error('download ended')));
    let written = 0;
    let size: number | undefined;
    // The first read's header fixes the size, before any of its body is written.
    const learnSize = (announced: number): void => {
      size ??= announced;
    };
    // Bytes past the announced size (a file growing while read) would break the Content-Length.
    const write = (chunk: Buffer): void => {
      const room = (size ?? 0) - written;
      if (room <= 0 || stream.destroyed) return;
      const part = chunk.length > room ? chunk.subarray(0, room) : chunk;
      written += part.length;
      stream.write(part);
    };
    let read = this.#readFile(requestedPath, privilegedExecution, 0, learnSize, write, abort.signal);
    const announced = await read.size;
    if (announced === undefined) {
      abort.abort(new Error('no file'));
      const failure = await read.session.then(
        () => undefined,
        (error: unknown) => error,
      );
      if (failure !== undefined && !(failure instanceof Error && failure.message === 'no file')) throw this.#domainError(failure);
      throw new FileNotAvailableError(`cannot read ${requestedPath}: ${read.stderr().trim() || 'no such file'}`);
    }
    const total = announced;
    void (async () => {
      for (let attempt = 1; ; attempt += 1) {
        const failure = await read.session.then(
          () => undefined,
          (error: unknown) => error,
        );
        if (stream.destroyed) return;
        if (written >= total) {
          stream.end();
          return;
        }
        const shortfall = `${requestedPath}: ${written} of ${total} bytes arrived${failure instanceof Error ? ` (${failure.message})` : ''}`;
        if (attempt >= DOWNLOAD_ATTEMPTS || isAllocationUnknown(failure)) {
          this.#logger.error({ path: requestedPath, written, size: total }, 'download incomplete; giving up');
          stream.destroy(new Error(`download incomplete: ${shortfall}`));
          return;
        }
        this.#logger.warn({ path: requestedPath, written, size: total, attempt }, 'download incomplete; reading the rest');
        // A file that changed size meanwhile must not be stitched together: its rest is not written.
        let changed = false;
        read = this.#readFile(
          requestedPath,
          privilegedExecution,
          written,
          (resumed) => (changed = resumed !== total),
          (chunk) => {
            if (!changed) write(chunk);
          },
          abort.signal,
        );
        const resumed = await read.size;
        if (resumed !== total && !stream.destroyed) {
          stream.destroy(new Error(`download incomplete: ${requestedPath} changed while read (${total} then ${resumed ?? 'unreadable'} bytes)`));
          return;
        }
      }
    })();
    return { size: total, stream };
  }

  /* One read exec from `offset`: its announced size (undefined for no header), then body bytes to `write`. */
  #readFile(
    requestedPath: string,
    privilegedExecution: boolean,
    offset: number,
    onSize: (size: number) => void,
    write: (chunk: Buffer) => void,
    signal: AbortSignal,
  ): { size: Promise<number | undefined>; session: Promise<number>; stderr: () => string } {
    let head: Buffer | undefined = Buffer.alloc(0);
    let stderr = '';
    let resolveSize: (size: number | undefined) => void = () => undefined;
    const size = new Promise<number | undefined>((resolve) => (resolveSize = resolve));
    const onStdout = (chunk: Buffer): void => {
      if (head === undefined) {
        write(chunk);
        return;
      }
      head = Buffer.concat([head, chunk]);
      const announced = splitAnnounced(head);
      if (announced === undefined) return;
      head = undefined;
      onSize(announced.size);
      resolveSize(announced.size);
      if (announced.body.length > 0) write(announced.body);
    };
    const session = this.api.exec(this.allocationId, defaultTaskName, asUser(readCommand(requestedPath, offset), privilegedExecution), {
      onStdout,
      onStderr: (chunk) => (stderr += chunk.toString('utf8')),
      signal,
    });
    void session.then(
      () => resolveSize(undefined),
      () => resolveSize(undefined),
    );
    return { size, session, stderr: () => stderr };
  }

  /* Removes the runner for good: running executions end and its job is purged. */
  async destroy(reason: string, log?: ContextLogger): Promise<void> {
    if (this.#destroyed) return;
    this.#destroyed = true;
    this.stopInactivityTimer();
    for (const execution of this.#executions) execution.abort(new Error(`runner destroyed: ${reason}`));
    await this.purge(reason);
    // On a client's request the line carries its request id.
    (log?.child({ runnerId: this.id, environmentId: this.environmentId }) ?? this.#logger).info({ reason }, 'runner destroyed');
  }

  /*
   * The allocation is gone or broken (failed, lost, rescheduled, restarted): the runner answers 410
   * from now on. Running executions are not aborted, so that e.g. an OOM kill still reports its exit.
   */
  markLost(reason: string): void {
    if (this.#destroyed) return;
    this.#destroyed = true;
    this.stopInactivityTimer();
    this.#logger.warn({ reason }, 'runner lost');
    void this.purge(reason);
  }

  /* Purges the job after pending meta writes; a failed purge is retried in the background. */
  purge(reason: string): Promise<void> {
    const purge = this.#jobOperations.then(async () => {
      for (let attempt = 1; attempt <= 6; attempt += 1) {
        try {
          await this.api.deregisterJob(this.id, { purge: true });
          return;
        } catch (error) {
          this.#logger.warn({ err: error, attempt, reason }, 'purging the runner job failed');
          await sleep(Math.min(10_000, 250 * 2 ** attempt), undefined, { ref: false });
        }
      }
      this.#logger.error({ reason }, 'giving up purging the runner job; the next resync removes it');
    });
    this.#jobOperations = purge;
    // The caller (a DELETE request) waits only for the first attempt's worth of time.
    return Promise.race([purge, sleep(3_000, undefined, { ref: false })]).then(() => undefined);
  }

  #assertAlive(): void {
    if (this.#destroyed) throw new RunnerNotFoundError(this.id);
  }

  async #confirmOom(): Promise<boolean> {
    const deadline = Date.now() + OOM_CONFIRMATION_MS;
    while (!this.#oomKilled && Date.now() < deadline) await sleep(50);
    return this.#oomKilled;
  }

  /* The image's working directory is the workspace, as in Poseidon; learned once per runner. */
  #workspaceDirectory(): Promise<string> {
    this.#workspace ??= this.#exec([
      '/bin/sh',
      '-c',
      `d=$(pwd); if [ "$d" = / ]; then mkdir -p ${FALLBACK_WORKSPACE} && d=${FALLBACK_WORKSPACE}; fi; echo "$d"`,
    ]).then((result) => {
      const directory = result.stdout.toString('utf8').trim();
      if (result.exitCode !== 0 || !directory.startsWith('/'))
        throw new BackendError(`cannot find the workspace of runner ${this.id}: ${result.stderr.trim()}`);
      return directory;
    });
    this.#workspace.catch(() => (this.#workspace = undefined));
    return this.#workspace;
  }

  /*
   * Runs a helper command to completion, collecting its output; Nomad failures become API errors.
   * Helpers are idempotent, so a session that ended without its exit frame, or whose output
   * `complete` finds cut short, is run again; with `complete` the exit code may stay unknown.
   */
  async #exec(
    argv: string[],
    options: { stdin?: Buffer; complete?: (stdout: Buffer, exitCode: number | undefined) => boolean; signal?: AbortSignal } = {},
  ): Promise<{ exitCode: number | undefined; stdout: Buffer; stderr: string }> {
    for (let attempt = 1; ; attempt += 1) {
      this.#assertAlive();
      const stdout: Buffer[] = [];
      let stderr = '';
      const stdin: StdinSource | undefined = options.stdin === undefined ? undefined : once(options.stdin);
      let exitCode: number | undefined;
      let failure: unknown;
      try {
        exitCode = await this.api.exec(this.allocationId, defaultTaskName, argv, {
          ...(stdin === undefined ? {} : { stdin }),
          ...(options.signal === undefined ? {} : { signal: options.signal }),
          onStdout: (chunk) => stdout.push(chunk),
          onStderr: (chunk) => (stderr += chunk.toString('utf8')),
        });
      } catch (error) {
        if (!isExitUnknown(error)) throw this.#domainError(error);
        failure = error;
      }
      const output = { exitCode, stdout: Buffer.concat(stdout), stderr };
      const complete = options.complete?.(output.stdout, exitCode);
      if (complete === true || (complete === undefined && failure === undefined)) return output;
      if (attempt >= HELPER_EXEC_ATTEMPTS) {
        throw this.#domainError(
          failure ?? new NomadExecError('NOMAD_INTERNAL_SERVER_ERROR', `Nomad delivered less output than announced, ${attempt} times`, { exitUnknown: true }),
        );
      }
      this.#logger.warn({ err: failure, attempt, command: argv[3] ?? argv[0] }, 'helper exec ended without its exit code or full output; running it again');
    }
  }

  /* The session of an execution ended without an exit frame: its status comes from the wrapper's exit file. */
  async #recoverExitCode(stem: string, lost: unknown, signal: AbortSignal): Promise<number> {
    // Its output is the whole answer, so a recovery whose own exit frame is lost needs no second run.
    const recovered = await this.#exec(['/bin/sh', '-c', RECOVER_EXIT_SCRIPT, 'recover', stem], {
      signal,
      complete: (stdout, exitCode) => exitCode !== undefined || /^\d+\n$/.test(stdout.toString('utf8')),
    });
    const exitCode = Number(recovered.stdout.toString('utf8').trim());
    if ((recovered.exitCode ?? 0) !== 0 || recovered.stdout.length === 0 || !Number.isInteger(exitCode)) {
      throw lost;
    }
    this.#staleExitFiles.push(`${stem}.exit`);
    this.#logger.warn({ exitCode, cause: lost instanceof Error ? lost.message : String(lost) }, 'execution exit code recovered after Nomad lost it');
    return exitCode;
  }

  #domainError(error: unknown): Error {
    if (isAllocationUnknown(error)) this.onGone(this, 'allocation unknown to Nomad');
    return domainErrorOf(error, this.id);
  }

  #describeExecFailure(error: unknown): string {
    if (isAllocationUnknown(error)) {
      this.onGone(this, 'allocation unknown to Nomad');
      return 'the runner is gone';
    }
    return error instanceof Error ? error.message : String(error);
  }
}

/* A listing arrived whole, or its script failed before the header (e.g. no mktemp): then stderr says why. */
function listingComplete(stdout: Buffer, exitCode: number | undefined): boolean {
  const listing = splitAnnounced(stdout);
  if (listing === undefined) return exitCode !== undefined && exitCode !== 0 && stdout.length === 0;
  return listing.body.length >= listing.size;
}

function isExitUnknown(error: unknown): error is NomadExecError {
  return error instanceof NomadExecError && error.exitUnknown;
}

function asUser(argv: string[], privileged: boolean): string[] {
  return ['/bin/sh', '-c', AS_USER, 'as-user', privileged ? '1' : '0', ...argv];
}

async function* once(data: Buffer): AsyncGenerator<Buffer> {
  yield data;
}
