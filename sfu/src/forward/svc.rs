//! Scalable video (SVC): one stream (one SSRC) carrying several spatial layers, as Chromium
//! sends VP9 and AV1 with a scalability mode such as `L3T3_KEY`. Each subscriber gets the
//! frames of one decode target (a spatial and temporal layer and what it depends on), chosen
//! from the dependency descriptor (`forward::dependency_descriptor`) without reading the
//! payload.
//!
//! A switch to another decode target happens at a frame the descriptor marks as a switch point
//! for it, and only if the subscriber holds that target's chain (the frames the encoder keeps
//! the target decodable with): moving down within full SVC (`L3T3`) is immediate, since the
//! lower layers were forwarded all along; moving down within key-frame SVC (`L3T3_KEY`), where
//! a higher layer's frames do not refer to the lower ones after the keyframe, waits for a
//! keyframe, and [`SvcFilter::blocked`] says one is needed. Until the switch, the current
//! target keeps flowing.

use super::dependency_descriptor::{
    self, DescriptorError, FrameDescriptor, Indication, Structure, MAX_DECODE_TARGETS,
    MAX_SPATIAL_LAYERS,
};

/// The rank a spatial layer stands for: that of the simulcast layer of the same size
/// (`forward::layers::rid_rank`), so that subscriptions and allocation treat both alike.
/// Chromium scales each spatial layer to half the size of the next, the top one at full size,
/// as its simulcast `q`, `h` and `f`: of `full` layers, the top ranks as `f`, the one below as
/// `h`, the next as `q`, and a fourth below them as an unknown rid.
///
/// `full` is the most spatial layers the track has had, not the number it has now: a
/// publisher told to stop its top layers (dynacast) encodes the lower ones at their own sizes,
/// so its 640×360 top layer still ranks as `h`.
pub fn spatial_rank(spatial: u8, full: u8) -> u8 {
    let below_top = full.saturating_sub(1).saturating_sub(spatial);
    4u8.saturating_sub(below_top).max(1)
}

/// The highest of the `present` spatial layers (ranked among `full`, [`spatial_rank`]) whose
/// rank is at most `cap`; the lowest if none is.
pub fn spatial_within(cap: u8, present: u8, full: u8) -> u8 {
    (0..present)
        .rev()
        .find(|s| spatial_rank(*s, full.max(present)) <= cap)
        .unwrap_or(0)
}

/// What weir knows of one scalable stream: its structure, and which decode targets the
/// encoder still produces.
#[derive(Debug, Clone, Default)]
pub struct SvcStream {
    structure: Option<Structure>,
    active: u32,
    /// Per spatial layer, its best decode target (every temporal layer): a frame belongs to
    /// that spatial layer's picture if it is part of this target.
    tops: [Option<usize>; MAX_SPATIAL_LAYERS],
    /// Per decode target, the layers it reaches (`Structure::target_layers`), worked out once
    /// per structure: the per-packet decisions look them up.
    layers: [Option<(u8, u8)>; MAX_DECODE_TARGETS],
}

impl SvcStream {
    /// Read one packet's descriptor, taking in the structure and active targets it carries.
    pub fn read(&mut self, bytes: &[u8]) -> Result<FrameDescriptor, DescriptorError> {
        let (frame, attached) = dependency_descriptor::parse(bytes, self.structure.as_ref())?;
        let changed = attached.is_some()
            || frame
                .active_decode_targets
                .is_some_and(|a| a != self.active);
        if let Some(s) = attached {
            for (dt, layers) in self.layers.iter_mut().enumerate() {
                *layers = s.target_layers(dt);
            }
            self.structure = Some(s);
        }
        if let Some(active) = frame.active_decode_targets {
            self.active = active;
        }
        if changed {
            let mut tops = [None; MAX_SPATIAL_LAYERS];
            for (spatial, top) in tops.iter_mut().enumerate() {
                *top = self.best_target(spatial as u8, u8::MAX);
            }
            self.tops = tops;
        }
        Ok(frame)
    }

