import { readFile } from 'node:fs/promises';
import YAML from 'yaml';
import { type Config, configSchema } from './schema.js';

const ENV_PREFIX = 'POSEIDON_';

export class ConfigError extends Error {}

type Tree = Record<string, unknown>;

function isTree(value: unknown): value is Tree {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

/* Reads an environment value as the type the key has by default (number, boolean, map), else as text. */
function typedValue(text: string, example: unknown): unknown {
  if (typeof example === 'number') return text.trim() === '' ? text : Number(text);
  if (typeof example === 'boolean') return text === 'true' ? true : text === 'false' ? false : text;
  if (isTree(example) || Array.isArray(example)) return YAML.parse(text) as unknown;
  return text;
}

/* POSEIDON_SERVER_TLS_CAFILE=x becomes server.tls.cafile = x; environment values win over the file. */
export function applyEnvironment(tree: Tree, environment: NodeJS.ProcessEnv): Tree {
  const defaults = configSchema.parse({}) as unknown as Tree;
  for (const [name, value] of Object.entries(environment)) {
    if (!name.startsWith(ENV_PREFIX) || value === undefined) continue;
    const keys = name.slice(ENV_PREFIX.length).toLowerCase().split('_');
    let node = tree;
    let example: unknown = defaults;
    for (const key of keys.slice(0, -1)) {
      if (!isTree(node[key])) node[key] = {};
      node = node[key] as Tree;
      example = isTree(example) ? example[key] : undefined;
    }
    const last = keys[keys.length - 1] ?? '';
    node[last] = typedValue(value, isTree(example) ? example[last] : undefined);
  }
  return tree;
}

export function parseConfig(tree: unknown): Config {
  const result = configSchema.safeParse(tree);
  if (result.success) return result.data;
  const problems = result.error.issues.map((issue) => {
    const key = issue.path.join('.') || '(top level)';
    return `  ${key}: ${issue.message}`;
  });
  throw new ConfigError(`invalid configuration:\n${problems.join('\n')}`);
}

export async function loadConfig(file: string | undefined, environment: NodeJS.ProcessEnv = process.env): Promise<Config> {
  let tree: Tree = {};
  if (file) {
    let text: string;
    try {
      text = await readFile(file, 'utf8');
    } catch (error) {
      throw new ConfigError(`cannot read configuration file ${file}: ${(error as Error).message}`);
    }
    const parsed: unknown = YAML.parse(text);
    if (parsed !== null && parsed !== undefined && !isTree(parsed)) throw new ConfigError(`${file} must hold a YAML mapping`);
    tree = (parsed as Tree | null) ?? {};
  }
  return parseConfig(applyEnvironment(tree, environment));
}
