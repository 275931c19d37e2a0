//! VP8 picture ids kept continuous for a subscriber that is sent only some temporal layers.
//!
//! A receiver (Chromium's `RtpVp8RefFinder`) notes every picture id it has not seen between
//! two it has, and holds back any later frame that might refer to one of them until that frame
//! arrives or ~100 pictures pass. Frames the focus leaves out on purpose never arrive, so left
//! alone the gaps would stop the picture. Renumbering them away is the one change weir makes
//! inside a payload: the payload descriptor is written by the sender's packetiser after frame
//! encryption and stays in clear, and the bytes encrypted end to end are untouched
//! (docs/decisions.md). A source (SSRC) starts unchanged: when the subscriber moves to another
//! layer it starts on a keyframe, which the receiver takes whatever its id.

use std::collections::VecDeque;

use super::vp8::PictureId;

/// How many of the latest skipped picture ids are remembered, so a packet of an earlier frame
/// arriving late still gets its own number. Deeper reordering than this renumbers such a packet
/// as if those frames came after it.
const SKIP_MEMORY: usize = 16;

/// One subscriber's renumbering of one track's picture ids.
#[derive(Debug, Clone, Default)]
pub struct PictureIds {
    /// The source renumbered, and the newest picture id seen from it.
    source: Option<(u32, u16)>,
    /// Pictures left out since the source started, modulo 2^15.
    skipped_total: u16,
    /// The latest pictures left out, oldest first.
    skipped: VecDeque<u16>,
}

/// Whether `a` comes after `b` among ids of `modulus` values.
fn ahead(a: u16, b: u16, modulus: u16) -> bool {
    let d = a.wrapping_sub(b) % modulus;
    d != 0 && d < modulus / 2
}

impl PictureIds {
    /// Start again with the next source: after a pause a subscriber resumes on a keyframe.
    pub fn resume(&mut self) {
        *self = PictureIds::default();
    }

    /// A frame of `source` left out. Counted once per picture, and only when newer than every
    /// picture seen (an older one was already numbered around).
    pub fn skip(&mut self, source: u32, id: PictureId) {
        let Some((s, newest)) = self.source.as_mut() else {
            return;
        };
        if *s != source || !ahead(id.value, *newest, id.modulus()) {
            return;
        }
        *newest = id.value;
        self.skipped_total = self.skipped_total.wrapping_add(1) % (1 << 15);
        if self.skipped.len() == SKIP_MEMORY {
            self.skipped.pop_front();
        }
        self.skipped.push_back(id.value);
    }

    /// The picture id to send for a packet of `source` carrying `id`.
    pub fn rewrite(&mut self, source: u32, id: PictureId) -> u16 {
        let m = id.modulus();
        match self.source.as_mut() {
            Some((s, newest)) if *s == source => {
                if ahead(id.value, *newest, m) {
                    *newest = id.value;
                }
            }
            _ => {
                *self = PictureIds {
                    source: Some((source, id.value)),
                    ..Default::default()
                };
                return id.value;
            }
        }
        let later = self
            .skipped
            .iter()
            .filter(|s| ahead(**s, id.value, m))
            .count() as u16;
        let behind = self.skipped_total.wrapping_sub(later) % m;
        (id.value + m - behind) % m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn long(value: u16) -> PictureId {
        PictureId { value, long: true }
    }

    #[test]
    fn ids_stay_continuous_across_skipped_frames() {
        let mut p = PictureIds::default();
        assert_eq!(p.rewrite(1, long(100)), 100);
        p.skip(1, long(101));
        p.skip(1, long(101)); // another packet of the same frame
        p.skip(1, long(102));
        assert_eq!(p.rewrite(1, long(103)), 101);
        assert_eq!(p.rewrite(1, long(103)), 101, "every packet of the frame");
        p.skip(1, long(104));
        assert_eq!(p.rewrite(1, long(105)), 102);
    }

    #[test]
    fn a_late_frame_keeps_its_place_and_an_old_skip_shifts_nothing() {
        let mut p = PictureIds::default();
        p.rewrite(1, long(10));
        // 11 is late; 12 is skipped, 13 forwarded; then 11 arrives.
        p.skip(1, long(12));
        assert_eq!(p.rewrite(1, long(13)), 12);
        assert_eq!(p.rewrite(1, long(11)), 11);
        p.skip(1, long(9));
        assert_eq!(p.rewrite(1, long(14)), 13);
    }

    #[test]
    fn ids_wrap_in_their_own_width() {
        let mut p = PictureIds::default();
        assert_eq!(p.rewrite(1, long(0x7ffe)), 0x7ffe);
        p.skip(1, long(0x7fff));
        assert_eq!(p.rewrite(1, long(0)), 0x7fff);
        assert_eq!(p.rewrite(1, long(1)), 0);
        let short = |value| PictureId { value, long: false };
        let mut p = PictureIds::default();
        p.rewrite(1, short(126));
        p.skip(1, short(127));
        p.skip(1, short(0));
        assert_eq!(p.rewrite(1, short(1)), 127);
    }

    #[test]
    fn a_new_source_starts_unchanged() {
        let mut p = PictureIds::default();
        p.rewrite(1, long(50));
        p.skip(1, long(51));
        assert_eq!(p.rewrite(1, long(52)), 51);
        assert_eq!(p.rewrite(2, long(7000)), 7000);
        p.skip(2, long(7001));
        p.resume();
        assert_eq!(p.rewrite(2, long(7002)), 7002);
    }
}
