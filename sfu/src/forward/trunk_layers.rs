//! The simulcast layers one trunk carries of one track.
//!
//! A participant receives one layer of a simulcast track at a time ([`super::LayerSelector`]).
//! A trunk instead carries every layer that some subscriber on the far side needs, each as its
//! own stream of the trunk's m-line under the publisher's rid, so the far focus can give each of
//! its subscribers the layer that fits, and each (track, layer) crosses the trunk once. Each
//! layer keeps its own sequence and timestamp space. A layer starts on a keyframe (the far
//! focus could not use anything before one) and stops as soon as nobody far needs it.

use std::time::Instant;

use super::layers::LayerActivity;
use super::rewrite::{Rewritten, SeqTsRewriter};

/// The layers a trunk should carry of one track whose far side subscribed at the size caps
/// `caps` (quality ranks): the best layer flowing within the largest cap, and every layer
/// flowing below it (ascending). Nothing when the far side asked for nothing.
///
/// The far focus shares each of its subscribers' downlinks among the layers that arrive, as
/// it does for its own publishers. If only the layers its screens ask for crossed (often
/// just the full one), a far subscriber whose downlink cannot take them would have nothing
/// to fall back to, and its tile would stay paused for the whole call; with only the lowest
/// layer beside them, a subscriber that could take the middle one would get the lowest.
/// With every lower layer, a far subscriber gets the same choice as a local one. This costs
/// the trunk the lower layers' rates (about a third of the full one for a 720p camera's
/// quarter and half layers) per watched track, each once, and the publisher nothing:
/// dynacast keeps every layer below a needed one encoded. (Asking the origin for a lower
/// layer only while some far subscriber needs it would save that, at the price of a round
/// trip and a keyframe before the subscriber moves down.)
pub fn trunk_layers_wanted<L: Copy + PartialEq>(
    activity: &LayerActivity<L>,
    caps: impl IntoIterator<Item = u8>,
    now: Instant,
) -> Vec<L> {
    let Some(cap) = caps.into_iter().max() else {
        return Vec::new();
    };
    let within = activity.active_within(now, cap);
    if within.is_empty() {
        // Every layer flowing is above the size asked: the lowest one, as for a subscriber.
        return activity.lowest_active(now).into_iter().collect();
    }
    within
}

/// One layer of the trunk's m-line.
#[derive(Debug, Clone)]
struct Layer<L> {
    layer: L,
    wanted: bool,
    /// A keyframe of this layer was forwarded since it became wanted.
    started: bool,
    rewriter: SeqTsRewriter,
}

/// The layers of one track on one trunk: which are carried, and their rewriting.
#[derive(Debug, Clone)]
pub struct TrunkLayers<L> {
    layers: Vec<Layer<L>>,
}

impl<L: Copy + PartialEq> TrunkLayers<L> {
    /// The layers the trunk's m-line was negotiated with; `seed` gives each layer the first
    /// sequence number and timestamp of its output space (see [`SeqTsRewriter::new`]).
    pub fn new(layers: &[L], clock_rate: u32, mut seed: impl FnMut() -> (u16, u32)) -> Self {
        TrunkLayers {
            layers: layers
                .iter()
                .map(|l| {
                    let (seq, ts) = seed();
                    Layer {
                        layer: *l,
                        wanted: false,
                        started: false,
                        rewriter: SeqTsRewriter::new(clock_rate, seq, ts),
                    }
                })
                .collect(),
        }
    }

    /// Carry exactly `wanted` (layers the m-line does not have are ignored). Returns the layers
    /// that were not carried before: each needs a keyframe before it can start.
    pub fn set_wanted(&mut self, wanted: &[L]) -> Vec<L> {
        let mut added = Vec::new();
        for l in &mut self.layers {
            let now_wanted = wanted.contains(&l.layer);
            if now_wanted && !l.wanted {
                added.push(l.layer);
            }
            if !now_wanted && l.wanted {
                l.started = false;
                l.rewriter.resume();
            }
            l.wanted = now_wanted;
        }
        added
    }

