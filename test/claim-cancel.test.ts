import assert from 'node:assert/strict';
import type { AddressInfo } from 'node:net';
import { test } from 'node:test';
import type { Runner } from '../src/runner/runner.js';
import { buildInjectApp } from './support/api-fakes.js';
import { environmentSpec } from './support/codeocean-client.js';

/*
 * A claim may wait for a runner being built; POST /runners hands the manager a signal that aborts
 * when the HTTP client hangs up, so the wait ends and no runner goes to a client that is gone.
 * Over a real socket: inject cannot hang up.
 */
test('POST /runners aborts the claim signal when the client disconnects, and only then', async (t) => {
  const token = 'cancel-token';
  const { app, manager } = await buildInjectApp({ token });
  t.after(() => app.close());
  manager.specs.set(30, environmentSpec(30));
  const original = manager.claim.bind(manager);
  const signals: AbortSignal[] = [];
  let claimStarted = () => {};
  const started = new Promise<void>((resolve) => (claimStarted = resolve));
  let hold = true;
  manager.claim = async (environmentId: number, inactivityTimeout: number, _log?: unknown, signal?: AbortSignal): Promise<Runner> => {
    assert.ok(signal, 'the route passes a signal');
    signals.push(signal);
    claimStarted();
    // The first claim waits like one for a runner under construction, until its client leaves.
    if (hold) await new Promise((resolve) => signal.addEventListener('abort', resolve, { once: true }));
    return original(environmentId, inactivityTimeout);
  };
  await app.listen({ port: 0, host: '127.0.0.1' });
  const { port } = app.server.address() as AddressInfo;
  const claim = (signal?: AbortSignal) =>
    fetch(`http://127.0.0.1:${port}/api/v1/runners`, {
      method: 'POST',
      headers: { 'Poseidon-Token': token, 'Content-Type': 'application/json' },
      body: JSON.stringify({ executionEnvironmentId: 30, inactivityTimeout: 60 }),
      ...(signal ? { signal } : {}),
    });

  const client = new AbortController();
  const leaving = claim(client.signal).catch((error: unknown) => error);
  await started;
  client.abort();
  assert.equal(((await leaving) as Error).name, 'AbortError');
  const [waiting] = signals;
  assert.ok(waiting);
  if (!waiting.aborted) await new Promise((resolve) => waiting.addEventListener('abort', resolve, { once: true }));
  assert.equal(waiting.aborted, true);

  hold = false;
  const answered = await claim();
  assert.equal(answered.status, 200, await answered.clone().text());
  assert.equal(signals[1]?.aborted, false, 'a claim that was answered is not cancelled');
});
