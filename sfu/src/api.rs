//! The media plane's interface: commands in, events out. Nothing here mentions Matrix.

use std::net::IpAddr;
use std::time::Duration;

use crate::ids::{ConferenceId, MediaId, PeerId, TrackKind};

/// Where the estimate toward a new participant starts: about two cameras' middle layers.
/// str0m probes at 3x and 6x of it right after connecting, so a wide link is found within
/// a second; a low start keeps a narrow link from being flooded meanwhile.
pub const DEFAULT_ESTIMATE_FROM_BPS: u64 = 1_000_000;

/// How the media plane is run. Every field is documented with its trade-off in
/// `focus/weir-focus.example.toml`, which is where operators set them.
#[derive(Debug, Clone)]
pub struct SfuConfig {
    /// Media shard threads, each with its own UDP socket. More shards use more cores; a
    /// conference lives on one shard, so fan-out inside it stays a function call, until it
    /// grows past [`SfuConfig::spread_conference_above`].
    pub shards: usize,
    /// A conference that holds this many peers on every shard it uses takes its next peers on
    /// one more shard (`shard::spread`): its publishers' packets are handed to the other
    /// shards (the payload shared, not copied), each fanning out to its own subscribers, so a
    /// conference of 1 → 1000 uses every core. Each packet then costs one hand-over per
    /// other shard and reaches their subscribers one queue hop later, which a small
    /// conference does not need to pay. 0: a conference never leaves its first shard.
    pub spread_conference_above: usize,
    /// Address the shards' UDP sockets bind to.
    pub bind_ip: IpAddr,
    /// First UDP port; shard i binds `port_base + i`. 0 picks ephemeral ports.
    pub port_base: u16,
    /// Addresses put in our ICE host candidates (what participants send media to).
    pub advertise_ips: Vec<IpAddr>,
    /// Every shard's UDP socket on the one port `port_base` (`SO_REUSEPORT`), so a firewall
    /// needs one rule. The kernel spreads clients over the sockets by address, so a shard hands
    /// datagrams for another shard's peers over to it (`shard::single_port`): a copy and a
    /// queue per datagram for most participants when there are many shards. Off: shard i on
    /// `port_base + i`, each receiving only its own peers' datagrams.
    pub single_port: bool,
    /// ICE over TCP: a passive host candidate on this port (bound on `bind_ip`, one port for
    /// every shard) for participants whose UDP is blocked. `None`: UDP only; `Some(0)`: an
    /// ephemeral port (tests). TCP carries media with head-of-line blocking, so browsers
    /// prefer UDP whenever it works and use this only as a fallback.
    pub tcp_port: Option<u16>,
    /// A peer that has not completed ICE+DTLS this long after creation is closed.
    pub connect_timeout: Duration,
    /// A connected peer from which nothing (not even a STUN consent check, which browsers
    /// send every few seconds) arrives for this long is closed.
    pub silence_timeout: Duration,
    /// Receive and send buffer of each shard's UDP socket. It absorbs bursts while the shard is
    /// busy: with the kernel default (about 200 KiB) one participant flooding the shared
    /// socket made the kernel drop everyone else's datagrams. Larger costs kernel memory
    /// only while it fills. Granted beyond `net.core.rmem_max` only with `CAP_NET_ADMIN`.
    pub socket_buffer_bytes: usize,
    /// Video packets each subscriber's connection keeps to answer its NACKs with, at most
    /// [`RTX_HISTORY_AGE`] old. The payload bytes are shared with the publisher's packet (one
    /// reference-counted buffer for every copy); each kept packet costs the engine about
    /// 440 bytes of metadata per subscriber. More answers later NACKs (a long RTT, the start of
    /// a large keyframe); fewer costs less memory per subscriber.
    pub rtx_history_packets: usize,
    /// In a conference with more than [`SfuConfig::audio_loudest_above`] audio sources, only
    /// this many of the loudest are forwarded (0: every audio source, always). Fewer saves
    /// subscribers' bandwidth and decoding in large meetings; too few cuts people talking over
    /// each other. Needs the RFC 6464 audio levels browsers send.
    pub audio_loudest_n: usize,
    /// See [`SfuConfig::audio_loudest_n`].
    pub audio_loudest_above: usize,
    /// Estimate the bandwidth toward each participant (str0m's send-side estimator on
    /// transport-wide feedback, REMB as a fallback), starting from this many bits/s, and
    /// allocate each one's video layers under it (`forward::allocate`). `None` does neither:
    /// every subscriber gets the best layer its screen needs, whatever its link. On by
    /// default ([`DEFAULT_ESTIMATE_FROM_BPS`]); the estimator paces media, which costs CPU and
    /// a little latency (docs/benchmarks.md).
    pub estimate_from_bps: Option<u64>,
}

