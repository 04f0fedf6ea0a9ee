/*
 * Micro-measurement of the sandbox agent (not a test): node --import tsx bench/agent-measure.ts
 * Prints the mean time of sequential `exec true` and of FILES requests copying 10 small files.
 */
import { performance } from 'node:perf_hooks';
import { startAgentSandbox } from '../test/support/agent-sandbox.js';

const ROUNDS = 50;
const ENV = { PATH: '/usr/local/bin:/usr/bin:/bin' };

async function mean(label: string, operation: (round: number) => Promise<void>): Promise<void> {
  for (let round = 0; round < 5; round++) await operation(-1 - round); // warm-up
  const times: number[] = [];
  for (let round = 0; round < ROUNDS; round++) {
    const started = performance.now();
    await operation(round);
    times.push(performance.now() - started);
  }
  times.sort((a, b) => a - b);
  const average = times.reduce((sum, time) => sum + time, 0) / times.length;
  const median = times[Math.floor(times.length / 2)] ?? 0;
  console.log(`${label.padEnd(34)} mean ${average.toFixed(2)} ms  median ${median.toFixed(2)} ms  max ${(times.at(-1) ?? 0).toFixed(2)} ms`);
}

const startedAt = performance.now();
const sandbox = await startAgentSandbox();
console.log(`${'sandbox start (bwrap + READY)'.padEnd(34)} ${(performance.now() - startedAt).toFixed(2)} ms`);
try {
  const { client } = sandbox;
  const run = async (argv: string[], privileged: boolean): Promise<void> => {
    const execution = client.exec(argv, { env: ENV, privileged }, { onStdout: () => undefined, onStderr: () => undefined });
    const { exitCode } = await execution.result;
    if (exitCode !== 0) throw new Error(`${argv.join(' ')} exited ${exitCode}`);
  };
  await mean('exec true (unprivileged)', () => run(['true'], false));
  await mean('exec /bin/sh -c true (unprivileged)', () => run(['/bin/sh', '-c', 'true'], false));
  await mean('exec true (privileged)', () => run(['true'], true));
  await mean('FILES: ./* + 10 small files', (round) =>
    client.updateFiles({
      delete: ['./*'],
      copy: Array.from({ length: 10 }, (_, index) => ({
        path: index < 5 ? `src/file${index}.py` : `file${index}.txt`,
        isDirectory: false,
        content: Buffer.from(`print(${round}, ${index})\n`.repeat(20)),
      })),
    }),
  );
  await mean('LIST ./ recursive', async () => void (await client.list('./', true)));
  await mean('READ one small file', async () => {
    const { stream } = await client.read('src/file0.py');
    await stream.toArray();
  });
} finally {
  await sandbox.stop();
}
