//! A send-side estimate that stopped moving while the subscriber is held back: str0m 0.25's
//! estimator can lock itself there, and this notices it so that the shard restarts it.
//!
//! How it locks (seen in Chromium through the focus, one run in four, after a subscriber's
//! tile shrank and grew again): a probe sent while little media flowed measures low, and its
//! result becomes both the estimate and the proven link capacity. The loss-based controller
//! then sits in its "decreasing" state with no loss at all; while the subscriber receives
//! less than 65 % of the estimate (application-limited, which a held-back subscriber is), the
//! loss-based estimate may not rise above that proven capacity, and in that state the probe
//! controller sends no probe. Nothing can move it again: the estimate stayed at 137 kbit/s
//! for the rest of the call on a loopback link, with no loss.
//!
//! The sign is an estimate that has not changed at all for [`STALL_AFTER`] while allocation
//! holds the subscriber below what its screens want, with loss at most
//! [`LOSS_LOW`](super::loss_cap::LOSS_LOW). A live estimator moves all the time (its
//! delay-based rate control changes the value at every update), and one that holds the
//! subscriber back for loss sees loss. Restarting it from the value it is stuck at starts
//! its initial probing, which measures the link again.

use std::time::{Duration, Instant};

use super::loss_cap::LOSS_LOW;

/// How long an unchanged estimate that holds a subscriber back is trusted. Shorter restarts
/// estimators that were only holding steady (each restart probes the link with a burst at up
/// to a few times the estimate); longer leaves a locked subscriber on low video for longer.
pub const STALL_AFTER: Duration = Duration::from_secs(6);

/// The least time between two restarts of one subscriber's estimator. On a link that really
/// is as narrow as the estimate, the estimator locks again after each restart, and only the
/// next restart finds out when the link widens: this bounds how long a subscriber stays low
/// after its link recovers (a restart probes with a few short bursts of padding, tens of
/// milliseconds at up to a few times the estimate, which a router's queue absorbs). Was 30 s:
/// in the simulation a subscriber whose estimator had restarted while its link was narrow
/// then stayed on the lowest layer for 30 s after the link widened. Shorter climbs back
/// sooner; longer probes a narrow link less often.
pub const RESTART_INTERVAL: Duration = Duration::from_secs(8);

/// Watches one subscriber's estimate.
#[derive(Debug, Clone, Default)]
pub struct StallWatch {
    /// The estimate last seen.
    value: Option<u64>,
    /// Since when the estimate has held the subscriber back unchanged, with low loss.
    quiet_since: Option<Instant>,
    last_restart: Option<Instant>,
}

impl StallWatch {
    /// A new estimate (or the same value again).
    pub fn on_estimate(&mut self, bps: u64) {
        if self.value.replace(bps) != Some(bps) {
            self.quiet_since = None;
        }
    }

    /// Called each allocation round: whether the estimator should be restarted now.
    /// `held_back`: the subscriber gets less than its screens want and more than the estimate
    /// would be needed for that; `loss`: the latest share of packets lost toward it.
    pub fn stalled(&mut self, held_back: bool, loss: Option<f32>, now: Instant) -> bool {
        if self.value.is_none() || !held_back || loss.is_none_or(|l| l > LOSS_LOW) {
            self.quiet_since = None;
            return false;
        }
        let since = *self.quiet_since.get_or_insert(now);
        let due = self
            .last_restart
            .is_none_or(|t| now.saturating_duration_since(t) >= RESTART_INTERVAL);
        if now.saturating_duration_since(since) < STALL_AFTER || !due {
            return false;
        }
        self.quiet_since = None;
        self.last_restart = Some(now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TICK: Duration = Duration::from_millis(100);

    /// Rounds every 100 ms from `from` for `d`; the first time it says stalled, if ever.
    fn rounds(
        w: &mut StallWatch,
        from: Instant,
        d: Duration,
        held_back: bool,
        loss: Option<f32>,
        mut each: impl FnMut(&mut StallWatch, Instant),
    ) -> Option<Duration> {
        let mut t = from;
        while t < from + d {
            each(w, t);
            if w.stalled(held_back, loss, t) {
                return Some(t - from);
            }
            t += TICK;
        }
        None
    }

    #[test]
    fn an_estimate_stuck_while_holding_the_subscriber_back_is_restarted_then_left_a_while() {
        let t0 = Instant::now();
        let mut w = StallWatch::default();
        w.on_estimate(137_000);
        let at = rounds(&mut w, t0, STALL_AFTER * 2, true, Some(0.0), |w, _| {
            w.on_estimate(137_000)
        });
        assert_eq!(at, Some(STALL_AFTER));
        let t1 = t0 + STALL_AFTER;
        let again = rounds(&mut w, t1, RESTART_INTERVAL * 2, true, Some(0.0), |_, _| {});
        assert_eq!(
            again,
            Some(RESTART_INTERVAL),
            "not again before the interval"
        );
    }

    #[test]
    fn a_moving_estimate_loss_or_a_subscriber_that_has_what_it_wants_is_left_alone() {
        let t0 = Instant::now();
        let mut w = StallWatch::default();
        let mut bps = 500_000;
        let moving = rounds(&mut w, t0, STALL_AFTER * 3, true, Some(0.0), |w, _| {
            bps += 1;
            w.on_estimate(bps);
        });
        assert_eq!(moving, None);
        let mut w = StallWatch::default();
        w.on_estimate(500_000);
        assert_eq!(
            rounds(&mut w, t0, STALL_AFTER * 3, true, Some(0.05), |_, _| {}),
            None
        );
        assert_eq!(
            rounds(&mut w, t0, STALL_AFTER * 3, false, Some(0.0), |_, _| {}),
            None
        );
        assert_eq!(
            rounds(&mut w, t0, STALL_AFTER * 3, true, None, |_, _| {}),
            None
        );
        assert!(
            !StallWatch::default().stalled(true, Some(0.0), t0 + STALL_AFTER * 9),
            "no estimate yet"
        );
    }

    #[test]
    fn the_quiet_time_starts_again_after_any_interruption() {
        let t0 = Instant::now();
        let mut w = StallWatch::default();
        w.on_estimate(300_000);
        assert!(!w.stalled(true, Some(0.0), t0));
        assert!(!w.stalled(true, Some(0.0), t0 + STALL_AFTER - TICK));
        assert!(
            !w.stalled(false, Some(0.0), t0 + STALL_AFTER),
            "not held back"
        );
        let t1 = t0 + STALL_AFTER + TICK;
        assert!(!w.stalled(true, Some(0.0), t1));
        assert!(!w.stalled(true, Some(0.0), t1 + STALL_AFTER - TICK));
        assert!(w.stalled(true, Some(0.0), t1 + STALL_AFTER));
    }
}
