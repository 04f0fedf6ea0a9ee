import { existsSync, lstatSync } from 'node:fs';

/*
 * Only these host files are visible in a sandbox built from the host's system: enough for
 * programs and name resolution, nothing that holds secrets (no shadow, no daemon config). The
 * sandbox gets passwd and group of its own (see sandboxAccounts).
 */
const HOST_ETC_ENTRIES = [
  'alternatives',
  'ca-certificates',
  'ca-certificates.conf',
  'ssl',
  'ld.so.cache',
  'ld.so.conf',
  'ld.so.conf.d',
  'localtime',
  'timezone',
  'nsswitch.conf',
  'hosts',
  'resolv.conf',
  'host.conf',
  'mime.types',
  'java-17-openjdk',
  'java-21-openjdk',
  'python3',
  'python3.11',
  'fonts',
  'profile',
  'bash.bashrc',
  'environment',
  'locale.alias',
  'locale.gen',
  'protocols',
  'services',
  'magic',
  'inputrc',
  'ssh/ssh_config',
];
const HOST_SYSTEM_DIRS = ['usr', 'bin', 'sbin', 'lib', 'lib32', 'lib64', 'libx32', 'opt'];

/* bwrap arguments for a read-only root made of the host's system directories. */
export function hostSystemArguments(): string[] {
  // bwrap would create /etc with the daemon's umask; learners must be able to read passwd and friends.
  const args: string[] = ['--perms', '0755', '--dir', '/etc'];
  for (const entry of HOST_SYSTEM_DIRS) {
    const hostPath = `/${entry}`;
    if (!existsSync(hostPath)) continue;
    const stat = lstatSync(hostPath);
    // Merged-/usr hosts link /bin to usr/bin; the sandbox gets the same link.
    if (stat.isSymbolicLink()) args.push('--symlink', `usr/${entry}`, hostPath);
    else args.push('--ro-bind', hostPath, hostPath);
  }
  for (const entry of HOST_ETC_ENTRIES) args.push('--ro-bind-try', `/etc/${entry}`, `/etc/${entry}`);
  return args;
}
