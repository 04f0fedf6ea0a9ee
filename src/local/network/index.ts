import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdir, open, readFile, rm, stat, writeFile } from 'node:fs/promises';
import path from 'node:path';
import type { Logger } from 'pino';
import type { LocalConfig } from '../../config/schema.js';
import type { MappedPort } from '../../dto/runner.js';
import { AddressAllocator, formatIpv4, formatSubnet, parseSubnet } from './addresses.js';
import { type CommandRunner, mustRun, runCommand } from './commands.js';
import { PortProxy } from './port-proxy.js';
import { deleteTableScript, rulesetScript } from './rules.js';

/*
 * Private networks for runners with `networkAccess`, as Docker's and CNI's bridge networks (and
 * openHPI's "secure bridge" for Poseidon) do it. The spawner gives every sandbox its own network
 * namespace, owned by the host's user namespace, with only loopback in it. attach() then:
 *   - creates a veth pair whose runner end is `eth0` in that namespace, with an address of the
 *     runner subnet and a default route via the bridge, IPv6 off (no address, no route);
 *   - puts the host end on our bridge as an isolated port: runners see the bridge, not each other;
 *   - publishes exposed ports through relays on the host address.
 * The bridge, its address and one nftables table of our own (input: runners cannot open
 * connections to the host; forward: no private, link-local or multicast destinations unless
 * allowed, nothing new into a runner; postrouting: masquerade) are made once, at daemon start.
 * Every rule lives in the host's namespace, where a runner's root has no capabilities. Per runner
 * there is no rule to add: the subnet-wide rules cover it, so removing its veth removes all of it.
 *
 * Cost per runner: two `ip -batch` processes (one inside its namespace through nsenter, one on the
 * host); detach: one `ip link del`, none if the namespace is gone already (the kernel removes the
 * pair with it).
 *
 * DNS: runners get whatever resolv.conf their image has; nothing is proxied. A resolver on the
 * host's loopback or on a private address is unreachable from a runner by design; operators list
 * a reachable resolver in `local.network.allowedprivate` (if private) or use public resolvers.
 *
 * IPv4 forwarding: the kernel forwards a packet only if the interface it arrived on has
 * `forwarding` on. The daemon switches it on for the bridge (its own) and for the uplinks (by
 * default the interfaces of the host's default routes) that had it off, restores those at close,
 * and has nftables drop everything those uplinks would forward other than replies to runners, so
 * the host does not become a router. The global `net.ipv4.ip_forward` is never touched. What was
 * switched on is written to a state file first, so that after a SIGKILL the next start restores it.
 */

export interface RunnerNetworks {
  /* Gives the namespace of `pid` outbound access through NAT and publishes exposedPorts; resolves when usable. */
  attach(runnerId: string, pid: number, exposedPorts: number[]): Promise<AttachedNetwork>;
  /* Detaches every runner and removes the bridge, the rules and the daemon's sysctl changes. */
  close(): Promise<void>;
}

export interface AttachedNetwork {
  /* The runner's address on the bridge. */
  readonly address: string;
  readonly mappedPorts: MappedPort[];
  /* Removes the runner's link and relays and frees its address; safe to call twice. */
  detach(): Promise<void>;
}

export interface RunnerNetworkOptions {
  /* Name of the bridge (at most 15 characters). */
  bridge: string;
  /* Name of our nftables table (family inet). */
  table: string;
  /* IPv4 subnet of the runners; its first address is the bridge's. */
  subnet: string;
  /* Address the port relays listen on, and that mappedPorts report. */
  hostAddress: string;
  /* Denied destinations runners may reach after all (CIDRs). */
  allowedPrivate: string[];
  /* Interfaces that forward runners' traffic; undefined: those of the host's default routes. */
  uplinks?: string[] | undefined;
  /* Where the sysctls the daemon changed are remembered until it restores them. */
  stateFile: string;
  logger?: Logger | undefined;
  run?: CommandRunner;
}

/* The options from the daemon's configuration (`local.hostaddress`, `local.network.*`). */
export function runnerNetworkOptions(config: LocalConfig, logger?: Logger): RunnerNetworkOptions {
  return {
    bridge: config.network.bridge,
    table: config.network.table,
    subnet: config.network.subnet,
    hostAddress: config.hostaddress,
    allowedPrivate: config.network.allowedprivate,
    uplinks: config.network.uplinks,
    stateFile: path.join(config.statedir, 'network-state.json'),
    logger,
  };
}

interface SavedState {
  /* Interfaces whose net.ipv4.conf.<name>.forwarding the daemon set from 0 to 1. */
  forwarding: string[];
}

const IFNAME = /^[A-Za-z0-9_.-]{1,15}$/;
const NFT_NAME = /^[A-Za-z][A-Za-z0-9_]{0,31}$/;
/* The veth pair's end in the runner's namespace. */
const RUNNER_INTERFACE = 'eth0';

const forwardingPath = (name: string): string => `/proc/sys/net/ipv4/conf/${name}/forwarding`;

