import { z } from 'zod';

/* Query strings carry booleans as text; anything but true/false/1/0 is an input error. */
export const queryBoolean = z
  .enum(['true', 'false', '1', '0'])
  .transform((value) => value === 'true' || value === '1')
  .meta({ type: 'boolean', enum: undefined, description: 'true or false (1 and 0 are accepted too)' });

/* Opaque, as CodeOcean treats it: `<envId>-<uuid>` here, but nothing may rely on that. */
export const runnerIdParamSchema = z.string().min(1).max(256).describe('The id of the runner');

export const claimRequestSchema = z.strictObject({
  executionEnvironmentId: z.number().int().min(0).describe('Specifies the execution environment of the runner'),
  inactivityTimeout: z
    .number()
    .int()
    .min(0)
    .max(365 * 24 * 3600)
    .default(0)
    .describe('Seconds the runner stays available without activity (execution or file copy); 0 means no timeout'),
});

export const mappedPortSchema = z.strictObject({
  exposedPort: z.number().int().min(1).max(65535).describe('The port inside the runner'),
  hostAddress: z.string().describe('Where the port is reachable from outside, as host:port'),
});
export type MappedPort = z.infer<typeof mappedPortSchema>;

export const claimResponseSchema = z.strictObject({
  runnerId: z.string().min(1).describe('The id of the provided runner'),
  mappedPorts: z.array(mappedPortSchema).describe('Where the exposed ports of the runner are reachable'),
});

const workspacePath = z
  .string()
  .min(1)
  .max(4096)
  .refine((path) => !path.includes('\0'), 'must not contain NUL');

export const fileCopySchema = z.strictObject({
  path: workspacePath.describe('Where the file is placed, absolute or relative to the workspace; a trailing / makes a directory'),
  content: z.base64().optional().describe('The content of the file, base64 encoded; missing means empty'),
});

export const updateFilesRequestSchema = z.strictObject({
  delete: z.array(workspacePath).default([]).describe('Paths to delete (recursively) before copying; exactly `./*` empties the workspace but spares dotfiles'),
  copy: z.array(fileCopySchema).default([]).describe('Files to place in the runner'),
});
export type FileUpdate = z.infer<typeof updateFilesRequestSchema>;

export const listFilesQuerySchema = z.strictObject({
  recursive: queryBoolean.default(true).describe('List the file system recursively'),
  path: z.string().min(1).max(4096).default('./').describe('The directory to list'),
  privilegedExecution: queryBoolean.default(false).describe('List as the privileged user'),
});

export const rawFileQuerySchema = z.strictObject({
  path: z.string().min(1).max(4096).describe('The file to download, with its path'),
  privilegedExecution: queryBoolean.default(false).describe('Read as the privileged user'),
});

export const executeRequestSchema = z.strictObject({
  command: z
    .string()
    .min(1)
    .max(1024 * 1024)
    .describe('The command to execute in the working directory of the runner'),
  privilegedExecution: z.boolean().default(false).describe('Execute as the privileged user'),
  environment: z
    .record(z.string().regex(/^[a-zA-Z_][a-zA-Z0-9_]*$/, 'variable names are [a-zA-Z_][a-zA-Z0-9_]*'), z.string())
    .default({})
    .describe('Environment variables for this execution'),
  timeLimit: z
    .number()
    .int()
    .min(0)
    .max(24 * 3600)
    .default(0)
    .describe('Seconds until the execution is killed; 0 means no limit'),
});
export type ExecutionRequest = z.infer<typeof executeRequestSchema>;

export const executeResponseSchema = z.strictObject({
  websocketUrl: z.string().describe('The absolute ws:// or wss:// URL to connect to the execution, usable once'),
});

export const websocketQuerySchema = z.strictObject({
  executionID: z.string().min(1).max(128).describe('The execution announced by the execute route'),
});

export const fileEntryTypes = ['-', 'a', 'A', 'b', 'c', 'C', 'd', 'D', 'l', 'M', 'n', 'p', 'P', 's', 'w', '?'] as const;
export type FileEntryType = (typeof fileEntryTypes)[number];

export const fileHeaderSchema = z
  .strictObject({
    name: z.string().describe('The path of the file'),
    entryType: z.enum(fileEntryTypes).describe('The type of the entry, as `ls -l` prints it'),
    linkTarget: z.string().optional().describe('The target of a symbolic link'),
    size: z.number().int().describe('The size of the file in bytes'),
    modificationTime: z.number().int().describe('The Unix time stamp of the last modification'),
    permissions: z.string().describe('The permissions, e.g. rwxr--r--'),
    owner: z.string().describe('The owning user'),
    group: z.string().describe('The owning group'),
  })
  .meta({ id: 'FileHeader' });
export type FileHeader = z.infer<typeof fileHeaderSchema>;

export const listFilesResponseSchema = z.strictObject({
  files: z.array(fileHeaderSchema).describe('All files found'),
});
