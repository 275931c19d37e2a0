//! A simulated network around one [`ShardCore`]: participants are real WebRTC engines (str0m:
//! ICE, DTLS, SRTP, SCTP, as a browser would run them) that exchange datagrams with the core in
//! memory, under a virtual clock. Nothing here opens a socket or reads the clock after start,
//! and link loss comes from a seeded generator, so a scenario runs as fast as the CPU allows
//! and nearly the same way every time. Not exactly: the engines draw their SSRCs, ICE
//! credentials and keys at random, and the bandwidth estimator's path depends on them a
//! little. Scenario tests assert bounds that hold across runs, not one run's figures.
//!
//! Used by the core's scenario tests, its fuzz target (datagrams from a peer that has
//! completed DTLS) and the whole-core benchmark; [`EnginePair`] (one engine and its client,
//! without a core) by the forwarding benchmark and tests of one engine.

mod camera;
mod engine_pair;
mod lost_for_good;
mod seqs;

pub use camera::{
    cameras_to_one_watcher, longest_stop, media_bytes, run_together, Camera, CameraLayer, FrameOf,
};
pub use engine_pair::{ClientReceived, EnginePair};
pub use lost_for_good::{LostForGood, KEYFRAME_AFTER_LOSS};
pub use seqs::{sequence_loss, unwrap_seqs};

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::channel::{ChannelConfig, ChannelId};
use str0m::format::Codec;
use str0m::media::{
    Direction, KeyframeRequestKind, MediaKind, Mid, Pt, Rid, Simulcast, SimulcastLayer,
};
use str0m::net::{Protocol, Receive};
use str0m::rtp::{ExtensionValues, RtpWrite};
use str0m::{Candidate, Event, Input, Output, Rtc};

use crate::api::{Command, PeerRole, SfuConfig, SfuEvent};
use crate::ids::{ConferenceId, PeerId};
use crate::stats::ShardStats;
use crate::ShardCore;

/// The label of a simulated participant's data channel (MSC3898 messages).
const DATA_LABEL: &str = "weir";

/// The longest step of the virtual clock: time jumps to the next deadline of the core or of a
/// participant's engine, but at most this far, so participants' packets sent meanwhile are
/// not held back long. Shorter is closer to a real network's timing; longer runs faster.
pub const TICK: Duration = Duration::from_millis(1);

/// The shortest step, so an engine that keeps asking for "now" cannot stall the clock.
const MIN_STEP: Duration = Duration::from_micros(50);

/// The focus's socket address, and the address participants see unless it is behind a NAT
/// ([`SimNet::behind_nat`]).
pub const FOCUS_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 40_000);

/// What a simulated participant publishes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Publish {
    pub audio: bool,
    pub video: bool,
    /// Video as three simulcast layers (`q`, `h`, `f`) instead of one stream.
    pub simulcast: bool,
}

impl Publish {
    /// Microphone and camera (one video stream).
    pub const CAMERA: Publish = Publish {
        audio: true,
        video: true,
        simulcast: false,
    };
    /// Nothing: the participant only watches.
    pub const NOTHING: Publish = Publish {
        audio: false,
        video: false,
        simulcast: false,
    };
    /// A microphone only.
    pub const VOICE: Publish = Publish {
        audio: true,
        video: false,
        simulcast: false,
    };
}

/// An RTP packet a participant received.
#[derive(Debug, Clone)]
pub struct Received {
    pub mid: Mid,
    pub seq: u16,
    pub timestamp: u32,
    pub marker: bool,
    pub payload: Arc<[u8]>,
    /// The dependency descriptor it carried, as received.
    pub descriptor: Option<Arc<crate::engine::RawDependencyDescriptor>>,
    pub at: Instant,
}

