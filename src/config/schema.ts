import YAML from 'yaml';
import { z } from 'zod';

/*
 * Go's YAML decoder (Poseidon's) reads `30_000` as a number; the YAML 1.2 parser here reads it as
 * text. Poseidon's own example uses that spelling, so integers accept it too.
 */
function goNumber() {
  return z.preprocess(
    (value) => (typeof value === 'string' && /^-?[0-9][0-9_]*(\.[0-9]+)?$/.test(value) ? Number(value.replaceAll('_', '')) : value),
    z.number(),
  );
}

function goInteger() {
  return goNumber().pipe(z.number().int());
}

/*
 * Poseidon reads a list from an environment variable as words separated by white space, optionally
 * wrapped in double quotes (POSEIDON_AWS_FUNCTIONS="java11Exec go118Exec"); a YAML flow list works too.
 */
export function listFromText(text: string): unknown {
  const trimmed = text.trim();
  if (trimmed.startsWith('[')) return YAML.parse(trimmed) as unknown;
  const unquoted = trimmed.length >= 2 && trimmed.startsWith('"') && trimmed.endsWith('"') ? trimmed.slice(1, -1) : trimmed;
  return unquoted.split(/\s+/).filter((word) => word !== '');
}

/* A list of strings that, given as text (an environment variable without a default to type it), is read as Poseidon does. */
function goStringList(item: z.ZodString = z.string()) {
  return z.preprocess((value) => (typeof value === 'string' ? listFromText(value) : value), z.array(item));
}

/*
 * Keys are lower-case without separators, as in Poseidon's configuration file, so that an
 * environment variable such as POSEIDON_SERVER_TLS_CAFILE maps onto a path unambiguously.
 */

const tlsSchema = z
  .strictObject({
    active: z.boolean().default(false),
    cafile: z.string().min(1).optional(),
    certfile: z.string().min(1).optional(),
    keyfile: z.string().min(1).optional(),
  })
  .prefault({});

const serverSchema = z
  .strictObject({
    address: z.string().min(1).default('127.0.0.1'),
    port: z.number().int().min(0).max(65535).default(7200),
    /* Poseidon's: listen on the sockets systemd passes (LISTEN_FDS) instead of address and port. */
    systemdsocketactivation: z.boolean().default(false),
    token: z.string().min(1).optional(),
    tls: tlsSchema,
    /* Poseidon keeps the Nomad job template here; it is moved to nomad.templatejobfile at load (see load.ts). */
    templatejobfile: z.string().min(1).optional(),
    /* Poseidon's: requests whose User-Agent carries it are not logged. Accepted, not implemented (see UNIMPLEMENTED_KEYS). */
    loggingfiltertoken: z.string().optional(),
    /*
     * Seconds running executions may still finish after SIGTERM or SIGINT before they are ended
     * with an error (Poseidon waits 15 s for its connections too).
     */
    shutdowntimeout: z.number().min(0).default(15),
    /*
     * Seconds a request may take to arrive completely (headers and body); a stalled client is
     * answered 408 and cut off, so it cannot hold a connection (Poseidon: 15 s read timeout).
     */
    requesttimeout: z.number().positive().default(30),
    /* Seconds an idle keep-alive connection stays open (Poseidon: 60 s). */
    idletimeout: z.number().positive().default(60),
    /* Accepted for Poseidon compatibility; the local backend keeps stdout and stderr apart anyway. */
    interactivestderr: z.boolean().default(true),
    /* Largest accepted request body; file uploads are base64 JSON, so this bounds one PATCH. */
    bodylimit: z
      .number()
      .int()
      .positive()
      .default(64 * 1024 * 1024),
    /* An execution URL that is never connected to is forgotten after this many seconds. */
    websocketurltimeout: z.number().int().positive().default(60),
    alert: z
      .strictObject({
        prewarmingpoolthreshold: z.number().min(0).lt(1).default(0.5),
        prewarmingpoolreloadtimeout: z.number().int().min(0).default(300),
        /*
         * Seconds a pool may stay below prewarmingpoolthreshold before /health answers 503 (ours, not
         * Poseidon's): a pool that is filling after a create or resize is not depleted.
         */
        depletiongraceperiod: z.number().min(0).default(60),
        /* Consecutive failed runner builds of one environment after which /health answers 503 (ours). */
        buildfailurethreshold: z.number().int().min(1).default(3),
      })
      .prefault({}),
    /* GET /metrics, Prometheus text format (ours; Poseidon writes to InfluxDB instead). */
    metrics: z
      .strictObject({
        enabled: z.boolean().default(true),
        /* With server.token set, scrapes must send it as Poseidon-Token too; false opens /metrics to anyone who reaches the port. */
        requiretoken: z.boolean().default(true),
      })
      .prefault({}),
  })
  .prefault({});

