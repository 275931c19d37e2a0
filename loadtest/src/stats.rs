//! What a receiving participant measures. Pure: every call takes the arrival time in µs since
//! the process epoch, so tests drive it with simulated time.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use hdrhistogram::Histogram;

use crate::ids::{Layer, PublisherId};
use crate::payload::{IntegrityError, MediaHeader};

/// No complete video frame from a publisher for longer than this is a freeze.
pub const FREEZE_US: u64 = 500_000;
/// Partly received frames older than this (by send time) are forgotten: they will not complete.
pub const FRAME_ASSEMBLY_HORIZON_US: u64 = 3_000_000;
/// Partly received frames kept per publisher before old ones are pruned.
const MAX_OPEN_FRAMES: usize = 256;
/// Width of the duplicate-detection window, in sequence numbers.
const SEQ_WINDOW: u64 = 4096;
/// Highest latency the histograms record (larger values are clamped): 60 s in µs.
const MAX_LATENCY_US: u64 = 60_000_000;

/// A latency histogram in µs.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("static histogram bounds are valid")
}

/// Result of recording a sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    New,
    Duplicate,
    /// Too far behind to tell; counted as neither.
    TooOld,
}

/// Sliding window of sequence numbers seen, for duplicate detection and loss accounting.
#[derive(Debug, Clone)]
pub struct SeqWindow {
    first: u64,
    max: u64,
    bits: Vec<u64>,
    started: bool,
    /// Distinct sequence numbers received.
    pub received: u64,
}

impl Default for SeqWindow {
    fn default() -> Self {
        SeqWindow {
            first: 0,
            max: 0,
            bits: vec![0; (SEQ_WINDOW / 64) as usize],
            started: false,
            received: 0,
        }
    }
}

impl SeqWindow {
    fn bit(&mut self, seq: u64) -> (&mut u64, u64) {
        let i = seq % SEQ_WINDOW;
        (&mut self.bits[(i / 64) as usize], 1u64 << (i % 64))
    }

    /// Record `seq`; returns whether it is new and how many sequence numbers the highest-seen
    /// advanced by (the "expected" increment).
    pub fn insert(&mut self, seq: u64) -> (Seen, u64) {
        if !self.started {
            self.started = true;
            self.first = seq;
            self.max = seq;
            self.received = 1;
            let (w, b) = self.bit(seq);
            *w |= b;
            return (Seen::New, 1);
        }
        if seq > self.max {
            let advance = seq - self.max;
            // Clear the bits of the numbers we skip over (they leave the window's past).
            let clear = advance.min(SEQ_WINDOW);
            for s in (seq - clear + 1)..=seq {
                let (w, b) = self.bit(s);
                *w &= !b;
            }
            self.max = seq;
            let (w, b) = self.bit(seq);
            *w |= b;
            self.received += 1;
            return (Seen::New, advance);
        }
        if self.max - seq >= SEQ_WINDOW || seq < self.first {
            return (Seen::TooOld, 0);
        }
        let (w, b) = self.bit(seq);
        if *w & b != 0 {
            return (Seen::Duplicate, 0);
        }
        *w |= b;
        self.received += 1;
        (Seen::New, 0)
    }

    /// Sequence numbers between the first and the highest seen.
    pub fn expected(&self) -> u64 {
        if self.started {
            self.max - self.first + 1
        } else {
            0
        }
    }

    pub fn lost(&self) -> u64 {
        self.expected().saturating_sub(self.received)
    }
}

/// RFC 3550 interarrival jitter, from send times in our header.
#[derive(Debug, Clone, Default)]
pub struct Jitter {
    last_transit: Option<i64>,
    /// Current estimate, µs.
    pub jitter_us: f64,
}

impl Jitter {
    pub fn update(&mut self, sent_us: u64, arrival_us: u64) {
        let transit = arrival_us as i64 - sent_us as i64;
        if let Some(last) = self.last_transit {
            let d = (transit - last).abs() as f64;
            self.jitter_us += (d - self.jitter_us) / 16.0;
        }
        self.last_transit = Some(transit);
    }
}

#[derive(Debug, Clone)]
struct OpenFrame {
    sent_us: u64,
    got: u16,
    packets: u16,
}

