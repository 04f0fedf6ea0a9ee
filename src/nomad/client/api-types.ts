import { z } from 'zod';

/*
 * Zod schemas of the subset of Nomad's JSON we read. Objects are loose (unknown keys pass through)
 * because Nomad adds fields between versions and we must not break on them; fields we read are
 * nullable where Nomad serialises Go nil values as null.
 *
 * Nomad encodes its responses and event-stream lines with go-codec, and the structs that carry
 * `_struct bool \`codec:",omitempty"\`` (nomad/structs: Allocation in alloc.go, Evaluation in eval.go,
 * Port, NetworkResource and AllocatedPortMapping in structs.go) lose *every* field whose value is
 * empty ("", 0, false, nil): a port without a `to` has no `To`, an allocation not yet described has
 * no `ClientDescription`. So every field of those structs is optional here; where the code needs a
 * value the default is the Go zero value Nomad left out (or, for the statuses, what Nomad itself
 * treats an empty status as). Job, TaskGroup, Task and TaskState have no such tag and always carry
 * all their fields, but they are nullish too so that a future tag does not break us.
 */

const meta = z.record(z.string(), z.string()).nullish();

/* structs.Port (structs.go, omitempty): `To`, `HostNetwork` and a dynamic port's unassigned `Value` are absent unless set. */
export const portSchema = z.looseObject({
  Label: z.string().default(''),
  Value: z.number().int().nullish(),
  To: z.number().int().nullish(),
  HostNetwork: z.string().nullish(),
});

export const networkResourceSchema = z.looseObject({
  Mode: z.string().nullish(),
  DynamicPorts: z.array(portSchema).nullish(),
  ReservedPorts: z.array(portSchema).nullish(),
});

export const resourcesSchema = z.looseObject({
  CPU: z.number().int().nullish(),
  MemoryMB: z.number().int().nullish(),
  MemoryMaxMB: z.number().int().nullish(),
});

export const taskSchema = z.looseObject({
  Name: z.string(),
  Driver: z.string(),
  Config: z.record(z.string(), z.unknown()).nullish(),
  Resources: resourcesSchema.nullish(),
  Meta: meta,
});

export const taskGroupSchema = z.looseObject({
  Name: z.string(),
  Count: z.number().int().nullish(),
  Meta: meta,
  Networks: z.array(networkResourceSchema).nullish(),
  Tasks: z.array(taskSchema).nullish(),
});

export const jobSchema = z.looseObject({
  ID: z.string(),
  Name: z.string().nullish(),
  Namespace: z.string().nullish(),
  Type: z.string().nullish(),
  Status: z.string().nullish(),
  Stop: z.boolean().nullish(),
  Version: z.number().int().nullish(),
  Meta: meta,
  TaskGroups: z.array(taskGroupSchema).nullish(),
  CreateIndex: z.number().int().nullish(),
  ModifyIndex: z.number().int().nullish(),
  JobModifyIndex: z.number().int().nullish(),
});
export type NomadJob = z.infer<typeof jobSchema>;
export type NomadTaskGroup = z.infer<typeof taskGroupSchema>;
export type NomadTask = z.infer<typeof taskSchema>;

export const jobListStubSchema = z.looseObject({
  ID: z.string(),
  Name: z.string().nullish(),
  Namespace: z.string().nullish(),
  Status: z.string(),
  Type: z.string().nullish(),
  Stop: z.boolean().nullish(),
  CreateIndex: z.number().int().nullish(),
  ModifyIndex: z.number().int().nullish(),
  Meta: meta,
});
export type JobListStub = z.infer<typeof jobListStubSchema>;

export const jobRegisterResponseSchema = z.looseObject({
  EvalID: z.string(),
  EvalCreateIndex: z.number().int().nullish(),
  JobModifyIndex: z.number().int().nullish(),
  Warnings: z.string().nullish(),
  Index: z.number().int().nullish(),
});

export const jobDeregisterResponseSchema = z.looseObject({
  // Empty when the job did not exist (Nomad >= 1.6 answers 200 instead of 404 then).
  EvalID: z.string().nullish(),
  EvalCreateIndex: z.number().int().nullish(),
  JobModifyIndex: z.number().int().nullish(),
});

