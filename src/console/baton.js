// baton.js — a browser client for Baton sessions (an ES module, no dependencies).
//
//   import { Baton } from "/console/baton.js";
//   const baton = new Baton({ credential: token });          // an API key or a session token
//   const stream = baton.open("support-4711");                // resumes by itself
//   stream.send("hello", { policy: "enqueue" }).then((interaction) => console.log(interaction));
//   for await (const event of stream) console.log(event.seq, event.type, event.data);
//
// The stream is a WebSocket. It resumes a dropped connection with `after=` (the last seq it
// handed out), so its events come once each, in order, none missing; it backs off between
// attempts (0.25 s doubling to 8 s). Browsers cannot set headers on a WebSocket, so it sends a
// session token as `access_token=`: with an API key as the credential, it mints one
// (`POST …/tokens`) and mints again when the server closes with 4001 (token expired);
// `tokenProvider(sessionId)` replaces that (e.g. your backend's endpoint).

/** An error answered by the server: `status`, `code` (e.g. `session_busy`) and `message`. */
export class BatonError extends Error {
  constructor(status, code, message, details = {}) {
    super(`${code}: ${message}`);
    this.name = "BatonError";
    this.status = status;
    this.code = code;
    this.details = details;
  }
}

const TOKEN_PREFIX = "bt1.";

/** What a session token says (tenant, session, scope, expiry), read without verifying. */
export function readToken(token) {
  if (typeof token !== "string" || !token.startsWith(TOKEN_PREFIX)) return null;
  const body = token.slice(TOKEN_PREFIX.length).split(".")[0];
  try {
    const text = atob(body.replace(/-/g, "+").replace(/_/g, "/"));
    const [tenant, session, scope, expires] = text.split("/");
    if (!session || !scope) return null;
    return { tenant, session, scope, expiresAt: Number(expires) };
  } catch {
    return null;
  }
}

export class Baton {
  /**
   * @param {{base?: string, credential?: string|null, tokenProvider?: (session: string) => Promise<string>, WebSocket?: any, fetch?: any}} options
   */
  constructor(options = {}) {
    this.base = (options.base ?? globalThis.location?.origin ?? "").replace(/\/$/, "");
    this.credential = options.credential ?? null;
    this.tokenProvider = options.tokenProvider ?? null;
    this.WebSocket = options.WebSocket ?? globalThis.WebSocket;
    this.fetch = options.fetch ?? globalThis.fetch.bind(globalThis);
  }

  /** Whether the credential is a session token (else an API key, or none). */
  get isToken() {
    return readToken(this.credential) !== null;
  }

