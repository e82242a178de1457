//! Clients of the live streams for black-box tests: a WebSocket client (connect, read the next
//! frame as JSON with a timeout, send ops, collect events), an SSE client with its own line
//! parser, and comparisons of what a client received with the stored event log.
//!
//! Every read has a timeout ([`TIMEOUT`] unless told otherwise) and panics with what it was
//! waiting for when it runs out.

use std::collections::VecDeque;
use std::pin::Pin;
use std::time::Duration;

use futures_util::{SinkExt, Stream, StreamExt};
use reqwest::StatusCode;
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::{TIMEOUT, TestServer};

pub type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// `ws://…/v1/sessions/{session}/ws[?query]`.
pub fn ws_url(server: &TestServer, session: &str, query: &str) -> String {
    let base = server
        .url
        .strip_prefix("http://")
        .expect("the test server URL is http://");
    if query.is_empty() {
        format!("ws://{base}/v1/sessions/{session}/ws")
    } else {
        format!("ws://{base}/v1/sessions/{session}/ws?{query}")
    }
}

/// What the server sent on a WebSocket.
#[derive(Debug, Clone, PartialEq)]
pub enum WsFrame {
    /// A text frame, parsed as JSON.
    Json(Value),
    /// A close frame: its code and reason (`None`: a close frame without a payload).
    Close(Option<(u16, String)>),
    /// The connection ended without a close frame, or failed; the text says how.
    Ended(String),
    /// Anything that is not a JSON text frame (a binary frame, text that is not JSON).
    Other(String),
}

/// The frame a received message is (`None` for control frames: pings and pongs).
pub fn frame_of(message: Message) -> Option<WsFrame> {
    Some(match message {
        Message::Text(text) => match serde_json::from_str(text.as_str()) {
            Ok(value) => WsFrame::Json(value),
            Err(e) => WsFrame::Other(format!("non-JSON text ({e}): {}", text.as_str())),
        },
        Message::Binary(bytes) => WsFrame::Other(format!("binary frame: {bytes:?}")),
        Message::Close(frame) => {
            WsFrame::Close(frame.map(|f| (u16::from(f.code), f.reason.as_str().to_string())))
        }
        Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => return None,
    })
}

/// An upgrade the server refused: the HTTP status and the JSON body.
#[derive(Debug, Clone)]
pub struct Refused {
    pub status: StatusCode,
    pub body: Value,
}

/// A WebSocket client of one session.
pub struct Ws {
    pub socket: Socket,
    /// The `hello` frame (`{"kind":"hello","session":…}`).
    pub hello: Value,
    next_ref: u64,
}

/// The event envelope of an `{"kind":"event", …}` frame (the frame without `kind`).
pub fn envelope_of(frame: &Value) -> Value {
    let mut envelope = frame.clone();
    if let Some(object) = envelope.as_object_mut() {
        object.remove("kind");
    }
    envelope
}

/// Opens the raw WebSocket, or returns the refusal.
pub async fn ws_open(url: &str) -> Result<Socket, Refused> {
    ws_open_with(url, &[]).await
}

/// [`ws_open`] with extra request headers (e.g. `Authorization`).
pub async fn ws_open_with(url: &str, headers: &[(&str, &str)]) -> Result<Socket, Refused> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = url.into_client_request().expect("a WebSocket URL");
    for (name, value) in headers {
        request.headers_mut().insert(
            reqwest::header::HeaderName::from_bytes(name.as_bytes()).expect("header name"),
            value.parse().expect("header value"),
        );
    }
    let connected = tokio::time::timeout(TIMEOUT, tokio_tungstenite::connect_async(request))
        .await
        .unwrap_or_else(|_| panic!("WebSocket connect to {url} timed out"));
    match connected {
        Ok((socket, _response)) => Ok(socket),
        Err(tungstenite::Error::Http(response)) => {
            let status = StatusCode::from_u16(response.status().as_u16()).expect("status");
            let bytes = response.body().clone().unwrap_or_default();
            let body = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                panic!(
                    "refused upgrade {url} ({status}) has no JSON body: {e}: {:?}",
                    String::from_utf8_lossy(&bytes)
                )
            });
            Err(Refused { status, body })
        }
        Err(e) => panic!("WebSocket connect to {url} failed: {e}"),
    }
}

impl Ws {
    /// Connects to `session` with `query` (e.g. `after=3`, `replay=true`, or empty) and reads
    /// `hello`, which must be the first frame.
    pub async fn connect(server: &TestServer, session: &str, query: &str) -> Ws {
        match Self::try_connect(server, session, query).await {
            Ok(ws) => ws,
            Err(refused) => panic!(
                "WebSocket upgrade of {session}?{query} refused: {} {}",
                refused.status, refused.body
            ),
        }
    }

