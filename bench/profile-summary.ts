import { readdirSync, readFileSync, statSync } from 'node:fs';
import { join, relative } from 'node:path';
import { REPO_ROOT } from '../test/support/daemon.js';

/*
 * Summarises a V8 .cpuprofile (from `npm run bench -- --profile DIR`): self time per function and
 * per file, so a report can say where the daemon's CPU goes without opening DevTools.
 *   node --import tsx bench/profile-summary.ts DIR_OR_FILE [TOP]
 */

interface ProfileNode {
  id: number;
  callFrame: { functionName: string; url: string; lineNumber: number };
  hitCount?: number;
}

interface Profile {
  nodes: ProfileNode[];
  startTime: number;
  endTime: number;
  samples?: number[];
  timeDeltas?: number[];
}

function newestProfile(path: string): string {
  if (!statSync(path).isDirectory()) return path;
  const files = readdirSync(path)
    .filter((name) => name.endsWith('.cpuprofile'))
    .map((name) => join(path, name));
  const newest = files.sort((a, b) => statSync(b).mtimeMs - statSync(a).mtimeMs)[0];
  if (newest === undefined) throw new Error(`no .cpuprofile in ${path}`);
  return newest;
}

function shortUrl(url: string): string {
  if (url === '') return '(native)';
  const path = url.replace(/^file:\/\//, '');
  return path.startsWith(REPO_ROOT) ? relative(REPO_ROOT, path) : path;
}

const target = process.argv[2];
if (target === undefined) {
  console.error('usage: node --import tsx bench/profile-summary.ts DIR_OR_FILE [TOP]');
  process.exit(2);
}
const top = Number(process.argv[3] ?? 20);
const file = newestProfile(target);
const profile = JSON.parse(readFileSync(file, 'utf8')) as Profile;
const byId = new Map(profile.nodes.map((node) => [node.id, node]));

// Self time per node from the sample timeline (timeDeltas[i] precedes samples[i]).
const selfUs = new Map<number, number>();
const samples = profile.samples ?? [];
const deltas = profile.timeDeltas ?? [];
for (let i = 0; i < samples.length; i++) {
  const id = samples[i] ?? 0;
  selfUs.set(id, (selfUs.get(id) ?? 0) + (deltas[i + 1] ?? 0));
}
const totalUs = profile.endTime - profile.startTime;
const perFunction = new Map<string, number>();
const perFile = new Map<string, number>();
for (const [id, us] of selfUs) {
  const node = byId.get(id);
  if (node === undefined) continue;
  const { functionName, url, lineNumber } = node.callFrame;
  const where = shortUrl(url);
  const name = `${functionName || '(anonymous)'} ${where}${url === '' ? '' : `:${lineNumber + 1}`}`;
  perFunction.set(name, (perFunction.get(name) ?? 0) + us);
  const group =
    url === '' ? `(${functionName})` : where.includes('node_modules/') ? `node_modules/${where.split('node_modules/')[1]?.split('/')[0] ?? ''}` : where;
  perFile.set(group, (perFile.get(group) ?? 0) + us);
}
const print = (title: string, entries: Map<string, number>): void => {
  console.log(`\n${title}`);
  for (const [name, us] of [...entries.entries()].sort((a, b) => b[1] - a[1]).slice(0, top)) {
    console.log(`${((100 * us) / totalUs).toFixed(1).padStart(5)}%  ${(us / 1000).toFixed(0).padStart(7)} ms  ${name}`);
  }
};
console.log(`${file}: ${(totalUs / 1e6).toFixed(1)} s wall, ${samples.length} samples`);
print('self time by file / module', perFile);
print('self time by function', perFunction);