const loggerSchema = z
  .strictObject({
    level: z
      .string()
      .transform((level) => level.toLowerCase())
      .pipe(z.enum(['trace', 'debug', 'info', 'warn', 'warning', 'error', 'fatal', 'silent']))
      .transform((level) => (level === 'warning' ? 'warn' : level))
      .default('info'),
    /*
     * Poseidon's logger.formatter: its values are logrus's TextFormatter and JSONFormatter; `text`
     * and `json` are accepted too. Text is for people (pino-pretty, one line per entry), JSON for log
     * shippers. The default stays JSON, as this daemon always wrote, where Poseidon's is text.
     */
    formatter: z
      .string()
      .transform((formatter) => formatter.toLowerCase())
      .pipe(z.enum(['textformatter', 'text', 'jsonformatter', 'json']))
      .transform((formatter): 'text' | 'json' => (formatter.startsWith('text') ? 'text' : 'json'))
      .default('json'),
  })
  .prefault({});

const runnersSchema = z
  .strictObject({
    /* How many sandboxes an environment builds at once while refilling its pool. */
    refillconcurrency: z.number().int().min(1).max(256).default(8),
    /*
     * How many runners a backend builds at once over all its environments. An environment with claims
     * waiting may use all of them (a burst is built as fast as the host allows); the bound keeps the
     * API responsive. 0: four per CPU core, at least refillconcurrency.
     */
    buildconcurrency: z.number().int().min(0).max(1024).default(0),
    /*
     * Seconds a claim on an empty pool waits for a runner under construction before answering
     * NOMAD_OVERLOAD; fractions allowed, 0 answers at once (Poseidon). Bounded well below CodeOcean's
     * HTTP timeout, so that a waiting claim is still answered.
     */
    claimtimeout: z.number().min(0).max(60).default(5),
    /* Output beyond this many bytes per execution and stream is dropped and reported once. */
    maxoutputbytes: z
      .number()
      .int()
      .positive()
      .default(256 * 1024 * 1024),
  })
  .prefault({});

const nomadSchema = z
  .strictObject({
    enabled: z.boolean().default(false),
    address: z.string().min(1).default('127.0.0.1'),
    port: z.number().int().min(1).max(65535).default(4646),
    token: z.string().min(1).optional(),
    tls: tlsSchema,
    namespace: z.string().min(1).default('default'),
    disableforcepull: z.boolean().default(true),
    /*
     * Seconds a new runner may take from registration to a running allocation before it is given up
     * (ours; Poseidon has no such limit). A runner whose image is still being pulled gets another
     * period each time: Nomad itself bounds pulls (the Docker driver's image_pull_timeout).
     */
    runnerstarttimeout: goNumber().pipe(z.number().positive()).default(120),
    network: z.strictObject({ mode: z.string().min(1).default('bridge') }).prefault({}),
    /* Path of a JSON job template replacing the built-in default (Poseidon's templatejobfile). */
    templatejobfile: z.string().min(1).optional(),
    /* Timeout of one Nomad HTTP call, in milliseconds; also the longest wait for a free connection. */
    requesttimeout: z.number().int().positive().default(10_000),
    /*
     * Connections to the Nomad address at once, HTTP calls, the event stream and exec sessions together
     * (every execution holds one or two exec sessions). Keep it below Nomad's http_max_conns_per_client
     * (100 by default), counted per client IP, so several daemons behind one address must share it.
     */
    maxconnections: z.number().int().min(4).default(64),
    /* Calls and exec sessions that may wait for a free connection; more are refused with NOMAD_OVERLOAD. */
    maxqueued: z.number().int().min(0).default(1000),
  })
  .prefault({});

