import { z } from 'zod';

/* Exactly the shapes of Poseidon's websocket.schema.json: CodeOcean silently drops anything else. */
export const webSocketMessageSchema = z
  .union([
    z.strictObject({ type: z.literal('exit'), data: z.number().int().min(0).max(255) }),
    z.strictObject({ type: z.enum(['stdout', 'stderr', 'error']), data: z.string() }),
    z.strictObject({ type: z.enum(['start', 'timeout']) }),
  ])
  .describe('A message of /runners/{runnerId}/websocket from the server');

export type WebSocketMessage = z.infer<typeof webSocketMessageSchema>;