/// Video from one publisher as one receiver sees it.
#[derive(Debug, Clone, Default)]
pub struct VideoRx {
    open: HashMap<(Layer, u32), OpenFrame>,
    seqs: [SeqWindow; 3],
    pub jitter: Jitter,
    pub bytes_per_layer: [u64; 3],
    pub packets: u64,
    pub complete_frames: u64,
    pub keyframes: u64,
    pub first_frame_us: Option<u64>,
    pub last_frame_us: Option<u64>,
    pub last_layer: Option<Layer>,
    pub layer_switches: u64,
    pub freezes: u64,
    pub freeze_us: u64,
    /// The longest time between two complete frames (or since the last one, at the end).
    pub longest_gap_us: u64,
    pub lost: u64,
    /// Time the focus said this video was paused for bandwidth (`io.weir.paused`): a tile
    /// that says "paused" is not a frozen one, so gaps and freezes leave it out.
    pub paused_us: u64,
    /// Since when it is paused, if it is now.
    paused_since: Option<u64>,
    /// Left out of this receiver's layout (unsubscribed): no frame is expected either.
    hidden: bool,
    /// Since when it has been paused or hidden, if it is now.
    held_since: Option<u64>,
    /// Time paused or hidden inside the current gap (since the last complete frame).
    held_in_gap_us: u64,
}

impl VideoRx {
    fn on_packet(&mut self, h: &MediaHeader, len: usize, now_us: u64) -> Seen {
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
        let key = (layer, h.frame);
        let f = self.open.entry(key).or_insert(OpenFrame {
            sent_us: h.sent_us,
            got: 0,
            packets: h.packets,
        });
        f.got += 1;
        if f.got >= f.packets {
            self.open.remove(&key);
            self.frame_complete(layer, h.keyframe, now_us);
        }
        if self.open.len() > MAX_OPEN_FRAMES {
            let horizon = h.sent_us.saturating_sub(FRAME_ASSEMBLY_HORIZON_US);
            self.open.retain(|_, f| f.sent_us >= horizon);
        }
        Seen::New
    }

    /// The focus paused this video toward us (or resumed it).
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

    /// The time since the last complete frame, less what of it the video was paused or
    /// hidden.
    fn gap_since(&self, last: u64, now_us: u64) -> u64 {
        let ongoing = self
            .held_since
            .map_or(0, |since| now_us.saturating_sub(since.max(last)));
        now_us
            .saturating_sub(last)
            .saturating_sub(self.held_in_gap_us + ongoing)
    }

