//! `GET /v1/sessions/{id}/ws`: the WebSocket protocol of API.md. Each connection is one task:
//! it writes hello, the replay, live events, replies and pings, and reads the client's frames,
//! running their operations one at a time, in order (the next frame is read once the
//! operation in flight has its reply; events flow meanwhile). No lock is held while writing
//! to a socket.

use std::pin::Pin;
use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::response::{IntoResponse, Response};
use futures_util::{Sink, SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::time::Instant;

use super::AppState;
use super::auth::{Bucket, Principal, ReadSession};
use super::connections::ConnectionGuard;
use super::error::ApiError;
use super::extract::QueryParams;
use super::feed::{EventFeed, FeedItem, IfMissing, StartAt, deadline};
use super::http::validate_content;
use crate::engine::{Engine, MessageOutcome, MessageRequest};
use crate::model::{
    EventType, InteractionId, JsonObject, Policy, Session, SessionId, validate_idempotency_key,
};

/// Initial read buffer of a connection: client frames are small operations (a larger one is
/// read in several chunks).
const READ_BUFFER: usize = 1024;
/// Frames are written out once this much is buffered (and at every flush).
const WRITE_BUFFER: usize = 64 * 1024;
/// A peer that lets this much pile up is stuck: its connection fails.
const MAX_WRITE_BUFFER: usize = 16 * 1024 * 1024;
/// After sending a close frame, how long to wait for the peer's.
const CLOSE_DRAIN: Duration = Duration::from_secs(5);
/// Events written between two flushes at most.
const MAX_BURST: usize = 256;
/// A frame that cannot be written in this long means a dead or stuck peer.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// Settings of the WebSocket endpoint.
#[derive(Debug, Clone, Copy)]
pub struct WsSettings {
    /// Largest inbound frame or message, in bytes.
    pub max_frame_bytes: usize,
    /// How often the server pings; a peer silent for two intervals is dropped.
    pub ping_interval: Duration,
    /// Sustained client operations per second (bursts up to twice that).
    pub ops_per_second: f64,
}

pub async fn ws(
    State(state): State<AppState>,
    ReadSession(session, principal): ReadSession,
    query: QueryParams,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let start = StartAt::from_request(&query, None)?;
    let upgrade = upgrade.map_err(|e| {
        ApiError::invalid_request(format!("this endpoint needs a WebSocket upgrade: {e}"))
    })?;
    let guard = state.connections.open(&session)?;
    // Opening the WebSocket creates the session; hello shows it as of now.
    let (feed, hello) = EventFeed::open(&state.engine, &session, start, IfMissing::Create).await?;
    let settings = state.ws;
    let engine = state.engine.clone();
    Ok(upgrade
        .max_message_size(settings.max_frame_bytes)
        .max_frame_size(settings.max_frame_bytes)
        // tungstenite's default 128 KiB read buffer per connection would dominate the memory
        // of idle connections; client frames are small ops, and the buffer grows if needed.
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_write_buffer_size(MAX_WRITE_BUFFER)
        .on_upgrade(move |socket| async move {
            Connection {
                engine,
                session,
                settings,
                caller: principal,
                _guard: guard,
            }
            .run(socket, hello, feed)
            .await;
        })
        .into_response())
}

struct Connection {
    engine: Engine,
    session: SessionId,
    settings: WsSettings,
    /// What its credentials allow (a `read` token: only `ping`), until when (a token's
    /// expiry closes the connection with `4001`); its operations draw from the bucket of the
    /// caller's key.
    caller: Principal,
    _guard: ConnectionGuard,
}

/// The close (RFC 6455 §7.4.1) owed to a peer whose frame could not be read: `1009` for a
/// frame past the size limit, `1007` for text that is not UTF-8, `1002` for any other
/// protocol violation (unmasked frame, reserved opcode or bits, oversized control frame).
/// A transport error owes nothing: the peer is gone.
fn close_for_read_error(error: &axum::BoxError) -> Option<(u16, String)> {
    use tokio_tungstenite::tungstenite::Error;
    match error.downcast_ref::<Error>()? {
        Error::Capacity(_) => Some((1009, "frame too large".into())),
        Error::Utf8(_) => Some((1007, "text frame is not valid UTF-8".into())),
        Error::Protocol(_) => Some((1002, "protocol error".into())),
        _ => None,
    }
}

/// Why the writer loop ended, and how to close.
enum Ending {
    Close(u16, String),
    /// The peer closed: answer with the close frame echoing its code (RFC 6455 §5.5.1), which
    /// the WebSocket layer queued when it read the peer's, then end.
    Answer,
    /// The peer is gone or stuck: drop the TCP connection without a close handshake.
    Drop,
}

impl Connection {
    /// The connection, as one task: it writes hello, the replay, live events, replies and
    /// pings, and reads the client's frames, running their operations one at a time (while
    /// one runs, the next frame waits in the socket; events keep flowing meanwhile).
    async fn run(self, mut socket: WebSocket, hello: Session, mut feed: EventFeed) {
        let expires = self.caller.expires_at();
        let mut reader = OpReader {
            ops: Ops {
                engine: self.engine.clone(),
                session: self.session.clone(),
            },
            bucket: Bucket::new(self.settings.ops_per_second),
            caller: self.caller,
        };
        let mut op: Option<Pin<Box<dyn Future<Output = String> + Send>>> = None;
        let mut heard = Instant::now();
        let hello = json!({"kind": "hello", "session": hello}).to_string();
        let stopping = self.engine.stopping();
        let mut ping = tokio::time::interval(self.settings.ping_interval);
        ping.tick().await;
        let expiry = async {
            match expires {
                Some(at) => tokio::time::sleep_until(deadline(at)).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(expiry);
        let ending = 'connection: {
            if send(&mut socket, Message::Text(hello.into()))
                .await
                .is_err()
            {
                break 'connection Ending::Drop;
            }
            loop {
                tokio::select! {
                    biased;
                    _ = stopping.cancelled() => {
                        break 'connection Ending::Close(1001, "server shutting down".into());
                    }
                    _ = &mut expiry => {
                        break 'connection Ending::Close(4001, "token expired".into());
                    }
                    reply = async { op.as_mut().expect("guarded").await }, if op.is_some() => {
                        op = None;
                        if send(&mut socket, Message::Text(reply.into())).await.is_err() {
                            break 'connection Ending::Drop;
                        }
                    }
                    message = socket.next(), if op.is_none() => {
                        let message = match message {
                            Some(Ok(message)) => message,
                            Some(Err(e)) => match close_for_read_error(&e.into_inner()) {
                                Some((code, reason)) => {
                                    break 'connection Ending::Close(code, reason);
                                }
                                // The peer is gone.
                                None => break 'connection Ending::Drop,
                            },
                            // The stream ended without a close frame: the peer is gone.
                            None => break 'connection Ending::Drop,
                        };
                        heard = Instant::now();
                        let reply = match message {
                            Message::Text(text) => match reader.handle(text.as_str()) {
                                Handled::Now(reply) => reply,
                                Handled::Later(operation) => {
                                    op = Some(operation);
                                    continue;
                                }
                            },
                            Message::Binary(_) => error_reply(
                                Value::Null,
                                &ApiError::invalid_request(
                                    "binary frames are not supported; send JSON text",
                                ),
                            ),
                            Message::Close(_) => break 'connection Ending::Answer,
                            Message::Ping(_) | Message::Pong(_) => continue,
                        };
                        if send(&mut socket, Message::Text(reply.into())).await.is_err() {
                            break 'connection Ending::Drop;
                        }
                    }
                    item = feed.next() => match item {
                        Ok(FeedItem::Event(event)) => match write_burst(&mut socket, &mut feed, event).await {
                            Err(()) => break 'connection Ending::Drop,
                            Ok(Burst::Ended(ending)) => break 'connection ending,
                            // More may be waiting: let every other task (another
                            // connection, another tenant's request) run before the next
                            // burst, so one busy stream cannot hold a worker thread.
                            Ok(Burst::Full) => tokio::task::yield_now().await,
                            Ok(Burst::Drained) => {}
                        },
                        Ok(FeedItem::Lagged { last_sent }) => {
                            break 'connection Ending::Close(1013, format!("after={last_sent}"));
                        }
                        Ok(FeedItem::Closed) => {
                            break 'connection Ending::Close(1001, "server shutting down".into());
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "WebSocket replay failed");
                            break 'connection Ending::Close(1011, "replay failed".into());
                        }
                    },
                    _ = ping.tick() => {
                        if heard.elapsed() > self.settings.ping_interval * 2 {
                            break 'connection Ending::Drop;
                        }
                        if send(&mut socket, Message::Ping(Default::default())).await.is_err() {
                            break 'connection Ending::Drop;
                        }
                    }
                }
            }
        };
        // An operation still in flight is dropped: its reply has nowhere to go (what it
        // committed stays committed).
        drop(op);
        if let Ending::Answer = ending {
            // Writing the queued answer ends the connection: the flush reports it as closed.
            let _ = within_send_timeout(socket.flush()).await;
        }
        if let Ending::Close(code, reason) = ending {
            let frame = CloseFrame {
                code,
                reason: Utf8Bytes::from(reason),
            };
            if send(&mut socket, Message::Close(Some(frame))).await.is_ok() {
                // Closing a socket with unread input makes the kernel reset it and discard
                // what is still in flight (the close frame included): read until the peer's
                // close, or give up after a while.
                let drain = async {
                    while let Some(Ok(message)) = socket.next().await {
                        if matches!(message, Message::Close(_)) {
                            break;
                        }
                    }
                };
                let _ = tokio::time::timeout(CLOSE_DRAIN, drain).await;
            }
        }
    }
}

/// A socket operation bounded by [`SEND_TIMEOUT`]; any failure or timeout is `Err`.
async fn within_send_timeout<T, E>(operation: impl Future<Output = Result<T, E>>) -> Result<T, ()> {
    match tokio::time::timeout(SEND_TIMEOUT, operation).await {
        Ok(Ok(value)) => Ok(value),
        _ => Err(()),
    }
}

async fn send<S: Sink<Message> + Unpin>(sink: &mut S, message: Message) -> Result<(), ()> {
    within_send_timeout(sink.send(message)).await
}

/// How a burst of events ended.
enum Burst {
    /// Every event at hand was written.
    Drained,
    /// [`MAX_BURST`] events were written; more may be at hand.
    Full,
    /// The connection ends after this burst (a lag, the session's deletion).
    Ended(Ending),
}

/// Writes `first` and the events at hand behind it (up to [`MAX_BURST`]), then flushes once:
/// one syscall for a burst instead of one per event. The whole burst is bounded by
/// [`SEND_TIMEOUT`] — one timer per burst, not one per frame.
async fn write_burst<S: Sink<Message> + Unpin>(
    sink: &mut S,
    feed: &mut EventFeed,
    first: std::sync::Arc<crate::model::Event>,
) -> Result<Burst, ()> {
    within_send_timeout(async {
        let mut event = first;
        let mut written = 0;
        let burst = loop {
            sink.feed(Message::Text(event_frame(&event.envelope).into()))
                .await?;
            if event.kind == EventType::SessionDeleted {
                break Burst::Ended(Ending::Close(1000, "session deleted".into()));
            }
            written += 1;
            if written == MAX_BURST {
                break Burst::Full;
            }
            match feed.try_next() {
                Some(FeedItem::Event(next)) => event = next,
                Some(FeedItem::Lagged { last_sent }) => {
                    break Burst::Ended(Ending::Close(1013, format!("after={last_sent}")));
                }
                Some(FeedItem::Closed) | None => break Burst::Drained,
            }
        };
        sink.flush().await?;
        Ok::<_, S::Error>(burst)
    })
    .await
}

/// `{"kind":"event", ...envelope}` without re-serialising the envelope.
fn event_frame(envelope: &str) -> String {
    let mut frame = String::with_capacity(envelope.len() + 16);
    frame.push_str("{\"kind\":\"event\",");
    frame.push_str(envelope.strip_prefix('{').unwrap_or(envelope));
    frame
}

/// A client frame's operation (its `ref` aside), parsed once.
#[derive(Debug, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
enum Op {
    Ping {},
    Message {
        content: String,
        #[serde(default)]
        policy: Option<Policy>,
        #[serde(default)]
        metadata: Option<JsonObject>,
        #[serde(default)]
        idempotency_key: Option<String>,
    },
    Cancel {
        #[serde(default)]
        interaction_id: Option<String>,
    },
    Clear {},
    /// Neither: the context as it is; both: the patch applies to the new value, in one write.
    Context {
        #[serde(default)]
        set: Option<JsonObject>,
        #[serde(default)]
        patch: Option<JsonObject>,
    },
    Answer {
        interaction_id: String,
        request_id: String,
        answer: Value,
    },
}

impl Op {
    /// The operations a connection may send, the writing ones after `ping`.
    const NAMES: [&str; 6] = ["ping", "message", "cancel", "clear", "context", "answer"];
}

/// Checks client frames as they come (rate, shape, scope) and turns each into its reply or
/// the operation that will give it; the connection runs one operation at a time.
struct OpReader {
    ops: Ops,
    /// The connection's own rate.
    bucket: Bucket,
    /// The key's rate (the minting key's, for a token), shared with its HTTP requests, and
    /// the scope.
    caller: Principal,
}

/// What an operation needs, owned, so the operation in flight borrows nothing of the
/// connection.
#[derive(Clone)]
struct Ops {
    engine: Engine,
    session: SessionId,
}

/// The reply to one text frame.
enum Handled {
    /// Known at once (a pong, a refusal).
    Now(String),
    /// After this operation (boxed: an idle connection holds no room for one).
    Later(Pin<Box<dyn Future<Output = String> + Send>>),
}

fn error_reply(reference: Value, error: &ApiError) -> String {
    let mut body = error.body();
    let error = body
        .get_mut("error")
        .map(Value::take)
        .unwrap_or(Value::Null);
    json!({"kind": "reply", "ref": reference, "ok": false, "error": error}).to_string()
}

fn ok_reply(reference: Value, data: Value) -> String {
    json!({"kind": "reply", "ref": reference, "ok": true, "data": data}).to_string()
}

/// Parses the operation through the text, not `from_value`: that detour rounds some
/// numbers (they are kept as written, API.md).
fn parse(fields: serde_json::Map<String, Value>) -> Result<Op, ApiError> {
    let text = serde_json::to_string(&fields).map_err(|_| ApiError::internal())?;
    serde_json::from_str(&text)
        .map_err(|e| ApiError::invalid_request(format!("invalid operation: {e}")))
}

impl OpReader {
    /// The frame to send back for one text frame (a reply or a pong), or the operation that
    /// will give it.
    fn handle(&mut self, text: &str) -> Handled {
        match self.check(text) {
            Ok((reference, op)) => {
                let ops = self.ops.clone();
                Handled::Later(Box::pin(async move {
                    match ops.run(op).await {
                        Ok(data) => ok_reply(reference, data),
                        Err(e) => error_reply(reference, &e),
                    }
                }))
            }
            Err(reply) => Handled::Now(reply),
        }
    }

    /// A frame's ref and operation, when it is one to run; `Err`: the reply to send at once
    /// (a pong, or why the frame is refused).
    fn check(&mut self, text: &str) -> Result<(Value, Op), String> {
        // Every text frame counts, malformed ones included: against the connection's rate,
        // then against its key's.
        let limited = match self.bucket.take() {
            Err(_) => Some(ApiError::new(
                axum::http::StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "too many operations on this connection; slow down",
            )),
            Ok(()) => self.caller.charge().err(),
        };
        if let Some(error) = limited {
            let reference = serde_json::from_str::<Value>(text)
                .ok()
                .and_then(|frame| frame.get("ref").cloned())
                .filter(|r| r.is_string() || r.is_number())
                .unwrap_or(Value::Null);
            return Err(error_reply(reference, &error));
        }
        if let Err(e) = super::extract::numbers_kept(text.as_bytes()) {
            return Err(error_reply(Value::Null, &e));
        }
        let mut fields = match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(fields)) => fields,
            Ok(_) => {
                return Err(error_reply(
                    Value::Null,
                    &ApiError::invalid_request("a frame must be a JSON object with an op"),
                ));
            }
            Err(e) => {
                return Err(error_reply(
                    Value::Null,
                    &ApiError::invalid_request(format!("malformed JSON: {e}")),
                ));
            }
        };
        let reference = match fields.remove("ref") {
            None | Some(Value::Null) => Value::Null,
            Some(r @ (Value::String(_) | Value::Number(_))) => r,
            Some(_) => {
                return Err(error_reply(
                    Value::Null,
                    &ApiError::invalid_request("ref must be a string or a number"),
                ));
            }
        };
        let name = match fields.get("op") {
            Some(Value::String(name)) => name.as_str(),
            _ => {
                return Err(error_reply(
                    reference,
                    &ApiError::invalid_request("every frame needs an op (a string)"),
                ));
            }
        };
        // The scope before the fields: a read token learns it cannot write, whatever it sent.
        match Op::NAMES.iter().position(|known| *known == name) {
            None => {
                return Err(error_reply(
                    reference,
                    &ApiError::invalid_request(format!(
                        "unknown op {name:?}; expected message, cancel, clear, context, answer \
                         or ping"
                    )),
                ));
            }
            Some(writes) if writes > 0 && !self.caller.can_write() => {
                return Err(error_reply(
                    reference,
                    &ApiError::forbidden(
                        "this session token can only read (scope read): it can watch the \
                         session and ping, not send, cancel, clear, answer or change the context",
                    ),
                ));
            }
            Some(_) => {}
        }
        match parse(fields) {
            Ok(Op::Ping {}) => Err(json!({"kind": "pong", "ref": reference}).to_string()),
            Ok(op) => Ok((reference, op)),
            Err(e) => Err(error_reply(reference, &e)),
        }
    }
}