/// One simulated participant.
pub struct Client {
    pub peer: PeerId,
    pub rtc: Rtc,
    pub addr: SocketAddr,
    /// Its own video m-line, if it publishes video.
    pub video: Option<Mid>,
    pub audio: Option<Mid>,
    /// Every RTP packet it received, oldest first.
    pub received: Vec<Received>,
    /// Its engine reported ICE and DTLS connected.
    pub connected: bool,
    /// Its data channel, once open.
    pub channel: Option<ChannelId>,
    /// Datagrams and bytes the focus sent it (before its link's loss and bottleneck).
    pub datagrams_in: u64,
    pub bytes_in: u64,
    /// Text messages it received on its data channel, with when each arrived, oldest first.
    pub messages: Vec<(Instant, String)>,
    /// When its link lost a datagram on purpose (`Link::lose_dtls_down`).
    pub lost_dtls_at: Vec<Instant>,
    /// Keyframe requests (PLI, FIR) it received, by layer, when they arrived.
    pub keyframe_requests: Vec<(Instant, Option<Rid>)>,
    /// Keyframes it asked for because a video packet was lost for good
    /// ([`KEYFRAME_AFTER_LOSS`]), when.
    pub keyframes_asked: Vec<Instant>,
    lost: lost_for_good::LostForGood,
    pending: Option<SdpPendingOffer>,
    /// A counter that makes every payload differ.
    next_tag: u64,
    /// The next sequence number of each stream it sends (by mid and layer).
    seqs: Vec<(Mid, Option<Rid>, u64)>,
    /// When its engine next wants time to pass.
    next_timeout: Option<Instant>,
    /// It left: its engine is no longer run.
    pub left: bool,
    /// Datagrams its engine produced, with where they were sent, not yet handed to the core.
    outbox: Vec<(SocketAddr, Vec<u8>)>,
    /// Its link: the share of datagrams lost from the focus to it and from it to the focus.
    pub link: Link,
    /// Datagrams on their way to it through a bottleneck or delay: when each arrives.
    inbound: std::collections::VecDeque<(Instant, Vec<u8>)>,
    /// When the bottleneck toward it is free again.
    link_free_at: Option<Instant>,
}

impl Client {
    /// The next sequence number of the stream of `mid` and `rid`.
    fn next_seq(&mut self, mid: Mid, rid: Option<Rid>) -> u64 {
        match self
            .seqs
            .iter_mut()
            .find(|(m, r, _)| *m == mid && *r == rid)
        {
            Some((_, _, seq)) => {
                *seq += 1;
                *seq
            }
            None => {
                self.seqs.push((mid, rid, 1));
                1
            }
        }
    }
}

/// A participant's simulated link: random loss per direction, from a seeded generator, and
/// optionally a bottleneck toward the participant.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Link {
    /// Share (0..=1) of the focus's datagrams to the participant that are lost.
    pub loss_down: f64,
    /// Share (0..=1) of the participant's datagrams to the focus that are lost.
    pub loss_up: f64,
    /// A bottleneck toward the participant: bits/s (0: none). Datagrams queue behind it and
    /// are dropped when the queue holds more than [`BOTTLENECK_QUEUE`] of sending time.
    pub rate_down_bps: u64,
    /// One-way delay toward the participant, after the bottleneck.
    pub delay_down: Duration,
    /// The next this many datagrams toward the participant that carry DTLS records (once
    /// connected: its data channel) are lost: a way to lose one message on purpose.
    pub lose_dtls_down: u32,
}

/// The most a bottleneck queue holds, in sending time; beyond it datagrams are dropped (tail
/// drop), as a router's buffer would.
pub const BOTTLENECK_QUEUE: Duration = Duration::from_millis(200);

/// A core and its participants under one virtual clock.
pub struct SimNet {
    pub core: ShardCore<Sender<SfuEvent>>,
    /// Xorshift state for link loss: the same losses every run.
    rng: u64,
    events: Receiver<SfuEvent>,
    /// Every event the core emitted, oldest first.
    pub log: Vec<SfuEvent>,
    pub clients: Vec<Client>,
    pub stats: Arc<ShardStats>,
    now: Instant,
    /// When the simulation began (the video clock's zero).
    start: Instant,
    next_peer: u64,
    /// The focus's address as participants see it (and send to).
    public: SocketAddr,
    /// Datagrams participants sent to an address other than the focus's public one.
    pub unreachable: u64,
    /// Whether participants joining from now on open the unordered notices channel
    /// (`io.weir.notices`), as weir-call.js does; without it (the default, as for a stock
    /// client) notices come on their ordered data channel. Off by default because each
    /// datagram draws from the one loss generator, and the second channel's datagrams move
    /// every loss: `five_percent_loss_is_repaired_by_retransmission` then had str0m's
    /// estimate fall to 450 kbit/s and Bob's video paused for 3 s (docs/adaptation.md,
    /// "Known limits").
    pub notices_channel: bool,
}

