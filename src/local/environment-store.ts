import { mkdir, readFile, rename, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { z } from 'zod';
import { type ExecutionEnvironmentSpec, executionEnvironmentSchema } from '../dto/environment.js';

const storedEnvironmentsSchema = z.array(executionEnvironmentSchema);

/* Environments on disk as one JSON file, replaced atomically so a crash never leaves half of it. */
export class EnvironmentStore {
  readonly #file: string;
  readonly #environments = new Map<number, ExecutionEnvironmentSpec>();
  #writing: Promise<void> = Promise.resolve();

  constructor(directory: string) {
    this.#file = path.join(directory, 'environments.json');
  }

  async load(): Promise<ExecutionEnvironmentSpec[]> {
    let text: string;
    try {
      text = await readFile(this.#file, 'utf8');
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === 'ENOENT') return [];
      throw error;
    }
    const parsed = storedEnvironmentsSchema.safeParse(JSON.parse(text));
    if (!parsed.success) throw new Error(`${this.#file} is not a valid environment list: ${parsed.error.message}`);
    for (const spec of parsed.data) this.#environments.set(spec.id, spec);
    return parsed.data;
  }

  put(spec: ExecutionEnvironmentSpec): Promise<void> {
    this.#environments.set(spec.id, spec);
    return this.#persist();
  }

  delete(environmentId: number): Promise<void> {
    this.#environments.delete(environmentId);
    return this.#persist();
  }

  /* Writes are serialised so that the last change always wins on disk. */
  #persist(): Promise<void> {
    const snapshot = JSON.stringify([...this.#environments.values()], null, 2);
    this.#writing = this.#writing.catch(() => undefined).then(async () => {
      await mkdir(path.dirname(this.#file), { recursive: true });
      const temporary = `${this.#file}.${process.pid}.tmp`;
      await writeFile(temporary, snapshot, { mode: 0o600 });
      await rename(temporary, this.#file);
    });
    return this.#writing;
  }
}