impl Ops {
    async fn run(&self, op: Op) -> Result<Value, ApiError> {
        match op {
            // Answered at once by `check`, never run.
            Op::Ping {} => Ok(Value::Null),
            Op::Message {
                content,
                policy,
                metadata,
                idempotency_key,
            } => {
                self.message(content, policy, metadata, idempotency_key)
                    .await
            }
            Op::Cancel { interaction_id } => self.cancel(interaction_id).await,
            Op::Clear {} => {
                let cleared = self.engine.clear(self.session.clone()).await?;
                Ok(json!({"epoch": cleared.epoch, "cancelled": cleared.cancelled}))
            }
            Op::Context { set, patch } => self.context(set, patch).await,
            Op::Answer {
                interaction_id,
                request_id,
                answer,
            } => self.answer(interaction_id, request_id, answer).await,
        }
    }

    async fn message(
        &self,
        content: String,
        policy: Option<Policy>,
        metadata: Option<JsonObject>,
        idempotency_key: Option<String>,
    ) -> Result<Value, ApiError> {
        validate_content(&content)?;
        // A `/clear` ignores the key: what is wrong with it goes to the rules.
        let (key, invalid) = match idempotency_key {
            Some(key) => match validate_idempotency_key(&key) {
                Ok(()) => (Some(key), None),
                Err(e) => (None, Some(e.0)),
            },
            None => (None, None),
        };
        let outcome = self
            .engine
            .send_message(MessageRequest {
                session: self.session.clone(),
                content,
                policy: policy.unwrap_or_default(),
                metadata: metadata.unwrap_or_default(),
                idempotency_key: key,
                wait: false,
                invalid,
            })
            .await?;
        Ok(match outcome {
            MessageOutcome::Cleared(cleared) => {
                json!({"epoch": cleared.epoch, "cancelled": cleared.cancelled})
            }
            MessageOutcome::Accepted(sent) => json!(sent.accepted.interaction),
        })
    }

