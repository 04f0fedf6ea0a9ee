import { randomBytes } from 'node:crypto';
import { mkdir, open, readFile, rename, rm } from 'node:fs/promises';
import path from 'node:path';
import { z } from 'zod';
import { type ExecutionEnvironmentSpec, executionEnvironmentSchema } from '../dto/environment.js';
import { DomainError } from '../runner/errors.js';
import { syncDirectory, writeSyncedFile } from './synced-file.js';

const storedEnvironmentsSchema = z.array(executionEnvironmentSchema);

/* A change that could not be written: nothing changed, and the client may retry. */
export class StateNotWrittenError extends DomainError {
  constructor(cause: unknown) {
    const code = (cause as NodeJS.ErrnoException).code ?? (cause as Error).message;
    super('backend-error', `poseidon-ts cannot write its state directory (${code}): nothing was changed; retry once it is fixed (see the daemon's log)`, {
      cause,
    });
  }
}

type Load = { kind: 'ok'; specs: ExecutionEnvironmentSpec[] } | { kind: 'missing' } | { kind: 'unreadable'; reason: string };

/*
 * Environments on disk as one JSON file. A change is on disk (written, fsynced, renamed, directory
 * fsynced) before it is in memory, so a failed write changes nothing and nothing unwritten is ever
 * carried into a later write. The file before the last change is kept as `.previous`: if a crash
 * or a full disk left the current one empty or cut short, the start falls back to it.
 */
export class EnvironmentStore {
  readonly #directory: string;
  readonly #file: string;
  readonly #previous: string;
  readonly #environments = new Map<number, ExecutionEnvironmentSpec>();
  #writing: Promise<void> = Promise.resolve();
  /* Set by load when it fell back to the previous generation; the caller logs it. */
  recovered: string | undefined;

  constructor(directory: string) {
    this.#directory = directory;
    this.#file = path.join(directory, 'environments.json');
    this.#previous = `${this.#file}.previous`;
  }

  /* Refuses to start on a state directory that cannot take a change (better now than at the first PUT). */
  async checkWritable(): Promise<void> {
    const probe = path.join(this.#directory, `.write-probe-${process.pid}-${randomBytes(4).toString('hex')}`);
    try {
      await mkdir(this.#directory, { recursive: true });
      const handle = await open(probe, 'w', 0o600);
      try {
        await handle.writeFile('probe');
        await handle.sync();
      } finally {
        await handle.close();
      }
      await rm(probe, { force: true });
    } catch (error) {
      throw new Error(
        `local.statedir ${this.#directory} is not writable (${(error as NodeJS.ErrnoException).code ?? (error as Error).message}): environments could not be stored; make it writable by the daemon's user or point local.statedir elsewhere`,
      );
    }
  }

  async load(): Promise<ExecutionEnvironmentSpec[]> {
    const current = await this.#read(this.#file);
    let specs: ExecutionEnvironmentSpec[];
    if (current.kind === 'ok') {
      specs = current.specs;
    } else {
      // The current file is missing or damaged: a crash between two renames, or while writing.
      const previous = await this.#read(this.#previous);
      if (previous.kind === 'ok') {
        specs = previous.specs;
        this.recovered = `${this.#file} ${current.kind === 'missing' ? 'is missing' : `is damaged (${current.reason})`}: loaded the previous generation ${this.#previous}`;
      } else if (current.kind === 'missing') {
        specs = [];
      } else {
        throw new Error(`${this.#file} is damaged (${current.reason}) and there is no usable ${this.#previous}: repair or remove it`);
      }
    }
    const seen = new Set<number>();
    const duplicates = new Set<number>();
    for (const { id } of specs) (seen.has(id) ? duplicates : seen).add(id);
    if (duplicates.size > 0) {
      throw new Error(`${this.#file} holds execution environment(s) ${[...duplicates].join(', ')} more than once: remove the duplicate entries`);
    }
    for (const spec of specs) this.#environments.set(spec.id, spec);
    return specs;
  }

  async #read(file: string): Promise<Load> {
    let text: string;
    try {
      text = await readFile(file, 'utf8');
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === 'ENOENT') return { kind: 'missing' };
      throw error;
    }
    if (text.trim() === '') return { kind: 'unreadable', reason: 'empty' };
    let json: unknown;
    try {
      json = JSON.parse(text);
    } catch (error) {
      return { kind: 'unreadable', reason: `not JSON: ${(error as Error).message}` };
    }
    const parsed = storedEnvironmentsSchema.safeParse(json);
    if (!parsed.success) return { kind: 'unreadable', reason: `not a valid environment list: ${parsed.error.message}` };
    return { kind: 'ok', specs: parsed.data };
  }

  /* Resolves once the environment is on disk; rejects with StateNotWrittenError having changed nothing. */
  put(spec: ExecutionEnvironmentSpec): Promise<void> {
    return this.#change((environments) => environments.set(spec.id, spec));
  }

  delete(environmentId: number): Promise<void> {
    return this.#change((environments) => environments.delete(environmentId));
  }

  /* Changes are serialised: each is applied to what is on disk, written, and only then kept in memory. */
  #change(apply: (environments: Map<number, ExecutionEnvironmentSpec>) => void): Promise<void> {
    const run = async (): Promise<void> => {
      const next = new Map(this.#environments);
      apply(next);
      try {
        await this.#write(JSON.stringify([...next.values()], null, 2));
      } catch (error) {
        throw new StateNotWrittenError(error);
      }
      this.#environments.clear();
      for (const [id, spec] of next) this.#environments.set(id, spec);
    };
    const result = this.#writing.then(run, run);
    this.#writing = result.catch(() => undefined);
    return result;
  }

  async #write(content: string): Promise<void> {
    await mkdir(this.#directory, { recursive: true });
    const temporary = `${this.#file}.${process.pid}.tmp`;
    try {
      await writeSyncedFile(temporary, content, 0o600);
      // Keep the generation before this change; a crash between the renames leaves only it, which load takes.
      await rename(this.#file, this.#previous).catch((error: NodeJS.ErrnoException) => {
        if (error.code !== 'ENOENT') throw error;
      });
      await rename(temporary, this.#file);
    } catch (error) {
      await rm(temporary, { force: true }).catch(() => undefined);
      throw error;
    }
    await syncDirectory(this.#directory);
  }
}
