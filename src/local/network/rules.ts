import { formatSubnet, type Ipv4Subnet } from './addresses.js';

/*
 * IPv4 ranges a runner may not reach unless `local.network.allowedprivate` lists them: private
 * networks (RFC 1918, carrier-grade NAT), loopback, link-local (cloud metadata services such as
 * 169.254.169.254), "this network", IETF protocol assignments, benchmarking, multicast and the
 * reserved class E up to the broadcast address. IPv6 is not routed for runners at all.
 */
export const DENIED_IPV4 = [
  '0.0.0.0/8',
  '10.0.0.0/8',
  '100.64.0.0/10',
  '127.0.0.0/8',
  '169.254.0.0/16',
  '172.16.0.0/12',
  '192.0.0.0/24',
  '192.168.0.0/16',
  '198.18.0.0/15',
  '224.0.0.0/3',
];

export interface RulesetOptions {
  table: string;
  bridge: string;
  subnet: Ipv4Subnet;
  /* CIDRs from DENIED_IPV4 (or parts of them) that runners may reach after all. */
  allowed: string[];
  /* Interfaces whose IPv4 forwarding the daemon switched on: they forward runners' replies only. */
  forcedUplinks: string[];
}

const quote = (name: string): string => JSON.stringify(name);
const elements = (values: string[]): string => (values.length > 0 ? ` elements = { ${values.join(', ')} }` : '');

/*
 * One nft script that replaces our table atomically: adding then deleting the table removes the
 * leftover of an earlier daemon (also one that was SIGKILLed) without failing when there is none.
 * All rules live in the host's network namespace, where a runner's root has no capabilities.
 */
export function rulesetScript(options: RulesetOptions): string {
  const bridge = quote(options.bridge);
  const subnet = formatSubnet(options.subnet);
  return `table inet ${options.table}
delete table inet ${options.table}
table inet ${options.table} {
  set denied4 {
    type ipv4_addr
    flags interval
    auto-merge
   ${elements(DENIED_IPV4)}
  }
  set allowed4 {
    type ipv4_addr
    flags interval
    auto-merge
   ${elements(options.allowed)}
  }
  set forced_uplinks {
    type ifname
   ${elements(options.forcedUplinks.map(quote))}
  }

  # Refused rather than dropped: a learner's program (or its resolver, whose configured server may
  # be a private address) fails at once instead of waiting for a timeout.
  chain refuse {
    meta l4proto tcp reject with tcp reset
    reject with icmpx admin-prohibited
  }

  # Runners may not open connections to the host itself: not to the bridge address, not to any
  # other address of the host (the daemon's API, loopback services, ...). Replies to connections
  # the host opened (the port relays) pass.
  chain input {
    type filter hook input priority filter; policy accept;
    iifname ${bridge} ct state established,related accept
    iifname ${bridge} goto refuse
  }

  chain forward {
    type filter hook forward priority filter; policy accept;
    # Into a runner only replies: nothing from outside, nothing from another runner (bridge ports
    # are isolated as well; with br_netfilter bridged frames would pass here too).
    oifname ${bridge} ct state established,related accept
    oifname ${bridge} drop
    # From a runner: IPv4 only, only with an address of the runner subnet, never to denied ranges
    # unless allowed.
    iifname ${bridge} meta nfproto != ipv4 drop
    iifname ${bridge} ip saddr != ${subnet} drop
    iifname ${bridge} ip daddr @allowed4 accept
    iifname ${bridge} ip daddr @denied4 goto refuse
    iifname ${bridge} accept
    # The daemon switched forwarding on for these interfaces only so that replies reach runners.
    iifname @forced_uplinks drop
  }

  chain postrouting {
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr ${subnet} oifname != ${bridge} masquerade
  }
}
`;
}

export function deleteTableScript(table: string): string {
  return `table inet ${table}\ndelete table inet ${table}\n`;
}
