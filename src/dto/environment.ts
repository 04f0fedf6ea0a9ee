import { z } from 'zod';

export const environmentIdSchema = z.coerce.number().int().min(0).max(Number.MAX_SAFE_INTEGER);

export const executionEnvironmentSchema = z.strictObject({
  id: z.number().int().min(0),
  image: z.string().min(1).max(1024),
  prewarmingPoolSize: z.number().int().min(0).max(10_000),
  cpuLimit: z.number().min(0),
  memoryLimit: z.number().int().min(0),
  networkAccess: z.boolean(),
  exposedPorts: z.array(z.number().int().min(1).max(65535)).max(64),
});
export type ExecutionEnvironmentSpec = z.infer<typeof executionEnvironmentSchema>;

/* The path id wins over a missing body id; a contradicting body id is a client error (checked by the route). */
export const environmentPutBodySchema = executionEnvironmentSchema.extend({
  id: z.number().int().min(0).optional(),
});

export interface EnvironmentStatistics {
  id: number;
  prewarmingPoolSize: number;
  idleRunners: number;
  usedRunners: number;
}

/* Two specs differing only in pool size can keep their runners; anything else rebuilds them. */
export function sameRunnerShape(a: ExecutionEnvironmentSpec, b: ExecutionEnvironmentSpec): boolean {
  return (
    a.image === b.image &&
    a.cpuLimit === b.cpuLimit &&
    a.memoryLimit === b.memoryLimit &&
    a.networkAccess === b.networkAccess &&
    a.exposedPorts.length === b.exposedPorts.length &&
    a.exposedPorts.every((port, index) => port === b.exposedPorts[index])
  );
}
