import assert from 'node:assert/strict';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { ConfigError, loadConfig } from '../src/config/load.js';

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
