//! The `http` agent: the agent is a web service the team already runs, reached over HTTP.
//! Each run of an interaction is one `POST {url}` on a pooled connection, whose body is
//! exactly the JSON a `command` program reads on stdin, answered `200` with a streamed body of
//! the lines such a program writes ([`lines`](super::lines); `application/x-ndjson`, or
//! `text/event-stream` with one line a `data:` field). One protocol, two transports.
//!
//! - Headers: `Baton-Interaction`, `Baton-Run` (1, then one more after each answer),
//!   `Baton-Attempt`, the configured static ones, and with `secret_env` the Standard Webhooks
//!   signature (`webhook-id` `<interaction>.<attempt>`, or `<interaction>.<run>.<attempt>`
//!   on a re-run; `webhook-timestamp`; `webhook-signature: v1,<base64 HMAC-SHA256 of
//!   "id.timestamp.body">`, the key being the base64 after `whsec_`).
//! - A connection refused or reset before any byte of the answer is retried (`retries`,
//!   backoff from 100 ms, doubling), then the task fails with `upstream_unreachable`; a non-2xx
//!   answer is not retried: `agent_error` with its status and the first 2 KiB of its body.
//! - A body that ends without an end line completes the task with its deltas; one that breaks
//!   off fails it with `agent_error`; silence past `idle_timeout_s` (before the headers or
//!   between two bytes) fails it with `agent_error`.
//! - Cancel closes the request: the service sees its client go away.

use std::time::Duration;

use base64::Engine as _;
use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt, TryStreamExt};
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use tokio_util::io::StreamReader;
use tokio_util::sync::CancellationToken;

use super::config::HttpConfig;
use super::lines::{Framing, Limits, LineReader, Step, agent_error, quote, request_json};
use super::{Agent, AgentRequest, AgentResult, OutputSink};
use crate::model::ErrorInfo;
use crate::store::TaskOutput;

/// The start of a refusal's body kept in the task's error.
const ERROR_BODY_BYTES: usize = 2048;
/// The first retry's delay; doubled at each further one.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// Calls an agent service per run of an interaction.
pub struct HttpAgent {
    url: reqwest::Url,
    client: reqwest::Client,
    /// The configured static headers.
    headers: HeaderMap,
    secret_env: Option<String>,
    retries: u32,
    idle_timeout: Duration,
    limits: Limits,
}

impl HttpAgent {
    pub fn new(name: &str, config: &HttpConfig) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let url = reqwest::Url::parse(config.url.trim())
            .with_context(|| format!("agents.{name}.url {:?}", config.url))?;
        let mut headers = HeaderMap::new();
        for (key, value) in &config.headers {
            let header = HeaderName::from_bytes(key.as_bytes())
                .with_context(|| format!("agents.{name}.headers: {key:?} is not a header name"))?;
            let mut value = HeaderValue::from_str(value).map_err(|_| {
                anyhow::anyhow!("agents.{name}.headers.{key}: not a valid header value")
            })?;
            value.set_sensitive(true);
            headers.insert(header, value);
        }
        let mut client = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(config.connect_timeout_ms))
            .redirect(reqwest::redirect::Policy::none())
            // Every session's request runs at once on its own kept-alive connection.
            .pool_max_idle_per_host(usize::MAX)
            .tcp_nodelay(true);
        if let Some(file) = &config.ca_file {
            let pem = std::fs::read(file)
                .with_context(|| format!("agents.{name}.ca_file {}", file.display()))?;
            let roots = reqwest::Certificate::from_pem_bundle(&pem)
                .with_context(|| format!("agents.{name}.ca_file {}: not PEM", file.display()))?;
            anyhow::ensure!(
                !roots.is_empty(),
                "agents.{name}.ca_file {}: no certificate in it",
                file.display()
            );
            for root in roots {
                client = client.add_root_certificate(root);
            }
        }
        Ok(Self {
            url,
            client: client.build().context("building the HTTP client")?,
            headers,
            secret_env: config.secret_env.clone(),
            retries: config.retries,
            idle_timeout: Duration::from_secs_f64(config.idle_timeout_s),
            limits: Limits {
                line: config.max_line_bytes,
                output: config.max_output_bytes,
            },
        })
    }
}

