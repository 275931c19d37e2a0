//! One media shard: the engines of the peers placed on one thread, and everything they share.
//!
//! The shard is split in two. [`ShardCore`] is socket-free and clock-free: commands, datagrams
//! and `now` go in; datagrams to send (a [`SendQueue`]), events for the control plane and the
//! next deadline come out. [`run::Shard`] is the thread around it, which owns the UDP socket,
//! reads the clock, batches receives and sends and sleeps until the next deadline.
//!
//! A turn: commands → a batch of datagrams, each demultiplexed to its peer ([`demux`]) and fed
//! to its engine → the output of only the peers touched is drained ([`drain`]) → RTP is written
//! to the subscribers of its track ([`fanout`]), choosing layers and asking for keyframes
//! ([`layers`]) → due engine timers and housekeeping ([`timers`]) → offers for what changed
//! ([`negotiation`], [`tracks`]) → the batched send. The core never waits on the control plane:
//! events go out through a non-blocking [`EventSink`].

mod allocation;
mod core;
mod data_channel;
mod demux;
mod drain;
mod dynacast;
mod fanout;
mod layers;
mod negotiation;
mod run;
mod send_queue;
mod single_port;
mod speakers;
mod spread;
mod teardown;
mod timers;
mod tracks;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use str0m::change::SdpPendingOffer;
use str0m::channel::ChannelId;
use str0m::media::{Mid, Pt, Rid};
use str0m::net::{Protocol, Transmit};
use str0m::rtp::Ssrc;
use str0m::Rtc;

use crate::api::{PeerRole, SfuConfig, SfuEvent, Subscription};
use crate::budget::RateBudget;
use crate::forward::svc::{SvcFilter, SvcStream};
use crate::forward::{
    Allocator, KeyframeRequests, LayerActivity, LayerSelector, Now, SeqTsRewriter, SpeakerDetector,
    StallWatch, TemporalFilter, TrunkLayers, Vp8Ids, ALL_TEMPORAL,
};
use crate::ids::{ConferenceId, PeerId, TrackKind};
use crate::net::SendQueue;
use crate::stats::{ShardCounters, ShardStats};
use dynacast::Dynacast;

/// Maps keyed by weir's own ids (peers, conferences, tracks): a fast hash, since no peer
/// chooses these keys. Maps keyed by what peers send (source addresses, SSRCs) keep the
/// default keyed hash, which resists collision flooding.
type FastMap<K, V> = HashMap<K, V, rustc_hash::FxBuildHasher>;

pub use self::core::CoreSizes;
pub(crate) use run::{Inputs, Shard};
pub use single_port::ShardMessage;
pub use spread::{Relayed, SpreadMessage, TrackUp};

/// Sends events to the control plane without ever blocking the shard.
pub trait EventSink: Send + 'static {
    /// Returns false if the event could not be queued (it is then counted as dropped).
    fn send(&self, event: SfuEvent) -> bool;
}

impl EventSink for tokio::sync::mpsc::Sender<SfuEvent> {
    fn send(&self, event: SfuEvent) -> bool {
        self.try_send(event).is_ok()
    }
}

impl EventSink for crossbeam_channel::Sender<SfuEvent> {
    fn send(&self, event: SfuEvent) -> bool {
        self.try_send(event).is_ok()
    }
}

/// The most streams of one peer kept as screens: a client shares one screen, or a few.
const MAX_SCREENS: usize = 8;

/// Data-channel messages a peer may send per second, after a burst of [`DATA_MESSAGE_BURST`].
/// MSC3898 traffic is a subscription change now and then and a ping every few seconds; a
/// layout change resubscribes once. More is a flood: dropped and counted
/// (`data_channel_flood`), so it never reaches the control plane's shared queues. Higher lets
/// chattier clients through; lower cuts a flood sooner.
const DATA_MESSAGES_PER_SECOND: u32 = 20;
/// Data-channel messages a peer may send at once (joining: subscription, metadata, ping).
const DATA_MESSAGE_BURST: u32 = 50;

/// A published track inside the shard: the publisher and the engine's mid. Copy, so the
/// per-packet path looks tracks up without allocating.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrackKey {
    publisher: PeerId,
    mid: Mid,
}

