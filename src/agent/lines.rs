//! The JSON-lines protocol of the agents that are programs or services (`command`, `http`):
//! the request they read, the lines they write, and the reader that splits and bounds them.
//! Written once, so both transports mean the same by every line.
//!
//! - `{"type": "delta", "text": "..."}` appends to the response;
//! - `{"type": "progress", "data": <any JSON>}` reports progress;
//! - `{"type": "context", "patch": {...}}` merge-patches the session's context (RFC 7396);
//! - `{"type": "result", "response"?: "..."}` ends the task (`response` replaces the deltas);
//! - `{"type": "error", "message": "...", "code"?: "..."}` fails it;
//! - `{"type": "ask", "data": <any JSON>}` asks the client: the interaction waits, and once
//!   answered the agent runs again with `answers` and `response` in its request.
//!
//! Blank lines are skipped and unknown fields ignored; a line that is none of those fails the
//! task with `agent_protocol` (naming its number), output past `max_output_bytes` with
//! `output_limit`.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};

use super::AgentRequest;
use crate::model::{ErrorInfo, Exchange, Interaction, JsonObject, Session};
use crate::store::TaskOutput;

/// The start of an offending line shown in an error message, in bytes.
const QUOTE_BYTES: usize = 200;

/// What the agent reads: one JSON object (a program's stdin, a service's request body).
#[derive(Serialize)]
struct Request<'a> {
    session: Option<&'a Session>,
    interaction: &'a Interaction,
    history: &'a [Interaction],
    context: &'a JsonObject,
    /// Every earlier ask of this interaction with its answer, in order (empty on a first run).
    answers: &'a [Exchange],
    /// The response so far (what runs before an ask produced).
    response: &'a str,
}

/// The request as JSON, the same bytes for every transport.
pub(super) fn request_json(request: &AgentRequest) -> Result<Vec<u8>, ErrorInfo> {
    serde_json::to_vec(&Request {
        session: request.session.as_ref(),
        interaction: &request.interaction,
        history: &request.history,
        context: &request.context,
        answers: &request.interaction.answers,
        response: &request.interaction.response,
    })
    .map_err(|e| agent_error(format!("encoding the request: {e}")))
}

/// One line the agent writes.
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum OutputLine {
    Delta {
        text: String,
    },
    Progress {
        data: Value,
    },
    Context {
        patch: JsonObject,
    },
    Result {
        #[serde(default)]
        response: Option<String>,
    },
    Error {
        message: String,
        #[serde(default)]
        code: Option<String>,
    },
    Ask {
        data: Value,
    },
}

/// What a line means for the task.
#[derive(Debug)]
pub(super) enum Step {
    /// An output to record (a delta, progress, a context patch).
    Output(TaskOutput),
    /// The end: the response that replaces the deltas (`None`: keep them), or the failure.
    End(Result<Option<String>, ErrorInfo>),
    /// The agent needs the client: the runner records the ask and stops the task.
    Ask(Value),
}

impl OutputLine {
    fn step(self) -> Option<Step> {
        Some(match self {
            OutputLine::Delta { text } if text.is_empty() => return None,
            OutputLine::Delta { text } => Step::Output(TaskOutput::Delta(text)),
            OutputLine::Progress { data } => Step::Output(TaskOutput::Progress(data)),
            OutputLine::Context { patch } => Step::Output(TaskOutput::ContextPatch(patch)),
            OutputLine::Result { response } => Step::End(Ok(response)),
            OutputLine::Error { message, code } => Step::End(Err(ErrorInfo {
                code: code.unwrap_or_else(|| "agent_error".into()),
                message,
            })),
            OutputLine::Ask { data } => Step::Ask(data),
        })
    }
}

pub(super) fn agent_error(message: String) -> ErrorInfo {
    ErrorInfo {
        code: "agent_error".into(),
        message,
    }
}

/// Bounds on what an agent may write.
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    /// The longest line, in bytes.
    pub line: usize,
    /// Everything written, in bytes.
    pub output: usize,
}

/// How lines arrive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Framing {
    /// One JSON output a line (a program's stdout, `application/x-ndjson`).
    Lines,
    /// Server-sent events, one JSON output a `data:` line (`text/event-stream`); the other
    /// fields and comments are skipped.
    EventStream,
}

/// Splits what an agent writes into protocol lines, bounding the line length and the total.
pub(super) struct LineReader<R> {
    source: BufReader<R>,
    /// What the lines are read from, for error messages ("stdout", "the answer's body").
    what: &'static str,
    framing: Framing,
    line: Vec<u8>,
    number: u64,
    total: usize,
    limits: Limits,
}

impl<R: AsyncRead + Unpin> LineReader<R> {
    pub(super) fn new(source: R, what: &'static str, framing: Framing, limits: Limits) -> Self {
        Self {
            source: BufReader::with_capacity(64 * 1024, source),
            what,
            framing,
            line: Vec::new(),
            number: 0,
            total: 0,
            limits,
        }
    }

    fn protocol_error(&self, line: u64, message: impl std::fmt::Display) -> ErrorInfo {
        ErrorInfo {
            code: "agent_protocol".into(),
            message: format!("{} line {line}: {message}", self.what),
        }
    }

