//! Temporal layers: the finest step of adaptation. Chromium encodes every VP8 simulcast layer
//! with three temporal layers (scalability mode `L1T3`): frames of layer 0 at a quarter of the
//! frame rate, layer 1 between them at half, layer 2 filling in the rest. A frame depends
//! only on frames of its own layer or below, so a subscriber can be sent layers 0..=n alone
//! and still decodes every frame it gets, at a lower frame rate and bitrate, with no keyframe.
//!
//! The filter decides per frame (by RTP timestamp), never per packet, so a frame goes out
//! whole or not at all. Going down takes effect at the next frame; going up waits for a frame
//! that is a switch point for the layer it adds (the descriptor's Y bit: it depends on layer 0
//! only) or a keyframe.

/// Every temporal layer: a subscriber not limited in frame rate, or a stream without
/// temporal layers.
pub const ALL_TEMPORAL: u8 = u8::MAX;

/// Which temporal layers one subscriber's copy of one track receives.
#[derive(Debug, Clone)]
pub struct TemporalFilter {
    /// The highest temporal layer the subscriber should get.
    target: u8,
    /// The highest temporal layer forwarded now.
    current: u8,
    /// The last frame decided, by source and RTP timestamp, and whether it goes out.
    frame: Option<(FrameKey, bool)>,
    /// The frame before it: a late packet of it keeps its decision.
    previous: Option<(FrameKey, bool)>,
}

impl Default for TemporalFilter {
    fn default() -> Self {
        TemporalFilter {
            target: ALL_TEMPORAL,
            current: ALL_TEMPORAL,
            frame: None,
            previous: None,
        }
    }
}

/// A frame: its source (SSRC) and RTP timestamp. Simulcast layers of one captured picture
/// may share a timestamp, so the timestamp alone does not tell their frames apart.
type FrameKey = (u32, u32);

/// One packet as the filter sees it.
#[derive(Debug, Clone, Copy)]
pub struct TemporalPacket {
    /// The publisher's SSRC of the packet's layer.
    pub source: u32,
    pub timestamp: u32,
    /// The packet's temporal layer; `None` for streams without temporal layers.
    pub tid: Option<u8>,
    /// The frame depends on layer 0 only (VP8's Y bit).
    pub layer_sync: bool,
    /// The first packet of a keyframe.
    pub keyframe: bool,
}

impl TemporalFilter {
    /// The highest temporal layer to send from the next frame on (down at once, up at the
    /// next switch point).
    pub fn set_target(&mut self, tid: u8) {
        self.target = tid;
    }

    pub fn target(&self) -> u8 {
        self.target
    }

    /// The highest temporal layer being forwarded.
    pub fn current(&self) -> u8 {
        self.current
    }

    /// Whether this packet goes out.
    pub fn forward(&mut self, p: TemporalPacket) -> bool {
        let Some(tid) = p.tid else { return true };
        let key = (p.source, p.timestamp);
        for (k, out) in [self.frame, self.previous].into_iter().flatten() {
            if k == key {
                return out;
            }
        }
        if p.keyframe || self.target < self.current {
            self.current = self.target;
        } else if self.target > self.current && p.layer_sync && tid == self.current + 1 {
            // One layer at a time: a switch point of layer k depends on layer 0 only, but
            // the frames of layer k+1 after it may refer to layer k's frames since the last
            // layer-0 frame, which were left out.
            self.current = tid;
        }
        let out = tid <= self.current;
        self.previous = self.frame.replace((key, out));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Chromium's L1T3 pattern: 0 2 1 2, the first frame after layer 0 and layer 1's frames
    /// being switch points.
    fn frame(n: u32) -> TemporalPacket {
        let tid = [0, 2, 1, 2][n as usize % 4];
        TemporalPacket {
            source: 1,
            timestamp: n * 3000,
            tid: Some(tid),
            layer_sync: n % 4 == 1 || n % 4 == 2,
            keyframe: n == 0,
        }
    }

    fn run(f: &mut TemporalFilter, frames: std::ops::Range<u32>) -> Vec<u32> {
        frames.filter(|&n| f.forward(frame(n))).collect()
    }

    #[test]
    fn without_a_limit_every_frame_goes_out() {
        let mut f = TemporalFilter::default();
        assert_eq!(run(&mut f, 0..8), (0..8).collect::<Vec<_>>());
    }

    #[test]
    fn going_down_drops_the_upper_layers_from_the_next_frame() {
        let mut f = TemporalFilter::default();
        run(&mut f, 0..2);
        f.set_target(0);
        assert_eq!(run(&mut f, 2..10), vec![4, 8]);
        f.set_target(1);
        // Frame 10 (layer 1) is a switch point: it and layer 1 from then on go out.
        assert_eq!(run(&mut f, 10..16), vec![10, 12, 14]);
    }

    #[test]
    fn going_up_waits_for_a_switch_point_or_a_keyframe() {
        let mut f = TemporalFilter::default();
        f.set_target(0);
        run(&mut f, 0..4);
        f.set_target(2);
        // Frame 4 is layer 0; frame 5, a layer-2 switch point, is not layer 1's; frame 6 is,
        // and the next layer-2 switch point, 9, completes the climb.
        assert_eq!(run(&mut f, 4..10), vec![4, 6, 8, 9]);
        f.set_target(1);
        run(&mut f, 10..12);
        f.set_target(2);
        // Frame 13 is layer 2 but no switch point: it waits; 14 is layer 1, 17 a switch.
        let mut no_sync = frame(13);
        no_sync.layer_sync = false;
        assert!(!f.forward(no_sync));
        assert_eq!(run(&mut f, 14..18), vec![14, 16, 17]);
        // A keyframe lifts every limit at once.
        f.set_target(0);
        run(&mut f, 18..20);
        f.set_target(2);
        let mut key = frame(20);
        key.keyframe = true;
        assert!(f.forward(key));
        assert_eq!(f.current(), 2);
    }

    #[test]
    fn a_frame_goes_out_whole_or_not_at_all() {
        let mut f = TemporalFilter::default();
        let first = frame(1);
        assert!(f.forward(first));
        f.set_target(0);
        // The rest of frame 1, and a late packet of it after frame 2 began.
        assert!(f.forward(first));
        assert!(!f.forward(frame(2)));
        assert!(f.forward(first), "a late packet of a forwarded frame");
        assert!(!f.forward(frame(2)));
    }

    #[test]
    fn a_keyframe_of_another_layer_with_the_same_timestamp_is_its_own_frame() {
        let mut f = TemporalFilter::default();
        run(&mut f, 0..3);
        f.set_target(0);
        // The old layer's frame 3 (layer 2) is left out; the new layer's keyframe, captured
        // at the same instant, arrives after it and goes out.
        assert!(!f.forward(frame(3)));
        let mut key = frame(3);
        key.source = 2;
        key.tid = Some(0);
        key.keyframe = true;
        assert!(f.forward(key));
    }

    #[test]
    fn streams_without_temporal_layers_pass() {
        let mut f = TemporalFilter::default();
        f.set_target(0);
        let p = TemporalPacket {
            source: 1,
            timestamp: 1,
            tid: None,
            layer_sync: false,
            keyframe: false,
        };
        assert!(f.forward(p));
    }
}
