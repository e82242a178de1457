//! The built-in echo agent: replies with the request's content exactly, one word per delta
//! (a word with the whitespace that follows it), the n-th `n × delay_ms` after the start.

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
            // Words fall due on a fixed schedule from the start, so the pace does not drift
            // by the time each hand-over takes (nor by the timer's rounding of each sleep).
            let start = tokio::time::Instant::now();
            for (i, word) in echo_words(&content).into_iter().enumerate() {
                if !delay.is_zero() {
                    let n = u32::try_from(i + 1).unwrap_or(u32::MAX);
                    tokio::select! {
                        _ = cancel.cancelled() => return Ok(None),
                        _ = tokio::time::sleep_until(start + delay.saturating_mul(n)) => {}
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
    use super::*;
    use crate::model::{InteractionId, Millis, SessionId, Status};

    fn request(content: &str) -> AgentRequest {
        AgentRequest {
            interaction: crate::model::Interaction {
                id: InteractionId::parse("01900000-0000-7000-8000-000000000000").expect("id"),
                session: SessionId::new(&crate::model::Tenant::default_tenant(), "s")
                    .expect("session"),
                content: content.to_string(),
                metadata: Default::default(),
                status: Status::Running,
                response: String::new(),
                error: None,
                request: None,
                answers: Vec::new(),
                cancel_reason: None,
                created_at: Millis(0),
                started_at: None,
                finished_at: None,
                input_deadline: None,
            },
            session: None,
            history: Vec::new(),
            context: Default::default(),
        }
    }

    /// A hand-over that stalls once (a busy runner) must not slow the pace for good: 50 words
    /// at 20 ms each still end at 1 s, not 1 s plus the stall.
    #[tokio::test(start_paused = true)]
    async fn the_pace_holds_when_a_hand_over_stalls() {
        let (outputs, mut received) = tokio::sync::mpsc::channel(1);
        let content = vec!["w"; 50].join(" ");
        let started = tokio::time::Instant::now();
        let agent = EchoAgent::new(20).run(request(&content), outputs, CancellationToken::new());
        let reader = tokio::spawn(async move {
            let mut words = 0;
            while received.recv().await.is_some() {
                words += 1;
                if words == 1 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            words
        });
        assert_eq!(agent.await.expect("completes"), Some(content));
        assert_eq!(reader.await.expect("reader"), 50);
        let took = started.elapsed();
        assert!(
            took < Duration::from_millis(1_030),
            "50 words at 20 ms took {took:?}"
        );
        assert!(took >= Duration::from_millis(1_000), "{took:?}");
    }

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
