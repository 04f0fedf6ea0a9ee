import assert from 'node:assert/strict';
import { type ChildProcess, execFile, execFileSync, spawn } from 'node:child_process';
import { randomBytes, randomInt } from 'node:crypto';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { promisify } from 'node:util';
import { type AttachedNetwork, createRunnerNetworks, type RunnerNetworkOptions, type RunnerNetworks } from '../../src/local/network/index.js';
import { CodeOceanClient, environmentSpec } from '../support/codeocean-client.js';
import { startDaemon } from '../support/daemon.js';

/*
 * The private network of runners with networkAccess, against the real host's kernel. Everything a
 * runner could reach is made by this test: test hosts in network namespaces of their own (a
 * "public" one on TEST-NET-2, a private 10.x one, a metadata service on 169.254.169.254), each
 * joined to the host by a veth pair, and listeners on the host. The only other addresses probed
 * are this machine's own, which never leave it. Runners are `unshare --net` processes, as the
 * spawner's sandboxes are: a namespace of the host's user namespace with nothing but loopback.
 * Names, subnets and ports are random, so parallel checkouts do not collide; everything made is
 * removed in after(), also when a test fails.
 */

const SUFFIX = randomBytes(3).toString('hex');
const RUNNER_NET = randomInt(0, 256);
const PUBLIC_BLOCK = 4 * randomInt(1, 63); // a /30 of 198.51.100.0/24
const PRIVATE_NET = randomInt(0, 256);
const RUNNER_PORT = 8080;

interface TestHost {
  name: string;
  namespace: string;
  hostInterface: string;
  hostAddress: string;
  address: string;
  port: number;
}

const TEST_HOSTS: TestHost[] = [
  {
    name: 'public',
    namespace: `pts-pub-${SUFFIX}`,
    hostInterface: `ptp${SUFFIX}`,
    hostAddress: `198.51.100.${PUBLIC_BLOCK + 1}`,
    address: `198.51.100.${PUBLIC_BLOCK + 2}`,
    port: 8000,
  },
  {
    name: 'private',
    namespace: `pts-prv-${SUFFIX}`,
    hostInterface: `ptq${SUFFIX}`,
    hostAddress: `10.217.${PRIVATE_NET}.1`,
    address: `10.217.${PRIVATE_NET}.2`,
    port: 8000,
  },
  { name: 'metadata', namespace: `pts-md-${SUFFIX}`, hostInterface: `ptm${SUFFIX}`, hostAddress: '169.254.169.253', address: '169.254.169.254', port: 80 },
];
const [PUBLIC, PRIVATE, METADATA] = TEST_HOSTS as [TestHost, TestHost, TestHost];

const workDir = mkdtempSync(path.join(os.tmpdir(), 'pts-network-test-'));
const SERVER = path.join(workDir, 'server.cjs');
const PROBE = path.join(workDir, 'probe.cjs');
const processes: ChildProcess[] = [];
const openNetworks: RunnerNetworks[] = [];
const bridges: string[] = [];
const tables: string[] = [];

/* Answers every connection with "<name> <peer address>" and closes it. */
writeFileSync(
  SERVER,
  `const net = require('node:net');
const [port, name] = process.argv.slice(2);
net.createServer((socket) => socket.end(name + ' ' + socket.remoteAddress.replace(/^::ffff:/, ''))).listen(Number(port), '0.0.0.0', () => console.log('ready'));
`,
);
/* Connects to every target at once; prints {target: answer} or {target: "ERR <code>"} as JSON. */
writeFileSync(
  PROBE,
  `const net = require('node:net');
const targets = JSON.parse(process.argv[2]);
Promise.all(targets.map((target) => new Promise((resolve) => {
  const [, host, port] = /^\\[?(.*?)\\]?:(\\d+)$/.exec(target);
  const socket = net.connect({ host, port: Number(port) });
  let data = '';
  const timer = setTimeout(() => { socket.destroy(); resolve([target, 'ERR TIMEOUT']); }, 1500);
  socket.on('data', (chunk) => { data += chunk; });
  socket.on('end', () => { clearTimeout(timer); resolve([target, data]); });
  socket.on('error', (error) => { clearTimeout(timer); resolve([target, 'ERR ' + error.code]); });
}))).then((results) => console.log(JSON.stringify(Object.fromEntries(results))));
`,
);