impl Default for SimNet {
    fn default() -> Self {
        Self::new(SfuConfig::default())
    }
}

impl SimNet {
    pub fn new(config: SfuConfig) -> Self {
        Self::behind_nat(config, FOCUS_ADDR)
    }

    /// A focus whose socket is [`FOCUS_ADDR`] but which participants reach at `public`: a
    /// NAT in between rewrites the destination of what they send, and the source of what
    /// they receive. The core advertises only what `config` says.
    pub fn behind_nat(config: SfuConfig, public: SocketAddr) -> Self {
        let (tx, events) = crossbeam_channel::unbounded();
        let stats = Arc::new(ShardStats::default());
        let now = Instant::now();
        let core = ShardCore::new(0, config, FOCUS_ADDR, tx, stats.clone(), now);
        SimNet {
            core,
            rng: 0x9e37_79b9_7f4a_7c15,
            events,
            log: Vec::new(),
            clients: Vec::new(),
            stats,
            now,
            start: now,
            next_peer: 1,
            public,
            unreachable: 0,
            notices_channel: false,
        }
    }

    /// Draw link losses from `seed` from now on: the same scenario under another pattern of
    /// losses. The seed is mixed first (splitmix64): xorshift from a small state gives small
    /// numbers for a while, which would read as a burst of losses.
    pub fn reseed(&mut self, seed: u64) {
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        self.rng = (z ^ (z >> 31)).max(1);
    }

    /// Packets or messages the core dropped for `reason` so far (as of its last housekeeping).
    pub fn dropped(&self, reason: crate::stats::DropReason) -> u64 {
        crate::stats::StatsSnapshot::sum([self.stats.as_ref()])
            .drops
            .iter()
            .find(|(r, _)| *r == reason)
            .map_or(0, |(_, n)| *n)
    }

    /// The virtual time.
    pub fn now(&self) -> Instant {
        self.now
    }

