//! VP8 picture ids and TL0PICIDX kept in one continuous sequence per subscriber: across the
//! frames of temporal layers it is not sent, and across moves between simulcast layers.
//!
//! Each simulcast layer is its own encoder with its own picture ids and TL0PICIDX, starting at
//! random values. A receiver (Chromium's `RtpVp8RefFinder`) keeps its reference bookkeeping
//! per stream, not per encoder: it notes every picture id it has not seen and holds back later
//! frames that might refer to one, and it finds a layer-0 frame's reference by the TL0PICIDX
//! before it, dropping the frame as old when what it finds is ahead of it. Frames left out on
//! purpose leave gaps that never fill, and a move to a layer whose ids happen to be behind the
//! old layer's makes its frames look old. So the focus renumbers: the ids of frames left out are
//! taken out of the sequence, and a new source continues where the last one stopped.
//!
//! This is the one change weir makes inside a payload: the VP8 payload descriptor is written
//! by the sender's packetiser after frame encryption and stays in clear; the encrypted frame
//! after it is untouched (docs/decisions.md).

use std::collections::VecDeque;

use super::vp8::PictureId;

/// How many of the latest skipped picture ids are remembered, so a packet of an earlier frame
/// arriving late still gets its own number. Deeper reordering than this renumbers such a packet
/// as if those frames came after it.
const SKIP_MEMORY: usize = 16;

/// What one packet's descriptor carries, and what to send instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vp8Numbers {
    pub picture_id: u16,
    pub tl0_pic_idx: Option<u8>,
}

/// One subscriber's numbering of one track's VP8 picture ids and TL0PICIDX.
#[derive(Debug, Clone, Default)]
pub struct Vp8Ids {
    /// The source numbered now, and the newest picture id seen from it.
    source: Option<(u32, u16)>,
    /// Added to the source's picture ids (modulo their width) and TL0PICIDX, so that it
    /// continues the sequence the subscriber has seen.
    pid_base: u16,
    tl0_base: u8,
    /// Pictures of this source left out, modulo 2^15.
    skipped_total: u16,
    /// The latest pictures left out, oldest first.
    skipped: VecDeque<u16>,
    /// The newest picture id and TL0PICIDX sent, for the next source to continue from.
    last_out: Option<(u16, Option<u8>)>,
}

/// Whether `a` comes after `b` among ids of `modulus` values.
fn ahead(a: u16, b: u16, modulus: u16) -> bool {
    let d = a.wrapping_sub(b) % modulus;
    d != 0 && d < modulus / 2
}

