//! A scriptable OpenAI-compatible endpoint for tests. It speaks hand-written HTTP/1.1 over a
//! tokio `TcpListener`, so a test decides every byte of an answer and exactly where a stream is
//! cut. It records each request (method, path, headers, JSON body), answers the next scripted
//! [`Reply`] (one request per connection, `Connection: close`), and counts the connections a
//! client closed while a stream was still being sent. Dropping it stops everything it started.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// Largest request head or body the mock reads.
const MAX_REQUEST_BYTES: usize = 1024 * 1024;

/// One request as the mock received it.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    /// Names in lower case, in the order received.
    pub headers: Vec<(String, String)>,
    /// The body as JSON (`Null` when it was not JSON).
    pub body: Value,
}

impl RecordedRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One step of a streamed (`200`, `text/event-stream`, chunked) answer.
#[derive(Debug, Clone)]
pub enum Step {
    /// These bytes, as one HTTP chunk, flushed at once.
    Send(Vec<u8>),
    Pause(Duration),
    /// Closes the connection at once, without ending the chunked body.
    Cut,
}

/// A scripted answer. A stream that was not cut ends its chunked body properly.
#[derive(Debug, Clone)]
pub enum Reply {
    Stream(Vec<Step>),
    Status {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    },
}

/// `data: {chunk}` with a content delta, and its blank line.
pub fn content_event(text: &str) -> String {
    chunk_event(json!({"role": "assistant", "content": text}), Value::Null)
}

/// The first chunk of a reply: the role, no content.
pub fn role_event() -> String {
    chunk_event(json!({"role": "assistant"}), Value::Null)
}

/// The last chunk of a reply: an empty delta and its `finish_reason`.
pub fn finish_event(reason: &str) -> String {
    chunk_event(json!({}), json!(reason))
}

pub const DONE_EVENT: &str = "data: [DONE]\n\n";

fn chunk_event(delta: Value, finish_reason: Value) -> String {
    let chunk = json!({
        "id": "chatcmpl-test",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": "test-model",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    });
    format!("data: {chunk}\n\n")
}

pub fn send(text: impl Into<String>) -> Step {
    Step::Send(text.into().into_bytes())
}

impl Reply {
    /// A complete reply streaming `pieces` as content deltas, then `stop` and `[DONE]`.
    pub fn text(pieces: &[&str]) -> Self {
        Self::slow(pieces, Duration::ZERO)
    }

    /// Like [`Reply::text`], pausing `pause` before each piece.
    pub fn slow(pieces: &[&str], pause: Duration) -> Self {
        let mut steps = vec![send(role_event())];
        for piece in pieces {
            if !pause.is_zero() {
                steps.push(Step::Pause(pause));
            }
            steps.push(send(content_event(piece)));
        }
        steps.push(send(finish_event("stop")));
        steps.push(send(DONE_EVENT));
        Self::Stream(steps)
    }

    /// An error answer with a JSON body.
    pub fn status(status: u16, body: impl Into<String>) -> Self {
        Self::Status {
            status,
            headers: Vec::new(),
            body: body.into(),
        }
    }

    /// An OpenAI-style error answer: `{"error": {"message", "type"}}`.
    pub fn openai_error(status: u16, message: &str) -> Self {
        let body = json!({"error": {"message": message, "type": "test_error", "code": null}});
        Self::status(status, body.to_string())
    }

    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        if let Self::Status { headers, .. } = &mut self {
            headers.push((name.into(), value.into()));
        }
        self
    }
}

#[derive(Default)]
struct Shared {
    replies: Mutex<VecDeque<Reply>>,
    requests: Mutex<Vec<RecordedRequest>>,
    closed_by_client: AtomicUsize,
}

pub struct MockOpenai {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    /// Owns the connection tasks too (a `JoinSet` inside): aborting it ends them all.
    accept_task: JoinHandle<()>,
}

impl MockOpenai {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind mock");
        let addr = listener.local_addr().expect("mock address");
        let shared = Arc::new(Shared::default());
        let accept_task = tokio::spawn(accept_loop(listener, Arc::clone(&shared)));
        Self {
            addr,
            shared,
            accept_task,
        }
    }

    /// The `base_url` to configure: `http://ADDR/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Queues the answer to a coming request (answers go out in the order queued; with none
    /// queued, a request gets a `500`).
    pub fn push(&self, reply: Reply) {
        self.shared
            .replies
            .lock()
            .expect("mock lock")
            .push_back(reply);
    }

    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.requests.lock().expect("mock lock").clone()
    }

    pub fn request_count(&self) -> usize {
        self.shared.requests.lock().expect("mock lock").len()
    }

    /// Whether a client closed a connection while its stream was still being sent, waiting
    /// up to `limit` for it.
    pub async fn wait_client_closed(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while self.shared.closed_by_client.load(Ordering::SeqCst) == 0 {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }
}

