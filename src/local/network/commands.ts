import { spawn } from 'node:child_process';

/*
 * Runs `ip` and `nft`. Each call forks the daemon once, so callers batch their work into one
 * script on stdin (`ip -batch -`, `nft -f -`) and keep the calls per runner to a handful.
 */
export interface CommandResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

/* `fd`, if given, becomes the command's fd 3 (e.g. a namespace file for nsenter). */
export type CommandRunner = (argv: string[], input?: string, fd?: number) => Promise<CommandResult>;

export const runCommand: CommandRunner = (argv, input, fd) =>
  new Promise((resolve, reject) => {
    const [file, ...args] = argv;
    if (file === undefined) {
      reject(new Error('empty command'));
      return;
    }
    const child = spawn(file, args, {
      stdio: fd === undefined ? ['pipe', 'pipe', 'pipe'] : ['pipe', 'pipe', 'pipe', fd],
      env: { PATH: '/usr/sbin:/usr/bin:/sbin:/bin', LC_ALL: 'C' },
    });
    const stdout: Buffer[] = [];
    const stderr: Buffer[] = [];
    child.stdout?.on('data', (chunk: Buffer) => stdout.push(chunk));
    child.stderr?.on('data', (chunk: Buffer) => stderr.push(chunk));
    child.once('error', reject);
    child.once('close', (code) => resolve({ code, stdout: Buffer.concat(stdout).toString(), stderr: Buffer.concat(stderr).toString() }));
    child.stdin?.on('error', () => undefined); // a command that fails early closes its stdin
    child.stdin?.end(input ?? '');
  });

export class CommandError extends Error {}

/* Runs a command and fails with its stderr unless it exits with 0. */
export async function mustRun(run: CommandRunner, argv: string[], input?: string, fd?: number): Promise<string> {
  const result = await run(argv, input, fd);
  if (result.code !== 0) {
    throw new CommandError(`${argv.join(' ')} failed (${result.code ?? 'signal'}): ${result.stderr.trim() || result.stdout.trim()}`);
  }
  return result.stdout;
}
