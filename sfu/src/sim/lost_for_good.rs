//! A participant asking for a keyframe when a video packet is lost for good, as a browser's
//! decoder does: a frame missing a packet cannot be decoded, nor can any frame after it, so
//! once retransmission has had its chance the receiver asks the sender (here the focus) for a
//! fresh keyframe. Without this a simulated viewer would stand still until the next keyframe
//! someone else asked for, which a browser never does.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use str0m::rtp::Ssrc;

/// How long a packet missing from a video stream may stay missing (its NACKs unanswered)
/// before the participant asks for a keyframe, and the least time between two such requests
/// on one stream. Chromium gives up a packet after 10 NACKs spaced by the round trip and asks
/// for a keyframe once no frame has been decodable for 3 s (`kMaxWaitForFrame`; three times
/// the `rtx-time` of the description where one is given and shorter). So the simulation's
/// stops from a packet lost for good are shorter than Chromium's: a second is what the
/// focus should aim to beat, not what a browser does.
pub const KEYFRAME_AFTER_LOSS: Duration = Duration::from_secs(1);

/// A jump of sequence numbers larger than this is a new numbering (a stream restarted), not
/// loss: nothing is marked missing.
const MAX_GAP: u64 = 1000;

/// The sequence numbers missing from one received stream.
#[derive(Debug, Default)]
struct Gaps {
    /// The highest sequence number received, extended past wraps.
    highest: Option<u64>,
    /// Missing sequence numbers, with when each was first missed.
    missing: BTreeMap<u64, Instant>,
    asked_at: Option<Instant>,
}

/// The video streams one participant receives.
#[derive(Debug, Default)]
pub struct LostForGood {
    streams: HashMap<Ssrc, Gaps>,
}

impl LostForGood {
    /// A video packet of `ssrc` with sequence number `seq` arrived at `now`: whether the
    /// participant now asks for a keyframe on that stream.
    pub fn on_packet(&mut self, ssrc: Ssrc, seq: u16, now: Instant) -> bool {
        let g = self.streams.entry(ssrc).or_default();
        let ext = extend(g.highest, seq);
        match g.highest {
            Some(h) if ext > h && ext - h <= MAX_GAP => {
                g.missing.extend((h + 1..ext).map(|s| (s, now)));
                g.highest = Some(ext);
            }
            Some(h) if ext > h || h - ext > MAX_GAP => {
                g.missing.clear();
                g.highest = Some(ext);
            }
            Some(_) => {
                g.missing.remove(&ext);
            }
            None => g.highest = Some(ext),
        }
        let overdue = g
            .missing
            .values()
            .min()
            .is_some_and(|t| now.saturating_duration_since(*t) >= KEYFRAME_AFTER_LOSS);
        let may_ask = g
            .asked_at
            .is_none_or(|t| now.saturating_duration_since(t) >= KEYFRAME_AFTER_LOSS);
        if overdue && may_ask {
            g.missing.clear();
            g.asked_at = Some(now);
            return true;
        }
        false
    }
}

/// `seq` extended to 64 bits, as the value nearest to `highest`.
fn extend(highest: Option<u64>, seq: u16) -> u64 {
    let Some(h) = highest else {
        return u64::from(seq) + (1 << 16);
    };
    let base = h & !0xffff;
    [base.wrapping_sub(1 << 16), base, base + (1 << 16)]
        .into_iter()
        .map(|b| b + u64::from(seq))
        .min_by_key(|c| c.abs_diff(h))
        .unwrap_or(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_packet_missing_for_a_second_asks_for_one_keyframe() {
        let t0 = Instant::now();
        let ssrc = Ssrc::from(7);
        let mut l = LostForGood::default();
        let at = |ms| t0 + Duration::from_millis(ms);
        assert!(!l.on_packet(ssrc, 65_534, at(0)));
        // 65535 is lost; the numbering wraps.
        assert!(!l.on_packet(ssrc, 0, at(10)));
        assert!(!l.on_packet(ssrc, 1, at(500)));
        assert!(l.on_packet(ssrc, 2, at(1010)), "missing for a second");
        assert!(!l.on_packet(ssrc, 3, at(1020)), "asked already");
    }

    #[test]
    fn a_packet_repaired_in_time_asks_for_nothing() {
        let t0 = Instant::now();
        let ssrc = Ssrc::from(7);
        let mut l = LostForGood::default();
        let at = |ms| t0 + Duration::from_millis(ms);
        l.on_packet(ssrc, 10, at(0));
        l.on_packet(ssrc, 12, at(10));
        l.on_packet(ssrc, 11, at(200)); // the retransmission
        assert!(!l.on_packet(ssrc, 13, at(2000)));
        // A new numbering is not loss.
        assert!(!l.on_packet(ssrc, 30_000, at(2010)));
        assert!(!l.on_packet(ssrc, 30_001, at(4000)));
    }
}