impl Vp8Ids {
    /// The next packet starts a new source even if it comes from the same one: after a pause
    /// a subscriber resumes on a keyframe, and the ids skipped meanwhile must not count.
    pub fn resume(&mut self) {
        self.source = None;
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

    /// The numbers to send for a packet of `source` carrying `id` and `tl0_pic_idx`.
    pub fn rewrite(&mut self, source: u32, id: PictureId, tl0_pic_idx: Option<u8>) -> Vp8Numbers {
        let m = id.modulus();
        let newest = match self.source.as_mut() {
            Some((s, newest)) if *s == source => {
                let is_newest = !ahead(*newest, id.value, m);
                if ahead(id.value, *newest, m) {
                    *newest = id.value;
                }
                is_newest
            }
            _ => {
                // A new source continues after the last numbers sent (its first packet is a
                // keyframe, which starts a new TL0PICIDX too).
                let (pid_base, tl0_base) = match self.last_out {
                    Some((pid, tl0)) => (
                        pid.wrapping_add(1).wrapping_sub(id.value) % m,
                        match (tl0, tl0_pic_idx) {
                            (Some(last), Some(now)) => last.wrapping_add(1).wrapping_sub(now),
                            _ => 0,
                        },
                    ),
                    None => (0, 0),
                };
                *self = Vp8Ids {
                    source: Some((source, id.value)),
                    pid_base,
                    tl0_base,
                    last_out: self.last_out,
                    ..Default::default()
                };
                true
            }
        };
        let later = self
            .skipped
            .iter()
            .filter(|s| ahead(**s, id.value, m))
            .count() as u16;
        let behind = self.skipped_total.wrapping_sub(later) % m;
        let out = Vp8Numbers {
            picture_id: (u32::from(id.value) + u32::from(self.pid_base) + u32::from(m - behind))
                as u16
                % m,
            tl0_pic_idx: tl0_pic_idx.map(|t| t.wrapping_add(self.tl0_base)),
        };
        if newest {
            self.last_out = Some((out.picture_id, out.tl0_pic_idx));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn long(value: u16) -> PictureId {
        PictureId { value, long: true }
    }

    fn pid(ids: &mut Vp8Ids, source: u32, value: u16) -> u16 {
        ids.rewrite(source, long(value), None).picture_id
    }

    #[test]
    fn ids_stay_continuous_across_skipped_frames() {
        let mut p = Vp8Ids::default();
        assert_eq!(
            pid(&mut p, 1, 100),
            100,
            "the first source passes unchanged"
        );
        p.skip(1, long(101));
        p.skip(1, long(101)); // another packet of the same frame
        p.skip(1, long(102));
        assert_eq!(pid(&mut p, 1, 103), 101);
        assert_eq!(pid(&mut p, 1, 103), 101, "every packet of the frame");
        p.skip(1, long(104));
        assert_eq!(pid(&mut p, 1, 105), 102);
    }

    #[test]
    fn a_late_frame_keeps_its_place_and_an_old_skip_shifts_nothing() {
        let mut p = Vp8Ids::default();
        pid(&mut p, 1, 10);
        // 11 is late; 12 is skipped, 13 forwarded; then 11 arrives.
        p.skip(1, long(12));
        assert_eq!(pid(&mut p, 1, 13), 12);
        assert_eq!(pid(&mut p, 1, 11), 11);
        p.skip(1, long(9));
        assert_eq!(pid(&mut p, 1, 14), 13);
    }

    #[test]
    fn ids_wrap_in_their_own_width() {
        let mut p = Vp8Ids::default();
        assert_eq!(pid(&mut p, 1, 0x7ffe), 0x7ffe);
        p.skip(1, long(0x7fff));
        assert_eq!(pid(&mut p, 1, 0), 0x7fff);
        assert_eq!(pid(&mut p, 1, 1), 0);
        let short = |value| PictureId { value, long: false };
        let mut p = Vp8Ids::default();
        p.rewrite(1, short(126), None);
        p.skip(1, short(127));
        p.skip(1, short(0));
        assert_eq!(p.rewrite(1, short(1), None).picture_id, 127);
    }

    #[test]
    fn a_new_source_continues_the_sequence_the_subscriber_saw() {
        let mut p = Vp8Ids::default();
        let n = p.rewrite(1, long(20_000), Some(200));
        assert_eq!(
            n,
            Vp8Numbers {
                picture_id: 20_000,
                tl0_pic_idx: Some(200)
            }
        );
        p.skip(1, long(20_001));
        assert_eq!(
            p.rewrite(1, long(20_002), Some(201)),
            Vp8Numbers {
                picture_id: 20_001,
                tl0_pic_idx: Some(201)
            }
        );
        // Another layer, its ids far behind: its keyframe continues at 20_002 and 202.
        assert_eq!(
            p.rewrite(2, long(1_300), Some(7)),
            Vp8Numbers {
                picture_id: 20_002,
                tl0_pic_idx: Some(202)
            }
        );
        assert_eq!(
            p.rewrite(2, long(1_301), Some(7)),
            Vp8Numbers {
                picture_id: 20_003,
                tl0_pic_idx: Some(202)
            }
        );
        // Resumed after a pause on the same source: it continues too, skipping nothing.
        p.skip(2, long(1_302));
        p.resume();
        assert_eq!(
            p.rewrite(2, long(1_400), Some(40)),
            Vp8Numbers {
                picture_id: 20_004,
                tl0_pic_idx: Some(203)
            }
        );
    }

    #[test]
    fn a_late_packet_of_the_old_source_does_not_move_the_sequence_back() {
        let mut p = Vp8Ids::default();
        pid(&mut p, 1, 500);
        pid(&mut p, 1, 501);
        assert_eq!(pid(&mut p, 1, 499), 499);
        assert_eq!(
            pid(&mut p, 2, 9),
            502,
            "continues after the newest, not the late one"
        );
    }
}
