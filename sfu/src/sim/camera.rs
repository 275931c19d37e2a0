//! A simulated camera that behaves like a browser's: frames at 30 per second on one or more
//! simulcast layers, and a keyframe of a layer only when the focus asks for one (and on the
//! first frame). With its microphone, if the participant publishes audio. Like weir's web
//! client, it stops encoding the layers the focus says nobody needs (`io.weir.layers`), and
//! starts a layer switched back on with a keyframe. With [`Camera::with_temporal_layers`], each
//! layer is encoded as Chromium encodes its simulcast layers: three temporal layers (L1T3).
//!
//! Keyframe requests are answered as Chromium's encoder answers them (libwebrtc's
//! `EncoderRtcpFeedback`): a request for any layer makes the next frame a keyframe on every
//! layer, and a request that arrives within 300 ms of the last one acted on is ignored,
//! whichever layer it names.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{payload_tag, Publish, Received, SimNet, Vp8Temporal};

/// One layer: rid (`None` without simulcast), rank (`forward::rid_rank`), and the payload
/// sizes of the packets of one delta frame. A keyframe is three delta frames' worth.
pub type CameraLayer = (Option<&'static str>, u8, &'static [usize]);

/// The time between two frames.
const FRAME: Duration = Duration::from_micros(33_333);

/// Chromium ignores a keyframe request that arrives within this long of the last one it acted
/// on (libwebrtc's `kMinKeyframeSendIntervalMs`), for every layer of the sender.
pub const CHROMIUM_KEYFRAME_INTERVAL: Duration = Duration::from_millis(300);

/// A camera publishing through participant `who`.
pub struct Camera {
    who: usize,
    layers: Vec<CameraLayer>,
    /// Keyframe requests already answered.
    answered: usize,
    /// When the last keyframe request acted on arrived.
    last_acted: Option<Instant>,
    frames: u64,
    /// Data-channel messages already read.
    read: usize,
    /// Layers the focus said nobody needs, not encoded.
    pub off: Vec<&'static str>,
    /// Layers switched back on whose next frame is a keyframe.
    restarted: Vec<&'static str>,
    /// Every payload sent, with its layer's rank.
    pub sent: HashMap<Arc<[u8]>, u8>,
    /// Packets sent per layer rank.
    pub packets_by_rank: HashMap<u8, usize>,
    /// Encode temporal layers: per layer (rid), where it is in the L1T3 pattern.
    temporal: Option<HashMap<Option<&'static str>, TemporalState>>,
    /// With temporal layers, every packet sent by its tag: payload, layer rank, descriptor.
    pub by_tag: HashMap<u64, (Arc<[u8]>, u8, Vp8Temporal)>,
    /// Which frame each payload sent belongs to ([`Camera::shown`]).
    frame_of: HashMap<Arc<[u8]>, FrameOf>,
}

/// The frame a packet belongs to: its layer, the captured picture's number (one per frame
/// time, shared by the layers), how many packets the frame has, and whether it is a keyframe.
#[derive(Debug, Clone, Copy)]
pub struct FrameOf {
    pub rank: u8,
    pub number: u64,
    pub packets: usize,
    pub keyframe: bool,
}

/// One layer's temporal encoding state: the frame's place in the L1T3 pattern, the next
/// picture id and TL0PICIDX.
type TemporalState = (u64, u16, u8);

/// Chromium's L1T3 pattern: temporal layer of each frame in a cycle of four, and whether it is
/// a switch point (depends on layer 0 only).
const L1T3: [(u8, bool); 4] = [(0, false), (2, true), (1, true), (2, false)];

impl Camera {
    /// Chromium's three 720p simulcast layers: q 150, h 500 and f 1500 kbit/s with the
    /// per-packet overhead.
    pub const SIMULCAST: [CameraLayer; 3] = [
        (Some("q"), 2, &[565]),
        (Some("h"), 3, &[1000, 1000]),
        (Some("f"), 4, &[1000, 1000, 1000, 1000, 1000, 1000]),
    ];

    pub fn new(who: usize, layers: &[CameraLayer]) -> Self {
        Camera {
            who,
            layers: layers.to_vec(),
            answered: 0,
            last_acted: None,
            frames: 0,
            read: 0,
            off: Vec::new(),
            restarted: Vec::new(),
            sent: HashMap::new(),
            packets_by_rank: HashMap::new(),
            temporal: None,
            by_tag: HashMap::new(),
            frame_of: HashMap::new(),
        }
    }

    /// Encode every layer with three temporal layers, as Chromium does.
    pub fn with_temporal_layers(mut self) -> Self {
        self.temporal = Some(HashMap::new());
        self
    }