/*
 * structs.AllocatedPortMapping (omitempty): `To` is absent for a port without a `to` (the runner then
 * falls back to the label, which Poseidon names after the container port), `HostIP` for a node
 * without an address on that host network. Zero values stand in for what Nomad left out.
 */
export const portMappingSchema = z.looseObject({
  Label: z.string().default(''),
  Value: z.number().int().default(0),
  To: z.number().int().default(0),
  HostIP: z.string().default(''),
});
export type PortMapping = z.infer<typeof portMappingSchema>;

export const allocatedResourcesSchema = z.looseObject({
  Shared: z
    .looseObject({
      Ports: z.array(portMappingSchema).nullish(),
    })
    .nullish(),
});

export const taskEventSchema = z.looseObject({
  Type: z.string().default(''),
  Time: z.number().nullish(),
  ExitCode: z.number().int().nullish(),
  Signal: z.number().int().nullish(),
  Details: z.record(z.string(), z.string()).nullish(),
  DisplayMessage: z.string().nullish(),
});

export const taskStateSchema = z.looseObject({
  State: z.string().default(''),
  Failed: z.boolean().nullish(),
  Restarts: z.number().int().nullish(),
  Events: z.array(taskEventSchema).nullish(),
});

const allocationCommon = {
  ID: z.string(),
  Name: z.string().nullish(),
  Namespace: z.string().nullish(),
  JobID: z.string(),
  TaskGroup: z.string().nullish(),
  NodeID: z.string().nullish(),
  NodeName: z.string().nullish(),
  EvalID: z.string().nullish(),
  /*
   * structs.Allocation is omitempty, so an empty status would be absent. Nomad's own checks
   * (ClientTerminalStatus, ServerTerminalStatus in alloc.go) treat an empty status as neither
   * terminal nor stopped, i.e. like `pending` and `run`; the defaults keep that meaning.
   */
  ClientStatus: z.string().default('pending'),
  DesiredStatus: z.string().default('run'),
  ClientDescription: z.string().nullish(),
  DesiredDescription: z.string().nullish(),
  AllocatedResources: allocatedResourcesSchema.nullish(),
  TaskStates: z.record(z.string(), taskStateSchema).nullish(),
  // Unix nanoseconds exceed 2^53; they are only good for ordering, never for equality.
  CreateTime: z.number().nullish(),
  ModifyTime: z.number().nullish(),
  CreateIndex: z.number().int().nullish(),
  ModifyIndex: z.number().int().nullish(),
  FollowupEvalID: z.string().nullish(),
};

export const allocationListStubSchema = z.looseObject({
  ...allocationCommon,
  JobVersion: z.number().int().nullish(),
});
export type AllocationListStub = z.infer<typeof allocationListStubSchema>;

export const allocationSchema = z.looseObject({
  ...allocationCommon,
  NextAllocation: z.string().nullish(),
  PreviousAllocation: z.string().nullish(),
  Job: jobSchema.nullish(),
});
export type Allocation = z.infer<typeof allocationSchema>;

/* structs.AllocMetric: why a task group found no node (what `nomad job run` prints under "Placement Failure"). */
export const allocationMetricSchema = z.looseObject({
  NodesEvaluated: z.number().int().nullish(),
  NodesFiltered: z.number().int().nullish(),
  NodesInPool: z.number().int().nullish(),
  NodePool: z.string().nullish(),
  NodesAvailable: z.record(z.string(), z.number()).nullish(),
  ClassFiltered: z.record(z.string(), z.number()).nullish(),
  ConstraintFiltered: z.record(z.string(), z.number()).nullish(),
  NodesExhausted: z.number().int().nullish(),
  ClassExhausted: z.record(z.string(), z.number()).nullish(),
  DimensionExhausted: z.record(z.string(), z.number()).nullish(),
  QuotaExhausted: z.array(z.string()).nullish(),
  CoalescedFailures: z.number().int().nullish(),
});
export type AllocationMetric = z.infer<typeof allocationMetricSchema>;

