import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { test } from 'node:test';
import pino from 'pino';
import { createCgroupManager } from '../src/local/cgroups.js';

const MEGABYTE = 1024 * 1024;

test('a runner cgroup carries memory, CPU share and pids limits, and is removed again', async () => {
  const manager = await createCgroupManager('auto', 'poseidon-ts-test', pino({ level: 'silent' }));
  assert.notEqual(manager.version, 'off', 'these machines have cgroups; without them the limits are not enforced');
  const cgroup = await manager.create(`limits-${process.pid}`, { memoryBytes: 64 * MEGABYTE, cpuShares: 512, pids: 77 });
  assert.ok(cgroup);
  const directoryOf = (controller: string) => {
    const file = cgroup.procsFiles.find((candidate) => manager.version === 'v2' || candidate.includes(`/${controller}/`));
    assert.ok(file, `no ${controller} cgroup`);
    return file.replace(/\/cgroup\.procs$/, '');
  };
  const read = async (controller: string, name: string) => (await readFile(`${directoryOf(controller)}/${name}`, 'utf8')).trim();
  if (manager.version === 'v1') {
    assert.equal(await read('memory', 'memory.limit_in_bytes'), String(64 * MEGABYTE));
    // v1 does not charge socket buffers to the memory limit; the runner gets a TCP limit of the same size.
    assert.equal(await read('memory', 'memory.kmem.tcp.limit_in_bytes'), String(64 * MEGABYTE));
    assert.equal(await read('cpu', 'cpu.shares'), '512');
  } else {
    assert.equal(await read('memory', 'memory.max'), String(64 * MEGABYTE));
    assert.equal(await read('cpu', 'cpu.weight'), String(Math.round(1 + ((512 - 2) * 9999) / (262_144 - 2))));
  }
  assert.equal(await read('pids', 'pids.max'), '77');
  assert.equal(await cgroup.oomKills(), 0);
  await cgroup.destroy();
  await assert.rejects(readFile(cgroup.procsFiles[0] ?? ''), /ENOENT/);
});
