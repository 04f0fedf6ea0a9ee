/*
 * Runs the fake Nomad as its own process, for manual checks or for tests that drive it only
 * through HTTP (control API under /__control/):
 *   node --import tsx test/fake-nomad/main.ts [--port 4646] [--token T] [--heartbeat-ms 1000] [--lean]
 * --lean: no spec validation and no request/event history, for load tests at scale (bench nomad_scale).
 */
import { parseArgs } from 'node:util';
import { startFakeNomad } from './server.js';

const { values } = parseArgs({
  options: {
    port: { type: 'string', default: '4646' },
    token: { type: 'string' },
    'heartbeat-ms': { type: 'string', default: '30000' },
    lean: { type: 'boolean', default: false },
  },
});

const fake = await startFakeNomad({
  port: Number(values.port),
  heartbeatMs: Number(values['heartbeat-ms']),
  ...(values.lean ? { validate: false, history: false } : {}),
  ...(values.token === undefined ? {} : { token: values.token }),
});
console.log(`fake nomad listening on ${fake.url}`);
const stop = (): void => {
  void fake.close().then(() => process.exit(0));
};
process.once('SIGINT', stop);
process.once('SIGTERM', stop);