/* The interfaces of the host's IPv4 default routes (/proc/net/route lists destinations in hex). */
export async function defaultRouteInterfaces(): Promise<string[]> {
  const table = await readFile('/proc/net/route', 'utf8').catch(() => '');
  const names = table
    .split('\n')
    .slice(1)
    .map((line) => line.trim().split(/\s+/))
    .filter((fields) => fields[1] === '00000000' && fields[7] === '00000000')
    .map((fields) => fields[0] as string);
  return [...new Set(names)];
}

async function readSysctl(file: string): Promise<string | undefined> {
  return (await readFile(file, 'utf8').catch(() => undefined))?.trim();
}

async function writeSysctl(file: string, value: string): Promise<boolean> {
  return writeFile(file, `${value}\n`).then(
    () => true,
    () => false,
  );
}

/* Puts back the forwarding switches a daemon (this one, or one that was killed) changed. */
async function restoreSavedState(stateFile: string, logger: Logger | undefined): Promise<void> {
  const text = await readFile(stateFile, 'utf8').catch(() => undefined);
  if (text === undefined) return;
  let state: SavedState | undefined;
  try {
    state = JSON.parse(text) as SavedState;
  } catch {
    logger?.warn({ stateFile }, 'unreadable network state file ignored');
  }
  for (const name of state?.forwarding ?? []) {
    if (IFNAME.test(name) && existsSync(forwardingPath(name))) await writeSysctl(forwardingPath(name), '0');
  }
  await rm(stateFile, { force: true });
}

async function removeBridge(run: CommandRunner, bridge: string): Promise<void> {
  if (!existsSync(`/sys/class/net/${bridge}`)) return;
  const ports = await run(['ip', '-json', 'link', 'show', 'master', bridge]);
  const names = ports.code === 0 ? (JSON.parse(ports.stdout || '[]') as Array<{ ifname: string }>).map((port) => port.ifname) : [];
  const script = [...names.map((name) => `link del dev ${name}`), `link del dev ${bridge}`].join('\n');
  // -force: keep going when a port vanished in the meantime (its namespace ended).
  await run(['ip', '-force', '-batch', '-'], `${script}\n`);
}

function randomMac(): string {
  const bytes = randomBytes(6);
  bytes[0] = ((bytes[0] as number) & 0xfe) | 0x02; // unicast, locally administered
  return [...bytes].map((byte) => byte.toString(16).padStart(2, '0')).join(':');
}

/* Sets up the bridge and rules (replacing leftovers of an earlier daemon); close() removes them. */
export async function createRunnerNetworks(options: RunnerNetworkOptions): Promise<RunnerNetworks> {
  if (!IFNAME.test(options.bridge)) throw new Error(`invalid bridge name: ${options.bridge}`);
  if (!NFT_NAME.test(options.table)) throw new Error(`invalid nftables table name: ${options.table}`);
  const run = options.run ?? runCommand;
  const subnet = parseSubnet(options.subnet);
  const allocator = new AddressAllocator(subnet);
  const log = options.logger;

  await restoreSavedState(options.stateFile, log);
  await removeBridge(run, options.bridge);
  await mustRun(run, ['nft', '-f', '-'], deleteTableScript(options.table));

  const uplinks = (options.uplinks ?? (await defaultRouteInterfaces())).filter((name) => name !== options.bridge);
  for (const name of uplinks) if (!IFNAME.test(name)) throw new Error(`invalid uplink interface name: ${name}`);
  const forced: string[] = [];
  for (const name of uplinks) if ((await readSysctl(forwardingPath(name))) === '0') forced.push(name);

  const networks = new BridgeNetworks(options, run, allocator, forced);
  try {
    await mustRun(
      run,
      ['ip', '-batch', '-'],
      [
        `link add ${options.bridge} address ${randomMac()} type bridge`,
        `link set dev ${options.bridge} addrgenmode none`,
        `addr add ${formatIpv4(allocator.gateway)}/${subnet.prefixLength} dev ${options.bridge}`,
        `link set dev ${options.bridge} up`,
        '',
      ].join('\n'),
    );
    await writeSysctl(`/proc/sys/net/ipv6/conf/${options.bridge}/disable_ipv6`, '1');
    if (!(await writeSysctl(forwardingPath(options.bridge), '1'))) throw new Error(`cannot enable forwarding on ${options.bridge}`);
    if (forced.length > 0) {
      await mkdir(path.dirname(options.stateFile), { recursive: true });
      await writeFile(options.stateFile, JSON.stringify({ forwarding: forced } satisfies SavedState));
      for (const name of forced) await writeSysctl(forwardingPath(name), '1');
    }
    await mustRun(
      run,
      ['nft', '-f', '-'],
      rulesetScript({ table: options.table, bridge: options.bridge, subnet, allowed: options.allowedPrivate, forcedUplinks: forced }),
    );
  } catch (error) {
    await networks.close();
    throw error;
  }
  log?.info({ bridge: options.bridge, subnet: formatSubnet(subnet), table: options.table, uplinks, forwardingEnabledOn: forced }, 'runner network ready');
  return networks;
}

