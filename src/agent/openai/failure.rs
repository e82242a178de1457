//! How one request of the `openai` agent ends: done, tool calls, stopped, or a typed failure;
//! when to retry a failure and after how long; the endpoint's explanation as a bounded excerpt.

use std::time::Duration;

use futures_util::StreamExt;
use reqwest::Response;
use reqwest::header::{HeaderMap, RETRY_AFTER};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::model::ErrorInfo;

/// Longest pause before a retry, whatever the backoff or `Retry-After` says.
pub(super) const MAX_RETRY_DELAY: Duration = Duration::from_secs(30);
/// Characters of the endpoint's explanation quoted in an error message.
const ERROR_EXCERPT_CHARS: usize = 500;
/// Bytes of an error answer's body read at most (the excerpt comes from them).
const MAX_ERROR_BODY_BYTES: usize = 64 * 1024;
/// Longest wait for an error answer's body; the status alone is reported after it.
const ERROR_BODY_WAIT: Duration = Duration::from_secs(5);

/// How one attempt ended.
pub(super) enum Attempt {
    /// `[DONE]` (or the end of the body after a `finish_reason`): the full text.
    Done(String),
    /// The model called client-side tools: the interaction waits for their outputs.
    ToolCalls(Value),
    /// Cancelled, or the runner stopped listening.
    Stopped,
    Failed(Failure),
}

/// Why an attempt failed, and whether another may follow.
pub(super) struct Failure {
    pub(super) error: ErrorInfo,
    pub(super) retryable: bool,
    /// The endpoint's `Retry-After`, which replaces the backoff.
    pub(super) retry_after: Option<Duration>,
}

impl Failure {
    pub(super) fn new(code: &str, message: String, retryable: bool) -> Self {
        Self {
            error: ErrorInfo {
                code: code.into(),
                message,
            },
            retryable,
            retry_after: None,
        }
    }
}

pub(super) fn protocol_failure(what: String) -> Failure {
    Failure::new(
        "upstream_protocol",
        format!("the endpoint broke the streaming protocol: {what}"),
        false,
    )
}

/// `retry_backoff * 2^attempt`, saturating.
pub(super) fn backoff(first: Duration, attempt: u32) -> Duration {
    first.saturating_mul(2u32.saturating_pow(attempt))
}

/// `Retry-After` in seconds (the HTTP-date form is ignored: the backoff applies then).
pub(super) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let seconds: f64 = headers
        .get(RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Duration::try_from_secs_f64(seconds)
        .ok()
        .map(|d| d.min(MAX_RETRY_DELAY))
}

/// The explanation in an error answer's body, as an excerpt: the `error.message` of an
/// OpenAI-style body when there is one, else the body itself. Bounded in size and time.
pub(super) async fn read_error_detail(response: Response, cancel: &CancellationToken) -> String {
    let mut body = Vec::new();
    let mut stream = response.bytes_stream();
    let read = async {
        while let Some(Ok(bytes)) = stream.next().await {
            let room = MAX_ERROR_BODY_BYTES - body.len();
            body.extend_from_slice(&bytes[..bytes.len().min(room)]);
            if body.len() >= MAX_ERROR_BODY_BYTES {
                break;
            }
        }
    };
    tokio::select! {
        biased;
        _ = cancel.cancelled() => {}
        _ = tokio::time::timeout(ERROR_BODY_WAIT, read) => {}
    }
    let text = String::from_utf8_lossy(&body);
    let detail = serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|value| error_detail_of(&value));
    excerpt(detail.as_deref().unwrap_or(&text))
}

/// The message of the error shapes OpenAI-compatible servers answer with:
/// `{"error": {"message"}}`, `{"error": "…"}`, `{"message": "…"}` or `{"detail": "…"}`.
pub(super) fn error_detail_of(value: &Value) -> Option<String> {
    let error = &value["error"];
    [
        &error["message"],
        error,
        &value["message"],
        &value["detail"],
    ]
    .into_iter()
    .find_map(Value::as_str)
    .map(str::to_string)
    .or_else(|| error.is_object().then(|| error.to_string()))
}

/// At most [`ERROR_EXCERPT_CHARS`] characters of `text` (trimmed), `…` marking a cut.
pub(super) fn excerpt(text: &str) -> String {
    let text = text.trim();
    let mut starts = text.char_indices().map(|(i, _)| i);
    match (starts.nth(ERROR_EXCERPT_CHARS - 1), starts.next()) {
        // More than the limit: keep one character less, for the mark.
        (Some(end), Some(_)) => format!("{}…", &text[..end]),
        _ => text.to_string(),
    }
}

/// What went wrong under a `reqwest` error, as one line: its sources (the error itself only
/// repeats the URL), or the error when it has none.
pub(super) fn causes(error: &reqwest::Error) -> String {
    let Some(first) = std::error::Error::source(error) else {
        return error.to_string();
    };
    let mut line = first.to_string();
    let mut source = first.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !line.contains(&cause_text) {
            line.push_str(": ");
            line.push_str(&cause_text);
        }
        source = cause.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excerpts_are_bounded() {
        assert_eq!(excerpt("  short  "), "short");
        let exact = "é".repeat(ERROR_EXCERPT_CHARS);
        assert_eq!(excerpt(&exact), exact);
        let long = "é".repeat(ERROR_EXCERPT_CHARS + 1);
        let cut = excerpt(&long);
        assert_eq!(cut.chars().count(), ERROR_EXCERPT_CHARS);
        assert!(cut.ends_with('…'));
    }

    #[test]
    fn backoff_doubles_and_saturates() {
        let first = Duration::from_millis(250);
        assert_eq!(backoff(first, 0), first);
        assert_eq!(backoff(first, 2), Duration::from_secs(1));
        assert!(backoff(first, 200) >= MAX_RETRY_DELAY);
    }
}
