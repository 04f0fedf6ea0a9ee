import { collectDefaultMetrics, Counter, Gauge, Histogram, Registry } from 'prom-client';
import type { EnvironmentStatistics } from '../dto/environment.js';
import type { ExecutionResult } from '../runner/runner.js';

/*
 * The daemon's Prometheus metrics (GET /metrics). Each app owns its Registry rather than using
 * prom-client's global one: tests start several apps in one process, and two daemons' counters
 * must never add up. Code elsewhere records through the methods below (or the narrow
 * `Instruments` interface the backends see), never through prom-client itself, so the metric
 * names and labels are defined here only.
 */

/* What the image store (src/local/images) reports: bytes per layer as they arrive, and how prepares end. */
export interface ImageInstruments {
  /* `bytes` more arrived from `registry`. */
  imageBytes?(registry: string, bytes: number): void;
  /* A layer's download so far; `done` ends it (its gauges go). */
  imageLayerProgress?(reference: string, layer: string, downloaded: number, total: number, done: boolean): void;
  /* An image prepare ended: served from the cache, pulled, or failed. */
  imagePrepared?(outcome: ImagePrepareOutcome, seconds: number): void;
}

export type ImagePrepareOutcome = 'cached' | 'pulled' | 'failed';

/* Forwards the image store's reports to every target that listens to them. */
function imageFanOut(targets: Array<Partial<Instruments>>): ImageInstruments {
  return {
    imageBytes: (...args) => {
      for (const target of targets) target.imageBytes?.(...args);
    },
    imageLayerProgress: (...args) => {
      for (const target of targets) target.imageLayerProgress?.(...args);
    },
    imagePrepared: (...args) => {
      for (const target of targets) target.imagePrepared?.(...args);
    },
  };
}

/* What the backends report about themselves: kept this small so a backend depends on no metrics library. */
export interface Instruments extends ImageInstruments {
  /* A runner build ended: ready (no error) or failed. */
  runnerBuilt(environmentId: number, seconds: number, error?: unknown): void;
  /* One HTTP call to Nomad ended; `endpoint` is a path template without ids. */
  nomadCall(method: string, endpoint: string, seconds: number, error?: { errorCode?: string }): void;
  /* A claim that found its pool empty waited for a runner under construction, and how that ended. */
  claimWaited(environmentId: number, seconds: number, outcome: ClaimWaitOutcome): void;
  /* Nomad could not place an environment's template or runner job; `cause` is no_nodes, constraints or resources. */
  placementFailed(environmentId: number, cause: string): void;
  /*
   * The image an environment's runners need (local backend): being pulled (its pool waits, which is
   * no depletion), ready, or failed for good (detail says why) until the environment is put again.
   */
  imageState?(environmentId: number, state: 'pulling' | 'ready' | 'failed', detail?: string): void;
  /* Connections to Nomad (HTTP calls or exec sessions) in use and callers waiting for one, after every change. */
  nomadConnections?(kind: NomadConnectionKind, inUse: number, queued: number): void;
}

export type NomadConnectionKind = 'http' | 'exec';

/*
 * served: a runner came in time; timeout: none within runners.claimtimeout (NOMAD_OVERLOAD);
 * cancelled: the client went away; unavailable: the environment was deleted or its builds failed.
 */
export type ClaimWaitOutcome = 'served' | 'timeout' | 'cancelled' | 'unavailable';

export const noInstruments: Instruments = {
  runnerBuilt: () => undefined,
  nomadCall: () => undefined,
  claimWaited: () => undefined,
  placementFailed: () => undefined,
};

/* Calls every observer in turn: metrics and the health monitor both listen to runner builds. */
export function fanOut(...targets: Array<Partial<Instruments>>): Instruments {
  return {
    ...imageFanOut(targets),
    runnerBuilt: (...args) => {
      for (const target of targets) target.runnerBuilt?.(...args);
    },
    nomadCall: (...args) => {
      for (const target of targets) target.nomadCall?.(...args);
    },
    claimWaited: (...args) => {
      for (const target of targets) target.claimWaited?.(...args);
    },
    placementFailed: (...args) => {
      for (const target of targets) target.placementFailed?.(...args);
    },
    imageState: (...args) => {
      for (const target of targets) target.imageState?.(...args);
    },
    nomadConnections: (...args) => {
      for (const target of targets) target.nomadConnections?.(...args);
    },
  };
}

