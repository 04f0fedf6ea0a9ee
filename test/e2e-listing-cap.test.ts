import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { describe, test } from 'node:test';
import { DEFAULT_LIST_LIMITS } from '../src/local/agent/agent-client.js';
import { environmentSpec } from './support/codeocean-client.js';
import { processesMatching } from './support/daemon.js';
import { useDaemon } from './support/fixture.js';

/*
 * A learner-made tree too large to list (CodeOcean sends a recursive GET /files after each run):
 * the daemon answers 424, which CodeOcean takes as "no files", and its memory stays flat.
 */

const ENV_ID = 41;
const fixture = useDaemon({}, async ({ client }) => {
  assert.equal((await client.putEnvironment(environmentSpec(ENV_ID, { prewarmingPoolSize: 1 }))).status, 201);
});

/* Peak resident memory of the daemon's node process, in bytes. */
function daemonPeakRss(): number {
  const pid = processesMatching(fixture.daemon.configPath).find((candidate) => readFileSync(`/proc/${candidate}/comm`, 'utf8').trim().startsWith('node'));
  assert.ok(pid, 'the daemon process is found');
  const match = /^VmHWM:\s+(\d+) kB$/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  return Number(match?.[1] ?? 0) * 1024;
}

describe('listing caps', () => {
  test('a listing past the entry cap answers 424 with a clear message; the runner works on', async () => {
    const { client } = fixture;
    const runner = await client.claim(ENV_ID);
    const made = await client.run(
      runner,
      `perl -e 'mkdir "many"; for (0..${DEFAULT_LIST_LIMITS.maxEntries}) { open my $f, ">", "many/" . ("n" x 200) . $_ or die $! }' && echo made`,
      { timeLimit: 60, guardMs: 90_000 },
    );
    assert.equal(made.stdout.trim(), 'made', made.stderr);
    const peakBefore = daemonPeakRss();
    const response = await client.listFiles(runner, { recursive: true });
    assert.equal(response.status, 424, response.text);
    assert.deepEqual(response.body, { message: `the listing has more than ${DEFAULT_LIST_LIMITS.maxEntries} entries`, errorCode: 'FILE_NOT_AVAILABLE' });
    // 50,000 entries of ~250 bytes: the parsed part and its strings, not gigabytes.
    const grown = daemonPeakRss() - peakBefore;
    console.log(`daemon peak RSS grew by ${Math.round(grown / 2 ** 20)} MiB for a capped listing`);
    assert.ok(grown < 256 * 2 ** 20, `the daemon's peak memory grew by ${Math.round(grown / 2 ** 20)} MiB`);
    // Not recursive, the directory itself still has too many entries.
    assert.equal((await client.listFiles(runner, { path: 'many', recursive: false })).status, 424);
    assert.equal((await client.run(runner, 'rm -rf many && echo ok')).stdout.trim(), 'ok');
    const small = await client.listFiles(runner, { recursive: true });
    assert.equal(small.status, 200, small.text);
    assert.equal((await client.deleteRunner(runner)).status, 204);
  });
});