export const evaluationSchema = z.looseObject({
  ID: z.string(),
  JobID: z.string().nullish(),
  Namespace: z.string().nullish(),
  // structs.Evaluation is omitempty too (eval.go).
  Status: z.string().default(''),
  StatusDescription: z.string().nullish(),
  TriggeredBy: z.string().nullish(),
  Type: z.string().nullish(),
  BlockedEval: z.string().nullish(),
  FailedTGAllocs: z.record(z.string(), allocationMetricSchema).nullish(),
  CreateIndex: z.number().int().nullish(),
  ModifyIndex: z.number().int().nullish(),
});
export type Evaluation = z.infer<typeof evaluationSchema>;

/*
 * Event payloads are parsed per topic; an event of a topic we do not parse is kept as `other` and
 * one of a parsed topic whose payload does not match as `invalid`, instead of failing the whole batch.
 */
const streamEventHeaderSchema = z.looseObject({
  Topic: z.string(),
  Type: z.string(),
  Key: z.string(),
  Namespace: z.string().nullish(),
  FilterKeys: z.array(z.string()).nullish(),
  Index: z.number().int(),
});
export const streamEventSchema = streamEventHeaderSchema.extend({
  Payload: z.record(z.string(), z.unknown()),
});

type RawStreamEvent = z.infer<typeof streamEventSchema>;
// Inferred from its own schema: Omit<> over a loose object's index signature would erase Topic & co.
type EventHeader = z.infer<typeof streamEventHeaderSchema>;
export type InvalidNomadEvent = EventHeader & { kind: 'invalid'; payload: Record<string, unknown>; field: string; problem: string };

/*
 * `kind` discriminates the parsed payload; `Topic` stays Nomad's raw string. `invalid` is an event
 * of a topic we parse whose payload did not match our schema: it is kept (and logged by the
 * subscription) rather than passed off as `other`, so a shape we got wrong is never silent.
 */
export type NomadEvent = EventHeader &
  (
    | { kind: 'allocation'; allocation: Allocation }
    | { kind: 'evaluation'; evaluation: Evaluation }
    | { kind: 'job'; job: NomadJob }
    | { kind: 'invalid'; payload: Record<string, unknown>; field: string; problem: string }
    | { kind: 'other'; payload: Record<string, unknown> }
  );

export const eventLineSchema = z.looseObject({
  Index: z.number().int().optional(),
  Events: z.array(streamEventSchema).nullish(),
});

export interface EventBatch {
  readonly index: number;
  readonly events: readonly NomadEvent[];
}

/* Names the first failing field as a dotted path (`Allocation.AllocatedResources.Shared.Ports.0.Value`) for the log line. */
function invalidEvent(header: EventHeader, payload: Record<string, unknown>, error: z.ZodError): NomadEvent {
  const issue = error.issues[0];
  return {
    ...header,
    kind: 'invalid',
    payload,
    field: [header.Topic, ...(issue?.path ?? []).map(String)].join('.'),
    problem: issue?.message ?? error.message,
  };
}

/* Parses one event's payload by topic so consumers get typed objects. */
export function parseStreamEvent(raw: RawStreamEvent): NomadEvent {
  const { Payload, ...header } = raw;
  switch (raw.Topic) {
    case 'Allocation': {
      const parsed = allocationSchema.safeParse(Payload['Allocation']);
      return parsed.success ? { ...header, kind: 'allocation', allocation: parsed.data } : invalidEvent(header, Payload, parsed.error);
    }
    case 'Evaluation': {
      const parsed = evaluationSchema.safeParse(Payload['Evaluation']);
      return parsed.success ? { ...header, kind: 'evaluation', evaluation: parsed.data } : invalidEvent(header, Payload, parsed.error);
    }
    case 'Job': {
      const parsed = jobSchema.safeParse(Payload['Job']);
      return parsed.success ? { ...header, kind: 'job', job: parsed.data } : invalidEvent(header, Payload, parsed.error);
    }
    default:
      return { ...header, kind: 'other', payload: Payload };
  }
}
