import { readFile } from 'node:fs/promises';
import YAML from 'yaml';
import { type Config, configSchema, listFromText, UNIMPLEMENTED_KEYS, type UnimplementedKey } from './schema.js';

const ENV_PREFIX = 'POSEIDON_';

export class ConfigError extends Error {}

/* A key of Poseidon's that is set here but does nothing, with what happens instead. */
export interface ConfigWarning {
  key: string;
  message: string;
}

export interface LoadedConfig {
  config: Config;
  warnings: ConfigWarning[];
}

type Tree = Record<string, unknown>;

function isTree(value: unknown): value is Tree {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

/* Go's strconv.ParseBool, which Poseidon reads boolean variables with. */
const GO_TRUE = new Set(['1', 't', 'T', 'TRUE', 'true', 'True']);
const GO_FALSE = new Set(['0', 'f', 'F', 'FALSE', 'false', 'False']);

/* Reads an environment value as the type the key has by default (number, boolean, list, map), else as text. */
function typedValue(text: string, example: unknown): unknown {
  if (typeof example === 'number') return text.trim() === '' ? text : Number(text);
  if (typeof example === 'boolean') return GO_TRUE.has(text) ? true : GO_FALSE.has(text) ? false : text;
  if (Array.isArray(example)) return listFromText(text);
  if (isTree(example)) return YAML.parse(text) as unknown;
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

/*
 * A key written without a value (`influxdb:` followed only by comments, as in Poseidon's example)
 * is null in YAML; Go's decoder leaves such a key at its default, and so does this.
 */
function withoutNulls(tree: Tree): Tree {
  // In place: copying into a new object would turn a key such as __proto__ (an image name) into a prototype.
  for (const [key, value] of Object.entries(tree)) {
    if (value === null) delete tree[key];
    else if (isTree(value)) withoutNulls(value);
  }
  return tree;
}

/* Poseidon keeps the Nomad job template under server; here it is a Nomad setting, in one place. */
function moveTemplateJobFile(tree: Tree): void {
  const server = tree.server;
  if (!isTree(server) || server.templatejobfile === undefined) return;
  if (!isTree(tree.nomad)) tree.nomad = {};
  const nomad = tree.nomad as Tree;
  if (nomad.templatejobfile !== undefined && nomad.templatejobfile !== server.templatejobfile) {
    throw new ConfigError('invalid configuration:\n  server.templatejobfile and nomad.templatejobfile name different files; set one of them');
  }
  nomad.templatejobfile = server.templatejobfile;
  delete server.templatejobfile;
}

/*
 * Poseidon's nomad.disableforcepull (true: use a pulled image, false: pull at every start) is the
 * local backend's pull policy too, unless local.pullpolicy says otherwise.
 */
function mapForcePull(tree: Tree): void {
  const nomad = tree.nomad;
  if (!isTree(nomad) || typeof nomad.disableforcepull !== 'boolean') return;
  if (!isTree(tree.local)) tree.local = {};
  const local = tree.local as Tree;
  if (local.pullpolicy === undefined) local.pullpolicy = nomad.disableforcepull ? 'ifnotpresent' : 'always';
}

/* One warning per set key of Poseidon's that has no effect here (see UNIMPLEMENTED_KEYS). */
export function unimplementedKeyWarnings(tree: Tree, prefix: string[] = []): ConfigWarning[] {
  const warnings: ConfigWarning[] = [];
  for (const [key, value] of Object.entries(tree)) {
    const keyPath = [...prefix, key];
    if (isTree(value)) {
      warnings.push(...unimplementedKeyWarnings(value, keyPath));
      continue;
    }
    // The key's own entry, else its nearest section's.
    let entry: UnimplementedKey | undefined;
    for (let length = keyPath.length; length > 0 && !entry; length -= 1) entry = UNIMPLEMENTED_KEYS[keyPath.slice(0, length).join('.')];
    if (!entry || entry.harmless?.(value)) continue;
    const name = keyPath.join('.');
    warnings.push({ key: name, message: `configuration key ${name} is not implemented by poseidon-ts and has no effect: ${entry.instead}` });
  }
  return warnings;
}

export function parseConfig(tree: unknown): Config {
  const result = configSchema.safeParse(tree);
  if (result.success) return result.data;
  const problems = result.error.issues.map((issue) => {
    const key = issue.path.join('.') || '(top level)';
    // An unknown key's path is its section; the message names the key itself.
    return `  ${key}: ${issue.message}`;
  });
  throw new ConfigError(`invalid configuration:\n${problems.join('\n')}`);
}

/* The configuration from a file (optional) and POSEIDON_* variables, with warnings for keys that do nothing here. */
export async function loadConfiguration(file: string | undefined, environment: NodeJS.ProcessEnv = process.env): Promise<LoadedConfig> {
  let tree: Tree = {};
  if (file) {
    let text: string;
    try {
      text = await readFile(file, 'utf8');
    } catch (error) {
      throw new ConfigError(`cannot read configuration file ${file}: ${(error as Error).message}`);
    }
    let parsed: unknown;
    try {
      parsed = YAML.parse(text);
    } catch (error) {
      throw new ConfigError(`${file} is not valid YAML: ${(error as Error).message}`);
    }
    if (parsed !== null && parsed !== undefined && !isTree(parsed)) throw new ConfigError(`${file} must hold a YAML mapping`);
    tree = withoutNulls((parsed as Tree | null) ?? {});
  }
  tree = applyEnvironment(tree, environment);
  moveTemplateJobFile(tree);
  mapForcePull(tree);
  const config = parseConfig(tree);
  return { config, warnings: unimplementedKeyWarnings(tree) };
}

export async function loadConfig(file: string | undefined, environment: NodeJS.ProcessEnv = process.env): Promise<Config> {
  return (await loadConfiguration(file, environment)).config;
}
