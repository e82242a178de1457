//! The `openai` agent: one streamed `POST {base_url}/chat/completions` per task, against any
//! OpenAI-compatible endpoint (OpenAI, vLLM, llama.cpp server, Ollama…). The session's history
//! becomes the messages, its context can feed the system prompt, and the reply's deltas stream
//! through as they arrive. Cancelling drops the request, which closes its connection.
//!
//! # Errors
//!
//! A task that fails ends with one of these codes (messages quote at most 500 characters of the
//! endpoint's own explanation, preferring `error.message` of an OpenAI error body; the API key
//! never appears in a message or a log):
//!
//! | code | when | retried |
//! |---|---|---|
//! | `upstream_unreachable` | no connection: refused, DNS failure, connect timeout | yes |
//! | `upstream_auth` | `401`/`403`, or the key's variable holds an unusable value | no |
//! | `upstream_not_found` | `404` (a wrong model name or `base_url`) | no |
//! | `upstream_rate_limited` | `429` | yes |
//! | `upstream_error` | `5xx`; any other non-2xx (`400`, a redirect…); an `error` object in the stream; a connection lost before the response | `5xx` and a lost connection |
//! | `upstream_timeout` | the stream stayed silent for `idle_timeout_s` (default 60) | only when no delta was sent yet |
//! | `upstream_stream_cut` | the stream ended before `data: [DONE]` and before any `finish_reason` | only when no delta was sent yet |
//! | `upstream_protocol` | a chunk that is not JSON or not shaped like a chat completion chunk, a line that is not UTF-8, an event over 4 MiB, a JSON (non-stream) answer | no |
//!
//! Retries happen only while nothing was sent on the output sink: up to `retries` times, after
//! `retry_backoff_ms * 2^attempt` or the `Retry-After` seconds of the answer, never more than
//! 30 s. A message that gave up after retries says how many attempts were made.

mod failure;
mod stream;
mod wire;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt};
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use reqwest::{Response, StatusCode, Url};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::config::OpenaiConfig;
use super::{Agent, AgentRequest, AgentResult, OutputSink};
use crate::model::JsonObject;
use crate::store::TaskOutput;
use failure::{
    Attempt, Failure, MAX_RETRY_DELAY, backoff, causes, error_detail_of, excerpt, protocol_failure,
    read_error_detail, retry_after,
};
use stream::SseDecoder;
use wire::{StreamChunk, ToolCalls, push_tool_exchanges};

/// Longest wait for `data: [DONE]` (or the end of the body) once a `finish_reason` came.
const DONE_GRACE: Duration = Duration::from_secs(5);

/// An agent backed by an OpenAI-compatible chat completions endpoint.
pub struct OpenaiAgent {
    shared: Arc<Endpoint>,
}

/// What every task of the agent shares; cheap to hand to a task's future.
struct Endpoint {
    /// The agent's configured name, for logs.
    name: String,
    /// One client per agent, so connections are pooled across its tasks.
    client: reqwest::Client,
    url: Url,
    model: String,
    api_key_env: Option<String>,
    system: Option<String>,
    temperature: Option<f64>,
    max_tokens: Option<u32>,
    /// OpenAI function definitions the model may call; the client runs them (the interaction
    /// waits for their outputs).
    tools: Option<Vec<Value>>,
    retries: u32,
    retry_backoff: Duration,
    /// Longest silence of the stream before the reply is given up.
    idle_timeout: Duration,
}

