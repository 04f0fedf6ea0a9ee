import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { closeSync, constants, existsSync, mkdtempSync, openSync, rmSync } from 'node:fs';
import { open, readFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
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

/*
 * Runner cgroups are made and removed without libuv's thread pool: a pool held up by slow file
 * I/O (an image being unpacked, a stalled disk) must not stall the build or teardown of sandboxes.
 * Every thread of the pool is parked in open() of a FIFO that has no writer until the end.
 */
test('runner cgroups are created and removed while every thread of the I/O pool is blocked', async () => {
  const manager = await createCgroupManager('auto', process.env.TEST_CGROUP_PARENT ?? 'poseidon-ts-test', pino({ level: 'silent' }));
  const directory = mkdtempSync(path.join(tmpdir(), 'cgroup-pool-'));
  const fifo = path.join(directory, 'fifo');
  execFileSync('mkfifo', [fifo]);
  const threads = Number(process.env.UV_THREADPOOL_SIZE ?? 4);
  const parked = Array.from({ length: threads }, () => open(fifo, 'r'));
  let writer: number | undefined;
  try {
    const work = (async () => {
      const cgroup = await manager.create(`pool-blocked-${process.pid}`, { memoryBytes: 32 * MEGABYTE, cpuShares: 100, pids: 16 });
      assert.ok(cgroup);
      const directories = cgroup.procsFiles.map((file) => path.dirname(file));
      assert.ok(directories.every((entry) => existsSync(entry)));
      await cgroup.destroy();
      return directories;
    })();
    const outcome = await Promise.race([work, new Promise<'stalled'>((resolve) => setTimeout(() => resolve('stalled'), 20_000).unref())]);
    assert.notEqual(outcome, 'stalled', 'creating or removing a cgroup waited for the I/O thread pool');
    assert.ok(Array.isArray(outcome) && outcome.every((entry) => !existsSync(entry)), 'the cgroup is gone');
  } finally {
    // A writer releases the parked opens (O_NONBLOCK: it fails only when no reader is there yet).
    for (let attempt = 0; attempt < 100 && writer === undefined; attempt += 1) {
      try {
        writer = openSync(fifo, constants.O_WRONLY | constants.O_NONBLOCK);
      } catch {
        await new Promise((resolve) => setTimeout(resolve, 10));
      }
    }
    await Promise.all(parked.map(async (handle) => (await handle).close()));
    if (writer !== undefined) closeSync(writer);
    rmSync(directory, { recursive: true, force: true });
  }
});
