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

/*
 * Prints the size on the first line (for Content-Length), then the file from byte $2 on: a download
 * whose tail Nomad lost (nomad#27146) resumes where it stopped.
 */
const READ_SCRIPT = [
  '[ -f "$1" ] && [ -r "$1" ] || { echo "$1 is not a readable regular file" >&2; exit 1; }',
  'stat -L -c %s -- "$1" || exit 1',
  'if [ "$2" -gt 0 ]; then exec tail -c "+$(($2 + 1))" -- "$1"; fi',
  'exec cat -- "$1"',
].join('\n');

/*
 * Runs find into a file first, so that the first line can announce the listing's byte count and
 * find's status: a listing whose tail Nomad lost, or whose exit frame never came, is recognised.
 */
const LIST_SCRIPT = [
  'out=$(mktemp) || exit 1',
  'find "$@" > "$out"; status=$?',
  'printf "%s %s\\n" "$(($(wc -c < "$out")))" "$status"',
  'cat "$out"; rm -f "$out"; exit $status',
].join('\n');

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

/*
 * A listing's argv: find (NUL-separated fields, see parseFindOutput) behind LIST_SCRIPT's header; a
 * leading '-' would read as an option.
 */
export function listCommand(requestedPath: string, recursive: boolean): { start: string; argv: string[] } {
  const start = requestedPath.startsWith('-') ? `./${requestedPath}` : requestedPath;
  return { start, argv: ['/bin/sh', '-c', LIST_SCRIPT, 'list', start, ...(recursive ? [] : ['-maxdepth', '1']), '-printf', FIND_FORMAT] };
}

export function readCommand(requestedPath: string, offset = 0): string[] {
  return ['/bin/sh', '-c', READ_SCRIPT, 'read', requestedPath, String(offset)];
}

export interface AnnouncedOutput {
  readonly body: Buffer;
  /* The byte count the first line announced, and the status after it (LIST_SCRIPT). */
  readonly size: number;
  readonly status: number | undefined;
}

/* Splits `<size> [status]\n<body>`; undefined while the first line is incomplete or malformed. */
export function splitAnnounced(output: Buffer): AnnouncedOutput | undefined {
  const newline = output.indexOf(10);
  if (newline < 0) return undefined;
  const [sizeText = '', statusText] = output.subarray(0, newline).toString('utf8').trim().split(/\s+/);
  const size = Number(sizeText);
  const status = statusText === undefined ? undefined : Number(statusText);
  if (sizeText === '' || !Number.isSafeInteger(size) || size < 0 || (status !== undefined && !Number.isInteger(status))) return undefined;
  return { body: output.subarray(newline + 1), size, status };
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
