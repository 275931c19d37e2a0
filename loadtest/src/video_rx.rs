//! Video from one publisher as one receiver sees it: frames assembled from packets, frames a
//! decoder could show ([`crate::decoder`]), freezes (time without a frame shown, less the time
//! the focus said the video was paused or the layout did not show it), and the VP8 picture
//! ids and TL0PICIDX checked for continuity.
//! Pure: every call takes the arrival time in µs.

use std::collections::HashMap;

use crate::decoder::{Decoder, Reference};
use crate::ids::Layer;
use crate::payload::MediaHeader;
use crate::seq_window::{unwrap_counter, Seen, SeqWindow};
use crate::stats::Jitter;

/// No video frame shown from a publisher for longer than this is a freeze.
pub const FREEZE_US: u64 = 500_000;
/// Partly received frames older than this (by send time) are forgotten: they will not complete.
pub const FRAME_ASSEMBLY_HORIZON_US: u64 = 3_000_000;
/// At the end of a run, a partly received frame sent longer ago than this will not complete:
/// its missing packets are lost, not in flight.
const IN_FLIGHT_US: u64 = 1_000_000;
/// Partly received frames kept per publisher before old ones are pruned.
const MAX_OPEN_FRAMES: usize = 256;

#[derive(Debug, Clone)]
struct OpenFrame {
    sent_us: u64,
    got: u16,
    packets: u16,
}

impl OpenFrame {
    fn missing(&self) -> u64 {
        u64::from(self.packets.saturating_sub(self.got))
    }
}

/// Video from one publisher as one receiver sees it.
#[derive(Debug, Clone, Default)]
pub struct VideoRx {
    open: HashMap<(Layer, u32), OpenFrame>,
    /// Our header's serial numbers per simulcast layer, to tell duplicates.
    seqs: [SeqWindow; 3],
    pub jitter: Jitter,
    pub bytes_per_layer: [u64; 3],
    pub packets: u64,
    pub complete_frames: u64,
    /// Complete frames a decoder could show: all they refer to was shown too.
    pub shown_frames: u64,
    pub keyframes: u64,
    decoder: Decoder,
    /// The first and the last frame shown.
    pub first_frame_us: Option<u64>,
    pub last_frame_us: Option<u64>,
    pub last_layer: Option<Layer>,
    pub layer_switches: u64,
    pub freezes: u64,
    pub freeze_us: u64,
    /// The longest time between two frames shown (or since the last one, at the end).
    pub longest_gap_us: u64,
    /// When that longest gap began: the last frame shown before it (whether a stop came
    /// at join or later; where it ended is less telling, since a gap that runs into a pause
    /// is measured only when the next frame comes, or at the end of the run).
    pub longest_gap_from_us: Option<u64>,
    /// Packets missing from frames of which others arrived (frames left out whole by the
    /// focus, as temporal layers it does not forward, are no loss).
    pub lost: u64,
    /// Complete frames per temporal layer (all in 0 for a stream without temporal layers).
    pub frames_per_tid: [u64; 3],
    /// The VP8 picture ids received on the current RTP stream (SSRC), extended: the focus
    /// numbers the frames it sends on one stream one after the other, so an id never received
    /// is a frame lost whole, on the link or by the focus. A track subscribed again comes on
    /// a new stream, numbered afresh (a receiver's bookkeeping is per stream too).
    numbered_ssrc: Option<u32>,
    pictures: SeqWindow,
    /// The same for TL0PICIDX, which counts temporal layer 0 frames (never left out).
    tl0s: SeqWindow,
    /// Picture ids and TL0PICIDX values skipped and never received, at the end.
    pub pictures_missing: u64,
    pub tl0_missing: u64,

    /// Time the focus said this video was paused for bandwidth (`io.weir.paused`): a tile
    /// that says "paused" is not a frozen one, so gaps and freezes leave it out.
    pub paused_us: u64,
    /// Since when it is paused, if it is now.
    paused_since: Option<u64>,
    /// The number (`seq`) of the newest pause notice applied: on the unordered notices
    /// channel an older one may arrive after it, and must not undo it.
    notice_seq: u64,
    /// Left out of this receiver's layout (unsubscribed): no frame is expected either.
    hidden: bool,
    /// Since when it has been paused or hidden, if it is now.
    held_since: Option<u64>,
    /// Time paused or hidden inside the current gap (since the last frame shown).
    held_in_gap_us: u64,
}

