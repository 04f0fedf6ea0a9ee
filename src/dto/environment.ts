import { z } from 'zod';

/*
 * An environment id in a path is a decimal integer exactly as CodeOcean writes it: no sign, no
 * spaces, no hex or exponent, no leading zeros (two spellings of one id would be two URLs for one
 * resource). The document calls it an integer, as Poseidon's does; the pattern says how it is spelt.
 */
export const environmentIdParamSchema = z
  .string()
  .regex(/^(0|[1-9][0-9]*)$/, 'must be a decimal integer without sign, spaces or leading zeros')
  .transform(Number)
  .pipe(z.number().int().min(0).max(Number.MAX_SAFE_INTEGER))
  .meta({ type: 'integer', minimum: 0, description: 'Id of the execution environment (decimal digits)' });

export const executionEnvironmentSchema = z
  .strictObject({
    id: z.number().int().min(0).describe('The id of the execution environment'),
    image: z.string().min(1).max(1024).describe('The name of the OCI image used for this execution environment'),
    prewarmingPoolSize: z.number().int().min(0).max(10_000).describe('Number of runners with this configuration to prewarm'),
    cpuLimit: z.number().min(0).describe('CPU limit for one runner in MHz'),
    memoryLimit: z.number().int().min(0).describe('Memory limit for one runner in MB'),
    networkAccess: z.boolean().describe('Whether the runner is allowed to access the network or not'),
    exposedPorts: z.array(z.number().int().min(1).max(65535)).max(64).describe('Ports inside the runner to expose to the outside'),
  })
  .meta({ id: 'ExecutionEnvironment' });
export type ExecutionEnvironmentSpec = z.infer<typeof executionEnvironmentSchema>;

/* The path id wins over a missing body id; a contradicting body id is a client error (checked by the route). */
export const environmentPutBodySchema = executionEnvironmentSchema.extend({
  id: z.number().int().min(0).optional().describe('The id of the execution environment; must equal the path id when given'),
});

export const environmentListSchema = z.strictObject({
  executionEnvironments: z.array(executionEnvironmentSchema).describe('All execution environments'),
});

export const environmentStatisticsSchema = z.strictObject({
  id: z.number().int().min(0).describe('The id of the execution environment'),
  prewarmingPoolSize: z.number().int().min(0).describe('Number of runners with this configuration to prewarm'),
  idleRunners: z.number().int().min(0).describe('Number of runners currently prewarmed'),
  usedRunners: z.number().int().min(0).describe('Number of runners currently in use'),
});
export type EnvironmentStatistics = z.infer<typeof environmentStatisticsSchema>;

/* Keyed by the environment id as a string, as Poseidon answers. */
export const statisticsResponseSchema = z.record(z.string(), environmentStatisticsSchema);

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
