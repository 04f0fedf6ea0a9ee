/* IPv4 arithmetic for the runner subnet: addresses are numbers, prefixes are CIDR strings. */

export interface Ipv4Subnet {
  /* Network address as an unsigned 32-bit number. */
  network: number;
  prefixLength: number;
}

export function parseIpv4(address: string): number {
  const parts = address.split('.');
  if (parts.length !== 4 || parts.some((part) => !/^\d{1,3}$/.test(part) || Number(part) > 255)) {
    throw new Error(`not an IPv4 address: ${address}`);
  }
  return parts.reduce((value, part) => value * 256 + Number(part), 0);
}

export function formatIpv4(value: number): string {
  return [24, 16, 8, 0].map((shift) => Math.floor(value / 2 ** shift) % 256).join('.');
}

export function parseSubnet(cidr: string): Ipv4Subnet {
  const [address, length, ...rest] = cidr.split('/');
  const prefixLength = Number(length);
  if (address === undefined || rest.length > 0 || !/^\d{1,2}$/.test(length ?? '') || prefixLength > 32) {
    throw new Error(`not an IPv4 CIDR: ${cidr}`);
  }
  const size = 2 ** (32 - prefixLength);
  const value = parseIpv4(address);
  return { network: value - (value % size), prefixLength };
}

export function subnetSize(subnet: Ipv4Subnet): number {
  return 2 ** (32 - subnet.prefixLength);
}

export function formatSubnet(subnet: Ipv4Subnet): string {
  return `${formatIpv4(subnet.network)}/${subnet.prefixLength}`;
}

/*
 * Hands out the subnet's host addresses: the first one is the bridge (the runners' gateway), the
 * others go to runners. Only this daemon allocates them and nothing is persisted, so a restart
 * (which also rebuilds the bridge) frees them all. A released address goes to the back of the
 * queue, so a new runner does not inherit the address a previous one just used.
 */
export class AddressAllocator {
  readonly gateway: number;
  readonly #free: number[] = [];
  readonly #used = new Set<number>();
  #next: number;
  readonly #last: number;

  constructor(readonly subnet: Ipv4Subnet) {
    if (subnet.prefixLength > 29) throw new Error(`the runner subnet ${formatSubnet(subnet)} is too small (at most /29)`);
    this.gateway = subnet.network + 1;
    this.#next = subnet.network + 2;
    this.#last = subnet.network + subnetSize(subnet) - 2; // the last address is the broadcast address
  }

  allocate(): number {
    const address = this.#next <= this.#last ? this.#next++ : this.#free.shift();
    if (address === undefined) throw new Error(`no free address left in the runner subnet ${formatSubnet(this.subnet)}`);
    this.#used.add(address);
    return address;
  }

  release(address: number): void {
    if (this.#used.delete(address)) this.#free.push(address);
  }

  get inUse(): number {
    return this.#used.size;
  }
}