    /// Like [`Ws::connect`], but a refused upgrade is an `Err`.
    pub async fn try_connect(
        server: &TestServer,
        session: &str,
        query: &str,
    ) -> Result<Ws, Refused> {
        let url = ws_url(server, session, query);
        let socket = ws_open(&url).await?;
        Ok(Self::from_socket(socket).await)
    }

    /// Wraps an upgraded socket and reads `hello`, which must be the first frame.
    pub async fn from_socket(socket: Socket) -> Ws {
        let mut ws = Ws {
            socket,
            hello: Value::Null,
            next_ref: 0,
        };
        let hello = ws.next_json().await;
        assert_eq!(hello["kind"], "hello", "the first frame is hello: {hello}");
        assert!(
            hello["session"].is_object(),
            "hello carries the Session: {hello}"
        );
        ws.hello = hello;
        ws
    }

    /// `hello.session.last_seq`.
    pub fn hello_last_seq(&self) -> i64 {
        self.hello["session"]["last_seq"]
            .as_i64()
            .unwrap_or_else(|| panic!("hello.session.last_seq: {}", self.hello))
    }

    /// The next data frame (control frames are skipped), waiting at most `timeout`.
    /// `None` when nothing came in time.
    pub async fn next_frame_within(&mut self, timeout: Duration) -> Option<WsFrame> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let message = match tokio::time::timeout_at(deadline, self.socket.next()).await {
                Err(_) => return None,
                Ok(None) => return Some(WsFrame::Ended("stream ended".into())),
                Ok(Some(Err(e))) => return Some(WsFrame::Ended(format!("error: {e}"))),
                Ok(Some(Ok(message))) => message,
            };
            if let Some(frame) = frame_of(message) {
                return Some(frame);
            }
        }
    }

    /// The next data frame; panics after [`TIMEOUT`].
    pub async fn next_frame(&mut self) -> WsFrame {
        self.next_frame_within(TIMEOUT)
            .await
            .expect("a WebSocket frame in time")
    }

    /// The next frame, which must be JSON text.
    pub async fn next_json(&mut self) -> Value {
        match self.next_frame().await {
            WsFrame::Json(value) => value,
            other => panic!("expected a JSON frame, got {other:?}"),
        }
    }

    /// The next frame, which must be an event; returns its envelope.
    pub async fn next_event(&mut self) -> Value {
        let frame = self.next_json().await;
        assert_eq!(frame["kind"], "event", "expected an event frame: {frame}");
        envelope_of(&frame)
    }

    /// Reads event frames until `stop` is true for one (included); returns their envelopes.
    /// Any frame that is not an event fails the test.
    pub async fn events_until(&mut self, mut stop: impl FnMut(&Value) -> bool) -> Vec<Value> {
        let mut events = Vec::new();
        loop {
            let event = self.next_event().await;
            let done = stop(&event);
            events.push(event);
            if done {
                return events;
            }
        }
    }

    /// Reads events until one with `seq >= seq` (included).
    pub async fn events_through(&mut self, seq: i64) -> Vec<Value> {
        self.events_until(|e| seq_of(e) >= seq).await
    }

    pub async fn send_text(&mut self, text: impl Into<String>) {
        let text: String = text.into();
        tokio::time::timeout(TIMEOUT, self.socket.send(Message::text(text)))
            .await
            .expect("WebSocket send in time")
            .expect("WebSocket send");
    }

    pub async fn send_json(&mut self, value: &Value) {
        self.send_text(value.to_string()).await;
    }

    pub async fn send_binary(&mut self, bytes: Vec<u8>) {
        tokio::time::timeout(TIMEOUT, self.socket.send(Message::binary(bytes)))
            .await
            .expect("WebSocket send in time")
            .expect("WebSocket send");
    }

    /// A fresh numeric ref, unique on this connection.
    pub fn fresh_ref(&mut self) -> Value {
        self.next_ref += 1;
        Value::from(self.next_ref)
    }

    /// Sends `op` (its `ref` must be set) and reads until the reply or pong with that ref.
    /// Returns the reply and the envelopes of the events that came before it. Any other reply
    /// first fails the test (replies come in the order of the ops).
    pub async fn request(&mut self, op: &Value) -> (Value, Vec<Value>) {
        let reference = op["ref"].clone();
        self.send_json(op).await;
        self.reply_to(&reference).await
    }

    /// Reads until the reply or pong with `reference`; the events before it are returned too.
    pub async fn reply_to(&mut self, reference: &Value) -> (Value, Vec<Value>) {
        let mut events = Vec::new();
        loop {
            let frame = self.next_json().await;
            match frame["kind"].as_str() {
                Some("event") => events.push(envelope_of(&frame)),
                Some("reply" | "pong") => {
                    assert_eq!(
                        &frame["ref"], reference,
                        "a reply to another op came first: {frame}"
                    );
                    return (frame, events);
                }
                _ => panic!("unexpected frame while waiting for ref {reference}: {frame}"),
            }
        }
    }

    /// `ping` with a fresh ref; the pong must come (events before it are returned).
    pub async fn ping(&mut self) -> Vec<Value> {
        let reference = self.fresh_ref();
        let (pong, events) = self
            .request(&serde_json::json!({"op": "ping", "ref": reference}))
            .await;
        assert_eq!(pong["kind"], "pong", "{pong}");
        events
    }

    /// Reads until the server closes, skipping events; returns the close code and reason.
    /// Panics if the connection ends without a close frame or a non-event frame comes.
    pub async fn until_close(&mut self) -> (Vec<Value>, Option<(u16, String)>) {
        let mut events = Vec::new();
        loop {
            match self.next_frame().await {
                WsFrame::Json(frame) if frame["kind"] == "event" => {
                    events.push(envelope_of(&frame))
                }
                WsFrame::Close(close) => return (events, close),
                other => panic!("expected events then a close frame, got {other:?}"),
            }
        }
    }

    /// Closes with a close handshake (best effort, bounded).
    pub async fn close(mut self) {
        let _ = tokio::time::timeout(TIMEOUT, self.socket.close(None)).await;
        // Drain until the server's close (or the end).
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        while let Ok(Some(Ok(_))) = tokio::time::timeout_at(deadline, self.socket.next()).await {}
    }
}

