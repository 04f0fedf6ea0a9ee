import { z } from 'zod';

/* Query strings carry booleans as text; anything but true/false is an input error. */
export const queryBoolean = z
  .enum(['true', 'false', '1', '0'])
  .transform((value) => value === 'true' || value === '1');

export const claimRequestSchema = z.strictObject({
  executionEnvironmentId: z.number().int().min(0),
  inactivityTimeout: z.number().int().min(0).max(365 * 24 * 3600).default(0),
});

export interface MappedPort {
  exposedPort: number;
  hostAddress: string;
}

export const fileCopySchema = z.strictObject({
  path: z.string().min(1).max(4096).refine((path) => !path.includes('\0'), 'must not contain NUL'),
  content: z.base64().optional(),
});

export const updateFilesRequestSchema = z.strictObject({
  delete: z.array(z.string().min(1).max(4096).refine((path) => !path.includes('\0'), 'must not contain NUL')).default([]),
  copy: z.array(fileCopySchema).default([]),
});
export type FileUpdate = z.infer<typeof updateFilesRequestSchema>;

export const listFilesQuerySchema = z.strictObject({
  recursive: queryBoolean.default(true),
  path: z.string().min(1).max(4096).default('./'),
  privilegedExecution: queryBoolean.default(false),
});

export const rawFileQuerySchema = z.strictObject({
  path: z.string().min(1).max(4096),
  privilegedExecution: queryBoolean.default(false),
});

export const executeRequestSchema = z.strictObject({
  command: z.string().min(1).max(1024 * 1024),
  privilegedExecution: z.boolean().default(false),
  environment: z.record(z.string().regex(/^[a-zA-Z_][a-zA-Z0-9_]*$/, 'variable names are [a-zA-Z_][a-zA-Z0-9_]*'), z.string()).default({}),
  timeLimit: z.number().int().min(0).max(24 * 3600).default(0),
});
export type ExecutionRequest = z.infer<typeof executeRequestSchema>;

export const websocketQuerySchema = z.strictObject({ executionID: z.string().min(1).max(128) });

export const fileEntryTypes = ['-', 'a', 'A', 'b', 'c', 'C', 'd', 'D', 'l', 'M', 'n', 'p', 'P', 's', 'w', '?'] as const;
export type FileEntryType = (typeof fileEntryTypes)[number];

export interface FileHeader {
  name: string;
  entryType: FileEntryType;
  linkTarget?: string;
  size: number;
  modificationTime: number;
  permissions: string;
  owner: string;
  group: string;
}
