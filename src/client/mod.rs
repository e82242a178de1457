//! Clients of the wire contract, used by the CLI and the benchmark: HTTP here, the
//! WebSocket protocol in [`stream`].

pub mod stream;
pub mod tls;

use std::time::Duration;

use anyhow::{Context, bail};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// The default server URL of the CLI.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:7420";

/// An error answer of the server, in the contract's shape. The CLI prints every one the same
/// way, `code: message`, whether it came over HTTP or as a WebSocket reply.
#[derive(Debug, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ServerError {
    /// The HTTP status; `None` for a WebSocket reply.
    pub status: Option<StatusCode>,
    pub code: String,
    pub message: String,
}

impl ServerError {
    /// The error of an HTTP answer: the contract's `{"error": {"code", "message"}}`, or, from
    /// something in front of the server that does not speak the contract, the status and body.
    pub fn from_http(status: StatusCode, body: &[u8]) -> Self {
        let json: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        match Self::from_error_object(&json["error"]) {
            Some(mut error) => {
                error.status = Some(status);
                error
            }
            None => {
                let text = String::from_utf8_lossy(body);
                let text = text.trim();
                Self {
                    status: Some(status),
                    code: format!("http_{}", status.as_u16()),
                    message: if text.is_empty() {
                        status.to_string()
                    } else {
                        text.chars().take(500).collect()
                    },
                }
            }
        }
    }

    /// The error of a failed WebSocket reply (`{"ok": false, "error": {...}}`).
    pub fn from_reply(reply: &Value) -> Self {
        Self::from_error_object(&reply["error"]).unwrap_or_else(|| Self {
            status: None,
            code: "unknown".into(),
            message: reply.to_string(),
        })
    }

    fn from_error_object(error: &Value) -> Option<Self> {
        Some(Self {
            status: None,
            code: error["code"].as_str()?.to_string(),
            message: error["message"].as_str().unwrap_or_default().to_string(),
        })
    }
}

/// The server could not be reached at all (refused, unresolvable, timed out).
#[derive(Debug, thiserror::Error)]
#[error("cannot reach the server at {server}: {reason}")]
pub struct Unreachable {
    pub server: String,
    /// The innermost cause (e.g. `Connection refused (os error 111)`): the layers above it
    /// only repeat the URL.
    pub reason: String,
}

impl Unreachable {
    pub fn new(server: &str, error: &(dyn std::error::Error + 'static)) -> Self {
        let mut root = error;
        while let Some(source) = root.source() {
            root = source;
        }
        Self {
            server: server.to_string(),
            reason: root.to_string(),
        }
    }
}

/// The path of a session's resource: the id is percent-encoded, so an id the server would
/// refuse reaches it as one path segment and is answered `invalid_session_id`.
pub fn session_path(session: &str, rest: &str) -> String {
    let mut path = String::from("/v1/sessions/");
    for byte in session.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~:".contains(&byte) {
            path.push(char::from(byte));
        } else {
            path.push_str(&format!("%{byte:02X}"));
        }
    }
    path.push_str(rest);
    path
}

/// A Baton server and the credentials to send it.
#[derive(Clone)]
pub struct Remote {
    /// `http://` or `https://` URL.
    pub server: String,
    /// An API key or a session token, sent as `Authorization: Bearer …`.
    pub key: Option<String>,
    /// The tenant an admin key acts on (`Baton-Tenant`).
    pub tenant: Option<String>,
    /// A PEM file of CA certificates to trust besides Mozilla's roots (`--cacert`).
    pub cacert: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Remote")
            .field("server", &self.server)
            .field("key", &self.key.as_ref().map(|_| "***"))
            .field("tenant", &self.tenant)
            .field("cacert", &self.cacert)
            .finish()
    }
}

impl Remote {
    /// A server without credentials.
    pub fn new(server: impl Into<String>) -> Self {
        Self {
            server: server.into(),
            key: None,
            tenant: None,
            cacert: None,
        }
    }