/// Expects the upgrade of `session?query` to be refused; returns the refusal.
pub async fn ws_refused(server: &TestServer, session: &str, query: &str) -> Refused {
    match Ws::try_connect(server, session, query).await {
        Ok(ws) => panic!(
            "the upgrade of {session}?{query} was accepted (hello {})",
            ws.hello
        ),
        Err(refused) => refused,
    }
}

// ---------------------------------------------------------------------------------------------
// SSE

/// One dispatched SSE event (fields as sent; `data` lines joined with `\n`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SseMessage {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: String,
}

/// What the SSE parser yields.
#[derive(Debug, Clone, PartialEq)]
pub enum SseItem {
    Message(SseMessage),
    /// A comment line (`: text`), without the colon and one leading space.
    Comment(String),
}

/// An incremental `text/event-stream` parser: bytes in, complete items out. Lines end with
/// `\n` or `\r\n`; a blank line dispatches the event being built (if it has any field).
#[derive(Debug, Default)]
pub struct SseParser {
    buffer: Vec<u8>,
    current: SseMessage,
    has_data: bool,
    has_field: bool,
}

impl SseParser {
    pub fn push(&mut self, bytes: &[u8]) -> Vec<SseItem> {
        self.buffer.extend_from_slice(bytes);
        let mut items = Vec::new();
        let mut start = 0;
        while let Some(len) = self.buffer[start..].iter().position(|&b| b == b'\n') {
            let mut line = &self.buffer[start..start + len];
            start += len + 1;
            if line.last() == Some(&b'\r') {
                line = &line[..line.len() - 1];
            }
            let line = std::str::from_utf8(line)
                .expect("SSE lines are UTF-8")
                .to_string();
            if let Some(item) = self.line(&line) {
                items.push(item);
            }
        }
        self.buffer.drain(..start);
        items
    }

