import { randomUUID } from 'node:crypto';

/* Runner ids are `<environmentId>-<uuid>`, as in Poseidon, so the owner is found without a search. */
export function newRunnerId(environmentId: number): string {
  return `${environmentId}-${randomUUID()}`;
}

export function environmentIdOfRunner(runnerId: string): number | undefined {
  const prefix = runnerId.split('-', 1)[0];
  const id = Number(prefix);
  return prefix !== '' && Number.isSafeInteger(id) ? id : undefined;
}
