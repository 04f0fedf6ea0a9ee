import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import net from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { removeStaleSocketDirectories } from '../src/local/spawner-client.js';

test('socket directories of dead daemons are removed; a live daemon keeps its own', async (t) => {
  const parent = await mkdtemp(path.join(tmpdir(), 'spawner-sweep-'));
  t.after(() => rm(parent, { recursive: true, force: true }));
  const stale = path.join(parent, 'poseidon-spawner-stale');
  const live = path.join(parent, 'poseidon-spawner-live');
  const unrelated = path.join(parent, 'something-else');
  await Promise.all([mkdir(stale), mkdir(live), mkdir(unrelated)]);
  const server = net.createServer((socket) => socket.destroy());
  await new Promise<void>((resolve) => server.listen(path.join(live, 'socket'), resolve));
  t.after(() => new Promise<void>((resolve) => server.close(() => resolve())));

  assert.equal(await removeStaleSocketDirectories(parent), 1);
  assert.equal(existsSync(stale), false);
  assert.equal(existsSync(live), true);
  assert.equal(existsSync(unrelated), true);
});
