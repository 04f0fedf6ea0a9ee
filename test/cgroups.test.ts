import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import fs, { closeSync, constants, existsSync, mkdtempSync, openSync, rmSync, writeFileSync } from 'node:fs';
import { open, readFile } from 'node:fs/promises';
import { syncBuiltinESMExports } from 'node:module';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import pino from 'pino';
import { createCgroupManager } from '../src/local/cgroups.js';

const MEGABYTE = 1024 * 1024;

test('a runner cgroup carries memory, CPU share and pids limits, and is removed again', async () => {
  const manager = await createCgroupManager('auto', 'poseidon-ts-test', pino({ level: 'silent' }));
  assert.notEqual(manager.version, 'off', 'these machines have cgroups; without them the limits are not enforced');
  const name = `limits-${process.pid}`;
  const cgroup = await manager.create(name, { memoryBytes: 64 * MEGABYTE, cpuShares: 512, pids: 77 });
  assert.ok(cgroup);
  // A sandbox stand-in joins every procs file, as the spawner's child does before it execs.
  const sandbox = spawn('sleep', ['60'], { stdio: 'ignore' });
  try {
    for (const file of cgroup.procsFiles) writeFileSync(file, String(sandbox.pid));
    const own = (controller: string) => {
      const file = cgroup.procsFiles.find((candidate) => manager.version === 'v2' || candidate.includes(`/${controller}/`));
      assert.ok(file, `no ${controller} cgroup`);
      return file.replace(/\/cgroup\.procs$/, '');
    };
    if (manager.version === 'v1') {
      // Idle, the sandbox has no memory cgroup of its own: it sits in the parent, which has no limit.
      assert.notEqual(path.basename(own('memory')), name);
      cgroup.claim();
      const memory = path.join(own('memory'), name);
      const read = async (file: string) => (await readFile(file, 'utf8')).trim();
      assert.equal(await read(`${memory}/memory.limit_in_bytes`), String(64 * MEGABYTE));
      // v1 does not charge socket buffers to the memory limit; the runner gets a TCP limit of the same size.
      assert.equal(await read(`${memory}/memory.kmem.tcp.limit_in_bytes`), String(64 * MEGABYTE));
      assert.equal(await read(`${memory}/cgroup.procs`), String(sandbox.pid), 'the claim moved the sandbox into its memory cgroup');
      assert.equal(await read(`${own('cpu')}/cpu.shares`), '512');
      assert.equal(await read(`${own('pids')}/pids.max`), '77');
      assert.equal(await cgroup.oomKills(), 0);
      await cgroup.destroy();
      for (const directory of [memory, own('pids'), own('cpu')]) assert.equal(existsSync(directory), false, `${directory} is left`);
    } else {
      cgroup.claim();
      const read = async (file: string) => (await readFile(`${own('memory')}/${file}`, 'utf8')).trim();
      assert.equal(await read('memory.max'), String(64 * MEGABYTE));
      assert.equal(await read('cpu.weight'), String(Math.round(1 + ((512 - 2) * 9999) / (262_144 - 2))));
      assert.equal(await read('pids.max'), '77');
      assert.equal(await cgroup.oomKills(), 0);
      await cgroup.destroy();
      assert.equal(existsSync(own('memory')), false);
    }
  } finally {
    sandbox.kill('SIGKILL');
  }
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
      // The runner's own directories (v1 puts an idle sandbox in the memory parent, which stays).
      const directories = cgroup.procsFiles.map((file) => path.dirname(file)).filter((entry) => path.basename(entry) === `pool-blocked-${process.pid}`);
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

/*
 * A process listed in the runner's pids cgroup can end before the claim moves it (bubblewrap's own
 * process leaves right after the sandbox starts; a waiting claim gets the runner at once): the kernel
 * answers ESRCH for it, and the claim moves the others instead of failing the learner's request.
 * The listing is given an already reaped pid, which the kernel then refuses exactly so.
 */
test('a claim skips a listed process that has ended, and fails when none is left', async (t) => {
  const manager = await createCgroupManager('auto', process.env.TEST_CGROUP_PARENT ?? 'poseidon-ts-test', pino({ level: 'silent' }));
  if (manager.version !== 'v1') return t.skip('the claim moves processes between cgroups only on cgroup v1');
  const gone = spawn('true', { stdio: 'ignore' });
  await new Promise((resolve) => gone.once('exit', resolve));
  const pidsFile = (cgroup: { procsFiles: string[] }) => cgroup.procsFiles.find((file) => file.includes('/pids/')) ?? '';
  const realRead = fs.readFileSync;
  const withDeadPid = (cgroup: { procsFiles: string[] }, alive: boolean) => {
    const patched = ((file: fs.PathOrFileDescriptor, options?: unknown) => {
      const content = realRead(file, options as BufferEncoding);
      return file === pidsFile(cgroup) ? `${String(gone.pid)}\n${alive ? content : ''}` : content;
    }) as typeof fs.readFileSync;
    fs.readFileSync = patched;
    syncBuiltinESMExports();
  };
  const restore = () => {
    fs.readFileSync = realRead;
    syncBuiltinESMExports();
  };
  const sandbox = spawn('sleep', ['60'], { stdio: 'ignore' });
  const cgroup = await manager.create(`claim-race-${process.pid}`, { memoryBytes: 32 * MEGABYTE, cpuShares: 100, pids: 16 });
  const lonely = await manager.create(`claim-none-${process.pid}`, { memoryBytes: 32 * MEGABYTE, cpuShares: 100, pids: 16 });
  assert.ok(cgroup && lonely);
  try {
    for (const file of cgroup.procsFiles) writeFileSync(file, String(sandbox.pid));
    withDeadPid(cgroup, true);
    try {
      cgroup.claim();
    } finally {
      restore();
    }
    const memory = path.join(path.dirname(cgroup.procsFiles[0] ?? ''), `claim-race-${process.pid}`);
    assert.equal((await readFile(path.join(memory, 'cgroup.procs'), 'utf8')).trim(), String(sandbox.pid), 'the live process was moved');
    withDeadPid(lonely, false);
    try {
      assert.throws(() => lonely.claim(), /every process ended before the claim/);
    } finally {
      restore();
    }
  } finally {
    sandbox.kill('SIGKILL');
    await new Promise((resolve) => sandbox.once('exit', resolve));
    await cgroup.destroy();
    await lonely.destroy();
  }
});
