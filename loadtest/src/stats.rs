//! What a receiving participant measures. Pure: every call takes the arrival time in µs since
//! the process epoch, so tests drive it with simulated time.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use hdrhistogram::Histogram;

use crate::ids::PublisherId;
use crate::payload::{IntegrityError, MediaHeader};
pub use crate::seq_window::{unwrap_counter, Seen, SeqWindow};
pub use crate::video_rx::{VideoRx, FRAME_ASSEMBLY_HORIZON_US, FREEZE_US};

/// Highest latency the histograms record (larger values are clamped): 60 s in µs.
const MAX_LATENCY_US: u64 = 60_000_000;

/// A latency histogram in µs.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("static histogram bounds are valid")
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
    /// Keyframes this participant asked for because a video packet stayed lost
    /// (`weir_sfu::sim::KEYFRAME_AFTER_LOSS`), as a browser's decoder does.
    pub keyframes_asked: u64,
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
            keyframes_asked: 0,
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
                .on_packet(&h, ssrc, len, now_us)
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
    use crate::ids::Layer;
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
            vp8: Some(crate::payload::Vp8Desc {
                picture_id: (frame & 0x7fff) as u16,
                temporal: None,
            }),
        }
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
    fn after_a_frame_lost_for_good_complete_frames_show_nothing_until_a_keyframe() {
        let mut s = RxStats::default();
        let r = roster();
        let mut t = 1_000_000;
        // One packet per frame, 30 fps; frame 10 never arrives, frame 40 is a keyframe.
        for frame in 0..45u32 {
            if frame != 10 {
                let mut h = hdr(Layer::Q, frame, 0, 1, frame, t - 10_000);
                h.keyframe = frame == 0 || frame == 40;
                s.on_packet(1, u64::from(frame), Ok(h), 400, t, &r);
            }
            t += 33_333;
        }
        s.finish(t);
        let v = &s.video[&PublisherId(1)];
        assert_eq!(v.complete_frames, 44);
        assert_eq!(v.shown_frames, 10 + 5, "0-9, then 40-44");
        assert_eq!(v.freezes, 1);
        assert_eq!(
            v.longest_gap_us,
            31 * 33_333,
            "from frame 9 to the keyframe, not the 67 ms around the lost frame"
        );
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
    fn frames_left_out_whole_are_no_loss_but_picture_ids_never_received_are_counted() {
        use crate::payload::{Temporal, Vp8Desc};
        let mut s = RxStats::default();
        let r = roster();
        // Picture ids across the 15-bit wrap; the focus renumbers, so they run on by one.
        // Frame 3 (id 0) never arrives; TL0PICIDX 9 (a layer-0 frame) never does either.
        let frames: [(u32, u16, u8, u8); 5] = [
            (0, 32766, 0, 8),
            (1, 32767, 2, 8),
            (2, 0, 0, 10),
            (4, 2, 0, 11),
            (5, 3, 1, 11),
        ];
        for (i, &(frame, picture_id, tid, tl0)) in frames.iter().enumerate() {
            let h = MediaHeader {
                vp8: Some(Vp8Desc {
                    picture_id,
                    temporal: Some(Temporal {
                        tid,
                        layer_sync: false,
                        tl0_pic_idx: tl0,
                    }),
                }),
                ..hdr(Layer::Q, frame, 0, 1, frame, i as u64 * 33_333)
            };
            s.on_packet(3, i as u64, Ok(h), 300, i as u64 * 33_333, &r);
        }
        s.finish(1_000_000);
        let v = &s.video[&PublisherId(1)];
        assert_eq!(v.complete_frames, 5);
        assert_eq!(v.frames_per_tid, [3, 1, 1]);
        assert_eq!(v.lost, 0, "frames left out whole are not packets lost");
        assert_eq!(v.pictures_missing, 1, "picture id 1");
        assert_eq!(v.tl0_missing, 1, "TL0PICIDX 9");

        // Subscribed again: a new stream, numbered afresh, is no gap.
        let mut s = RxStats::default();
        s.on_packet(3, 0, Ok(hdr(Layer::Q, 0, 0, 1, 0, 0)), 300, 0, &r);
        s.on_packet(3, 1, Ok(hdr(Layer::Q, 1, 0, 1, 1, 33_333)), 300, 33_333, &r);
        s.on_packet(
            4,
            0,
            Ok(hdr(Layer::Q, 500, 0, 1, 2, 66_666)),
            300,
            66_666,
            &r,
        );
        s.on_packet(
            4,
            1,
            Ok(hdr(Layer::Q, 502, 0, 1, 3, 99_999)),
            300,
            99_999,
            &r,
        );
        s.finish(1_000_000);
        let v = &s.video[&PublisherId(1)];
        assert_eq!(v.pictures_missing, 1, "only 501, on the second stream");
        assert_eq!(unwrap_counter(Some((1 << 40) + 5), 250, 8), (1 << 40) - 6);
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