    fn frame_complete(&mut self, layer: Layer, keyframe: bool, now_us: u64) {
        self.complete_frames += 1;
        if keyframe {
            self.keyframes += 1;
        }
        if let Some(last) = self.last_frame_us {
            let gap = self.gap_since(last, now_us);
            self.longest_gap_us = self.longest_gap_us.max(gap);
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

    /// An ongoing freeze at the end of the run counts too.
    fn finish(&mut self, now_us: u64) {
        if let Some(since) = self.paused_since {
            self.paused_us += now_us.saturating_sub(since);
        }
        if let Some(last) = self.last_frame_us {
            let gap = self.gap_since(last, now_us);
            self.longest_gap_us = self.longest_gap_us.max(gap);
            if gap > FREEZE_US {
                self.freezes += 1;
                self.freeze_us += gap;
                self.last_frame_us = Some(now_us);
            }
        }
        self.lost = self.seqs.iter().map(|s| s.lost()).sum();
    }
}

/// Audio from one publisher as one receiver sees it.
#[derive(Debug, Clone, Default)]
pub struct AudioRx {
    seqs: SeqWindow,
    pub jitter: Jitter,
    pub packets: u64,
    pub bytes: u64,
    pub voiced: u64,
}

/// One second of what a receiver got, for the time-series charts.
#[derive(Debug, Clone)]
pub struct SecondBucket {
    pub bytes: u64,
    pub packets: u64,
    /// Increase of the highest RTP sequence numbers seen (what should have arrived).
    pub expected: u64,
    pub latency: Histogram<u64>,
}

impl Default for SecondBucket {
    fn default() -> Self {
        SecondBucket {
            bytes: 0,
            packets: 0,
            expected: 0,
            latency: new_histogram(),
        }
    }
}

impl SecondBucket {
    pub fn merge(&mut self, o: &SecondBucket) {
        self.bytes += o.bytes;
        self.packets += o.packets;
        self.expected += o.expected;
        let _ = self.latency.add(&o.latency);
    }
}

/// The publishers a participant expects packets from.
#[derive(Debug, Clone, Default)]
pub struct Roster {
    /// Every publisher of the room.
    pub all: BTreeSet<PublisherId>,
    /// Those that call another focus (a cascade): their packets crossed a trunk.
    pub far: BTreeSet<PublisherId>,
}

/// Everything one receiving participant measures.
#[derive(Debug, Clone)]
pub struct RxStats {
    pub latency: Histogram<u64>,
    /// Latency of packets from publishers on another focus (through a trunk), and their
    /// payload bytes: the cascade's extra hop, measured against `latency`.
    pub latency_far: Histogram<u64>,
    pub latency_near: Histogram<u64>,
    pub far_bytes: u64,
    pub integrity_errors: u64,
    pub first_integrity_error: Option<IntegrityError>,
    pub duplicates: u64,
    pub rtp: HashMap<u32, SeqWindow>,
    pub video: BTreeMap<PublisherId, VideoRx>,
    pub audio: BTreeMap<PublisherId, AudioRx>,
    /// Packets naming a publisher that is not in this participant's room.
    pub foreign: u64,
    pub bytes: u64,
    pub packets: u64,
    pub second: SecondBucket,
}

impl Default for RxStats {
    fn default() -> Self {
        RxStats {
            latency: new_histogram(),
            latency_far: new_histogram(),
            latency_near: new_histogram(),
            far_bytes: 0,
            integrity_errors: 0,
            first_integrity_error: None,
            duplicates: 0,
            rtp: HashMap::new(),
            video: BTreeMap::new(),
            audio: BTreeMap::new(),
            foreign: 0,
            bytes: 0,
            packets: 0,
            second: SecondBucket::default(),
        }
    }
}

impl RxStats {
    /// Record one RTP packet: its SSRC and extended sequence number (for loss), and what its
    /// payload decoded to, against the `roster` of publishers expected in this room.
    pub fn on_packet(
        &mut self,
        ssrc: u32,
        rtp_seq: u64,
        decoded: Result<MediaHeader, IntegrityError>,
        len: usize,
        now_us: u64,
        roster: &Roster,
    ) {
        let (seen, advance) = self.rtp.entry(ssrc).or_default().insert(rtp_seq);
        self.second.expected += advance;
        if seen == Seen::Duplicate {
            self.duplicates += 1;
            return;
        }
        self.bytes += len as u64;
        self.packets += 1;
        self.second.bytes += len as u64;
        self.second.packets += 1;
        let h = match decoded {
            Ok(h) => h,
            Err(e) => {
                self.integrity_errors += 1;
                self.first_integrity_error.get_or_insert(e);
                return;
            }
        };
        if !roster.all.contains(&h.publisher) {
            self.foreign += 1;
            self.integrity_errors += 1;
            return;
        }
        let lat = now_us.saturating_sub(h.sent_us).clamp(1, MAX_LATENCY_US);
        let _ = self.latency.record(lat);
        let _ = self.second.latency.record(lat);
        if roster.far.contains(&h.publisher) {
            let _ = self.latency_far.record(lat);
            self.far_bytes += len as u64;
        } else {
            let _ = self.latency_near.record(lat);
        }
        let dup = if h.is_audio() {
            let a = self.audio.entry(h.publisher).or_default();
            let (s, _) = a.seqs.insert(u64::from(h.layer_seq));
            if s == Seen::New {
                a.packets += 1;
                a.bytes += len as u64;
                a.jitter.update(h.sent_us, now_us);
            }
            s
        } else {
            self.video
                .entry(h.publisher)
                .or_default()
                .on_packet(&h, len, now_us)
        };
        if dup == Seen::Duplicate {
            self.duplicates += 1;
        }
    }

    /// Mark an audio packet as voiced (from its RFC 6464 voice-activity flag).
    pub fn on_voice(&mut self, publisher: PublisherId) {
        if let Some(a) = self.audio.get_mut(&publisher) {
            a.voiced += 1;
        }
    }

    /// Take the current second's bucket.
    pub fn take_second(&mut self) -> SecondBucket {
        std::mem::take(&mut self.second)
    }

    /// Close the books at the end of the run.
    pub fn finish(&mut self, now_us: u64) {
        for v in self.video.values_mut() {
            v.finish(now_us);
        }
    }

    pub fn rtp_expected(&self) -> u64 {
        self.rtp.values().map(|w| w.expected()).sum()
    }

    pub fn rtp_lost(&self) -> u64 {
        self.rtp.values().map(|w| w.lost()).sum()
    }

    pub fn first_frame_us(&self) -> Option<u64> {
        self.video.values().filter_map(|v| v.first_frame_us).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::{decode, encode_video};

    #[test]
    fn packets_from_another_focus_are_measured_apart() {
        let mut s = RxStats::default();
        let r = Roster {
            far: [PublisherId(2)].into(),
            ..roster()
        };
        // Publisher 2 calls another focus: 30 ms; publisher 1, on ours: 10 ms.
        let mut h = hdr(Layer::Q, 0, 0, 3, 0, 1_000);
        h.publisher = PublisherId(2);
        s.on_packet(1, 1, Ok(h), 400, 31_000, &r);
        h.publisher = PublisherId(1);
        s.on_packet(2, 1, Ok(h), 300, 11_000, &r);
        assert_eq!(s.far_bytes, 400);
        assert_eq!(s.latency_far.len(), 1);
        assert!(s.latency_far.value_at_quantile(0.5).abs_diff(30_000) <= 30);
        assert!(s.latency_near.value_at_quantile(0.5).abs_diff(10_000) <= 10);
        assert_eq!(s.latency.len(), 2);
    }

    fn roster() -> Roster {
        Roster {
            all: [PublisherId(1), PublisherId(2)].into(),
            far: BTreeSet::new(),
        }
    }

    fn hdr(
        layer: Layer,
        frame: u32,
        packet: u16,
        packets: u16,
        seq: u32,
        sent: u64,
    ) -> MediaHeader {
        MediaHeader {
            publisher: PublisherId(1),
            layer: Some(layer),
            keyframe: frame == 0,
            frame,
            packet,
            packets,
            layer_seq: seq,
            sent_us: sent,
        }
    }

    #[test]
    fn seq_window_counts_loss_duplicates_and_late_fills() {
        let mut w = SeqWindow::default();
        assert_eq!(w.insert(10), (Seen::New, 1));
        assert_eq!(w.insert(11), (Seen::New, 1));
        assert_eq!(w.insert(14), (Seen::New, 3));
        assert_eq!(w.lost(), 2);
        assert_eq!(w.insert(12), (Seen::New, 0));
        assert_eq!(w.insert(12), (Seen::Duplicate, 0));
        assert_eq!(w.lost(), 1);
        assert_eq!(w.insert(9), (Seen::TooOld, 0));
        // Far ahead: the window slides without false duplicates.
        assert_eq!(w.insert(14 + 3 * SEQ_WINDOW), (Seen::New, 3 * SEQ_WINDOW));
        assert_eq!(w.insert(14 + 2 * SEQ_WINDOW + 5), (Seen::New, 0));
    }

    #[test]
    fn time_the_focus_said_a_video_was_paused_is_no_freeze() {
        let mut v = VideoRx::default();
        let t = 1_000_000;
        v.frame_complete(Layer::Q, true, t);
        // Paused for 3 s (told 100 ms after the last frame), then 200 ms to the next frame.
        v.on_paused(true, t + 100_000);
        v.on_paused(false, t + 3_100_000);
        v.frame_complete(Layer::Q, true, t + 3_300_000);
        assert_eq!((v.freezes, v.longest_gap_us), (0, 300_000));
        assert_eq!(v.paused_us, 3_000_000);
        // Paused again until the end: no freeze; a real stop after a resume still counts.
        v.on_paused(true, t + 3_400_000);
        v.finish(t + 9_000_000);
        assert_eq!(v.freezes, 0, "{v:?}");
        let mut w = VideoRx::default();
        w.frame_complete(Layer::Q, true, t);
        w.on_paused(true, t + 100_000);
        w.on_paused(false, t + 200_000);
        w.frame_complete(Layer::Q, true, t + 1_000_000);
        assert_eq!((w.freezes, w.longest_gap_us), (1, 900_000));
    }

    #[test]
    fn time_a_video_was_off_our_layout_is_no_freeze() {
        let mut v = VideoRx::default();
        let t = 1_000_000;
        v.frame_complete(Layer::Q, true, t);
        // Unsubscribed for 10 s, paused meanwhile too (overlapping), shown again, and the
        // first frame 300 ms later.
        v.on_shown(false, t + 50_000);
        v.on_paused(true, t + 1_000_000);
        v.on_paused(false, t + 2_000_000);
        v.on_shown(true, t + 10_050_000);
        v.frame_complete(Layer::Q, true, t + 10_350_000);
        assert_eq!((v.freezes, v.longest_gap_us), (0, 350_000));
        // Shown, and then nothing for 2 s: that is a freeze.
        v.frame_complete(Layer::Q, false, t + 12_350_000);
        assert_eq!((v.freezes, v.longest_gap_us), (1, 2_000_000));
    }

    #[test]
    fn frames_complete_and_a_gap_over_half_a_second_is_one_freeze() {
        let mut s = RxStats::default();
        let r = roster();
        let mut seq = 0;
        let mut rtp = 0;
        let mut t = 1_000_000;
        let mut feed = |s: &mut RxStats, frame: u32, t: u64, layer: Layer| {
            for p in 0..2 {
                s.on_packet(
                    1,
                    rtp,
                    Ok(hdr(layer, frame, p, 2, seq, t - 10_000)),
                    500,
                    t,
                    &r,
                );
                seq += 1;
                rtp += 1;
            }
        };
        for frame in 0..10 {
            feed(&mut s, frame, t, Layer::F);
            t += 33_333;
        }
        t += 700_000; // a stall
        feed(&mut s, 10, t, Layer::F);
        feed(&mut s, 11, t + 33_333, Layer::H);
        s.finish(t + 66_666);
        let v = &s.video[&PublisherId(1)];
        assert_eq!(v.complete_frames, 12);
        assert_eq!(v.freezes, 1);
        assert_eq!(
            v.longest_gap_us, 733_333,
            "the stall and the frame time before it"
        );
        assert_eq!(v.layer_switches, 1);
        assert_eq!(s.integrity_errors, 0);
        // 3 significant figures: within 0.1 %.
        assert!(s.latency.value_at_quantile(0.5).abs_diff(10_000) <= 10);
        assert_eq!(s.rtp_lost(), 0);
        assert_eq!(s.first_frame_us(), Some(1_000_000));
    }

    #[test]
    fn a_frame_missing_a_packet_never_completes_and_counts_as_loss() {
        let mut s = RxStats::default();
        let r = roster();
        s.on_packet(5, 100, Ok(hdr(Layer::Q, 0, 0, 3, 0, 0)), 400, 10, &r);
        s.on_packet(5, 102, Ok(hdr(Layer::Q, 0, 2, 3, 2, 0)), 400, 20, &r);
        s.finish(2_000_000);
        let v = &s.video[&PublisherId(1)];
        assert_eq!(v.complete_frames, 0);
        assert_eq!(v.lost, 1);
        assert_eq!(s.rtp_lost(), 1);
        assert_eq!(v.freezes, 0, "never started, so never froze");
    }

    #[test]
    fn integrity_errors_duplicates_and_strangers_are_counted() {
        let mut s = RxStats::default();
        let r = roster();
        let mut buf = Vec::new();
        let h = hdr(Layer::H, 0, 0, 1, 0, 5);
        encode_video(&h, 300, &mut buf);
        s.on_packet(1, 1, decode(&buf, true), 300, 10, &r);
        // The same RTP packet again (a duplicate on the wire).
        s.on_packet(1, 1, decode(&buf, true), 300, 11, &r);
        // The same media packet under a new RTP sequence number (duplicated by a forwarder).
        s.on_packet(1, 2, decode(&buf, true), 300, 12, &r);
        assert_eq!(s.duplicates, 2);
        buf[200] ^= 0x40;
        s.on_packet(1, 3, decode(&buf, true), 300, 13, &r);
        assert_eq!(s.integrity_errors, 1);
        assert_eq!(s.first_integrity_error, Some(IntegrityError::Checksum));
        let stranger = MediaHeader {
            publisher: PublisherId(99),
            ..h
        };
        s.on_packet(1, 4, Ok(stranger), 300, 14, &r);
        assert_eq!(s.foreign, 1);
        assert_eq!(s.integrity_errors, 2);
    }

    #[test]
    fn jitter_follows_rfc3550() {
        let mut j = Jitter::default();
        j.update(0, 100);
        j.update(20_000, 20_100);
        assert_eq!(j.jitter_us, 0.0);
        j.update(40_000, 41_700);
        assert!((j.jitter_us - 100.0).abs() < 1e-9);
    }

    #[test]
    fn seconds_are_taken_and_reset() {
        let mut s = RxStats::default();
        let r = roster();
        s.on_packet(1, 1, Ok(hdr(Layer::Q, 0, 0, 1, 0, 0)), 100, 50, &r);
        let b = s.take_second();
        assert_eq!((b.bytes, b.packets, b.expected), (100, 1, 1));
        assert_eq!(b.latency.len(), 1);
        assert_eq!(s.take_second().packets, 0);
    }
}
