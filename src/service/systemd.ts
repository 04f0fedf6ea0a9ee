/*
 * systemd socket activation (sd_listen_fds(3)): systemd passes listening sockets as fds 3, 4, ...
 * and says how many in LISTEN_FDS, for the process LISTEN_PID. Poseidon's
 * server.systemdsocketactivation serves them instead of binding address and port, so connections
 * wait in the socket's backlog while the daemon restarts.
 */
export const SD_LISTEN_FDS_START = 3;

export function systemdListenFds(environment: NodeJS.ProcessEnv = process.env, pid: number = process.pid): number[] {
  const listenPid = Number(environment.LISTEN_PID);
  const count = Number(environment.LISTEN_FDS);
  // Variables meant for another process (e.g. inherited through a shell) are not ours.
  if (!Number.isInteger(listenPid) || listenPid !== pid || !Number.isInteger(count) || count < 1) return [];
  return Array.from({ length: count }, (_, index) => SD_LISTEN_FDS_START + index);
}