    fn line(&mut self, line: &str) -> Option<SseItem> {
        if line.is_empty() {
            if !self.has_field {
                return None;
            }
            let message = std::mem::take(&mut self.current);
            self.has_data = false;
            self.has_field = false;
            return Some(SseItem::Message(message));
        }
        if let Some(comment) = line.strip_prefix(':') {
            return Some(SseItem::Comment(
                comment.strip_prefix(' ').unwrap_or(comment).to_string(),
            ));
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        self.has_field = true;
        match field {
            "id" => self.current.id = Some(value.to_string()),
            "event" => self.current.event = Some(value.to_string()),
            "data" => {
                if self.has_data {
                    self.current.data.push('\n');
                }
                self.current.data.push_str(value);
                self.has_data = true;
            }
            // `retry` and unknown fields are ignored, as the SSE spec says.
            _ => {}
        }
        None
    }
}

type ByteStream = Pin<Box<dyn Stream<Item = reqwest::Result<Vec<u8>>> + Send>>;

/// An SSE client of one session.
pub struct Sse {
    stream: ByteStream,
    parser: SseParser,
    pending: VecDeque<SseItem>,
    ended: bool,
}

/// `GET /v1/sessions/{session}/events[?query]` with an optional `Last-Event-ID`.
pub async fn sse_request(
    server: &TestServer,
    session: &str,
    query: &str,
    last_event_id: Option<&str>,
) -> reqwest::Response {
    // A client of its own: no whole-request timeout on a stream, one connection per stream.
    let client = reqwest::Client::builder()
        .connect_timeout(TIMEOUT)
        .build()
        .expect("client");
    let mut url = format!("{}/v1/sessions/{session}/events", server.url);
    if !query.is_empty() {
        url.push('?');
        url.push_str(query);
    }
    let mut request = client.get(url);
    if let Some(id) = last_event_id {
        request = request.header("Last-Event-ID", id);
    }
    tokio::time::timeout(TIMEOUT, request.send())
        .await
        .expect("SSE response headers in time")
        .expect("SSE request reaches the server")
}

impl Sse {
    /// Connects and checks the answer is `200 text/event-stream`. Once this returns, the
    /// stream is subscribed: every later event will come.
    pub async fn connect(
        server: &TestServer,
        session: &str,
        query: &str,
        last_event_id: Option<&str>,
    ) -> Sse {
        match Self::try_connect(server, session, query, last_event_id).await {
            Ok(sse) => sse,
            Err(refused) => panic!(
                "SSE {session}?{query} refused: {} {}",
                refused.status, refused.body
            ),
        }
    }

    pub async fn try_connect(
        server: &TestServer,
        session: &str,
        query: &str,
        last_event_id: Option<&str>,
    ) -> Result<Sse, Refused> {
        let response = sse_request(server, session, query, last_event_id).await;
        let status = response.status();
        if status != StatusCode::OK {
            let bytes = tokio::time::timeout(TIMEOUT, response.bytes())
                .await
                .expect("error body in time")
                .expect("error body");
            let body = serde_json::from_slice(&bytes)
                .unwrap_or_else(|e| panic!("SSE refusal ({status}) is not JSON: {e}: {bytes:?}"));
            return Err(Refused { status, body });
        }
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        assert!(
            content_type.starts_with("text/event-stream"),
            "SSE content type: {content_type:?}"
        );
        let stream = response.bytes_stream().map(|r| r.map(|b| b.to_vec()));
        Ok(Sse {
            stream: Box::pin(stream),
            parser: SseParser::default(),
            pending: VecDeque::new(),
            ended: false,
        })
    }

    /// The next item, waiting at most `timeout`: `Some(None)` when the stream ended, `None`
    /// when nothing came in time.
    pub async fn next_item_within(&mut self, timeout: Duration) -> Option<Option<SseItem>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(item) = self.pending.pop_front() {
                return Some(Some(item));
            }
            if self.ended {
                return Some(None);
            }
            match tokio::time::timeout_at(deadline, self.stream.next()).await {
                Err(_) => return None,
                Ok(None) => self.ended = true,
                Ok(Some(Err(e))) => panic!("SSE stream failed: {e}"),
                Ok(Some(Ok(bytes))) => self.pending.extend(self.parser.push(&bytes)),
            }
        }
    }

    /// The next item; `None` when the stream ended; panics after [`TIMEOUT`].
    pub async fn next_item(&mut self) -> Option<SseItem> {
        self.next_item_within(TIMEOUT)
            .await
            .expect("an SSE item in time")
    }

    /// The next event's envelope, skipping comments; `None` when the stream ended. Checks
    /// that `id:` is the envelope's seq and `event:` its type.
    pub async fn next_event(&mut self) -> Option<Value> {
        loop {
            match self.next_item().await? {
                SseItem::Comment(_) => continue,
                SseItem::Message(message) => return Some(check_sse_message(&message)),
            }
        }
    }

    /// Like [`Sse::next_event`], but the stream must go on.
    pub async fn expect_event(&mut self) -> Value {
        self.next_event()
            .await
            .expect("the SSE stream goes on (ended early)")
    }

    /// Reads events until `stop` is true for one (included).
    pub async fn events_until(&mut self, mut stop: impl FnMut(&Value) -> bool) -> Vec<Value> {
        let mut events = Vec::new();
        loop {
            let event = self.expect_event().await;
            let done = stop(&event);
            events.push(event);
            if done {
                return events;
            }
        }
    }

    pub async fn events_through(&mut self, seq: i64) -> Vec<Value> {
        self.events_until(|e| seq_of(e) >= seq).await
    }
}