struct Published {
    conference: ConferenceId,
    /// The shard its publisher lives on, when that is another one ([`spread`]): the track is
    /// held here for this shard's subscribers, its packets handed over by that shard.
    home: Option<usize>,
    /// When it was published here, or announced by its home shard.
    announced: Instant,
    /// Published by a trunk: it never leaves over another (the origin rule).
    from_trunk: bool,
    kind: TrackKind,
    stream_id: String,
    track_id: String,
    /// Simulcast layers (by rid; a single `None` layer without simulcast) and their activity.
    activity: LayerActivity<Option<Rid>>,
    /// Streams of the track that carry the dependency descriptor (VP9 or AV1), by SSRC: their
    /// structure and active decode targets ([`crate::forward::svc`]).
    svc: Vec<(Ssrc, SvcStream)>,
    /// A scalable track's spatial layers (by index, ranked as simulcast layers of the same
    /// size would be) and their activity, each counting what a subscriber of it receives:
    /// what allocation chooses from for such a track. Empty for any other track.
    spatial: LayerActivity<u8>,
    /// The most spatial layers a structure of the track has had: what its spatial layers rank
    /// among ([`crate::forward::svc::spatial_rank`]) when its publisher encodes fewer.
    spatial_seen: u8,
    /// When the first packet of the track arrived.
    first_packet: Option<Instant>,
    /// Audio held back as not among the loudest: the next forwarded packet resumes each
    /// subscriber's stream without a sequence gap.
    held_back: bool,
    /// Keyframe-request coalescing, one window for all the track's layers.
    keyframes: KeyframeRequests,
    subscribers: Vec<PeerId>,
    /// A subscriber with an estimated downlink was added and waits for its allocation, which
    /// the track's next packet triggers.
    unallocated: bool,
    /// Which layers anyone needs, for a participant's simulcast or scalable video
    /// ([`dynacast`]).
    dynacast: Option<Dynacast>,
    /// A remote track whose home may run dynacast for it (a participant's video): this shard
    /// tells it what its own subscribers need ([`spread::SpreadMessage::Demand`]), and what
    /// it last told.
    remote_dynacast: bool,
    demand_sent: Option<Option<u8>>,
    /// On the home shard: the best layer rank the subscribers on each other shard need.
    demand_from: Vec<(usize, u8)>,
    /// A remote track shared as a screen (for a local one, its publisher's `screens` say).
    screen: bool,
    /// A remote track's simulcast rids (for a local one, its publisher's engine says).
    remote_rids: Vec<Rid>,
}

impl Published {
    /// A track of `conference` published here, with nothing received yet; the other fields
    /// say what kind of track it is beyond that.
    fn new(
        conference: ConferenceId,
        kind: TrackKind,
        stream_id: String,
        track_id: String,
        now: Instant,
    ) -> Self {
        Published {
            conference,
            home: None,
            announced: now,
            from_trunk: false,
            kind,
            stream_id,
            track_id,
            activity: LayerActivity::default(),
            svc: Vec::new(),
            spatial: LayerActivity::default(),
            spatial_seen: 0,
            first_packet: None,
            held_back: false,
            keyframes: KeyframeRequests::default(),
            subscribers: Vec::new(),
            unallocated: false,
            dynacast: None,
            remote_dynacast: false,
            demand_sent: None,
            demand_from: Vec::new(),
            screen: false,
            remote_rids: Vec::new(),
        }
    }
}

struct OutTrack {
    mid: Mid,
    kind: TrackKind,
    stream_id: String,
    track_id: String,
    rewriter: SeqTsRewriter,
    /// Which layer this subscriber gets; starts and switches only on keyframes.
    layers: LayerSelector<Option<Rid>>,
    /// Which temporal layers of it (VP8), and the picture ids renumbered around the frames
    /// left out.
    temporal: TemporalFilter,
    vp8_ids: Vp8Ids,
    /// Which spatial and temporal layers of a scalable stream (VP9/AV1 SVC).
    svc: SvcFilter,
    /// The best layer rank the subscriber's subscription allows (`u8::MAX`: any). Worked out
    /// when the track starts and when the subscription changes, so neither the first packet
    /// nor housekeeping searches the subscription list.
    cap: u8,
    /// Publisher payload type → subscriber payload type, learned per packet type.
    pt_map: Vec<(Pt, Option<Pt>)>,
    /// On a trunk, a simulcast track crosses as simulcast: every layer someone far needs, each
    /// under its rid (`layers` and `rewriter` are then unused).
    trunk: Option<TrunkLayers<Rid>>,
    /// The engine's send stream for each layer sent, by SSRC: a hash lookup per copy, where
    /// finding it by mid walks every send stream of the connection.
    tx_ssrcs: Vec<(Option<Rid>, Ssrc)>,
    /// What bandwidth allocation gives this copy ([`allocation`]): a rank below `cap`, or a
    /// pause. `New` until the first allocation, and always without an estimate.
    allocated: Now,
    /// Since when allocation has let it flow after it first started, while it does, and the
    /// working estimate it started on: a video flowing for less than `forward::SETTLING`
    /// whose estimate has fallen by more than the headroom it started with is still settling.
    flowing_since: Option<(Instant, u64)>,
    /// Allocation lets it flow again after a pause: the subscriber is told so with its first
    /// packet forwarded (a keyframe), not when allocation decides, since until then its
    /// picture would stand still while said to flow.
    resume_untold: bool,
    /// A scalable stream moved down with its send queue stale: the queue goes before the next
    /// keyframe, asked for then (`send_queue`).
    drop_at_keyframe: bool,
}