export type ClaimOutcome = 'success' | 'no_idle_runner' | 'environment_not_found' | 'error';
/* `cancelled`: the client closed the WebSocket before the process ended (it was killed). */
export type ExecutionOutcome = 'exit' | 'timeout' | 'oom' | 'error' | 'cancelled';
export type ByteDirection = 'stdout' | 'stderr' | 'upload' | 'download';

export function executionOutcome(result: ExecutionResult): ExecutionOutcome {
  if (result.kind === 'exited') return 'exit';
  if (result.kind === 'oomKilled') return 'oom';
  return 'error';
}

/* Seconds, from 1 ms to 1 min: API calls are milliseconds, uploads and claims under load can take seconds. */
const REQUEST_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60];
/* Executions are bounded by CodeOcean's time limits (tens of seconds, at most a few minutes). */
const EXECUTION_BUCKETS = [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600];
/* A local sandbox is ready in tens of milliseconds, a Nomad job in seconds. */
const BUILD_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120];

export interface MetricsOptions {
  /* Node's and the process's own metrics (CPU, memory, event loop, GC); off for throw-away test apps. */
  processMetrics?: boolean;
}

export class Metrics implements Instruments {
  readonly registry = new Registry();
  /* Where the pool gauges read from; set once the manager exists. */
  #pools: () => EnvironmentStatistics[] = () => [];

  readonly #httpRequests: Counter<'method' | 'route' | 'status_code'>;
  readonly #httpDuration: Histogram<'method' | 'route' | 'status_code'>;
  readonly #claims: Counter<'environment_id' | 'outcome'>;
  readonly #claimDuration: Histogram<'environment_id' | 'outcome'>;
  readonly #claimWait: Histogram<'environment_id' | 'outcome'>;
  readonly #claimWaitTimeouts: Counter<'environment_id'>;
  readonly #executions: Counter<'environment_id' | 'outcome'>;
  readonly #executionDuration: Histogram<'environment_id' | 'outcome'>;
  readonly #builds: Counter<'environment_id' | 'outcome'>;
  readonly #buildDuration: Histogram<'environment_id' | 'outcome'>;
  readonly #websocketsOpen: Gauge;
  readonly #websockets: Counter<'outcome'>;
  readonly #bytes: Counter<'environment_id' | 'direction'>;
  readonly #nomadDuration: Histogram<'method' | 'endpoint' | 'outcome'>;
  readonly #nomadErrors: Counter<'method' | 'endpoint' | 'error_code'>;
  readonly #imageBytes: Counter<'registry'>;
  readonly #imageLayerDownloaded: Gauge<'reference' | 'layer'>;
  readonly #imageLayerSize: Gauge<'reference' | 'layer'>;
  readonly #imagePrepares: Histogram<'outcome'>;
  readonly #placementFailures: Counter<'environment_id' | 'cause'>;
  readonly #nomadConnections: Gauge<'kind' | 'state'>;