impl Default for SfuConfig {
    fn default() -> Self {
        SfuConfig {
            shards: 1,
            spread_conference_above: DEFAULT_SPREAD_CONFERENCE_ABOVE,
            bind_ip: IpAddr::from([127, 0, 0, 1]),
            port_base: 0,
            advertise_ips: vec![IpAddr::from([127, 0, 0, 1])],
            tcp_port: None,
            single_port: false,
            connect_timeout: Duration::from_secs(30),
            silence_timeout: Duration::from_secs(15),
            socket_buffer_bytes: DEFAULT_SOCKET_BUFFER_BYTES,
            rtx_history_packets: DEFAULT_RTX_HISTORY_PACKETS,
            audio_loudest_n: 0,
            audio_loudest_above: 20,
            estimate_from_bps: Some(DEFAULT_ESTIMATE_FROM_BPS),
        }
    }
}

/// 100 peers: one shard forwards a 100-person conference's speaker layout, or 1 → 100 of a
/// 720p simulcast stream, in a few percent of a core (docs/benchmarks.md), so spreading below
/// it buys nothing; 1 → 500 fills most of a core with the load tester beside it.
pub const DEFAULT_SPREAD_CONFERENCE_ABOVE: usize = 100;

/// 16 MiB: about a quarter of a second of a fully loaded shard's traffic (50 k datagrams/s of
/// 1.2 KB, counted at the kernel's ~2× accounting), enough to ride out a long engine round.
pub const DEFAULT_SOCKET_BUFFER_BYTES: usize = 16 * 1024 * 1024;

/// 256 packets: about 1.5 s of a 720p stream (170 packets/s), 0.25 s of the load tester's
/// 1000 packets/s, about 110 KiB per video subscriber. The engine's own default (1024) cost
/// 450 KiB per subscriber.
pub const DEFAULT_RTX_HISTORY_PACKETS: usize = 256;

/// The oldest packet kept for retransmission. A NACK comes about one round trip after the
/// loss; Chrome gives up on a packet after about a second, so older ones are never asked for.
pub const RTX_HISTORY_AGE: std::time::Duration = std::time::Duration::from_secs(1);

/// Control-plane requests to the media plane.
#[derive(Debug)]
pub enum Command {
    /// A participant's initial offer. Answered by [`SfuEvent::PeerCreated`] or
    /// [`SfuEvent::PeerFailed`].
    CreatePeer {
        peer: PeerId,
        conference: ConferenceId,
        offer: String,
        role: PeerRole,
    },
    /// Open a trunk to another focus: weir makes the offer (full ICE, a data channel, no
    /// media yet). Answered by [`SfuEvent::TrunkOffer`] or [`SfuEvent::PeerFailed`]; the far
    /// focus's answer comes as [`Command::RemoteAnswer`].
    DialTrunk {
        peer: PeerId,
        conference: ConferenceId,
    },
    /// ICE candidates from the far end (`candidate:...` lines). Only a peer weir dialled runs
    /// full ICE and needs them; an ICE-lite peer ignores them.
    RemoteCandidates {
        peer: PeerId,
        candidates: Vec<String>,
    },
    /// A later offer from the participant (renegotiation, ICE restart). Any offer of ours that
    /// is outstanding is rolled back (weir is always the polite peer) and re-made afterwards.
    RemoteOffer { peer: PeerId, sdp: String },
    /// The participant's answer to our last [`SfuEvent::Offer`].
    RemoteAnswer { peer: PeerId, sdp: String },
    /// Close a peer (hangup, replaced leg, shutdown). Its tracks are withdrawn from everyone.
    ClosePeer { peer: PeerId },
    /// What this peer wants to receive, replacing any earlier set. Until the first one a peer
    /// receives every track of its conference; after it, exactly the tracks listed that exist
    /// (tracks published later are matched by their ids too).
    Subscribe {
        peer: PeerId,
        subscriptions: Vec<Subscription>,
    },
    /// A text message on the peer's data channel (dropped if it has none open yet).
    SendData { peer: PeerId, text: String },
    /// Which of the peer's streams (`a=msid` stream ids) are screens (MSC3077 purpose
    /// `m.screenshare`), replacing any earlier set: bandwidth allocation serves their video
    /// before any camera's.
    Screens { peer: PeerId, streams: Vec<String> },
}