impl OutTrack {
    /// Whether this copy waits for bandwidth allocation before any layer is chosen: paused,
    /// or a video toward a subscriber with an estimate that has not started yet (allocated
    /// on the track's next packet, or by housekeeping). A copy already flowing when the
    /// estimate appeared keeps flowing until its first allocation.
    fn awaits_allocation(&self, estimating: bool) -> bool {
        match self.allocated {
            Now::Paused | Now::Waiting => true,
            Now::New => {
                estimating
                    && self.kind == TrackKind::Video
                    && self.trunk.is_none()
                    && self.layers.target().is_none()
            }
            Now::Layer(_) => false,
        }
    }

    /// The best layer rank this copy may get: its size cap, lowered by allocation.
    fn layer_cap(&self) -> u8 {
        match self.allocated {
            Now::Layer(q) => self.cap.min(q.rank),
            _ => self.cap,
        }
    }

    /// The highest temporal layer this copy may get while it receives the layer of `rank`.
    fn temporal_cap(&self, rank: u8) -> u8 {
        match self.allocated {
            Now::Layer(q) => q.temporal_cap(rank),
            _ => ALL_TEMPORAL,
        }
    }

    fn tx_ssrc(&self, rid: Option<Rid>) -> Option<Ssrc> {
        self.tx_ssrcs
            .iter()
            .find(|(r, _)| *r == rid)
            .map(|(_, s)| *s)
    }
}

struct PendingNegotiation {
    offer: SdpPendingOffer,
    /// Tracks added by the offer, with the simulcast layers their m-line sends (trunks only).
    added: Vec<(TrackKey, Mid, Vec<Rid>)>,
    /// The offer's m-line mids in order: an answer must list the same ones.
    mids: Vec<Option<String>>,
}

struct Peer {
    conference: ConferenceId,
    role: PeerRole,
    /// Polite peers roll back their own offer on glare; the impolite one (a trunk we dialled)
    /// ignores the other's offer instead, so two foci never both roll back.
    polite: bool,
    rtc: Rtc,
    created_at: Instant,
    last_rx: Instant,
    connected: bool,
    /// Mids weir created on this connection (for forwarded tracks).
    own_mids: HashSet<String>,
    /// The payload-type order of each m-line, by mid, in the participant's last offer or
    /// answer: weir's answers and offers keep it, so that the codec it put first is the one
    /// it sends (`engine::in_format_order`).
    codec_order: crate::engine::FormatOrder,
    pending: Option<PendingNegotiation>,
    /// Tracks published by this peer, by its mid.
    published: FastMap<Mid, TrackKey>,
    ssrc_mid: HashMap<Ssrc, (Mid, Option<Rid>)>,
    /// What should be forwarded to this peer (policy: everything else in the conference).
    desired: BTreeMap<TrackKey, (TrackKind, String, String)>,
    /// What is negotiated and forwarded, by track.
    out: FastMap<TrackKey, OutTrack>,
    out_by_mid: FastMap<Mid, TrackKey>,
    /// M-lines an answer accepted for tracks withdrawn while the offer was out: no OutTrack
    /// carries them, so the next offer stops them (else they stay sendonly under the track's
    /// msid, and a later m-line for the same track repeats it: Chromium refuses that SDP).
    orphan_mids: Vec<Mid>,
    addrs: Vec<(Protocol, SocketAddr)>,
    /// The engine's next deadline, as queued in the shard's timer heap.
    timeout: Option<Instant>,
    /// Queued in the shard's dirty list.
    dirty: bool,
    /// A panic was caught while handling this peer: its engine is not touched again.
    poisoned: bool,
    /// Queued in the shard's list of offers to make at the end of the turn.
    offer_due: bool,
    /// What the peer asked to receive; `None` until its first subscription: everything.
    explicit: Option<Vec<Subscription>>,
    /// Without a subscription: the layer cap that fits a grid of the videos it receives
    /// (`forward::grid_cap`), kept current by housekeeping.
    default_cap: u8,
    /// The peer's data channel, once open.
    channel: Option<ChannelId>,
    /// What it may send on its data channel.
    data_budget: RateBudget,
    /// The latest estimate of the bandwidth toward it (bits/s), when estimating.
    estimate: Option<u64>,
    /// The share of packets toward it lost over the last second (transport-wide feedback),
    /// as last reported, when estimating.
    loss: Option<f32>,
    /// Shares the estimate among the videos it receives.
    allocator: Allocator,
    /// Its streams that are screens (`Command::Screens`): their videos come first in
    /// everyone's allocation.
    screens: Vec<String>,
    /// Notices an estimate locked while it holds the peer back (`forward::stall`).
    stall: StallWatch,
    /// Media bytes sent toward it (retransmissions included), and when, as of the last
    /// engine stats.
    tx_mark: Option<(u64, Instant)>,
    /// The (minimum, desired) rates last given to its estimator, to probe only on change.
    probing: (u64, u64),
    /// The desired rate is dipped this round to ask for a probe on the next
    /// (`allocation::PROBE_INTERVAL`), and when that last happened.
    probe_dip: bool,
    probed_at: Instant,
    /// The last notice sent on its data channel, and how many more times to send it again
    /// (`data_channel::NOTICE_ECHOES`).
    notice_echo: Option<(String, u8)>,
    /// The unordered channel the participant opened for notices
    /// (`data_channel::NOTICES_LABEL`), once open; until then notices go on `channel`.
    notices: Option<ChannelId>,
    /// The number of the last notice sent (`seq` in each), so the participant can tell a late
    /// one from a newer one.
    notice_seq: u64,
    /// Bytes received from it and sent to it, all datagrams included, and their rates over
    /// the last whole second (for an operator's view: `Sfu::peer_reports`).
    traffic: Traffic,
}