    /// The certificates of `--cacert`, read now; none without it.
    pub fn extra_roots(&self) -> anyhow::Result<Vec<rustls_pki_types::CertificateDer<'static>>> {
        match &self.cacert {
            Some(path) => tls::read_roots(path),
            None => Ok(Vec::new()),
        }
    }

    /// The headers every request to the server carries.
    pub fn headers(&self) -> anyhow::Result<reqwest::header::HeaderMap> {
        use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderValue};
        let mut headers = HeaderMap::new();
        if let Some(key) = self.key.as_deref().filter(|k| !k.is_empty()) {
            let mut value = HeaderValue::from_str(&format!("Bearer {}", key.trim()))
                .map_err(|_| anyhow::anyhow!("the key holds characters a header cannot carry"))?;
            value.set_sensitive(true);
            headers.insert(AUTHORIZATION, value);
        }
        if let Some(tenant) = self.tenant.as_deref().filter(|t| !t.is_empty()) {
            let value = HeaderValue::from_str(tenant)
                .map_err(|_| anyhow::anyhow!("--tenant {tenant:?} is not a tenant name"))?;
            headers.insert("baton-tenant", value);
        }
        Ok(headers)
    }
}

/// A client of one Baton server.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
}

impl Client {
    pub fn new(remote: &Remote) -> anyhow::Result<Self> {
        let server = remote.server.as_str();
        if !(server.starts_with("http://") || server.starts_with("https://")) {
            bail!("the server URL must start with http:// or https:// (got {server})");
        }
        let mut builder = reqwest::Client::builder();
        for root in remote.extra_roots()? {
            let certificate = reqwest::Certificate::from_der(&root)
                .context("a --cacert certificate cannot be used as a root")?;
            builder = builder.add_root_certificate(certificate);
        }
        let http = builder
            .default_headers(remote.headers()?)
            .connect_timeout(Duration::from_secs(5))
            .pool_max_idle_per_host(256)
            .build()
            .context("building the HTTP client")?;
        Ok(Self {
            http,
            base: server.trim_end_matches('/').to_string(),
        })
    }

    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The server's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Sends a request; a server that cannot be reached is [`Unreachable`].
    pub async fn send(
        &self,
        request: reqwest::RequestBuilder,
    ) -> anyhow::Result<reqwest::Response> {
        request.send().await.map_err(|e| {
            if let Some(reason) = tls::describe(&e, tls::host_of(&self.base)) {
                tls::Untrusted {
                    server: self.base.clone(),
                    reason,
                }
                .into()
            } else if e.is_connect() {
                Unreachable::new(&self.base, &e).into()
            } else {
                anyhow::Error::new(e).context(format!("talking to the server at {}", self.base))
            }
        })
    }

    /// `PUT /v1/sessions/{id}` with an agent.
    pub async fn put_session_agent(&self, session: &str, agent: &str) -> anyhow::Result<Value> {
        let request = self
            .http
            .put(self.url(&session_path(session, "")))
            .json(&json!({ "agent": agent }));
        Ok(Self::decode(self.send(request).await?).await?.1)
    }

    /// `GET /v1/sessions/{id}`.
    pub async fn get_session(&self, session: &str) -> anyhow::Result<Value> {
        let request = self.http.get(self.url(&session_path(session, "")));
        Ok(Self::decode(self.send(request).await?).await?.1)
    }

