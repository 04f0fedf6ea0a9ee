import { setTimeout as sleep } from 'node:timers/promises';
import type { Readable } from 'node:stream';
import type { Logger } from 'pino';
import { eventLineSchema, parseStreamEvent, type EventBatch, type InvalidNomadEvent } from './api-types.js';
import { NomadError, unreachable } from './errors.js';
import type { NomadHttp } from './http.js';

export interface GapInfo {
  /* Index of the last batch we processed before the stream was lost. */
  readonly lastIndex: number;
  /* Index of the first batch seen after reconnecting, if one arrived. */
  readonly resumedAt: number | undefined;
  readonly reason: 'buffer-overrun' | 'buffer-lost' | 'index-reset';
}

export interface EventStreamOptions {
  /* Topics to subscribe to; explicit topics need only read-job rights (no topic = management token). */
  readonly topics?: readonly string[];
  /*
   * Index the consumer's state already reflects (e.g. X-Nomad-Index of its full sync); batches
   * up to it are skipped. 0 replays Nomad's whole retained buffer.
   */
  readonly startIndex?: number;
  /* No line at all (not even a `{}` heartbeat) for this long means the connection is dead. */
  readonly idleTimeoutMs?: number;
  readonly reconnectInitialDelayMs?: number;
  readonly reconnectMaxDelayMs?: number;
  /* How long after reconnecting we wait for the re-delivery of our last batch before declaring a gap. */
  readonly continuityTimeoutMs?: number;
  readonly onEvents: (batch: EventBatch) => void | Promise<void>;
  /* Events may have been missed: the consumer must rebuild its state from the list endpoints. */
  readonly onGap?: (gap: GapInfo) => void | Promise<void>;
  readonly onConnected?: () => void;
  readonly onDisconnected?: (error: NomadError) => void;
}

const defaultTopics = ['Evaluation', 'Allocation', 'Job'] as const;

/*
 * Logs events of a parsed topic whose payload did not match our schemas. A schema that is wrong
 * about Nomad's JSON fails for every event of that topic, so one warn line per topic per interval
 * (with the count of those suppressed since the last line) names the field without flooding the
 * log; the totals stay countable for tests and health checks.
 */
export class InvalidEventReporter {
  readonly #lastLogged = new Map<string, { at: number; suppressed: number }>();
  readonly #counts = new Map<string, number>();

  constructor(
    private readonly logger: Logger,
    private readonly intervalMs = 60_000,
    private readonly now: () => number = Date.now,
  ) {}

  report(event: InvalidNomadEvent): void {
    this.#counts.set(event.Topic, (this.#counts.get(event.Topic) ?? 0) + 1);
    const last = this.#lastLogged.get(event.Topic);
    const now = this.now();
    if (last !== undefined && now - last.at < this.intervalMs) {
      last.suppressed += 1;
      return;
    }
    this.#lastLogged.set(event.Topic, { at: now, suppressed: 0 });
    this.logger.warn(
      {
        topic: event.Topic,
        type: event.Type,
        key: event.Key,
        index: event.Index,
        field: event.field,
        problem: event.problem,
        suppressed: last?.suppressed ?? 0,
      },
      `Nomad ${event.Topic} event did not parse at ${event.field}: ${event.problem}`,
    );
  }

  /* Invalid events seen so far, per topic or in all. */
  count(topic?: string): number {
    if (topic !== undefined) return this.#counts.get(topic) ?? 0;
    let total = 0;
    for (const count of this.#counts.values()) total += count;
    return total;
  }
}

/*
 * A self-healing subscription to /v1/event/stream.
 *
 * Nomad keeps only a bounded ring buffer of batches and a resumed subscription starts at the first
 * retained batch with Index >= the requested one. We therefore resume *at* the last processed
 * index: if that batch is re-delivered, nothing was missed (it is dropped as a duplicate); if the
 * first batch is newer, the buffer overran and we signal a gap; if nothing arrives within the
 * continuity timeout the buffer was lost (server restart) and we signal a gap too.
 */
export class EventStreamSubscription {
  private readonly abort = new AbortController();
  private readonly done: Promise<void>;
  private lastProcessedIndex: number;
  readonly invalidEvents: InvalidEventReporter;
  /* True once lastProcessedIndex is the index of a batch we actually received (so re-delivery is expected). */
  private cursorIsBatch = false;

  constructor(
    private readonly http: NomadHttp,
    private readonly logger: Logger,
    private readonly options: EventStreamOptions,
  ) {
    this.lastProcessedIndex = options.startIndex ?? 0;
    this.invalidEvents = new InvalidEventReporter(logger);
    this.done = this.run().catch((error: unknown) => {
      this.logger.error({ err: error }, 'Nomad event stream loop crashed');
    });
  }

  async stop(): Promise<void> {
    this.abort.abort();
    await this.done;
  }