/// A peer's traffic: totals, and the rates over the last whole second.
#[derive(Debug, Clone, Copy)]
struct Traffic {
    rx_bytes: u64,
    tx_bytes: u64,
    /// Totals at the start of the current second.
    mark: (Instant, u64, u64),
    rx_bps: u64,
    tx_bps: u64,
}

impl Traffic {
    fn new(now: Instant) -> Self {
        Traffic {
            rx_bytes: 0,
            tx_bytes: 0,
            mark: (now, 0, 0),
            rx_bps: 0,
            tx_bps: 0,
        }
    }

    /// Close the current second if it has passed (housekeeping).
    fn roll(&mut self, now: Instant) {
        let secs = now.saturating_duration_since(self.mark.0).as_secs_f64();
        if secs >= 1.0 {
            self.rx_bps = ((self.rx_bytes - self.mark.1) as f64 * 8.0 / secs) as u64;
            self.tx_bps = ((self.tx_bytes - self.mark.2) as f64 * 8.0 / secs) as u64;
            self.mark = (now, self.rx_bytes, self.tx_bytes);
        }
    }
}

/// How long after its creation a participant whose downlink is estimated may go without an
/// estimate before its videos are no longer held within the estimate its engine starts from
/// ([`layers::before_allocation`]). A client with neither transport-wide feedback nor REMB
/// never gets one, and then gets the best layer flowing after this, as without estimation.
/// Longer keeps such a client on a lower layer longer; shorter lets a slow first estimate
/// find its videos on the best layer.
const FIRST_ESTIMATE_WAIT: Duration = Duration::from_secs(10);

impl Peer {
    /// For a video of this participant not allocated yet (`allocated`), the estimate its
    /// engine starts from (`start`, configured): the video starts within it
    /// ([`layers::before_allocation`]) until the first allocation round after the first
    /// estimate. `None` once allocated, for a trunk, or without estimation.
    fn before_allocation(&self, start: Option<u64>, allocated: Now, now: Instant) -> Option<u64> {
        let blind = allocated == Now::New
            && self.role == PeerRole::Participant
            && (self.estimate.is_some()
                || now.saturating_duration_since(self.created_at) < FIRST_ESTIMATE_WAIT);
        start.filter(|_| blind)
    }

