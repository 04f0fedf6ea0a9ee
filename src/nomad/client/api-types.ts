import { z } from 'zod';

/*
 * Zod schemas of the subset of Nomad's JSON we read. Objects are loose (unknown keys pass through)
 * because Nomad adds fields between versions and we must not break on them; fields we read are
 * nullable where Nomad serialises Go nil values as null.
 */

const meta = z.record(z.string(), z.string()).nullish();

export const portSchema = z.looseObject({
  Label: z.string(),
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

export const portMappingSchema = z.looseObject({
  Label: z.string(),
  Value: z.number().int(),
  To: z.number().int(),
  HostIP: z.string(),
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
  Type: z.string(),
  Time: z.number().nullish(),
  ExitCode: z.number().int().nullish(),
  Signal: z.number().int().nullish(),
  Details: z.record(z.string(), z.string()).nullish(),
  DisplayMessage: z.string().nullish(),
});

export const taskStateSchema = z.looseObject({
  State: z.string(),
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
  ClientStatus: z.string(),
  DesiredStatus: z.string(),
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

export const allocationMetricSchema = z.looseObject({
  NodesEvaluated: z.number().int().nullish(),
  NodesExhausted: z.number().int().nullish(),
  DimensionExhausted: z.record(z.string(), z.number()).nullish(),
  ConstraintFiltered: z.record(z.string(), z.number()).nullish(),
});

export const evaluationSchema = z.looseObject({
  ID: z.string(),
  JobID: z.string().nullish(),
  Namespace: z.string().nullish(),
  Status: z.string(),
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
 * Event payloads are parsed per topic; an event of a topic we did not ask for (or a payload
 * shape we do not know) is kept as `unknown` instead of failing the whole batch.
 */
export const streamEventSchema = z.looseObject({
  Topic: z.string(),
  Type: z.string(),
  Key: z.string(),
  Namespace: z.string().nullish(),
  FilterKeys: z.array(z.string()).nullish(),
  Index: z.number().int(),
  Payload: z.record(z.string(), z.unknown()),
});

type RawStreamEvent = z.infer<typeof streamEventSchema>;
type EventHeader = Omit<RawStreamEvent, 'Payload'>;

/* `kind` discriminates the parsed payload; `Topic` stays Nomad's raw string. */
export type NomadEvent = EventHeader &
  (
    | { kind: 'allocation'; allocation: Allocation }
    | { kind: 'evaluation'; evaluation: Evaluation }
    | { kind: 'job'; job: NomadJob }
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

/* Parses one event's payload by topic so consumers get typed objects. */
export function parseStreamEvent(raw: RawStreamEvent): NomadEvent {
  const { Payload, ...header } = raw;
  switch (raw.Topic) {
    case 'Allocation': {
      const parsed = allocationSchema.safeParse(Payload['Allocation']);
      if (parsed.success) return { ...header, kind: 'allocation', allocation: parsed.data };
      break;
    }
    case 'Evaluation': {
      const parsed = evaluationSchema.safeParse(Payload['Evaluation']);
      if (parsed.success) return { ...header, kind: 'evaluation', evaluation: parsed.data };
      break;
    }
    case 'Job': {
      const parsed = jobSchema.safeParse(Payload['Job']);
      if (parsed.success) return { ...header, kind: 'job', job: parsed.data };
      break;
    }
  }
  return { ...header, kind: 'other', payload: Payload };
}
