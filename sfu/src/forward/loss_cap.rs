//! A cap on what a subscriber is sent, from the loss its link reports: GCC's loss rule. A
//! delay-based estimate lags a link that narrowed under a short queue (the queue fills at
//! once, its delay stops growing, and packets drop instead); loss says so within a second.

use std::time::{Duration, Instant};

/// Transport-wide loss toward a subscriber above which its downlink is taken to be congested
/// (GCC's loss threshold): the media sent is cut to `1 - loss / 2` of what it was, whatever
/// the estimate says. A delay-based estimate lags a link that narrowed under a short queue:
/// the queue is full at once, its delay stops growing, and packets drop instead. Lower reacts
/// to lighter congestion but also to random loss that less media would not cure; higher lets
/// more loss through.
pub const LOSS_HIGH: f32 = 0.10;

/// Loss below which a subscriber's link is taken to be clear, so a loss cap may grow.
pub const LOSS_LOW: f32 = 0.02;

/// The least time between two cuts for loss. Loss is reported over the last second; a cut
/// takes effect at the next keyframe of the lower layer, so a report right after a cut still
/// shows the loss from before it. Shorter cuts deeper on stale reports; longer leaves
/// congestion longer.
pub const LOSS_REACT: Duration = Duration::from_millis(1500);

/// How fast a loss cap grows per second while loss stays under [`LOSS_LOW`]: slowly, so the
/// layer that caused the loss is retried only after a while. The cap goes at once when the
/// estimate falls to it (the estimator has caught up) or rises [`LOSS_CAP_LIFT`] above where
/// it was (its probes found room, e.g. the link widened again).
pub const LOSS_CAP_GROWTH: f64 = 1.08;

/// See [`LOSS_CAP_GROWTH`].
pub const LOSS_CAP_LIFT: f64 = 1.2;

/// The longest a loss cap lasts without new loss to renew it. A paused subscriber that gets
/// no audio either sends its estimator nothing to measure, so the estimate may never rise
/// to lift the cap; after this the lowest layers are tried again. Shorter retries a narrow
/// link more often (each try loses packets until the next cut); longer keeps a video paused
/// longer after a link recovered unseen.
pub const LOSS_CAP_MAX_AGE: Duration = Duration::from_secs(10);

/// Loss is acted on only while at least this much is sent: a loss share over a few audio
/// packets, or at the start of a connection, says little about what the link carries.
pub const LOSS_MIN_SENDING: u64 = 100_000;

/// The cap as last cut.
#[derive(Debug, Clone, Copy)]
struct Cut {
    bps: f64,
    set_at: Instant,
    grown_at: Instant,
    /// The estimate when the cap was first cut.
    estimate: u64,
}

/// The loss cap of one subscriber (none while its link loses little).
#[derive(Debug, Clone, Default)]
pub struct LossCap {
    cut: Option<Cut>,
}

impl LossCap {
    /// The loss cap, if one is in force: set when loss passes [`LOSS_HIGH`], grown while loss
    /// stays under [`LOSS_LOW`]. It goes when the estimate rises [`LOSS_CAP_LIFT`] above its
    /// value at the cut (a probe found room), or when nothing is paused and it no longer
    /// binds (the estimate has fallen under it).
    pub fn update(
        &mut self,
        estimate: u64,
        loss: Option<f32>,
        sending: u64,
        any_paused: bool,
        now: Instant,
    ) -> Option<u64> {
        let loss = loss.unwrap_or(0.0);
        if loss > LOSS_HIGH
            && sending >= LOSS_MIN_SENDING
            && self
                .cut
                .is_none_or(|c| now.saturating_duration_since(c.set_at) >= LOSS_REACT)
        {
            let bps = sending as f64 * (1.0 - f64::from(loss) / 2.0);
            let bps = self.cut.map_or(bps, |c| c.bps.min(bps));
            self.cut = Some(Cut {
                bps,
                set_at: now,
                grown_at: now,
                estimate: self.cut.map_or(estimate, |c| c.estimate),
            });
        }
        let cap = self.cut.as_mut()?;
        let since = now.saturating_duration_since(cap.grown_at).as_secs_f64();
        cap.grown_at = now;
        if loss < LOSS_LOW {
            cap.bps *= LOSS_CAP_GROWTH.powf(since);
        }
        let room_found = estimate as f64 >= cap.estimate as f64 * LOSS_CAP_LIFT;
        let redundant = !any_paused && cap.bps >= estimate as f64;
        let expired = now.saturating_duration_since(cap.set_at) >= LOSS_CAP_MAX_AGE;
        if room_found || redundant || expired {
            self.cut = None;
            return None;
        }
        Some(cap.bps.round() as u64)
    }
}