impl VideoRx {
    pub(crate) fn on_packet(
        &mut self,
        h: &MediaHeader,
        ssrc: u32,
        len: usize,
        now_us: u64,
    ) -> Seen {
        let Some(layer) = h.layer else {
            return Seen::TooOld;
        };
        let (seen, _) = self.seqs[layer.index()].insert(u64::from(h.layer_seq));
        if seen != Seen::New {
            return seen;
        }
        self.packets += 1;
        self.bytes_per_layer[layer.index()] += len as u64;
        self.jitter.update(h.sent_us, now_us);
        if let Some(d) = h.vp8 {
            self.on_descriptor(ssrc, d);
        }
        let key = (layer, h.frame);
        let f = self.open.entry(key).or_insert(OpenFrame {
            sent_us: h.sent_us,
            got: 0,
            packets: h.packets,
        });
        f.got += 1;
        if f.got >= f.packets {
            self.open.remove(&key);
            let tid = h.vp8.and_then(|d| d.temporal).map_or(0, |t| t.tid);
            self.frames_per_tid[usize::from(tid.min(2))] += 1;
            self.frame_complete(layer, h.keyframe, h.vp8, now_us);
        }
        if self.open.len() > MAX_OPEN_FRAMES {
            let horizon = h.sent_us.saturating_sub(FRAME_ASSEMBLY_HORIZON_US);
            let mut lost = 0;
            self.open.retain(|_, f| {
                let keep = f.sent_us >= horizon;
                if !keep {
                    lost += f.missing();
                }
                keep
            });
            self.lost += lost;
        }
        Seen::New
    }

    /// Note a packet's picture id and TL0PICIDX (every packet of a frame carries them).
    fn on_descriptor(&mut self, ssrc: u32, d: crate::payload::Vp8Desc) {
        if self.numbered_ssrc != Some(ssrc) {
            self.close_numbering();
            self.numbered_ssrc = Some(ssrc);
            self.decoder.reset();
        }
        let p = unwrap_counter(self.pictures.highest(), u64::from(d.picture_id), 15);
        self.pictures.insert(p);
        if let Some(t) = d.temporal.filter(|t| t.tid == 0) {
            let x = unwrap_counter(self.tl0s.highest(), u64::from(t.tl0_pic_idx), 8);
            self.tl0s.insert(x);
        }
    }

    /// Count what the current stream's numbering skipped, and forget it.
    fn close_numbering(&mut self) {
        self.pictures_missing += self.pictures.lost();
        self.tl0_missing += self.tl0s.lost();
        self.pictures = SeqWindow::default();
        self.tl0s = SeqWindow::default();
    }

    /// The focus paused this video toward us (or resumed it).
    /// An `io.weir.paused` notice numbered `seq` (none from a focus that does not number
    /// them): applied unless a newer one was.
    pub fn on_notice(&mut self, paused: bool, seq: Option<u64>, now_us: u64) {
        if let Some(seq) = seq {
            if seq <= self.notice_seq {
                return;
            }
            self.notice_seq = seq;
        }
        self.on_paused(paused, now_us);
    }

    pub fn on_paused(&mut self, paused: bool, now_us: u64) {
        match (paused, self.paused_since) {
            (true, None) => self.paused_since = Some(now_us),
            (false, Some(since)) => {
                self.paused_us += now_us.saturating_sub(since);
                self.paused_since = None;
            }
            _ => {}
        }
        self.update_held(now_us);
    }

    /// Our layout shows this video (subscribed) or no longer does (unsubscribed): a tile
    /// that is not on screen cannot freeze.
    pub fn on_shown(&mut self, shown: bool, now_us: u64) {
        self.hidden = !shown;
        self.update_held(now_us);
    }

    fn update_held(&mut self, now_us: u64) {
        let held = self.paused_since.is_some() || self.hidden;
        match (held, self.held_since) {
            (true, None) => self.held_since = Some(now_us),
            (false, Some(since)) => {
                let from = since.max(self.last_frame_us.unwrap_or(0));
                self.held_in_gap_us += now_us.saturating_sub(from);
                self.held_since = None;
            }
            _ => {}
        }
    }

    /// The time since the last frame shown, less what of it the video was paused or
    /// hidden.
    fn gap_since(&self, last: u64, now_us: u64) -> u64 {
        let ongoing = self
            .held_since
            .map_or(0, |since| now_us.saturating_sub(since.max(last)));
        now_us
            .saturating_sub(last)
            .saturating_sub(self.held_in_gap_us + ongoing)
    }

    /// A frame completed: shown, with any waiting on it, if the decoder could show it.
    fn frame_complete(
        &mut self,
        layer: Layer,
        keyframe: bool,
        vp8: Option<crate::payload::Vp8Desc>,
        now_us: u64,
    ) {
        self.complete_frames += 1;
        if keyframe {
            self.keyframes += 1;
        }
        let shown = match vp8 {
            Some(d) => self.decoder.on_complete(
                keyframe,
                match d.temporal {
                    Some(t) => Reference::Temporal {
                        tid: t.tid,
                        tl0_pic_idx: t.tl0_pic_idx,
                    },
                    None => Reference::Picture {
                        picture_id: d.picture_id,
                    },
                },
            ),
            None => 1,
        };
        if shown > 0 {
            self.shown_frames += u64::from(shown);
            self.frame_shown(layer, now_us);
        }
    }

    /// A picture shown (the newest, if several were at once).
    fn frame_shown(&mut self, layer: Layer, now_us: u64) {
        if let Some(last) = self.last_frame_us {
            let gap = self.gap_since(last, now_us);
            self.note_gap(gap, last);
            if gap > FREEZE_US {
                self.freezes += 1;
                self.freeze_us += gap;
            }
        }
        self.first_frame_us.get_or_insert(now_us);
        self.last_frame_us = Some(now_us);
        self.held_in_gap_us = 0;
        if self.last_layer.is_some_and(|l| l != layer) {
            self.layer_switches += 1;
        }
        self.last_layer = Some(layer);
    }