    async fn cancel(&self, interaction_id: Option<String>) -> Result<Value, ApiError> {
        let target = match interaction_id {
            Some(raw) => Some(
                InteractionId::parse(&raw)
                    .map_err(|_| ApiError::not_found("interaction not found in this session"))?,
            ),
            None => None,
        };
        let cancelled = self.engine.cancel(self.session.clone(), target).await?;
        Ok(json!({ "cancelled": cancelled }))
    }

    async fn answer(
        &self,
        interaction_id: String,
        request_id: String,
        answer: Value,
    ) -> Result<Value, ApiError> {
        let id = InteractionId::parse(&interaction_id)
            .map_err(|_| ApiError::not_found("interaction not found in this session"))?;
        let interaction = self
            .engine
            .answer(self.session.clone(), id, request_id, answer)
            .await?;
        serde_json::to_value(interaction).map_err(|_| ApiError::internal())
    }

    async fn context(
        &self,
        set: Option<JsonObject>,
        patch: Option<JsonObject>,
    ) -> Result<Value, ApiError> {
        let context = match (set, patch) {
            (None, None) => self.engine.get_context(self.session.clone()).await?,
            (set, patch) => {
                self.engine
                    .update_context(self.session.clone(), set, patch)
                    .await?
            }
        };
        Ok(Value::Object(context))
    }
}
