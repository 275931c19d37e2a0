//! Dynacast: which simulcast layers of a published track anyone needs, so that its publisher
//! stops encoding the others (`io.weir.layers`, docs/data-channel.md; policy in
//! docs/adaptation.md).
//!
//! A subscriber needs the layer its size cap selects among the layers the publisher
//! announced, whether or not that layer flows now: a layer switched off must come back when
//! someone's screen wants it, and layer following only ever sees flowing layers. Bandwidth
//! does not switch layers off: a subscriber held on a lower layer by its downlink still needs
//! the layer its screen wants, so that probing can move it up (LiveKit does the same). Every
//! layer below the best one needed stays on too: lower layers cost the publisher little, and
//! they are what a subscriber whose downlink narrows falls back to at once; switched off,
//! the fall-back would wait for a round trip and a keyframe while the link overflows.

use std::time::{Duration, Instant};

/// How long a layer that nobody needs is still encoded before its publisher is told to stop.
/// A layer switched back on costs a keyframe and a round trip on the data channel before it
/// flows, so a subscriber that resizes back and forth, or leaves and rejoins, must not switch
/// layers on and off each time. Longer keeps an unwatched layer's uplink and encoder cost for
/// longer; shorter flaps with layout changes.
pub const LAYER_OFF_DELAY: Duration = Duration::from_secs(3);

/// The layers one publisher encodes for one track, and which of them it was told to.
#[derive(Debug, Clone)]
pub struct LayerDemand<L> {
    /// The announced layers, their quality ranks and when someone last needed each, in
    /// ascending rank.
    layers: Vec<(L, u8, Instant)>,
    /// The layers the publisher encodes as far as weir knows: all of them until told
    /// otherwise.
    active: Vec<L>,
}

impl<L: Copy + PartialEq> LayerDemand<L> {
    /// A track announced at `now` with `layers` (layer, rank), all of them encoded.
    pub fn new(layers: impl IntoIterator<Item = (L, u8)>, now: Instant) -> Self {
        let mut layers: Vec<(L, u8, Instant)> =
            layers.into_iter().map(|(l, r)| (l, r, now)).collect();
        layers.sort_by_key(|(_, rank, _)| *rank);
        let active = layers.iter().map(|(l, _, _)| *l).collect();
        LayerDemand { layers, active }
    }

    /// The layer a subscriber capped at `max_rank` needs: the best announced layer within the
    /// cap, or the lowest one if all are above it (layer following does the same with what
    /// flows).
    pub fn layer_for(&self, max_rank: u8) -> Option<L> {
        self.layers
            .iter()
            .rev()
            .find(|(_, rank, _)| *rank <= max_rank)
            .or(self.layers.first())
            .map(|(l, _, _)| *l)
    }

    /// The layers the publisher encodes, in ascending rank.
    pub fn active(&self) -> &[L] {
        &self.active
    }

    /// Whether every announced layer is encoded (what a publisher does untold).
    pub fn all_active(&self) -> bool {
        self.active.len() == self.layers.len()
    }

    /// The announced layers that are switched off.
    pub fn off(&self) -> usize {
        self.layers.len() - self.active.len()
    }

    /// Given the size caps of everyone who receives the track, the layers to encode from now
    /// on if they changed: the best layer anyone needs and every layer below it. A needed
    /// layer is switched on at once; a layer goes off once nobody has needed it for
    /// [`LAYER_OFF_DELAY`].
    pub fn update(&mut self, caps: impl IntoIterator<Item = u8>, now: Instant) -> Option<&[L]> {
        let best = caps
            .into_iter()
            .filter_map(|cap| {
                self.layers
                    .iter()
                    .rposition(|(_, rank, _)| *rank <= cap)
                    .or((!self.layers.is_empty()).then_some(0))
            })
            .max();
        let needed = best.map_or(0, |i| i + 1);
        for layer in &mut self.layers[..needed] {
            layer.2 = now;
        }
        let active = &self.active;
        let next: Vec<L> = self
            .layers
            .iter()
            .enumerate()
            .filter(|(i, (l, _, last))| {
                *i < needed
                    || (active.contains(l)
                        && now.saturating_duration_since(*last) < LAYER_OFF_DELAY)
            })
            .map(|(_, (l, _, _))| *l)
            .collect();
        if next == self.active {
            return None;
        }
        self.active = next;
        Some(&self.active)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const Q: u8 = 2;
    const H: u8 = 3;
    const ANY: u8 = u8::MAX;
    const D: Duration = LAYER_OFF_DELAY;

    fn demand(now: Instant) -> LayerDemand<char> {
        LayerDemand::new([('f', 4), ('q', 2), ('h', 3)], now)
    }

    #[test]
    fn a_subscriber_needs_the_layer_its_size_selects_whether_or_not_it_flows() {
        let d = demand(Instant::now());
        assert_eq!(d.layer_for(Q), Some('q'));
        assert_eq!(d.layer_for(H), Some('h'));
        assert_eq!(d.layer_for(ANY), Some('f'));
        assert_eq!(d.layer_for(1), Some('q'), "below every layer: the lowest");
        assert_eq!(
            LayerDemand::<char>::new([], Instant::now()).layer_for(ANY),
            None
        );
    }

    #[test]
    fn unwatched_layers_go_off_only_after_the_delay_and_a_needed_one_comes_back_at_once() {
        let t0 = Instant::now();
        let mut d = demand(t0);
        assert!(d.all_active());
        assert_eq!(
            d.update([Q, H], t0),
            None,
            "f is spare, but not yet for long"
        );
        assert_eq!(d.update([Q, H], t0 + D / 2), None);
        assert_eq!(d.update([Q, H], t0 + D), Some(&['q', 'h'][..]));
        assert_eq!(d.off(), 1);
        assert_eq!(
            d.update([Q, H, ANY], t0 + D * 2),
            Some(&['q', 'h', 'f'][..])
        );
        assert!(d.all_active());
    }

    #[test]
    fn each_layer_waits_out_its_own_delay() {
        let t0 = Instant::now();
        let mut d = demand(t0);
        assert_eq!(d.update([H], t0 + D * 9 / 10), None);
        // f was last needed when the track appeared, h at 0.9 D.
        assert_eq!(d.update([Q], t0 + D), Some(&['q', 'h'][..]));
        assert_eq!(d.update([Q], t0 + D * 18 / 10), None);
        assert_eq!(d.update([Q], t0 + D * 19 / 10), Some(&['q'][..]));
    }

    #[test]
    fn layers_below_the_best_needed_stay_on_and_a_new_need_switches_them_on_at_once() {
        let t0 = Instant::now();
        let mut d = demand(t0);
        assert_eq!(
            d.update([ANY], t0 + D * 5),
            None,
            "f needs q and h below it"
        );
        assert_eq!(d.update([Q], t0 + D * 5), None);
        assert_eq!(d.update([Q], t0 + D * 6), Some(&['q'][..]));
        assert_eq!(d.update([Q, ANY], t0 + D * 6), Some(&['q', 'h', 'f'][..]));
    }

    #[test]
    fn nobody_watching_switches_everything_off_and_one_subscriber_brings_its_layer_back() {
        let t0 = Instant::now();
        let mut d = demand(t0);
        assert_eq!(d.update([], t0), None);
        assert_eq!(d.update([], t0 + D), Some(&[][..]));
        assert_eq!(d.off(), 3);
        assert_eq!(d.update([H], t0 + D), Some(&['q', 'h'][..]));
        assert_eq!(d.update([H], t0 + D * 5), None);
    }
}
