import { constants, closeSync, fstatSync, lstatSync, openSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { WORKSPACE } from '../runner/workspace-files.js';
import type { PreparedImage } from './images/image-store.js';
import { sandboxAccounts } from './sandbox-accounts.js';

/* Docker's PATH for an image that sets none (and the host layout's). */
export const DEFAULT_PATH = '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin';

export interface SandboxUser {
  uid: number;
  gid: number;
}

/*
 * What a runner is built on and how its executions run: the root file system, the accounts the
 * sandbox sees, the unprivileged user and the environment variables before the request's own.
 */
export interface RunnerImage {
  /* The read-only root (idmapped into each runner's user namespace); undefined: the host's system directories. */
  rootDirectory: string | undefined;
  /* passwd and group laid over the root's; undefined keeps the image's own files. */
  accounts: { passwd: string; group: string } | undefined;
  /* Who unprivileged commands, listings and reads run as (ids inside the sandbox). */
  learner: SandboxUser;
  /* The manifest digest of a registry image: runners pin it while they live. */
  digest: string | undefined;
  /* Every execution's variables: the image's Env, then CODEOCEAN=true; the request's come on top. */
  environment(privileged: boolean): Record<string, string>;
}

interface PasswdEntry {
  name: string;
  uid: number;
  gid: number;
  home: string;
}

/* The host layout: today's minimal passwd with a learner account, the host's programs. */
export function hostImage(learner: SandboxUser): RunnerImage {
  const environment = {
    PATH: DEFAULT_PATH,
    HOME: WORKSPACE,
    LANG: 'C.UTF-8',
    // What Docker sets for an exec with a TTY (unless the image sets its own). No PYTHONUNBUFFERED:
    // on a terminal Python's stdout is line-buffered and input() flushes a prompt, as in Poseidon.
    TERM: 'xterm',
    CODEOCEAN: 'true',
  };
  return { rootDirectory: undefined, accounts: sandboxAccounts(learner), learner, digest: undefined, environment: () => environment };
}

/*
 * A root file system an operator prepared (local.images maps the name to its directory): its own
 * accounts and programs, no image config. Unprivileged commands run as its `user` account if it has
 * one, else as local.uid.
 */
export function directoryImage(directory: string, fallback: SandboxUser): RunnerImage {
  const rootDirectory = path.resolve(directory);
  const passwd = readImageFile(rootDirectory, 'etc/passwd');
  const entries = parsePasswd(passwd);
  const user = entries.find((entry) => entry.name === 'user');
  return imageOn(rootDirectory, user ?? fallback, [], entries, passwd, readImageFile(rootDirectory, 'etc/group'), undefined);
}

/*
 * A registry image as the store prepared it. Unprivileged commands run as its `user` account
 * (Poseidon's convention: openHPI's images have one and no USER), else as its configured User when
 * that is not root, else as local.uid.
 */
export function registryImage(image: PreparedImage, fallback: SandboxUser): RunnerImage {
  // The spawner takes absolute paths only; local.statedir may be relative (./data).
  const rootDirectory = path.resolve(image.rootDirectory);
  const passwd = readImageFile(rootDirectory, 'etc/passwd');
  const entries = parsePasswd(passwd);
  const configured = image.accounts.configured;
  const learner = image.accounts.user ?? (configured && configured.uid !== 0 ? configured : fallback);
  return imageOn(rootDirectory, learner, image.config.env, entries, passwd, readImageFile(rootDirectory, 'etc/group'), image.digest);
}

function imageOn(
  rootDirectory: string,
  learner: SandboxUser,
  imageEnv: string[],
  entries: PasswdEntry[],
  passwd: string,
  group: string,
  digest: string | undefined,
): RunnerImage {
  const learnerEntry = entries.find((entry) => entry.uid === learner.uid);
  const rootHome = entries.find((entry) => entry.uid === 0)?.home ?? '/root';
  const variables = Object.fromEntries(imageEnv.map((entry) => splitVariable(entry)));
  // Docker's defaults for what the image does not set: a PATH, the user's HOME, TERM for a TTY.
  const environment = (home: string): Record<string, string> => ({ PATH: DEFAULT_PATH, HOME: home, TERM: 'xterm', ...variables, CODEOCEAN: 'true' });
  const privileged = environment(rootHome);
  const unprivileged = environment(learnerEntry?.home ?? WORKSPACE);
  return {
    rootDirectory,
    // A learner the image has no account for would make `whoami` fail on stderr, which fails CodeOcean's check.
    accounts: learnerEntry ? undefined : withLearner(passwd, group, learner),
    learner: { uid: learner.uid, gid: learner.gid },
    digest,
    environment: (isPrivileged) => (isPrivileged ? privileged : unprivileged),
  };
}

/* The image's own accounts plus a `learner` one (and root, and their groups, where missing). */
function withLearner(passwd: string, group: string, learner: SandboxUser): { passwd: string; group: string } {
  const lines = (text: string): string[] => text.split('\n').filter((line) => line.length > 0);
  const hasId = (entries: string[], id: number): boolean => entries.some((line) => Number(line.split(':')[2]) === id && line.split(':')[2] !== '');
  const users = lines(passwd);
  const groups = lines(group);
  return {
    passwd: `${[...(hasId(users, 0) ? [] : ['root:x:0:0:root:/root:/bin/sh']), ...users, `learner:x:${learner.uid}:${learner.gid}:learner:${WORKSPACE}:/bin/sh`].join('\n')}\n`,
    group: `${[...(hasId(groups, 0) ? [] : ['root:x:0:']), ...groups, ...(hasId(groups, learner.gid) ? [] : [`learner:x:${learner.gid}:`])].join('\n')}\n`,
  };
}

function splitVariable(entry: string): [string, string] {
  const index = entry.indexOf('=');
  return index === -1 ? [entry, ''] : [entry.slice(0, index), entry.slice(index + 1)];
}

function parsePasswd(text: string): PasswdEntry[] {
  const entries: PasswdEntry[] = [];
  for (const line of text.split('\n')) {
    const [name, , uid, gid, , home] = line.split(':');
    if (!name || !Number.isInteger(Number(uid)) || !Number.isInteger(Number(gid)) || uid === '' || gid === '') continue;
    entries.push({ name, uid: Number(uid), gid: Number(gid), home: home || '/' });
  }
  return entries;
}

const MAX_ACCOUNT_FILE_BYTES = 1024 * 1024;

/*
 * A file of the image read from the host: neither it nor its directory may be a symbolic link
 * (an image's /etc/passwd -> /etc/shadow must not make the daemon read the host's). Missing or
 * unsafe files read as empty: the sandbox then has no account names, never the host's.
 */
function readImageFile(rootDirectory: string, relative: string): string {
  try {
    if (lstatSync(path.join(rootDirectory, path.dirname(relative))).isSymbolicLink()) return '';
    const fd = openSync(path.join(rootDirectory, relative), constants.O_RDONLY | constants.O_NOFOLLOW | constants.O_NONBLOCK);
    try {
      const stat = fstatSync(fd);
      if (!stat.isFile() || stat.size > MAX_ACCOUNT_FILE_BYTES) return '';
      return readFileSync(fd, 'utf8');
    } finally {
      closeSync(fd);
    }
  } catch {
    return '';
  }
}
