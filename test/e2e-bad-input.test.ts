import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { CodeOceanClient, environmentSpec, type ApiResponse } from './support/codeocean-client.js';
import { assertErrorBody, assertMatchesSwagger, type HttpMethod } from './support/contract.js';
import { useDaemon } from './support/fixture.js';

/*
 * Whatever a client sends, the daemon answers with a clear JSON error CodeOcean can parse and keeps
 * serving. Error statuses are still checked against the swagger except 413, which the swagger does
 * not list but which is the only honest answer to an oversized body.
 */

const TOKEN = 'bad-input-token-51e0';
const ENV_ID = 41;
const BODY_LIMIT = 1024 * 1024;
let runnerId = '';
const fixture = useDaemon({ token: TOKEN, config: { server: { bodylimit: BODY_LIMIT } } }, async ({ client }) => {
  assert.equal((await client.putEnvironment(environmentSpec(ENV_ID))).status, 201);
  runnerId = await client.claim(ENV_ID);
});

async function expectError(response: ApiResponse, status: number, context: string): Promise<void> {
  assert.equal(response.status, status, `${context}: expected ${status}, got ${response.status} ${response.text}`);
  assert.match(response.headers.get('content-type') ?? '', /application\/json/, `${context}: error must be JSON`);
  assertErrorBody(response.body, context);
  // The daemon must survive whatever it was just sent. /health may say 503 while a pool refills.
  assert.equal((await fixture.client.listEnvironments()).status, 200, `${context}: daemon stopped serving`);
}

function raw(method: HttpMethod, template: string, params: Record<string, string>, rawBody: string): Promise<ApiResponse> {
  return fixture.client.request(method, template, params, { rawBody });
}

