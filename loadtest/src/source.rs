//! Synthetic media sources: when to send what, with realistic sizes. Pure: time is passed in as
//! µs, randomness comes from a seeded generator.
//!
//! Video: three simulcast layers at 30 fps, each with three temporal layers (L1T3) as Chromium
//! encodes them. Delta-frame sizes vary log-normally around the layer's mean, scaled per
//! temporal layer ([`TEMPORAL_SIZE_FACTOR`]); a keyframe is [`KEYFRAME_SIZE_FACTOR`] times a
//! mean delta frame, every [`KEYFRAME_INTERVAL_US`] and on request (PLI/FIR), answered as
//! Chromium answers them ([`VideoSource::request_keyframe`]). Sizes are scaled
//! so each layer averages its target bitrate. Audio: 50 packets/s, larger while "talking" than in silence, with an RFC
//! 6464 level.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::ids::Layer;
use crate::payload::{Temporal, Vp8Desc};

/// Video frame interval (30 fps).
pub const FRAME_INTERVAL_US: u64 = 33_333;
/// Audio packet interval (Opus 20 ms frames, 50 packets/s).
pub const AUDIO_INTERVAL_US: u64 = 20_000;
/// A keyframe this often even without requests. Browsers send one every few seconds at most
/// when nobody asks; 3 s matches LiveKit's load tester media.
pub const KEYFRAME_INTERVAL_US: u64 = 3_000_000;
/// Chromium's encoder acts on at most one keyframe request per this long for a whole sender,
/// ignoring the others (libwebrtc's `EncoderRtcpFeedback`, `kMinKeyframeSendIntervalMs`).
pub const KEYFRAME_REQUEST_MIN_INTERVAL_US: u64 = 300_000;
/// Keyframe size relative to a mean delta frame (VP8 at these rates: 4-8x).
pub const KEYFRAME_SIZE_FACTOR: f64 = 6.0;
/// Spread of delta-frame sizes (σ of the log-normal): ±~30 % frame to frame.
pub const FRAME_SIZE_SIGMA: f64 = 0.3;
/// Largest RTP payload we send: with RTP header, extensions and SRTP tag this stays well under
/// a 1280-byte path MTU, like browsers' packetisers.
pub const MAX_PAYLOAD: usize = 1100;
/// Audio payload sizes: Opus at ~32 kbit/s while talking, comfort-noise-sized in silence.
pub const AUDIO_TALK_BYTES: usize = 80;
pub const AUDIO_SILENCE_BYTES: usize = 45;
/// RFC 6464 levels (-dBov) while talking and silent.
pub const AUDIO_TALK_LEVEL: i8 = -25;
pub const AUDIO_SILENCE_LEVEL: i8 = -90;

/// Chromium's L1T3 pattern: the temporal layer of each frame in a cycle of four from a
/// keyframe or layer-0 frame, and whether the frame is a switch point (Y: it depends on
/// layer 0 only).
const L1T3: [(u8, bool); 4] = [(0, false), (2, true), (1, true), (2, false)];

/// Size of a delta frame of temporal layer 0, 1, 2 relative to the layer's mean delta frame.
/// libwebrtc gives L1T3's layers 40 %, 20 % and 40 % of the rate; layer 0 has one frame in
/// four, layer 1 one in four, layer 2 two in four, so these average 1 over the cycle.
pub const TEMPORAL_SIZE_FACTOR: [f64; 3] = [1.6, 0.8, 0.8];

/// What a video publisher sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
pub enum VideoShape {
    /// Three simulcast layers at their target bitrates, frame sizes varying, each with three
    /// temporal layers: what Chromium sends.
    #[default]
    Simulcast,
    /// The same simulcast layers without temporal layers (every frame in temporal layer 0, as
    /// weir's tester sent before 2026-12-01): nothing finer to drop than a simulcast layer.
    #[value(name = "simulcast-l1t1")]
    SimulcastL1T1,
    /// One layer (`f`) of [`FLAT_PACKETS_PER_FRAME`] full-size packets per frame: about 1000
    /// packets/s of 1100-byte payloads, the shape issue 7 compares SFUs with.
    Flat,
}

/// Packets per frame of [`VideoShape::Flat`]: 33 × 30 fps = 990 packets/s.
pub const FLAT_PACKETS_PER_FRAME: usize = 33;