/// The signing key of a `whsec_<base64>` secret (the prefix is optional).
fn signing_key(secret: &str) -> Result<Vec<u8>, ErrorInfo> {
    let encoded = secret.trim();
    let encoded = encoded.strip_prefix("whsec_").unwrap_or(encoded);
    base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|_| agent_error("the signing secret is not whsec_ followed by base64".into()))
}

/// `v1,<base64 HMAC-SHA256 of "id.timestamp.body">`, as Standard Webhooks signs.
pub(super) fn signature(key: &[u8], id: &str, timestamp: u64, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    let mut context = ring::hmac::Context::with_key(&key);
    context.update(id.as_bytes());
    context.update(b".");
    context.update(timestamp.to_string().as_bytes());
    context.update(b".");
    context.update(body);
    let tag = context.sign();
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(tag.as_ref())
    )
}

/// One run's fixed parts, owned by its future.
struct Call {
    url: reqwest::Url,
    client: reqwest::Client,
    headers: HeaderMap,
    key: Option<Vec<u8>>,
    interaction: String,
    run: usize,
    body: Vec<u8>,
}

impl Call {
    fn request(&self, attempt: u32) -> reqwest::RequestBuilder {
        let mut request = self
            .client
            .post(self.url.clone())
            .headers(self.headers.clone())
            .header(CONTENT_TYPE, "application/json")
            .header("baton-interaction", &self.interaction)
            .header("baton-run", self.run.to_string())
            .header("baton-attempt", attempt.to_string());
        if let Some(key) = &self.key {
            let id = if self.run == 1 {
                format!("{}.{attempt}", self.interaction)
            } else {
                format!("{}.{}.{attempt}", self.interaction, self.run)
            };
            let timestamp = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let signed = signature(key, &id, timestamp, &self.body);
            request = request
                .header("webhook-id", id)
                .header("webhook-timestamp", timestamp.to_string())
                .header("webhook-signature", signed);
        }
        request.body(self.body.clone())
    }
}

impl Agent for HttpAgent {
    fn wants_history(&self) -> bool {
        true
    }

    fn run(
        &self,
        request: AgentRequest,
        outputs: OutputSink,
        cancel: CancellationToken,
    ) -> BoxFuture<'static, AgentResult> {
        let key = match &self.secret_env {
            None => Ok(None),
            Some(variable) => match std::env::var(variable) {
                Ok(secret) if !secret.trim().is_empty() => signing_key(&secret).map(Some),
                _ => Err(agent_error(format!(
                    "the signing secret's environment variable {variable} is not set"
                ))),
            },
        };
        let (retries, idle, limits) = (self.retries, self.idle_timeout, self.limits);
        let (url, client, headers) = (self.url.clone(), self.client.clone(), self.headers.clone());
        async move {
            if cancel.is_cancelled() {
                return Ok(None);
            }
            let call = Call {
                url,
                client,
                headers,
                key: key?,
                interaction: request.interaction.id.to_string(),
                run: request.interaction.answers.len() + 1,
                body: request_json(&request)?,
            };
            tokio::select! {
                biased;
                // Dropping the request closes it: the service sees its client go away.
                _ = cancel.cancelled() => Ok(None),
                end = exchange(&call, retries, idle, limits, &outputs) => end,
            }
        }
        .boxed()
    }
}