/*
 * The learner's program: prints its own address (from a UDP socket "connected" to argv[1]) and
 * the gateway, then tries every "host:port" given as JSON in argv[2] (the word GATEWAY stands for
 * the gateway) and prints {target: answer or "ERR ..."} as JSON.
 */
const LEARNER_PROBE = `import json, socket, struct, sys
from concurrent.futures import ThreadPoolExecutor
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.connect((sys.argv[1], 9))
own = udp.getsockname()[0]
gateway = None
for line in open('/proc/net/route').read().splitlines()[1:]:
    fields = line.split()
    if fields[1] == '00000000':
        gateway = socket.inet_ntoa(struct.pack('<L', int(fields[2], 16)))
def probe(target):
    host, port = target.replace('GATEWAY', gateway).rsplit(':', 1)
    try:
        with socket.create_connection((host.strip('[]'), int(port)), timeout=1.5) as connection:
            data = b''
            while True:
                chunk = connection.recv(4096)
                if not chunk:
                    return data.decode()
                data += chunk
    except Exception as error:
        return 'ERR ' + type(error).__name__
targets = json.loads(sys.argv[2])
with ThreadPoolExecutor(max(1, len(targets))) as pool:
    answers = dict(zip(targets, pool.map(probe, targets)))
print(json.dumps({'own': own, 'gateway': gateway, 'answers': answers}))
`;

