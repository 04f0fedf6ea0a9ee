import assert from 'node:assert/strict';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { normaliseArguments } from '../src/cli-arguments.js';
import { ConfigError, loadConfig, loadConfiguration } from '../src/config/load.js';

test('defaults serve without a file: local backend on, nomad off', async () => {
  const config = await loadConfig(undefined, {});
  assert.equal(config.server.address, '127.0.0.1');
  assert.equal(config.server.port, 7200);
  assert.equal(config.server.token, undefined);
  assert.equal(config.local.enabled, true);
  assert.equal(config.nomad.enabled, false);
  assert.equal(config.logger.level, 'info');
});

test('environment variables named like Poseidon override the file', async (t) => {
  const directory = await mkdtemp(path.join(tmpdir(), 'poseidon-config-'));
  t.after(() => rm(directory, { recursive: true, force: true }));
  const file = path.join(directory, 'config.yaml');
  await writeFile(file, 'server:\n  port: 7000\n  token: from-file\nlogger:\n  level: DEBUG\n');
  const config = await loadConfig(file, {
    POSEIDON_SERVER_PORT: '7300',
    POSEIDON_SERVER_TOKEN: '12345',
    POSEIDON_SERVER_TLS_ACTIVE: 'false',
    POSEIDON_NOMAD_ENABLED: 'true',
    POSEIDON_LOCAL_IMAGES: '{"python:3": "/srv/python"}',
    HOME: '/root',
  });
  assert.equal(config.server.port, 7300);
  assert.equal(config.server.token, '12345');
  assert.equal(config.logger.level, 'debug');
  assert.equal(config.nomad.enabled, true);
  assert.deepEqual(config.local.images, new Map([['python:3', '/srv/python']]));
});

test('a wrong key or value stops start-up with a message naming it', async (t) => {
  const directory = await mkdtemp(path.join(tmpdir(), 'poseidon-config-'));
  t.after(() => rm(directory, { recursive: true, force: true }));
  const file = path.join(directory, 'config.yaml');
  await writeFile(file, 'server:\n  port: seventy\n  colour: blue\n');
  await assert.rejects(loadConfig(file, {}), (error: unknown) => {
    assert.ok(error instanceof ConfigError);
    assert.match(error.message, /server\.port/);
    assert.match(error.message, /colour/);
    return true;
  });
  await assert.rejects(loadConfig(undefined, { POSEIDON_SERVER_PORT: 'abc' }), /server\.port/);
  await assert.rejects(loadConfig(path.join(directory, 'missing.yaml'), {}), /cannot read configuration file/);
});

test('any image name maps to its directory, __proto__ and constructor included', async (t) => {
  const directory = await mkdtemp(path.join(tmpdir(), 'poseidon-config-'));
  t.after(() => rm(directory, { recursive: true, force: true }));
  const file = path.join(directory, 'config.yaml');
  await writeFile(file, 'local:\n  images:\n    __proto__: /srv/proto\n    constructor: /srv/ctor\n');
  const config = await loadConfig(file, {});
  assert.equal(config.local.images.get('__proto__'), '/srv/proto');
  assert.equal(config.local.images.get('constructor'), '/srv/ctor');
  assert.equal(config.local.images.get('toString'), undefined);
  assert.equal((await loadConfig(undefined, {})).local.images.get('__proto__'), undefined);
  await assert.rejects(loadConfig(undefined, { POSEIDON_LOCAL_IMAGES: '{"python": 3}' }), /local\.images\.python/);
});

test('memory and CPU defaults for environments that leave their limits at 0', async () => {
  const config = await loadConfig(undefined, {});
  assert.equal(config.local.defaultmemorylimit, 256);
  assert.equal(config.local.defaultcpulimit, 20);
  await assert.rejects(loadConfig(undefined, { POSEIDON_LOCAL_DEFAULTMEMORYLIMIT: '0' }), /local\.defaultmemorylimit/);
});

const POSEIDON_EXAMPLE = path.join(import.meta.dirname, 'fixtures', 'poseidon', 'configuration.example.yaml');

test("Poseidon's own example configuration is accepted: its values act, unimplemented keys are warned about once each", async () => {
  const { config, warnings } = await loadConfiguration(POSEIDON_EXAMPLE, {});
  assert.equal(config.server.systemdsocketactivation, false);
  assert.equal(config.logger.level, 'debug');
  assert.equal(config.nomad.enabled, true);
  assert.equal(config.nomad.network.mode, 'cni/secure-bridge');
  assert.equal(config.server.alert.prewarmingpoolthreshold, 0.5);
  assert.equal(config.profiling.memoryinterval, 30_000, 'Go-style 30_000 is a number');
  // aws.enabled: false and profiling.cpuenabled: false ask for nothing this daemon does not do.
  assert.deepEqual(warnings.map((warning) => warning.key).sort(), [
    'profiling.cpufile',
    'profiling.memoryinterval',
    'profiling.memorythreshold',
    'server.alert.prewarmingpoolreloadtimeout',
  ]);
  for (const warning of warnings) assert.match(warning.message, new RegExp(`${warning.key.replaceAll('.', '\\.')} is not implemented`));
});

test("Poseidon's POSEIDON_* variables are read as Poseidon reads them (Go booleans, space-separated lists)", async () => {
  const { config, warnings } = await loadConfiguration(undefined, {
    POSEIDON_SENTRY_DSN: 'https://key@sentry.example/1',
    POSEIDON_AWS_FUNCTIONS: '"java11Exec go118Exec"',
    POSEIDON_SERVER_SYSTEMDSOCKETACTIVATION: 'True',
    POSEIDON_SERVER_TEMPLATEJOBFILE: '/etc/poseidon/job.hcl',
    POSEIDON_INFLUXDB_URL: 'http://localhost:8086',
    POSEIDON_SENTRY_TRACESSAMPLERATE: '0.25',
    POSEIDON_LOCAL_NETWORK_UPLINKS: '[]',
  });
  assert.equal(config.sentry.dsn, 'https://key@sentry.example/1');
  assert.deepEqual(config.aws.functions, ['java11Exec', 'go118Exec']);
  assert.equal(config.server.systemdsocketactivation, true);
  assert.equal(config.nomad.templatejobfile, '/etc/poseidon/job.hcl', "Poseidon's server.templatejobfile is the Nomad template");
  assert.equal(config.sentry.tracessamplerate, 0.25);
  assert.deepEqual(config.local.network.uplinks, []);
  assert.deepEqual(
    warnings.map((warning) => warning.key).sort(),
    ['aws.functions', 'influxdb.url', 'sentry.tracessamplerate'],
    'sentry.dsn is honoured, tracing is not',
  );
});

test("keys outside Poseidon's set still stop the start, naming the key", async () => {
  await assert.rejects(loadConfig(undefined, { POSEIDON_SENTRY_COLOUR: 'blue' }), (error: unknown) => {
    assert.ok(error instanceof ConfigError);
    assert.match(error.message, /sentry/);
    assert.match(error.message, /colour/);
    return true;
  });
  await assert.rejects(loadConfig(undefined, { POSEIDON_PROFILING_CPUENABLED: 'maybe' }), /profiling\.cpuenabled/);
});

test('-config FILE, as Go spells it, is --config', () => {
  assert.deepEqual(normaliseArguments(['-config', 'a.yaml']), ['--config', 'a.yaml']);
  assert.deepEqual(normaliseArguments(['-config=a.yaml']), ['--config=a.yaml']);
  assert.deepEqual(normaliseArguments(['--config', 'a.yaml', '-c', 'b']), ['--config', 'a.yaml', '-c', 'b']);
});
