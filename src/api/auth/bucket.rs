//! Rate buckets: a key's bucket and counters, shared by every request made with the key or a
//! token it minted, and the token bucket itself (also a WebSocket's operations).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crate::api::error::ApiError;

/// A key's rate bucket and counters, shared by every request and WebSocket operation made
/// with the key or with a token it minted.
pub(super) struct Meter {
    pub(super) bucket: Option<Mutex<Bucket>>,
    /// Requests (and WebSocket operations) it allowed, and those refused past its rate (for
    /// `/metrics`).
    pub(super) requests: AtomicU64,
    pub(super) limited: AtomicU64,
}

impl std::fmt::Debug for Meter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Meter")
            .field("limited", &self.bucket.is_some())
            .finish()
    }
}

impl Meter {
    pub(super) fn charge(&self) -> Result<(), ApiError> {
        if let Some(bucket) = &self.bucket {
            let taken = bucket.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Err(retry_after) = taken {
                self.limited.fetch_add(1, Ordering::Relaxed);
                return Err(ApiError::rate_limited(retry_after));
            }
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// A token bucket: `rate` per second, up to `2 × rate`, starting full (a key's requests, a
/// WebSocket's operations).
pub(crate) struct Bucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    pub(crate) fn new(rate: f64) -> Self {
        Self {
            rate,
            tokens: 2.0 * rate,
            last: Instant::now(),
        }
    }

    /// Takes one token, or says how many seconds until one is there.
    pub(crate) fn take(&mut self) -> Result<(), u64> {
        let now = Instant::now();
        let elapsed = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(2.0 * self.rate);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - self.tokens) / self.rate).ceil() as u64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_refill_at_their_rate() {
        let mut b = Bucket::new(1.0);
        assert!(b.take().is_ok());
        assert!(b.take().is_ok());
        assert_eq!(b.take(), Err(1));
    }
}
