//! The built-in echo agent: replies with the request's content exactly, one word per delta
//! (a word with the whitespace that follows it), pausing `delay_ms` before each.

use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use super::{Agent, AgentRequest, AgentResult, OutputSink};
use crate::store::TaskOutput;

/// Deterministic agent for demos, tests and benchmarks.
#[derive(Debug, Clone)]
pub struct EchoAgent {
    delay: Duration,
}

impl EchoAgent {
    pub fn new(delay_ms: u64) -> Self {
        Self {
            delay: Duration::from_millis(delay_ms),
        }
    }
}

/// Splits `content` into words, each with the whitespace after it; leading whitespace goes
/// with the first word. The pieces concatenate to `content` exactly.
pub fn echo_words(content: &str) -> Vec<&str> {
    let mut words = Vec::new();
    let mut start = 0;
    let mut seen_word = false;
    let mut in_space = false;
    for (i, c) in content.char_indices() {
        if c.is_whitespace() {
            in_space = true;
        } else {
            if in_space && seen_word {
                words.push(&content[start..i]);
                start = i;
            }
            seen_word = true;
            in_space = false;
        }
    }
    if start < content.len() {
        words.push(&content[start..]);
    }
    words
}

impl Agent for EchoAgent {
    fn run(
        &self,
        request: AgentRequest,
        outputs: OutputSink,
        cancel: CancellationToken,
    ) -> BoxFuture<'static, AgentResult> {
        let delay = self.delay;
        async move {
            let content = request.interaction.content;
            for word in echo_words(&content) {
                if !delay.is_zero() {
                    tokio::select! {
                        _ = cancel.cancelled() => return Ok(None),
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
                if outputs
                    .send(TaskOutput::Delta(word.to_string()))
                    .await
                    .is_err()
                {
                    // The runner is gone: the task was cancelled.
                    return Ok(None);
                }
            }
            Ok(Some(content))
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::echo_words;

    #[test]
    fn words_keep_their_trailing_whitespace() {
        assert_eq!(
            echo_words("hello  big\tworld\n"),
            ["hello  ", "big\t", "world\n"]
        );
        assert_eq!(echo_words("  lead x"), ["  lead ", "x"]);
        assert_eq!(echo_words("one"), ["one"]);
        assert!(echo_words("").is_empty());
        for s in ["a b c", " x ", "ünï cödé  ok", "   "] {
            assert_eq!(echo_words(s).concat(), s);
        }
    }
}
