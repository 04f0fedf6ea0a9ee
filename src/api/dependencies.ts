import type { Logger } from 'pino';
import type { Config } from '../config/schema.js';
import type { HealthMonitor } from '../monitoring/health.js';
import type { ContextLogger } from '../monitoring/logger.js';
import type { Metrics } from '../monitoring/metrics.js';
import type { ErrorReporter } from '../monitoring/sentry.js';
import type { EnvironmentStatistics, ExecutionEnvironmentSpec } from '../dto/environment.js';
import type { PutOutcome } from '../runner/accessor-handler.js';
import type { Runner } from '../runner/runner.js';

/*
 * The narrow views the routes need of the backends, as Poseidon's routes take a runner.Accessor
 * rather than the whole manager. The AccessorHandler chain implements both structurally, and the
 * API tests implement them in memory.
 */
/*
 * `log` is the request's logger: what the call logs (claimed, destroyed, stored) carries the
 * request's id. Omitted, the backend logs through its own.
 */
export interface RunnerAccessor {
  /* An idle runner of the environment; EnvironmentNotFoundError or NoIdleRunnerError otherwise. */
  // `signal` aborts when the client went away, ending a wait for a runner under construction.
  claim(environmentId: number, inactivityTimeout: number, log?: ContextLogger, signal?: AbortSignal): Promise<Runner>;
  /* The runner with that id; RunnerNotFoundError (410) otherwise. */
  get(runnerId: string): Runner;
  return(runner: Runner, log?: ContextLogger): Promise<void>;
}

export interface EnvironmentAccessor {
  environments(): ExecutionEnvironmentSpec[];
  /* EnvironmentNotFoundError when unknown. */
  environment(environmentId: number): ExecutionEnvironmentSpec;
  putEnvironment(spec: ExecutionEnvironmentSpec, log?: ContextLogger): Promise<PutOutcome>;
  deleteEnvironment(environmentId: number, log?: ContextLogger): Promise<void>;
  statistics(): EnvironmentStatistics[];
  /* Why the daemon is draining before a shutdown (claims are refused, /health answers 503); undefined while it serves. */
  readonly lameDuck?: string | undefined;
}

/* What buildApp is given; its own module so routes and the app factory import it without a cycle. */
export interface AppDependencies {
  config: Config;
  manager: RunnerAccessor & EnvironmentAccessor;
  logger: Logger;
  version: string;
  /* The app's Prometheus registry; a fresh one (without process metrics) when omitted, as in tests. */
  metrics?: Metrics;
  /* What /health answers; made from server.alert when omitted. */
  health?: HealthMonitor;
  /* Where unexpected 5xx errors are reported besides the log (Sentry, when sentry.dsn is set). */
  errors?: ErrorReporter | undefined;
}

/* What the routes get: buildApp fills in what AppDependencies may omit. */
export type RouteDependencies = AppDependencies & Required<Pick<AppDependencies, 'metrics' | 'health'>>;
