import assert from 'node:assert/strict';
import { test } from 'node:test';
import { hostIdsInRange, IDS_PER_RUNNER, IdRangeAllocator, IdRangeExhaustedError } from '../src/local/id-ranges.js';

test('id ranges: each live runner gets a range of its own; released ranges are handed out again', () => {
  const allocator = new IdRangeAllocator(0x6000_0000, 3);
  const ranges = [allocator.allocate(), allocator.allocate(), allocator.allocate()];
  assert.deepEqual(
    ranges.map((range) => range.base),
    [0x6000_0000, 0x6000_0000 + IDS_PER_RUNNER, 0x6000_0000 + 2 * IDS_PER_RUNNER],
  );
  assert.ok(ranges.every((range) => range.count === IDS_PER_RUNNER));
  assert.throws(() => allocator.allocate(), IdRangeExhaustedError);
  allocator.release(ranges[1] as (typeof ranges)[number]);
  allocator.release(ranges[1] as (typeof ranges)[number]); // twice is harmless
  assert.equal(allocator.inUse, 2);
  assert.equal(allocator.allocate().base, ranges[1]?.base);
  assert.throws(() => allocator.allocate(), IdRangeExhaustedError);
});

test('id ranges: a range that reaches root or past the largest id is refused', () => {
  assert.throws(() => new IdRangeAllocator(0, 1), /must lie within/);
  assert.throws(() => new IdRangeAllocator(0xffff_0000, 2), /must lie within/);
});

test('id ranges: host accounts inside the range are found, the default range is free on this host', () => {
  // root (0) and nobody (65534) exist on every host: a range covering them must be reported.
  assert.ok(hostIdsInRange(0, IDS_PER_RUNNER).some((clash) => clash.startsWith('/etc/passwd: root (0)')));
  assert.deepEqual(hostIdsInRange(0x6000_0000, 0x6000_0000 + 4096 * IDS_PER_RUNNER), []);
});