/// One frame of one layer, ready to packetise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FramePlan {
    pub layer: Layer,
    pub frame: u32,
    pub keyframe: bool,
    /// Picture id and temporal layer, for the VP8 descriptor.
    pub vp8: Vp8Desc,
    /// Capture time, µs since the epoch (drives the RTP timestamp).
    pub capture_us: u64,
    /// Payload size of each packet.
    pub packets: Vec<usize>,
}

struct LayerState {
    layer: Layer,
    frame: u32,
    last_key_us: Option<u64>,
    key_requested: bool,
    /// The next frame's picture id (15 bits), TL0PICIDX, and place in the L1T3 cycle.
    picture_id: u16,
    tl0_pic_idx: u8,
    cycle: usize,
}

/// The three-layer simulcast video of one publisher.
pub struct VideoSource {
    shape: VideoShape,
    layers: Vec<LayerState>,
    next_us: u64,
    rng: StdRng,
    /// When the last keyframe request acted on arrived (µs).
    last_request_us: Option<u64>,
}

impl VideoSource {
    pub fn new(start_us: u64, seed: u64, shape: VideoShape) -> Self {
        let layers: &[Layer] = match shape {
            VideoShape::Simulcast | VideoShape::SimulcastL1T1 => &Layer::ALL,
            VideoShape::Flat => &[Layer::F],
        };
        let mut rng = StdRng::seed_from_u64(seed);
        VideoSource {
            shape,
            layers: layers
                .iter()
                .map(|&layer| LayerState {
                    layer,
                    frame: 0,
                    last_key_us: None,
                    key_requested: false,
                    // Random starts, as an encoder's: a focus must not rely on them.
                    picture_id: rng.random::<u16>() & 0x7fff,
                    tl0_pic_idx: rng.random(),
                    cycle: 0,
                })
                .collect(),
            next_us: start_us,
            rng,
            last_request_us: None,
        }
    }

    /// When the next frames are due.
    pub fn next_due(&self) -> u64 {
        self.next_us
    }

    /// A receiver asked for a keyframe (of any layer) at `now_us`. As Chromium does: within
    /// [`KEYFRAME_REQUEST_MIN_INTERVAL_US`] of the last request acted on it is ignored;
    /// otherwise the next frame is a keyframe on every layer. Returns whether it was acted on.
    pub fn request_keyframe(&mut self, now_us: u64) -> bool {
        if self
            .last_request_us
            .is_some_and(|t| now_us < t + KEYFRAME_REQUEST_MIN_INTERVAL_US)
        {
            return false;
        }
        self.last_request_us = Some(now_us);
        for l in &mut self.layers {
            l.key_requested = true;
        }
        true
    }

    /// The frames due at `now_us` (one per layer), or none if it is not time yet. Falls behind
    /// gracefully: after a stall it sends one set of frames, not a burst of the missed ones.
    pub fn poll(&mut self, now_us: u64) -> Vec<FramePlan> {
        if now_us < self.next_us {
            return Vec::new();
        }
        let capture_us = self.next_us;
        self.next_us += FRAME_INTERVAL_US;
        if self.next_us + FRAME_INTERVAL_US < now_us {
            self.next_us = now_us + FRAME_INTERVAL_US;
        }
        let mut out = Vec::with_capacity(self.layers.len());
        for i in 0..self.layers.len() {
            let l = &mut self.layers[i];
            let keyframe = l.key_requested
                || l.last_key_us
                    .is_none_or(|t| capture_us.saturating_sub(t) >= KEYFRAME_INTERVAL_US);
            if keyframe {
                l.last_key_us = Some(capture_us);
                l.key_requested = false;
            }
            let layer = l.layer;
            let frame = l.frame;
            l.frame = l.frame.wrapping_add(1);
            let temporal = (self.shape == VideoShape::Simulcast).then(|| {
                if keyframe {
                    l.cycle = 0;
                }
                let (tid, layer_sync) = L1T3[l.cycle % L1T3.len()];
                l.cycle += 1;
                if tid == 0 {
                    l.tl0_pic_idx = l.tl0_pic_idx.wrapping_add(1);
                }
                Temporal {
                    tid,
                    layer_sync,
                    tl0_pic_idx: l.tl0_pic_idx,
                }
            });
            let vp8 = Vp8Desc {
                picture_id: l.picture_id,
                temporal,
            };
            l.picture_id = (l.picture_id + 1) & 0x7fff;
            let size = match self.shape {
                VideoShape::Simulcast | VideoShape::SimulcastL1T1 => {
                    let factor = temporal.map_or(1.0, |t| TEMPORAL_SIZE_FACTOR[usize::from(t.tid)]);
                    frame_size(layer, keyframe, factor, &mut self.rng)
                }
                VideoShape::Flat => FLAT_PACKETS_PER_FRAME * MAX_PAYLOAD,
            };
            out.push(FramePlan {
                layer,
                frame,
                keyframe,
                vp8,
                capture_us,
                packets: split(size, MAX_PAYLOAD),
            });
        }
        out
    }
}

