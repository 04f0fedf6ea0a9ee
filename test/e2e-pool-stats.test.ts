import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { environmentSpec, type CodeOceanClient } from './support/codeocean-client.js';
import { useDaemon } from './support/fixture.js';
import { waitFor } from './support/wait.js';

/*
 * Prewarmed pools are what makes a claim cheap; these tests watch the pool through the statistics
 * route exactly as CodeOcean's admin dashboard reads it.
 */

const TOKEN = 'pool-token-0b2d';
const ENV_ID = 51;
const POOL = 2;
const fixture = useDaemon({ token: TOKEN });

interface EnvStats {
  id: number;
  prewarmingPoolSize: number;
  idleRunners: number;
  usedRunners: number;
}

async function stats(client: CodeOceanClient, id: number): Promise<EnvStats | undefined> {
  const response = await client.statistics();
  assert.equal(response.status, 200, response.text);
  const body = response.body;
  assert.ok(typeof body === 'object' && body !== null && !Array.isArray(body), response.text);
  const entry = body[String(id)];
  if (entry === undefined) return undefined;
  assert.ok(typeof entry === 'object' && entry !== null && !Array.isArray(entry));
  // CodeOcean merges these four keys into its dashboard rows.
  for (const key of ['id', 'prewarmingPoolSize', 'idleRunners', 'usedRunners']) {
    assert.equal(typeof entry[key], 'number', `statistics entry lacks numeric ${key}: ${response.text}`);
  }
  return entry as unknown as EnvStats;
}

const waitForStats = (client: CodeOceanClient, id: number, want: Omit<EnvStats, 'id'>, what: string): Promise<EnvStats | undefined> =>
  waitFor(
    () => stats(client, id),
    (s) =>
      s !== undefined &&
      s.id === id &&
      s.prewarmingPoolSize === want.prewarmingPoolSize &&
      s.idleRunners === want.idleRunners &&
      s.usedRunners === want.usedRunners,
    what,
    30_000,
  );

describe('prewarmed pool and statistics', () => {
  test('pool fills, refills after N claims, and statistics count idle and used runners', async () => {
    const { client } = fixture;
    assert.equal((await client.putEnvironment(environmentSpec(ENV_ID, { prewarmingPoolSize: POOL }))).status, 201);
    await waitForStats(client, ENV_ID, { prewarmingPoolSize: POOL, idleRunners: POOL, usedRunners: 0 }, 'the pool to fill');
    assert.equal((await client.health()).status, 204, 'a full pool is healthy');

    const claims = POOL + 1;
    const runners: string[] = [];
    for (let i = 0; i < claims; i++) runners.push(await client.claim(ENV_ID));
    assert.equal(new Set(runners).size, claims, 'runner ids must be unique');
    await waitForStats(
      client,
      ENV_ID,
      { prewarmingPoolSize: POOL, idleRunners: POOL, usedRunners: claims },
      `the pool to refill to ${POOL} after ${claims} claims`,
    );

    // Each claimed runner is a working sandbox of its own.
    for (const [index, runnerId] of runners.entries()) {
      const result = await client.run(runnerId, `echo runner-${index}`);
      assert.equal(result.stdout.trim(), `runner-${index}`);
    }

    for (const runnerId of runners) assert.equal((await client.deleteRunner(runnerId)).status, 204);
    await waitForStats(client, ENV_ID, { prewarmingPoolSize: POOL, idleRunners: POOL, usedRunners: 0 }, 'used runners to drop to 0');
  });

  test('changing prewarmingPoolSize applies at once, growing and shrinking', async () => {
    const { client } = fixture;
    assert.equal((await client.putEnvironment(environmentSpec(ENV_ID, { prewarmingPoolSize: 3 }))).status, 204);
    await waitForStats(client, ENV_ID, { prewarmingPoolSize: 3, idleRunners: 3, usedRunners: 0 }, 'the pool to grow to 3');
    assert.equal((await client.putEnvironment(environmentSpec(ENV_ID, { prewarmingPoolSize: 1 }))).status, 204);
    await waitForStats(client, ENV_ID, { prewarmingPoolSize: 1, idleRunners: 1, usedRunners: 0 }, 'the pool to shrink to 1');
  });

  test('an unused runner is destroyed after its inactivity timeout', async () => {
    const { client } = fixture;
    const runnerId = await client.claim(ENV_ID, 2);
    // Poll statistics only: touching the runner would count as activity and reset its timer.
    await waitForStats(client, ENV_ID, { prewarmingPoolSize: 1, idleRunners: 1, usedRunners: 0 }, 'the idle runner to expire');
    assert.equal((await client.listFiles(runnerId, { recursive: false })).status, 410, 'an expired runner answers 410');
  });

  test('deleting an environment removes it from statistics and from claims', async () => {
    const { client } = fixture;
    const runnerId = await client.claim(ENV_ID);
    assert.equal((await client.deleteEnvironment(ENV_ID)).status, 204);
    assert.equal(await stats(client, ENV_ID), undefined, 'deleted environment still in statistics');
    assert.equal((await client.claimRunner(ENV_ID)).status, 404);
    assert.equal((await client.deleteRunner(runnerId)).status, 410, 'its used runners are destroyed too');
  });
});
