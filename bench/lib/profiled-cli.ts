import { writeFileSync } from 'node:fs';
import { Session } from 'node:inspector';
import { join } from 'node:path';

/*
 * Starts the daemon (src/cli.ts, same argv) under the V8 CPU profiler. `--cpu-prof` is refused in
 * NODE_OPTIONS and the test harness fixes the node flags, so the profiler is driven from inside;
 * an in-thread inspector session answers synchronously, which lets the exit handler save it.
 */

const directory = process.env['BENCH_PROFILE_DIR'] ?? '.';
const session = new Session();
session.connect();
session.post('Profiler.enable');
session.post('Profiler.setSamplingInterval', { interval: 500 });
session.post('Profiler.start');
process.on('exit', () => {
  session.post('Profiler.stop', (error, result) => {
    if (error === null) writeFileSync(join(directory, `daemon-${process.pid}.cpuprofile`), JSON.stringify(result.profile));
  });
});
await import('../../src/cli.js');
