import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { configSchema } from '../src/config/schema.js';
import {
  buildTemplateJob,
  defaultTemplateJob,
  deriveRunnerJob,
  environmentIdOfJob,
  isTemplateJobId,
  loadBaseTemplate,
  readRunnerUsage,
  readTemplateEnvironment,
  withRunnerUsage,
  type TemplateEnvironment,
} from '../src/nomad/job-template.js';
import { NomadSpec } from './fake-nomad/index.js';

const config = configSchema.parse({ nomad: { enabled: true, namespace: 'poseidon', network: { mode: 'cni/secure-bridge' } } }).nomad;
const offline: TemplateEnvironment = { id: 3, image: 'ruby:3', cpuLimit: 50, memoryLimit: 256, prewarmingPoolSize: 4, networkAccess: false, exposedPorts: [] };
const spec = new NomadSpec();

function group(job: ReturnType<typeof defaultTemplateJob>, name: string) {
  const found = job.TaskGroups?.find((candidate) => candidate.Name === name);
  assert.ok(found !== undefined, `group ${name}`);
  return found;
}

describe('job template', () => {
  it("builds Poseidon's template job for an environment without network", () => {
    const job = buildTemplateJob(defaultTemplateJob(), offline, config);
    assert.equal(job.ID, 'template-3');
    assert.equal(job.Namespace, 'poseidon');
    const main = group(job, 'default-group');
    assert.equal(main.Count, 1);
    const task = main.Tasks?.[0];
    assert.equal(task?.Name, 'default-task');
    assert.deepEqual(task?.Config, { image: 'ruby:3', command: 'sleep', args: ['infinity'], network_mode: 'none', force_pull: false });
    assert.equal(task?.Resources?.CPU, 50);
    assert.equal(task?.Resources?.MemoryMaxMB, 256);
    assert.deepEqual(main.Networks, []);
    assert.equal(main['RestartPolicy'] !== undefined, true);
    const configGroup = group(job, 'config');
    assert.equal(configGroup.Count, 0);
    assert.deepEqual(configGroup.Meta, { used: 'false', prewarmingPoolSize: '4' });
    assert.deepEqual(spec.request('post', '/jobs', { Job: job }), []);
  });

  it('adds one dynamic port per exposed port in the configured network mode', () => {
    const job = buildTemplateJob(defaultTemplateJob(), { ...offline, networkAccess: true, exposedPorts: [80, 8080] }, { ...config, disableforcepull: false });
    const main = group(job, 'default-group');
    assert.deepEqual(main.Networks, [
      {
        Mode: 'cni/secure-bridge',
        DynamicPorts: [
          { Label: '80', To: 80 },
          { Label: '8080', To: 8080 },
        ],
      },
    ]);
    assert.equal(main.Tasks?.[0]?.Config?.['network_mode'], '');
    assert.equal(main.Tasks?.[0]?.Config?.['force_pull'], true);
    assert.deepEqual(readTemplateEnvironment(job), { ...offline, networkAccess: true, exposedPorts: [80, 8080] });
  });

  it('derives runner jobs and round-trips the used/timeout meta', () => {
    const template = buildTemplateJob(defaultTemplateJob(), offline, config);
    const runner = deriveRunnerJob({ ...template, Status: 'running', Version: 3 }, '3-0b9a', config.namespace);
    assert.equal(runner.ID, '3-0b9a');
    assert.equal(runner.Name, '3-0b9a');
    assert.equal(runner.Status, undefined, 'server fields are not sent back');
    assert.deepEqual(group(runner, 'config').Meta, { used: 'false' });
    assert.deepEqual(readRunnerUsage(runner), { used: false, timeoutSeconds: undefined });
    const used = withRunnerUsage(runner, true, 90);
    assert.deepEqual(group(used, 'config').Meta, { used: 'true', timeout: '90' });
    assert.deepEqual(readRunnerUsage(used), { used: true, timeoutSeconds: 90 });
    assert.deepEqual(readRunnerUsage(withRunnerUsage(used, false, undefined)), { used: false, timeoutSeconds: undefined });
    // Only the count-0 group changes, so Nomad leaves the running allocation alone.
    assert.deepEqual(group(used, 'default-group'), group(runner, 'default-group'));
  });

  it('recognises template and runner job IDs', () => {
    assert.equal(isTemplateJobId('template-12'), true);
    assert.equal(isTemplateJobId('template-x'), false);
    assert.equal(isTemplateJobId('12-abc'), false);
    assert.equal(environmentIdOfJob('template-12'), 12);
    assert.equal(environmentIdOfJob('12-5f0c-11ef'), 12);
    assert.equal(environmentIdOfJob('foreign'), undefined);
  });

  it('uses a configured JSON template file instead of the default', () => {
    const dir = mkdtempSync(join(tmpdir(), 'template-'));
    try {
      const file = join(dir, 'job.json');
      const custom = defaultTemplateJob();
      custom.Datacenters = ['eu-1'];
      writeFileSync(file, JSON.stringify({ Job: custom }));
      const base = loadBaseTemplate({ ...config, templatejobfile: file });
      assert.deepEqual(base.Datacenters, ['eu-1']);
      assert.deepEqual(buildTemplateJob(base, offline, config).Datacenters, ['eu-1']);
      writeFileSync(file, JSON.stringify(custom));
      assert.deepEqual(loadBaseTemplate({ ...config, templatejobfile: file }).Datacenters, ['eu-1']);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
