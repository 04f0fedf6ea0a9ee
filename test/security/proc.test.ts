import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { describe, test } from 'node:test';
import { environmentSpec } from '../support/codeocean-client.js';
import { useDaemon } from '../support/fixture.js';
import { runPython } from '../support/security.js';

/*
 * Issue 8, "/proc/sys stays writable" and point 2: /proc as Docker leaves it. Every write probe
 * writes back exactly the value it read, so even a probe that succeeds changes nothing; the host's
 * values are read by this test process before and after. Opening for writing is only ever followed
 * by close, never by a write (the sysrq trigger included).
 */

const TOKEN = `proc-${randomUUID()}`;
const ENV_ID = 802;
const fixture = useDaemon({ token: TOKEN }, async ({ client }) => {
  assert.equal((await client.putEnvironment(environmentSpec(ENV_ID, { prewarmingPoolSize: 1 }))).status, 201);
});

const SYSCTLS = ['kernel/core_pattern', 'kernel/pid_max', 'vm/overcommit_memory', 'net/ipv4/ip_forward'];
const READ_ONLY_TREES = ['/proc/sysrq-trigger', '/proc/irq', '/proc/bus', '/proc/fs', '/proc/sys'];
const MASKED = ['/proc/kcore', '/proc/keys', '/proc/timer_list', '/proc/sched_debug', '/proc/acpi', '/proc/scsi'];

function hostSysctl(name: string): string {
  return readFileSync(`/proc/sys/${name}`, 'utf8');
}

describe("/proc like Docker's defaults", () => {
  test('privileged code cannot write /proc/sys (each probe writes back the value it read); host values unchanged', async () => {
    const { client } = fixture;
    const runnerId = await client.claim(ENV_ID);
    const before = Object.fromEntries(SYSCTLS.map((name) => [name, hostSysctl(name)]));
    const result = await runPython(
      client,
      runnerId,
      `
import os
for name in ${JSON.stringify(SYSCTLS)}:
    path = '/proc/sys/' + name
    try:
        with open(path, 'rb') as f:
            value = f.read()
    except Exception as ex:
        print(name, 'UNREADABLE', type(ex).__name__)
        continue
    try:
        fd = os.open(path, os.O_WRONLY)
    except OSError as ex:
        print(name, 'REFUSED', ex.strerror)
        continue
    try:
        os.write(fd, value)
        print(name, 'WRITTEN')
    except OSError as ex:
        print(name, 'REFUSED', ex.strerror)
    finally:
        os.close(fd)
`,
      { privilegedExecution: true },
    );
    const lines = result.stdout.trim().split(/\r?\n/);
    assert.equal(lines.length, SYSCTLS.length, `the probe did not run: ${result.stdout}${result.stderr}`);
    for (const name of SYSCTLS) assert.equal(hostSysctl(name), before[name], `host ${name} changed`);
    const written = lines.filter((line) => line.endsWith('WRITTEN'));
    assert.deepEqual(written, [], `privileged code wrote to /proc/sys:\n${result.stdout}`);
    assert.equal((await client.deleteRunner(runnerId)).status, 204);
  });

  test('/proc/sysrq-trigger, /proc/irq, /proc/bus, /proc/fs and /proc/sys cannot be opened for writing', async () => {
    const { client } = fixture;
    const runnerId = await client.claim(ENV_ID);
    const result = await runPython(
      client,
      runnerId,
      `
import os
opened = []
checked = 0
def probe(path):
    global checked
    checked += 1
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        return
    os.close(fd)  # never write: opening is the test
    opened.append(path)
for top in ${JSON.stringify(READ_ONLY_TREES)}:
    if os.path.isfile(top):
        probe(top)
        continue
    count = 0
    for root, dirs, files in os.walk(top):
        for name in files:
            if count < 400:
                probe(os.path.join(root, name))
                count += 1
        try:
            fd = os.open(os.path.join(root, '.poseidon-probe'), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)
            os.unlink(os.path.join(root, '.poseidon-probe'))
            opened.append(root + ' (create)')
        except OSError:
            pass
print('CHECKED', checked)
for path in opened:
    print('WRITABLE', path)
`,
      { privilegedExecution: true, timeLimit: 30, guardMs: 60_000 },
    );
    assert.match(result.stdout, /^CHECKED \d+$/m, `the probe did not run: ${result.stdout}${result.stderr}`);
    const writable = result.stdout.split(/\r?\n/).filter((line) => line.startsWith('WRITABLE'));
    assert.deepEqual(writable, [], `privileged code can open these for writing:\n${writable.join('\n')}`);
    assert.equal((await client.deleteRunner(runnerId)).status, 204);
  });

  for (const privilegedExecution of [true, false]) {
    test(`/proc/kcore, keys, timer_list, sched_debug, acpi and scsi are masked (privileged=${privilegedExecution})`, async () => {
      const { client } = fixture;
      const runnerId = await client.claim(ENV_ID);
      const result = await runPython(
        client,
        runnerId,
        `
import os
for path in ${JSON.stringify(MASKED)}:
    try:
        if os.path.isdir(path):
            entries = os.listdir(path)
            print(path, 'ENTRIES', len(entries), ' '.join(entries[:5]))
        else:
            with open(path, 'rb') as f:
                data = f.read(4096)
            print(path, 'BYTES', len(data))
    except Exception as ex:
        print(path, 'UNREADABLE', type(ex).__name__)
`,
        { privilegedExecution },
      );
      const lines = result.stdout.trim().split(/\r?\n/);
      assert.equal(lines.length, MASKED.length, `the probe did not run: ${result.stdout}${result.stderr}`);
      const exposed = lines.filter((line) => / (ENTRIES|BYTES) [1-9]/.test(line));
      assert.deepEqual(exposed, [], `these /proc entries show host information:\n${result.stdout}`);
      assert.equal((await client.deleteRunner(runnerId)).status, 204);
    });
  }

  test('/sys is not mounted', async () => {
    const { client } = fixture;
    const runnerId = await client.claim(ENV_ID);
    const result = await client.run(runnerId, 'ls -A /sys 2>/dev/null | wc -l; grep -c " sysfs " /proc/self/mountinfo', { privilegedExecution: true });
    assert.deepEqual(result.stdout.trim().split(/\r?\n/), ['0', '0'], `/sys is visible in the sandbox: ${result.stdout}`);
    assert.equal((await client.deleteRunner(runnerId)).status, 204);
  });
});
