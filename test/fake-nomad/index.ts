/* A fake Nomad for tests (nomad-notes section 6); never shipped in src/. */
export { startFakeNomad, type FakeNomad, type FakeNomadControl, type FakeNomadOptions, type HttpFault, type RequestLogEntry } from './server.js';
export type { EventBatch, Timings } from './cluster.js';
export { NomadSpec } from './spec.js';
