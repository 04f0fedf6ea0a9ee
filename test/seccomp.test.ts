import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { chmodSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import type { AgentClient, AgentExecOptions } from '../src/local/agent/agent-client.js';
import { ensureAgentBuilt } from '../src/local/binaries.js';
import { seccompProgram } from '../src/local/seccomp.js';
import { type AgentSandbox, startAgentSandbox } from './support/agent-sandbox.js';

/*
 * The seccomp filter of every sandbox (agent/seccomp-policy.c), loaded by bwrap --seccomp into a
 * real sandbox running the agent: real programs, privileged and not, try what the filter forbids,
 * and ordinary work still succeeds. A control sandbox without the filter shows the probes would
 * succeed there, so a pass means the filter refused them, not something else.
 */

const ENV = { PATH: '/usr/local/bin:/usr/bin:/bin', LANG: 'C.UTF-8' };
const UNPRIVILEGED: AgentExecOptions = { env: ENV, privileged: false };
const PRIVILEGED: AgentExecOptions = { env: ENV, privileged: true };
const SIGSYS_EXIT = 128 + 31;

interface Ran {
  exitCode: number;
  stdout: string;
  stderr: string;
}

async function run(client: AgentClient, argv: string[], options: AgentExecOptions = UNPRIVILEGED, stdin?: string): Promise<Ran> {
  let stdout = '';
  let stderr = '';
  const execution = client.exec(argv, options, {
    onStdout: (chunk) => (stdout += chunk.toString()),
    onStderr: (chunk) => (stderr += chunk.toString()),
  });
  if (stdin !== undefined) execution.writeStdin(Buffer.from(stdin));
  execution.closeStdin();
  const { exitCode } = await execution.result;
  return { exitCode, stdout, stderr };
}

const sh = (client: AgentClient, script: string, options?: AgentExecOptions): Promise<Ran> => run(client, ['/bin/sh', '-c', script], options);

/*
 * Each probe makes one raw syscall through ctypes and prints `name result errno-name`. Only
 * x86_64 numbers: the filter admits no other ABI.
 */
const PROBES = String.raw`
import ctypes, errno, os, struct
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def call(nr, *args):
    ctypes.set_errno(0)
    result = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) if isinstance(a, int) else a for a in args])
    return result, ctypes.get_errno()
def report(name, result, err):
    print(name, result, errno.errorcode.get(err, err) if result < 0 else 0, flush=True)
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x20000, 0x4000000, 0x8000000, 0x10000000, 0x20000000, 0x40000000
SIGCHLD = 17
def clone(name, flags):
    result, err = call(56, flags | SIGCHLD, 0, 0, 0, 0)
    if result == 0:
        os._exit(0)
    if result > 0:
        os.waitpid(result, 0)
    report(name, result, err)
buffer = ctypes.create_string_buffer(256)
report('keyctl', *call(250, 0, -3, 1))                                  # KEYCTL_GET_KEYRING_ID, session keyring, create
report('add_key', *call(248, b'user', b'probe', b'secret', 6, -2))        # into the process keyring
report('request_key', *call(249, b'user', b'probe', None, 0))
report('io_uring_setup', *call(425, 4, buffer))
struct.pack_into('II', buffer, 0, 1, 128)                                # PERF_TYPE_SOFTWARE, attr size
report('perf_event_open', *call(298, buffer, 0, -1, -1, 0))
report('userfaultfd', *call(323, 0o2000000 | 1))                         # O_CLOEXEC | UFFD_USER_MODE_ONLY
report('bpf', *call(321, 0, buffer, 72))                                 # BPF_MAP_CREATE
report('mount', *call(165, b'none', b'/tmp', b'tmpfs', 0, None))
report('umount2', *call(166, b'/tmp', 0))
report('chroot', *call(161, b'/tmp'))
report('fsopen', *call(430, b'tmpfs', 0))
report('open_tree', *call(428, -100, b'/tmp', 1))                        # OPEN_TREE_CLONE
report('pivot_root', *call(155, b'/tmp', b'/tmp'))
ns = os.open('/proc/self/ns/uts', os.O_RDONLY)
report('setns', *call(308, ns, 0))
report('unshare_user', *call(272, CLONE_NEWUSER))
report('unshare_files', *call(272, 0x400))                               # CLONE_FILES: no namespace, still refused
clone('clone_newuser', CLONE_NEWUSER)
clone('clone_newns', CLONE_NEWNS)
clone('clone_newnet', CLONE_NEWNET)
clone('clone_newpid', CLONE_NEWPID)
clone('clone_newuts', CLONE_NEWUTS)
clone('clone_newipc', CLONE_NEWIPC)
struct.pack_into('QQQQQQQQ', buffer, 0, CLONE_NEWUSER, 0, 0, 0, SIGCHLD, 0, 0, 0)
result, err = call(435, buffer, 64)
if result == 0:
    os._exit(0)
report('clone3', result, err)
report('open_by_handle_at', *call(304, -100, buffer, 0))
report('kexec_load', *call(246, 0, 0, None, 0))
report('init_module', *call(175, None, 0, b''))
report('reboot', *call(169, 0xfee1dead, 672274793, 0x4321fedc, None))  # LINUX_REBOOT_CMD_CAD_OFF: harmless even if allowed
report('swapon', *call(167, b'/nonexistent', 0))
report('settimeofday', *call(164, None, None))
report('acct', *call(163, None))
report('syslog', *call(103, 10, None, 0))                                # SYSLOG_ACTION_SIZE_BUFFER
report('personality_no_aslr', *call(135, 0x0040000))                    # ADDR_NO_RANDOMIZE
report('personality_query', *call(135, 0xffffffff))
report('personality_linux32', *call(135, 0x0008))
report('personality_reset', *call(135, 0))
pidfd, err = call(434, 1, 0)                                             # pidfd_open(1)
report('pidfd_open', pidfd, err)
report('pidfd_getfd', *call(438, pidfd, 0, 0))
`;

function parseProbes(stdout: string): Map<string, { result: number; error: string }> {
  const results = new Map<string, { result: number; error: string }>();
  for (const line of stdout.trim().split('\n')) {
    const [name, result, error] = line.split(' ');
    assert.ok(name !== undefined && result !== undefined && error !== undefined, `bad probe line: ${line}`);
    results.set(name, { result: Number(result), error });
  }
  return results;
}

const REFUSED_WITH_EPERM = [
  'keyctl',
  'add_key',
  'request_key',
  'io_uring_setup',
  'perf_event_open',
  'userfaultfd',
  'bpf',
  'mount',
  'umount2',
  'chroot',
  'fsopen',
  'open_tree',
  'pivot_root',
  'setns',
  'unshare_user',
  'unshare_files',
  'clone_newuser',
  'clone_newns',
  'clone_newnet',
  'clone_newpid',
  'clone_newuts',
  'clone_newipc',
  'open_by_handle_at',
  'kexec_load',
  'init_module',
  'reboot',
  'swapon',
  'settimeofday',
  'acct',
  'syslog',
  'personality_no_aslr',
  'pidfd_getfd',
];

/* A static x86_64 program that makes the syscall named by argv[1] through another ABI. */
const ABI_PROBE_SOURCE = String.raw`
#include <stdio.h>
#include <string.h>
int main(int argc, char **argv)
{
	long result;
	if (argc == 2 && strcmp(argv[1], "int80") == 0) {
		/* i386 getpid (20) through the 32-bit entry point. */
		__asm__ volatile ("int $0x80" : "=a"(result) : "a"(20L) : "memory");
	} else if (argc == 2 && strcmp(argv[1], "x32") == 0) {
		/* getpid (39) with the x32 bit. */
		__asm__ volatile ("syscall" : "=a"(result) : "a"(0x40000000L | 39L) : "rcx", "r11", "memory");
	} else {
		__asm__ volatile ("syscall" : "=a"(result) : "a"(39L) : "rcx", "r11", "memory");
	}
	printf("returned %ld\n", result);
	return 0;
}
`;

describe('seccomp filter', () => {
  let sandbox: AgentSandbox;
  let control: AgentSandbox;
  let client: AgentClient;
  let probeDir: string;

  before(async () => {
    ensureAgentBuilt();
    probeDir = mkdtempSync(path.join(tmpdir(), 'poseidon-seccomp-'));
    chmodSync(probeDir, 0o755); // unprivileged executions run the probe too
    writeFileSync(path.join(probeDir, 'abi-probe.c'), ABI_PROBE_SOURCE);
    execFileSync('gcc', ['-static', '-O1', '-o', path.join(probeDir, 'abi-probe'), path.join(probeDir, 'abi-probe.c')]);
    const mountProbes = ['--ro-bind', probeDir, '/probes'];
    sandbox = await startAgentSandbox(mountProbes, { seccomp: seccompProgram() });
    control = await startAgentSandbox(mountProbes);
    client = sandbox.client;
  });
  after(async () => {
    await sandbox?.stop();
    await control?.stop();
    if (probeDir) rmSync(probeDir, { recursive: true, force: true });
  });

  test('the program is read once and is whole BPF instructions', () => {
    const program = seccompProgram();
    assert.equal(seccompProgram(), program, 'cached');
    assert.ok(program.length > 0 && program.length % 8 === 0, `${program.length} bytes`);
  });

  test('every process of the sandbox has the filter, the init process and the agent included', async () => {
    const result = await sh(client, 'grep -H "^Seccomp:" /proc/[0-9]*/status');
    const modes = result.stdout.trim().split('\n');
    // bwrap's init (1), the agent (2), and this shell (which became grep).
    assert.ok(modes.length >= 3 && modes.some((line) => line.startsWith('/proc/1/')), result.stdout);
    for (const line of modes) assert.match(line, /Seccomp:\s*2$/, line);
  });

  test('unshare -Urm and unshare -Urn fail with EPERM, privileged or not', async () => {
    for (const options of [UNPRIVILEGED, PRIVILEGED]) {
      for (const flags of ['-Urm', '-Urn']) {
        const result = await run(client, ['unshare', flags, 'true'], options);
        assert.notEqual(result.exitCode, 0, `unshare ${flags} privileged=${options.privileged}`);
        assert.match(result.stderr, /Operation not permitted/, `unshare ${flags} privileged=${options.privileged}`);
      }
    }
  });

  test('raw syscall probes are refused with EPERM, privileged or not', async () => {
    for (const options of [UNPRIVILEGED, PRIVILEGED]) {
      const result = await run(client, ['python3', '-'], options, PROBES);
      assert.equal(result.exitCode, 0, result.stderr);
      const probes = parseProbes(result.stdout);
      for (const name of REFUSED_WITH_EPERM) {
        assert.deepEqual(probes.get(name), { result: -1, error: 'EPERM' }, `${name} privileged=${options.privileged}`);
      }
      assert.deepEqual(probes.get('clone3'), { result: -1, error: 'ENOSYS' }, 'clone3 answers ENOSYS so libc falls back to clone');
      for (const name of ['personality_query', 'personality_linux32', 'personality_reset']) {
        assert.ok((probes.get(name)?.result ?? -1) >= 0, `${name} stays allowed: ${JSON.stringify(probes.get(name))}`);
      }
      assert.ok((probes.get('pidfd_open')?.result ?? -1) >= 0, 'pidfd_open stays allowed');
    }
  });

  test('control: without the filter the same probes get past seccomp', async () => {
    // Shows the probes reach the calls they name; the results differ with the host's settings.
    const result = await run(control.client, ['python3', '-'], UNPRIVILEGED, PROBES);
    assert.equal(result.exitCode, 0, result.stderr);
    const probes = parseProbes(result.stdout);
    assert.ok((probes.get('keyctl')?.result ?? -1) > 0, `keyctl: ${JSON.stringify(probes.get('keyctl'))}`);
    assert.notEqual(probes.get('clone3')?.error, 'ENOSYS');
    assert.notEqual(probes.get('personality_no_aslr')?.error, 'EPERM');
    const unshare = await run(control.client, ['unshare', '-Urm', 'true']);
    assert.equal(unshare.exitCode, 0, `unshare -Urm without the filter: ${unshare.stderr}`);
  });

  test('other ABIs are refused: i386 int 0x80 and x32 syscall numbers kill the process', async () => {
    const native = await run(client, ['/probes/abi-probe', 'native']);
    assert.equal(native.exitCode, 0);
    assert.match(native.stdout, /^returned [1-9]\d*\n$/, 'a native getpid works');
    for (const abi of ['int80', 'x32']) {
      const result = await run(client, ['/probes/abi-probe', abi]);
      assert.equal(result.exitCode, SIGSYS_EXIT, `${abi}: ${JSON.stringify(result)}`);
      assert.equal(result.stdout, '', `${abi} never returned`);
    }
  });

  test('ordinary work still runs: python, fork and exec, background jobs, pipes, threads, ls', async () => {
    const python = await run(client, [
      'python3',
      '-c',
      'import subprocess, threading; t = threading.Thread(target=print, args=("thread",)); t.start(); t.join(); print(subprocess.run(["echo", "child"], capture_output=True, text=True).stdout.strip())',
    ]);
    assert.deepEqual(python, { exitCode: 0, stdout: 'thread\nchild\n', stderr: '' });
    const shell = await sh(client, 'sleep 0.1 & wait && echo waited; echo piped | tr a-z A-Z; ls / >/dev/null && echo listed; (exit 3); echo $?');
    assert.deepEqual(shell, { exitCode: 0, stdout: 'waited\nPIPED\nlisted\n3\n', stderr: '' });
    const privileged = await sh(client, 'id -u; touch /tmp/owned && chown 65534 /tmp/owned && stat -c %u /tmp/owned', PRIVILEGED);
    assert.deepEqual(privileged, { exitCode: 0, stdout: '0\n65534\n', stderr: '' });
  });

  test("ptrace of the runner's own processes stays allowed (as in Docker on kernels >= 4.8)", async () => {
    // PTRACE_TRACEME (0) in a forked child, which then stops itself and is released.
    const script =
      'import ctypes, os, signal\nlibc = ctypes.CDLL(None, use_errno=True)\npid = os.fork()\nif pid == 0:\n    r = libc.ptrace(0, 0, None, None)\n    os.kill(os.getpid(), signal.SIGSTOP)\n    os._exit(0 if r == 0 else 1)\n_, status = os.waitpid(pid, os.WUNTRACED)\nassert os.WIFSTOPPED(status)\nlibc.ptrace(7, pid, None, None)\n_, status = os.waitpid(pid, 0)\nprint(os.WEXITSTATUS(status))\n';
    const result = await run(client, ['python3', '-'], UNPRIVILEGED, script);
    assert.deepEqual(result, { exitCode: 0, stdout: '0\n', stderr: '' });
  });

  test('no execution can ptrace the agent, privileged or not', async () => {
    // The reason ptrace can stay allowed: the agent is non-dumpable and has capabilities no execution keeps.
    const script =
      'import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\nfor pid in sorted(int(p) for p in os.listdir("/proc") if p.isdigit()):\n    try:\n        comm = open(f"/proc/{pid}/comm").read().strip()\n    except OSError:\n        continue\n    if comm == "agent":\n        result = libc.ptrace(16, pid, None, None)\n        print(pid, result, os.strerror(ctypes.get_errno()) if result else "attached")\n';
    for (const options of [UNPRIVILEGED, PRIVILEGED]) {
      const result = await run(client, ['python3', '-'], options, script);
      assert.equal(result.exitCode, 0, result.stderr);
      const lines = result.stdout.trim().split('\n');
      assert.ok(lines.length >= 1 && lines[0] !== '', 'the agent was found');
      for (const line of lines) assert.match(line, / -1 Operation not permitted$/, `privileged=${options.privileged}: ${line}`);
    }
  });

  test("the agent's file operations work under the filter", async () => {
    await client.updateFiles({ delete: [], copy: [{ path: 'dir/file.txt', isDirectory: false, content: Buffer.from('content') }] });
    const listing = await client.list('./', true);
    assert.ok(
      listing.some((entry) => entry.name.endsWith('file.txt')),
      'the copied file is listed',
    );
    const { stream } = await client.read('dir/file.txt');
    const chunks: Buffer[] = [];
    for await (const chunk of stream) chunks.push(chunk as Buffer);
    assert.equal(Buffer.concat(chunks).toString(), 'content');
  });
});
