// Types of baton.js, the browser client of Baton sessions.

export interface Interaction {
  id: string;
  session: string;
  content: string;
  metadata: Record<string, unknown>;
  status: "queued" | "running" | "waiting" | "completed" | "failed" | "cancelled";
  response: string;
  error: { code: string; message: string } | null;
  request: { id: string; data: unknown } | null;
  answers?: { request: { id: string; data: unknown }; answer: unknown }[];
  cancel_reason: string | null;
  created_at: string;
  started_at: string | null;
  finished_at: string | null;
}

export interface Session {
  id: string;
  agent: string;
  context: Record<string, unknown>;
  epoch: number;
  last_seq: number;
  created_at: string;
  running: Interaction | null;
  queued: number;
}

export interface BatonEvent {
  seq: number;
  session: string;
  type: string;
  at: string;
  data: any;
}

export type StreamState = "connecting" | "live" | "reconnecting" | "closed";

export class BatonError extends Error {
  status: number;
  code: string;
  details: Record<string, unknown>;
}

export function readToken(
  token: string,
): { tenant: string; session: string; scope: "read" | "write"; expiresAt: number } | null;

export function backoff(attempt: number): number;

export class Baton {
  constructor(options?: {
    base?: string;
    credential?: string | null;
    tokenProvider?: (session: string) => Promise<string>;
    WebSocket?: unknown;
    fetch?: typeof fetch;
  });
  base: string;
  credential: string | null;
  readonly isToken: boolean;
  request(method: string, path: string, body?: unknown): Promise<any>;
  agents(): Promise<{ agents: { name: string; kind: string; default: boolean }[] }>;
  sessions(options?: { after?: string; limit?: number }): Promise<{ sessions: Session[]; next: string | null }>;
  session(id: string): Promise<Session>;
  createSession(id: string, agent?: string): Promise<Session>;
  deleteSession(id: string): Promise<null>;
  interactions(id: string, options?: { before?: string; limit?: number }): Promise<{ interactions: Interaction[]; next: string | null }>;
  mintToken(id: string, scope?: "read" | "write", ttl?: number): Promise<{ token: string; session: string; scope: string; expires_at: string }>;
  open(id: string, options?: { after?: number | null; replay?: boolean }): SessionStream;
}

export class SessionStream implements AsyncIterable<BatonEvent> {
  readonly id: string;
  readonly state: StreamState;
  readonly lastSeq: number | null;
  hello: Session | null;
  onevent: ((event: BatonEvent) => void) | null;
  onstate: ((state: StreamState) => void) | null;
  onhello: ((session: Session) => void) | null;
  send(content: string, options?: { policy?: "reject" | "enqueue" | "interrupt"; metadata?: Record<string, unknown>; idempotencyKey?: string }): Promise<Interaction | { epoch: number; cancelled: string[] }>;
  cancel(interactionId?: string): Promise<{ cancelled: string[] }>;
  clear(): Promise<{ epoch: number; cancelled: string[] }>;
  answer(interactionId: string, requestId: string, answer: unknown): Promise<Interaction>;
  context(change?: { set?: Record<string, unknown>; patch?: Record<string, unknown> }): Promise<Record<string, unknown>>;
  ping(): Promise<null>;
  close(): void;
  [Symbol.asyncIterator](): AsyncIterator<BatonEvent>;
}