    /// Leave the keyframe requests received so far unanswered, as an encoder too busy to
    /// answer them would (the focus asks again after a while).
    pub fn ignore_keyframe_requests(&mut self, net: &SimNet) {
        self.answered = net.clients[self.who].keyframe_requests.len();
    }

    /// One frame on every layer (and an audio packet), then a frame's time of simulation.
    pub fn frame(&mut self, net: &mut SimNet) {
        self.frame_only(net);
        net.run_for(FRAME);
    }

    /// One frame on every layer (and an audio packet), without moving time: for several
    /// cameras sending together.
    pub fn frame_only(&mut self, net: &mut SimNet) {
        let mut asked = false;
        for (at, _) in &net.clients[self.who].keyframe_requests[self.answered..] {
            if self
                .last_acted
                .is_none_or(|last| *at >= last + CHROMIUM_KEYFRAME_INTERVAL)
            {
                self.last_acted = Some(*at);
                asked = true;
            }
        }
        self.answered = net.clients[self.who].keyframe_requests.len();
        self.read_layer_notices(net);
        // A browser's layers of one captured frame reach the focus in no fixed order: every
        // other frame, the best layer goes first.
        let mut layers = self.layers.clone();
        if self.frames % 2 == 1 {
            layers.reverse();
        }
        for (rid, rank, sizes) in layers {
            if rid.is_some_and(|r| self.off.contains(&r)) {
                continue;
            }
            let restarted = rid.is_some_and(|r| self.restarted.contains(&r));
            let key = self.frames == 0 || restarted || asked;
            let sizes: Vec<usize> = if key {
                sizes
                    .iter()
                    .cycle()
                    .take(sizes.len() * 3)
                    .copied()
                    .collect()
            } else {
                sizes.to_vec()
            };
            let temporal = self.temporal.as_mut().map(|layers| {
                let (pos, picture_id, tl0) = layers.entry(rid).or_insert((0, 1000, 0));
                if key {
                    *pos = 0; // a keyframe starts the pattern again, on layer 0
                }
                let (tid, layer_sync) = L1T3[(*pos % 4) as usize];
                if tid == 0 {
                    *tl0 = tl0.wrapping_add(1);
                }
                let t = Vp8Temporal {
                    picture_id: *picture_id,
                    tl0_pic_idx: *tl0,
                    tid,
                    layer_sync,
                };
                *pos += 1;
                *picture_id = (*picture_id + 1) % (1 << 15);
                t
            });
            let frame = FrameOf {
                rank,
                number: self.frames,
                packets: sizes.len(),
                keyframe: key,
            };
            for p in net.send_frame(self.who, rid, key, &sizes, temporal) {
                if let (Some(t), Some(tag)) = (temporal, payload_tag(&p)) {
                    self.by_tag.insert(tag, (p.clone(), rank, t));
                }
                self.frame_of.insert(p.clone(), frame);
                self.sent.insert(p, rank);
                *self.packets_by_rank.entry(rank).or_default() += 1;
            }
        }
        self.restarted.clear();
        if net.clients[self.who].audio.is_some() {
            net.send_audio(self.who, -40);
        }
        self.frames += 1;
    }

    /// Apply the focus's `io.weir.layers` messages that arrived since the last frame.
    fn read_layer_notices(&mut self, net: &SimNet) {
        let messages = &net.clients[self.who].messages;
        for (_, text) in &messages[self.read..] {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(text) else {
                continue;
            };
            if v["type"] != "io.weir.layers" {
                continue;
            }
            let Some(active) = v["content"]["active"].as_array() else {
                continue;
            };
            let active: Vec<&str> = active.iter().filter_map(|r| r.as_str()).collect();
            for rid in self.layers.iter().filter_map(|(rid, _, _)| *rid) {
                let on = active.contains(&rid);
                let was_off = self.off.contains(&rid);
                if on && was_off {
                    self.off.retain(|r| *r != rid);
                    self.restarted.push(rid);
                } else if !on && !was_off {
                    self.off.push(rid);
                }
            }
        }
        self.read = messages.len();
    }

    /// Frames for `d` of simulated time.
    pub fn run(&mut self, net: &mut SimNet, d: Duration) {
        for _ in 0..d.as_micros() / FRAME.as_micros() {
            self.frame(net);
        }
    }

