//! The `text/event-stream` decoder of a streamed reply: bytes in as they arrive, each event's
//! data out.

/// Largest server-sent event accepted (one chunk of a chat completion is far smaller).
const MAX_EVENT_BYTES: usize = 4 * 1024 * 1024;

/// Why the event stream could not be decoded.
#[derive(Debug, thiserror::Error)]
pub(super) enum SseError {
    #[error("an event line is not UTF-8")]
    NotUtf8,
    #[error("an event is larger than {MAX_EVENT_BYTES} bytes")]
    TooLarge,
}

/// Incremental decoder of a `text/event-stream` body: bytes go in as they arrive (split
/// anywhere, even inside a line or a UTF-8 sequence) and each event's data comes out, its
/// `data:` lines joined with `\n`. Lines end with `\n` or `\r\n`; comments (`:`) and other
/// fields are skipped. Its buffers are reused from event to event.
#[derive(Default)]
pub(super) struct SseDecoder {
    /// Received bytes; those before `start` are consumed.
    pub(super) pending: Vec<u8>,
    pub(super) start: usize,
    /// Bytes before this index are known to hold no newline (a long line is scanned once).
    pub(super) scan_from: usize,
    /// The data of the event being read.
    pub(super) data: String,
    pub(super) has_data: bool,
    /// `data` was handed out by the previous call: clear it before reading on.
    pub(super) handed_out: bool,
}

impl SseDecoder {
    pub(super) fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 {
            self.pending.drain(..self.start);
            self.scan_from -= self.start;
            self.start = 0;
        }
        self.pending.extend_from_slice(bytes);
    }

    /// The data of the next complete event, if one is complete.
    pub(super) fn next_event(&mut self) -> Result<Option<&str>, SseError> {
        if self.handed_out {
            self.data.clear();
            self.has_data = false;
            self.handed_out = false;
        }
        loop {
            let Some(newline) = self.pending[self.scan_from..]
                .iter()
                .position(|&b| b == b'\n')
            else {
                self.scan_from = self.pending.len();
                if self.pending.len() - self.start + self.data.len() > MAX_EVENT_BYTES {
                    return Err(SseError::TooLarge);
                }
                return Ok(None);
            };
            let (line_start, mut line_end) = (self.start, self.scan_from + newline);
            self.start = line_end + 1;
            self.scan_from = self.start;
            if line_end > line_start && self.pending[line_end - 1] == b'\r' {
                line_end -= 1;
            }
            let line = &self.pending[line_start..line_end];
            if line.is_empty() {
                if self.has_data {
                    self.handed_out = true;
                    return Ok(Some(&self.data));
                }
                continue;
            }
            if line[0] == b':' {
                continue;
            }
            let (field, value) = match line.iter().position(|&b| b == b':') {
                Some(colon) => (&line[..colon], &line[colon + 1..]),
                None => (line, &line[line.len()..]),
            };
            if field != b"data" {
                continue;
            }
            let value = value.strip_prefix(b" ").unwrap_or(value);
            let value = std::str::from_utf8(value).map_err(|_| SseError::NotUtf8)?;
            if self.data.len() + value.len() >= MAX_EVENT_BYTES {
                return Err(SseError::TooLarge);
            }
            if self.has_data {
                self.data.push('\n');
            }
            self.data.push_str(value);
            self.has_data = true;
        }
    }

    /// At the end of the body: the event it ended in, when its last line or blank line
    /// was missing (only a bare `[DONE]` is worth reading from there).
    pub(super) fn finish(&mut self) -> Result<Option<&str>, SseError> {
        self.push(b"\n\n");
        self.next_event()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `body` split at `cuts` and collects the events.
    fn decode(body: &[u8], cuts: &[usize]) -> Vec<String> {
        let mut decoder = SseDecoder::default();
        let mut events = Vec::new();
        let mut from = 0;
        for &cut in cuts.iter().chain(std::iter::once(&body.len())) {
            decoder.push(&body[from..cut]);
            from = cut;
            while let Some(data) = decoder.next_event().expect("decodes") {
                events.push(data.to_string());
            }
        }
        events
    }

    #[test]
    fn events_survive_every_split() {
        let body = ": comment\r\nevent: x\r\ndata: {\"a\":\"hé🙂\"}\r\n\r\nid: 7\ndata:one\ndata: two\n\nretry: 5\n\n\ndata\n\ndata: [DONE]\n\n";
        let expected = vec![
            "{\"a\":\"hé🙂\"}".to_string(),
            "one\ntwo".into(),
            "".into(),
            "[DONE]".into(),
        ];
        assert_eq!(decode(body.as_bytes(), &[]), expected);
        for a in 0..=body.len() {
            assert_eq!(decode(body.as_bytes(), &[a]), expected, "cut at {a}");
            for b in a..=body.len() {
                assert_eq!(decode(body.as_bytes(), &[a, b]), expected, "cuts {a} {b}");
            }
        }
    }

    #[test]
    fn finish_yields_an_event_that_lacks_its_blank_line() {
        let mut decoder = SseDecoder::default();
        decoder.push(b"data: [DONE]");
        assert_eq!(decoder.next_event().expect("ok"), None);
        assert_eq!(decoder.finish().expect("ok"), Some("[DONE]"));
        let mut decoder = SseDecoder::default();
        decoder.push(b"data: {\"cho");
        assert_eq!(decoder.finish().expect("ok"), Some("{\"cho"));
    }

    #[test]
    fn invalid_utf8_and_huge_events_are_errors() {
        let mut decoder = SseDecoder::default();
        decoder.push(b"data: \xff\xfe\n\n");
        assert!(matches!(decoder.next_event(), Err(SseError::NotUtf8)));
        let mut decoder = SseDecoder::default();
        decoder.push(b"data: ");
        decoder.push(&vec![b'x'; MAX_EVENT_BYTES + 1]);
        assert!(matches!(decoder.next_event(), Err(SseError::TooLarge)));
    }
}