    fn new(conference: ConferenceId, role: PeerRole, polite: bool, rtc: Rtc, now: Instant) -> Self {
        Peer {
            conference,
            role,
            polite,
            rtc,
            created_at: now,
            last_rx: now,
            connected: false,
            own_mids: HashSet::new(),
            codec_order: Vec::new(),
            pending: None,
            published: FastMap::default(),
            ssrc_mid: HashMap::new(),
            desired: BTreeMap::new(),
            out: FastMap::default(),
            out_by_mid: FastMap::default(),
            orphan_mids: Vec::new(),
            addrs: Vec::new(),
            timeout: None,
            dirty: false,
            poisoned: false,
            offer_due: false,
            // A trunk pulls only what its side subscribes to.
            explicit: (role == PeerRole::Trunk).then(Vec::new),
            default_cap: u8::MAX,
            channel: None,
            data_budget: RateBudget::new(DATA_MESSAGE_BURST, DATA_MESSAGES_PER_SECOND, now),
            estimate: None,
            loss: None,
            allocator: Allocator::default(),
            stall: StallWatch::default(),
            screens: Vec::new(),
            tx_mark: None,
            probing: (0, 0),
            probe_dip: false,
            probed_at: now,
            notice_echo: None,
            notices: None,
            notice_seq: 0,
            traffic: Traffic::new(now),
        }
    }
}

/// The state of one shard, and the only place it lives. Behaviour is spread over this
/// module's files by concept; each adds an `impl` block.
pub struct ShardCore<S: EventSink> {
    index: usize,
    config: SfuConfig,
    /// The address the shard's socket is bound to (the local side of every 5-tuple).
    local_addr: SocketAddr,
    /// The advertised address each datagram is taken to have arrived on ([`demux::IceLocal`]).
    ice_local: demux::IceLocal,
    events: S,
    peers: FastMap<PeerId, Peer>,
    conferences: FastMap<ConferenceId, Vec<PeerId>>,
    tracks: FastMap<TrackKey, Published>,
    /// Each peer by the addresses it was introduced from (UDP, or ICE-TCP connections).
    by_addr: HashMap<(Protocol, SocketAddr), PeerId>,
    /// Each peer by its local ICE ufrag: a check from a new address names the one peer it is
    /// for (`stun::local_ufrag`), instead of every peer being asked about it.
    by_ufrag: FastMap<String, PeerId>,
    timers: BinaryHeap<Reverse<(Instant, PeerId)>>,
    dirty: Vec<PeerId>,
    /// Datagrams to send, batched until the thread flushes them to the socket.
    transmits: SendQueue,
    /// Packets to send on ICE-TCP connections, until the thread writes them.
    tcp_transmits: SendQueue,
    /// With one port for every shard: addresses whose peer lives on another shard (and when
    /// they last sent), and messages for the other shards ([`single_port`]).
    foreign: HashMap<SocketAddr, (usize, Instant)>,
    outgoing: Vec<single_port::Outgoing>,
    counters: ShardCounters,
    stats: std::sync::Arc<ShardStats>,
    next_housekeeping: Instant,
    /// When the earliest keyframe request held back by coalescing is due (derived from the
    /// tracks' [`KeyframeRequests`], so the shard wakes for it rather than at housekeeping).
    keyframes_due: Option<Instant>,
    /// Speech activity of each conference's audio tracks.
    speakers: FastMap<ConferenceId, SpeakerDetector<TrackKey>>,
    /// The other shards of each conference spread over several ([`spread`]).
    spans: FastMap<ConferenceId, Vec<usize>>,
    /// The earliest receipt, on their home shard, of the packets handed over and forwarded
    /// this turn (the turn's forwarding delay counts from it).
    relayed_since: Option<Instant>,
    /// Peers to renegotiate with at the end of the turn ([`ShardCore::offer_soon`]).
    offers_due: Vec<PeerId>,
    /// The peer being handled right now (innermost), to blame a panic on: set around every
    /// touch of one peer's engine and restored after, so a panic leaves it naming the peer.
    current: Option<PeerId>,
}

/// Queue what an engine sends: on the UDP socket, or on the ICE-TCP connection it names.
fn queue_transmit(udp: &mut SendQueue, tcp: &mut SendQueue, t: &Transmit) {
    match t.proto {
        Protocol::Tcp => tcp.push(t.destination, &t.contents),
        _ => udp.push(t.destination, &t.contents),
    }
}

#[cfg(test)]
mod tests {
    use super::Traffic;
    use std::time::{Duration, Instant};

    #[test]
    fn traffic_rates_are_over_the_last_whole_second() {
        let t0 = Instant::now();
        let mut t = Traffic::new(t0);
        t.rx_bytes += 1000;
        t.tx_bytes += 3000;
        t.roll(t0 + Duration::from_millis(900));
        assert_eq!((t.rx_bps, t.tx_bps), (0, 0), "no second has passed");
        t.roll(t0 + Duration::from_secs(1));
        assert_eq!((t.rx_bps, t.tx_bps), (8000, 24000));
        t.roll(t0 + Duration::from_secs(3));
        assert_eq!(
            (t.rx_bps, t.tx_bps),
            (0, 0),
            "nothing in the two seconds since"
        );
    }
}