    /// The camera's packets that participant `who` received, in arrival order.
    pub fn video_of<'n>(&self, net: &'n SimNet, who: usize) -> Vec<&'n Received> {
        net.clients[who]
            .received
            .iter()
            .filter(|r| {
                self.sent.contains_key(&r.payload)
                    || payload_tag(&r.payload).is_some_and(|t| self.by_tag.contains_key(&t))
            })
            .collect()
    }

    /// When participant `who` could show a new picture of this camera, and of which layer: a
    /// decoder's view of what it received. A frame is shown once all its packets have arrived
    /// (retransmissions included), if it is a keyframe or the frame before it on its layer was
    /// decodable, and if no later picture was shown already. Cameras without temporal layers
    /// only: with them, a frame's reference is not the frame before.
    pub fn shown(&self, net: &SimNet, who: usize) -> Vec<(Instant, u8)> {
        assert!(
            self.temporal.is_none(),
            "a model of frames without temporal layers"
        );
        let mut seen: HashSet<&Arc<[u8]>> = HashSet::new();
        let mut arrived: HashMap<(u8, u64), usize> = HashMap::new();
        let mut complete: HashSet<(u8, u64)> = HashSet::new();
        let mut frames: HashMap<(u8, u64), FrameOf> = HashMap::new();
        // The last decodable frame of each layer, and the last picture shown.
        let mut decodable: HashMap<u8, u64> = HashMap::new();
        let mut last_shown: Option<u64> = None;
        let mut shown = Vec::new();
        for r in &net.clients[who].received {
            let Some(f) = self.frame_of.get(&r.payload) else {
                continue;
            };
            if !seen.insert(&r.payload) {
                continue; // a retransmission of a packet already here
            }
            let key = (f.rank, f.number);
            frames.insert(key, *f);
            let n = arrived.entry(key).or_default();
            *n += 1;
            if *n < f.packets {
                continue;
            }
            complete.insert(key);
            // This frame, and the frames after it on its layer that were waiting for it.
            let mut next = Some(*f);
            while let Some(f) = next.take() {
                let chained = decodable.get(&f.rank) == Some(&(f.number.wrapping_sub(1)));
                if !(f.keyframe || chained) {
                    break;
                }
                decodable.insert(f.rank, f.number);
                if last_shown.is_none_or(|l| f.number > l) {
                    last_shown = Some(f.number);
                    shown.push((r.at, f.rank));
                }
                let after = (f.rank, f.number + 1);
                if complete.contains(&after) {
                    next = frames.get(&after).copied();
                }
            }
        }
        shown
    }

    #[doc(hidden)]
    pub fn frame_debug(&self, payload: &Arc<[u8]>) -> Option<(u8, u64, usize, bool)> {
        self.frame_of
            .get(payload)
            .map(|f| (f.rank, f.number, f.packets, f.keyframe))
    }

    /// The frame a payload the camera sent belongs to.
    pub fn frame_of(&self, payload: &Arc<[u8]>) -> Option<FrameOf> {
        self.frame_of.get(payload).copied()
    }

    /// The rank of the layer a received payload came from.
    pub fn rank(&self, payload: &Arc<[u8]>) -> u8 {
        *self.sent.get(payload).expect("a payload the camera sent")
    }
}

/// The longest time between two pictures shown (`Camera::shown`) from `from` to `to`: the
/// longest freeze a viewer saw in that window, counting from `from` to the first picture and
/// from the last picture to `to`.
pub fn longest_stop(shown: &[(Instant, u8)], from: Instant, to: Instant) -> Duration {
    let mut last = from;
    let mut longest = Duration::ZERO;
    for (at, _) in shown.iter().filter(|(at, _)| *at > from && *at <= to) {
        longest = longest.max(at.duration_since(last));
        last = *at;
    }
    longest.max(to.saturating_duration_since(last))
}

/// Several cameras, each publishing with its microphone, and one participant watching them
/// over a downlink of `rate_bps` (20 ms delay), all connected: the narrow-link scenario the
/// allocation test and the `narrow_link` example share. Returns the cameras and the watcher.
pub fn cameras_to_one_watcher(
    net: &mut SimNet,
    cameras: usize,
    rate_bps: u64,
) -> (Vec<Camera>, usize) {
    let simulcast = Publish {
        audio: true,
        video: true,
        simulcast: true,
    };
    let cams: Vec<Camera> = (0..cameras)
        .map(|_| Camera::new(net.join(15, simulcast), &Camera::SIMULCAST))
        .collect();
    let watcher = net.join(15, Publish::NOTHING);
    assert!(net.run_until(Duration::from_secs(10), |n| n.all_connected()));
    net.clients[watcher].link.rate_down_bps = rate_bps;
    net.clients[watcher].link.delay_down = Duration::from_millis(20);
    (cams, watcher)
}

/// Every camera sends together, frame by frame, for `d` of simulated time.
pub fn run_together(cams: &mut [Camera], net: &mut SimNet, d: Duration) {
    for _ in 0..d.as_micros() / FRAME.as_micros() {
        for c in cams.iter_mut() {
            c.frame_only(net);
        }
        net.run_for(FRAME);
    }
}

/// Media payload bytes participant `who` has received so far.
pub fn media_bytes(net: &SimNet, who: usize) -> usize {
    net.clients[who]
        .received
        .iter()
        .map(|r| r.payload.len())
        .sum()
}
