import { WORKSPACE } from '../runner/workspace-files.js';

const NOBODY = 65534;

/* Only root, the learner and nobody: the host's accounts are none of a learner's business. */
export function sandboxAccounts(learner: { uid: number; gid: number }): { passwd: string; group: string } {
  const passwd = ['root:x:0:0:root:/root:/bin/sh'];
  const group = ['root:x:0:'];
  if (learner.uid !== 0 && learner.uid !== NOBODY) passwd.push(`learner:x:${learner.uid}:${learner.gid}:learner:${WORKSPACE}:/bin/sh`);
  if (learner.gid !== 0 && learner.gid !== NOBODY) group.push(`learner:x:${learner.gid}:`);
  passwd.push(`nobody:x:${NOBODY}:${NOBODY}:nobody:/nonexistent:/usr/sbin/nologin`);
  group.push(`nogroup:x:${NOBODY}:`);
  return { passwd: `${passwd.join('\n')}\n`, group: `${group.join('\n')}\n` };
}