/*
 * The private network of runners with `networkAccess` (src/local/network): a bridge with its own
 * subnet and an nftables table, both made at start (replacing leftovers) and removed at stop. Two
 * daemons on one host need different bridges, tables and subnets.
 */
const localNetworkSchema = z
  .strictObject({
    /* Bridge device the runners' veth pairs are attached to (an interface name, at most 15 characters). */
    bridge: z
      .string()
      .regex(/^[A-Za-z0-9_.-]{1,15}$/)
      .default('poseidon0'),
    /* nftables table (family inet) holding the NAT and deny rules. */
    table: z
      .string()
      .regex(/^[A-Za-z][A-Za-z0-9_]{0,31}$/)
      .default('poseidon_ts'),
    /* IPv4 subnet runners get addresses from; the bridge takes its first address. */
    subnet: z.cidrv4().default('10.213.0.0/16'),
    /* Private, link-local and other non-public IPv4 ranges runners may reach after all (CIDRs), e.g. a resolver or package mirror. */
    allowedprivate: z.array(z.cidrv4()).default([]),
    /* Interfaces forwarding runners' traffic out; unset means the interfaces of the host's default routes. */
    uplinks: goStringList(z.string().regex(/^[A-Za-z0-9_.-]{1,15}$/)).optional(),
  })
  .prefault({});

/*
 * Image names come from API clients, so the lookup table is a Map: on a plain object an image named
 * `__proto__` or `constructor` would find Object.prototype's members. z.record is not used because it
 * drops an own `__proto__` key of the parsed YAML.
 */
const imagesSchema = z
  .custom<Record<string, unknown>>((value) => typeof value === 'object' && value !== null && !Array.isArray(value), {
    message: 'expected a mapping of image names to root file system directories',
  })
  .transform((record, context) => {
    const images = new Map<string, string>();
    for (const [name, directory] of Object.entries(record)) {
      if (name.length === 0 || typeof directory !== 'string' || directory.length === 0) {
        context.issues.push({ code: 'custom', input: directory, path: [name], message: 'expected a non-empty directory path for a non-empty image name' });
        continue;
      }
      images.set(name, directory);
    }
    return images;
  })
  .default(() => new Map<string, string>());

/*
 * How the local backend gets an environment's image (src/local/images): `ifnotpresent` pulls a
 * reference once and then uses the cache, `always` asks the registry for the tag's current digest
 * at every environment start (and uses the cache when the registry cannot be reached), `never`
 * uses only the cache (`poseidon pull` fills it). Kubernetes' spellings (IfNotPresent) work too.
 */
const pullPolicySchema = z
  .string()
  .transform((policy) => policy.toLowerCase())
  .pipe(z.enum(['always', 'ifnotpresent', 'never']));

/* Credentials and a mirror for one registry, keyed by its host[:port] as written in references (docker.io for Docker Hub). */
const registrySchema = z.strictObject({
  username: z.string().min(1).optional(),
  password: z.string().optional(),
  /*
   * Every pull of this registry goes to this base URL instead (a pull-through cache or a copy of
   * the images inside an air-gapped site), with the same repository names.
   */
  mirror: z
    .url({ protocol: /^https?$/ })
    .transform((url) => url.replace(/\/+$/, ''))
    .optional(),
  /* Plain HTTP instead of HTTPS (always so for loopback hosts). */
  insecure: z.boolean().default(false),
});

const REGISTRY_HOST = /^[A-Za-z0-9.-]+(:[0-9]{1,5})?$/;

const registriesSchema = z
  .record(z.string(), registrySchema)
  .superRefine((registries, context) => {
    for (const host of Object.keys(registries)) {
      if (!REGISTRY_HOST.test(host))
        context.addIssue({ code: 'custom', path: [host], message: 'expected a registry host[:port] as written in image references' });
    }
  })
  .default({});

/* The image cache under local.statedir/images: unpinned images unused for longer than this are removed. */
const imageCacheSchema = z
  .strictObject({
    /* Seconds an image no environment or runner uses is kept (0: removed as soon as it is unused). */
    unusedretention: z
      .number()
      .int()
      .min(0)
      .default(7 * 24 * 3600),
    /* Most MiB of unused images kept; beyond it the least recently used unused ones go first (0: no limit). */
    maxunusedsize: z.number().int().min(0).default(0),
  })
  .prefault({});

