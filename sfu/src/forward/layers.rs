//! Simulcast layer choice for one subscriber's copy of one track.
//!
//! A publisher may send the same track as several layers (simulcast, told apart by rid). Each
//! subscriber receives exactly one of them at a time, as one continuous stream. Switching to
//! another layer happens only on a keyframe of that layer, so the subscriber's decoder never
//! sees a delta frame that refers to a picture it never got. Until that keyframe arrives the
//! old layer keeps flowing.

use std::time::{Duration, Instant};

use super::quality::Quality;
use super::rate::RateMeter;

/// Temporal layers a layer may carry: VP8's TID has two bits.
const TEMPORAL_LAYERS: usize = 4;

/// A layer with no packets for this long is stalled and not chosen. Shorter reacts faster to a
/// publisher that dropped a layer (Chrome drops its top layer under CPU or bandwidth pressure);
/// longer rides out bursts of loss. Two seconds is about one keyframe interval.
pub const LAYER_STALL: Duration = Duration::from_secs(2);

/// What to do with one packet of one layer for one subscriber.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// The subscriber's current layer: forward.
    Forward,
    /// A keyframe of the layer the subscriber should move to: forward, it is now current.
    Switch,
    /// Another layer, or the target layer before its keyframe: not for this subscriber.
    Skip,
}

/// Which layer a subscriber gets, and which it is moving to.
#[derive(Debug, Clone)]
pub struct LayerSelector<L> {
    current: Option<L>,
    target: Option<L>,
    /// When we started waiting for a keyframe of the target (to ask again if none comes).
    waiting_since: Option<Instant>,
}

impl<L: Copy + PartialEq> Default for LayerSelector<L> {
    fn default() -> Self {
        LayerSelector {
            current: None,
            target: None,
            waiting_since: None,
        }
    }
}

impl<L: Copy + PartialEq> LayerSelector<L> {
    pub fn current(&self) -> Option<L> {
        self.current
    }

    pub fn target(&self) -> Option<L> {
        self.target
    }

    /// Choose the layer to move to. Returns true if that needs a keyframe of `layer` (a switch
    /// or a first start), which the caller should request from the publisher.
    pub fn set_target(&mut self, layer: L, now: Instant) -> bool {
        if self.target == Some(layer) {
            return false;
        }
        self.target = Some(layer);
        if self.current == Some(layer) {
            self.waiting_since = None;
            return false;
        }
        self.waiting_since = Some(now);
        true
    }

    /// Decide for one packet. `keyframe` is true when the packet starts a keyframe (always true
    /// for audio, which has no inter-frame dependencies that matter here).
    pub fn on_packet(&mut self, layer: L, keyframe: bool) -> Decision {
        if self.target == Some(layer) && self.current != Some(layer) {
            if keyframe {
                self.current = Some(layer);
                self.waiting_since = None;
                return Decision::Switch;
            }
            return Decision::Skip;
        }
        if self.current == Some(layer) {
            Decision::Forward
        } else {
            Decision::Skip
        }
    }

    /// Stop forwarding the current layer while waiting for the target's keyframe: nothing
    /// flows to the subscriber until it comes. Nothing changes when there is no move.
    pub fn leave_current(&mut self) {
        if self.target != self.current {
            self.current = None;
        }
    }

    /// If we have waited at least `retry` for a keyframe of the target, restart the wait and
    /// return the layer to ask a keyframe of again.
    pub fn keyframe_overdue(&mut self, now: Instant, retry: Duration) -> Option<L> {
        let since = self.waiting_since?;
        if now.saturating_duration_since(since) < retry {
            return None;
        }
        self.waiting_since = Some(now);
        self.target
    }

    /// Whether the subscriber is waiting for a keyframe to start or switch.
    pub fn waiting(&self) -> bool {
        self.waiting_since.is_some()
    }
}

