//! What a receiver's decoder could show of one video stream. A complete frame is not yet a
//! picture: it shows only when every frame it refers to was shown, as in a browser's frame
//! buffer. After a frame lost for good, the frames that follow complete but show nothing
//! until the next keyframe; counting complete frames would call that time video.
//!
//! The references come from the VP8 payload descriptor as received (the focus's numbering),
//! as a decoder reads them. With temporal layers (Chromium's L1T3): a keyframe refers to
//! nothing; a layer-0 frame refers to the layer-0 frame before it (TL0PICIDX one less); a
//! frame of a higher layer refers to the layer-0 frame of its own TL0PICIDX. (In L1T3 a
//! layer-2 frame may also refer to the layer-1 frame before it; the model leaves that out, so
//! it can only show more than a decoder would, never less.) Without temporal layers every
//! frame refers to the one before it, by picture id. A frame that completes before what it
//! refers to waits, as a frame buffer holds it; one older than what was last shown is skipped.
//! Pure.

use crate::seq_window::unwrap_counter;

/// Complete frames kept waiting for what they refer to. More than a second of frames: a
/// frame that waits longer shows nothing anyway, since a keyframe must come first.
const MAX_WAITING: usize = 64;

/// How a complete frame refers to others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reference {
    /// Temporal layers: the frame's layer and its TL0PICIDX (8 bits).
    Temporal { tid: u8, tl0_pic_idx: u8 },
    /// No temporal layers: the frame's picture id (15 bits).
    Picture { picture_id: u16 },
}

impl Reference {
    /// The frame's place in the chain of frames that refer to each other, its width in bits,
    /// and whether it is on the chain itself (rather than hanging off one of its frames).
    fn chain(self) -> (u64, u32, bool) {
        match self {
            Reference::Temporal { tid, tl0_pic_idx } => (u64::from(tl0_pic_idx), 8, tid == 0),
            Reference::Picture { picture_id } => (u64::from(picture_id), 15, true),
        }
    }
}

/// The decoder model of one received stream (one SSRC).
#[derive(Debug, Clone, Default)]
pub struct Decoder {
    /// The last chain frame shown (extended), if the stream has been decodable since its
    /// last keyframe.
    shown: Option<u64>,
    /// The bit width of the numbering in use (8 or 15): a stream that changes it starts over.
    bits: u32,
    /// The highest chain number seen, to extend the next one from.
    highest: Option<u64>,
    /// Complete frames waiting for what they refer to: (extended chain number, on the chain).
    waiting: Vec<(u64, bool)>,
}

impl Decoder {
    /// A frame completed. Returns how many frames that lets the decoder show: 0 while it
    /// waits (or is skipped), and more than 1 when it completes a run of waiting frames.
    pub fn on_complete(&mut self, keyframe: bool, reference: Reference) -> u32 {
        let (raw, bits, on_chain) = reference.chain();
        if bits != self.bits {
            *self = Decoder {
                bits,
                ..Decoder::default()
            };
        }
        let n = unwrap_counter(self.highest, raw, bits);
        self.highest = Some(self.highest.map_or(n, |h| h.max(n)));
        if keyframe {
            if self.shown.is_some_and(|shown| n <= shown) {
                // Completed after newer frames were shown: a decoder skips it as old.
                return 0;
            }
            self.shown = Some(n);
            return 1 + self.release();
        }
        let Some(shown) = self.shown else {
            // Nothing to refer to before a keyframe.
            return 0;
        };
        let ready = if on_chain { n == shown + 1 } else { n == shown };
        if ready {
            if on_chain {
                self.shown = Some(n);
            }
            return 1 + self.release();
        }
        let old = if on_chain { n <= shown } else { n < shown };
        if !old {
            if self.waiting.len() == MAX_WAITING {
                self.waiting.remove(0);
            }
            self.waiting.push((n, on_chain));
        }
        0
    }

    /// The stream starts over (a new SSRC): nothing received before refers to anything after.
    pub fn reset(&mut self) {
        *self = Decoder::default();
    }

