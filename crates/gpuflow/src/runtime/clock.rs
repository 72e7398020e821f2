//! Wall-clock milliseconds that never go backwards: the wall clock is read once at start and
//! advanced by the monotonic clock, so a clock step cannot fire or delay every timer at once.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

#[derive(Clone, Copy, Debug)]
pub struct Clock {
    base_ms: u64,
    start: Instant,
}

impl Clock {
    pub fn start() -> Clock {
        let base_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        Clock { base_ms, start: Instant::now() }
    }

    pub fn now_ms(&self) -> u64 {
        self.base_ms + self.start.elapsed().as_millis() as u64
    }

    pub fn instant_at(&self, ms: u64) -> Instant {
        self.start + Duration::from_millis(ms.saturating_sub(self.base_ms))
    }
}
