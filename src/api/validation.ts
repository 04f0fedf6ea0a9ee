import type { z } from 'zod';
import { BadRequestError } from '../runner/errors.js';

/* Parses input with its schema; a failure names each offending field in a 400. */
export function parseInput<S extends z.ZodType>(schema: S, value: unknown, what: string): z.output<S> {
  const result = schema.safeParse(value);
  if (result.success) return result.data;
  const problems = result.error.issues.map((issue) => `${issue.path.join('.') || what}: ${issue.message}`);
  throw new BadRequestError(`invalid ${what}: ${problems.join('; ')}`);
}
