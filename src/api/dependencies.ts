import type { Logger } from 'pino';
import type { Config } from '../config/schema.js';
import type { EnvironmentStatistics, ExecutionEnvironmentSpec } from '../dto/environment.js';
import type { PutOutcome } from '../runner/accessor-handler.js';
import type { Runner } from '../runner/runner.js';

/*
 * The narrow views the routes need of the backends, as Poseidon's routes take a runner.Accessor
 * rather than the whole manager. The AccessorHandler chain implements both structurally, and the
 * API tests implement them in memory.
 */
export interface RunnerAccessor {
  /* An idle runner of the environment; EnvironmentNotFoundError or NoIdleRunnerError otherwise. */
  claim(environmentId: number, inactivityTimeout: number): Promise<Runner>;
  /* The runner with that id; RunnerNotFoundError (410) otherwise. */
  get(runnerId: string): Runner;
  return(runner: Runner): Promise<void>;
}

export interface EnvironmentAccessor {
  environments(): ExecutionEnvironmentSpec[];
  /* EnvironmentNotFoundError when unknown. */
  environment(environmentId: number): ExecutionEnvironmentSpec;
  putEnvironment(spec: ExecutionEnvironmentSpec): Promise<PutOutcome>;
  deleteEnvironment(environmentId: number): Promise<void>;
  statistics(): EnvironmentStatistics[];
}

/* What buildApp is given; its own module so routes and the app factory import it without a cycle. */
export interface AppDependencies {
  config: Config;
  manager: RunnerAccessor & EnvironmentAccessor;
  logger: Logger;
  version: string;
}