impl LossCap {
    /// Raise a cap in force to at least `bps`. For a cap cut from a loss report that more
    /// than the lowest layers caused (see `forward::allocate::LOSS_PAUSE_MARGIN`): the cut is
    /// taken from what is allocated now, which after a move down is already the lower layer,
    /// so a report still counting the old layer's loss would cut it below what the lower
    /// layer needs, and the cap would pause it once that loss had left the lookback.
    pub fn hold_at_least(&mut self, bps: u64) {
        if let Some(c) = self.cut.as_mut() {
            c.bps = c.bps.max(bps as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heavy_loss_cuts_what_was_sent_and_the_cap_grows_back_slowly() {
        let t0 = Instant::now();
        let mut c = LossCap::default();
        assert_eq!(
            c.update(2_000_000, Some(0.05), 1_000_000, false, t0),
            None,
            "5 %: no cut"
        );
        assert_eq!(
            c.update(2_000_000, Some(0.2), 1_000_000, false, t0),
            Some(900_000),
            "20 %: 1 - 0.2/2 of the 1 Mbit/s sent"
        );
        // The same report again soon after: no second cut.
        let soon = t0 + LOSS_REACT / 2;
        assert_eq!(
            c.update(2_000_000, Some(0.2), 500_000, false, soon),
            Some(900_000)
        );
        // A second of clear link: 8 % more.
        let later = soon + Duration::from_secs(1);
        let grown = c
            .update(2_000_000, Some(0.0), 500_000, true, later)
            .unwrap();
        assert!((971_000..=973_000).contains(&grown), "{grown}");
    }

    #[test]
    fn the_cap_goes_when_a_probe_finds_room_or_it_is_old() {
        let t0 = Instant::now();
        let mut c = LossCap::default();
        c.update(1_000_000, Some(0.5), 1_000_000, true, t0);
        assert_eq!(c.update(1_190_000, None, 0, true, t0), Some(750_000));
        assert_eq!(
            c.update(1_200_000, None, 0, true, t0),
            None,
            "the estimate rose 1.2x"
        );
        c.update(1_000_000, Some(0.5), 1_000_000, true, t0);
        let old = t0 + LOSS_CAP_MAX_AGE;
        assert_eq!(
            c.update(1_000_000, None, 0, true, old),
            None,
            "no new loss for 10 s"
        );
    }

    #[test]
    fn a_cap_held_at_least_never_falls_below_it_and_grows_from_there() {
        let t0 = Instant::now();
        let mut c = LossCap::default();
        assert_eq!(
            c.update(2_000_000, Some(0.5), 200_000, true, t0),
            Some(150_000)
        );
        c.hold_at_least(180_000);
        assert_eq!(c.update(2_000_000, None, 0, true, t0), Some(180_000));
        c.hold_at_least(100_000);
        assert_eq!(
            c.update(2_000_000, None, 0, true, t0),
            Some(180_000),
            "holding lower changes nothing"
        );
        let later = t0 + Duration::from_secs(1);
        let grown = c.update(2_000_000, Some(0.0), 0, true, later).unwrap();
        assert!((194_000..=195_000).contains(&grown), "{grown}");
    }

    #[test]
    fn loss_over_little_traffic_is_ignored() {
        let mut c = LossCap::default();
        assert_eq!(
            c.update(1_000_000, Some(0.9), 50_000, false, Instant::now()),
            None
        );
    }

    #[test]
    fn a_cap_above_the_estimate_with_nothing_paused_is_dropped() {
        let t0 = Instant::now();
        let mut c = LossCap::default();
        c.update(3_000_000, Some(0.2), 1_000_000, false, t0);
        assert_eq!(
            c.update(800_000, None, 0, true, t0),
            Some(900_000),
            "binds a pause"
        );
        assert_eq!(c.update(800_000, None, 0, false, t0), None, "binds nothing");
    }
}
