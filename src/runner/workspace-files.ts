import type { FileEntryType, FileHeader } from '../dto/runner.js';
import { fileEntryTypes } from '../dto/runner.js';

/*
 * The workspace every backend shares: where it lies in a sandbox, and the listing format both the
 * sandbox agent and `find -printf` in a Nomad task print (NUL-separated fields, FIND_FORMAT).
 */

export const WORKSPACE = '/workspace';

/* type, size, mtime, mode, owner, group, path, link target: each field ended by a NUL. */
export const FIND_FORMAT = '%y\\0%s\\0%T@\\0%M\\0%u\\0%g\\0%p\\0%l\\0';
const FIND_FIELDS = 8;

const FIND_TYPES: Record<string, FileEntryType> = { f: '-', d: 'd', l: 'l', p: 'p', s: 's', c: 'c', b: 'b', D: 'D' };

export function parseFindOutput(output: Buffer): FileHeader[] {
  const parser = new FindOutputParser();
  const entries: FileHeader[] = [];
  parser.push(output, (entry) => entries.push(entry));
  return entries;
}

/*
 * find -printf output parsed as it arrives, in chunks that may split an entry or a field (even a
 * UTF-8 character): only the unfinished field and entry are held, never the whole listing.
 */
export class FindOutputParser {
  #partial: Buffer[] = [];
  #fields: string[] = [];

  push(chunk: Buffer, onEntry: (entry: FileHeader) => void): void {
    let start = 0;
    for (;;) {
      const end = chunk.indexOf(0, start);
      if (end < 0) {
        // A copy: holding a view would keep the whole chunk alive for a few bytes of it.
        if (start < chunk.length) this.#partial.push(Buffer.from(chunk.subarray(start)));
        return;
      }
      const piece = chunk.subarray(start, end);
      this.#fields.push((this.#partial.length > 0 ? Buffer.concat([...this.#partial, piece]) : piece).toString('utf8'));
      this.#partial = [];
      if (this.#fields.length === FIND_FIELDS) {
        onEntry(entryOf(this.#fields));
        this.#fields = [];
      }
      start = end + 1;
    }
  }

  /* True while an entry is unfinished: the output ended in its middle. */
  get pending(): boolean {
    return this.#partial.length > 0 || this.#fields.length > 0;
  }
}

function entryOf(fields: string[]): FileHeader {
  const [type = '?', size, time, mode = '', owner = '', group = '', name = '', linkTarget = ''] = fields;
  const entryType = FIND_TYPES[type] ?? (fileEntryTypes.includes(type as FileEntryType) ? (type as FileEntryType) : '?');
  return {
    name,
    entryType,
    ...(entryType === 'l' ? { linkTarget } : {}),
    size: Number(size) || 0,
    modificationTime: Math.floor(Number(time) || 0),
    permissions: mode.slice(1),
    owner,
    group,
  };
}