/// The envelope of an SSE message; `id:` must be its seq and `event:` its type.
pub fn check_sse_message(message: &SseMessage) -> Value {
    let envelope: Value = serde_json::from_str(&message.data)
        .unwrap_or_else(|e| panic!("SSE data is not JSON ({e}): {message:?}"));
    assert_eq!(
        message.id.as_deref(),
        Some(seq_of(&envelope).to_string().as_str()),
        "SSE id is the seq: {message:?}"
    );
    assert_eq!(
        message.event.as_deref(),
        envelope["type"].as_str(),
        "SSE event is the type: {message:?}"
    );
    envelope
}

// ---------------------------------------------------------------------------------------------
// Comparisons and metrics

pub fn seq_of(event: &Value) -> i64 {
    event["seq"]
        .as_i64()
        .unwrap_or_else(|| panic!("event without a seq: {event}"))
}

pub fn seqs(events: &[Value]) -> Vec<i64> {
    events.iter().map(seq_of).collect()
}

/// The stored events with `seq > after` (`stored` is in seq order).
pub fn stored_after(stored: &[Value], after: i64) -> &[Value] {
    &stored[stored.partition_point(|e| seq_of(e) <= after)..]
}

/// `received` must be exactly the stored events that follow `after`, from the first one on
/// (a prefix of them: no gap, no duplicate, same envelopes). `what` names the client.
pub fn assert_contiguous(what: &str, received: &[Value], stored: &[Value], after: i64) {
    let expected = stored_after(stored, after);
    assert!(
        received.len() <= expected.len(),
        "{what}: received {} events after {after}, only {} stored; received seqs {:?}",
        received.len(),
        expected.len(),
        seqs(received)
    );
    for (i, (got, want)) in received.iter().zip(expected).enumerate() {
        if got != want {
            panic!(
                "{what}: event #{i} after {after} differs from the stored log (gap, duplicate or \
                 other content)\n  received: {got}\n  stored:   {want}\n  received seqs \
                 {:?}..{:?}",
                received.first().map(seq_of),
                received.last().map(seq_of),
            );
        }
    }
}

/// `received` must be exactly the stored events with `seq > after` (all of them).
pub fn assert_exactly(what: &str, received: &[Value], stored: &[Value], after: i64) {
    assert_contiguous(what, received, stored, after);
    let expected = stored_after(stored, after);
    assert_eq!(
        received.len(),
        expected.len(),
        "{what}: missing events at the end: received seqs up to {:?}, stored up to {:?}",
        received.last().map(seq_of),
        expected.last().map(seq_of)
    );
}

/// The seq of the last stored event (0 when none).
pub fn last_stored_seq(server: &TestServer, session: &str) -> i64 {
    server
        .stored_events(session)
        .last()
        .map(seq_of)
        .unwrap_or(0)
}

/// The value of the gauge or counter `name` (e.g. `baton_connections`) in `/metrics`.
pub async fn metric(server: &TestServer, name: &str) -> u64 {
    let text = server
        .http
        .get(format!("{}/metrics", server.url))
        .send()
        .await
        .expect("metrics reach the server")
        .text()
        .await
        .expect("metrics body");
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (key, value) = line.split_once(' ')?;
            (key == name).then(|| value.trim().parse::<f64>().expect("a number") as u64)
        })
        .unwrap_or_else(|| panic!("no metric {name} in /metrics:\n{text}"))
}

/// Polls `/metrics` until `name` equals `want`; panics after [`TIMEOUT`].
pub async fn wait_metric(server: &TestServer, name: &str, want: u64) {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let value = metric(server, name).await;
        if value == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} is {value}, not {want}, after {TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls the session until its `last_seq` is at least `seq`; panics after [`TIMEOUT`].
pub async fn wait_last_seq(server: &TestServer, session: &str, seq: i64) {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let last = server.get(&format!("/v1/sessions/{session}")).await.body["last_seq"]
            .as_i64()
            .unwrap_or(0);
        if last >= seq {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "session {session} last_seq is {last}, not yet {seq}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The text of the `task.delta` events about `interaction`, concatenated.
pub fn deltas_text(events: &[Value], interaction: &str) -> String {
    events
        .iter()
        .filter(|e| e["type"] == "task.delta" && e["data"]["interaction_id"] == interaction)
        .map(|e| e["data"]["text"].as_str().expect("delta text"))
        .collect()
}