describe('bad input', () => {
  test('malformed JSON → 400 on every route with a body', async () => {
    const broken = '{"id": 41, "image": ';
    await expectError(await raw('PUT', '/execution-environments/{executionEnvironmentId}', { executionEnvironmentId: String(ENV_ID) }, broken), 400, 'PUT env');
    await expectError(await raw('POST', '/runners', {}, broken), 400, 'POST /runners');
    await expectError(await raw('PATCH', '/runners/{runnerId}/files', { runnerId }, broken), 400, 'PATCH files');
    await expectError(await raw('POST', '/runners/{runnerId}/execute', { runnerId }, broken), 400, 'POST execute');
  });

  test('wrong types and missing fields → 400', async () => {
    const env = { executionEnvironmentId: String(ENV_ID) };
    const spec = environmentSpec(ENV_ID);
    const put = (body: object): Promise<ApiResponse> => raw('PUT', '/execution-environments/{executionEnvironmentId}', env, JSON.stringify(body));
    await expectError(await put({ ...spec, prewarmingPoolSize: 'two' }), 400, 'PUT env prewarmingPoolSize string');
    await expectError(await put({ ...spec, memoryLimit: -5 }), 400, 'PUT env negative memoryLimit');
    await expectError(await put({ ...spec, exposedPorts: [70000] }), 400, 'PUT env port out of range');
    await expectError(await put({ ...spec, networkAccess: 'yes' }), 400, 'PUT env networkAccess string');
    await expectError(await put([1, 2, 3]), 400, 'PUT env array body');
    await expectError(
      await fixture.client.request(
        'PUT',
        '/execution-environments/{executionEnvironmentId}',
        { executionEnvironmentId: 'abc' },
        { rawBody: JSON.stringify(spec) },
      ),
      400,
      'PUT env non-numeric id',
    );

    await expectError(
      await raw('POST', '/runners', {}, JSON.stringify({ executionEnvironmentId: 'abc', inactivityTimeout: 60 })),
      400,
      'POST /runners id string',
    );
    await expectError(await raw('POST', '/runners', {}, JSON.stringify({ inactivityTimeout: 60 })), 400, 'POST /runners without env id');
    await expectError(
      await raw('POST', '/runners', {}, JSON.stringify({ executionEnvironmentId: ENV_ID, inactivityTimeout: 'soon' })),
      400,
      'POST /runners timeout string',
    );

    const exec = (body: object): Promise<ApiResponse> => raw('POST', '/runners/{runnerId}/execute', { runnerId }, JSON.stringify(body));
    await expectError(await exec({ command: 42, timeLimit: 5, privilegedExecution: false }), 400, 'execute command number');
    await expectError(await exec({ timeLimit: 5 }), 400, 'execute without command');
    await expectError(await exec({ command: 'true', timeLimit: 'x' }), 400, 'execute timeLimit string');
    await expectError(await exec({ command: 'true', environment: { A: 1 } }), 400, 'execute environment value number');

    const patch = (body: object): Promise<ApiResponse> => raw('PATCH', '/runners/{runnerId}/files', { runnerId }, JSON.stringify(body));
    await expectError(await patch({ copy: 'main.py' }), 400, 'PATCH copy string');
    await expectError(await patch({ copy: [{ content: 'eA==' }] }), 400, 'PATCH copy without path');
    await expectError(await patch({ delete: [5] }), 400, 'PATCH delete number');
    await expectError(await patch({ copy: [{ path: 'a.txt', content: '%%% not base64 %%%' }] }), 400, 'PATCH content not base64');
  });

  test('unknown environment and runner: 404 for the environment, 410 (never 404) for runners', async () => {
    const { client } = fixture;
    assert.equal((await client.claimRunner(999_999, 60)).status, 404);
    assert.equal((await client.getEnvironment(999_999)).status, 404);
    assert.equal((await client.deleteEnvironment(999_999)).status, 404);
    const ghost = `${ENV_ID}-00000000-0000-4000-8000-000000000000`;
    const gone = async (response: ApiResponse, what: string): Promise<void> => expectError(response, 410, what);
    await gone(await client.deleteRunner(ghost), 'DELETE unknown runner');
    await gone(await client.copySubmission(ghost, { 'a.txt': 'a' }), 'PATCH unknown runner');
    await gone(await client.listFiles(ghost), 'GET files unknown runner');
    await gone(await client.downloadRaw(ghost, 'a.txt'), 'GET raw unknown runner');
    await gone(await client.execute(ghost, 'true'), 'execute unknown runner');
  });

  test('missing or wrong token → 401 on protected routes; health and version stay open', async () => {
    const { daemon } = fixture;
    const anonymous = new CodeOceanClient(daemon.baseUrl, undefined);
    const wrong = new CodeOceanClient(daemon.baseUrl, `${TOKEN}x`);
    for (const client of [anonymous, wrong]) {
      // The swagger forgets 401 on statistics although the route is token-protected.
      assert.equal((await client.request('GET', '/statistics/execution-environments', {}, { validate: false })).status, 401);
      assert.equal((await client.listEnvironments()).status, 401);
      assert.equal((await client.putEnvironment(environmentSpec(ENV_ID + 1))).status, 401);
      assert.equal((await client.claimRunner(ENV_ID)).status, 401);
      assert.equal((await client.deleteRunner(runnerId)).status, 401);
      assert.equal((await client.execute(runnerId, 'true')).status, 401);
      assert.equal((await client.listFiles(runnerId)).status, 401);
      // Open routes: 503 is a legitimate health answer while the pool refills after the claim.
      assert.ok([204, 503].includes((await client.health()).status));
      assert.equal((await client.version()).status, 200);
    }
    // No header at all, not just an empty one.
    const bare = await fixture.client.request('GET', '/execution-environments', {}, { headers: { 'Poseidon-Token': null } });
    assert.equal(bare.status, 401);
    // The runner survived the unauthorised DELETE attempts.
    const ok = await fixture.client.run(runnerId, 'echo still-here');
    assert.equal(ok.stdout.trim(), 'still-here');
  });

  test('the WebSocket upgrade requires the token', async () => {
    const { client } = fixture;
    const url = await client.websocketUrl(runnerId, 'echo hi');
    const result = await client.connect(url, { headers: { 'Poseidon-Token': 'nope' }, guardMs: 5000 });
    assert.equal(result.upgradeStatus, 401, `upgrade without a valid token: ${JSON.stringify(result)}`);
  });

  test('huge body → 413 JSON and the daemon keeps serving', async () => {
    const { client } = fixture;
    const content = Buffer.alloc(BODY_LIMIT * 2, 'a').toString('base64');
    const response = await client.request(
      'PATCH',
      '/runners/{runnerId}/files',
      { runnerId },
      {
        body: { copy: [{ path: 'big.txt', content }] },
        validate: false,
      },
    );
    await expectError(response, 413, 'oversized PATCH');
    const put = await client.request(
      'PUT',
      '/execution-environments/{executionEnvironmentId}',
      { executionEnvironmentId: String(ENV_ID) },
      {
        rawBody: JSON.stringify({ ...environmentSpec(ENV_ID), image: 'x'.repeat(BODY_LIMIT * 2) }),
        validate: false,
      },
    );
    await expectError(put, 413, 'oversized PUT');
    const ok = await client.run(runnerId, 'echo fine');
    assert.equal(ok.stdout.trim(), 'fine');
  });

  test('body-less DELETE with Content-Type: application/json succeeds (CodeOcean sends exactly this)', async () => {
    const { client } = fixture;
    const spec = environmentSpec(ENV_ID + 2, { prewarmingPoolSize: 0 });
    assert.equal((await client.putEnvironment(spec)).status, 201);
    // Without a body and with an explicit empty one (Content-Length: 0): both occur in the wild.
    const noBody = await client.deleteEnvironment(spec.id);
    assert.equal(noBody.status, 204, noBody.text);
    assert.equal((await client.putEnvironment(spec)).status, 201);
    const emptyBody = await client.request(
      'DELETE',
      '/execution-environments/{executionEnvironmentId}',
      { executionEnvironmentId: String(spec.id) },
      { rawBody: '' },
    );
    assert.equal(emptyBody.status, 204, emptyBody.text);

    const runner = await client.claim(ENV_ID);
    const runnerDelete = await client.request('DELETE', '/runners/{runnerId}', { runnerId: runner }, { rawBody: '' });
    assert.equal(runnerDelete.status, 204, runnerDelete.text);
  });

  test('every error status seen here is documented for its route', () => {
    // Guards the validator itself: an undocumented status must fail, or the suite proves nothing.
    assert.throws(() => assertMatchesSwagger('POST', '/runners', 410, { message: 'x' }));
    assert.throws(() => assertMatchesSwagger('GET', '/runners/{runnerId}/files', 410, { message: 'x', extra: 1 }, 'application/json'));
    assert.throws(() => assertErrorBody({ message: 'x', stack: 'Error\n    at foo' }, 'self-test'));
  });
});