    /// The body of a successful answer; a failed one is a [`ServerError`].
    async fn decode(response: reqwest::Response) -> anyhow::Result<(StatusCode, Value)> {
        let response = Self::check(response).await?;
        let status = response.status();
        let bytes = response.bytes().await.context("reading the response")?;
        let body: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).with_context(|| {
                format!(
                    "the server answered {status} with a body that is not JSON: {}",
                    String::from_utf8_lossy(&bytes)
                )
            })?
        };
        Ok((status, body))
    }

    /// The response if it is not an error answer; otherwise its [`ServerError`].
    pub async fn check(response: reqwest::Response) -> anyhow::Result<reqwest::Response> {
        let status = response.status();
        if !(status.is_client_error() || status.is_server_error()) {
            return Ok(response);
        }
        let bytes = response.bytes().await.unwrap_or_default();
        Err(ServerError::from_http(status, &bytes).into())
    }

    /// Posts a message; with `wait`, the server holds the answer until it is final (or not).
    pub async fn send_message(
        &self,
        session: &str,
        content: &str,
        policy: &str,
        wait: Option<u32>,
    ) -> anyhow::Result<(StatusCode, Value)> {
        let mut url = self.url(&session_path(session, "/messages"));
        if let Some(wait) = wait {
            url.push_str(&format!("?wait={wait}"));
        }
        let request = self
            .http
            .post(url)
            .json(&json!({"content": content, "policy": policy}));
        Self::decode(self.send(request).await?).await
    }

    /// `GET /v1/sessions?limit=&after=`: one page, `{"sessions": [...], "next": cursor|null}`.
    pub async fn list_sessions(
        &self,
        limit: Option<u32>,
        after: Option<&str>,
    ) -> anyhow::Result<Value> {
        let mut query: Vec<(&str, String)> = Vec::new();
        if let Some(limit) = limit {
            query.push(("limit", limit.to_string()));
        }
        if let Some(after) = after {
            query.push(("after", after.to_string()));
        }
        let request = self.http.get(self.url("/v1/sessions")).query(&query);
        Ok(Self::decode(self.send(request).await?).await?.1)
    }

    /// `DELETE /v1/sessions/{id}`.
    pub async fn delete_session(&self, session: &str) -> anyhow::Result<()> {
        let request = self.http.delete(self.url(&session_path(session, "")));
        Self::decode(self.send(request).await?).await?;
        Ok(())
    }

    /// `POST /v1/sessions/{id}/cancel`, of the running interaction or of the one named: the
    /// ids cancelled.
    pub async fn cancel(
        &self,
        session: &str,
        interaction: Option<&str>,
    ) -> anyhow::Result<Vec<String>> {
        let body = match interaction {
            Some(id) => json!({ "interaction_id": id }),
            None => json!({}),
        };
        let request = self
            .http
            .post(self.url(&session_path(session, "/cancel")))
            .json(&body);
        let (_, answer) = Self::decode(self.send(request).await?).await?;
        Ok(answer["cancelled"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|id| id.as_str().map(str::to_string))
            .collect())
    }

    /// `POST …/interactions/{iid}/answer`: the interaction, running again.
    pub async fn answer(
        &self,
        session: &str,
        interaction: &str,
        request_id: &str,
        answer: &Value,
    ) -> anyhow::Result<Value> {
        let path = session_path(session, &format!("/interactions/{interaction}/answer"));
        let request = self
            .http
            .post(self.url(&path))
            .json(&json!({ "request_id": request_id, "answer": answer }));
        Ok(Self::decode(self.send(request).await?).await?.1)
    }

    pub async fn get_interaction(&self, session: &str, id: &str) -> anyhow::Result<Value> {
        let url = self.url(&session_path(session, &format!("/interactions/{id}")));
        let response = self.send(self.http.get(url)).await?;
        Ok(Self::decode(response).await?.1)
    }

    /// Every interaction of the current epoch, oldest first.
    pub async fn history(&self, session: &str) -> anyhow::Result<Vec<Value>> {
        let mut all = Vec::new();
        let mut before: Option<String> = None;
        loop {
            let mut url = self.url(&session_path(session, "/interactions?limit=1000"));
            if let Some(cursor) = &before {
                url.push_str(&format!("&before={cursor}"));
            }
            let response = self.send(self.http.get(url)).await?;
            let (_, page) = Self::decode(response).await?;
            let Some(items) = page["interactions"].as_array() else {
                bail!("the server's answer has no interactions list");
            };
            all.extend(items.iter().cloned());
            match page["next"].as_str() {
                Some(next) => before = Some(next.to_string()),
                None => break,
            }
        }
        all.reverse();
        Ok(all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_id_is_one_path_segment() {
        assert_eq!(
            session_path("a:b.c-d_e~1", "/ws"),
            "/v1/sessions/a:b.c-d_e~1/ws"
        );
        assert_eq!(session_path("bad/id", ""), "/v1/sessions/bad%2Fid");
        assert_eq!(session_path("a b?#%", ""), "/v1/sessions/a%20b%3F%23%25");
        assert_eq!(session_path("é", ""), "/v1/sessions/%C3%A9");
    }

    #[test]
    fn an_error_answer_becomes_code_and_message() {
        let contract = br#"{"error": {"code": "not_found", "message": "session not found"}}"#;
        let error = ServerError::from_http(StatusCode::NOT_FOUND, contract);
        assert_eq!(error.to_string(), "not_found: session not found");
        let proxy = ServerError::from_http(StatusCode::BAD_GATEWAY, b"<html>bad gateway</html>");
        assert_eq!(proxy.to_string(), "http_502: <html>bad gateway</html>");
        let empty = ServerError::from_http(StatusCode::BAD_GATEWAY, b"");
        assert_eq!(empty.to_string(), "http_502: 502 Bad Gateway");
        let reply = json!({"kind": "reply", "ok": false, "error": {"code": "session_busy", "message": "busy"}});
        assert_eq!(
            ServerError::from_reply(&reply).to_string(),
            "session_busy: busy"
        );
    }
}