    /// A participant joins `conference` publishing `what`: it offers, the core answers. Returns
    /// its index in [`SimNet::clients`]. Connecting takes [`SimNet::run_for`].
    pub fn join(&mut self, conference: u64, what: Publish) -> usize {
        let i = self.clients.len();
        let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 20_000 + i as u16);
        // The dependency descriptor, as Chromium offers it (`send_described`).
        let mut rtc = Rtc::builder()
            .set_rtp_mode(true)
            .set_extension(12, crate::engine::dependency_descriptor_extension())
            .build(self.now);
        rtc.add_local_candidate(Candidate::host(addr, "udp").expect("a host candidate"));
        let mut api = rtc.sdp_api();
        let stream = format!("stream-{i}");
        let audio = what.audio.then(|| {
            api.add_media(
                MediaKind::Audio,
                Direction::SendOnly,
                Some(stream.clone()),
                Some(format!("audio-{i}")),
                None,
            )
        });
        let video = what.video.then(|| {
            let layers = what.simulcast.then(|| {
                let mut s = Simulcast::new();
                for rid in ["q", "h", "f"] {
                    s.add_send_layer(SimulcastLayer::new(rid));
                }
                s
            });
            api.add_media(
                MediaKind::Video,
                Direction::SendOnly,
                Some(stream.clone()),
                Some(format!("video-{i}")),
                layers,
            )
        });
        api.add_channel(DATA_LABEL.into());
        // The unordered channel for notices, as weir-call.js opens it (docs/data-channel.md).
        if self.notices_channel {
            api.add_channel_with_config(ChannelConfig {
                label: "io.weir.notices".into(),
                ordered: false,
                ..ChannelConfig::default()
            });
        }
        let (offer, pending) = api.apply().expect("a participant's first offer");
        let peer = PeerId(self.next_peer);
        self.next_peer += 1;
        self.clients.push(Client {
            peer,
            rtc,
            addr,
            video,
            audio,
            received: Vec::new(),
            connected: false,
            channel: None,
            datagrams_in: 0,
            bytes_in: 0,
            messages: Vec::new(),
            keyframe_requests: Vec::new(),
            keyframes_asked: Vec::new(),
            lost: Default::default(),
            lost_dtls_at: Vec::new(),
            pending: Some(pending),
            next_tag: 1,
            seqs: Vec::new(),
            next_timeout: None,
            left: false,
            outbox: Vec::new(),
            link: Link::default(),
            inbound: std::collections::VecDeque::new(),
            link_free_at: None,
        });
        self.core.handle_command(
            Command::CreatePeer {
                peer,
                conference: ConferenceId(conference),
                offer: offer.to_sdp_string(),
                role: PeerRole::Participant,
            },
            self.now,
        );
        self.handle_events();
        i
    }

    /// Participant `i` leaves (the control plane closes its peer, and its engine stops).
    pub fn leave(&mut self, i: usize) {
        self.clients[i].left = true;
        let peer = self.clients[i].peer;
        self.core
            .handle_command(Command::ClosePeer { peer }, self.now);
        self.handle_events();
    }

    /// Run the network for `d` of virtual time.
    pub fn run_for(&mut self, d: Duration) {
        let end = self.now + d;
        while self.now < end {
            self.step();
            self.now = self.next_step().min(end);
        }
    }

    /// The time of the next step: the earliest deadline, within [`MIN_STEP`] and [`TICK`].
    fn next_step(&self) -> Instant {
        let due = self
            .clients
            .iter()
            .filter(|c| !c.left)
            .flat_map(|c| {
                c.next_timeout
                    .into_iter()
                    .chain(c.inbound.front().map(|(t, _)| *t))
            })
            .fold(self.core.next_deadline(), Instant::min);
        due.clamp(self.now + MIN_STEP, self.now + TICK)
    }

    /// Run until `done` holds, for at most `limit` of virtual time; whether it held.
    pub fn run_until(&mut self, limit: Duration, mut done: impl FnMut(&SimNet) -> bool) -> bool {
        let end = self.now + limit;
        while self.now < end {
            self.step();
            if done(self) {
                return true;
            }
            self.now = self.next_step();
        }
        done(self)
    }

    /// Whether every participant still present is connected, as its engine and the core say.
    pub fn all_connected(&self) -> bool {
        let connected: HashSet<PeerId> = self
            .log
            .iter()
            .filter_map(|e| match e {
                SfuEvent::Connected { peer } => Some(*peer),
                _ => None,
            })
            .collect();
        self.clients
            .iter()
            .filter(|c| !c.left)
            .all(|c| c.connected && connected.contains(&c.peer))
    }

    /// Participant `i` sends one video packet (a VP8 keyframe start if `keyframe`) of `len`
    /// payload bytes on layer `rid` (`None` without simulcast), as a frame of its own.
    /// Returns the payload sent.
    pub fn send_video(
        &mut self,
        i: usize,
        rid: Option<&str>,
        keyframe: bool,
        len: usize,
    ) -> Arc<[u8]> {
        self.send_frame(i, rid, keyframe, &[len], None).remove(0)
    }

    /// Participant `i` sends one video frame on layer `rid`: a packet per entry of `sizes`
    /// (payload bytes), one RTP timestamp for all, the marker on the last, the first a VP8
    /// keyframe start if `keyframe`, every packet's descriptor carrying `temporal` if given.
    /// Returns the payloads sent.
    pub fn send_frame(
        &mut self,
        i: usize,
        rid: Option<&str>,
        keyframe: bool,
        sizes: &[usize],
        temporal: Option<Vp8Temporal>,
    ) -> Vec<Arc<[u8]>> {
        let now = self.now;
        let timestamp = self.video_clock();
        let c = &mut self.clients[i];
        let mid = c.video.expect("participant publishes video");
        let pt = vp8_pt(&c.rtc).expect("VP8 negotiated");
        let rid = rid.map(Rid::from);
        let mut sent = Vec::with_capacity(sizes.len());
        for (k, len) in sizes.iter().enumerate() {
            // Tagged with the sender too: two cameras' payloads of one size must differ, or a
            // watcher's packets could not be told apart by camera.
            let tag = (i as u64) << 48 | c.next_tag;
            let payload = match temporal {
                Some(t) => vp8_layered_payload(keyframe && k == 0, k == 0, *len, tag, t),
                None => vp8_payload(keyframe && k == 0, *len, tag),
            };
            c.next_tag += 1;
            let seq = c.next_seq(mid, rid);
            let mut api = c.rtc.direct_api();
            let tx = api
                .stream_tx_by_mid(mid, rid)
                .expect("a send stream for the video m-line");
            tx.write_rtp(
                RtpWrite::new(pt, seq.into(), timestamp, now, payload.clone())
                    .marker(k + 1 == sizes.len())
                    // As a browser does: the publisher can resend what the focus reports lost.
                    .nackable(true),
            );
            sent.push(payload);
        }
        sent
    }

    /// The 90 kHz video clock at the simulated now.
    fn video_clock(&self) -> u32 {
        let elapsed = self.now.saturating_duration_since(self.start);
        (elapsed.as_micros() as u64 * 90 / 1000) as u32
    }

    /// Participant `watcher` shows `publisher`'s camera `height` lines tall (of its 720), as
    /// its only subscription (MSC3898, as the control plane passes it on).
    pub fn subscribe_video(&mut self, watcher: usize, publisher: usize, height: u32) {
        let (peer, now) = (self.clients[watcher].peer, self.now);
        self.core.handle_command(
            crate::Command::Subscribe {
                peer,
                subscriptions: vec![crate::Subscription {
                    stream_id: format!("stream-{publisher}"),
                    track_id: format!("video-{publisher}"),
                    max_height: Some(height),
                    source_height: Some(720),
                }],
            },
            now,
        );
    }

    /// Participant `i` sends one VP9 packet of `len` payload bytes carrying the dependency
    /// descriptor `descriptor` (scalable video, `forward::svc`), with the RTP marker if
    /// `marker`; the payload descriptor says keyframe start if `keyframe`. The RTP timestamp is
    /// the virtual clock's, so the frames of one picture are sent at one instant. Returns the
    /// payload sent.
    pub fn send_described(
        &mut self,
        i: usize,
        keyframe: bool,
        len: usize,
        descriptor: Vec<u8>,
        marker: bool,
    ) -> Arc<[u8]> {
        let now = self.now;
        let timestamp = self.video_clock();
        let c = &mut self.clients[i];
        let mid = c.video.expect("participant publishes video");
        let pt = c
            .rtc
            .codec_config()
            .find(|p| p.spec().codec == Codec::Vp9)
            .map(|p| p.pt())
            .expect("VP9 negotiated");
        let tag = (i as u64) << 48 | c.next_tag;
        c.next_tag += 1;
        let mut payload = vec![0u8; len.max(10)];
        // VP9 payload descriptor: B (a frame begins), and P (inter-predicted) unless a keyframe.
        payload[0] = if keyframe { 0x08 } else { 0x48 };
        let at = payload.len() - 8;
        payload[at..].copy_from_slice(&tag.to_be_bytes());
        let payload: Arc<[u8]> = payload.into();
        let seq = c.next_seq(mid, None);
        let mut ext = ExtensionValues::default();
        ext.user_values.set(crate::engine::RawDependencyDescriptor(
            descriptor.into_boxed_slice(),
        ));
        let mut api = c.rtc.direct_api();
        let tx = api
            .stream_tx_by_mid(mid, None)
            .expect("a send stream for the video m-line");
        tx.write_rtp(
            RtpWrite::new(pt, seq.into(), timestamp, now, payload.clone())
                .marker(marker)
                .ext_vals(ext)
                .nackable(true),
        );
        payload
    }

    /// Participant `i` sends one Opus packet saying how loud it is (RFC 6464 level, -dBov).
    pub fn send_audio(&mut self, i: usize, level: i8) {
        let now = self.now;
        let c = &mut self.clients[i];
        let mid = c.audio.expect("participant publishes audio");
        let pt = c
            .rtc
            .codec_config()
            .find(|p| p.spec().codec == Codec::Opus)
            .map(|p| p.pt())
            .expect("Opus negotiated");
        let seq = c.next_seq(mid, None);
        let ext = ExtensionValues {
            audio_level: Some(level),
            voice_activity: Some(level > -50),
            ..Default::default()
        };
        let mut api = c.rtc.direct_api();
        let tx = api
            .stream_tx_by_mid(mid, None)
            .expect("a send stream for the audio m-line");
        // The payload names its sender, so a receiver can tell whose audio it got.
        let payload = vec![0xf8, i as u8, seq as u8];
        tx.write_rtp(RtpWrite::new(pt, seq.into(), (seq * 960) as u32, now, payload).ext_vals(ext));
    }

    /// Participant `i` sends any RTP on its video m-line (layer `rid`): what a hostile or
    /// broken client can put in an SRTP packet that weir decrypts. False if it has no such
    /// send stream.
    #[allow(clippy::too_many_arguments)]
    pub fn send_rtp(
        &mut self,
        i: usize,
        rid: Option<&str>,
        pt: u8,
        seq: u64,
        timestamp: u32,
        marker: bool,
        payload: &[u8],
    ) -> bool {
        let now = self.now;
        let c = &mut self.clients[i];
        let Some(mid) = c.video.or(c.audio) else {
            return false;
        };
        let mut api = c.rtc.direct_api();
        let Some(tx) = api.stream_tx_by_mid(mid, rid.map(Rid::from)) else {
            return false;
        };
        tx.write_rtp(
            RtpWrite::new(Pt::from(pt), seq.into(), timestamp, now, payload.to_vec())
                .marker(marker),
        );
        true
    }

    /// Participant `i` sends a message on its data channel. False if it is not open.
    pub fn send_data(&mut self, i: usize, binary: bool, data: &[u8]) -> bool {
        let c = &mut self.clients[i];
        let Some(id) = c.channel else {
            return false;
        };
        c.rtc
            .channel(id)
            .is_some_and(|mut ch| ch.write(binary, data).unwrap_or(false))
    }

    /// A datagram arrives at the core from participant `i`'s address, as is (not through its
    /// engine: unencrypted, possibly garbage).
    pub fn send_raw(&mut self, i: usize, data: &[u8]) {
        let from = self.clients[i].addr;
        self.core.handle_datagram(from, data, self.now);
    }

    /// What participant `i`'s engine sends now, taken instead of delivered: datagrams a
    /// benchmark feeds to the core itself.
    pub fn capture(&mut self, i: usize) -> Vec<Vec<u8>> {
        let now = self.now;
        let c = &mut self.clients[i];
        let _ = c.rtc.handle_input(Input::Timeout(now));
        drain_events(c, now);
        std::mem::take(&mut c.outbox)
            .into_iter()
            .map(|(_, data)| data)
            .collect()
    }

    /// One step at the current time: the core's events, every participant's output into the
    /// core, the core's timeout round, the core's output to the participants.
    pub fn step(&mut self) {
        let now = self.now;
        let public = self.public;
        for c in self.clients.iter_mut().filter(|c| !c.left) {
            while c.inbound.front().is_some_and(|(at, _)| *at <= now) {
                let (_, data) = c.inbound.pop_front().expect("checked");
                if let Ok(r) = Receive::new(Protocol::Udp, public, c.addr, &data) {
                    let _ = c.rtc.handle_input(Input::Receive(now, r));
                }
                drain_events(c, now);
            }
            let _ = c.rtc.handle_input(Input::Timeout(now));
        }
        for i in 0..self.clients.len() {
            if !self.clients[i].left {
                self.drain_client(i);
            }
        }
        self.core.handle_timeout(now);
        self.deliver_to_clients();
        self.handle_events();
    }

    /// Hand what the core sent to the participants it is addressed to.
    fn deliver_to_clients(&mut self) {
        let now = self.now;
        let public = self.public;
        let clients = &mut self.clients;
        let rng = &mut self.rng;
        let mut touched = Vec::new();
        self.core.flush(|q| {
            q.drain_each(|to, data| {
                let Some(i) = clients.iter().position(|c| c.addr == to && !c.left) else {
                    return;
                };
                let c = &mut clients[i];
                c.datagrams_in += 1;
                c.bytes_in += data.len() as u64;
                if chance(rng) < c.link.loss_down {
                    return;
                }
                // RFC 7983: a first byte of 20..=63 is DTLS.
                if c.link.lose_dtls_down > 0 && data.first().is_some_and(|b| (20..=63).contains(b))
                {
                    c.link.lose_dtls_down -= 1;
                    c.lost_dtls_at.push(now);
                    return;
                }
                if c.link.rate_down_bps > 0 || !c.link.delay_down.is_zero() {
                    // Through the bottleneck: queued, dropped if the queue is full.
                    let start = c.link_free_at.map_or(now, |t| t.max(now));
                    if start.saturating_duration_since(now) > BOTTLENECK_QUEUE {
                        return;
                    }
                    let sending = if c.link.rate_down_bps > 0 {
                        Duration::from_secs_f64(
                            data.len() as f64 * 8.0 / c.link.rate_down_bps as f64,
                        )
                    } else {
                        Duration::ZERO
                    };
                    c.link_free_at = Some(start + sending);
                    c.inbound
                        .push_back((start + sending + c.link.delay_down, data.to_vec()));
                    return;
                }
                if let Ok(r) = Receive::new(Protocol::Udp, public, to, data) {
                    let _ = clients[i].rtc.handle_input(Input::Receive(now, r));
                    touched.push(i);
                }
                // RTP mode holds one packet until polled: poll before the next one. What
                // the participant sends in reply waits in its outbox.
                drain_events(&mut clients[i], now);
            })
        });
        for i in touched {
            self.drain_client(i);
        }
    }

    /// Move participant `i`'s output: datagrams into the core, RTP into `received`. Only what
    /// is sent to the focus's public address reaches it.
    fn drain_client(&mut self, i: usize) {
        let now = self.now;
        drain_events(&mut self.clients[i], now);
        let out = std::mem::take(&mut self.clients[i].outbox);
        let from = self.clients[i].addr;
        let loss = self.clients[i].link.loss_up;
        for (to, data) in out {
            if to != self.public {
                self.unreachable += 1;
                continue;
            }
            if chance(&mut self.rng) < loss {
                continue;
            }
            self.core.handle_datagram(from, &data, now);
        }
    }

    /// React to what the core told the control plane, as the focus and a participant would.
    fn handle_events(&mut self) {
        while let Ok(ev) = self.events.try_recv() {
            match &ev {
                SfuEvent::PeerCreated {
                    peer,
                    answer,
                    candidates,
                } => {
                    if let Some(c) = self.clients.iter_mut().find(|c| c.peer == *peer) {
                        let pending = c.pending.take().expect("an outstanding offer");
                        let answer = SdpAnswer::from_sdp_string(answer).expect("a valid answer");
                        c.rtc
                            .sdp_api()
                            .accept_answer(pending, answer)
                            .expect("the participant accepts weir's answer");
                        // The candidates the focus announces (`m.call.candidates`).
                        for l in candidates {
                            if let Ok(cand) = Candidate::from_sdp_string(&l.candidate) {
                                c.rtc.add_remote_candidate(cand);
                            }
                        }
                    }
                }
                SfuEvent::Offer { peer, sdp, .. } => {
                    let peer = *peer;
                    if let Some(c) = self.clients.iter_mut().find(|c| c.peer == peer) {
                        let offer = SdpOffer::from_sdp_string(sdp).expect("a valid offer");
                        let answer = c
                            .rtc
                            .sdp_api()
                            .accept_offer(offer)
                            .expect("the participant accepts weir's offer");
                        let cmd = Command::RemoteAnswer {
                            peer,
                            sdp: answer.to_sdp_string(),
                        };
                        self.core.handle_command(cmd, self.now);
                    }
                }
                _ => {}
            }
            self.log.push(ev);
        }
    }
}

