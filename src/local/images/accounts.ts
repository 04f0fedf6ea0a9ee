import type { ImageAccount, ImageAccounts } from './image-store.js';

/*
 * The image's own accounts, read from its /etc/passwd and /etc/group, and its Config.User
 * resolved as Docker (runc) does: `name`, `uid`, `name:group`, `uid:gid`; a numeric uid need not
 * have an entry (its gid is then 0 unless given), a name must.
 */

interface PasswdEntry extends ImageAccount {}

const MAX_ID = 65535;

function parseId(text: string | undefined): number | undefined {
  if (text === undefined || !/^[0-9]+$/.test(text)) return undefined;
  const id = Number(text);
  return id <= MAX_ID ? id : undefined;
}

export function parsePasswd(text: string): PasswdEntry[] {
  const entries: PasswdEntry[] = [];
  for (const line of text.split('\n')) {
    const fields = line.split(':');
    const uid = parseId(fields[2]);
    const gid = parseId(fields[3]);
    if (fields.length < 7 || !fields[0] || uid === undefined || gid === undefined) continue;
    entries.push({ name: fields[0], uid, gid, home: fields[5] ?? '/' });
  }
  return entries;
}

export function parseGroup(text: string): Array<{ name: string; gid: number }> {
  const groups: Array<{ name: string; gid: number }> = [];
  for (const line of text.split('\n')) {
    const fields = line.split(':');
    const gid = parseId(fields[2]);
    if (fields.length < 3 || !fields[0] || gid === undefined) continue;
    groups.push({ name: fields[0], gid });
  }
  return groups;
}

/* The `user` account and Config.User resolved; `problem` says why a set User could not be resolved. */
export function resolveAccounts(user: string | undefined, passwdText: string, groupText: string): { accounts: ImageAccounts; problem: string | undefined } {
  const passwd = parsePasswd(passwdText);
  const groups = parseGroup(groupText);
  const userAccount = passwd.find((entry) => entry.name === 'user');
  if (user === undefined || user === '') return { accounts: { user: userAccount, configured: undefined }, problem: undefined };
  const [userPart = '', groupPart] = user.split(':', 2);
  const numericUid = parseId(userPart);
  const entry = numericUid !== undefined ? passwd.find((candidate) => candidate.uid === numericUid) : passwd.find((candidate) => candidate.name === userPart);
  if (numericUid === undefined && !entry) {
    return { accounts: { user: userAccount, configured: undefined }, problem: `User "${user}": the image's /etc/passwd has no account "${userPart}"` };
  }
  const uid = numericUid ?? entry?.uid ?? 0;
  let gid = entry?.gid ?? 0;
  if (groupPart !== undefined && groupPart !== '') {
    const numericGid = parseId(groupPart);
    const group = numericGid === undefined ? groups.find((candidate) => candidate.name === groupPart) : undefined;
    if (numericGid === undefined && !group) {
      return { accounts: { user: userAccount, configured: undefined }, problem: `User "${user}": the image's /etc/group has no group "${groupPart}"` };
    }
    gid = numericGid ?? group?.gid ?? 0;
  }
  return { accounts: { user: userAccount, configured: { uid, gid, name: entry?.name } }, problem: undefined };
}
