import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, lstatSync, readdirSync, readFileSync, readlinkSync } from 'node:fs';
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { promisify } from 'node:util';
import { FakeRegistry } from './fake-registry/index.js';
import { testImageStore } from './support/image-store.js';
import { buildTestImage, type TestImage } from './support/test-images.js';

/*
 * umoci as the oracle of the unpacker: the same image, pulled by skopeo from the same registry and
 * unpacked by umoci, must give the same tree as the store's: entries, types, owners, modes, link
 * targets, hard links, file contents and times. Where the store differs on purpose, the test says
 * so: device nodes are skipped, setuid/setgid bits dropped, the sandbox's mount points added.
 */

const run = promisify(execFile);
const TOOLS = ['/usr/bin/skopeo', '/usr/bin/umoci'];
const skip = TOOLS.every((tool) => existsSync(tool)) ? false : 'skopeo or umoci is not installed';

interface Node {
  type: string;
  mode: number;
  uid: number;
  gid: number;
  mtime: number;
  links: number;
  content: string;
}

function tree(root: string): Map<string, Node> {
  const nodes = new Map<string, Node>();
  const walk = (relative: string): void => {
    for (const name of readdirSync(path.join(root, relative))) {
      const entry = relative === '' ? name : `${relative}/${name}`;
      const file = path.join(root, entry);
      const stat = lstatSync(file);
      const type = stat.isDirectory()
        ? 'directory'
        : stat.isFile()
          ? 'file'
          : stat.isSymbolicLink()
            ? 'symlink'
            : stat.isCharacterDevice() || stat.isBlockDevice()
              ? 'device'
              : 'other';
      nodes.set(entry, {
        type,
        mode: type === 'symlink' ? 0 : stat.mode & 0o7777,
        uid: stat.uid,
        gid: stat.gid,
        mtime: Math.floor(stat.mtimeMs / 1000),
        links: type === 'file' ? stat.nlink : 0,
        content: type === 'file' ? createHash('sha256').update(readFileSync(file)).digest('hex') : type === 'symlink' ? readlinkSync(file) : '',
      });
      if (type === 'directory') walk(entry);
    }
  };
  walk('');
  return nodes;
}

let scratch: string;
let registry: FakeRegistry;
let image: TestImage;
let escapeTarget: string;

before(async () => {
  if (skip) return;
  scratch = await mkdtemp(path.join(tmpdir(), 'poseidon-unpack-oracle-'));
  escapeTarget = path.join(scratch, 'outside');
  await mkdir(escapeTarget);
  image = await buildTestImage(path.join(scratch, 'layout'), { python: 'full', escapeTarget, marker: 'oracle' });
  registry = await FakeRegistry.start();
  registry.push('test/python', 'v1', image, { index: 'oci' });
});

after(async () => {
  await registry?.close();
  if (scratch) await rm(scratch, { recursive: true, force: true });
});

test('the store unpacks the Python test image as skopeo + umoci do', { skip }, async () => {
  const reference = `${registry.host}/test/python:v1`;
  const store = testImageStore(path.join(scratch, 'store'));
  const prepared = await store.prepare(reference, { policy: 'always' });
  await store.close();

  const layout = path.join(scratch, 'skopeo-layout');
  const bundle = path.join(scratch, 'umoci-bundle');
  await run('/usr/bin/skopeo', ['copy', '--quiet', '--src-tls-verify=false', `docker://${reference}`, `oci:${layout}:v1`], {
    env: { ...process.env, HOME: scratch },
  });
  await run('/usr/bin/umoci', ['unpack', '--image', `${layout}:v1`, bundle]);

  const ours = tree(prepared.rootDirectory);
  const theirs = tree(path.join(bundle, 'rootfs'));
  assert.ok(theirs.size > 500, `the oracle unpacked ${theirs.size} entries`);

  // Directories made on the way to the escape target exist in both, with the time they were made.
  const implicit = new Set<string>();
  for (let directory = escapeTarget.slice(1); directory !== '.'; directory = path.posix.dirname(directory)) implicit.add(directory);
  const mountPoints = new Set(['proc', 'dev', 'workspace', '.poseidon', 'tmp']);
  const differences: string[] = [];
  for (const [entry, expected] of theirs) {
    const actual = ours.get(entry);
    if (expected.type === 'device') {
      if (actual !== undefined) differences.push(`${entry}: a device node was created`);
      continue;
    }
    if (!actual) {
      differences.push(`${entry}: missing`);
      continue;
    }
    const want = { ...expected, mode: expected.type === 'file' ? expected.mode & ~0o6000 : expected.mode };
    if (implicit.has(entry) || (expected.type === 'directory' && mountPoints.has(entry))) want.mtime = actual.mtime;
    if (JSON.stringify(actual) !== JSON.stringify(want)) differences.push(`${entry}: ${JSON.stringify(actual)} != umoci's ${JSON.stringify(want)}`);
  }
  for (const entry of ours.keys()) {
    if (!theirs.has(entry) && !mountPoints.has(entry)) differences.push(`${entry}: not in umoci's tree`);
  }
  assert.deepEqual(differences, []);
  assert.ok(theirs.get('etc/null-device')?.type === 'device', 'the image does have a device node');
  assert.deepEqual(readdirSync(escapeTarget), []);
});
