//! The WebSocket side of the benchmark: a subscriber that reads a session's events for a
//! measured window — the latency of each (its `at` → receipt) and the continuity of its seqs
//! — and the sum of what many subscribers saw. Used by the fan-out and cluster scenarios.

use std::time::{Duration, Instant};

use super::{Latencies, Window};

/// What a WebSocket stream yields.
pub(super) type WsMessage =
    Result<tokio_tungstenite::tungstenite::Message, tokio_tungstenite::tungstenite::Error>;

/// The WebSocket endpoint of `session` on the server at `url`.
pub(super) fn session_ws_url(url: &str, session: &str) -> String {
    format!(
        "{}/v1/sessions/{session}/ws",
        url.replacen("http://", "ws://", 1)
    )
}

/// Events received by a set of WebSocket subscribers in a measured window.
#[derive(Debug, Clone)]
pub(super) struct Delivery {
    pub(super) subscribers: usize,
    /// Events received per second, summed over the subscribers.
    pub(super) per_second: f64,
    /// Event creation (`at`, millisecond precision) to receipt.
    pub(super) latency: Latencies,
    /// The same, only for subscribers on another node than the one that ran the event's task
    /// (cluster scenario).
    pub(super) remote_latency: Option<Latencies>,
    /// Seqs missing from, and seqs repeated in, each subscriber's stream (summed).
    pub(super) gaps: u64,
    pub(super) duplicates: u64,
    /// Subscribers whose socket the server closed before the window ended.
    pub(super) closed_early: usize,
}

/// What one WebSocket subscriber saw.
#[derive(Debug, Default)]
pub(super) struct Received {
    /// Latency (`at` → receipt, ms) of each event received in the window.
    pub(super) latencies: Vec<u32>,
    /// Seqs missing from the stream, and events whose seq was not above the last one, over
    /// the whole subscription.
    pub(super) gaps: u64,
    pub(super) duplicates: u64,
    /// The server closed the socket before the window ended.
    pub(super) closed_early: bool,
}

/// The number right after `"key":` in a frame, e.g. `"seq":42`.
pub(super) fn number_after(text: &str, key: &str) -> Option<i64> {
    let rest = &text[text.find(key)? + key.len()..];
    let end = rest
        .find(|c: char| !c.is_ascii_digit() && c != '-')
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// The text right after `"key":"` in a frame, up to the closing quote, e.g. the event type
/// after `"type":"`.
pub(super) fn string_after<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let rest = &text[text.find(key)? + key.len()..];
    rest.get(..rest.find('"')?)
}

/// Milliseconds from an event frame's `at` (its creation, millisecond precision) to
/// `receipt`; 0 where the clocks disagree.
pub(super) fn delivery_ms(text: &str, receipt: baton::model::Millis) -> Option<u32> {
    // `"at":"…"` sits right after the type in every envelope.
    let at = text
        .find("\"at\":\"")
        .and_then(|i| text.get(i + 6..i + 30))
        .and_then(baton::model::Millis::parse_rfc3339)?;
    let ms = (receipt.0 - at.0).max(0);
    Some(u32::try_from(ms).unwrap_or(u32::MAX))
}

/// The continuity of one subscriber's seqs, from its hello's `last_seq` on.
#[derive(Debug, Default)]
pub(super) struct SeqCheck {
    last_seq: Option<i64>,
    /// Seqs missing from the stream, and events whose seq was not above the last one.
    pub(super) gaps: u64,
    pub(super) duplicates: u64,
}

impl SeqCheck {
    /// A `hello` frame: the seqs that follow continue from its `last_seq`.
    pub(super) fn hello(&mut self, text: &str) {
        self.last_seq = number_after(text, "\"last_seq\":");
    }

    /// An `event` frame.
    pub(super) fn event(&mut self, text: &str) {
        if let Some(seq) = number_after(text, "\"seq\":") {
            match self.last_seq {
                Some(last) if seq <= last => self.duplicates += 1,
                Some(last) => self.gaps += u64::try_from(seq - last - 1).unwrap_or(0),
                None => {}
            }
            self.last_seq = Some(self.last_seq.map_or(seq, |last| last.max(seq)));
        }
    }
}

/// Reads a subscriber's frames until half a second after the window: the latency of each
/// event in the window, and the continuity of its seqs (from the hello's `last_seq` on).
pub(super) async fn receive_events(
    mut socket: impl futures_util::Stream<Item = WsMessage> + Unpin,
    window: Window,
) -> Received {
    use futures_util::StreamExt;
    let mut received = Received::default();
    let mut seqs = SeqCheck::default();
    let stop = tokio::time::sleep_until((window.end + Duration::from_millis(500)).into());
    tokio::pin!(stop);
    loop {
        let message = tokio::select! {
            _ = &mut stop => break,
            m = socket.next() => m,
        };
        let text = match message {
            Some(Ok(tokio_tungstenite::tungstenite::Message::Text(text))) => text,
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => {
                received.closed_early = Instant::now() < window.end;
                break;
            }
        };
        let at_receipt = baton::model::Millis::now();
        let now = Instant::now();
        if text.starts_with("{\"kind\":\"hello\"") {
            seqs.hello(&text);
            continue;
        }
        if !text.starts_with("{\"kind\":\"event\"") {
            continue;
        }
        seqs.event(&text);
        if !window.contains(now) {
            continue;
        }
        if let Some(ms) = delivery_ms(&text, at_receipt) {
            received.latencies.push(ms);
        }
    }
    received.gaps = seqs.gaps;
    received.duplicates = seqs.duplicates;
    received
}

impl Delivery {
    /// Sums what the subscribers received in `window`; `None` if no event arrived.
    pub(super) fn from(received: &[Received], window: Window) -> Option<Self> {
        let count: usize = received.iter().map(|r| r.latencies.len()).sum();
        Some(Self {
            subscribers: received.len(),
            per_second: count as f64 / window.seconds(),
            latency: Latencies::from_ms(received.iter().flat_map(|r| r.latencies.iter().copied()))?,
            remote_latency: None,
            gaps: received.iter().map(|r| r.gaps).sum(),
            duplicates: received.iter().map(|r| r.duplicates).sum(),
            closed_early: received.iter().filter(|r| r.closed_early).count(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn number_after_reads_the_field() {
        let frame = r#"{"kind":"event","seq":42,"session":"s","type":"task.delta"}"#;
        assert_eq!(number_after(frame, "\"seq\":"), Some(42));
        assert_eq!(number_after(frame, "\"last_seq\":"), None);
        assert_eq!(string_after(frame, "\"type\":\""), Some("task.delta"));
        assert_eq!(string_after(frame, "\"at\":\""), None);
    }

    #[test]
    fn seq_check_counts_gaps_and_duplicates_after_the_hello() {
        let mut seqs = SeqCheck::default();
        seqs.hello(r#"{"kind":"hello","session":{"id":"s","last_seq":4}}"#);
        for seq in [5, 7, 7, 8] {
            seqs.event(&format!(r#"{{"kind":"event","seq":{seq}}}"#));
        }
        assert_eq!((seqs.gaps, seqs.duplicates), (1, 1));
    }

    #[test]
    fn delivery_ms_reads_the_at_of_the_envelope() {
        let frame = r#"{"kind":"event","seq":1,"session":"s","type":"task.delta","at":"2026-11-28T08:00:00.123Z","data":{}}"#;
        let at = baton::model::Millis::parse_rfc3339("2026-11-28T08:00:00.123Z");
        let receipt = baton::model::Millis(at.map_or(0, |m| m.0) + 7);
        assert_eq!(delivery_ms(frame, receipt), Some(7));
    }
}
