import type { ExecutionEnvironmentSpec } from '../../dto/environment.js';
import type { RunnerImage } from '../runner-image.js';
import type { Sandbox } from '../sandbox.js';

/*
 * What the local backend needs from whatever starts its sandboxes (after Nex's ProcessManager): a
 * sandbox is prepared before any workload arrives, so handing one out costs nothing. Implementations
 * are named by how they start sandboxes (spawner-process-manager.ts: bubblewrap through the spawner).
 */
export interface ProcessManager {
  /* A live sandbox for an environment on its image's root, with its cgroup limits, namespaces and file systems. */
  prepare(id: string, spec: ExecutionEnvironmentSpec, image: RunnerImage): Promise<Sandbox>;
  stopProcess(id: string): Promise<void>;
  /* No new sandboxes from now on; running ones keep serving until stopped. */
  enterLameDuck(): void;
  /* Stops every sandbox and whatever the manager runs for them. */
  stop(): Promise<void>;
}

/* Told about sandboxes coming and going (Nex's ProcessDelegate): a sandbox that ends on its own is a lost runner. */
export interface ProcessDelegate {
  sandboxReady(id: string): void;
  sandboxExited(id: string): void;
}