/// Poll a participant's engine until it waits: transmits into its outbox, RTP into
/// `received`.
fn drain_events(c: &mut Client, now: Instant) {
    while let Ok(o) = c.rtc.poll_output() {
        match o {
            Output::Timeout(t) => {
                c.next_timeout = Some(t);
                break;
            }
            Output::Transmit(t) => c.outbox.push((t.destination, t.contents.to_vec())),
            Output::Event(Event::Connected) => c.connected = true,
            Output::Event(Event::ChannelOpen(id, label)) if label == DATA_LABEL => {
                c.channel = Some(id)
            }
            Output::Event(Event::ChannelData(d)) if !d.binary => {
                c.messages
                    .extend(String::from_utf8(d.data).ok().map(|m| (now, m)));
            }
            Output::Event(Event::KeyframeRequest(r)) => c.keyframe_requests.push((now, r.rid)),
            Output::Event(Event::RtpPacket(p)) => {
                let mid = c
                    .rtc
                    .direct_api()
                    .stream_rx(&p.header.ssrc)
                    .map(|s| s.mid())
                    .unwrap_or_else(|| Mid::from("?"));
                let video = c
                    .rtc
                    .media(mid)
                    .is_some_and(|m| m.kind() == MediaKind::Video);
                let seq = p.header.sequence_number;
                if video && c.lost.on_packet(p.header.ssrc, seq, now) {
                    if let Some(s) = c.rtc.direct_api().stream_rx(&p.header.ssrc) {
                        s.request_keyframe(KeyframeRequestKind::Pli);
                        c.keyframes_asked.push(now);
                    }
                }
                c.received.push(Received {
                    mid,
                    seq,
                    timestamp: p.header.timestamp,
                    marker: p.header.marker,
                    payload: p.payload.clone(),
                    descriptor: p
                        .header
                        .ext_vals
                        .user_values
                        .get_arc::<crate::engine::RawDependencyDescriptor>(),
                    at: now,
                });
            }
            Output::Event(_) => {}
        }
    }
}