class BridgeNetworks implements RunnerNetworks {
  readonly #attached = new Set<Attached>();
  #closing: Promise<void> | undefined;

  constructor(
    private readonly options: RunnerNetworkOptions,
    private readonly run: CommandRunner,
    private readonly allocator: AddressAllocator,
    private readonly forced: string[],
  ) {}

  async attach(runnerId: string, pid: number, exposedPorts: number[]): Promise<AttachedNetwork> {
    if (this.#closing) throw new Error('the runner network is closing');
    if (!Number.isInteger(pid) || pid <= 0) throw new Error(`invalid pid: ${pid}`);
    // Held open, the namespace file cannot be swapped for another process's namespace if the pid is reused.
    const namespace = await open(`/proc/${pid}/ns/net`, 'r');
    let attached: Attached | undefined;
    try {
      const [runnerNs, ownNs] = await Promise.all([namespace.stat(), stat('/proc/self/ns/net')]);
      if (runnerNs.ino === ownNs.ino && runnerNs.dev === ownNs.dev) {
        throw new Error(`runner ${runnerId} shares the host's network namespace; refusing to attach it`);
      }
      const address = this.allocator.allocate();
      attached = new Attached(this, `pv${randomBytes(6).toString('hex')}`, address);
      this.#attached.add(attached);
      const subnet = this.allocator.subnet;
      // In the runner's namespace: create the pair there, sending its other end to the daemon's.
      await mustRun(
        this.run,
        ['nsenter', `--net=/proc/self/fd/3`, 'ip', '-batch', '-'],
        [
          'link set dev lo up',
          `link add ${RUNNER_INTERFACE} type veth peer name ${attached.hostInterface} netns ${process.pid}`,
          `link set dev ${RUNNER_INTERFACE} addrgenmode none`,
          `addr add ${formatIpv4(address)}/${subnet.prefixLength} dev ${RUNNER_INTERFACE}`,
          `link set dev ${RUNNER_INTERFACE} up`,
          `route add default via ${formatIpv4(this.allocator.gateway)} dev ${RUNNER_INTERFACE}`,
          '',
        ].join('\n'),
        namespace.fd,
      );
      // On the host: an isolated bridge port, isolated before it comes up.
      await mustRun(
        this.run,
        ['ip', '-batch', '-'],
        [
          `link set dev ${attached.hostInterface} master ${this.options.bridge}`,
          `link set dev ${attached.hostInterface} type bridge_slave isolated on`,
          `link set dev ${attached.hostInterface} up`,
          '',
        ].join('\n'),
      );
      for (const exposedPort of exposedPorts) {
        const proxy = await PortProxy.listen(this.options.hostAddress, formatIpv4(address), exposedPort);
        attached.proxies.push(proxy);
        attached.mappedPorts.push({ exposedPort, hostAddress: `${hostForPort(this.options.hostAddress)}:${proxy.hostPort}` });
      }
      return attached;
    } catch (error) {
      await attached?.detach();
      throw error;
    } finally {
      await namespace.close();
    }
  }

  async remove(attached: Attached): Promise<void> {
    await Promise.all(attached.proxies.map((proxy) => proxy.close()));
    // The kernel removes the pair with the runner's namespace; while that lives, remove it here,
    // before the address can go to another runner.
    if (existsSync(`/sys/class/net/${attached.hostInterface}`)) {
      const result = await this.run(['ip', 'link', 'del', 'dev', attached.hostInterface]);
      if (result.code !== 0 && existsSync(`/sys/class/net/${attached.hostInterface}`)) {
        this.options.logger?.error({ link: attached.hostInterface, stderr: result.stderr.trim() }, 'cannot remove a runner link; its address stays reserved');
        this.#attached.delete(attached);
        return;
      }
    }
    this.allocator.release(attached.addressValue);
    this.#attached.delete(attached);
  }

  close(): Promise<void> {
    this.#closing ??= (async () => {
      await Promise.allSettled([...this.#attached].map((attached) => attached.detach()));
      await removeBridge(this.run, this.options.bridge);
      await this.run(['nft', '-f', '-'], deleteTableScript(this.options.table));
      for (const name of this.forced) await writeSysctl(forwardingPath(name), '0');
      await rm(this.options.stateFile, { force: true });
    })();
    return this.#closing;
  }
}

class Attached implements AttachedNetwork {
  readonly mappedPorts: MappedPort[] = [];
  readonly proxies: PortProxy[] = [];
  #detaching: Promise<void> | undefined;

  constructor(
    private readonly networks: BridgeNetworks,
    readonly hostInterface: string,
    readonly addressValue: number,
  ) {}

  get address(): string {
    return formatIpv4(this.addressValue);
  }

  detach(): Promise<void> {
    this.#detaching ??= this.networks.remove(this);
    return this.#detaching;
  }
}

/* An IPv6 host address needs brackets in "host:port". */
function hostForPort(address: string): string {
  return address.includes(':') ? `[${address}]` : address;
}