  private async run(): Promise<void> {
    const initialDelay = this.options.reconnectInitialDelayMs ?? 250;
    const maxDelay = this.options.reconnectMaxDelayMs ?? 10_000;
    let delay = initialDelay;
    while (!this.abort.signal.aborted) {
      let receivedAnything = false;
      try {
        const topics = (this.options.topics ?? defaultTopics).map((topic) => (topic.includes(':') ? topic : `${topic}:*`));
        const { body } = await this.http.stream(
          '/v1/event/stream',
          { index: this.lastProcessedIndex, topic: topics },
          this.options.idleTimeoutMs ?? 90_000,
          this.abort.signal,
        );
        this.safely(() => this.options.onConnected?.());
        await this.consume(body, () => {
          receivedAnything = true;
        });
        throw unreachable('GET /v1/event/stream', new Error('event stream ended'));
      } catch (error) {
        if (this.abort.signal.aborted) break;
        const nomadError = error instanceof NomadError ? error : unreachable('GET /v1/event/stream', error);
        this.logger.warn({ err: nomadError, delay }, 'Nomad event stream lost, reconnecting');
        this.safely(() => this.options.onDisconnected?.(nomadError));
        if (receivedAnything) delay = initialDelay;
        await sleep(delay * (0.75 + Math.random() * 0.5), undefined, { signal: this.abort.signal }).catch(() => undefined);
        delay = Math.min(maxDelay, delay * 2);
      }
    }
  }

  private async consume(body: Readable, onLine: () => void): Promise<void> {
    let verifying = this.cursorIsBatch;
    let continuityTimer: NodeJS.Timeout | undefined;
    // Serialises the timer's gap report with batch delivery, so the consumer never sees them interleaved.
    let queue: Promise<void> = Promise.resolve();
    const enqueue = (task: () => Promise<void>): Promise<void> => (queue = queue.then(task));
    if (verifying) {
      continuityTimer = setTimeout(() => {
        if (!verifying) return;
        verifying = false;
        void enqueue(() => this.reportGap({ lastIndex: this.lastProcessedIndex, resumedAt: undefined, reason: 'buffer-lost' }));
      }, this.options.continuityTimeoutMs ?? 2_000);
    }
    try {
      body.setEncoding('utf8');
      let pending = '';
      for await (const chunk of body) {
        pending += String(chunk);
        let newline = pending.indexOf('\n');
        while (newline >= 0) {
          const line = pending.slice(0, newline).trim();
          pending = pending.slice(newline + 1);
          newline = pending.indexOf('\n');
          if (line === '') continue;
          onLine();
          const batch = parseLine(line);
          if (batch === undefined) continue;
          await enqueue(async () => {
            if (verifying) {
              verifying = false;
              clearTimeout(continuityTimer);
              if (batch.index > this.lastProcessedIndex) {
                await this.reportGap({ lastIndex: this.lastProcessedIndex, resumedAt: batch.index, reason: 'buffer-overrun' });
              } else if (batch.index < this.lastProcessedIndex) {
                // Nomad's index went backwards: its state was reset, so our cursor means nothing now.
                await this.reportGap({ lastIndex: this.lastProcessedIndex, resumedAt: batch.index, reason: 'index-reset' });
                this.lastProcessedIndex = batch.index - 1;
              }
            }
            // Nomad re-delivers the batch we resume at, and may duplicate batches; drop what we have seen.
            if (batch.index <= this.lastProcessedIndex) return;
            this.lastProcessedIndex = batch.index;
            this.cursorIsBatch = true;
            // Reported once, here, not per re-delivery: duplicates were dropped just above.
            for (const event of batch.events) if (event.kind === 'invalid') this.invalidEvents.report(event);
            await this.deliver(batch);
          });
        }
      }
    } finally {
      clearTimeout(continuityTimer);
      await queue;
    }
  }

  private async deliver(batch: EventBatch): Promise<void> {
    try {
      await this.options.onEvents(batch);
    } catch (error) {
      this.logger.error({ err: error, index: batch.index }, 'Nomad event handler failed');
    }
  }

  private async reportGap(gap: GapInfo): Promise<void> {
    this.logger.warn(gap, 'Nomad events may have been missed; a full resync is needed');
    try {
      await this.options.onGap?.(gap);
    } catch (error) {
      this.logger.error({ err: error }, 'Nomad gap handler failed');
    }
  }

  private safely(callback: () => void): void {
    try {
      callback();
    } catch (error) {
      this.logger.error({ err: error }, 'Nomad event stream callback failed');
    }
  }
}

/* Returns undefined for heartbeats; throws for lines that are not Nomad event JSON. */
function parseLine(line: string): EventBatch | undefined {
  let json: unknown;
  try {
    json = JSON.parse(line);
  } catch (error) {
    // A force-closed subscription may append a plain-text error; never mistake it for a heartbeat.
    throw new NomadError('NOMAD_INTERNAL_SERVER_ERROR', `Nomad event stream sent a non-JSON line: ${line.slice(0, 200)}`, {
      operation: 'GET /v1/event/stream',
      cause: error,
    });
  }
  const parsed = eventLineSchema.safeParse(json);
  if (!parsed.success) {
    throw new NomadError('NOMAD_INTERNAL_SERVER_ERROR', 'Nomad event stream sent an unexpected line', {
      operation: 'GET /v1/event/stream',
      cause: parsed.error,
    });
  }
  const { Index, Events } = parsed.data;
  if (Index === undefined || Events === undefined || Events === null || Events.length === 0) return undefined;
  return { index: Index, events: Events.map(parseStreamEvent) };
}