function sh(command: string, args: string[]): string {
  return execFileSync(command, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
}

function quietly(command: string, args: string[]): void {
  try {
    execFileSync(command, args, { stdio: 'ignore' });
  } catch {
    // cleanup of something that may not exist
  }
}

/* Starts a long-running process and waits for its first line of output, if asked to. */
async function background(command: string, args: string[], waitForLine: boolean): Promise<ChildProcess> {
  const child = spawn(command, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  processes.push(child);
  if (waitForLine) {
    await new Promise<void>((resolve, reject) => {
      let stderr = '';
      child.stderr?.on('data', (chunk: Buffer) => {
        stderr += chunk.toString();
      });
      child.stdout?.once('data', () => resolve());
      child.once('exit', (code) => reject(new Error(`${command} ${args.join(' ')} exited (${code}): ${stderr}`)));
    });
  } else {
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  return child;
}

/* A stand-in for a sandbox: a process alone in a fresh network namespace. */
async function runnerNamespace(): Promise<number> {
  const child = await background('unshare', ['--net', 'sleep', 'infinity'], false);
  const pid = child.pid;
  assert.ok(pid !== undefined);
  // unshare execs sleep once the namespace exists.
  for (let attempt = 0; attempt < 100 && readFileSync(`/proc/${pid}/comm`, 'utf8').trim() !== 'sleep'; attempt += 1) {
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
  return pid;
}

/* Runs a command in a runner's network namespace (only there: same mounts, same user). */
function inRunner(pid: number, args: string[]): string {
  return sh('nsenter', [`--net=/proc/${pid}/ns/net`, ...args]);
}

function serveInRunner(pid: number, name: string): Promise<ChildProcess> {
  return background('nsenter', [`--net=/proc/${pid}/ns/net`, process.execPath, SERVER, String(RUNNER_PORT), name], true);
}

/* Asynchronous, so that listeners of this process (host services, port relays) can answer. */
async function probeFrom(pid: number | undefined, targets: string[]): Promise<Record<string, string>> {
  const command = [...(pid === undefined ? [] : ['nsenter', `--net=/proc/${pid}/ns/net`]), process.execPath, PROBE, JSON.stringify(targets)];
  const { stdout } = await promisify(execFile)(command[0] as string, command.slice(1), { encoding: 'utf8' });
  return JSON.parse(stdout) as Record<string, string>;
}

const probeFromHost = (targets: string[]): Promise<Record<string, string>> => probeFrom(undefined, targets);

async function listen(host: string): Promise<net.Server> {
  const server = net.createServer((socket) => socket.end('host'));
  await new Promise<void>((resolve) => server.listen(0, host, resolve));
  return server;
}

const portOf = (server: net.Server): number => (server.address() as net.AddressInfo).port;

function sysctl(name: string): string {
  return readFileSync(`/proc/sys/net/ipv4/conf/${name}/forwarding`, 'utf8').trim();
}

let networkCount = 0;

/* Every network gets a subnet of its own: two bridges with one subnet would steal each other's routes. */
function networkOptions(overrides: Partial<RunnerNetworkOptions> = {}): RunnerNetworkOptions {
  const id = randomBytes(3).toString('hex');
  networkCount += 1;
  const options: RunnerNetworkOptions = {
    bridge: `ptb${id}`,
    table: `pts_test_${id}`,
    subnet: `10.216.${(RUNNER_NET + networkCount) % 256}.0/24`,
    hostAddress: '127.0.0.1',
    allowedPrivate: [],
    uplinks: TEST_HOSTS.map((host) => host.hostInterface),
    stateFile: path.join(workDir, `state-${id}.json`),
    ...overrides,
  };
  bridges.push(options.bridge);
  tables.push(options.table);
  return options;
}

async function networks(overrides: Partial<RunnerNetworkOptions> = {}): Promise<RunnerNetworks> {
  const made = await createRunnerNetworks(networkOptions(overrides));
  openNetworks.push(made);
  return made;
}

function leftovers(): string {
  const links = sh('ip', ['-o', 'link', 'show']);
  const nft = sh('nft', ['list', 'tables']);
  return [...bridges.filter((bridge) => links.includes(`${bridge}:`)), ...tables.filter((table) => nft.includes(table))].join(', ');
}

/* This machine's own addresses (loopback excluded: that is the runner's own inside its namespace). */
function hostAddresses(): string[] {
  return Object.values(os.networkInterfaces())
    .flat()
    .filter((entry) => entry !== undefined && !entry.internal && !entry.address.startsWith('fe80'))
    .map((entry) => (entry as os.NetworkInterfaceInfo).address)
    .filter((address) => !address.startsWith('10.216.'));
}

const target = (address: string, port: number): string => (address.includes(':') ? `[${address}]:${port}` : `${address}:${port}`);

describe('private networks of runners with network access', () => {
  let loopbackService: net.Server;
  let anyAddressService: net.Server;
  const forwardingBefore = new Map<string, string>();

  before(async () => {
    for (const host of TEST_HOSTS) {
      sh('ip', ['netns', 'add', host.namespace]);
      sh('ip', ['link', 'add', host.hostInterface, 'type', 'veth', 'peer', 'name', 'eth0', 'netns', host.namespace]);
      sh('ip', ['addr', 'add', `${host.hostAddress}/30`, 'dev', host.hostInterface]);
      sh('ip', ['link', 'set', host.hostInterface, 'up']);
      sh('ip', ['-n', host.namespace, 'addr', 'add', `${host.address}/30`, 'dev', 'eth0']);
      sh('ip', ['-n', host.namespace, 'link', 'set', 'eth0', 'up']);
      sh('ip', ['-n', host.namespace, 'link', 'set', 'lo', 'up']);
      forwardingBefore.set(host.hostInterface, sysctl(host.hostInterface));
      await background('ip', ['netns', 'exec', host.namespace, process.execPath, SERVER, String(host.port), host.name], true);
    }
    loopbackService = await listen('127.0.0.1');
    anyAddressService = await listen('0.0.0.0');
  });

  after(async () => {
    await Promise.allSettled(openNetworks.map((made) => made.close()));
    loopbackService?.close();
    anyAddressService?.close();
    for (const child of processes) child.kill('SIGKILL');
    for (const host of TEST_HOSTS) {
      quietly('ip', ['link', 'del', host.hostInterface]);
      quietly('ip', ['netns', 'del', host.namespace]);
    }
    for (const bridge of bridges) quietly('ip', ['link', 'del', bridge]);
    for (const table of tables) quietly('nft', ['delete', 'table', 'inet', table]);
    rmSync(workDir, { recursive: true, force: true });
  });

  test('control: every test host and host listener answers from the host itself', async () => {
    const answers = await probeFromHost([...TEST_HOSTS.map((host) => target(host.address, host.port)), target('127.0.0.1', portOf(loopbackService))]);
    assert.deepEqual(
      Object.values(answers).map((answer) => answer.split(' ')[0]),
      ['public', 'private', 'metadata', 'host'],
    );
  });

  test('a runner reaches a public host through NAT and nothing of the host, other runners, private or link-local addresses', async () => {
    const made = await networks();
    const [alicePid, bobPid] = [await runnerNamespace(), await runnerNamespace()];
    const alice = await made.attach('alice', alicePid, []);
    const bob = await made.attach('bob', bobPid, []);
    await serveInRunner(bobPid, 'bob');
    const runnerNet = `10.216.${(RUNNER_NET + networkCount) % 256}`;
    const gateway = `${runnerNet}.1`;
    assert.equal(alice.address, `${runnerNet}.2`);

    const answers = await probeFrom(alicePid, [
      target(PUBLIC.address, PUBLIC.port),
      target(PRIVATE.address, PRIVATE.port),
      target(METADATA.address, METADATA.port),
      target(bob.address, RUNNER_PORT),
      target('127.0.0.1', portOf(loopbackService)),
      target(gateway, portOf(anyAddressService)),
      target(gateway, portOf(loopbackService)),
      ...TEST_HOSTS.map((host) => target(host.hostAddress, portOf(anyAddressService))),
      ...hostAddresses().map((address) => target(address, portOf(anyAddressService))),
    ]);
    const [publicAnswer, ...denied] = Object.entries(answers);
    // The public host sees the host's address on its link, not the runner's: masquerading.
    assert.equal(publicAnswer?.[1], `public ${PUBLIC.hostAddress}`, JSON.stringify(answers, null, 1));
    for (const [address, answer] of denied) assert.match(answer, /^ERR /, `${address} answered a runner: ${answer}`);

    // Controls: the host reaches bob's server, so the refusal above came from the isolation; and
    // without the input chain the runner would reach the host, so that chain is what stops it.
    assert.match((await probeFromHost([target(bob.address, RUNNER_PORT)]))[target(bob.address, RUNNER_PORT)] ?? '', /^bob /);
    sh('nft', ['flush', 'chain', 'inet', tables.at(-1) as string, 'input']);
    const unguarded = await probeFrom(alicePid, [target(gateway, portOf(anyAddressService))]);
    assert.equal(Object.values(unguarded)[0], 'host', 'control: the host listener answers without the input rules');

    // No IPv6 beyond the runner's own loopback: no address, no route.
    assert.deepEqual(
      inRunner(alicePid, ['ip', '-6', '-o', 'addr'])
        .trim()
        .split('\n')
        .map((line) => line.split(/\s+/)[1]),
      ['lo'],
    );
    const routes = inRunner(alicePid, ['ip', '-6', 'route', 'show', 'table', 'all']);
    assert.ok(!/default|fd00|2000::/.test(routes), routes);

    await alice.detach();
    await bob.detach();
    await made.close();
  });

  test('allowedprivate opens a private range, and only that one', async () => {
    const made = await networks({ allowedPrivate: [`${PRIVATE.address}/32`] });
    const pid = await runnerNamespace();
    await made.attach('carol', pid, []);
    const answers = await probeFrom(pid, [target(PRIVATE.address, PRIVATE.port), target(METADATA.address, METADATA.port)]);
    assert.equal(answers[target(PRIVATE.address, PRIVATE.port)], `private ${PRIVATE.hostAddress}`);
    assert.match(answers[target(METADATA.address, METADATA.port)] ?? '', /^ERR /);
    await made.close();
  });

  test('two runners exposing the same port both get a reachable mapped port on the host address', async () => {
    const made = await networks();
    const attached: AttachedNetwork[] = [];
    for (const name of ['dave', 'erin']) {
      const pid = await runnerNamespace();
      await serveInRunner(pid, name);
      attached.push(await made.attach(name, pid, [RUNNER_PORT]));
    }
    const mapped = attached.map((network) => network.mappedPorts[0]);
    assert.equal(mapped[0]?.exposedPort, RUNNER_PORT);
    assert.equal(mapped[1]?.exposedPort, RUNNER_PORT);
    assert.notEqual(mapped[0]?.hostAddress, mapped[1]?.hostAddress);
    assert.match(mapped[0]?.hostAddress ?? '', /^127\.0\.0\.1:\d+$/);
    const answers = await probeFromHost(mapped.map((port) => port?.hostAddress as string));
    assert.deepEqual(
      Object.values(answers).map((answer) => answer.split(' ')[0]),
      ['dave', 'erin'],
    );

    await attached[0]?.detach();
    const afterDetach = await probeFromHost([mapped[0]?.hostAddress as string]);
    assert.match(Object.values(afterDetach)[0] ?? '', /^ERR /, "a detached runner's port is still published");
    await made.close();
  });

  test('detach and close leave nothing behind; a restart after SIGKILL cleans up and restores sysctls', async () => {
    const options = networkOptions();
    const first = await createRunnerNetworks(options);
    openNetworks.push(first);
    const pid = await runnerNamespace();
    const runner = await first.attach('frank', pid, []);
    const link = (runner as unknown as { hostInterface: string }).hostInterface;
    assert.ok(existsSync(`/sys/class/net/${link}`));
    for (const host of TEST_HOSTS) assert.equal(sysctl(host.hostInterface), '1', 'forwarding is on for the uplinks');
    // Only switched values are remembered: on a host that forwards everywhere already (Docker's
    // engine sets net.ipv4.ip_forward), nothing was changed and nothing needs restoring.
    const switched = TEST_HOSTS.some((host) => forwardingBefore.get(host.hostInterface) === '0');
    assert.equal(existsSync(options.stateFile), switched, 'the changed sysctls are remembered, and only they');
    await runner.detach();
    assert.ok(!existsSync(`/sys/class/net/${link}`), "the runner's link outlived its detach");

    // A daemon killed without close(): the next one with the same names starts over cleanly.
    const again = await first.attach('grace', await runnerNamespace(), []);
    const second = await createRunnerNetworks(options);
    openNetworks.push(second);
    assert.ok(!existsSync(`/sys/class/net/${(again as unknown as { hostInterface: string }).hostInterface}`), 'the leftover port is gone');
    const ownTables = sh('nft', ['list', 'tables'])
      .split('\n')
      .filter((line) => line.includes(options.table));
    assert.equal(ownTables.length, 1);
    const pidAfterRestart = await runnerNamespace();
    await second.attach('heidi', pidAfterRestart, []);
    const answers = await probeFrom(pidAfterRestart, [target(PUBLIC.address, PUBLIC.port)]);
    assert.equal(Object.values(answers)[0], `public ${PUBLIC.hostAddress}`);

    await second.close();
    assert.equal(leftovers(), '', 'bridges or tables left after close');
    assert.ok(!existsSync(options.stateFile));
    for (const host of TEST_HOSTS) assert.equal(sysctl(host.hostInterface), forwardingBefore.get(host.hostInterface), 'forwarding restored');
    assert.ok(!sh('ip', ['-o', 'link', 'show']).includes(`master ${options.bridge} `));
  });

  test('attaching costs well below a second (p50 over 30 runners)', async (t) => {
    const made = await networks();
    const durations: number[] = [];
    const attached: AttachedNetwork[] = [];
    for (let index = 0; index < 30; index += 1) {
      const pid = await runnerNamespace();
      const started = performance.now();
      attached.push(await made.attach(`runner-${index}`, pid, [RUNNER_PORT]));
      durations.push(performance.now() - started);
    }
    const detachStarted = performance.now();
    await Promise.all(attached.map((network) => network.detach()));
    const detachMs = (performance.now() - detachStarted) / attached.length;
    durations.sort((a, b) => a - b);
    const p50 = durations[Math.floor(durations.length / 2)] as number;
    const p90 = durations[Math.floor(durations.length * 0.9)] as number;
    t.diagnostic(
      `attach p50 ${p50.toFixed(1)} ms, p90 ${p90.toFixed(1)} ms, max ${(durations.at(-1) as number).toFixed(1)} ms; detach ${detachMs.toFixed(1)} ms per runner`,
    );
    assert.ok(p50 < 200, `attach p50 ${p50} ms`);
    await made.close();
  });

  test('through the daemon: learner programs get NAT to the public host, nothing of the host or of each other, and their own mapped ports', async (t) => {
    const daemon = await startDaemon({ config: { local: { network: { uplinks: TEST_HOSTS.map((host) => host.hostInterface) } } } });
    t.after(() => daemon.stop());
    const client = new CodeOceanClient(daemon.baseUrl, daemon.token);
    const environmentId = 81;
    assert.equal(
      (await client.putEnvironment(environmentSpec(environmentId, { prewarmingPoolSize: 2, networkAccess: true, exposedPorts: [RUNNER_PORT] }))).status,
      201,
    );
    const runners: Array<{ runnerId: string; mappedPorts: Array<{ exposedPort: number; hostAddress: string }> }> = [];
    for (let attempt = 0; runners.length < 2 && attempt < 100; attempt += 1) {
      const claim = await client.claimRunner(environmentId);
      if (claim.status === 200) runners.push(claim.body as (typeof runners)[number]);
      else await new Promise((resolve) => setTimeout(resolve, 200));
    }
    const [alice, bob] = runners;
    assert.ok(alice && bob, 'two runners claimed');

    const addresses: string[] = [];
    for (const [runner, name] of [
      [alice, 'alice'],
      [bob, 'bob'],
    ] as const) {
      assert.equal((await client.copySubmission(runner.runnerId, { 'probe.py': LEARNER_PROBE, 'index.html': name })).status, 204);
      const started = await client.run(
        runner.runnerId,
        `trap "" HUP; python3 -m http.server ${RUNNER_PORT} >/dev/null 2>&1 & python3 probe.py ${PUBLIC.address} '[]'`,
      );
      assert.equal(started.exitCode, 0, `${name}'s probe failed: ${started.stdout} ${started.stderr}`);
      addresses.push((JSON.parse(started.stdout) as { own: string }).own);
    }

    const targets = [
      target(PUBLIC.address, PUBLIC.port),
      target(PRIVATE.address, PRIVATE.port),
      target(METADATA.address, METADATA.port),
      target(addresses[1] as string, RUNNER_PORT),
      target('127.0.0.1', daemon.port),
      target('GATEWAY', daemon.port),
      target('GATEWAY', portOf(anyAddressService)),
      ...hostAddresses().map((address) => target(address, daemon.port)),
      ...hostAddresses().map((address) => target(address, portOf(anyAddressService))),
    ];
    for (const privilegedExecution of [false, true]) {
      const result = await client.run(alice.runnerId, `python3 probe.py ${PUBLIC.address} '${JSON.stringify(targets)}'`, {
        privilegedExecution,
        timeLimit: 30,
        guardMs: 60_000,
      });
      const { answers } = JSON.parse(result.stdout) as { answers: Record<string, string> };
      const [publicAnswer, ...denied] = Object.entries(answers);
      assert.equal(publicAnswer?.[1], `public ${PUBLIC.hostAddress}`, `privileged=${privilegedExecution}: ${result.stdout} ${result.stderr}`);
      for (const [address, answer] of denied)
        assert.match(answer, /^ERR /, `privileged=${privilegedExecution}: ${address} answered a learner program: ${answer}`);
    }

    // The sandbox's root cannot change its network: the namespace belongs to the host.
    const meddling = await client.run(alice.runnerId, 'ip addr add 10.0.0.9/8 dev eth0; ip link set eth0 down; ip route del default; echo done', {
      privilegedExecution: true,
    });
    assert.match(meddling.stdout, /done/);
    const still = await client.run(alice.runnerId, `python3 probe.py ${PUBLIC.address} '${JSON.stringify([target(PUBLIC.address, PUBLIC.port)])}'`);
    assert.equal(Object.values((JSON.parse(still.stdout) as { answers: Record<string, string> }).answers)[0], `public ${PUBLIC.hostAddress}`, meddling.stderr);

    // Both runners expose the same port; each is reachable at its own mapped address.
    const bodies = await Promise.all(
      [alice, bob].map(async (runner) => {
        const mapped = runner.mappedPorts[0];
        assert.equal(mapped?.exposedPort, RUNNER_PORT);
        for (let attempt = 0; attempt < 50; attempt += 1) {
          const text = await fetch(`http://${mapped?.hostAddress}/index.html`).then(
            (response) => response.text(),
            (error: unknown) => `ERR ${String(error)} ${String((error as { cause?: unknown }).cause)}`,
          );
          if (!text.startsWith('ERR') || attempt === 49) return text;
          await new Promise((resolve) => setTimeout(resolve, 100));
        }
        return undefined;
      }),
    );
    assert.deepEqual(bodies, ['alice', 'bob']);
    assert.notEqual(alice.mappedPorts[0]?.hostAddress, bob.mappedPorts[0]?.hostAddress);
    assert.equal((await client.deleteRunner(alice.runnerId)).status, 204);
    assert.equal((await client.deleteRunner(bob.runnerId)).status, 204);
  });

  test('nothing is left after every network closed', async () => {
    await Promise.allSettled(openNetworks.map((made) => made.close()));
    assert.equal(leftovers(), '');
    const links = sh('ip', ['-o', 'link', 'show']);
    assert.ok(!/: pv[0-9a-f]{12}[@:]/.test(links) || !bridges.some((bridge) => links.includes(`master ${bridge}`)), links);
  });
});