impl OpenaiAgent {
    pub fn new(name: &str, config: &OpenaiConfig) -> anyhow::Result<Self> {
        let url = chat_completions_url(&config.base_url)
            .with_context(|| format!("agents.{name}.base_url {:?}", config.base_url))?;
        let connect_timeout = Duration::try_from_secs_f64(config.connect_timeout_s)
            .with_context(|| format!("agents.{name}.connect_timeout_s"))?;
        // No overall timeout: a reply streams for as long as it takes, and the runner enforces
        // the agent's `timeout_s`. Redirects are not followed: a POST turned into a GET would
        // only hide a wrong `base_url`.
        let client = reqwest::Client::builder()
            .connect_timeout(connect_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .with_context(|| format!("agents.{name}: building the HTTP client"))?;
        if let Some(variable) = &config.api_key_env
            && std::env::var_os(variable).is_none_or(|v| v.is_empty())
        {
            tracing::warn!(
                agent = name,
                variable = variable.as_str(),
                "the API key variable is not set (or empty); requests go without an Authorization header"
            );
        }
        Ok(Self {
            shared: Arc::new(Endpoint {
                name: name.to_string(),
                client,
                url,
                model: config.model.clone(),
                api_key_env: config.api_key_env.clone(),
                system: config.system.clone(),
                temperature: config.temperature,
                max_tokens: config.max_tokens,
                tools: config.tools.clone(),
                retries: config.retries,
                retry_backoff: Duration::from_millis(config.retry_backoff_ms),
                idle_timeout: Duration::try_from_secs_f64(config.idle_timeout_s)
                    .with_context(|| format!("agents.{name}.idle_timeout_s"))?,
            }),
        })
    }
}

impl Agent for OpenaiAgent {
    fn wants_history(&self) -> bool {
        true
    }

    fn run(
        &self,
        request: AgentRequest,
        outputs: OutputSink,
        cancel: CancellationToken,
    ) -> BoxFuture<'static, AgentResult> {
        let endpoint = Arc::clone(&self.shared);
        let body = endpoint.request_body(&request);
        // A resumed run appends to the text before the ask: its deltas make the response.
        let resumed = !request.interaction.answers.is_empty();
        async move {
            let response = endpoint.complete(body, &outputs, &cancel).await?;
            Ok(response.filter(|_| !resumed))
        }
        .boxed()
    }
}

/// `{base_url}/chat/completions`, with exactly one `/` between the two (a query is kept).
fn chat_completions_url(base_url: &str) -> anyhow::Result<Url> {
    let mut url = Url::parse(base_url.trim())?;
    if !matches!(url.scheme(), "http" | "https") {
        anyhow::bail!("expected an http:// or https:// URL");
    }
    url.path_segments_mut()
        .map_err(|()| anyhow::anyhow!("not a base URL"))?
        .pop_if_empty()
        .extend(["chat", "completions"]);
    Ok(url)
}

/// Renders the system prompt: `{{context}}` becomes the context as compact JSON and
/// `{{context.KEY}}` its top-level value `KEY` (a string as is, anything else as compact JSON,
/// nothing when absent). Other `{{…}}` stay as written.
fn render_system(template: &str, context: &JsonObject) -> String {
    let mut rendered = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(open) = rest.find("{{") {
        let Some(close) = rest[open + 2..].find("}}").map(|i| open + 2 + i) else {
            break;
        };
        rendered.push_str(&rest[..open]);
        let name = rest[open + 2..close].trim();
        if name == "context" {
            rendered.push_str(&Value::Object(context.clone()).to_string());
        } else if let Some(key) = name.strip_prefix("context.") {
            match context.get(key) {
                None => {}
                Some(Value::String(text)) => rendered.push_str(text),
                Some(value) => rendered.push_str(&value.to_string()),
            }
        } else {
            rendered.push_str(&rest[open..close + 2]);
        }
        rest = &rest[close + 2..];
    }
    rendered.push_str(rest);
    rendered
}

impl Endpoint {
    fn request_body(&self, request: &AgentRequest) -> Vec<u8> {
        let mut messages = Vec::with_capacity(2 + 2 * request.history.len());
        if let Some(template) = &self.system {
            let system = render_system(template, &request.context);
            messages.push(json!({"role": "system", "content": system}));
        }
        for past in &request.history {
            messages.push(json!({"role": "user", "content": past.content}));
            push_tool_exchanges(&mut messages, &past.answers);
            messages.push(json!({"role": "assistant", "content": past.response}));
        }
        messages.push(json!({"role": "user", "content": request.interaction.content}));
        push_tool_exchanges(&mut messages, &request.interaction.answers);
        let mut body = json!({"model": self.model, "messages": messages, "stream": true});
        if let Some(tools) = &self.tools {
            body["tools"] = json!(tools);
        }
        if let Some(temperature) = self.temperature {
            body["temperature"] = json!(temperature);
        }
        if let Some(max_tokens) = self.max_tokens {
            body["max_tokens"] = json!(max_tokens);
        }
        body.to_string().into_bytes()
    }