impl Command {
    /// The peer the command concerns.
    pub fn peer(&self) -> PeerId {
        match self {
            Command::CreatePeer { peer, .. }
            | Command::DialTrunk { peer, .. }
            | Command::RemoteCandidates { peer, .. }
            | Command::RemoteOffer { peer, .. }
            | Command::RemoteAnswer { peer, .. }
            | Command::ClosePeer { peer }
            | Command::Subscribe { peer, .. }
            | Command::SendData { peer, .. }
            | Command::Screens { peer, .. } => *peer,
        }
    }
}

/// One peer as an operator sees it ([`crate::Sfu::peer_reports`]).
#[derive(Debug, Clone, PartialEq)]
pub struct PeerReport {
    pub peer: PeerId,
    /// The media shard it lives on.
    pub shard: usize,
    pub conference: ConferenceId,
    pub trunk: bool,
    /// ICE and DTLS completed.
    pub connected: bool,
    /// Its media runs over ICE-TCP.
    pub over_tcp: bool,
    /// Every datagram from it and to it, since it was created.
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// The same over the last whole second, in bits/s.
    pub rx_bps: u64,
    pub tx_bps: u64,
    /// The bandwidth estimated toward it, when estimating.
    pub estimate_bps: Option<u64>,
    /// The share of packets toward it lost over the last second, when estimating.
    pub loss: Option<f32>,
    /// Tracks it publishes, and tracks forwarded to it.
    pub publishes: usize,
    pub receives: usize,
    /// Videos paused toward it for want of bandwidth.
    pub videos_paused: usize,
}

/// What the far end of a connection is. Forwarding treats both alike except for the origin
/// rule: a track that arrived on a trunk is never sent onto another trunk (in a full mesh of
/// foci every track then crosses exactly one trunk, so no loop can form), and a trunk
/// receives nothing until it subscribes (it pulls only what its side watches).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerRole {
    Participant,
    Trunk,
}

/// One track a subscriber asked for (MSC3898 `m.call.track_subscription`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    /// The publisher's `a=msid` stream and track ids.
    pub stream_id: String,
    pub track_id: String,
    /// The height the subscriber will display it at, if it said; caps the simulcast layer.
    pub max_height: Option<u32>,
    /// The full height the publisher sends, if known (its metadata); 720 is assumed otherwise.
    pub source_height: Option<u32>,
}

impl Subscription {
    /// The best simulcast layer rank (see `forward::rid_rank`) worth sending: by convention
    /// `f` is the full size, `h` half and `q` a quarter, so the smallest layer at least as tall
    /// as the display is enough.
    pub fn max_rank(&self) -> u8 {
        let Some(want) = self.max_height.filter(|h| *h > 0) else {
            return u8::MAX;
        };
        let source = self.source_height.filter(|h| *h > 0).unwrap_or(720);
        if want * 4 <= source {
            crate::forward::rid_rank(Some("q"))
        } else if want * 2 <= source {
            crate::forward::rid_rank(Some("h"))
        } else {
            u8::MAX
        }
    }
}

/// An ICE candidate of ours, for the participant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalCandidate {
    /// `candidate:...` attribute value.
    pub candidate: String,
    pub sdp_mid: String,
    pub sdp_m_line_index: u32,
}

/// A track a participant publishes to us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishedTrack {
    pub mid: MediaId,
    pub kind: TrackKind,
    /// `a=msid` stream and track ids from the participant's SDP.
    pub stream_id: String,
    pub track_id: String,
}

/// A track forwarded to a subscriber, as it appears in an offer we make to that subscriber.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardedTrack {
    pub publisher: PeerId,
    pub kind: TrackKind,
    pub stream_id: String,
    pub track_id: String,
}

/// Why a peer was closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// [`Command::ClosePeer`].
    Requested,
    /// ICE/DTLS did not complete within the connect timeout.
    ConnectTimeout,
    /// Nothing arrived from a connected peer within the silence timeout.
    Silent,
    /// The participant closed DTLS, or the engine gave up on the connection.
    Disconnected,
    /// The engine rejected the peer's traffic or state in a way it cannot recover from.
    EngineError(String),
}

