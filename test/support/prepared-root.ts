import { chmodSync, chownSync, copyFileSync, mkdirSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';

/*
 * A root file system as the image store prepares one, made from the host's static busybox: the
 * sandbox's mount points, an image /etc/passwd with `user` (uid 1000, home /workspace), files owned
 * by image uids 0 and 1000 on disk, and a root-only secret. Needs root (chown) and busybox-static.
 */

export const BUSYBOX = '/usr/bin/busybox';
const APPLETS = ['sh', 'ls', 'cat', 'id', 'whoami', 'env', 'echo', 'test', 'stat', 'touch', 'sleep', 'pwd', 'printenv'];

export interface PreparedRoot {
  directory: string;
  remove(): void;
}

export function preparedRoot(options: { osRelease?: string; passwd?: string } = {}): PreparedRoot {
  const parent = mkdtempSync(path.join(tmpdir(), 'poseidon-root-'));
  const root = path.join(parent, 'rootfs');
  for (const directory of ['bin', 'etc', 'proc', 'dev', 'tmp', 'workspace', '.poseidon', 'home/user', 'root'])
    mkdirSync(path.join(root, directory), { recursive: true });
  chmodSync(root, 0o755);
  copyFileSync(BUSYBOX, path.join(root, 'bin/busybox'));
  chmodSync(path.join(root, 'bin/busybox'), 0o755);
  for (const applet of APPLETS) symlinkSync('busybox', path.join(root, 'bin', applet));
  writeFileSync(
    path.join(root, 'etc/passwd'),
    options.passwd ?? 'root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/workspace:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n',
  );
  writeFileSync(path.join(root, 'etc/group'), 'root:x:0:\nuser:x:1000:\nnogroup:x:65534:\n');
  writeFileSync(path.join(root, 'etc/os-release'), options.osRelease ?? 'NAME="Poseidon Test Root"\nID=poseidon-test\n');
  // Only root may read it, in Docker and here.
  writeFileSync(path.join(root, 'root/secret'), 'root only\n', { mode: 0o600 });
  chmodSync(path.join(root, 'root'), 0o700);
  writeFileSync(path.join(root, 'home/user/notes'), 'the user owns this\n');
  chownSync(path.join(root, 'home/user'), 1000, 1000);
  chownSync(path.join(root, 'home/user/notes'), 1000, 1000);
  return { directory: root, remove: () => rmSync(parent, { recursive: true, force: true }) };
}