impl Drop for MockOpenai {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

/// A loopback port with nothing listening on it (bound once, then released).
pub async fn unused_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    listener.local_addr().expect("address").port()
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((socket, _)) = accepted else { continue };
                connections.spawn(serve_connection(socket, Arc::clone(&shared)));
            }
            Some(_) = connections.join_next() => {}
        }
    }
}

async fn serve_connection(mut socket: TcpStream, shared: Arc<Shared>) {
    let Some(request) = read_request(&mut socket).await else {
        return;
    };
    shared.requests.lock().expect("mock lock").push(request);
    let reply = shared
        .replies
        .lock()
        .expect("mock lock")
        .pop_front()
        .unwrap_or_else(|| {
            Reply::status(500, r#"{"error":{"message":"mock: no reply scripted"}}"#)
        });
    match reply {
        Reply::Status {
            status,
            headers,
            body,
        } => {
            let mut head = format!(
                "HTTP/1.1 {status} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n",
                reason(status),
                body.len()
            );
            for (name, value) in headers {
                head.push_str(&format!("{name}: {value}\r\n"));
            }
            head.push_str("\r\n");
            head.push_str(&body);
            let _ = socket.write_all(head.as_bytes()).await;
            let _ = socket.shutdown().await;
        }
        Reply::Stream(steps) => {
            if stream(&mut socket, steps).await.is_err() {
                shared.closed_by_client.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
}

/// Sends a streamed answer; `Err` when the client closed the connection first.
async fn stream(socket: &mut TcpStream, steps: Vec<Step>) -> Result<(), ()> {
    let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n";
    socket.write_all(head.as_bytes()).await.map_err(|_| ())?;
    for step in steps {
        match step {
            Step::Send(bytes) => {
                let mut chunk = format!("{:x}\r\n", bytes.len()).into_bytes();
                chunk.extend_from_slice(&bytes);
                chunk.extend_from_slice(b"\r\n");
                socket.write_all(&chunk).await.map_err(|_| ())?;
                socket.flush().await.map_err(|_| ())?;
            }
            Step::Pause(pause) => {
                // The client sends nothing more on this connection: a read ends only when it
                // closes it.
                let mut byte = [0u8; 1];
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = socket.read(&mut byte) => return Err(()),
                }
            }
            Step::Cut => return Ok(()),
        }
    }
    socket.write_all(b"0\r\n\r\n").await.map_err(|_| ())?;
    let _ = socket.shutdown().await;
    Ok(())
}

async fn read_request(socket: &mut TcpStream) -> Option<RecordedRequest> {
    let mut buffer = Vec::new();
    let head_end = loop {
        if let Some(i) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if buffer.len() > MAX_REQUEST_BYTES {
            return None;
        }
        let mut piece = [0u8; 4096];
        let n = socket.read(&mut piece).await.ok()?;
        if n == 0 {
            return None;
        }
        buffer.extend_from_slice(&piece[..n]);
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next()?.split(' ');
    let method = request_line.next()?.to_string();
    let path = request_line.next()?.to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    if length > MAX_REQUEST_BYTES {
        return None;
    }
    let mut body = buffer.split_off(head_end + 4);
    while body.len() < length {
        let mut piece = [0u8; 4096];
        let n = socket.read(&mut piece).await.ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&piece[..n]);
    }
    Some(RecordedRequest {
        method,
        path,
        headers,
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
    })
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    }
}
