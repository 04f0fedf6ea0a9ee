import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { describe, it } from 'node:test';
import pino from 'pino';
import { type Evaluation, evaluationSchema } from '../src/nomad/client/api-types.js';
import { EvaluationTracker, evaluationFailure, PlacementError } from '../src/nomad/evaluations.js';
import { BackendError } from '../src/runner/errors.js';

/*
 * Reading Nomad's evaluations: the documented "Read Evaluation" sample (a blocked evaluation with
 * FailedTGAllocs, test/fixtures/nomad/README.md), what a registration's caller makes of a finished
 * evaluation (Poseidon's checkEvaluation), and following evaluations from events or, when events are
 * missing, from GET /v1/evaluation/:id.
 */

const documented = evaluationSchema.parse(JSON.parse(readFileSync(new URL('./fixtures/nomad/evaluation-read.json', import.meta.url), 'utf8')));
const silent = pino({ level: 'silent' });

describe('evaluation results', () => {
  it("reads the documented sample and names Nomad's placement failure as `nomad job run` does", () => {
    assert.equal(documented.Status, 'blocked');
    assert.equal(documented.FailedTGAllocs?.['cache']?.NodesAvailable?.['dc1'], 0);
    const failure = evaluationFailure(documented, 'example');
    assert.ok(failure instanceof PlacementError);
    assert.equal(failure.placementCause, 'no_nodes');
    assert.equal(failure.kind, 'backend-failed');
    assert.equal(
      failure.message,
      'Nomad could not place job "example": evaluation "2deb5f06-a100-f01a-3316-5e501a4965e7" finished with status "blocked" but failed to place all allocations: ' +
        'task group "cache" (failed to place 1 allocation): No nodes were eligible for evaluation; No nodes are available in datacenter "dc1"',
    );
  });

  it('names exhausted dimensions, filtering constraints, coalesced failures and the blocked evaluation', () => {
    const evaluation = evaluationSchema.parse({
      ID: 'e1',
      Status: 'complete',
      BlockedEval: 'b1',
      FailedTGAllocs: {
        'default-group': {
          NodesEvaluated: 3,
          NodesFiltered: 1,
          ConstraintFiltered: { 'missing drivers': 1 },
          NodesExhausted: 2,
          DimensionExhausted: { memory: 2 },
          CoalescedFailures: 2,
        },
      },
    });
    const failure = evaluationFailure(evaluation, '7-abc');
    assert.ok(failure instanceof PlacementError);
    assert.equal(failure.placementCause, 'resources');
    assert.equal(failure.blockedEvaluation, 'b1');
    assert.match(failure.message, /task group "default-group" \(failed to place 3 allocations\)/);
    assert.match(
      failure.message,
      /Constraint "missing drivers": 1 nodes excluded by filter; Resources exhausted on 2 nodes; Dimension "memory" exhausted on 2 nodes/,
    );
    assert.match(failure.message, /evaluation "b1" waiting for additional capacity to place remainder$/);
  });

  it('a complete evaluation without failures is fine; a failed or canceled one is a backend error, not a placement error', () => {
    // go-codec leaves every empty field of an Evaluation out.
    assert.equal(evaluationFailure(evaluationSchema.parse({ ID: 'ok', Status: 'complete' }), 'j'), undefined);
    for (const status of ['failed', 'canceled']) {
      const failure = evaluationFailure(evaluationSchema.parse({ ID: 'x', Status: status, StatusDescription: 'maximum attempts reached (5)' }), 'j');
      assert.ok(failure instanceof BackendError && !(failure instanceof PlacementError));
      assert.match(failure.message, new RegExp(`ended with status "${status}": maximum attempts reached \\(5\\)`));
    }
  });
});

describe('EvaluationTracker', () => {
  const done = (id: string): Evaluation => evaluationSchema.parse({ ID: id, Status: 'complete' });

  it('settles from events that came before or after the registration answered, and ignores unfinished ones', async () => {
    const tracker = new EvaluationTracker(async () => assert.fail('no direct read needed'), silent);
    tracker.observe(done('early'));
    assert.equal((await tracker.settle('early'))?.ID, 'early');
    const later = tracker.settle('late');
    tracker.observe(evaluationSchema.parse({ ID: 'late', Status: 'pending' }));
    tracker.observe(done('late'));
    assert.equal((await later)?.ID, 'late');
  });

  it('reads an evaluation the stream did not report from Nomad, and gives up at its deadline', async () => {
    const reads: string[] = [];
    const tracker = new EvaluationTracker(
      async (id) => {
        reads.push(id);
        return evaluationSchema.parse({ ID: id, Status: id === 'slow' ? 'pending' : 'complete' });
      },
      silent,
      1_500,
    );
    assert.equal((await tracker.settle('missed'))?.Status, 'complete');
    assert.ok(reads.includes('missed'));
    assert.equal(await tracker.settle('slow'), undefined, 'still pending at the deadline');
    const gap = tracker.settle('gap');
    tracker.recheck();
    assert.equal((await gap)?.ID, 'gap');
    tracker.close();
  });
});