    /// Whether `frame` is part of what a subscriber of spatial layer `spatial` (and every
    /// temporal layer) receives.
    pub fn includes(&self, frame: &FrameDescriptor, spatial: u8) -> bool {
        self.tops
            .get(usize::from(spatial))
            .copied()
            .flatten()
            .is_some_and(|dt| frame.indications.get(dt) != Indication::NotPresent)
    }

    pub fn structure(&self) -> Option<&Structure> {
        self.structure.as_ref()
    }

    /// Spatial layers of the stream (0 before its first structure).
    pub fn spatial_layers(&self) -> u8 {
        self.structure.as_ref().map_or(0, Structure::spatial_layers)
    }

    /// The decode target to forward for a subscriber that should get at most spatial layer
    /// `spatial` and temporal layer `temporal`: the highest active one within both, by
    /// spatial layer first. If even the lowest spatial layer is above `spatial`, the best
    /// target of the lowest spatial layer.
    pub fn best_target(&self, spatial: u8, temporal: u8) -> Option<usize> {
        let s = self.structure.as_ref()?;
        let candidates = (0..s.decode_targets())
            .filter(|dt| self.active >> dt & 1 == 1)
            .filter_map(|dt| self.layers[dt].map(|l| (l, dt)));
        let within = candidates
            .clone()
            .filter(|((sp, tp), _)| *sp <= spatial && *tp <= temporal)
            .max_by_key(|(l, _)| *l);
        within
            .or_else(|| {
                let lowest = candidates.clone().map(|((sp, _), _)| sp).min()?;
                candidates
                    .filter(|((sp, tp), _)| *sp == lowest && *tp <= temporal)
                    .max_by_key(|(l, _)| *l)
            })
            .map(|(_, dt)| dt)
    }

    /// The spatial and temporal layer decode target `dt` reaches.
    pub fn target_layers(&self, dt: usize) -> Option<(u8, u8)> {
        self.layers.get(dt).copied().flatten()
    }
}

/// What to do with one packet for one subscriber.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub forward: bool,
    /// The packet ends the last frame of its picture this subscriber gets: it carries the RTP
    /// marker, as the top layer's last packet does for a subscriber of every layer.
    pub ends_picture: bool,
}

/// Frames whose decision is remembered, so that all packets of a frame, a late or
/// retransmitted one included, get the same. At 30 pictures/s of three spatial layers that is
/// about 180 ms; a packet of an older frame is decided afresh, by the target in force then.
const DECISION_MEMORY: usize = 16;

/// Frames remembered as forwarded, to tell whether a chain is intact. A chain's previous
/// frame is at most 255 frames back (its offset has 8 bits); real structures step back a
/// few frames (one picture of every spatial layer).
const FORWARDED_MEMORY: usize = 64;

/// Which decode target of one scalable stream one subscriber gets.
#[derive(Debug, Clone)]
pub struct SvcFilter {
    /// The highest spatial and temporal layer the subscriber should get.
    target: Option<(u8, u8)>,
    /// The decode target forwarded now.
    current: Option<usize>,
    /// The last frames decided, in the slot of their frame number, and whether each goes
    /// out: a frame's later packets keep its decision.
    decided: [Option<(u16, bool)>; DECISION_MEMORY],
    /// Frames recently forwarded, in the slot of their frame number, each with the chains the
    /// subscriber held through it (bit per chain).
    forwarded: [Option<(u16, u32)>; FORWARDED_MEMORY],
    /// A switch point of the target went by with its chain broken: only a keyframe lets the
    /// subscriber switch.
    blocked: bool,
}

impl Default for SvcFilter {
    fn default() -> Self {
        SvcFilter {
            target: None,
            current: None,
            decided: [None; DECISION_MEMORY],
            forwarded: [None; FORWARDED_MEMORY],
            blocked: false,
        }
    }
}

impl SvcFilter {
    /// Set the highest spatial and temporal layer to get (from the next switch point on).
    pub fn set_target(&mut self, spatial: u8, temporal: u8) {
        if self.target != Some((spatial, temporal)) {
            self.target = Some((spatial, temporal));
            self.blocked = false;
        }
    }

