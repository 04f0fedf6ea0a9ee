import assert from 'node:assert/strict';
import { request as httpRequest } from 'node:http';
import { describe, test } from 'node:test';
import { environmentSpec, fileEntries, type FileListEntry } from './support/codeocean-client.js';
import { useDaemon } from './support/fixture.js';

/*
 * The path CodeOcean takes for every learner run, end to end against the real daemon: environment
 * sync, runner claim, submission upload, executions over WebSocket, file listing and download,
 * runner release and the 410 that drives CodeOcean's recovery.
 */

const TOKEN = 'flow-token-3f9a';
const ENV_ID = 11;
const fixture = useDaemon({ token: TOKEN });

const stripDot = (name: string): string => name.replace(/^\.\//, '').replace(/^\./, '');
const byName = (entries: FileListEntry[]): Map<string, FileListEntry> => new Map(entries.map((e) => [stripDot(e.name), e]));

const MAIN_PY = [
  'import sys',
  'from lib.util.helper import shout',
  'name = sys.stdin.readline().strip()',
  'print(shout(name))',
  'print("to stderr", file=sys.stderr)',
  'sys.exit(3)',
  '',
].join('\n');
const HELPER_PY = 'def shout(s):\n    return "HELLO " + s.upper()\n';
const BINARY = Buffer.from(Array.from({ length: 256 }, (_, i) => i));

describe('CodeOcean flow', () => {
  test('health is 204 and version is 200 JSON', async () => {
    const { client } = fixture;
    const health = await client.health();
    assert.equal(health.status, 204);
    const version = await client.version();
    assert.equal(version.status, 200);
    assert.notEqual(version.body, undefined, `version body must parse as JSON, got ${JSON.stringify(version.text)}`);
  });

  test('PUT environment: 201 when created, 204 when replaced; listed and readable', async () => {
    const { client } = fixture;
    const spec = environmentSpec(ENV_ID, { prewarmingPoolSize: 1 });
    const created = await client.putEnvironment(spec);
    assert.equal(created.status, 201, created.text);
    const replaced = await client.putEnvironment(spec);
    assert.equal(replaced.status, 204, replaced.text);

    const list = await client.listEnvironments();
    assert.equal(list.status, 200);
    const body = list.body;
    assert.ok(typeof body === 'object' && body !== null && !Array.isArray(body));
    assert.ok(Array.isArray(body.executionEnvironments), 'executionEnvironments key missing (CodeOcean raises UnexpectedResponse)');
    assert.ok(body.executionEnvironments.some((env) => typeof env === 'object' && env !== null && !Array.isArray(env) && env.id === ENV_ID));

    const single = await client.getEnvironment(ENV_ID);
    assert.equal(single.status, 200);
    assert.deepEqual(single.body, { ...spec });
  });

  test('claim, upload submission, run python3 and sh with stdin, list and download, release → 410 everywhere', async () => {
    const { client } = fixture;
    const runnerId = await client.claim(ENV_ID, 180);

    // A previous run left a dotfile, a plain file and a directory behind.
    const first = await client.patchFiles(runnerId, {
      copy: [
        { path: 'olddir/' },
        { path: 'olddir/stale.txt', content: Buffer.from('stale').toString('base64') },
        { path: 'old.txt', content: Buffer.from('old').toString('base64') },
        { path: '.dotfile', content: Buffer.from('survives').toString('base64') },
      ],
      delete: [],
    });
    assert.equal(first.status, 204, first.text);

    const patch = await client.copySubmission(runnerId, {
      'main.py': MAIN_PY,
      'lib/__init__.py': '',
      'lib/util/__init__.py': '',
      'lib/util/helper.py': HELPER_PY,
      'data/blob.bin': BINARY,
      'empty.txt': '',
    });
    assert.equal(patch.status, 204, patch.text);

    const ls = await client.run(runnerId, 'ls -A', { timeLimit: 10 });
    assert.equal(ls.exitCode, 0, ls.stderr);
    // On a terminal ls prints columns, as in Poseidon.
    const present = ls.stdout
      .split(/\s+/)
      .filter((line) => line.length > 0)
      .sort();
    assert.deepEqual(present, ['.dotfile', 'data', 'empty.txt', 'lib', 'main.py'], '`./*` must remove old files and directories but spare dotfiles');

    const python = await client.run(runnerId, 'python3 main.py', { stdin: ['alice\n'], timeLimit: 10 });
    // The terminal echoes the typed input (CodeOcean stores input only through this echo) and ends lines in \r\n.
    assert.equal(python.stdout, 'alice\r\nHELLO ALICE\r\n');
    assert.equal(python.stderr, 'to stderr\r\n');
    assert.equal(python.exitCode, 3);
    assert.equal(python.messages.filter((m) => m.type === 'exit').length, 1, 'exactly one exit message');

    const sh = await client.run(runnerId, 'sh -c "read line; echo got:\\$line; echo oops >&2; exit 7"', { stdin: ['{"cmd":"result","data":"Bob"}\n'] });
    assert.equal(
      sh.stdout,
      '{"cmd":"result","data":"Bob"}\r\ngot:{"cmd":"result","data":"Bob"}\r\n',
      'stdin frames must reach the process verbatim (and be echoed)',
    );
    assert.equal(sh.stderr, 'oops\r\n');
    assert.equal(sh.exitCode, 7);

    // Files written by one execution are visible to the next, as in Poseidon.
    const write = await client.run(runnerId, 'sh -c "echo generated > out.txt"');
    assert.equal(write.exitCode, 0, write.stderr);

    const recursive = await client.listFiles(runnerId, { recursive: true });
    assert.equal(recursive.status, 200, recursive.text);
    const all = byName(fileEntries(recursive));
    for (const name of ['main.py', 'lib/util/helper.py', 'data/blob.bin', 'empty.txt', 'out.txt']) {
      assert.ok(all.has(name), `recursive listing lacks ${name}: ${[...all.keys()].join(', ')}`);
    }
    const main = all.get('main.py');
    assert.ok(main);
    assert.equal(main.entryType, '-');
    assert.equal(main.size, Buffer.byteLength(MAIN_PY));
    assert.ok(
      Number.isInteger(main.modificationTime) && Math.abs(main.modificationTime - Date.now() / 1000) < 86_400,
      `modificationTime must be Unix seconds, got ${main.modificationTime}`,
    );
    for (const key of ['owner', 'group', 'permissions'] as const) {
      assert.equal(typeof main[key], 'string', `CodeOcean reads ${key}; entry: ${JSON.stringify(main)}`);
    }
    assert.match(main.permissions ?? '', /^[-rwxsStT]{9}$/, 'permissions like rw-r--r--');
    assert.equal(all.get('lib')?.entryType, 'd');
    assert.equal(all.get('lib/util')?.entryType, 'd');
    assert.equal(all.get('data/blob.bin')?.size, 256);
    assert.equal(all.get('empty.txt')?.size, 0);

    const flat = await client.listFiles(runnerId, { recursive: false });
    assert.equal(flat.status, 200, flat.text);
    const top = byName(fileEntries(flat));
    assert.equal(top.get('lib')?.entryType, 'd');
    assert.ok(top.has('main.py'));
    assert.ok(![...top.keys()].some((name) => name.includes('helper.py')), `non-recursive listing must not descend: ${[...top.keys()].join(', ')}`);

    const sub = await client.listFiles(runnerId, { path: 'lib/util', recursive: false });
    assert.equal(sub.status, 200, sub.text);
    assert.ok(
      fileEntries(sub).some((e) => e.name.endsWith('helper.py')),
      sub.text,
    );

    const missingDir = await client.listFiles(runnerId, { path: 'does/not/exist' });
    assert.equal(missingDir.status, 424, missingDir.text);

    const raw = await client.downloadRaw(runnerId, 'main.py');
    assert.equal(raw.status, 200);
    assert.equal(raw.text, MAIN_PY);
    assert.equal(raw.headers.get('content-length'), String(Buffer.byteLength(MAIN_PY)));
    assert.ok((raw.headers.get('content-type') ?? '').length > 0, 'Content-Type must be set');

    const blob = await client.downloadRaw(runnerId, './data/blob.bin');
    assert.equal(blob.status, 200);
    assert.ok(blob.raw.equals(BINARY), 'raw download must be byte-exact');
    assert.equal(blob.headers.get('content-length'), '256');

    const missing = await client.downloadRaw(runnerId, 'nope.txt');
    assert.equal(missing.status, 424, missing.text);

    const released = await client.deleteRunner(runnerId);
    assert.equal(released.status, 204, released.text);

    assert.equal((await client.deleteRunner(runnerId)).status, 410, 'DELETE on a released runner');
    assert.equal((await client.copySubmission(runnerId, { 'a.txt': 'a' })).status, 410, 'PATCH files');
    assert.equal((await client.listFiles(runnerId)).status, 410, 'GET files');
    assert.equal((await client.downloadRaw(runnerId, 'main.py')).status, 410, 'GET files/raw');
    assert.equal((await client.execute(runnerId, 'true')).status, 410, 'POST execute');
  });

  test('commands containing single quotes run correctly', async () => {
    const { client } = fixture;
    const runnerId = await client.claim(ENV_ID);
    const result = await client.run(runnerId, `echo 'it'"'"'s'; printf '%s\\n' 'a b'; python3 -c 'print("q")'`);
    assert.equal(result.exitCode, 0, `stderr: ${result.stderr}`);
    assert.equal(result.stdout.replace(/\r\n/g, '\n'), "it's\na b\nq\n");
    assert.equal((await client.deleteRunner(runnerId)).status, 204);
  });

  test('websocketUrl is absolute ws:// from the Host header and single use', async () => {
    const { client, daemon } = fixture;
    const runnerId = await client.claim(ENV_ID);

    const url = await client.websocketUrl(runnerId, 'echo once');
    assert.match(url, new RegExp(`^ws://127\\.0\\.0\\.1:${daemon.port}/api/v1/runners/[^/]+/websocket\\?executionID=.+`));
    const firstUse = await client.connect(url);
    assert.equal(firstUse.exitCode, 0);
    assert.equal(firstUse.stdout.trim(), 'once');
    const secondUse = await client.connect(url, { guardMs: 5000 });
    assert.ok(
      secondUse.upgradeStatus !== undefined && secondUse.upgradeStatus >= 400 && secondUse.upgradeStatus < 500,
      `a used URL must be refused with 4xx, got ${JSON.stringify(secondUse)}`,
    );

    // fetch forbids overriding Host, so this request goes through node:http.
    const hostUrl = await new Promise<string>((resolve, reject) => {
      const req = httpRequest(
        {
          host: '127.0.0.1',
          port: daemon.port,
          method: 'POST',
          path: `/api/v1/runners/${encodeURIComponent(runnerId)}/execute`,
          headers: { 'Content-Type': 'application/json', 'Poseidon-Token': TOKEN, Host: 'poseidon.example.org:8443' },
        },
        (res) => {
          let text = '';
          res.on('data', (chunk: Buffer) => {
            text += chunk.toString('utf8');
          });
          res.on('end', () => {
            try {
              assert.equal(res.statusCode, 200, text);
              const parsed = JSON.parse(text) as { websocketUrl?: unknown };
              assert.equal(typeof parsed.websocketUrl, 'string');
              resolve(String(parsed.websocketUrl));
            } catch (error) {
              reject(error instanceof Error ? error : new Error(String(error)));
            }
          });
        },
      );
      req.on('error', reject);
      req.end(JSON.stringify({ command: 'true', timeLimit: 5, privilegedExecution: false }));
    });
    assert.match(hostUrl, /^ws:\/\/poseidon\.example\.org:8443\/api\/v1\/runners\/[^/]+\/websocket\?executionID=/);

    assert.equal((await client.deleteRunner(runnerId)).status, 204);
  });

  test('runners survive between calls and deleting the environment releases its runners', async () => {
    const { client } = fixture;
    const runnerId = await client.claim(ENV_ID);
    const deleted = await client.deleteEnvironment(ENV_ID);
    assert.equal(deleted.status, 204, deleted.text);
    assert.equal((await client.execute(runnerId, 'true')).status, 410, 'runner of a deleted environment must be gone');
    assert.equal((await client.claimRunner(ENV_ID)).status, 404, 'claim from a deleted environment');
    assert.equal((await client.getEnvironment(ENV_ID)).status, 404);
  });
});
