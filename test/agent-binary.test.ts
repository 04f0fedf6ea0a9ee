import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { test } from 'node:test';
import { ensureAgentBuilt } from '../src/local/binaries.js';

/*
 * Every sandbox starts the agent once, so its start-up is part of every runner build. glibc's
 * start-up probes the CPU with dozens of cpuid instructions, each a trap to the hypervisor on a
 * virtual machine (7-10 us on the bench host, about 1 ms per start in all); the agent is linked
 * with musl, which runs none. objdump comes with gcc's binutils, which building the agent needs.
 */
test('the agent binary contains no cpuid instruction (it is not linked with glibc)', () => {
  const agent = ensureAgentBuilt();
  const disassembly = execFileSync('objdump', ['-d', '--no-show-raw-insn', agent], { encoding: 'utf8', maxBuffer: 64 * 1024 * 1024 });
  assert.ok(disassembly.includes('<main>:'), 'the disassembly lists the agent');
  const probes = disassembly.split('\n').filter((line) => /\scpuid\b/.test(line));
  assert.deepEqual(probes, [], 'cpuid in the agent: its start-up probes the CPU');
});