    /// The decode target forwarded now.
    pub fn current(&self) -> Option<usize> {
        self.current
    }

    /// Whether the target can only be reached on a keyframe, which should be requested.
    pub fn blocked(&self) -> bool {
        self.blocked
    }

    /// Start afresh (after a pause): nothing is forwarded until the next switch point with
    /// an intact chain, in practice a keyframe.
    pub fn restart(&mut self) {
        let target = self.target;
        *self = SvcFilter::default();
        self.target = target;
    }

    /// Decide for one packet of `stream` whose descriptor is `frame`.
    pub fn forward(&mut self, frame: &FrameDescriptor, stream: &SvcStream) -> Verdict {
        let n = frame.frame_number;
        let slot = usize::from(n) % DECISION_MEMORY;
        let out = match self.decided[slot] {
            Some((f, out)) if f == n => out,
            _ => {
                let held = self.chains_held(frame, stream);
                let out = self.decide(frame, stream, held);
                self.decided[slot] = Some((n, out));
                // A frame left out clears its slot, so no older frame of that slot (a wrap of
                // the frame numbers ago) passes for it.
                self.forwarded[usize::from(n) % FORWARDED_MEMORY] = out.then_some((n, held));
                out
            }
        };
        let top = self
            .current
            .and_then(|dt| stream.target_layers(dt))
            .map(|(s, _)| s);
        Verdict {
            forward: out,
            ends_picture: out && frame.end_of_frame && Some(frame.spatial) == top,
        }
    }

    fn decide(&mut self, frame: &FrameDescriptor, stream: &SvcStream, held: u32) -> bool {
        let goal = self.target.and_then(|(s, t)| stream.best_target(s, t));
        if let Some(goal) = goal.filter(|g| Some(*g) != self.current) {
            if frame.indications.get(goal) == Indication::Switch {
                let chain = stream.structure().and_then(|s| s.chain_of(goal));
                let holds = match chain {
                    Some(c) => held >> c & 1 == 1,
                    None => frame.dependencies == 0,
                };
                if holds {
                    self.current = Some(goal);
                    self.blocked = false;
                } else {
                    self.blocked = true;
                }
            }
        }
        self.current
            .is_some_and(|dt| frame.indications.get(dt) != Indication::NotPresent)
    }

    /// The chains the subscriber holds up to this frame (bit per chain): the frame starts the
    /// chain, or the chain's previous frame was forwarded with the chain held through it. A
    /// chain is the sequence of frames the encoder keeps a decode target decodable with; a
    /// subscriber holding it can start that target at any of its switch points. Which frames
    /// belong to a chain shows only in the next member's offset, so every forwarded frame
    /// records what it held, and a member left out breaks the chain at the next one.
    fn chains_held(&self, frame: &FrameDescriptor, stream: &SvcStream) -> u32 {
        let Some(s) = stream.structure() else {
            return 0;
        };
        let mut held = 0;
        for chain in 0..s.chains() {
            let back = frame.chain_fdiff(chain);
            let previous = frame.frame_number.wrapping_sub(u16::from(back));
            let ok = back == 0
                || matches!(
                    self.forwarded[usize::from(previous) % FORWARDED_MEMORY],
                    Some((n, bits)) if n == previous && bits >> chain & 1 == 1
                );
            if ok {
                held |= 1 << chain;
            }
        }
        held
    }
}

#[cfg(test)]
mod tests {
    use super::super::dependency_descriptor::write::{descriptor, l2t1, l2t1_key, BitWriter};
    use super::*;

    /// A stream of pictures: frame numbers count from 100, two frames (S0, S1) per picture;
    /// picture 0 a keyframe.
    struct Pictures {
        stream: SvcStream,
        key: fn(&mut BitWriter),
    }

    impl Pictures {
        fn new(key: fn(&mut BitWriter)) -> Self {
            Pictures {
                stream: SvcStream::default(),
                key,
            }
        }