    /// Show the waiting frames the last shown one completes; skip those it made old.
    fn release(&mut self) -> u32 {
        let mut released = 0;
        while let Some(shown) = self.shown {
            let mut next = None;
            self.waiting.retain(|&(n, on_chain)| {
                let ready = if on_chain { n == shown + 1 } else { n == shown };
                if ready {
                    released += 1;
                    if on_chain {
                        next = Some(n);
                    }
                    return false;
                }
                // Keep only what may still show.
                if on_chain {
                    n > shown + 1
                } else {
                    n > shown
                }
            });
            match next {
                Some(n) => self.shown = Some(n),
                None => break,
            }
        }
        released
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tl(tid: u8, tl0_pic_idx: u8) -> Reference {
        Reference::Temporal { tid, tl0_pic_idx }
    }

    #[test]
    fn after_a_base_frame_lost_for_good_nothing_shows_until_a_keyframe() {
        let mut d = Decoder::default();
        // L1T3: tids 0 2 1 2 per TL0PICIDX.
        assert_eq!(d.on_complete(true, tl(0, 10)), 1);
        for tid in [2, 1, 2] {
            assert_eq!(d.on_complete(false, tl(tid, 10)), 1);
        }
        // The layer-0 frame of 11 is lost; 11's upper frames and 12's complete, in vain.
        for tid in [2, 1, 2] {
            assert_eq!(d.on_complete(false, tl(tid, 11)), 0, "tid {tid} of 11");
        }
        assert_eq!(d.on_complete(false, tl(0, 12)), 0);
        assert_eq!(d.on_complete(false, tl(2, 12)), 0);
        // A keyframe shows, and its group after it.
        assert_eq!(d.on_complete(true, tl(0, 13)), 1);
        assert_eq!(d.on_complete(false, tl(2, 13)), 1);
        assert_eq!(d.on_complete(false, tl(0, 14)), 1);
    }

    #[test]
    fn a_frame_completed_late_by_retransmission_releases_those_waiting_on_it() {
        let mut d = Decoder::default();
        assert_eq!(d.on_complete(true, tl(0, 254)), 1);
        // 255's layer-0 frame is repaired late: its upper frames and 0 (wrapped) wait.
        assert_eq!(d.on_complete(false, tl(2, 255)), 0);
        assert_eq!(d.on_complete(false, tl(1, 255)), 0);
        assert_eq!(d.on_complete(false, tl(0, 0)), 0);
        assert_eq!(d.on_complete(false, tl(2, 0)), 0);
        assert_eq!(
            d.on_complete(false, tl(0, 255)),
            5,
            "itself and the four waiting"
        );
        assert_eq!(d.on_complete(false, tl(0, 1)), 1);
        // A frame older than what was shown is skipped, not shown.
        assert_eq!(d.on_complete(false, tl(2, 0)), 0);
    }

    #[test]
    fn without_temporal_layers_each_frame_needs_the_one_before() {
        let mut d = Decoder::default();
        let p = |picture_id| Reference::Picture { picture_id };
        assert_eq!(d.on_complete(false, p(5)), 0, "no keyframe yet");
        assert_eq!(d.on_complete(true, p(0x7ffe)), 1);
        assert_eq!(d.on_complete(false, p(0x7fff)), 1);
        assert_eq!(d.on_complete(false, p(1)), 0, "0 is missing");
        assert_eq!(d.on_complete(false, p(0)), 2);
        // A new stream starts over.
        d.reset();
        assert_eq!(d.on_complete(false, p(2)), 0);
    }

    #[test]
    fn waiting_frames_are_bounded() {
        let mut d = Decoder::default();
        d.on_complete(true, Reference::Picture { picture_id: 0 });
        for i in 2..1000u16 {
            d.on_complete(false, Reference::Picture { picture_id: i });
        }
        assert_eq!(d.waiting.len(), MAX_WAITING);
        // Frame 1 comes at last: only the newest waiting frames are left, and they do not
        // follow on from it.
        assert_eq!(
            d.on_complete(false, Reference::Picture { picture_id: 1 }),
            1
        );
    }
}
