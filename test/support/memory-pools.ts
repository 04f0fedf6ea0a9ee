import type { ExecutionEnvironmentSpec } from '../../src/dto/environment.js';
import { InactivityTrackingRunner, type ManagedRunner } from '../../src/runner/managed-runner.js';

/* An in-memory runner, for tests of pool and chain logic that never touch a backend. */
export class MemoryRunner extends InactivityTrackingRunner implements ManagedRunner {
  destroyed = false;
  constructor(
    readonly id: string,
    readonly environmentId: number,
  ) {
    super();
  }
  mappedPorts() {
    return [];
  }
  async updateFileSystem() {}
  async listFileSystem() {
    return [];
  }
  async getFileContent(): Promise<never> {
    throw new Error('not used');
  }
  async execute(): Promise<never> {
    throw new Error('not used');
  }
  async destroy() {
    this.destroyed = true;
    this.stopInactivityTimer();
  }
}

export const spec = (id: number, prewarmingPoolSize = 2): ExecutionEnvironmentSpec => ({
  id,
  image: 'python',
  prewarmingPoolSize,
  cpuLimit: 100,
  memoryLimit: 128,
  networkAccess: false,
  exposedPorts: [],
});

/* Lets queued refills finish; setImmediate, so that mocked timers do not stall it. */
export const settle = async (): Promise<void> => {
  for (let round = 0; round < 5; round += 1) await new Promise((resolve) => setImmediate(resolve));
};