  async request(method, path, body) {
    const headers = { accept: "application/json" };
    if (this.credential) headers.authorization = `Bearer ${this.credential}`;
    if (body !== undefined) headers["content-type"] = "application/json";
    const response = await this.fetch(this.base + path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await response.text();
    const value = text ? JSON.parse(text) : null;
    if (!response.ok) {
      const error = value?.error ?? {};
      throw new BatonError(response.status, error.code ?? "http_" + response.status, error.message ?? text, error);
    }
    return value;
  }

  agents() {
    return this.request("GET", "/v1/agents");
  }

  sessions({ after, limit } = {}) {
    const query = new URLSearchParams();
    if (after) query.set("after", after);
    if (limit) query.set("limit", String(limit));
    const q = query.toString();
    return this.request("GET", "/v1/sessions" + (q ? "?" + q : ""));
  }

  session(id) {
    return this.request("GET", `/v1/sessions/${encodeURIComponent(id)}`);
  }

  createSession(id, agent) {
    return this.request("PUT", `/v1/sessions/${encodeURIComponent(id)}`, agent ? { agent } : {});
  }

  deleteSession(id) {
    return this.request("DELETE", `/v1/sessions/${encodeURIComponent(id)}`);
  }

  interactions(id, { before, limit } = {}) {
    const query = new URLSearchParams();
    if (before) query.set("before", before);
    if (limit) query.set("limit", String(limit));
    const q = query.toString();
    return this.request("GET", `/v1/sessions/${encodeURIComponent(id)}/interactions` + (q ? "?" + q : ""));
  }

  mintToken(id, scope = "write", ttl = 900) {
    return this.request("POST", `/v1/sessions/${encodeURIComponent(id)}/tokens`, { scope, ttl_s: ttl });
  }

  /** The token for a session's stream: the credential itself, a minted one, or none. */
  async streamToken(id) {
    if (this.tokenProvider) return this.tokenProvider(id);
    if (!this.credential) return null;
    if (this.isToken) return this.credential;
    return (await this.mintToken(id, "write", 900)).token;
  }

  /** Opens a session's stream (see SessionStream). */
  open(id, options = {}) {
    return new SessionStream(this, id, options);
  }
}

/** Backoff before reconnection attempt n (0-based): 0.25 s doubling, at most 8 s. */
export function backoff(attempt) {
  return Math.min(8000, 250 * 2 ** attempt);
}

/**
 * A session's live stream over a WebSocket that resumes by itself.
 * - events: `for await (const event of stream)`, or `stream.onevent = (event) => …`;
 * - `state`: "connecting" | "live" | "reconnecting" | "closed", told by `onstate`;
 * - `send`, `cancel`, `clear`, `answer`, `context`: promises of the server's reply data,
 *   matched by `ref`; an op whose connection drops before its reply is rejected (`lost`);
 *   one made while the stream reconnects is sent once it is connected again.
 */
export class SessionStream {
  constructor(baton, id, { after = null, replay = false } = {}) {
    this.baton = baton;
    this.id = id;
    this.lastSeq = after;
    this.replay = replay && after === null;
    this.state = "connecting";
    this.hello = null;
    this.onevent = null;
    this.onstate = null;
    this.onhello = null;
    this.pending = new Map();
    this.nextRef = 1;
    this.queue = [];
    this.waiters = [];
    this.attempt = 0;
    this.closed = false;
    this.catchUpTo = 0;
    this.socket = null;
    this.connected = false;
    this.held = [];
    this.token = null;
    this.connect();
  }

  setState(state) {
    if (this.state === state) return;
    this.state = state;
    this.onstate?.(state);
  }

  async connect() {
    if (this.closed) return;
    try {
      if (this.token === null) this.token = await this.baton.streamToken(this.id);
    } catch (error) {
      this.fail(error);
      return;
    }
    const url = new URL(this.baton.base + `/v1/sessions/${encodeURIComponent(this.id)}/ws`);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    if (this.lastSeq !== null) url.searchParams.set("after", String(this.lastSeq));
    else if (this.replay) url.searchParams.set("replay", "true");
    if (this.token) url.searchParams.set("access_token", this.token);
    const socket = new this.baton.WebSocket(url.toString());
    this.socket = socket;
    socket.onmessage = (message) => this.receive(JSON.parse(message.data));
    socket.onclose = (close) => this.dropped(socket, close);
    socket.onerror = () => {};
  }

  receive(frame) {
    if (frame.kind === "hello") {
      this.hello = frame.session;
      this.attempt = 0;
      this.connected = true;
      for (const held of this.held.splice(0)) held.go();
      this.catchUpTo = frame.session.last_seq;
      if (this.lastSeq === null && !this.replay) this.lastSeq = frame.session.last_seq;
      this.onhello?.(frame.session);
      if ((this.lastSeq ?? 0) >= this.catchUpTo) this.setState("live");
      return;
    }
    if (frame.kind === "event") {
      // Never twice: a resumed connection starts after the last seq handed out.
      if (this.lastSeq !== null && frame.seq <= this.lastSeq) return;
      this.lastSeq = frame.seq;
      const { kind, ...event } = frame;
      this.deliver(event);
      if (this.state !== "live" && frame.seq >= this.catchUpTo) this.setState("live");
      return;
    }
    if (frame.kind === "reply" || frame.kind === "pong") {
      const waiter = this.pending.get(frame.ref);
      if (!waiter) return;
      this.pending.delete(frame.ref);
      if (frame.kind === "pong" || frame.ok) waiter.resolve(frame.data ?? null);
      else waiter.reject(new BatonError(0, frame.error.code, frame.error.message, frame.error));
    }
  }