const cgroupModeSchema = z.enum(['auto', 'v1', 'v2', 'off']);

const localSchema = z
  .strictObject({
    enabled: z.boolean().default(true),
    /* Environments are stored here and reloaded at start. */
    statedir: z.string().min(1).default('./data'),
    bwrap: z.string().min(1).default('bwrap'),
    /*
     * Maps an environment's `image` to a root file system directory, to `host` (the host's system
     * directories read-only) or to `registry`; `*` stands for every name not listed. Names that no
     * entry covers are pulled from a registry.
     */
    images: imagesSchema,
    /* When an environment's image is fetched from its registry; Poseidon's nomad.disableforcepull maps to it (see load.ts). */
    pullpolicy: pullPolicySchema.default('ifnotpresent'),
    registries: registriesSchema,
    imagecache: imageCacheSchema,
    /* The learner user every non-privileged command runs as, inside the runner's user namespace. */
    uid: z.number().int().min(1).max(65535).default(1000),
    gid: z.number().int().min(1).max(65535).default(1000),
    /*
     * Host ids for runners' user namespaces: runner n gets ids idmapbase + n*65536 .. + 65535, and
     * idmapslots runners can live at once. The default lies in systemd's range for container ids;
     * no host account may use an id in it (checked at start).
     */
    idmapbase: z.number().int().min(65536).default(0x6000_0000),
    idmapslots: z.number().int().min(1).max(65535).default(4096),
    /* Size of each runner's private workspace and /tmp (tmpfs, charged to the runner's memory). */
    workspacesize: z.number().int().positive().default(256),
    /* A file listing with more entries or bytes than these answers 424 instead of filling the daemon's memory. */
    maxlistingentries: z.number().int().positive().default(50_000),
    maxlistingbytes: z
      .number()
      .int()
      .positive()
      .default(32 * 1024 * 1024),
    /*
     * Limits for an environment whose memoryLimit or cpuLimit is 0: 0 means "use the default", never
     * unlimited. MB and MHz-like shares, as memoryLimit and cpuLimit; the defaults are CodeOcean's own.
     */
    defaultmemorylimit: z.number().int().min(16).default(256),
    defaultcpulimit: z.number().int().min(1).default(20),
    /* Fork-bomb guard: most processes one runner may have. */
    pidslimit: z.number().int().min(8).default(512),
    cgroups: cgroupModeSchema.default('auto'),
    /* Name of the cgroup directory that holds one child per runner. */
    cgroupparent: z
      .string()
      .regex(/^[A-Za-z0-9_.-]+$/)
      .default('poseidon-ts'),
    /* Host address that reported mappedPorts point to; exposed ports are published on it. */
    hostaddress: z.string().min(1).default('127.0.0.1'),
    network: localNetworkSchema,
  })
  .prefault({});

/*
 * Sections of Poseidon's configuration that this daemon has no counterpart for. They are accepted
 * with Poseidon's types, so that Poseidon's file and POSEIDON_* variables work unchanged; each key
 * that is set gets one warning at start (UNIMPLEMENTED_KEYS).
 */
const awsSchema = z
  .strictObject({
    enabled: z.boolean().default(false),
    endpoint: z.string().optional(),
    functions: z.array(z.string()).default([]),
  })
  .prefault({});

const profilingSchema = z
  .strictObject({
    cpuenabled: z.boolean().default(false),
    cpufile: z.string().optional(),
    memoryinterval: goInteger().optional(),
    memorythreshold: goInteger().default(1_000),
  })
  .prefault({});

/* The options of sentry-go's ClientOptions that can be written in YAML (Poseidon decodes the struct as is). */
const sentrySchema = z
  .strictObject({
    dsn: z.string().optional(),
    environment: z.string().optional(),
    release: z.string().optional(),
    dist: z.string().optional(),
    servername: z.string().optional(),
    debug: z.boolean().default(false),
    attachstacktrace: z.boolean().default(true),
    enabletracing: z.boolean().default(false),
    samplerate: goNumber().pipe(z.number().min(0).max(1)).optional(),
    tracessamplerate: goNumber().pipe(z.number().min(0).max(1)).optional(),
    profilessamplerate: goNumber().pipe(z.number().min(0).max(1)).optional(),
    senddefaultpii: z.boolean().default(false),
    maxbreadcrumbs: goInteger().optional(),
    maxerrordepth: goInteger().optional(),
    ignoreerrors: goStringList().optional(),
    ignoretransactions: goStringList().optional(),
    tracepropagationtargets: goStringList().optional(),
    httpproxy: z.string().optional(),
    httpsproxy: z.string().optional(),
    cacerts: z.string().optional(),
  })
  .prefault({});

