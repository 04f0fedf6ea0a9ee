/* Exactly the shapes of Poseidon's websocket.schema.json: CodeOcean silently drops anything else. */
export type WebSocketMessage =
  | { type: 'start' }
  | { type: 'timeout' }
  | { type: 'stdout' | 'stderr' | 'error'; data: string }
  | { type: 'exit'; data: number };
