import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { EnvironmentStore } from '../src/local/environment-store.js';
import { environmentSpec } from './support/codeocean-client.js';

async function stateDirectory(t: { after(fn: () => Promise<void>): void }): Promise<string> {
  const directory = await mkdtemp(path.join(tmpdir(), 'poseidon-store-'));
  t.after(() => rm(directory, { recursive: true, force: true }));
  return directory;
}

test('each change is on disk before it counts, and the generation before it is kept', async (t) => {
  const directory = await stateDirectory(t);
  const store = new EnvironmentStore(directory);
  await store.checkWritable();
  assert.deepEqual(await store.load(), []);
  await store.put(environmentSpec(1));
  await store.put(environmentSpec(2));
  const current = JSON.parse(await readFile(path.join(directory, 'environments.json'), 'utf8')) as Array<{ id: number }>;
  const previous = JSON.parse(await readFile(path.join(directory, 'environments.json.previous'), 'utf8')) as Array<{ id: number }>;
  assert.deepEqual(
    current.map((spec) => spec.id),
    [1, 2],
  );
  assert.deepEqual(
    previous.map((spec) => spec.id),
    [1],
  );
});

test('an empty or cut-short file left by a crash falls back to the previous generation', async (t) => {
  const directory = await stateDirectory(t);
  const store = new EnvironmentStore(directory);
  await store.load();
  await store.put(environmentSpec(1));
  await store.put(environmentSpec(2));
  for (const damage of ['', '[{"id": 1, "prewarm']) {
    await writeFile(path.join(directory, 'environments.json'), damage);
    const reloaded = new EnvironmentStore(directory);
    assert.deepEqual(
      (await reloaded.load()).map((spec) => spec.id),
      [1],
    );
    assert.match(reloaded.recovered ?? '', /previous generation/);
  }
  await rm(path.join(directory, 'environments.json.previous'));
  await assert.rejects(new EnvironmentStore(directory).load(), /is damaged .* no usable .*previous/);
});

test('duplicate ids in the file are refused at start, naming them', async (t) => {
  const directory = await stateDirectory(t);
  await writeFile(path.join(directory, 'environments.json'), JSON.stringify([environmentSpec(7), environmentSpec(8), environmentSpec(7)]));
  await assert.rejects(new EnvironmentStore(directory).load(), /environment\(s\) 7 more than once/);
});