/// Media-plane happenings the control plane acts on.
#[derive(Debug)]
pub enum SfuEvent {
    PeerCreated {
        peer: PeerId,
        answer: String,
        candidates: Vec<LocalCandidate>,
    },
    /// Our offer for a trunk we dial ([`Command::DialTrunk`]), with our candidates in it.
    TrunkOffer {
        peer: PeerId,
        sdp: String,
    },
    /// The peer's data channel opened: messages to it can be sent from now on.
    ChannelOpen {
        peer: PeerId,
    },
    /// The initial offer was unusable. The peer does not exist.
    PeerFailed {
        peer: PeerId,
        error: String,
    },
    /// Our answer to a [`Command::RemoteOffer`].
    Answer {
        peer: PeerId,
        sdp: String,
    },
    /// We need to renegotiate with this peer: send the offer. `tracks` lists every forwarded
    /// track whose m-line is in it, so the control plane can describe each stream id.
    Offer {
        peer: PeerId,
        sdp: String,
        tracks: Vec<ForwardedTrack>,
    },
    /// A remote offer or answer was unusable; the peer's state is unchanged.
    NegotiationFailed {
        peer: PeerId,
        error: String,
    },
    Connected {
        peer: PeerId,
    },
    TrackPublished {
        peer: PeerId,
        track: PublishedTrack,
    },
    TrackUnpublished {
        peer: PeerId,
        mid: MediaId,
    },
    /// A text message from the peer's data channel (MSC3898 JSON, for the control plane).
    DataMessage {
        peer: PeerId,
        text: String,
    },
    PeerClosed {
        peer: PeerId,
        reason: CloseReason,
    },
    /// Who speaks in a conference changed (`forward::speakers`): the dominant speaker (kept
    /// after speech ends until someone else speaks) and everyone speaking, loudest first.
    Speakers {
        conference: ConferenceId,
        dominant: Option<AudioSource>,
        speaking: Vec<AudioSource>,
    },
}

impl SfuEvent {
    /// The peer the event concerns (every event but a conference's speakers).
    pub fn peer(&self) -> Option<PeerId> {
        match self {
            SfuEvent::PeerCreated { peer, .. }
            | SfuEvent::TrunkOffer { peer, .. }
            | SfuEvent::ChannelOpen { peer, .. }
            | SfuEvent::PeerFailed { peer, .. }
            | SfuEvent::Answer { peer, .. }
            | SfuEvent::Offer { peer, .. }
            | SfuEvent::NegotiationFailed { peer, .. }
            | SfuEvent::Connected { peer, .. }
            | SfuEvent::TrackPublished { peer, .. }
            | SfuEvent::TrackUnpublished { peer, .. }
            | SfuEvent::DataMessage { peer, .. }
            | SfuEvent::PeerClosed { peer, .. } => Some(*peer),
            SfuEvent::Speakers { .. } => None,
        }
    }
}

/// An audio track as the control plane knows it: its publisher and its stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AudioSource {
    pub publisher: PeerId,
    pub stream_id: String,
}

/// Failures of the media plane as a whole (not of one peer).
#[derive(Debug, thiserror::Error)]
pub enum SfuError {
    #[error("binding the ICE-TCP listener on {addr}: {source}")]
    BindTcp {
        addr: String,
        source: std::io::Error,
    },
    #[error("binding the UDP socket for shard {shard} on {addr}: {source}")]
    Bind {
        shard: usize,
        addr: String,
        source: std::io::Error,
    },
    #[error("starting shard thread: {0}")]
    Thread(std::io::Error),
    #[error("the command queue of shard {0} is full")]
    QueueFull(usize),
    #[error("shard {0} has stopped")]
    ShardGone(usize),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(max: Option<u32>, source: Option<u32>) -> Subscription {
        Subscription {
            stream_id: "s".into(),
            track_id: "t".into(),
            max_height: max,
            source_height: source,
        }
    }

    #[test]
    fn the_requested_size_caps_the_layer() {
        let q = crate::forward::rid_rank(Some("q"));
        let h = crate::forward::rid_rank(Some("h"));
        assert_eq!(sub(None, None).max_rank(), u8::MAX);
        assert_eq!(sub(Some(720), None).max_rank(), u8::MAX);
        assert_eq!(sub(Some(360), None).max_rank(), h);
        assert_eq!(sub(Some(180), None).max_rank(), q);
        assert_eq!(sub(Some(100), Some(1080)).max_rank(), q);
        assert_eq!(sub(Some(540), Some(1080)).max_rank(), h);
        assert_eq!(sub(Some(600), Some(1080)).max_rank(), u8::MAX);
        assert_eq!(
            sub(Some(0), None).max_rank(),
            u8::MAX,
            "0 means unspecified"
        );
    }
}