  constructor(options: MetricsOptions = {}) {
    const registers = [this.registry];
    if (options.processMetrics ?? true) collectDefaultMetrics({ register: this.registry });
    const http = ['method', 'route', 'status_code'] as const;
    const byEnvironment = ['environment_id', 'outcome'] as const;
    this.#httpRequests = new Counter({
      name: 'poseidon_http_requests_total',
      help: 'HTTP requests answered, by route template and status code',
      labelNames: http,
      registers,
    });
    this.#httpDuration = new Histogram({
      name: 'poseidon_http_request_duration_seconds',
      help: 'Time from receiving a request to sending its response',
      labelNames: http,
      buckets: REQUEST_BUCKETS,
      registers,
    });
    this.#claims = new Counter({
      name: 'poseidon_runner_claims_total',
      help: 'Runner claims (POST /runners) by environment and outcome',
      labelNames: byEnvironment,
      registers,
    });
    this.#claimDuration = new Histogram({
      name: 'poseidon_runner_claim_duration_seconds',
      help: 'Time a runner claim took',
      labelNames: byEnvironment,
      buckets: REQUEST_BUCKETS,
      registers,
    });
    this.#claimWait = new Histogram({
      name: 'poseidon_runner_claim_wait_seconds',
      help: 'Time a claim on an empty pool waited for a runner under construction, by outcome (served, timeout, cancelled, unavailable)',
      labelNames: byEnvironment,
      buckets: REQUEST_BUCKETS,
      registers,
    });
    this.#claimWaitTimeouts = new Counter({
      name: 'poseidon_runner_claim_wait_timeouts_total',
      help: 'Claims that waited runners.claimtimeout for a runner in vain and were answered NOMAD_OVERLOAD',
      labelNames: ['environment_id'],
      registers,
    });
    this.#executions = new Counter({
      name: 'poseidon_executions_total',
      help: 'Executions by environment and how they ended (exit, timeout, oom, error, cancelled)',
      labelNames: byEnvironment,
      registers,
    });
    this.#executionDuration = new Histogram({
      name: 'poseidon_execution_duration_seconds',
      help: 'Time from the start message to the end of an execution',
      labelNames: byEnvironment,
      buckets: EXECUTION_BUCKETS,
      registers,
    });
    this.#builds = new Counter({
      name: 'poseidon_runner_builds_total',
      help: 'Runner (sandbox or Nomad job) builds by environment and outcome (success, failure)',
      labelNames: byEnvironment,
      registers,
    });
    this.#buildDuration = new Histogram({
      name: 'poseidon_runner_build_duration_seconds',
      help: 'Time to build a runner until it is ready or has failed',
      labelNames: byEnvironment,
      buckets: BUILD_BUCKETS,
      registers,
    });
    this.#websocketsOpen = new Gauge({ name: 'poseidon_websocket_connections', help: 'Execution WebSocket connections open now', registers });
    this.#websockets = new Counter({
      name: 'poseidon_websocket_upgrades_total',
      help: 'Execution WebSocket upgrades by outcome (accepted, refused)',
      labelNames: ['outcome'],
      registers,
    });
    this.#bytes = new Counter({
      name: 'poseidon_transferred_bytes_total',
      help: 'Bytes of learner data: output streamed (stdout, stderr), files uploaded (upload) and downloaded (download)',
      labelNames: ['environment_id', 'direction'],
      registers,
    });
    this.#nomadDuration = new Histogram({
      name: 'poseidon_nomad_request_duration_seconds',
      help: 'Latency of HTTP calls to Nomad by endpoint and outcome (success, error)',
      labelNames: ['method', 'endpoint', 'outcome'],
      buckets: REQUEST_BUCKETS,
      registers,
    });
    this.#placementFailures = new Counter({
      name: 'poseidon_nomad_placement_failures_total',
      help: 'Registrations Nomad evaluated but could not place, by environment and cause (no_nodes, constraints, resources)',
      labelNames: ['environment_id', 'cause'],
      registers,
    });
    this.#nomadConnections = new Gauge({
      name: 'poseidon_nomad_connections',
      help: 'Connections to Nomad by kind (http, exec) and state: in_use, or queued for a free one (nomad.maxconnections)',
      labelNames: ['kind', 'state'],
      registers,
    });
    this.#nomadErrors = new Counter({
      name: 'poseidon_nomad_request_errors_total',
      help: 'Failed HTTP calls to Nomad by endpoint and error code',
      labelNames: ['method', 'endpoint', 'error_code'],
      registers,
    });
    this.#imageBytes = new Counter({
      name: 'poseidon_image_pull_bytes_total',
      help: 'Bytes of image layers and configs downloaded, by registry',
      labelNames: ['registry'],
      registers,
    });
    this.#imageLayerDownloaded = new Gauge({
      name: 'poseidon_image_layer_downloaded_bytes',
      help: 'Bytes of each layer downloading now, by image reference and layer digest (gone once the layer is done)',
      labelNames: ['reference', 'layer'],
      registers,
    });
    this.#imageLayerSize = new Gauge({
      name: 'poseidon_image_layer_size_bytes',
      help: 'Size of each layer downloading now, by image reference and layer digest (gone once the layer is done)',
      labelNames: ['reference', 'layer'],
      registers,
    });
    this.#imagePrepares = new Histogram({
      name: 'poseidon_image_prepare_duration_seconds',
      help: 'Time to have an image ready for runners, by outcome (cached, pulled, failed)',
      labelNames: ['outcome'],
      buckets: [0.001, 0.01, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600],
      registers,
    });

    // Pool gauges are read at scrape time from the manager's statistics, so they can never drift from it.
    const pools = (): EnvironmentStatistics[] => this.#pools();
    const poolGauge = (name: string, help: string, value: (stats: EnvironmentStatistics) => number): void => {
      new Gauge({
        name,
        help,
        labelNames: ['environment_id'],
        registers,
        collect() {
          this.reset();
          for (const stats of pools()) this.set({ environment_id: String(stats.id) }, value(stats));
        },
      });
    };
    poolGauge('poseidon_runners_idle', 'Idle (prewarmed) runners per environment', (stats) => stats.idleRunners);
    poolGauge('poseidon_runners_used', 'Runners claimed by a client per environment', (stats) => stats.usedRunners);
    poolGauge('poseidon_prewarming_pool_size', 'Configured prewarming pool size per environment', (stats) => stats.prewarmingPoolSize);
  }

  /* Where the idle, used and pool-size gauges come from (the manager's statistics). */
  observePools(source: () => EnvironmentStatistics[]): void {
    this.#pools = source;
  }

  httpRequest(method: string, route: string, statusCode: number, seconds: number): void {
    const labels = { method, route, status_code: String(statusCode) };
    this.#httpRequests.inc(labels);
    this.#httpDuration.observe(labels, seconds);
  }

  claim(environmentId: number, outcome: ClaimOutcome, seconds: number): void {
    const labels = { environment_id: String(environmentId), outcome };
    this.#claims.inc(labels);
    this.#claimDuration.observe(labels, seconds);
  }

  claimWaited(environmentId: number, seconds: number, outcome: ClaimWaitOutcome): void {
    const environment = String(environmentId);
    this.#claimWait.observe({ environment_id: environment, outcome }, seconds);
    if (outcome === 'timeout') this.#claimWaitTimeouts.inc({ environment_id: environment });
  }

  execution(environmentId: number, outcome: ExecutionOutcome, seconds: number): void {
    const labels = { environment_id: String(environmentId), outcome };
    this.#executions.inc(labels);
    this.#executionDuration.observe(labels, seconds);
  }

  runnerBuilt(environmentId: number, seconds: number, error?: unknown): void {
    const labels = { environment_id: String(environmentId), outcome: error === undefined ? 'success' : 'failure' };
    this.#builds.inc(labels);
    this.#buildDuration.observe(labels, seconds);
  }

  placementFailed(environmentId: number, cause: string): void {
    this.#placementFailures.inc({ environment_id: String(environmentId), cause });
  }

  websocketUpgrade(outcome: 'accepted' | 'refused'): void {
    this.#websockets.inc({ outcome });
  }

  /* Brackets one open execution WebSocket; returns the matching close. */
  websocketOpened(): () => void {
    this.#websocketsOpen.inc();
    let closed = false;
    return () => {
      if (closed) return;
      closed = true;
      this.#websocketsOpen.dec();
    };
  }

  bytes(environmentId: number, direction: ByteDirection, count: number): void {
    if (count > 0) this.#bytes.inc({ environment_id: String(environmentId), direction }, count);
  }

  nomadCall(method: string, endpoint: string, seconds: number, error?: { errorCode?: string }): void {
    this.#nomadDuration.observe({ method, endpoint, outcome: error === undefined ? 'success' : 'error' }, seconds);
    if (error !== undefined) this.#nomadErrors.inc({ method, endpoint, error_code: error.errorCode ?? 'UNKNOWN' });
  }

  nomadConnections(kind: NomadConnectionKind, inUse: number, queued: number): void {
    this.#nomadConnections.set({ kind, state: 'in_use' }, inUse);
    this.#nomadConnections.set({ kind, state: 'queued' }, queued);
  }

  imageBytes(registry: string, bytes: number): void {
    if (bytes > 0) this.#imageBytes.inc({ registry }, bytes);
  }

  imageLayerProgress(reference: string, layer: string, downloaded: number, total: number, done: boolean): void {
    const labels = { reference, layer };
    if (done) {
      this.#imageLayerDownloaded.remove(labels);
      this.#imageLayerSize.remove(labels);
      return;
    }
    this.#imageLayerDownloaded.set(labels, downloaded);
    this.#imageLayerSize.set(labels, total);
  }

  imagePrepared(outcome: ImagePrepareOutcome, seconds: number): void {
    this.#imagePrepares.observe({ outcome }, seconds);
  }

  contentType(): string {
    return this.registry.contentType;
  }

  scrape(): Promise<string> {
    return this.registry.metrics();
  }
}

/* Seconds since a process.hrtime.bigint() reading. */
export function secondsSince(start: bigint): number {
  return Number(process.hrtime.bigint() - start) / 1e9;
}

/*
 * Nomad paths carry job, allocation and node ids; as labels those would make a new time series per
 * runner. `/v1/job/5-abc/allocations` becomes `/v1/job/:id/allocations`.
 */
export function nomadEndpoint(path: string): string {
  const segments = path.split('?', 1)[0]?.split('/') ?? [];
  // ['', 'v1', 'job', '<id>', ...]: the segment after a singular resource name is an id.
  const singular = new Set(['job', 'allocation', 'evaluation', 'node', 'deployment']);
  return segments.map((segment, index) => (index > 0 && singular.has(segments[index - 1] ?? '') && index >= 3 ? ':id' : segment)).join('/');
}