/// Sends the request (retrying what got no answer at all) and reads its answer to the end.
async fn exchange(
    call: &Call,
    retries: u32,
    idle: Duration,
    limits: Limits,
    outputs: &OutputSink,
) -> AgentResult {
    let mut backoff = FIRST_BACKOFF;
    let mut attempt = 1;
    let response = loop {
        match tokio::time::timeout(idle, call.request(attempt).send()).await {
            Err(_) => {
                return Err(agent_error(format!(
                    "the agent service sent no answer in {} s (idle_timeout_s)",
                    idle.as_secs_f64()
                )));
            }
            Ok(Ok(response)) => break response,
            Ok(Err(e)) if attempt <= retries => {
                tracing::debug!(error = %e, attempt, "agent service unreachable; retrying");
                tokio::time::sleep(backoff).await;
                backoff *= 2;
                attempt += 1;
            }
            Ok(Err(e)) => {
                return Err(ErrorInfo {
                    code: "upstream_unreachable".into(),
                    message: format!(
                        "the agent service at {} cannot be reached ({} attempts): {}",
                        without_query(&call.url),
                        attempt,
                        cause(&e)
                    ),
                });
            }
        }
    };
    let status = response.status();
    if !status.is_success() {
        let body = first_bytes(response, ERROR_BODY_BYTES, idle).await;
        return Err(agent_error(format!(
            "the agent service answered {status}: {}",
            quote(&body)
        )));
    }
    let framing = match response.headers().get(CONTENT_TYPE) {
        Some(kind) if kind.as_bytes().starts_with(b"text/event-stream") => Framing::EventStream,
        _ => Framing::Lines,
    };
    let body = Box::pin(idle_bounded(
        Box::pin(
            response
                .bytes_stream()
                .map_err(|e| std::io::Error::other(cause(&e))),
        ),
        idle,
    ));
    let mut lines = LineReader::new(
        StreamReader::new(body),
        "the answer's body",
        framing,
        limits,
    );
    loop {
        let output = match lines.next().await? {
            // The body ended cleanly without an end line: completed with the deltas.
            None => return Ok(None),
            Some(Step::Output(output)) => output,
            Some(Step::End(end)) => return end,
            Some(Step::Ask(data)) => {
                // The runner records the ask and stops the task (closing the request).
                let _ = outputs.send(TaskOutput::Ask(data)).await;
                return Ok(None);
            }
        };
        if outputs.send(output).await.is_err() {
            return Ok(None);
        }
    }
}

/// The body's bytes, failing once none arrived for `idle` (any byte counts: a blank line
/// keeps a slow answer alive).
fn idle_bounded<S, B>(
    stream: S,
    idle: Duration,
) -> impl futures_util::Stream<Item = std::io::Result<B>>
where
    S: futures_util::Stream<Item = std::io::Result<B>> + Unpin,
{
    futures_util::stream::unfold(Some(stream), move |state| async move {
        let mut stream = state?;
        match tokio::time::timeout(idle, stream.next()).await {
            Ok(Some(item)) => Some((item, Some(stream))),
            Ok(None) => None,
            Err(_) => Some((
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("silent for {} s (idle_timeout_s)", idle.as_secs_f64()),
                )),
                None,
            )),
        }
    })
}

/// The start of a refused answer's body (what arrives within the idle timeout).
async fn first_bytes(response: reqwest::Response, limit: usize, idle: Duration) -> Vec<u8> {
    let mut body = Vec::new();
    let mut stream = response.bytes_stream();
    while body.len() < limit {
        match tokio::time::timeout(idle, stream.next()).await {
            Ok(Some(Ok(chunk))) => body.extend_from_slice(&chunk),
            _ => break,
        }
    }
    body.truncate(limit);
    body
}

/// An error with its causes, which reqwest keeps apart ("error sending request" alone says
/// nothing).
fn cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

/// The URL for messages: its query may hold a credential.
fn without_query(url: &reqwest::Url) -> String {
    let mut shown = url.clone();
    shown.set_query(None);
    shown.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Standard Webhooks specification's own example: secret, id, timestamp, payload and
    /// the signature it gives (standard-webhooks, spec/standard-webhooks.md).
    #[test]
    fn signs_as_the_specification_shows() {
        let key = signing_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let signed = signature(
            &key,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(signed, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn a_secret_that_is_not_base64_is_refused() {
        assert!(signing_key("whsec_not base64!").is_err());
        assert!(signing_key("whsec_").is_ok_and(|k| k.is_empty()));
    }
}