/// One layer of a published track: its rank, when it last carried a packet, and its rate.
#[derive(Debug, Clone)]
struct Layer<L> {
    layer: L,
    rank: u8,
    last: Instant,
    rate: RateMeter,
    /// Per temporal layer: when it last carried a packet, and its rate.
    temporal: [Option<(Instant, RateMeter)>; TEMPORAL_LAYERS],
}

/// The layers of one published track, when each last carried a packet and at what rate.
#[derive(Debug, Clone)]
pub struct LayerActivity<L> {
    layers: Vec<Layer<L>>,
}

impl<L> Default for LayerActivity<L> {
    fn default() -> Self {
        LayerActivity { layers: Vec::new() }
    }
}

impl<L: Copy + PartialEq> LayerActivity<L> {
    /// Record a packet of `payload_len` bytes on `layer`, whose quality rank is `rank` (higher
    /// is better), of temporal layer `tid` if the codec says.
    pub fn saw(&mut self, layer: L, rank: u8, tid: Option<u8>, payload_len: usize, now: Instant) {
        let entry = match self.layers.iter().position(|l| l.layer == layer) {
            Some(i) => &mut self.layers[i],
            None => {
                self.layers.push(Layer {
                    layer,
                    rank,
                    last: now,
                    rate: RateMeter::default(),
                    temporal: Default::default(),
                });
                self.layers.last_mut().expect("just pushed")
            }
        };
        // A scalable stream's layer can change rank when the track gains a spatial layer.
        entry.rank = rank;
        entry.last = now;
        entry.rate.add(payload_len, now);
        if let Some(t) = tid.and_then(|t| entry.temporal.get_mut(usize::from(t))) {
            let (last, rate) = t.get_or_insert_with(|| (now, RateMeter::default()));
            *last = now;
            rate.add(payload_len, now);
        }
    }

    /// The best layer that is not stalled, if any.
    pub fn best_active(&self, now: Instant) -> Option<L> {
        self.active(now).max_by_key(|l| l.rank).map(|l| l.layer)
    }

    /// The lowest layer that is not stalled, if any.
    pub fn lowest_active(&self, now: Instant) -> Option<L> {
        self.active(now).min_by_key(|l| l.rank).map(|l| l.layer)
    }

    /// The best active layer whose rank is at most `max_rank`; if every active layer is above
    /// the cap, the lowest active one (something is better than nothing).
    pub fn best_active_capped(&self, now: Instant, max_rank: u8) -> Option<L> {
        self.best_active_within(now, max_rank)
            .or_else(|| self.lowest_active(now))
    }

    /// The active layers whose rank is at most `max_rank`, in ascending rank.
    pub fn active_within(&self, now: Instant, max_rank: u8) -> Vec<L> {
        let mut within: Vec<&Layer<L>> = self.active(now).filter(|l| l.rank <= max_rank).collect();
        within.sort_by_key(|l| l.rank);
        within.into_iter().map(|l| l.layer).collect()
    }

    /// The best active layer whose rank is at most `max_rank`, if there is one.
    pub fn best_active_within(&self, now: Instant, max_rank: u8) -> Option<L> {
        self.active(now)
            .filter(|l| l.rank <= max_rank)
            .max_by_key(|l| l.rank)
            .map(|l| l.layer)
    }

    /// The best rank whose rate is at most `bps`: an active layer's measured rate, else (too
    /// new to measure, or not seen yet: a browser's layers of one picture arrive in any order)
    /// the rank's [`nominal_bps`]. The lowest simulcast rank when none fits.
    pub fn best_rank_fitting(&self, now: Instant, bps: u64) -> u8 {
        let measured = |rank: u8| {
            self.active(now)
                .find(|l| l.rank == rank)
                .and_then(|l| l.rate.bps(now))
        };
        (2..=4)
            .rev()
            .find(|&rank| measured(rank).unwrap_or(nominal_bps(rank)) <= bps)
            .unwrap_or(2)
    }