  deliver(event) {
    this.onevent?.(event);
    const waiter = this.waiters.shift();
    if (waiter) waiter({ value: event, done: false });
    else if (!this.onevent) this.queue.push(event);
  }

  async dropped(socket, close) {
    if (socket !== this.socket) return;
    this.socket = null;
    this.connected = false;
    for (const [, waiter] of this.pending) {
      waiter.reject(new BatonError(0, "lost", "the connection was lost before the reply"));
    }
    this.pending.clear();
    if (this.closed) return this.end();
    if (close.code === 1000 && /deleted/.test(close.reason)) return this.end();
    if (close.code === 4001 || close.code === 1008) this.token = null; // expired: a new one
    this.setState("reconnecting");
    const delay = close.code === 4001 ? 0 : backoff(this.attempt++);
    setTimeout(() => this.connect(), delay);
  }

  fail(error) {
    this.error = error;
    if (error?.status === 401 || error?.status === 403 || error?.status === 404) return this.end();
    this.setState("reconnecting");
    setTimeout(() => this.connect(), backoff(this.attempt++));
  }

  end() {
    this.closed = true;
    this.setState("closed");
    for (const held of this.held.splice(0)) {
      held.reject(new BatonError(0, "closed", "the stream is closed"));
    }
    for (const waiter of this.waiters.splice(0)) waiter({ value: undefined, done: true });
  }

  /** Sends an op, or, while the stream reconnects, holds it until it is connected again
   *  (at most 10 s, then it is rejected with `not_connected`). */
  op(fields) {
    return new Promise((resolve, reject) => {
      const go = () => {
        const ref = this.nextRef++;
        this.pending.set(ref, { resolve, reject });
        this.socket.send(JSON.stringify({ ...fields, ref }));
      };
      if (this.connected && this.socket && this.socket.readyState === 1) return go();
      if (this.closed) return reject(new BatonError(0, "closed", "the stream is closed"));
      const held = { go, reject };
      this.held.push(held);
      setTimeout(() => {
        const at = this.held.indexOf(held);
        if (at >= 0) {
          this.held.splice(at, 1);
          reject(new BatonError(0, "not_connected", "the stream did not reconnect in 10 s"));
        }
      }, 10000);
    });
  }

  send(content, { policy = "reject", metadata, idempotencyKey } = {}) {
    const fields = { op: "message", content, policy };
    if (metadata) fields.metadata = metadata;
    if (idempotencyKey) fields.idempotency_key = idempotencyKey;
    return this.op(fields);
  }

  cancel(interactionId) {
    return this.op(interactionId ? { op: "cancel", interaction_id: interactionId } : { op: "cancel" });
  }

  clear() {
    return this.op({ op: "clear" });
  }

  answer(interactionId, requestId, answer) {
    return this.op({ op: "answer", interaction_id: interactionId, request_id: requestId, answer });
  }

  context({ set, patch } = {}) {
    const fields = { op: "context" };
    if (set !== undefined) fields.set = set;
    if (patch !== undefined) fields.patch = patch;
    return this.op(fields);
  }

  ping() {
    return this.op({ op: "ping" });
  }

  close() {
    this.closed = true;
    if (this.socket) this.socket.close(1000);
    else this.end();
  }

  [Symbol.asyncIterator]() {
    return {
      next: () => {
        if (this.queue.length) return Promise.resolve({ value: this.queue.shift(), done: false });
        if (this.closed && !this.socket) return Promise.resolve({ value: undefined, done: true });
        return new Promise((resolve) => this.waiters.push(resolve));
      },
      return: () => {
        this.close();
        return Promise.resolve({ value: undefined, done: true });
      },
    };
  }
}