/// Mean delta-frame size of a layer such that, with one keyframe per interval, the layer
/// averages its target bitrate.
pub fn mean_delta_bytes(layer: Layer) -> f64 {
    let frames_per_key = KEYFRAME_INTERVAL_US as f64 / FRAME_INTERVAL_US as f64;
    let bytes_per_frame = layer.bitrate() as f64 / 8.0 * FRAME_INTERVAL_US as f64 / 1e6;
    bytes_per_frame * frames_per_key / (frames_per_key - 1.0 + KEYFRAME_SIZE_FACTOR)
}

/// A frame's size: a keyframe's, or a delta frame's of `factor` times the layer's mean.
fn frame_size(layer: Layer, keyframe: bool, factor: f64, rng: &mut StdRng) -> usize {
    let mean = mean_delta_bytes(layer);
    if keyframe {
        return (mean * KEYFRAME_SIZE_FACTOR) as usize;
    }
    // Log-normal with mean 1: exp(N(0, σ²) - σ²/2), N from Box-Muller.
    let u1: f64 = rng.random::<f64>().max(1e-12);
    let u2: f64 = rng.random();
    let n = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
    let spread = (FRAME_SIZE_SIGMA * n - FRAME_SIZE_SIGMA * FRAME_SIZE_SIGMA / 2.0).exp();
    ((mean * factor * spread) as usize).max(crate::payload::MIN_VIDEO_PAYLOAD)
}

/// Split `size` bytes into packets of at most `max` bytes, as evenly as possible (like libwebrtc's
/// VP8 packetiser), each at least one header long.
pub fn split(size: usize, max: usize) -> Vec<usize> {
    let min = crate::payload::MIN_VIDEO_PAYLOAD;
    let n = size.div_ceil(max).max(1);
    let base = size / n;
    let extra = size % n;
    (0..n)
        .map(|i| (base + usize::from(i < extra)).max(min))
        .collect()
}

/// Who is talking when: a deterministic schedule every participant of a room can compute on
/// its own, so a speaker layout follows the same speaker everywhere without coordination.
#[derive(Debug, Clone, Copy)]
pub struct SpeakerSchedule {
    /// How many of the room's publishers talk at once (0 = nobody).
    pub speakers: usize,
    /// How long a turn lasts.
    pub turn_us: u64,
    pub seed: u64,
}

impl SpeakerSchedule {
    /// The turn number at `now_us`.
    pub fn turn(&self, now_us: u64) -> u64 {
        now_us / self.turn_us.max(1)
    }

    /// Indices (into the room's publisher list of length `n`) talking during `turn`. The first
    /// one is the "active speaker".
    pub fn talking(&self, turn: u64, n: usize) -> Vec<usize> {
        if n == 0 || self.speakers == 0 {
            return Vec::new();
        }
        let first = (mix(self.seed ^ turn.wrapping_mul(0x9e37_79b9)) % n as u64) as usize;
        (0..self.speakers.min(n)).map(|k| (first + k) % n).collect()
    }
}

fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

/// One audio packet to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AudioPlan {
    pub seq: u32,
    pub capture_us: u64,
    pub bytes: usize,
    pub level: i8,
    pub voice: bool,
}

/// 50 packets/s of Opus-like audio.
pub struct AudioSource {
    next_us: u64,
    seq: u32,
}

