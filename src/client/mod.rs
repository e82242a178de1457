//! Clients of the wire contract, used by the CLI and the benchmark: HTTP here, the
//! WebSocket protocol in [`stream`].

pub mod stream;

use std::time::Duration;

use anyhow::{Context, bail};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// The default server URL of the CLI.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:7420";

/// An error answer of the server: its status and the contract's `{"error": {...}}` body.
#[derive(Debug, thiserror::Error)]
#[error("{code}: {message} (HTTP {status})")]
pub struct ServerError {
    pub status: StatusCode,
    pub code: String,
    pub message: String,
    pub body: Value,
}

/// A client of one Baton server.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
}

impl Client {
    pub fn new(server: &str) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
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

    /// `PUT /v1/sessions/{id}` with an agent.
    pub async fn put_session_agent(&self, session: &str, agent: &str) -> anyhow::Result<Value> {
        let response = self
            .http
            .put(self.url(&format!("/v1/sessions/{session}")))
            .json(&json!({ "agent": agent }))
            .send()
            .await
            .with_context(|| format!("connecting to {}", self.base))?;
        Ok(Self::decode(response).await?.1)
    }

    async fn decode(response: reqwest::Response) -> anyhow::Result<(StatusCode, Value)> {
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
        if status.is_client_error() || status.is_server_error() {
            let error = &body["error"];
            return Err(ServerError {
                status,
                code: error["code"].as_str().unwrap_or("unknown").to_string(),
                message: error["message"].as_str().unwrap_or("").to_string(),
                body,
            }
            .into());
        }
        Ok((status, body))
    }

    /// Posts a message; with `wait`, the server holds the answer until it is final (or not).
    pub async fn send_message(
        &self,
        session: &str,
        content: &str,
        policy: &str,
        wait: Option<u32>,
    ) -> anyhow::Result<(StatusCode, Value)> {
        let mut url = self.url(&format!("/v1/sessions/{session}/messages"));
        if let Some(wait) = wait {
            url.push_str(&format!("?wait={wait}"));
        }
        let response = self
            .http
            .post(url)
            .json(&json!({"content": content, "policy": policy}))
            .send()
            .await
            .with_context(|| format!("connecting to {}", self.base))?;
        Self::decode(response).await
    }

    pub async fn get_interaction(&self, session: &str, id: &str) -> anyhow::Result<Value> {
        let url = self.url(&format!("/v1/sessions/{session}/interactions/{id}"));
        let response = self.http.get(url).send().await?;
        Ok(Self::decode(response).await?.1)
    }

    /// Every interaction of the current epoch, oldest first.
    pub async fn history(&self, session: &str) -> anyhow::Result<Vec<Value>> {
        let mut all = Vec::new();
        let mut before: Option<String> = None;
        loop {
            let mut url = self.url(&format!("/v1/sessions/{session}/interactions?limit=1000"));
            if let Some(cursor) = &before {
                url.push_str(&format!("&before={cursor}"));
            }
            let response = self.http.get(url).send().await?;
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