        /// The two frames of picture `p` (a keyframe if `key`), each in one packet.
        fn picture(&mut self, p: u16, key: bool) -> [FrameDescriptor; 2] {
            let n = 100 + 2 * p;
            let s0 = if key {
                descriptor(true, true, 0, n, Some(&self.key))
            } else {
                descriptor(true, true, 1, n, None)
            };
            let s1 = descriptor(true, true, if key { 2 } else { 3 }, n + 1, None);
            [
                self.stream.read(&s0).unwrap(),
                self.stream.read(&s1).unwrap(),
            ]
        }

        /// Which of picture `p`'s frames `f` forwards (S0, S1).
        fn run(&mut self, f: &mut SvcFilter, p: u16, key: bool) -> [bool; 2] {
            let frames = self.picture(p, key);
            frames.map(|fr| f.forward(&fr, &self.stream).forward)
        }
    }

    #[test]
    fn a_subscriber_of_the_small_layer_gets_only_its_frames() {
        let mut s = Pictures::new(l2t1_key);
        let mut f = SvcFilter::default();
        f.set_target(0, u8::MAX);
        assert_eq!(s.run(&mut f, 0, true), [true, false]);
        for p in 1..5 {
            assert_eq!(s.run(&mut f, p, false), [true, false]);
        }
    }

    #[test]
    fn a_subscriber_of_the_full_layer_gets_the_keyframe_then_only_the_top_layer() {
        let mut s = Pictures::new(l2t1_key);
        let mut f = SvcFilter::default();
        f.set_target(1, u8::MAX);
        // The subscriber arrives after the stream's first keyframe: until the next one,
        // nothing, since it does not hold S1's chain.
        s.picture(0, true);
        assert_eq!(s.run(&mut f, 1, false), [false, false]);
        assert!(f.blocked());
        assert_eq!(s.run(&mut f, 2, true), [true, true]);
        assert_eq!(s.run(&mut f, 3, false), [false, true]);
        // The marker goes on the top frame's last packet.
        let [s0, s1] = s.picture(4, false);
        assert!(!f.forward(&s0, &s.stream).ends_picture);
        assert!(f.forward(&s1, &s.stream).ends_picture);
    }

    #[test]
    fn moving_down_in_key_frame_svc_waits_for_a_keyframe() {
        let mut s = Pictures::new(l2t1_key);
        let mut f = SvcFilter::default();
        f.set_target(1, u8::MAX);
        s.run(&mut f, 0, true);
        assert_eq!(s.run(&mut f, 1, false), [false, true]);
        f.set_target(0, u8::MAX);
        // S0's frame of picture 1 was left out, so S0's chain is broken: S1 keeps flowing, a
        // keyframe is needed.
        assert_eq!(s.run(&mut f, 2, false), [false, true]);
        assert!(f.blocked());
        assert_eq!(s.run(&mut f, 3, true), [true, false]);
        assert!(!f.blocked());
        // and S0 alone from then on, its last packet carrying the marker
        let [s0, _] = s.picture(4, false);
        assert_eq!(
            f.forward(&s0, &s.stream),
            Verdict {
                forward: true,
                ends_picture: true
            }
        );
    }

    #[test]
    fn moving_down_in_full_svc_is_immediate_and_up_waits_for_a_keyframe() {
        let mut s = Pictures::new(l2t1);
        let mut f = SvcFilter::default();
        f.set_target(1, u8::MAX);
        assert_eq!(s.run(&mut f, 0, true), [true, true]);
        assert_eq!(s.run(&mut f, 1, false), [true, true]);
        f.set_target(0, u8::MAX);
        assert_eq!(s.run(&mut f, 2, false), [true, false]);
        assert!(!f.blocked());
        f.set_target(1, u8::MAX);
        // S1's delta frames are switch points, but its chain (S1's last frame) is missing.
        assert_eq!(s.run(&mut f, 3, false), [true, false]);
        assert!(f.blocked());
        assert_eq!(s.run(&mut f, 4, true), [true, true]);
    }