    /// The next step; `None` at the end with nothing pending. Cancel-safe: a partial line
    /// stays buffered in `self`.
    pub(super) async fn next(&mut self) -> Result<Option<Step>, ErrorInfo> {
        loop {
            if !self.read_line().await? {
                return Ok(None);
            }
            self.number += 1;
            let mut text = self.line.trim_ascii();
            if self.framing == Framing::EventStream {
                match text.strip_prefix(b"data:") {
                    Some(data) => text = data.trim_ascii(),
                    // `event:`, `id:`, `retry:`, comments and the blank line ending an event.
                    None => text = b"",
                }
            }
            if text.is_empty() {
                self.line.clear();
                continue;
            }
            let parsed = match serde_json::from_slice::<OutputLine>(text) {
                Ok(output) => Ok(output),
                Err(e) if e.is_syntax() || e.is_eof() => Err(self
                    .protocol_error(self.number, format_args!("not JSON ({e}): {}", quote(text)))),
                Err(e) => Err(self.protocol_error(
                    self.number,
                    format_args!("not a valid output ({e}): {}", quote(text)),
                )),
            };
            self.line.clear();
            match parsed?.step() {
                Some(step) => return Ok(Some(step)),
                None => continue,
            }
        }
    }

    /// Fills `self.line` with the next line (without its newline); `false` at the end with
    /// nothing pending.
    async fn read_line(&mut self) -> Result<bool, ErrorInfo> {
        loop {
            let available = match self.source.fill_buf().await {
                Ok(bytes) => bytes,
                Err(e) => return Err(agent_error(format!("reading {}: {e}", self.what))),
            };
            if available.is_empty() {
                return Ok(!self.line.is_empty());
            }
            let (taken, done) = match available.iter().position(|&b| b == b'\n') {
                Some(i) => (i + 1, true),
                None => (available.len(), false),
            };
            let content = if done { taken - 1 } else { taken };
            if self.line.len() + content > self.limits.line {
                return Err(self.protocol_error(
                    self.number + 1,
                    format_args!("longer than the limit of {} bytes", self.limits.line),
                ));
            }
            self.line.extend_from_slice(&available[..content]);
            self.source.consume(taken);
            self.total += taken;
            if self.total > self.limits.output {
                return Err(ErrorInfo {
                    code: "output_limit".into(),
                    message: format!(
                        "the agent wrote more than the limit of {} bytes",
                        self.limits.output
                    ),
                });
            }
            if done {
                return Ok(true);
            }
        }
    }
}

/// The start of an offending line, for an error message.
pub(super) fn quote(line: &[u8]) -> String {
    let shown = &line[..line.len().min(QUOTE_BYTES)];
    let text = String::from_utf8_lossy(shown);
    if line.len() > QUOTE_BYTES {
        format!("{text}…")
    } else {
        text.into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_lines_parse_and_refuse_wrong_shapes() {
        let ok = |s: &str| serde_json::from_str::<OutputLine>(s).is_ok();
        assert!(ok(r#"{"type":"delta","text":"hi","extra":1}"#));
        assert!(ok(r#"{"type":"progress","data":null}"#));
        assert!(ok(r#"{"type":"context","patch":{"a":null}}"#));
        assert!(ok(r#"{"type":"result"}"#));
        assert!(ok(r#"{"type":"result","response":"x"}"#));
        assert!(ok(r#"{"type":"error","message":"m"}"#));
        assert!(ok(r#"{"type":"ask","data":{"q":"may I?"}}"#));
        assert!(!ok(r#"{"type":"ask"}"#));
        assert!(!ok(r#"{"type":"delta","text":5}"#));
        assert!(!ok(r#"{"type":"context","patch":[1]}"#));
        assert!(!ok(r#"{"type":"shout","text":"x"}"#));
        assert!(!ok(r#"{"text":"x"}"#));
        assert!(!ok(r#"{"type":"progress"}"#));
    }

    #[test]
    fn quotes_are_bounded() {
        let long = vec![b'x'; 1000];
        assert_eq!(quote(&long).chars().count(), QUOTE_BYTES + 1);
        assert_eq!(quote(b"short"), "short");
    }

    async fn steps(input: &str, framing: Framing) -> Vec<String> {
        let limits = Limits {
            line: 1024,
            output: 1 << 20,
        };
        let mut reader = LineReader::new(input.as_bytes(), "the body", framing, limits);
        let mut seen = Vec::new();
        loop {
            match reader.next().await {
                Ok(Some(step)) => seen.push(format!("{step:?}")),
                Ok(None) => return seen,
                Err(e) => {
                    seen.push(format!("{}: {}", e.code, e.message));
                    return seen;
                }
            }
        }
    }

    #[tokio::test]
    async fn lines_and_event_streams_mean_the_same() {
        let lines = "{\"type\":\"delta\",\"text\":\"a \"}\n\n{\"type\":\"delta\",\"text\":\"\"}\n\
                     {\"type\":\"result\"}\n";
        let events = ": hello\nevent: output\ndata: {\"type\":\"delta\",\"text\":\"a \"}\n\n\
                      id: 2\ndata:{\"type\":\"result\"}\n\n";
        let from_lines = steps(lines, Framing::Lines).await;
        assert_eq!(from_lines.len(), 2, "{from_lines:?}");
        assert_eq!(from_lines, steps(events, Framing::EventStream).await);
        let broken = steps("{\"type\":\"delta\"}\n", Framing::Lines).await;
        assert!(
            broken[0].starts_with("agent_protocol: the body line 1: not a valid output"),
            "{broken:?}"
        );
    }
}