    /// A gap between frames that began with the frame at `from_us`: the longest so far, and
    /// when it began.
    fn note_gap(&mut self, gap: u64, from_us: u64) {
        if gap > self.longest_gap_us {
            self.longest_gap_us = gap;
            self.longest_gap_from_us = Some(from_us);
        }
    }

    /// An ongoing freeze at the end of the run counts too.
    pub(crate) fn finish(&mut self, now_us: u64) {
        if let Some(since) = self.paused_since {
            self.paused_us += now_us.saturating_sub(since);
        }
        if let Some(last) = self.last_frame_us {
            let gap = self.gap_since(last, now_us);
            self.note_gap(gap, last);
            if gap > FREEZE_US {
                self.freezes += 1;
                self.freeze_us += gap;
                self.last_frame_us = Some(now_us);
            }
        }
        self.lost += self
            .open
            .values()
            .filter(|f| f.sent_us + IN_FLIGHT_US < now_us)
            .map(OpenFrame::missing)
            .sum::<u64>();
        self.open.clear();
        self.close_numbering();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_late_notice_does_not_undo_a_newer_one() {
        let mut v = VideoRx::default();
        let t = 1_000_000;
        v.on_notice(false, Some(3), t);
        v.on_notice(true, Some(5), t + 100_000);
        // Notice 4 (flowing) overtaken by 5 on the unordered channel, and a repeat of 5.
        v.on_notice(false, Some(4), t + 200_000);
        v.on_notice(true, Some(5), t + 300_000);
        v.finish(t + 1_100_000);
        assert_eq!(v.paused_us, 1_000_000, "paused since notice 5: {v:?}");
        // Without numbers (an older focus), each notice applies as it comes.
        let mut w = VideoRx::default();
        w.on_notice(true, None, t);
        w.on_notice(false, None, t + 100_000);
        w.finish(t + 1_000_000);
        assert_eq!(w.paused_us, 100_000);
    }

    #[test]
    fn time_the_focus_said_a_video_was_paused_is_no_freeze() {
        let mut v = VideoRx::default();
        let t = 1_000_000;
        v.frame_shown(Layer::Q, t);
        // Paused for 3 s (told 100 ms after the last frame), then 200 ms to the next frame.
        v.on_paused(true, t + 100_000);
        v.on_paused(false, t + 3_100_000);
        v.frame_shown(Layer::Q, t + 3_300_000);
        assert_eq!((v.freezes, v.longest_gap_us), (0, 300_000));
        assert_eq!(v.paused_us, 3_000_000);
        // Paused again until the end: no freeze; a real stop after a resume still counts.
        v.on_paused(true, t + 3_400_000);
        v.finish(t + 9_000_000);
        assert_eq!(v.freezes, 0, "{v:?}");
        let mut w = VideoRx::default();
        w.frame_shown(Layer::Q, t);
        w.on_paused(true, t + 100_000);
        w.on_paused(false, t + 200_000);
        w.frame_shown(Layer::Q, t + 1_000_000);
        assert_eq!((w.freezes, w.longest_gap_us), (1, 900_000));
        assert_eq!(
            w.longest_gap_from_us,
            Some(t),
            "it began with the frame at t"
        );
        w.frame_shown(Layer::Q, t + 1_500_000);
        assert_eq!(w.longest_gap_from_us, Some(t), "a shorter gap is not it");
    }

    #[test]
    fn time_a_video_was_off_our_layout_is_no_freeze() {
        let mut v = VideoRx::default();
        let t = 1_000_000;
        v.frame_shown(Layer::Q, t);
        // Unsubscribed for 10 s, paused meanwhile too (overlapping), shown again, and the
        // first frame 300 ms later.
        v.on_shown(false, t + 50_000);
        v.on_paused(true, t + 1_000_000);
        v.on_paused(false, t + 2_000_000);
        v.on_shown(true, t + 10_050_000);
        v.frame_shown(Layer::Q, t + 10_350_000);
        assert_eq!((v.freezes, v.longest_gap_us), (0, 350_000));
        // Shown, and then nothing for 2 s: that is a freeze.
        v.frame_shown(Layer::Q, t + 12_350_000);
        assert_eq!((v.freezes, v.longest_gap_us), (1, 2_000_000));
    }

    #[test]
    fn frames_in_flight_of_a_video_never_on_our_layout_are_no_freeze() {
        let mut v = VideoRx::default();
        let t = 1_000_000;
        // Left out of the first subscription before any of its frames came; two that were
        // on the way arrive, and then nothing until the end.
        v.on_shown(false, t);
        v.frame_shown(Layer::Q, t + 40_000);
        v.frame_shown(Layer::Q, t + 80_000);
        v.finish(t + 5_000_000);
        assert_eq!((v.freezes, v.longest_gap_us), (0, 0), "{v:?}");
    }
}