    /// The steps of the active layers with their rates (bits/s), ascending, for allocation:
    /// each layer whole, and below that, for a layer with temporal layers, its lower frame
    /// rates (temporal layers `0..=t`). A layer too new to have a measured rate counts at its
    /// [`nominal_bps`], its lower frame rates at an even share of that.
    pub fn rates(&self, now: Instant) -> Vec<(Quality, u64)> {
        let mut rates: Vec<(Quality, u64)> = Vec::new();
        for l in self.active(now) {
            let whole = l.rate.bps(now).unwrap_or(nominal_bps(l.rank));
            let tids: Vec<(u8, Option<u64>)> = (0..TEMPORAL_LAYERS as u8)
                .zip(&l.temporal)
                .filter_map(|(t, m)| {
                    let (last, rate) = m.as_ref()?;
                    (now.saturating_duration_since(*last) < LAYER_STALL).then(|| (t, rate.bps(now)))
                })
                .collect();
            let mut sum = 0;
            for (t, bps) in tids.iter().take(tids.len().saturating_sub(1)) {
                sum += bps.unwrap_or(whole / tids.len() as u64);
                rates.push((
                    Quality {
                        rank: l.rank,
                        tid: *t,
                    },
                    sum.min(whole),
                ));
            }
            rates.push((Quality::full(l.rank), whole));
        }
        rates.sort_unstable();
        rates.dedup_by_key(|(q, _)| *q);
        rates
    }

    /// The measured rate of all active layers together, if any is measured yet.
    pub fn measured_bps(&self, now: Instant) -> Option<u64> {
        self.active(now)
            .filter_map(|l| l.rate.bps(now))
            .reduce(|a, b| a + b)
    }

    fn active(&self, now: Instant) -> impl Iterator<Item = &Layer<L>> + '_ {
        self.layers
            .iter()
            .filter(move |l| now.saturating_duration_since(l.last) < LAYER_STALL)
    }

    pub fn is_active(&self, layer: L, now: Instant) -> bool {
        self.active(now).any(|l| l.layer == layer)
    }
}

/// What a layer is taken to cost before its rate is measured (its first 100 ms): about what
/// Chromium sends for a 720p camera's quarter, half and full layer, and for a single-layer
/// camera what it starts at (its own estimate starts at 300 kbit/s). Only the first
/// allocation of a new track uses it; erring low starts a video that the next round may
/// pause, erring high pauses one that would have fitted.
pub fn nominal_bps(rank: u8) -> u64 {
    match rank {
        0 => 300_000,
        2 => 150_000,
        3 => 500_000,
        4 => 1_500_000,
        _ => 300_000,
    }
}

/// The screen a client that never says what it displays is assumed to have: a 720p window.
const DEFAULT_VIEW: (u32, u32) = (1280, 720);

/// The best layer rank worth sending a client that never subscribes, when it shows `videos`
/// tiles: the tallest 16:9 tile of a square-ish grid of that many in [`DEFAULT_VIEW`], and
/// the smallest layer at least that tall (`q` a quarter of the source height, `h` half, `f`
/// full; the source taken as 720 lines). One video gets everything; 2 to 9 get `h`; from 10,
/// `q`.
pub fn grid_cap(videos: usize) -> u8 {
    if videos <= 1 {
        return u8::MAX;
    }
    let n = videos as u32;
    let cols = (1..=n).find(|c| c * c >= n).unwrap_or(n);
    let rows = n.div_ceil(cols);
    let (w, h) = DEFAULT_VIEW;
    let tile = (h / rows).min(w / cols * 9 / 16);
    if tile * 4 <= h {
        rid_rank(Some("q"))
    } else if tile * 2 <= h {
        rid_rank(Some("h"))
    } else {
        u8::MAX
    }
}

