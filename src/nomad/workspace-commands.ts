import path from 'node:path';
import tar from 'tar-stream';
import type { FileUpdate } from '../dto/runner.js';
import { BadRequestError } from '../runner/errors.js';
import { FIND_FORMAT, WORKSPACE } from '../runner/workspace-files.js';

/*
 * How the Nomad backend manages a task's workspace with standard tools (sh, rm, tar, find, cat),
 * all run through Nomad's exec; the local backend asks its sandbox agent instead.
 */

const DIRECTORY_MODE = 0o1777;
const FILE_MODE = 0o744;

/*
 * Deletes first, then extracts the tar on stdin at the root. Positional arguments carry the
 * paths, so no path is ever parsed by the shell. The workspace is an argument because a Nomad
 * task's workspace is its image's working directory, not a fixed path.
 */
const UPDATE_SCRIPT = [
  'set -e',
  'glob=$1; literal=$2; extract=$3; cd "$4"; shift 4',
  // The exact entry ./* is Poseidon's glob over the workspace, which spares dotfiles.
  'if [ "$glob" = 1 ]; then rm -rf -- ./*; fi',
  'while [ "$literal" -gt 0 ]; do rm -rf -- "$1"; shift; literal=$((literal-1)); done',
  'if [ "$extract" = 1 ]; then tar -x -p --same-owner -f - -C /; fi',
].join('\n');

/* Prints the size on the first line (for Content-Length), then the file. */
const READ_SCRIPT = '[ -f "$1" ] && [ -r "$1" ] || { echo "$1 is not a readable regular file" >&2; exit 1; }; stat -L -c %s -- "$1" && exec cat -- "$1"';

/* Resolves a request path the way Poseidon does: relative to the workspace, absolute as given. */
function workspacePath(requested: string, workspace: string = WORKSPACE): string {
  return path.posix.normalize(path.posix.isAbsolute(requested) ? requested : `${workspace}/${requested}`);
}

/* argv for UPDATE_SCRIPT: the glob flag, the literal deletes, and whether a tar follows on stdin. */
export function updateCommand(update: FileUpdate, withArchive: boolean, workspace: string = WORKSPACE): string[] {
  const literalDeletes = update.delete.filter((entry) => entry !== './*');
  return [
    '/bin/sh',
    '-c',
    UPDATE_SCRIPT,
    'update',
    update.delete.includes('./*') ? '1' : '0',
    String(literalDeletes.length),
    withArchive ? '1' : '0',
    workspace,
    ...literalDeletes,
  ];
}

/* find's argv for a listing (NUL-separated fields, see parseFindOutput); a leading '-' would read as an option. */
export function listCommand(requestedPath: string, recursive: boolean): { start: string; argv: string[] } {
  const start = requestedPath.startsWith('-') ? `./${requestedPath}` : requestedPath;
  return { start, argv: ['find', start, ...(recursive ? [] : ['-maxdepth', '1']), '-printf', FIND_FORMAT] };
}

export function readCommand(requestedPath: string): string[] {
  return ['/bin/sh', '-c', READ_SCRIPT, 'read', requestedPath];
}

export async function buildArchive(copies: FileUpdate['copy'], workspace: string = WORKSPACE): Promise<Buffer> {
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
    if (target === workspace || target === '/' || directories.has(target)) return;
    if (target.startsWith(`${workspace}/`)) addDirectory(path.posix.dirname(target));
    directories.add(target);
    pack.entry({ name: target.slice(1), type: 'directory', mode: DIRECTORY_MODE, uid: 0, gid: 0 });
  };
  for (const copy of copies) {
    const target = workspacePath(copy.path, workspace);
    if (target === '/') throw new BadRequestError(`cannot write to ${copy.path}`);
    if (copy.path.endsWith('/')) {
      addDirectory(target);
      continue;
    }
    if (target.startsWith(`${workspace}/`)) addDirectory(path.posix.dirname(target));
    const content = Buffer.from(copy.content ?? '', 'base64');
    pack.entry({ name: target.slice(1), type: 'file', mode: FILE_MODE, uid: 0, gid: 0, size: content.length }, content);
  }
  pack.finalize();
  await done;
  return Buffer.concat(chunks);
}
