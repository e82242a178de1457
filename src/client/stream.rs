//! A WebSocket client of one session that survives dropped connections: it reconnects with
//! `after=<last seq seen>`, so no event is lost and none is yielded twice.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::{Remote, ServerError, Unreachable, session_path, tls};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What the server sent.
#[derive(Debug, Clone)]
pub enum Frame {
    /// An event envelope (`kind` removed).
    Event(Value),
    /// The reply to the operation with this `ref`.
    Reply(Value),
    Pong(Value),
    /// The session was deleted; the server closed the connection for good.
    Deleted,
}

/// A session's WebSocket with automatic resume.
pub struct SessionSocket {
    /// The server's URL as given, for messages.
    server: String,
    /// Credentials, sent again on every reconnection.
    headers: reqwest::header::HeaderMap,
    /// The TLS configuration of `wss://` (the roots trusted).
    tls: Arc<rustls::ClientConfig>,
    ws_base: String,
    session: String,
    socket: Socket,
    /// The session as `hello` showed it on the first connection.
    pub hello: Value,
    last_seq: i64,
}

fn ws_base(server: &str) -> anyhow::Result<String> {
    let server = server.trim_end_matches('/');
    if let Some(rest) = server.strip_prefix("http://") {
        Ok(format!("ws://{rest}"))
    } else if let Some(rest) = server.strip_prefix("https://") {
        Ok(format!("wss://{rest}"))
    } else if server.starts_with("ws://") || server.starts_with("wss://") {
        Ok(server.to_string())
    } else {
        bail!("the server URL must start with http:// or https:// (got {server})")
    }
}

async fn connect(
    server: &str,
    headers: &reqwest::header::HeaderMap,
    tls_config: &Arc<rustls::ClientConfig>,
    ws_base: &str,
    session: &str,
    after: Option<i64>,
) -> anyhow::Result<(Socket, Value)> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut url = format!("{ws_base}{}", session_path(session, "/ws"));
    if let Some(after) = after {
        url.push_str(&format!("?after={after}"));
    }
    let mut request = url
        .as_str()
        .into_client_request()
        .with_context(|| format!("connecting to {url}"))?;
    request.headers_mut().extend(headers.clone());
    let connector = tokio_tungstenite::Connector::Rustls(tls_config.clone());
    let connected =
        tokio_tungstenite::connect_async_tls_with_config(request, None, false, Some(connector))
            .await;
    let (mut socket, _) = match connected {
        Ok(connected) => connected,
        Err(e) => return Err(connect_error(server, &url, e)),
    };
    loop {
        let message = tokio::time::timeout(Duration::from_secs(30), socket.next())
            .await
            .context("no hello from the server")?
            .context("the server closed before hello")??;
        if let Message::Text(text) = message {
            let hello: Value = serde_json::from_str(&text).context("hello is not JSON")?;
            if hello["kind"] != "hello" {
                bail!("expected hello first, got {hello}");
            }
            return Ok((socket, hello));
        }
    }
}

/// A failed WebSocket connection as the CLI says it: the server's error answer, a refused
/// certificate in words, or an unreachable server.
fn connect_error(server: &str, url: &str, error: WsError) -> anyhow::Error {
    if let Some(reason) = tls::describe(&error, tls::host_of(server)) {
        return tls::Untrusted {
            server: server.to_string(),
            reason,
        }
        .into();
    }
    match error {
        WsError::Http(response) => {
            let body = response.body().as_deref().unwrap_or_default();
            ServerError::from_http(response.status(), body).into()
        }
        e @ WsError::Io(_) => Unreachable::new(server, &e).into(),
        e => anyhow::Error::new(e).context(format!("connecting to {url}")),
    }
}

impl SessionSocket {
    /// Connects; with `after`, the stored events after that seq are replayed first.
    pub async fn open(remote: &Remote, session: &str, after: Option<i64>) -> anyhow::Result<Self> {
        let server = remote.server.as_str();
        let ws_base = ws_base(server)?;
        let headers = remote.headers()?;
        let tls = tls::client_config(&remote.extra_roots()?)?;
        let (socket, hello) = connect(
            server.trim_end_matches('/'),
            &headers,
            &tls,
            &ws_base,
            session,
            after,
        )
        .await?;
        let last_seq = after.unwrap_or_else(|| hello["session"]["last_seq"].as_i64().unwrap_or(0));
        Ok(Self {
            server: server.trim_end_matches('/').to_string(),
            headers,
            tls,
            ws_base,
            session: session.to_string(),
            socket,
            hello,
            last_seq,
        })
    }

    /// The seq of the last event yielded.
    pub fn last_seq(&self) -> i64 {
        self.last_seq
    }

    /// Sends one operation (`{"op": …, "ref": …, …}`).
    pub async fn send(&mut self, op: Value) -> anyhow::Result<()> {
        self.socket
            .send(Message::Text(op.to_string().into()))
            .await
            .context("sending to the server")
    }

    /// Sends a `message` op with this `ref`.
    pub async fn send_message(
        &mut self,
        content: &str,
        policy: &str,
        reference: i64,
    ) -> anyhow::Result<()> {
        self.send(json!({"op": "message", "content": content, "policy": policy, "ref": reference}))
            .await
    }

    /// The next frame. A dropped connection (or a close for being too slow) is reconnected
    /// with `after`, transparently; replies to operations sent on a lost connection are lost
    /// with it.
    pub async fn next(&mut self) -> anyhow::Result<Frame> {
        let mut attempts = 0u32;
        loop {
            match self.socket.next().await {
                Some(Ok(Message::Text(text))) => {
                    let mut frame: Value =
                        serde_json::from_str(&text).context("a frame is not JSON")?;
                    let kind = frame["kind"].as_str().unwrap_or_default().to_string();
                    match kind.as_str() {
                        "event" => {
                            let seq = frame["seq"].as_i64().unwrap_or(0);
                            if seq <= self.last_seq {
                                continue;
                            }
                            self.last_seq = seq;
                            if let Some(fields) = frame.as_object_mut() {
                                fields.remove("kind");
                            }
                            return Ok(Frame::Event(frame));
                        }
                        "reply" => return Ok(Frame::Reply(frame)),
                        "pong" => return Ok(Frame::Pong(frame)),
                        _ => continue,
                    }
                }
                Some(Ok(Message::Close(Some(close)))) if close.code == CloseCode::Normal => {
                    if close.reason.contains("deleted") {
                        return Ok(Frame::Deleted);
                    }
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {}
                Some(Ok(_)) => continue,
            }
            // Lost, closed for lagging (1013), or the server restarted: resume after what we saw.
            attempts += 1;
            if attempts > 1 {
                tokio::time::sleep(Duration::from_millis((200 * u64::from(attempts)).min(3000)))
                    .await;
            }
            match connect(
                &self.server,
                &self.headers,
                &self.tls,
                &self.ws_base,
                &self.session,
                Some(self.last_seq),
            )
            .await
            {
                Ok((socket, _)) => self.socket = socket,
                Err(e) if attempts < 20 => {
                    tracing::debug!(error = %e, "reconnecting");
                }
                Err(e) => return Err(e.context("the connection was lost and could not be resumed")),
            }
        }
    }

    /// Closes the connection politely.
    pub async fn close(mut self) {
        let _ = self.socket.close(None).await;
    }
}
