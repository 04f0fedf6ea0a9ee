import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { describe, test } from 'node:test';
import { environmentSpec } from '../support/codeocean-client.js';
import { useDaemon } from '../support/fixture.js';
import { PY_SYSCALL, runPython } from '../support/security.js';

/*
 * Issue 8, "no seccomp, user namespaces allowed" and point 3: the kernel interfaces Docker's default
 * seccomp profile closes must be closed here too, for learner code and for privileged code. Each
 * call is made with harmless arguments; a refused call fails with EPERM, as under Docker.
 */

const TOKEN = `syscalls-${randomUUID()}`;
const ENV_ID = 805;
const fixture = useDaemon({ token: TOKEN }, async ({ client }) => {
  assert.equal((await client.putEnvironment(environmentSpec(ENV_ID, { prewarmingPoolSize: 1 }))).status, 201);
});

const SYSCALL_PROBE = `${PY_SYSCALL}
params = ctypes.create_string_buffer(120)       # struct io_uring_params, zeroed
attr = ctypes.create_string_buffer(128)         # struct perf_event_attr: software counter, own task
ctypes.memmove(attr, (ctypes.c_uint32 * 2)(1, 128), 8)
bpf_attr = ctypes.create_string_buffer(128)
probes = [
  ('keyctl', (0, -4, 0)),                       # KEYCTL_GET_KEYRING_ID of the user keyring
  ('add_key', (b'user', b'poseidon-probe', b'x', 1, -2)),
  ('request_key', (b'user', b'poseidon-probe', None, 0)),
  ('io_uring_setup', (1, params)),
  ('perf_event_open', (attr, 0, -1, -1, 0)),
  ('userfaultfd', (0,)),
  ('bpf', (0, bpf_attr, 128)),                  # BPF_MAP_CREATE with an empty attribute
  ('unshare', (0x10000000,)),                   # CLONE_NEWUSER
  ('unshare', (0x00020000,)),                   # CLONE_NEWNS
]
for name, args in probes:
    result, err = sys(name, *args)
    if result >= 0 and name in ('io_uring_setup', 'perf_event_open', 'userfaultfd', 'bpf'):
        os.close(result)
    print(name, err)
`;

describe("a seccomp filter in the spirit of Docker's default profile", () => {
  for (const privilegedExecution of [false, true]) {
    test(`unshare -Urm / -Urn fail (privileged=${privilegedExecution})`, async () => {
      const { client } = fixture;
      const runnerId = await client.claim(ENV_ID);
      for (const flags of ['-Urm', '-Urn', '-m', '-n']) {
        if (!privilegedExecution && !flags.startsWith('-U')) continue;
        const result = await client.run(runnerId, `unshare ${flags} true && echo ESCAPED || echo contained`, { privilegedExecution });
        assert.equal(result.stdout.trim(), 'contained', `unshare ${flags} succeeded (privileged=${privilegedExecution}): ${result.stdout}${result.stderr}`);
      }
      assert.equal((await client.deleteRunner(runnerId)).status, 204);
    });

    test(`keyctl, add_key, request_key, io_uring_setup, perf_event_open, userfaultfd, bpf, unshare fail with EPERM (privileged=${privilegedExecution})`, async () => {
      const { client } = fixture;
      const runnerId = await client.claim(ENV_ID);
      const result = await runPython(client, runnerId, SYSCALL_PROBE, { privilegedExecution });
      const lines = result.stdout.trim().split(/\r?\n/);
      assert.equal(lines.length, 9, `the probe did not run: ${result.stdout}${result.stderr}`);
      const allowed = lines.filter((line) => !line.endsWith(' EPERM'));
      assert.deepEqual(allowed, [], `these calls are not refused with EPERM:\n${result.stdout}`);
      assert.equal((await client.deleteRunner(runnerId)).status, 204);
    });
  }

  test('privileged code cannot mount, even a tmpfs inside the sandbox', async () => {
    const { client } = fixture;
    const runnerId = await client.claim(ENV_ID);
    const result = await client.run(runnerId, 'mkdir -p /tmp/m && mount -t tmpfs none /tmp/m && echo MOUNTED || echo contained', { privilegedExecution: true });
    assert.equal(result.stdout.trim(), 'contained', `privileged code mounted a file system: ${result.stdout}${result.stderr}`);
    assert.equal((await client.deleteRunner(runnerId)).status, 204);
  });
});