/// A uniform number in 0..1 from a xorshift generator.
fn chance(state: &mut u64) -> f64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    (*state >> 11) as f64 / (1u64 << 53) as f64
}

/// The payload type `rtc` negotiated for VP8.
pub fn vp8_pt(rtc: &Rtc) -> Option<Pt> {
    rtc.codec_config()
        .find(|p| p.spec().codec == Codec::Vp8)
        .map(|p| p.pt())
}

/// The temporal-layer fields of a VP8 payload descriptor, as Chromium's L1T3 encoder writes
/// them on every packet of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vp8Temporal {
    /// 15-bit picture id.
    pub picture_id: u16,
    pub tl0_pic_idx: u8,
    pub tid: u8,
    /// Y: depends on temporal layer 0 only.
    pub layer_sync: bool,
}

/// A VP8 payload with an extended descriptor (15-bit picture id, TL0PICIDX, TID and Y) at
/// bytes 0..6; the frame header at 6 (on the frame's first packet, `starts`), and `tag` in the
/// last 8 bytes as in [`vp8_payload`].
pub fn vp8_layered_payload(
    keyframe: bool,
    starts: bool,
    len: usize,
    tag: u64,
    t: Vp8Temporal,
) -> Arc<[u8]> {
    let len = len.max(20);
    let mut p = vec![0u8; len];
    p[0] = if starts { 0x90 } else { 0x80 }; // X, S on the first packet, partition 0
    p[1] = 0xe0; // I, L, T
    p[2] = 0x80 | (t.picture_id >> 8) as u8 & 0x7f;
    p[3] = t.picture_id as u8;
    p[4] = t.tl0_pic_idx;
    p[5] = (t.tid & 0x03) << 6 | if t.layer_sync { 0x20 } else { 0 };
    p[6] = if keyframe { 0x00 } else { 0x01 };
    if keyframe {
        p[9..12].copy_from_slice(&[0x9d, 0x01, 0x2a]);
    }
    p[len - 8..].copy_from_slice(&tag.to_be_bytes());
    p.into()
}

/// The tag a simulated payload carries in its last 8 bytes (the descriptor the focus may
/// renumber is at the front).
pub fn payload_tag(payload: &[u8]) -> Option<u64> {
    let tail = payload.get(payload.len().checked_sub(8)?..)?;
    Some(u64::from_be_bytes(tail.try_into().ok()?))
}

/// A VP8 payload: the payload descriptor (start of partition 0), then a frame header whose
/// first byte says keyframe or not, then bytes that encode `tag` so every payload differs.
pub fn vp8_payload(keyframe: bool, len: usize, tag: u64) -> Arc<[u8]> {
    let mut p = vec![0u8; len.max(10)];
    p[0] = 0x10; // S=1, partition 0
    p[1] = if keyframe { 0x00 } else { 0x01 }; // P bit: 0 = keyframe
    if keyframe {
        p[4..7].copy_from_slice(&[0x9d, 0x01, 0x2a]); // keyframe start code
    }
    p[len.max(10) - 8..].copy_from_slice(&tag.to_be_bytes());
    p.into()
}
