//! Retry and backoff policy.

/// How often a stage is tried and how long to wait between tries.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Total tries, the first included. 1 means no retry.
    pub max_attempts: u32,
    pub initial_backoff_ms: u64,
    pub multiplier: f64,
    pub max_backoff_ms: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { max_attempts: 3, initial_backoff_ms: 1_000, multiplier: 2.0, max_backoff_ms: 60_000 }
    }
}

impl RetryPolicy {
    pub const fn no_retry() -> Self {
        RetryPolicy { max_attempts: 1, initial_backoff_ms: 0, multiplier: 1.0, max_backoff_ms: 0 }
    }

    /// Delay before the retry that follows failed try number `failures` (1-based), or `None`
    /// when the budget is spent.
    pub fn backoff_after(&self, failures: u32) -> Option<u64> {
        if failures >= self.max_attempts {
            return None;
        }
        let exp = failures.saturating_sub(1).min(64) as i32;
        let delay = self.initial_backoff_ms as f64 * self.multiplier.powi(exp);
        Some(if delay.is_finite() { (delay as u64).min(self.max_backoff_ms) } else { self.max_backoff_ms })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps_then_stops() {
        let p = RetryPolicy { max_attempts: 5, initial_backoff_ms: 1_000, multiplier: 2.0, max_backoff_ms: 3_000 };
        let delays: Vec<_> = (1..=5).map(|n| p.backoff_after(n)).collect();
        assert_eq!(delays, vec![Some(1_000), Some(2_000), Some(3_000), Some(3_000), None]);
        assert_eq!(RetryPolicy::no_retry().backoff_after(1), None);
    }

    #[test]
    fn huge_multiplier_saturates_at_max() {
        let p = RetryPolicy { max_attempts: 100, initial_backoff_ms: 1, multiplier: 1e300, max_backoff_ms: 5 };
        assert_eq!(p.backoff_after(99), Some(5));
    }
}