/// Quality rank of a rid by the convention real clients use (`q` < `h` < `f`). A track without
/// simulcast has a single layer and no rid. Unknown rids rank between none and `q`.
pub fn rid_rank(rid: Option<&str>) -> u8 {
    match rid {
        None => 0,
        Some("q") => 2,
        Some("h") => 3,
        Some("f") => 4,
        Some(_) => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_subscriber_starts_on_a_keyframe_of_its_target() {
        let t0 = Instant::now();
        let mut s = LayerSelector::default();
        assert!(s.set_target(2u8, t0), "the first start needs a keyframe");
        assert_eq!(s.on_packet(2, false), Decision::Skip);
        assert_eq!(
            s.on_packet(1, true),
            Decision::Skip,
            "other layers are never forwarded"
        );
        assert_eq!(s.on_packet(2, true), Decision::Switch);
        assert_eq!(s.on_packet(2, false), Decision::Forward);
        assert!(!s.waiting());
    }

    #[test]
    fn a_switch_keeps_the_old_layer_until_the_new_layers_keyframe() {
        let t0 = Instant::now();
        let mut s = LayerSelector::default();
        s.set_target(2u8, t0);
        s.on_packet(2, true);
        assert!(s.set_target(3, t0));
        assert_eq!(
            s.on_packet(2, false),
            Decision::Forward,
            "old layer flows meanwhile"
        );
        assert_eq!(s.on_packet(3, false), Decision::Skip);
        assert_eq!(s.on_packet(3, true), Decision::Switch);
        assert_eq!(
            s.on_packet(2, true),
            Decision::Skip,
            "old layer stops after the switch"
        );
        assert_eq!(s.current(), Some(3));
    }

    #[test]
    fn setting_the_same_or_current_target_needs_no_keyframe() {
        let t0 = Instant::now();
        let mut s = LayerSelector::default();
        s.set_target(1u8, t0);
        assert!(!s.set_target(1, t0));
        s.on_packet(1, true);
        s.set_target(2, t0);
        assert!(
            !s.set_target(1, t0),
            "back to the current layer before the switch happened"
        );
        assert!(!s.waiting());
    }

    #[test]
    fn an_overdue_keyframe_is_asked_for_again() {
        let t0 = Instant::now();
        let mut s = LayerSelector::default();
        s.set_target(3u8, t0);
        let retry = Duration::from_secs(1);
        assert_eq!(
            s.keyframe_overdue(t0 + Duration::from_millis(500), retry),
            None
        );
        assert_eq!(s.keyframe_overdue(t0 + retry, retry), Some(3));
        assert_eq!(
            s.keyframe_overdue(t0 + retry, retry),
            None,
            "the wait restarted"
        );
    }

    #[test]
    fn the_best_layer_that_still_flows_is_chosen() {
        let t0 = Instant::now();
        let mut a = LayerActivity::default();
        a.saw("q", rid_rank(Some("q")), None, 100, t0);
        a.saw("f", rid_rank(Some("f")), None, 100, t0);
        a.saw(
            "h",
            rid_rank(Some("h")),
            None,
            100,
            t0 + Duration::from_secs(1),
        );
        assert_eq!(a.best_active(t0 + Duration::from_millis(10)), Some("f"));
        // f stalls; h and q flow.
        a.saw("q", rid_rank(Some("q")), None, 100, t0 + LAYER_STALL);
        let later = t0 + LAYER_STALL + Duration::from_millis(1);
        assert!(!a.is_active("f", later));
        assert_eq!(a.best_active(later), Some("h"));
        assert_eq!(LayerActivity::<u8>::default().best_active(t0), None);
    }

    /// Before a subscriber's first allocation its video stays within the starting estimate.
    /// At a track's first packet only the full layer may have arrived; the smaller ones are
    /// judged at their nominal rates until they are seen, then by what they measure.
    #[test]
    fn the_best_rank_fitting_a_rate_counts_layers_not_seen_yet_at_their_nominal_rate() {
        let t0 = Instant::now();
        let mut a = LayerActivity::default();
        a.saw("f", 4, None, 1000, t0);
        assert_eq!(
            a.best_rank_fitting(t0, 1_000_000),
            3,
            "h, nominally 500 kbit/s"
        );
        assert_eq!(a.best_rank_fitting(t0, 2_000_000), 4);
        assert_eq!(a.best_rank_fitting(t0, 100_000), 2, "q, even over the rate");
        // One second of h at 1.2 Mbit/s and f at 2.4: measured, h no longer fits 1 Mbit/s.
        for n in 0..30u64 {
            let at = t0 + Duration::from_millis(n * 1000 / 30);
            a.saw("h", 3, None, 5000, at);
            a.saw("f", 4, None, 10_000, at);
        }
        let now = t0 + Duration::from_secs(1);
        assert_eq!(a.best_rank_fitting(now, 1_000_000), 2);
        assert_eq!(a.best_rank_fitting(now, 1_300_000), 3);
    }

    #[test]
    fn a_layer_with_temporal_layers_offers_its_lower_frame_rates() {
        let t0 = Instant::now();
        let mut a = LayerActivity::default();
        // 1.2 s of L1T3 at 30 fps: layer 0 every 4th frame (400 bytes), 1 every 4th (200),
        // 2 every other (100); and an h layer without temporal layers.
        for n in 0..36u32 {
            let now = t0 + Duration::from_millis(u64::from(n) * 1000 / 30);
            let (tid, len) = match n % 4 {
                0 => (0, 400),
                2 => (1, 200),
                _ => (2, 100),
            };
            a.saw("q", 2, Some(tid), len, now);
            a.saw("h", 3, None, 500, now);
        }
        let now = t0 + Duration::from_millis(1200);
        let rates = a.rates(now);
        let steps: Vec<Quality> = rates.iter().map(|(q, _)| *q).collect();
        assert_eq!(
            steps,
            vec![
                Quality { rank: 2, tid: 0 },
                Quality { rank: 2, tid: 1 },
                Quality::full(2),
                Quality::full(3),
            ]
        );
        // Each step costs more than the one below, the lowest under half of the whole
        // (layer 0's 460 of 1040 bytes per 4 frames, with the per-packet overhead).
        assert!(rates.windows(2).all(|w| w[0].1 < w[1].1), "{rates:?}");
        let (t0_bps, whole) = (rates[0].1 as f64, rates[2].1 as f64);
        assert!((0.38..0.5).contains(&(t0_bps / whole)), "{rates:?}");
    }

    #[test]
    fn a_size_cap_picks_the_best_layer_under_it_or_the_lowest() {
        let t0 = Instant::now();
        let mut a = LayerActivity::default();
        for rid in ["q", "h", "f"] {
            a.saw(rid, rid_rank(Some(rid)), None, 100, t0);
        }
        assert_eq!(a.best_active_capped(t0, u8::MAX), Some("f"));
        assert_eq!(a.best_active_capped(t0, rid_rank(Some("h"))), Some("h"));
        assert_eq!(a.best_active_capped(t0, rid_rank(Some("q"))), Some("q"));
        // Only f flows: a cap of q still gets f rather than nothing.
        let mut only_f = LayerActivity::default();
        only_f.saw("f", rid_rank(Some("f")), None, 100, t0);
        assert_eq!(
            only_f.best_active_capped(t0, rid_rank(Some("q"))),
            Some("f")
        );
    }

    #[test]
    fn a_client_that_never_subscribes_gets_layers_that_fit_its_grid() {
        let (q, h) = (rid_rank(Some("q")), rid_rank(Some("h")));
        assert_eq!(grid_cap(0), u8::MAX);
        assert_eq!(grid_cap(1), u8::MAX, "one video fills the window");
        assert_eq!(grid_cap(2), h, "side by side: 360 lines each");
        assert_eq!(grid_cap(4), h);
        assert_eq!(grid_cap(9), h, "3 x 3: 240 lines each");
        assert_eq!(grid_cap(10), q, "4 x 3: 180 lines each");
        assert_eq!(grid_cap(25), q);
    }
}
