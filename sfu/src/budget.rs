//! A token bucket: how much of something one peer may have the media plane do per second.
//! Pure (fed with `now`), so it is tested with simulated time.

use std::time::Instant;

/// Allows bursts of up to `burst` events, refilled at `per_second`.
#[derive(Debug, Clone)]
pub struct RateBudget {
    burst: f64,
    per_second: f64,
    tokens: f64,
    last: Instant,
}

impl RateBudget {
    /// A full bucket at `now`.
    pub fn new(burst: u32, per_second: u32, now: Instant) -> Self {
        RateBudget {
            burst: f64::from(burst.max(1)),
            per_second: f64::from(per_second),
            tokens: f64::from(burst.max(1)),
            last: now,
        }
    }

    /// Take one event's worth if there is one; false means over budget.
    pub fn allow(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_burst_passes_then_only_the_rate() {
        let t0 = Instant::now();
        let mut b = RateBudget::new(10, 5, t0);
        assert_eq!((0..20).filter(|_| b.allow(t0)).count(), 10, "the burst");
        // One second later, five more.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!((0..20).filter(|_| b.allow(t1)).count(), 5, "the rate");
        // A long quiet spell refills to the burst, no more.
        let t2 = t1 + Duration::from_secs(3600);
        assert_eq!((0..20).filter(|_| b.allow(t2)).count(), 10);
    }

    #[test]
    fn time_going_backwards_grants_nothing() {
        let t0 = Instant::now() + Duration::from_secs(10);
        let mut b = RateBudget::new(1, 1, t0);
        assert!(b.allow(t0));
        assert!(!b.allow(t0 - Duration::from_secs(5)));
        assert!(!b.allow(t0), "the earlier instant did not reset the clock");
    }
}