    /// Runs attempts until one ends, retrying what may be retried.
    async fn complete(
        &self,
        body: Vec<u8>,
        outputs: &OutputSink,
        cancel: &CancellationToken,
    ) -> AgentResult {
        let mut attempt: u32 = 0;
        loop {
            let failure = match self.attempt(&body, outputs, cancel).await {
                Attempt::Done(text) => return Ok(Some(text)),
                Attempt::ToolCalls(calls) => {
                    // The runner records the ask and ends this run.
                    let _ = outputs.send(TaskOutput::Ask(calls)).await;
                    return Ok(None);
                }
                Attempt::Stopped => return Ok(None),
                Attempt::Failed(failure) => failure,
            };
            if !failure.retryable || attempt >= self.retries {
                let mut error = failure.error;
                if attempt > 0 {
                    error
                        .message
                        .push_str(&format!(" (gave up after {} attempts)", attempt + 1));
                }
                return Err(error);
            }
            let delay = failure
                .retry_after
                .unwrap_or_else(|| backoff(self.retry_backoff, attempt))
                .min(MAX_RETRY_DELAY);
            tracing::warn!(
                agent = %self.name,
                attempt = attempt + 1,
                code = %failure.error.code,
                error = %failure.error.message,
                delay_ms = delay.as_millis() as u64,
                "chat completion failed before its first token; retrying"
            );
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return Ok(None),
                _ = tokio::time::sleep(delay) => {}
            }
            attempt += 1;
        }
    }

    async fn attempt(
        &self,
        body: &[u8],
        outputs: &OutputSink,
        cancel: &CancellationToken,
    ) -> Attempt {
        let mut request = self
            .client
            .post(self.url.clone())
            .header(CONTENT_TYPE, "application/json")
            .header(ACCEPT, "text/event-stream")
            .body(body.to_vec());
        match self.authorization() {
            Ok(Some(value)) => request = request.header(AUTHORIZATION, value),
            Ok(None) => {}
            Err(failure) => return Attempt::Failed(failure),
        }
        let sent = tokio::select! {
            biased;
            _ = cancel.cancelled() => return Attempt::Stopped,
            sent = tokio::time::timeout(self.idle_timeout, request.send()) => sent,
        };
        let response = match sent {
            Ok(Ok(response)) => response,
            Ok(Err(e)) => return Attempt::Failed(self.send_failure(&e)),
            Err(_) => {
                return Attempt::Failed(Failure::new(
                    "upstream_timeout",
                    format!(
                        "the endpoint did not answer within {} s",
                        self.idle_timeout.as_secs_f64()
                    ),
                    true,
                ));
            }
        };
        if !response.status().is_success() {
            return Attempt::Failed(self.status_failure(response, cancel).await);
        }
        let json_answer = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim_start().starts_with("application/json"));
        if json_answer {
            let detail = read_error_detail(response, cancel).await;
            return Attempt::Failed(Failure::new(
                "upstream_protocol",
                format!("expected an event stream, got a JSON answer: {detail}"),
                false,
            ));
        }
        self.read_stream(response, outputs, cancel).await
    }

    /// `Bearer KEY` from the configured variable, read now (so a rotated key is picked up).
    fn authorization(&self) -> Result<Option<HeaderValue>, Failure> {
        let Some(variable) = &self.api_key_env else {
            return Ok(None);
        };
        let key = match std::env::var(variable) {
            Ok(key) if key.is_empty() => return Ok(None),
            Ok(key) => key,
            Err(std::env::VarError::NotPresent) => return Ok(None),
            Err(std::env::VarError::NotUnicode(_)) => {
                return Err(Failure::new(
                    "upstream_auth",
                    format!("the API key in environment variable {variable} is not valid UTF-8"),
                    false,
                ));
            }
        };
        let mut value = HeaderValue::from_str(&format!("Bearer {key}")).map_err(|_| {
            Failure::new(
                "upstream_auth",
                format!(
                    "the API key in environment variable {variable} is not a valid header value"
                ),
                false,
            )
        })?;
        value.set_sensitive(true);
        Ok(Some(value))
    }

    fn send_failure(&self, error: &reqwest::Error) -> Failure {
        let cause = causes(error);
        if error.is_connect() || error.is_timeout() {
            Failure::new(
                "upstream_unreachable",
                format!("cannot connect to {}: {cause}", self.url),
                true,
            )
        } else {
            Failure::new(
                "upstream_error",
                format!("the request to {} failed: {cause}", self.url),
                true,
            )
        }
    }

    async fn status_failure(&self, response: Response, cancel: &CancellationToken) -> Failure {
        let status = response.status();
        let retry_after = retry_after(response.headers());
        let location = response
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let detail = read_error_detail(response, cancel).await;
        let (code, retryable, summary) = match status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => (
                "upstream_auth",
                false,
                format!(
                    "the endpoint refused the credentials ({status}){}",
                    self.key_hint()
                ),
            ),
            StatusCode::NOT_FOUND => (
                "upstream_not_found",
                false,
                format!(
                    "model {:?} not found at {} ({status})",
                    self.model, self.url
                ),
            ),
            StatusCode::TOO_MANY_REQUESTS => (
                "upstream_rate_limited",
                true,
                format!("rate limited by the endpoint ({status})"),
            ),
            s if s.is_server_error() => (
                "upstream_error",
                true,
                format!("the endpoint failed ({status})"),
            ),
            s if s.is_redirection() => (
                "upstream_error",
                false,
                format!(
                    "the endpoint redirects ({status}) to {}; set base_url to the final address",
                    location.as_deref().unwrap_or("nowhere")
                ),
            ),
            _ => (
                "upstream_error",
                false,
                format!("the endpoint refused the request ({status})"),
            ),
        };
        let message = if detail.is_empty() {
            summary
        } else {
            format!("{summary}: {detail}")
        };
        Failure {
            retry_after: if retryable { retry_after } else { None },
            ..Failure::new(code, message, retryable)
        }
    }

    /// Why a refused key may have been refused: the variable's name, never its value.
    fn key_hint(&self) -> String {
        match &self.api_key_env {
            None => " (no api_key_env is configured)".into(),
            Some(variable) if std::env::var_os(variable).is_none_or(|v| v.is_empty()) => {
                format!(" (environment variable {variable} is not set)")
            }
            Some(_) => String::new(),
        }
    }

    /// Reads the event stream, sending each content delta as it comes.
    async fn read_stream(
        &self,
        response: Response,
        outputs: &OutputSink,
        cancel: &CancellationToken,
    ) -> Attempt {
        let mut body = response.bytes_stream();
        let mut decoder = SseDecoder::default();
        let mut text = String::new();
        let mut calls = ToolCalls::default();
        let mut finish_reason: Option<String> = None;
        // Once a delta went out, a failure can no longer be retried: the reply would repeat.
        let mut sent_any = false;
        loop {
            let next = async {
                if finish_reason.is_some() {
                    // Finished: wait a little for `[DONE]`, but not on a server that never says it.
                    Ok(tokio::time::timeout(DONE_GRACE, body.next())
                        .await
                        .unwrap_or(None))
                } else {
                    tokio::time::timeout(self.idle_timeout, body.next()).await
                }
            };
            let next = tokio::select! {
                biased;
                _ = cancel.cancelled() => return Attempt::Stopped,
                next = next => next,
            };
            let Ok(next) = next else {
                return Attempt::Failed(Failure::new(
                    "upstream_timeout",
                    format!(
                        "the endpoint sent nothing for {} s in the middle of the reply",
                        self.idle_timeout.as_secs_f64()
                    ),
                    !sent_any,
                ));
            };
            let bytes = match next {
                Some(Ok(bytes)) => bytes,
                end => {
                    let done =
                        matches!(decoder.finish(), Ok(Some(data)) if data.trim() == "[DONE]");
                    if done || finish_reason.is_some() {
                        self.log_finish(finish_reason.as_deref());
                        return calls.end(text);
                    }
                    let how = match end {
                        Some(Err(e)) => format!("the connection was lost: {}", causes(&e)),
                        _ => "the body ended".into(),
                    };
                    return Attempt::Failed(Failure::new(
                        "upstream_stream_cut",
                        format!("the reply stream was cut before [DONE] ({how})"),
                        !sent_any,
                    ));
                }
            };
            decoder.push(&bytes);
            loop {
                let data = match decoder.next_event() {
                    Ok(Some(data)) => data,
                    Ok(None) => break,
                    Err(e) => return Attempt::Failed(protocol_failure(e.to_string())),
                };
                let data = data.trim();
                if data.is_empty() {
                    continue;
                }
                if data == "[DONE]" {
                    self.log_finish(finish_reason.as_deref());
                    return calls.end(text);
                }
                let chunk: StreamChunk<'_> = match serde_json::from_str(data) {
                    Ok(chunk) => chunk,
                    Err(e) => {
                        return Attempt::Failed(protocol_failure(format!(
                            "a malformed chunk ({e}): {}",
                            excerpt(data)
                        )));
                    }
                };
                if let Some(error) = chunk.error {
                    let detail = error_detail_of(&json!({ "error": error })).unwrap_or_default();
                    return Attempt::Failed(Failure::new(
                        "upstream_error",
                        format!(
                            "the endpoint reported an error mid-stream: {}",
                            excerpt(&detail)
                        ),
                        false,
                    ));
                }
                let Some(choice) = chunk.choices.and_then(|c| c.into_iter().next()) else {
                    continue;
                };
                if let Some(reason) = choice.finish_reason {
                    finish_reason = Some(reason.into_owned());
                }
                let Some(delta) = choice.delta else {
                    continue;
                };
                for call in delta.tool_calls.into_iter().flatten() {
                    if let Err(e) = calls.add(call) {
                        return Attempt::Failed(protocol_failure(e));
                    }
                }
                let Some(content) = delta.content else {
                    continue;
                };
                if content.is_empty() {
                    continue;
                }
                text.push_str(&content);
                sent_any = true;
                let delivered = tokio::select! {
                    biased;
                    _ = cancel.cancelled() => false,
                    sent = outputs.send(TaskOutput::Delta(content.into_owned())) => sent.is_ok(),
                };
                if !delivered {
                    // Cancelled, or the runner is gone.
                    return Attempt::Stopped;
                }
            }
        }
    }

    fn log_finish(&self, finish_reason: Option<&str>) {
        tracing::debug!(
            agent = %self.name,
            finish_reason = finish_reason.unwrap_or("none"),
            "chat completion finished"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_url_joins_with_one_slash() {
        for base in [
            "http://h:1/v1",
            "http://h:1/v1/",
            " http://h:1/v1 ",
            "http://h:1/v1/?x=1",
        ] {
            let url = chat_completions_url(base).expect("valid").to_string();
            assert!(
                url.starts_with("http://h:1/v1/chat/completions"),
                "{base} -> {url}"
            );
        }
        assert_eq!(
            chat_completions_url("http://h:1/v1/?x=1")
                .expect("valid")
                .as_str(),
            "http://h:1/v1/chat/completions?x=1"
        );
        assert_eq!(
            chat_completions_url("http://h:1").expect("valid").as_str(),
            "http://h:1/chat/completions"
        );
        assert!(chat_completions_url("ftp://h/v1").is_err());
    }

    #[test]
    fn the_system_template_takes_context_values() {
        let context: JsonObject = serde_json::from_value(json!({
            "name": "Ada", "n": 3, "tags": ["a"], "nothing": null
        }))
        .expect("object");
        assert_eq!(
            render_system(
                "Hi {{context.name}} ({{ context.n }}) {{context.tags}} [{{context.missing}}] \
                 {{context.nothing}} {{other}} {{context}} {{open",
                &context
            ),
            format!(
                "Hi Ada (3) [\"a\"] [] null {{{{other}}}} {} {{{{open",
                serde_json::to_string(&context).expect("json")
            )
        );
    }
}