    /// The layers carried or about to be (waiting for their keyframe).
    pub fn wanted(&self) -> impl Iterator<Item = L> + '_ {
        self.layers.iter().filter(|l| l.wanted).map(|l| l.layer)
    }

    /// Whether `layer` is wanted but still waits for its first keyframe.
    pub fn awaiting_keyframe(&self, layer: L) -> bool {
        self.layers
            .iter()
            .any(|l| l.layer == layer && l.wanted && !l.started)
    }

    /// Decide for one packet of `layer` from source `ssrc`: the sequence number and timestamp
    /// to send it with on that layer's stream, or `None` when the layer is not carried (not
    /// wanted, not yet started by a keyframe, or a packet from before its start).
    pub fn on_packet(
        &mut self,
        layer: L,
        keyframe: bool,
        ssrc: u32,
        seq: u64,
        ts: u32,
        now: Instant,
    ) -> Option<(u64, u32)> {
        let l = self.layers.iter_mut().find(|l| l.layer == layer)?;
        if !l.wanted {
            return None;
        }
        if !l.started {
            if !keyframe {
                return None;
            }
            l.started = true;
        }
        match l.rewriter.rewrite(ssrc, seq, ts, now) {
            Rewritten::Send { seq, ts } => Some((seq, ts)),
            Rewritten::DropStale => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forward::LAYER_STALL;

    const H: u8 = 2;
    const Q: u8 = 0;
    const F: u8 = 3;

    /// Layers flowing at `now` with their ranks (the rank stands in for the layer too).
    fn flowing(ranks: &[u8], now: Instant) -> LayerActivity<u8> {
        let mut a = LayerActivity::default();
        for r in ranks {
            a.saw(*r, *r, None, 1000, now);
        }
        a
    }

    #[test]
    fn a_trunk_carries_every_layer_up_to_the_largest_size_asked() {
        let t = Instant::now();
        let (q, h, f) = (2, 3, 4);
        let all = flowing(&[q, h, f], t);
        // Full size asked: the full layer and both below it, each once.
        assert_eq!(trunk_layers_wanted(&all, [u8::MAX], t), vec![q, h, f]);
        assert_eq!(trunk_layers_wanted(&all, [q, u8::MAX, h], t), vec![q, h, f]);
        // Half size: the half layer and the quarter, not the full one.
        assert_eq!(trunk_layers_wanted(&all, [h], t), vec![q, h]);
        assert_eq!(trunk_layers_wanted(&all, [q], t), vec![q]);
        // Nobody far watches: nothing crosses.
        assert!(trunk_layers_wanted(&all, [], t).is_empty());
        // Only layers that flow: here the half layer has stopped.
        let later = t + LAYER_STALL;
        let mut no_h = flowing(&[q, f], later);
        no_h.saw(h, h, None, 1000, t);
        assert_eq!(trunk_layers_wanted(&no_h, [u8::MAX], later), vec![q, f]);
        // Every layer flowing is above the size asked: the lowest of them.
        let big = flowing(&[h, f], t);
        assert_eq!(trunk_layers_wanted(&big, [q], t), vec![h]);
        // A track without simulcast crosses as its one layer.
        let single = flowing(&[0], t);
        assert_eq!(trunk_layers_wanted(&single, [u8::MAX, q], t), vec![0]);
    }

    fn three() -> TrunkLayers<u8> {
        let mut n = 0u16;
        TrunkLayers::new(&[Q, H, F], 90_000, move || {
            n += 1000;
            (n, 0)
        })
    }

    #[test]
    fn only_wanted_layers_cross_each_from_its_own_keyframe() {
        let t = Instant::now();
        let mut tl = three();
        assert_eq!(tl.set_wanted(&[Q, F]), vec![Q, F]);
        // A delta frame of a wanted layer before its keyframe does not cross.
        assert_eq!(tl.on_packet(Q, false, 1, 10, 0, t), None);
        assert!(tl.awaiting_keyframe(Q));
        assert_eq!(tl.on_packet(Q, true, 1, 11, 0, t), Some((1000, 0)));
        assert_eq!(tl.on_packet(Q, false, 1, 12, 0, t), Some((1001, 0)));
        // The middle layer is not wanted: never crosses, keyframe or not.
        assert_eq!(tl.on_packet(H, true, 2, 10, 0, t), None);
        // The full layer has its own sequence space.
        assert_eq!(tl.on_packet(F, true, 3, 500, 0, t), Some((3000, 0)));
        assert_eq!(tl.wanted().collect::<Vec<_>>(), vec![Q, F]);
    }

    #[test]
    fn a_dropped_layer_stops_and_resumes_on_a_keyframe_without_a_gap() {
        let t = Instant::now();
        let mut tl = three();
        tl.set_wanted(&[F]);
        assert_eq!(tl.on_packet(F, true, 3, 100, 0, t), Some((3000, 0)));
        assert_eq!(tl.set_wanted(&[Q]), vec![Q]);
        assert_eq!(tl.on_packet(F, false, 3, 101, 0, t), None);
        assert_eq!(tl.set_wanted(&[Q, F]), vec![F]);
        assert_eq!(tl.on_packet(F, false, 3, 150, 0, t), None);
        let (seq, _) = tl.on_packet(F, true, 3, 151, 9000, t).unwrap();
        assert_eq!(seq, 3001, "continues the layer's own output");
        // Asking again for what is carried needs no new keyframe.
        assert!(tl.set_wanted(&[Q, F]).is_empty());
    }

    #[test]
    fn unknown_layers_are_ignored() {
        let t = Instant::now();
        let mut tl = three();
        assert_eq!(tl.set_wanted(&[7]), Vec::<u8>::new());
        assert_eq!(tl.on_packet(7, true, 9, 1, 0, t), None);
    }
}
