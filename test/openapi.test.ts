import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { generateOpenApiDocument, generateWebSocketSchema, OPENAPI_FILE, WEBSOCKET_SCHEMA_FILE } from '../src/api/openapi-document.js';
import { buildInjectApp } from './support/api-fakes.js';
import { deref, isObject, type Json, type JsonObject, loadOwnDocument, loadPoseidonSwagger, POSEIDON_MISSING } from './support/contract.js';

/*
 * The project's contract: api/openapi.json is what the route schemas generate (so the committed
 * copy cannot go stale), the daemon serves the same document, and, where Poseidon's swagger sits
 * beside the repository, the document agrees with it on every path, method, status and field it defines.
 */

describe('the OpenAPI document', () => {
  test('the committed api/openapi.json and api/websocket.schema.json are current (else: npm run openapi)', async () => {
    assert.equal(readFileSync(OPENAPI_FILE, 'utf8'), await generateOpenApiDocument(), 'api/openapi.json is stale: run npm run openapi');
    assert.equal(readFileSync(WEBSOCKET_SCHEMA_FILE, 'utf8'), generateWebSocketSchema(), 'api/websocket.schema.json is stale: run npm run openapi');
  });

  test('GET /api/v1/openapi.json serves it without a token, and the docs page loads offline', async () => {
    const { app } = await buildInjectApp({ token: 'secret' });
    try {
      const served = await app.inject({ method: 'GET', url: '/api/v1/openapi.json' });
      assert.equal(served.statusCode, 200);
      const committed = JSON.parse(readFileSync(fileURLToPath(OPENAPI_FILE), 'utf8')) as { info: object };
      // The same document; only the version comes from the running daemon (the fakes say 1.2.3).
      assert.deepEqual(served.json(), { ...committed, info: { ...committed.info, version: '1.2.3' } });
      const page = await app.inject({ method: 'GET', url: '/api/v1/docs/' });
      assert.equal(page.statusCode, 200);
      assert.match(String(page.headers['content-type']), /text\/html/);
      // Every script and style the page needs is served by the daemon itself: no CDN.
      const assets = [...page.body.matchAll(/(?:src|href)="([^"]+)"/g)].map((match) => match[1] ?? '');
      assert.ok(assets.length > 0, 'the docs page references no assets');
      for (const asset of assets) {
        assert.doesNotMatch(asset, /^(https?:)?\/\//, `the docs page loads ${asset} from elsewhere`);
        const url = new URL(asset, 'http://daemon/api/v1/docs/').pathname;
        assert.equal((await app.inject({ method: 'GET', url })).statusCode, 200, `docs asset ${url}`);
      }
    } finally {
      await app.close();
    }
  });
});

/* Poseidon statuses the project deliberately does not answer, each with its reason. */
const ABSENT_STATUSES: Record<string, string> = {
  'GET /version 404': 'Poseidon answers 404 when it was built without a version; poseidon-ts always knows its own',
};

type Direction = 'request' | 'response';

/*
 * Does our schema cover every field Poseidon's defines? For responses, everything we send must be
 * what Poseidon's schema allows of those fields (its required fields present, types the same or
 * narrower, enums a subset); for requests, everything Poseidon's clients may send must be accepted
 * (nothing required that Poseidon leaves optional, enums a superset). Fields Poseidon does not
 * define are ours to add (FileHeader's owner/group/permissions/linkTarget, errorCode on 4xx).
 */
function compareSchemas(theirs: Json | undefined, ours: Json | undefined, where: string, direction: Direction, problems: string[]): void {
  if (!isObject(theirs)) return;
  if (!isObject(ours)) {
    problems.push(`${where}: Poseidon defines a schema, ours has none`);
    return;
  }
  const theirType = theirs.type;
  const ourType = ours.type;
  if (typeof theirType === 'string' && theirType !== ourType) {
    const narrower = direction === 'response' && theirType === 'number' && ourType === 'integer';
    if (!narrower) problems.push(`${where}: type ${String(ourType)}, Poseidon's ${theirType}`);
  }
  if (Array.isArray(theirs.enum) && Array.isArray(ours.enum)) {
    const [sub, sup] = direction === 'response' ? [ours.enum, theirs.enum] : [theirs.enum, ours.enum];
    const missing = sub.filter((value) => !sup.includes(value));
    if (missing.length > 0)
      problems.push(`${where}: enum values ${JSON.stringify(missing)} ${direction === 'response' ? "not in Poseidon's" : 'missing from ours'}`);
  }
  if (isObject(theirs.properties)) {
    const ourProperties = isObject(ours.properties) ? ours.properties : {};
    for (const [name, schema] of Object.entries(theirs.properties)) {
      if (!(name in ourProperties)) problems.push(`${where}.${name}: Poseidon defines the field, ours does not`);
      else compareSchemas(schema, ourProperties[name], `${where}.${name}`, direction, problems);
    }
    const theirRequired = Array.isArray(theirs.required) ? theirs.required : [];
    const ourRequired = Array.isArray(ours.required) ? ours.required : [];
    if (direction === 'response') {
      for (const name of theirRequired) if (!ourRequired.includes(name)) problems.push(`${where}.${String(name)}: required by Poseidon, optional in ours`);
    } else {
      for (const name of ourRequired) if (!theirRequired.includes(name)) problems.push(`${where}.${String(name)}: required by ours, optional in Poseidon's`);
    }
  }
  if (theirs.items !== undefined) compareSchemas(theirs.items, ours.items, `${where}[]`, direction, problems);
  if (isObject(theirs.additionalProperties)) compareSchemas(theirs.additionalProperties, ours.additionalProperties, `${where}{}`, direction, problems);
}

function parameters(item: JsonObject, operation: JsonObject): string[] {
  const all = [...(Array.isArray(item.parameters) ? item.parameters : []), ...(Array.isArray(operation.parameters) ? operation.parameters : [])];
  return all.filter(isObject).map((parameter) => `${String(parameter.in)}:${String(parameter.name)}`);
}

describe("agreement with Poseidon's swagger", () => {
  test("every path, method, status code, parameter and field Poseidon defines is in the project's document", (t) => {
    const swagger = loadPoseidonSwagger();
    if (swagger === undefined) return t.skip(POSEIDON_MISSING);
    const own = loadOwnDocument();
    const theirPaths = swagger.paths;
    const ourPaths = own.paths;
    assert.ok(isObject(theirPaths) && isObject(ourPaths));
    const problems: string[] = [];
    let compared = 0;
    for (const [template, rawTheirItem] of Object.entries(theirPaths)) {
      const theirItem = deref(swagger, rawTheirItem);
      const ourItem = ourPaths[template] === undefined ? undefined : deref(own, ourPaths[template]);
      if (!isObject(theirItem)) continue;
      if (!isObject(ourItem)) {
        problems.push(`${template}: missing`);
        continue;
      }
      for (const method of ['get', 'put', 'post', 'patch', 'delete']) {
        const theirs = theirItem[method];
        if (!isObject(theirs)) continue;
        const ours = ourItem[method];
        const route = `${method.toUpperCase()} ${template}`;
        if (!isObject(ours)) {
          problems.push(`${route}: missing`);
          continue;
        }
        compared += 1;
        const ourParameters = parameters(ourItem, ours);
        for (const parameter of parameters(theirItem, theirs))
          if (!ourParameters.includes(parameter)) problems.push(`${route}: parameter ${parameter} missing`);
        const theirBody = isObject(theirs.requestBody) && isObject(theirs.requestBody.content) ? theirs.requestBody.content['application/json'] : undefined;
        const ourBody = isObject(ours.requestBody) && isObject(ours.requestBody.content) ? ours.requestBody.content['application/json'] : undefined;
        if (isObject(theirBody)) {
          if (!isObject(ourBody)) problems.push(`${route}: request body missing`);
          else compareSchemas(theirBody.schema, ourBody.schema, `${route} body`, 'request', problems);
        }
        const theirResponses = isObject(theirs.responses) ? theirs.responses : {};
        const ourResponses = isObject(ours.responses) ? ours.responses : {};
        for (const [status, theirResponse] of Object.entries(theirResponses)) {
          const ourResponse = ourResponses[status];
          if (ourResponse === undefined) {
            if (!(`${route} ${status}` in ABSENT_STATUSES)) problems.push(`${route}: status ${status} missing`);
            continue;
          }
          if (!isObject(theirResponse) || !isObject(theirResponse.content)) continue;
          const ourContent = isObject(ourResponse) && isObject(ourResponse.content) ? ourResponse.content : {};
          for (const [type, media] of Object.entries(theirResponse.content)) {
            const ourMedia = ourContent[type];
            if (!isObject(ourMedia)) problems.push(`${route} ${status}: content type ${type} missing`);
            else if (isObject(media)) compareSchemas(media.schema, ourMedia.schema, `${route} ${status}`, 'response', problems);
          }
        }
      }
    }
    assert.ok(compared >= 14, `only ${compared} operations compared`);
    assert.deepEqual(problems, [], `the project's document disagrees with Poseidon's:\n${problems.join('\n')}`);
  });

  test('the comparison can fail', () => {
    const problems: string[] = [];
    const theirs: JsonObject = { type: 'object', properties: { id: { type: 'integer' }, name: { type: 'string' } }, required: ['id'] };
    compareSchemas(theirs, { type: 'object', properties: { id: { type: 'string' } } }, 'x', 'response', problems);
    assert.equal(problems.length, 3, problems.join('\n'));
  });
});