    #[test]
    fn moving_down_in_key_frame_svc_right_after_the_keyframe_needs_none() {
        let mut s = Pictures::new(l2t1_key);
        let mut f = SvcFilter::default();
        f.set_target(1, u8::MAX);
        s.run(&mut f, 0, true);
        f.set_target(0, u8::MAX);
        // S0's next frame refers to the keyframe's S0 frame, which went out.
        assert_eq!(s.run(&mut f, 1, false), [true, false]);
        assert!(!f.blocked());
    }

    #[test]
    fn a_frame_keeps_its_decision_for_all_its_packets() {
        let mut s = Pictures::new(l2t1_key);
        let mut f = SvcFilter::default();
        f.set_target(1, u8::MAX);
        let [k0, k1] = s.picture(0, true);
        assert!(f.forward(&k0, &s.stream).forward);
        f.set_target(0, u8::MAX);
        // A late packet of the keyframe's S1 frame, then its S0 frame again.
        assert!(f.forward(&k1, &s.stream).forward);
        assert!(f.forward(&k0, &s.stream).forward);
    }

    #[test]
    fn a_restart_forwards_nothing_until_the_next_keyframe() {
        let mut s = Pictures::new(l2t1);
        let mut f = SvcFilter::default();
        f.set_target(1, u8::MAX);
        s.run(&mut f, 0, true);
        f.restart();
        assert_eq!(s.run(&mut f, 1, false), [false, false]);
        assert_eq!(s.run(&mut f, 2, true), [true, true]);
    }

    #[test]
    fn the_best_target_falls_back_to_the_lowest_layer_and_skips_inactive_ones() {
        let mut s = Pictures::new(l2t1_key);
        s.picture(0, true);
        assert_eq!(s.stream.best_target(5, 5), Some(1));
        assert_eq!(s.stream.best_target(0, 5), Some(0));
        assert_eq!(s.stream.spatial_layers(), 2);
        // The encoder stops the top layer.
        s.stream.active = 0b01;
        assert_eq!(s.stream.best_target(5, 5), Some(0));
    }

    #[test]
    fn spatial_layers_rank_from_the_top_as_simulcast_layers_of_their_size() {
        assert_eq!(
            (0..3).map(|s| spatial_rank(s, 3)).collect::<Vec<_>>(),
            [2, 3, 4]
        );
        assert_eq!(spatial_rank(0, 2), 3);
        assert_eq!(spatial_rank(0, 4), 1);
        assert_eq!(spatial_within(u8::MAX, 3, 3), 2);
        assert_eq!(
            spatial_within(3, 3, 3),
            1,
            "a 360-line tile gets the middle layer"
        );
        assert_eq!(spatial_within(2, 2, 2), 0, "below every layer: the lowest");
    }

    #[test]
    fn with_its_top_layer_switched_off_a_stream_keeps_its_lower_layers_ranks() {
        // Three layers, told to encode two: 320 and 640 pixels wide, q and h still.
        assert_eq!(spatial_within(3, 2, 3), 1, "a 360-line tile: 640 px");
        assert_eq!(spatial_within(2, 2, 3), 0, "a 180-line tile: 320 px");
        assert_eq!(spatial_within(u8::MAX, 2, 3), 1, "the best there is");
        // Counted from the two present, the 640-pixel layer would pass for f.
        assert_eq!(spatial_within(3, 2, 2), 0);
    }

    #[test]
    fn what_each_spatial_layer_includes() {
        let mut s = Pictures::new(l2t1_key);
        let [k0, k1] = s.picture(0, true);
        let [d0, d1] = s.picture(1, false);
        assert!(s.stream.includes(&k0, 0) && s.stream.includes(&k0, 1));
        assert!(!s.stream.includes(&k1, 0) && s.stream.includes(&k1, 1));
        assert!(s.stream.includes(&d0, 0) && !s.stream.includes(&d0, 1));
        assert!(s.stream.includes(&d1, 1));
    }
}