impl AudioSource {
    pub fn new(start_us: u64) -> Self {
        AudioSource {
            next_us: start_us,
            seq: 0,
        }
    }

    pub fn next_due(&self) -> u64 {
        self.next_us
    }

    /// The packet due at `now_us`, if any. `talking` decides its size and level.
    pub fn poll(&mut self, now_us: u64, talking: bool) -> Option<AudioPlan> {
        if now_us < self.next_us {
            return None;
        }
        let capture_us = self.next_us;
        self.next_us += AUDIO_INTERVAL_US;
        if self.next_us + AUDIO_INTERVAL_US < now_us {
            self.next_us = now_us + AUDIO_INTERVAL_US;
        }
        let seq = self.seq;
        self.seq = self.seq.wrapping_add(1);
        Some(AudioPlan {
            seq,
            capture_us,
            bytes: if talking {
                AUDIO_TALK_BYTES
            } else {
                AUDIO_SILENCE_BYTES
            },
            level: if talking {
                AUDIO_TALK_LEVEL
            } else {
                AUDIO_SILENCE_LEVEL
            },
            voice: talking,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_layer_averages_its_target_bitrate() {
        let mut v = VideoSource::new(0, 1, VideoShape::Simulcast);
        let mut bytes = [0usize; 3];
        let seconds = 30;
        let mut t = 0;
        while t < seconds * 1_000_000 {
            for f in v.poll(t) {
                bytes[f.layer.index()] += f.packets.iter().sum::<usize>();
            }
            t += 1000;
        }
        for l in Layer::ALL {
            let rate = bytes[l.index()] as f64 * 8.0 / seconds as f64;
            let target = l.bitrate() as f64;
            assert!(
                (rate - target).abs() / target < 0.06,
                "{l:?}: {rate} vs {target}"
            );
        }
    }

    #[test]
    fn each_layer_has_chromiums_three_temporal_layers() {
        let mut v = VideoSource::new(0, 6, VideoShape::Simulcast);
        let mut t = 0;
        let mut per_tid = [0usize; 3];
        let mut last: Option<Vp8Desc> = None;
        v.request_keyframe(0);
        for n in 0..400u64 {
            let frames = v.poll(t);
            let q = frames.iter().find(|f| f.layer == Layer::Q).unwrap().clone();
            let tp = q.vp8.temporal.expect("L1T3");
            if n < 8 {
                assert_eq!(tp.tid, [0, 2, 1, 2][n as usize % 4], "frame {n}");
                assert_eq!(tp.layer_sync, n % 4 == 1 || n % 4 == 2, "frame {n}");
            }
            if let Some(prev) = last {
                assert_eq!(q.vp8.picture_id, (prev.picture_id + 1) & 0x7fff);
                let prev_tl0 = prev.temporal.unwrap().tl0_pic_idx;
                let step = u8::from(tp.tid == 0);
                assert_eq!(tp.tl0_pic_idx, prev_tl0.wrapping_add(step), "frame {n}");
            }
            if q.keyframe {
                assert_eq!(tp.tid, 0, "a keyframe is in layer 0");
            } else {
                per_tid[usize::from(tp.tid)] += q.packets.iter().sum::<usize>();
            }
            last = Some(q.vp8);
            t += FRAME_INTERVAL_US;
        }
        let total: usize = per_tid.iter().sum();
        let share = |i: usize| per_tid[i] as f64 / total as f64;
        assert!((share(0) - 0.4).abs() < 0.05, "{per_tid:?}");
        assert!((share(1) - 0.2).abs() < 0.05, "{per_tid:?}");
        // Without temporal layers: picture ids only.
        let mut flat = VideoSource::new(0, 6, VideoShape::SimulcastL1T1);
        assert!(flat.poll(0).iter().all(|f| f.vp8.temporal.is_none()));
    }

    /// Like Chromium: a request keys every layer, and one within 300 ms of the last one acted
    /// on is ignored.
    #[test]
    fn keyframes_come_on_schedule_and_on_request_on_every_layer() {
        let mut v = VideoSource::new(0, 2, VideoShape::Simulcast);
        let first = v.poll(0);
        assert!(
            first.iter().all(|f| f.keyframe),
            "a stream starts with a keyframe"
        );
        let mut t = FRAME_INTERVAL_US;
        let f = v.poll(t);
        assert!(f.iter().all(|f| !f.keyframe));
        let asked = t;
        assert!(v.request_keyframe(asked));
        t += FRAME_INTERVAL_US;
        let f = v.poll(t);
        let keys: Vec<Layer> = f.iter().filter(|f| f.keyframe).map(|f| f.layer).collect();
        assert_eq!(keys, Layer::ALL.to_vec());
        // Another request 100 ms after that one: ignored.
        assert!(!v.request_keyframe(asked + 100_000));
        while t < asked + KEYFRAME_REQUEST_MIN_INTERVAL_US {
            t += FRAME_INTERVAL_US;
            assert!(v.poll(t).iter().all(|f| !f.keyframe));
        }
        assert!(v.request_keyframe(t));
        t += FRAME_INTERVAL_US;
        assert!(v.poll(t).iter().all(|f| f.keyframe));
        let keyed_at = t;
        // The periodic keyframe.
        let mut saw = 0;
        while t < keyed_at + KEYFRAME_INTERVAL_US {
            t += FRAME_INTERVAL_US;
            saw += v.poll(t).iter().filter(|f| f.keyframe).count();
        }
        assert_eq!(saw, 3, "one periodic keyframe per layer");
    }

    #[test]
    fn keyframes_span_several_packets_and_packets_fit_the_mtu() {
        let mut v = VideoSource::new(0, 3, VideoShape::Simulcast);
        let f = v.poll(0);
        let full = f.iter().find(|f| f.layer == Layer::F).unwrap();
        assert!(full.packets.len() > 10, "{:?}", full.packets.len());
        assert!(full.packets.iter().all(|&p| p <= MAX_PAYLOAD));
        assert_eq!(split(2201, 1100), vec![734, 734, 733]);
        assert_eq!(split(10, 1100), vec![crate::payload::MIN_VIDEO_PAYLOAD]);
    }

    #[test]
    fn a_stall_does_not_cause_a_burst() {
        let mut v = VideoSource::new(0, 4, VideoShape::Simulcast);
        assert_eq!(v.poll(0).len(), 3);
        assert_eq!(v.poll(1_000_000).len(), 3);
        assert!(v.poll(1_000_001).is_empty());
        let mut a = AudioSource::new(0);
        assert!(a.poll(0, true).is_some());
        assert!(a.poll(500_000, true).is_some());
        assert!(a.poll(500_001, true).is_none());
    }

    #[test]
    fn audio_is_fifty_packets_a_second_and_louder_when_talking() {
        let mut a = AudioSource::new(0);
        let mut n = 0;
        for t in (0..1_000_000).step_by(1000) {
            if let Some(p) = a.poll(t, n < 25) {
                if p.voice {
                    assert_eq!(p.level, AUDIO_TALK_LEVEL);
                }
                n += 1;
            }
        }
        assert_eq!(n, 50);
    }

    #[test]
    fn the_speaker_schedule_is_shared_and_rotates() {
        let s = SpeakerSchedule {
            speakers: 2,
            turn_us: 5_000_000,
            seed: 9,
        };
        assert_eq!(s.turn(4_999_999), 0);
        assert_eq!(s.turn(5_000_000), 1);
        let t0 = s.talking(0, 4);
        assert_eq!(t0.len(), 2);
        assert_ne!(t0[0], t0[1]);
        assert!(s.talking(0, 0).is_empty());
        let distinct: std::collections::HashSet<usize> =
            (0..50).map(|t| s.talking(t, 4)[0]).collect();
        assert!(distinct.len() > 1, "the active speaker changes over turns");
    }

    #[test]
    fn the_flat_shape_sends_one_layer_of_about_1000_full_packets_per_second() {
        let mut v = VideoSource::new(0, 5, VideoShape::Flat);
        let mut packets = Vec::new();
        let mut t = 0;
        while t < 1_000_000 {
            for f in v.poll(t) {
                assert_eq!(f.layer, Layer::F, "only the full layer");
                packets.extend(f.packets);
            }
            t += 1_000;
        }
        assert!(
            (980..=1000).contains(&packets.len()),
            "{} packets in 1 s",
            packets.len()
        );
        assert!(
            packets.iter().all(|p| *p == MAX_PAYLOAD),
            "every packet full size"
        );
    }
}