const influxdbSchema = z
  .strictObject({
    url: z.string().optional(),
    token: z.string().optional(),
    organization: z.string().optional(),
    bucket: z.string().optional(),
    stage: z.string().optional(),
  })
  .prefault({});

export const configSchema = z
  .strictObject({
    server: serverSchema,
    logger: loggerSchema,
    runners: runnersSchema,
    nomad: nomadSchema,
    local: localSchema,
    aws: awsSchema,
    profiling: profilingSchema,
    sentry: sentrySchema,
    influxdb: influxdbSchema,
  })
  .prefault({});

export interface UnimplementedKey {
  /* What this daemon does instead, for the warning. */
  instead: string;
  /* A value that asks for nothing beyond what this daemon does anyway, so it needs no warning. */
  harmless?: (value: unknown) => boolean;
}

/*
 * Poseidon's keys that are accepted but have no effect here, by dotted path (a section's path
 * covers every key in it). Each key that is set is warned about once at start.
 */
export const UNIMPLEMENTED_KEYS: Record<string, UnimplementedKey> = {
  'server.loggingfiltertoken': { instead: 'no request is hidden from the log by its User-Agent' },
  'server.alert.prewarmingpoolreloadtimeout': {
    instead: 'environments are never reloaded automatically; a pool that cannot be filled keeps retrying with backoff',
    harmless: (value) => value === 0,
  },
  'aws.enabled': { instead: 'there is no AWS Lambda backend; environments run in the local or Nomad backend', harmless: (value) => value === false },
  aws: { instead: 'there is no AWS Lambda backend; environments run in the local or Nomad backend' },
  'profiling.cpuenabled': { instead: 'there is no built-in profiler (use node --cpu-prof)', harmless: (value) => value === false },
  profiling: { instead: 'there is no built-in profiler or memory watchdog; this key is ignored' },
  // Honoured: dsn, environment, release, dist, servername, debug, attachstacktrace, samplerate, maxbreadcrumbs, ignoreerrors.
  'sentry.enabletracing': { instead: 'no traces are sent to Sentry, only errors', harmless: (value) => value === false },
  'sentry.tracessamplerate': { instead: 'no traces are sent to Sentry, only errors', harmless: (value) => value === 0 },
  'sentry.profilessamplerate': { instead: 'no profiles are sent to Sentry', harmless: (value) => value === 0 },
  'sentry.senddefaultpii': { instead: 'no personal data (addresses, headers, bodies) is ever sent to Sentry', harmless: (value) => value === false },
  'sentry.ignoretransactions': { instead: 'no transactions are sent to Sentry' },
  'sentry.tracepropagationtargets': { instead: 'no traces are propagated' },
  'sentry.maxerrordepth': { instead: "the SDK's default depth of linked errors (5) applies" },
  'sentry.httpproxy': { instead: 'events go to the DSN directly (or through the https_proxy/http_proxy environment variables)' },
  'sentry.httpsproxy': { instead: 'events go to the DSN directly (or through the https_proxy/http_proxy environment variables)' },
  'sentry.cacerts': { instead: "the system's CA certificates are used for the DSN" },
  influxdb: { instead: 'no data is sent to InfluxDB' },
};

export type Config = z.infer<typeof configSchema>;
export type NomadConfig = z.infer<typeof nomadSchema>;
export type LocalConfig = z.infer<typeof localSchema>;
export type RegistryConfig = z.infer<typeof registrySchema>;
export type ImageCacheConfig = z.infer<typeof imageCacheSchema>;
export type LocalNetworkConfig = z.infer<typeof localNetworkSchema>;
export type CgroupMode = z.infer<typeof cgroupModeSchema>;
