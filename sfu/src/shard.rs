//! One media shard: a thread that owns a UDP socket and the engines of the peers placed on it.
//!
//! Loop: commands → `recvmmsg` a batch → demux by source address → engine input → drain the
//! output of only the peers touched (dirty list) → forward RTP between peers of a conference →
//! `sendmmsg` → fire due engine timers from a min-heap → wait for the earliest deadline. The
//! shard never waits on the control plane: events go out through a bounded non-blocking queue.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use std::net::{SocketAddr, UdpSocket};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use str0m::change::SdpPendingOffer;
use str0m::channel::ChannelId;
use str0m::media::{
    Direction, KeyframeRequestKind, MediaKind, Mid, Pt, Rid, Rids, Simulcast, SimulcastLayer,
};
use str0m::net::{Protocol, Receive};
use str0m::rtp::{ExtensionValues, RtpPacket, RtpWrite, Ssrc};
use str0m::{Candidate, Event, Input, Output, Rtc};
use tracing::{debug, info, warn};

use crate::api::{
    CloseReason, Command, ForwardedTrack, LocalCandidate, PeerRole, PublishedTrack, SfuConfig,
    SfuEvent, Subscription,
};
use crate::budget::RateBudget;
use crate::engine::{self, parse_answer, parse_offer};
use crate::forward::{
    rid_rank, starts_keyframe, Decision, KeyframeRequests, LayerActivity, LayerSelector, Rewritten,
    SeqTsRewriter, TrunkLayers,
};
use crate::ids::{ConferenceId, MediaId, PeerId, TrackKind};
use crate::net::{self, RecvBatch, SendQueue, Waker};
use crate::stats::{DropReason, ShardCounters, ShardStats};
use crate::stun;

/// How often the shard checks timeouts, owed keyframe requests and publishes its counters.
/// Shorter reacts faster to dead peers and owed requests; longer costs less idle CPU.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_millis(100);
/// Largest data-channel message passed to the control plane. MSC3898 messages are small JSON
/// (a subscription list, a renegotiation SDP of tens of KiB); more is refused and counted.
const MAX_DATA_MESSAGE: usize = 128 * 1024;
/// Data-channel messages a peer may send per second, after a burst of [`DATA_MESSAGE_BURST`].
/// MSC3898 traffic is a subscription change now and then and a ping every few seconds; a
/// layout change resubscribes once. More is a flood: dropped and counted
/// (`data_channel_flood`), so it never reaches the control plane's shared queues. Higher lets
/// chattier clients through; lower cuts a flood sooner.
const DATA_MESSAGES_PER_SECOND: u32 = 20;
/// Data-channel messages a peer may send at once (joining: subscription, metadata, ping).
const DATA_MESSAGE_BURST: u32 = 50;
/// Label of the data channel weir opens on a trunk it dials.
const TRUNK_CHANNEL_LABEL: &str = "weir-trunk";
/// Most remote candidates taken from one message: a trunk peer has a handful of host
/// candidates; more is refused rather than fed to ICE.
const MAX_REMOTE_CANDIDATES: usize = 32;
/// Source addresses remembered per peer. A participant changes address on a network switch and
/// may check a few candidate pairs; more than this are forgotten oldest first, so the address
/// map stays bounded whatever a peer sends.
const MAX_ADDRS_PER_PEER: usize = 8;
/// Most engine outputs drained from a closing peer (RTCP BYE per stream, DTLS close_notify,
/// SCTP shutdown): a bound, not a target.
const CLOSE_DRAIN_OUTPUTS: usize = 256;
/// How long a new subscriber waits for a keyframe before asking again.
const KEYFRAME_WAIT_RETRY: Duration = Duration::from_millis(1000);

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

/// A published track inside the shard: the publisher and the engine's mid. Copy, so the
/// per-packet path looks tracks up without allocating.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct TrackKey {
    publisher: PeerId,
    mid: Mid,
}

struct Published {
    kind: TrackKind,
    stream_id: String,
    track_id: String,
    /// Simulcast layers (by rid; a single `None` layer without simulcast) and their activity.
    activity: LayerActivity<Option<Rid>>,
    /// Keyframe-request coalescing per layer.
    keyframes: Vec<(Option<Rid>, KeyframeRequests)>,
    subscribers: Vec<PeerId>,
}

struct OutTrack {
    mid: Mid,
    kind: TrackKind,
    stream_id: String,
    track_id: String,
    rewriter: SeqTsRewriter,
    /// Which layer this subscriber gets; starts and switches only on keyframes.
    layers: LayerSelector<Option<Rid>>,
    /// Publisher payload type → subscriber payload type, learned per packet type.
    pt_map: Vec<(Pt, Option<Pt>)>,
    /// On a trunk, a simulcast track crosses as simulcast: every layer someone far needs, each
    /// under its rid (`layers` and `rewriter` are then unused).
    trunk: Option<TrunkLayers<Rid>>,
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
    pending: Option<PendingNegotiation>,
    /// Tracks published by this peer, by its mid.
    published: HashMap<Mid, TrackKey>,
    ssrc_mid: HashMap<Ssrc, (Mid, Option<Rid>)>,
    /// What should be forwarded to this peer (policy: everything else in the conference).
    desired: BTreeMap<TrackKey, (TrackKind, String, String)>,
    /// What is negotiated and forwarded, by track.
    out: HashMap<TrackKey, OutTrack>,
    out_by_mid: HashMap<Mid, TrackKey>,
    addrs: Vec<SocketAddr>,
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
    /// The peer's data channel, once open.
    channel: Option<ChannelId>,
    /// What it may send on its data channel.
    data_budget: RateBudget,
}

impl Peer {
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
            pending: None,
            published: HashMap::new(),
            ssrc_mid: HashMap::new(),
            desired: BTreeMap::new(),
            out: HashMap::new(),
            out_by_mid: HashMap::new(),
            addrs: Vec::new(),
            timeout: None,
            dirty: false,
            poisoned: false,
            offer_due: false,
            // A trunk pulls only what its side subscribes to.
            explicit: (role == PeerRole::Trunk).then(Vec::new),
            channel: None,
            data_budget: RateBudget::new(DATA_MESSAGE_BURST, DATA_MESSAGES_PER_SECOND, now),
        }
    }
}

pub(crate) struct Shard<S: EventSink> {
    index: usize,
    config: SfuConfig,
    socket: UdpSocket,
    local_addr: SocketAddr,
    commands: Receiver<Command>,
    waker: Arc<Waker>,
    events: S,
    stop: Arc<AtomicBool>,
    peers: HashMap<PeerId, Peer>,
    conferences: HashMap<ConferenceId, Vec<PeerId>>,
    tracks: HashMap<TrackKey, Published>,
    by_addr: HashMap<SocketAddr, PeerId>,
    /// Each peer by its local ICE ufrag: a check from a new address names the one peer it is
    /// for (`stun::local_ufrag`), instead of every peer being asked about it.
    by_ufrag: HashMap<String, PeerId>,
    timers: BinaryHeap<Reverse<(Instant, PeerId)>>,
    dirty: Vec<PeerId>,
    sendq: SendQueue,
    counters: ShardCounters,
    stats: Arc<ShardStats>,
    next_housekeeping: Instant,
    /// Peers to renegotiate with at the end of the turn ([`Shard::offer_soon`]).
    offers_due: Vec<PeerId>,
    /// The peer being handled right now (innermost), to blame a panic on: set around every
    /// touch of one peer's engine and restored after, so a panic leaves it naming the peer.
    current: Option<PeerId>,
}

impl<S: EventSink> Shard<S> {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        index: usize,
        config: SfuConfig,
        socket: UdpSocket,
        commands: Receiver<Command>,
        waker: Arc<Waker>,
        events: S,
        stop: Arc<AtomicBool>,
        stats: Arc<ShardStats>,
    ) -> std::io::Result<Self> {
        let local_addr = socket.local_addr()?;
        socket.set_nonblocking(true)?;
        Ok(Shard {
            index,
            config,
            socket,
            local_addr,
            commands,
            waker,
            events,
            stop,
            peers: HashMap::new(),
            conferences: HashMap::new(),
            tracks: HashMap::new(),
            by_addr: HashMap::new(),
            by_ufrag: HashMap::new(),
            timers: BinaryHeap::new(),
            dirty: Vec::new(),
            sendq: SendQueue::default(),
            counters: ShardCounters::default(),
            stats,
            next_housekeeping: Instant::now(),
            offers_due: Vec::new(),
            current: None,
        })
    }

    pub(crate) fn run(mut self) {
        info!(shard = self.index, addr = %self.local_addr, "media shard started");
        let mut batch = RecvBatch::default();
        while !self.stop.load(Ordering::Relaxed) {
            let turn = std::panic::catch_unwind(AssertUnwindSafe(|| self.turn(&mut batch)));
            let received = match turn {
                Ok(n) => n,
                Err(panic) => {
                    self.recover(panic);
                    continue;
                }
            };
            if received == net::RECV_BATCH {
                continue; // more may be waiting: don't sleep.
            }
            let deadline = self
                .timers
                .peek()
                .map(|Reverse((t, _))| *t)
                .unwrap_or(self.next_housekeeping)
                .min(self.next_housekeeping);
            let wait = deadline.saturating_duration_since(Instant::now());
            if !wait.is_zero() {
                net::wait_readable(&self.socket, &self.waker, Some(wait));
            }
        }
        let ids: Vec<PeerId> = self.peers.keys().copied().collect();
        for id in ids {
            self.close_peer(id, CloseReason::Requested);
        }
        self.flush();
        self.counters.publish(&self.stats, 0, 0, 0);
        info!(shard = self.index, "media shard stopped");
    }

    /// One turn of the loop: commands, a batch of datagrams, engine output, due timers,
    /// housekeeping, the batched send. Returns how many datagrams were read.
    fn turn(&mut self, batch: &mut RecvBatch) -> usize {
        self.current = None;
        self.waker.drain();
        while let Ok(cmd) = self.commands.try_recv() {
            let prev = self.current.replace(cmd.peer());
            self.handle_command(cmd, Instant::now());
            self.current = prev;
        }
        let received = match net::recv_batch(&self.socket, batch) {
            Ok(n) => n,
            Err(e) => {
                warn!(shard = self.index, error = %e, "udp receive failed");
                0
            }
        };
        let now = Instant::now();
        let sent_before = self.counters.datagrams_out;
        if let Some(d) = batch.kernel_drops() {
            self.counters.kernel_drops = u64::from(d);
        }
        if received > 0 {
            for (from, data) in batch.iter() {
                self.handle_datagram(from, data, now);
            }
        }
        self.drain_dirty();
        self.fire_timers(Instant::now());
        if now >= self.next_housekeeping {
            self.housekeeping(now);
            self.next_housekeeping = now + HOUSEKEEPING_INTERVAL;
        }
        self.make_due_offers();
        self.flush();
        if received > 0 && self.counters.datagrams_out > sent_before {
            let took = Instant::now().saturating_duration_since(now);
            self.counters.forward_delay.record(took.as_micros() as u64);
        }
        received
    }

    /// Renegotiate with `id` at the end of this turn rather than now: a participant who joins
    /// publishes its audio and video in the same turn, and each other participant then gets
    /// one offer with both instead of one per track (each offer is a to-device message
    /// through the homeservers, and the second would wait for the first's answer anyway).
    fn offer_soon(&mut self, id: PeerId) {
        if let Some(p) = self.peers.get_mut(&id) {
            if !p.offer_due {
                p.offer_due = true;
                self.offers_due.push(id);
            }
        }
    }

    fn make_due_offers(&mut self) {
        if self.offers_due.is_empty() {
            return;
        }
        for id in std::mem::take(&mut self.offers_due) {
            if let Some(p) = self.peers.get_mut(&id) {
                p.offer_due = false;
                self.maybe_offer(id);
            }
        }
        self.drain_dirty();
    }

    /// After a panic inside a turn: close the peer that was being handled (its engine or its
    /// state may be half-updated), rebuild what the interrupted work may have left
    /// inconsistent, and carry on with everyone else. A panic outside any peer's handling is
    /// a bug of the shard itself: it is not hidden, the shard stops (and `/healthz` says so).
    fn recover(&mut self, panic: Box<dyn std::any::Any + Send>) {
        let Some(id) = self.current.take() else {
            std::panic::resume_unwind(panic);
        };
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown".into());
        self.counters.peer_panics += 1;
        warn!(shard = self.index, %id, panic = %what, "panic while handling a peer; closing that peer only");
        if let Some(p) = self.peers.get_mut(&id) {
            p.poisoned = true;
        }
        // Fan-out takes a track's subscriber list while it writes: derive every list again.
        for p in self.tracks.values_mut() {
            p.subscribers.clear();
        }
        for (sid, peer) in &self.peers {
            for t in peer.out.keys() {
                if let Some(p) = self.tracks.get_mut(t) {
                    p.subscribers.push(*sid);
                }
            }
        }
        // Drain everyone, and let everyone's negotiation catch up (an offer made when nothing
        // changed is no offer), since the lists of both may have been taken mid-way.
        self.dirty.clear();
        self.offers_due.clear();
        for (pid, p) in &mut self.peers {
            p.dirty = *pid != id;
            p.offer_due = p.dirty;
            if p.dirty {
                self.dirty.push(*pid);
                self.offers_due.push(*pid);
            }
        }
        self.close_peer(id, CloseReason::EngineError(format!("panic: {what}")));
    }

    fn emit(&mut self, event: SfuEvent) {
        if !self.events.send(event) {
            self.counters.drop(DropReason::EventQueueFull);
        }
    }

    // ---------------------------------------------------------------- commands

    fn handle_command(&mut self, cmd: Command, now: Instant) {
        match cmd {
            Command::CreatePeer {
                peer,
                conference,
                offer,
                role,
            } => self.create_peer(peer, conference, &offer, role, now),
            Command::DialTrunk { peer, conference } => self.dial_trunk(peer, conference, now),
            Command::RemoteCandidates { peer, candidates } => {
                self.remote_candidates(peer, &candidates)
            }
            Command::RemoteOffer { peer, sdp } => self.remote_offer(peer, &sdp),
            Command::RemoteAnswer { peer, sdp } => self.remote_answer(peer, &sdp, now),
            Command::ClosePeer { peer } => self.close_peer(peer, CloseReason::Requested),
            Command::Subscribe {
                peer,
                subscriptions,
            } => self.subscribe(peer, subscriptions, now),
            Command::SendData { peer, text } => self.send_data(peer, &text),
        }
    }

    fn create_peer(
        &mut self,
        id: PeerId,
        conference: ConferenceId,
        offer: &str,
        role: PeerRole,
        now: Instant,
    ) {
        if self.peers.contains_key(&id) {
            self.emit(SfuEvent::PeerFailed {
                peer: id,
                error: "peer id already in use".into(),
            });
            return;
        }
        let offer = match parse_offer(offer, &HashSet::new()) {
            Ok(o) => o,
            Err(error) => {
                self.counters.drop(DropReason::BadSdp);
                self.emit(SfuEvent::PeerFailed { peer: id, error });
                return;
            }
        };
        let mut rtc = engine::new_rtc(now);
        let candidates = self.add_host_candidates(&mut rtc);
        let answer = match rtc.sdp_api().accept_offer(offer) {
            Ok(a) => a,
            Err(e) => {
                self.counters.drop(DropReason::BadSdp);
                self.emit(SfuEvent::PeerFailed {
                    peer: id,
                    error: e.to_string(),
                });
                return;
            }
        };
        let answer_sdp = answer.to_sdp_string();
        let first_mid = first_mid(&answer_sdp).unwrap_or_else(|| "0".into());
        let candidates = candidates
            .into_iter()
            .map(|c| LocalCandidate {
                candidate: c.strip_prefix("a=").unwrap_or(&c).to_string(),
                sdp_mid: first_mid.clone(),
                sdp_m_line_index: 0,
            })
            .collect();
        let mut peer = Peer::new(conference, role, true, rtc, now);
        let ufrag = peer.rtc.direct_api().local_ice_credentials().ufrag;
        self.by_ufrag.insert(ufrag, id);
        self.peers.insert(id, peer);
        let members = self.conferences.entry(conference).or_default();
        let existing: Vec<PeerId> = members.clone();
        members.push(id);
        info!(shard = self.index, %id, %conference, "peer created");
        self.emit(SfuEvent::PeerCreated {
            peer: id,
            answer: answer_sdp,
            candidates,
        });
        // A new peer receives every track of the conference until its first subscription
        // (`want` applies the subscription once there is one).
        for other in existing {
            let tracks: Vec<TrackKey> = self.peers[&other].published.values().cloned().collect();
            for t in tracks {
                self.want(id, t);
            }
        }
        self.mark_dirty(id);
        self.maybe_offer(id);
    }

    /// Our host candidates (one per advertised address, on this shard's port) added to `rtc`.
    fn add_host_candidates(&self, rtc: &mut Rtc) -> Vec<String> {
        let mut candidates = Vec::new();
        for ip in &self.config.advertise_ips {
            let addr = SocketAddr::new(*ip, self.local_addr.port());
            match Candidate::host(addr, "udp") {
                Ok(c) => {
                    if let Some(c) = rtc.add_local_candidate(c) {
                        candidates.push(c.to_sdp_string());
                    }
                }
                Err(e) => warn!(%addr, error = %e, "unusable advertise address"),
            }
        }
        candidates
    }

    /// Dial a trunk: a full-ICE engine whose first offer carries only the data channel (media
    /// is added by later offers from either side, as subscriptions ask for it).
    fn dial_trunk(&mut self, id: PeerId, conference: ConferenceId, now: Instant) {
        if self.peers.contains_key(&id) {
            self.emit(SfuEvent::PeerFailed {
                peer: id,
                error: "peer id already in use".into(),
            });
            return;
        }
        let mut rtc = engine::new_trunk_rtc(now);
        self.add_host_candidates(&mut rtc);
        let mut api = rtc.sdp_api();
        api.add_channel(TRUNK_CHANNEL_LABEL.to_string());
        let Some((offer, pending)) = api.apply() else {
            self.emit(SfuEvent::PeerFailed {
                peer: id,
                error: "the engine made no offer".into(),
            });
            return;
        };
        let sdp = offer.to_sdp_string();
        let mut peer = Peer::new(conference, PeerRole::Trunk, false, rtc, now);
        peer.pending = Some(PendingNegotiation {
            offer: pending,
            added: Vec::new(),
            mids: engine::mids(&sdp),
        });
        self.peers.insert(id, peer);
        self.conferences.entry(conference).or_default().push(id);
        info!(shard = self.index, %id, %conference, "trunk dialled");
        self.emit(SfuEvent::TrunkOffer { peer: id, sdp });
        self.mark_dirty(id);
    }

    fn remote_candidates(&mut self, id: PeerId, candidates: &[String]) {
        let Some(peer) = self.peers.get_mut(&id) else {
            return;
        };
        for line in candidates.iter().take(MAX_REMOTE_CANDIDATES) {
            let line = line.strip_prefix("a=").unwrap_or(line);
            match Candidate::from_sdp_string(line) {
                Ok(c) => peer.rtc.add_remote_candidate(c),
                Err(e) => debug!(%id, error = %e, "unusable remote candidate"),
            }
        }
        self.mark_dirty(id);
    }

    fn remote_offer(&mut self, id: PeerId, sdp: &str) {
        let Some(peer) = self.peers.get_mut(&id) else {
            return;
        };
        if !peer.polite && peer.pending.is_some() {
            // Glare with a focus we dialled: it is the polite one and will answer our offer
            // after rolling back its own, which it then makes again.
            debug!(%id, "glare: kept our offer, ignored the far focus's");
            self.counters.drop(DropReason::Glare);
            return;
        }
        let offer = match parse_offer(sdp, &peer.own_mids) {
            Ok(o) => o,
            Err(error) => {
                self.counters.drop(DropReason::BadSdp);
                self.emit(SfuEvent::NegotiationFailed { peer: id, error });
                return;
            }
        };
        // Polite peer: our outstanding offer, if any, is rolled back by accepting theirs. The
        // tracks it would have added are still desired and go into our next offer.
        if peer.pending.take().is_some() {
            debug!(%id, "glare: rolled back our offer to accept the participant's");
        }
        match peer.rtc.sdp_api().accept_offer(offer) {
            Ok(answer) => {
                let sdp = answer.to_sdp_string();
                self.mark_dirty(id);
                self.emit(SfuEvent::Answer { peer: id, sdp });
                // New or changed media arrive as engine events while draining.
                self.drain_dirty();
                self.maybe_offer(id);
            }
            Err(e) => {
                self.counters.drop(DropReason::BadSdp);
                self.emit(SfuEvent::NegotiationFailed {
                    peer: id,
                    error: e.to_string(),
                });
            }
        }
    }

    fn remote_answer(&mut self, id: PeerId, sdp: &str, now: Instant) {
        let Some(peer) = self.peers.get_mut(&id) else {
            return;
        };
        let Some(pending) = peer.pending.take() else {
            self.emit(SfuEvent::NegotiationFailed {
                peer: id,
                error: "answer without an outstanding offer".into(),
            });
            return;
        };
        let answer = match parse_answer(sdp) {
            Ok(a) => a,
            Err(error) => {
                self.counters.drop(DropReason::BadSdp);
                // Keep waiting for a usable answer to the same offer.
                peer.pending = Some(pending);
                self.emit(SfuEvent::NegotiationFailed { peer: id, error });
                return;
            }
        };
        if !engine::answers(&pending.mids, &engine::mids(sdp)) {
            // An answer to an offer we rolled back (glare) or replaced, arriving late: applying
            // it to the current offer would fail, and dropping the current offer for it would
            // leave every later answer one offer behind. Keep waiting for the current one.
            debug!(%id, "late answer to an earlier offer ignored");
            self.counters.drop(DropReason::StaleAnswer);
            peer.pending = Some(pending);
            return;
        }
        if let Err(e) = peer.rtc.sdp_api().accept_answer(pending.offer, answer) {
            self.counters.drop(DropReason::BadSdp);
            self.emit(SfuEvent::NegotiationFailed {
                peer: id,
                error: e.to_string(),
            });
            self.mark_dirty(id);
            self.maybe_offer(id);
            return;
        }
        for (track, mid, rids) in pending.added {
            self.start_forwarding(id, track, mid, rids, now);
        }
        self.mark_dirty(id);
        self.maybe_offer(id);
    }

    /// Record that `track` should be forwarded to `subscriber`.
    fn want(&mut self, subscriber: PeerId, track: TrackKey) {
        let Some(p) = self.tracks.get(&track) else {
            return;
        };
        if self.is_trunk(subscriber) && self.is_trunk(track.publisher) {
            return; // the origin rule: what came over a trunk never leaves over another
        }
        let info = (p.kind, p.stream_id.clone(), p.track_id.clone());
        if let Some(peer) = self.peers.get_mut(&subscriber) {
            let wanted = match &peer.explicit {
                None => true,
                Some(subs) => subs
                    .iter()
                    .any(|s| s.stream_id == info.1 && s.track_id == info.2),
            };
            if wanted {
                peer.desired.insert(track, info);
            }
        }
    }

    fn is_trunk(&self, id: PeerId) -> bool {
        self.peers
            .get(&id)
            .is_some_and(|p| p.role == PeerRole::Trunk)
    }

    /// The simulcast layer cap for `track` as received by `sub` (from its subscription).
    fn layer_cap(&self, sub: PeerId, track: &TrackKey) -> u8 {
        let (Some(peer), Some(p)) = (self.peers.get(&sub), self.tracks.get(track)) else {
            return u8::MAX;
        };
        size_cap(&peer.explicit, p)
    }

    /// Replace what `id` receives with `subscriptions` (an explicit set from now on).
    fn subscribe(&mut self, id: PeerId, subscriptions: Vec<Subscription>, now: Instant) {
        let Some(peer) = self.peers.get_mut(&id) else {
            return;
        };
        peer.explicit = Some(subscriptions);
        peer.desired.clear();
        let conference = peer.conference;
        let candidates: Vec<TrackKey> = self
            .conferences
            .get(&conference)
            .into_iter()
            .flatten()
            .filter(|p| **p != id)
            .filter_map(|p| self.peers.get(p))
            .flat_map(|p| p.published.values().copied())
            .collect();
        for t in candidates {
            self.want(id, t);
        }
        self.maybe_offer(id);
        // Caps may have changed for tracks already forwarded.
        let forwarded: Vec<TrackKey> = self
            .peers
            .get(&id)
            .map(|p| p.out.keys().copied().collect())
            .unwrap_or_default();
        for t in forwarded {
            if self.carries_layers(id, &t) {
                self.sync_trunk_layers(id, &t, now);
                continue;
            }
            let cap = self.layer_cap(id, &t);
            let best = self
                .tracks
                .get(&t)
                .and_then(|p| p.activity.best_active_capped(now, cap));
            if let Some(layer) = best {
                self.retarget(id, &t, layer, now);
            }
        }
    }

    fn send_data(&mut self, id: PeerId, text: &str) {
        let Some(peer) = self.peers.get_mut(&id) else {
            return;
        };
        let sent = peer
            .channel
            .and_then(|c| peer.rtc.channel(c))
            .is_some_and(|mut ch| ch.write(false, text.as_bytes()).unwrap_or(false));
        if sent {
            self.mark_dirty(id);
        } else {
            self.counters.drop(DropReason::DataChannel);
        }
    }

    /// Make an offer to `id` if what it should receive differs from what is negotiated and no
    /// offer is outstanding (one negotiation at a time per peer).
    fn maybe_offer(&mut self, id: PeerId) {
        let prev = self.current.replace(id);
        self.maybe_offer_inner(id);
        self.current = prev;
    }

    fn maybe_offer_inner(&mut self, id: PeerId) {
        let Some(peer) = self.peers.get(&id) else {
            return;
        };
        if peer.pending.is_some() {
            return;
        }
        // A trunk receives a simulcast track as simulcast, under the publisher's rids.
        let simulcast: HashMap<TrackKey, Vec<Rid>> = if peer.role == PeerRole::Trunk {
            peer.desired
                .iter()
                .filter(|(t, (kind, _, _))| *kind == TrackKind::Video && !peer.out.contains_key(t))
                .filter_map(|(t, _)| Some((*t, self.source_rids(t)?)))
                .collect()
        } else {
            HashMap::new()
        };
        let Some(peer) = self.peers.get_mut(&id) else {
            return;
        };
        let mut api = peer.rtc.sdp_api();
        let mut added = Vec::new();
        for (track, (kind, stream_id, track_id)) in &peer.desired {
            if peer.out.contains_key(track) {
                continue;
            }
            let media_kind = match kind {
                TrackKind::Audio => MediaKind::Audio,
                TrackKind::Video => MediaKind::Video,
            };
            let rids = simulcast.get(track).cloned().unwrap_or_default();
            let layers = (!rids.is_empty()).then(|| {
                let mut s = Simulcast::new();
                for r in &rids {
                    s.add_send_layer(SimulcastLayer::new(r));
                }
                s
            });
            let mid = api.add_media(
                media_kind,
                Direction::SendOnly,
                Some(stream_id.clone()),
                Some(track_id.clone()),
                layers,
            );
            added.push((*track, mid, rids));
        }
        // A withdrawn track's m-line is stopped, not set inactive: its slot can then be
        // recycled for a later track, so the SDP (and the to-device event carrying it, which
        // Synapse caps at 64 KiB) stays bounded however many participants come and go.
        let mut withdrawn = Vec::new();
        for (track, out) in &peer.out {
            if !peer.desired.contains_key(track) {
                api.stop_media(out.mid);
                withdrawn.push(*track);
            }
        }
        if !api.has_changes() {
            return;
        }
        let Some((offer, pending)) = api.apply() else {
            return;
        };
        for (_, mid, _) in &added {
            peer.own_mids.insert(mid.to_string());
        }
        for track in &withdrawn {
            if let Some(out) = peer.out.remove(track) {
                peer.out_by_mid.remove(&out.mid);
                peer.own_mids.remove(&out.mid.to_string());
            }
        }
        let mut tracks: Vec<ForwardedTrack> = peer
            .out
            .iter()
            .map(|(t, o)| ForwardedTrack {
                publisher: t.publisher,
                kind: o.kind,
                stream_id: o.stream_id.clone(),
                track_id: o.track_id.clone(),
            })
            .collect();
        for (t, _, _) in &added {
            let (kind, stream_id, track_id) = peer.desired[t].clone();
            tracks.push(ForwardedTrack {
                publisher: t.publisher,
                kind,
                stream_id,
                track_id,
            });
        }
        let sdp = offer.to_sdp_string();
        peer.pending = Some(PendingNegotiation {
            offer: pending,
            added,
            mids: engine::mids(&sdp),
        });
        for track in withdrawn {
            if let Some(p) = self.tracks.get_mut(&track) {
                p.subscribers.retain(|s| *s != id);
            }
        }
        self.mark_dirty(id);
        self.emit(SfuEvent::Offer {
            peer: id,
            sdp,
            tracks,
        });
    }

    /// The simulcast rids a published track arrives with, if it is simulcast.
    fn source_rids(&self, track: &TrackKey) -> Option<Vec<Rid>> {
        let media = self.peers.get(&track.publisher)?.rtc.media(track.mid)?;
        match media.rids_rx() {
            Rids::Specific(v) if !v.is_empty() => Some(v.clone()),
            _ => None,
        }
    }

    fn start_forwarding(
        &mut self,
        id: PeerId,
        track: TrackKey,
        mid: Mid,
        rids: Vec<Rid>,
        now: Instant,
    ) {
        let Some(peer) = self.peers.get_mut(&id) else {
            return;
        };
        let Some((kind, stream_id, track_id)) = peer.desired.get(&track).cloned() else {
            return; // withdrawn while the offer was out; the next offer deactivates it
        };
        let clock_rate = if kind == TrackKind::Audio {
            48_000
        } else {
            90_000
        };
        let first_seq: u16 = rand::random::<u16>() % 16_384;
        let first_ts: u32 = rand::random();
        peer.out.insert(
            track,
            OutTrack {
                mid,
                kind,
                stream_id,
                track_id,
                rewriter: SeqTsRewriter::new(clock_rate, first_seq, first_ts),
                layers: LayerSelector::default(),
                pt_map: Vec::new(),
                trunk: (!rids.is_empty()).then(|| {
                    TrunkLayers::new(&rids, clock_rate, || {
                        (rand::random::<u16>() % 16_384, rand::random())
                    })
                }),
            },
        );
        peer.out_by_mid.insert(mid, track);
        if let Some(p) = self.tracks.get_mut(&track) {
            if !p.subscribers.contains(&id) {
                p.subscribers.push(id);
            }
        }
        if !rids.is_empty() {
            self.sync_trunk_layers(id, &track, now);
            return;
        }
        // Start on the best layer flowing now; if none flows yet, the first packet decides.
        let cap = self.layer_cap(id, &track);
        let best = self
            .tracks
            .get(&track)
            .and_then(|p| p.activity.best_active_capped(now, cap));
        if let Some(layer) = best {
            self.retarget(id, &track, layer, now);
        }
    }

    /// Point a subscriber's copy of a track at `layer`, asking for the keyframe it needs.
    fn retarget(&mut self, sub: PeerId, track: &TrackKey, layer: Option<Rid>, now: Instant) {
        let needs_keyframe = self
            .peers
            .get_mut(&sub)
            .and_then(|p| p.out.get_mut(track))
            .is_some_and(|o| o.kind == TrackKind::Video && o.layers.set_target(layer, now));
        if needs_keyframe {
            self.request_keyframe(track, layer, now);
        }
    }

    /// Whether `sub` receives `track` as simulcast (a trunk), rather than one layer at a time.
    fn carries_layers(&self, sub: PeerId, track: &TrackKey) -> bool {
        self.peers
            .get(&sub)
            .and_then(|p| p.out.get(track))
            .is_some_and(|o| o.trunk.is_some())
    }

    /// The layers of `track` a trunk carries: for each size its far side subscribed at, the
    /// best layer flowing now within that size. Newly carried layers get a keyframe request.
    fn sync_trunk_layers(&mut self, sub: PeerId, track: &TrackKey, now: Instant) {
        let (Some(peer), Some(p)) = (self.peers.get(&sub), self.tracks.get(track)) else {
            return;
        };
        let mut wanted: Vec<Rid> = Vec::new();
        for s in peer.explicit.iter().flatten() {
            if s.stream_id != p.stream_id || s.track_id != p.track_id {
                continue;
            }
            if let Some(Some(rid)) = p.activity.best_active_capped(now, s.max_rank()) {
                if !wanted.contains(&rid) {
                    wanted.push(rid);
                }
            }
        }
        let added = self
            .peers
            .get_mut(&sub)
            .and_then(|p| p.out.get_mut(track))
            .and_then(|o| o.trunk.as_mut())
            .map(|t| t.set_wanted(&wanted))
            .unwrap_or_default();
        for rid in added {
            self.request_keyframe(track, Some(rid), now);
        }
    }

    // ---------------------------------------------------------------- network input

    fn handle_datagram(&mut self, from: SocketAddr, data: &[u8], now: Instant) {
        self.counters.datagrams_in += 1;
        self.counters.bytes_in += data.len() as u64;
        let receive = match Receive::new(Protocol::Udp, from, self.local_addr, data) {
            Ok(r) => r,
            Err(_) => {
                self.counters.drop(DropReason::Malformed);
                return;
            }
        };
        let input = Input::Receive(now, receive);
        let id = match self.by_addr.get(&from) {
            Some(id) => *id,
            None => {
                // A new 5-tuple: only a STUN message a peer's engine accepts (a check with its
                // credentials, or an answer to one of its own checks) introduces it. A check
                // names its peer by our ufrag, so only that peer is asked. A message without
                // one (a response) can only be for a peer that sends checks itself: a trunk
                // we dialled. Anything else costs one comparison or one lookup.
                if data.first().is_none_or(|b| *b > 3) {
                    self.counters.drop(DropReason::UnknownSource);
                    return;
                }
                let found = match stun::local_ufrag(data) {
                    Some(ufrag) => self
                        .by_ufrag
                        .get(ufrag)
                        .copied()
                        .filter(|id| self.peers.get(id).is_some_and(|p| p.rtc.accepts(&input))),
                    None => self
                        .peers
                        .iter()
                        .filter(|(_, p)| p.role == PeerRole::Trunk && !p.polite)
                        .find(|(_, p)| p.rtc.accepts(&input))
                        .map(|(id, _)| *id),
                };
                match found {
                    Some(id) => {
                        self.by_addr.insert(from, id);
                        if let Some(p) = self.peers.get_mut(&id) {
                            p.addrs.push(from);
                            // A peer that keeps moving (or forges checks from many ports
                            // with its own credentials) keeps only its latest addresses.
                            if p.addrs.len() > MAX_ADDRS_PER_PEER {
                                let old = p.addrs.remove(0);
                                self.by_addr.remove(&old);
                            }
                        }
                        id
                    }
                    None => {
                        self.counters.drop(DropReason::UnknownSource);
                        return;
                    }
                }
            }
        };
        let Some(peer) = self.peers.get_mut(&id) else {
            return;
        };
        peer.last_rx = now;
        let prev = self.current.replace(id);
        if let Err(e) = peer.rtc.handle_input(input) {
            debug!(%id, error = %e, "engine rejected input");
            self.counters.drop(DropReason::Malformed);
        }
        // In RTP mode the engine holds only one received packet until the next poll, so drain
        // this peer before feeding it the next datagram. Subscribers written to meanwhile are
        // marked dirty and drained once per batch.
        self.drain_peer(id);
        self.current = prev;
    }

    /// Queue a peer for draining (once: a flag on the peer, not a search of the list, since
    /// fan-out marks every subscriber for every packet).
    fn mark_dirty(&mut self, id: PeerId) {
        if let Some(p) = self.peers.get_mut(&id) {
            if !p.dirty {
                p.dirty = true;
                self.dirty.push(id);
            }
        }
    }

    /// Drain engine output of every touched peer. Forwarding touches subscribers, which are
    /// drained in the same pass.
    fn drain_dirty(&mut self) {
        while let Some(id) = self.dirty.pop() {
            if let Some(p) = self.peers.get_mut(&id) {
                p.dirty = false;
            }
            self.drain_peer(id);
        }
    }

    fn drain_peer(&mut self, id: PeerId) {
        let prev = self.current.replace(id);
        self.drain_peer_inner(id);
        self.current = prev;
    }

    fn drain_peer_inner(&mut self, id: PeerId) {
        loop {
            let Some(peer) = self.peers.get_mut(&id) else {
                return;
            };
            let out = match peer.rtc.poll_output() {
                Ok(o) => o,
                Err(e) => {
                    self.close_peer(id, CloseReason::EngineError(e.to_string()));
                    return;
                }
            };
            match out {
                Output::Timeout(t) => {
                    // One heap entry per distinct deadline: draining after every packet
                    // returns the same deadline again and again.
                    if peer.timeout != Some(t) {
                        peer.timeout = Some(t);
                        self.timers.push(Reverse((t, id)));
                    }
                    if !peer.rtc.is_alive() {
                        self.close_peer(id, CloseReason::Disconnected);
                    }
                    return;
                }
                Output::Transmit(t) => {
                    self.sendq.push(t.destination, &t.contents);
                }
                Output::Event(e) => self.handle_event(id, e),
            }
        }
    }

    fn handle_event(&mut self, id: PeerId, event: Event) {
        let now = Instant::now();
        match event {
            Event::Connected => {
                if let Some(p) = self.peers.get_mut(&id) {
                    p.connected = true;
                }
                info!(shard = self.index, %id, "peer connected");
                self.emit(SfuEvent::Connected { peer: id });
            }
            Event::MediaAdded(m) if m.direction.is_receiving() => {
                self.publish(id, m.mid, m.kind);
            }
            Event::MediaChanged(m) => {
                let published = self
                    .peers
                    .get(&id)
                    .is_some_and(|p| p.published.contains_key(&m.mid));
                if m.direction.is_receiving() && !published {
                    let kind = self
                        .peers
                        .get(&id)
                        .and_then(|p| p.rtc.media(m.mid))
                        .map(|m| m.kind());
                    if let Some(kind) = kind {
                        self.publish(id, m.mid, kind);
                    }
                } else if !m.direction.is_receiving() && published {
                    self.unpublish(id, m.mid);
                }
            }
            Event::RtpPacket(pkt) => self.forward(id, pkt, now),
            Event::KeyframeRequest(req) => {
                let track = self
                    .peers
                    .get(&id)
                    .and_then(|p| p.out_by_mid.get(&req.mid))
                    .cloned();
                if let Some(track) = track {
                    if self.carries_layers(id, &track) {
                        // A far focus asks for the layer it names.
                        if req.rid.is_some() {
                            self.request_keyframe(&track, req.rid, now);
                        }
                        return;
                    }
                    // Forward to the layer this subscriber receives (or is about to).
                    let layer = self
                        .peers
                        .get(&id)
                        .and_then(|p| p.out.get(&track))
                        .and_then(|o| o.layers.current().or(o.layers.target()));
                    if let Some(layer) = layer {
                        self.request_keyframe(&track, layer, now);
                    }
                }
            }
            Event::Closed => self.close_peer(id, CloseReason::Disconnected),
            Event::ChannelOpen(cid, _label) => {
                // The first channel the participant opens carries MSC3898 messages.
                let first = self
                    .peers
                    .get_mut(&id)
                    .is_some_and(|p| p.channel.replace(p.channel.unwrap_or(cid)).is_none());
                if first {
                    self.emit(SfuEvent::ChannelOpen { peer: id });
                }
            }
            Event::ChannelData(d) => {
                let within_budget = self
                    .peers
                    .get_mut(&id)
                    .is_some_and(|p| p.data_budget.allow(now));
                if !within_budget {
                    self.counters.drop(DropReason::DataChannelFlood);
                } else if d.binary || d.data.len() > MAX_DATA_MESSAGE {
                    self.counters.drop(DropReason::DataChannel);
                } else {
                    match String::from_utf8(d.data) {
                        Ok(text) => self.emit(SfuEvent::DataMessage { peer: id, text }),
                        Err(_) => self.counters.drop(DropReason::DataChannel),
                    }
                }
            }
            Event::IceConnectionStateChange(s) => debug!(%id, state = ?s, "ice state"),
            _ => {}
        }
    }

    fn publish(&mut self, id: PeerId, mid: Mid, kind: MediaKind) {
        let Some(peer) = self.peers.get_mut(&id) else {
            return;
        };
        if peer.own_mids.contains(&mid.to_string()) {
            return; // a participant sending on an m-line weir created: not supported yet
        }
        let Some(media) = peer.rtc.media(mid) else {
            return;
        };
        let kind = match kind {
            MediaKind::Audio => TrackKind::Audio,
            MediaKind::Video => TrackKind::Video,
        };
        let track = PublishedTrack {
            mid: MediaId(mid.to_string()),
            kind,
            stream_id: media.stream_id().to_string(),
            track_id: media.track_id().to_string(),
        };
        let tref = TrackKey { publisher: id, mid };
        peer.published.insert(mid, tref);
        let conference = peer.conference;
        self.tracks.insert(
            tref,
            Published {
                kind,
                stream_id: track.stream_id.clone(),
                track_id: track.track_id.clone(),
                activity: LayerActivity::default(),
                keyframes: Vec::new(),
                subscribers: Vec::new(),
            },
        );
        info!(shard = self.index, %id, mid = %mid, %kind, stream = %track.stream_id, "track published");
        self.emit(SfuEvent::TrackPublished { peer: id, track });
        let others: Vec<PeerId> = self.conferences[&conference]
            .iter()
            .copied()
            .filter(|p| *p != id)
            .collect();
        for other in others {
            self.want(other, tref);
            self.offer_soon(other);
        }
    }

    fn unpublish(&mut self, id: PeerId, mid: Mid) {
        let Some(peer) = self.peers.get_mut(&id) else {
            return;
        };
        let Some(tref) = peer.published.remove(&mid) else {
            return;
        };
        peer.ssrc_mid.retain(|_, (m, _)| *m != mid);
        let conference = peer.conference;
        self.tracks.remove(&tref);
        self.emit(SfuEvent::TrackUnpublished {
            peer: id,
            mid: MediaId(tref.mid.to_string()),
        });
        let others: Vec<PeerId> = self
            .conferences
            .get(&conference)
            .cloned()
            .unwrap_or_default();
        for other in others {
            if let Some(p) = self.peers.get_mut(&other) {
                if p.desired.remove(&tref).is_some() {
                    self.offer_soon(other);
                }
            }
        }
    }

    // ---------------------------------------------------------------- forwarding

    fn forward(&mut self, id: PeerId, pkt: RtpPacket, now: Instant) {
        self.counters.rtp_in += 1;
        let ssrc = pkt.header.ssrc;
        let Some(peer) = self.peers.get_mut(&id) else {
            return;
        };
        let (mid, rid) = match peer.ssrc_mid.get(&ssrc) {
            Some(m) => *m,
            None => {
                let found = peer
                    .rtc
                    .direct_api()
                    .stream_rx(&ssrc)
                    .map(|s| (s.mid(), s.rid()));
                let Some(found) = found else {
                    self.counters.drop(DropReason::UnknownStream);
                    return;
                };
                peer.ssrc_mid.insert(ssrc, found);
                found
            }
        };
        let Some(track) = peer.published.get(&mid).cloned() else {
            self.counters.drop(DropReason::UnknownStream);
            return;
        };
        if pkt.payload.is_empty() {
            self.counters.drop(DropReason::Padding);
            return;
        }
        if peer.role == PeerRole::Trunk {
            self.counters.trunk.packets_in += 1;
            self.counters.trunk.payload_bytes_in += pkt.payload.len() as u64;
        }
        let pt = pkt.header.payload_type;
        let spec = peer
            .rtc
            .codec_config()
            .params()
            .iter()
            .find(|p| p.pt() == pt)
            .copied();
        let Some(params) = spec else {
            self.counters.drop(DropReason::UnknownPayloadType);
            return;
        };
        let Some(published) = self.tracks.get_mut(&track) else {
            return;
        };
        // By this packet's own codec: a publisher may switch codecs on one m-line.
        let keyframe = published.kind == TrackKind::Video
            && starts_keyframe(engine::video_codec(params.spec().codec), &pkt.payload);
        let is_video = published.kind == TrackKind::Video;
        published.activity.saw(rid, rid_rank(rid.as_deref()), now);
        if keyframe {
            if let Some((_, k)) = published.keyframes.iter_mut().find(|(l, _)| *l == rid) {
                k.keyframe_received();
            }
        }
        // Header extensions a subscriber can use; mid/rid, transport-cc and abs-send-time are
        // per hop and the engine writes its own.
        let ext = ExtensionValues {
            audio_level: pkt.header.ext_vals.audio_level,
            voice_activity: pkt.header.ext_vals.voice_activity,
            video_orientation: pkt.header.ext_vals.video_orientation,
            video_content_type: pkt.header.ext_vals.video_content_type,
            ..Default::default()
        };
        let nackable = is_video;
        let mut need_keyframe: Vec<Option<Rid>> = Vec::new();
        let mut untargeted: Vec<PeerId> = Vec::new();
        let subscribers = std::mem::take(&mut published.subscribers);
        for sub in &subscribers {
            let Some(speer) = self.peers.get_mut(sub) else {
                continue;
            };
            let Some(out) = speer.out.get_mut(&track) else {
                continue;
            };
            // A trunk carrying this track as simulcast: the layer decides in `trunk` below.
            if out.trunk.is_some() {
                if rid.is_none() {
                    continue;
                }
            } else if out.layers.target().is_none() {
                if is_video {
                    // Layers became known only now: choose after this packet.
                    untargeted.push(*sub);
                    continue;
                }
                out.layers.set_target(rid, now);
            }
            if out.trunk.is_none() {
                match out.layers.on_packet(rid, keyframe || !is_video) {
                    Decision::Forward | Decision::Switch => {}
                    Decision::Skip => {
                        if out.layers.current().is_none() && out.layers.target() == Some(rid) {
                            self.counters.drop(DropReason::AwaitingKeyframe);
                        }
                        if let Some(layer) = out.layers.keyframe_overdue(now, KEYFRAME_WAIT_RETRY) {
                            need_keyframe.push(layer);
                        }
                        continue;
                    }
                }
            }
            let out_pt = match out.pt_map.iter().find(|(i, _)| *i == pt) {
                Some((_, o)) => *o,
                None => {
                    let o = speer
                        .rtc
                        .codec_config()
                        .match_params(params)
                        .map(|p| p.pt());
                    out.pt_map.push((pt, o));
                    o
                }
            };
            let Some(out_pt) = out_pt else {
                self.counters.drop(DropReason::NoCommonCodec);
                continue;
            };
            let (seq, ts, tx_rid) = if let Some(tl) = out.trunk.as_mut() {
                let Some(r) = rid else { continue };
                let (seq_in, ts_in) = (*pkt.seq_no, pkt.header.timestamp);
                match tl.on_packet(r, keyframe, *ssrc, seq_in, ts_in, now) {
                    Some((seq, ts)) => (seq, ts, rid),
                    None => continue,
                }
            } else {
                match out
                    .rewriter
                    .rewrite(*ssrc, *pkt.seq_no, pkt.header.timestamp, now)
                {
                    Rewritten::Send { seq, ts } => (seq, ts, None),
                    Rewritten::DropStale => {
                        self.counters.drop(DropReason::Stale);
                        continue;
                    }
                }
            };
            let mid = out.mid;
            // A panic in the subscriber's engine is the subscriber's.
            let publisher = self.current.replace(*sub);
            let mut api = speer.rtc.direct_api();
            debug_assert!(out.trunk.is_some() || out.layers.current() == Some(rid));
            let Some(tx) = api.stream_tx_by_mid(mid, tx_rid) else {
                self.current = publisher;
                self.counters.drop(DropReason::NoSendStream);
                continue;
            };
            tx.write_rtp(
                RtpWrite::new(out_pt, seq.into(), ts, pkt.timestamp, pkt.payload.clone())
                    .marker(pkt.header.marker)
                    .ext_vals(ext.clone())
                    .nackable(nackable),
            );
            self.current = publisher;
            self.counters.rtp_forwarded += 1;
            if speer.role == PeerRole::Trunk {
                self.counters.trunk.packets_out += 1;
                self.counters.trunk.payload_bytes_out += pkt.payload.len() as u64;
            }
            if !speer.dirty {
                speer.dirty = true;
                self.dirty.push(*sub);
            }
        }
        if let Some(published) = self.tracks.get_mut(&track) {
            published.subscribers = subscribers;
        }
        for layer in need_keyframe {
            self.request_keyframe(&track, layer, now);
        }
        for sub in untargeted {
            let cap = self.layer_cap(sub, &track);
            let best = self
                .tracks
                .get(&track)
                .and_then(|p| p.activity.best_active_capped(now, cap))
                .unwrap_or(rid);
            self.retarget(sub, &track, best, now);
        }
    }

    /// Ask the publisher for a keyframe of one layer, coalesced with other requests for it.
    fn request_keyframe(&mut self, track: &TrackKey, layer: Option<Rid>, now: Instant) {
        let Some(p) = self.tracks.get_mut(track) else {
            return;
        };
        if p.kind != TrackKind::Video {
            return;
        }
        let k = match p.keyframes.iter().position(|(l, _)| *l == layer) {
            Some(i) => &mut p.keyframes[i].1,
            None => {
                p.keyframes.push((layer, KeyframeRequests::default()));
                &mut p.keyframes.last_mut().expect("just pushed").1
            }
        };
        if k.request(now) {
            self.send_pli(track, layer);
        }
    }

    fn send_pli(&mut self, track: &TrackKey, layer: Option<Rid>) {
        let Some(peer) = self.peers.get_mut(&track.publisher) else {
            return;
        };
        let Some(mid) = peer
            .published
            .iter()
            .find(|(_, t)| *t == track)
            .map(|(m, _)| *m)
        else {
            return;
        };
        if let Some(rx) = peer.rtc.direct_api().stream_rx_by_mid(mid, layer) {
            rx.request_keyframe(KeyframeRequestKind::Pli);
            self.counters.keyframe_requests += 1;
        }
        let publisher = track.publisher;
        self.mark_dirty(publisher);
    }

    // ---------------------------------------------------------------- time

    fn fire_timers(&mut self, now: Instant) {
        while let Some(Reverse((t, id))) = self.timers.peek().copied() {
            if t > now {
                break;
            }
            self.timers.pop();
            let Some(peer) = self.peers.get_mut(&id) else {
                continue;
            };
            if peer.timeout != Some(t) {
                continue; // superseded by a later poll
            }
            peer.timeout = None;
            self.counters.engine_timeouts += 1;
            self.current = Some(id);
            if let Err(e) = peer.rtc.handle_input(Input::Timeout(now)) {
                self.close_peer(id, CloseReason::EngineError(e.to_string()));
                self.current = None;
                continue;
            }
            self.drain_peer(id);
            self.current = None;
        }
        self.drain_dirty();
    }

    fn housekeeping(&mut self, now: Instant) {
        // Superseded deadlines stay in the heap until they fall due; a peer whose deadline
        // keeps moving out would grow it. Rebuild from the live deadlines when it bloats.
        if self.timers.len() > 4 * self.peers.len() + 64 {
            self.timers = self
                .peers
                .iter()
                .filter_map(|(id, p)| p.timeout.map(|t| Reverse((t, *id))))
                .collect();
        }
        let mut dead = Vec::new();
        for (id, p) in &self.peers {
            if !p.connected
                && now.saturating_duration_since(p.created_at) > self.config.connect_timeout
            {
                dead.push((*id, CloseReason::ConnectTimeout));
            } else if p.connected
                && now.saturating_duration_since(p.last_rx) > self.config.silence_timeout
            {
                dead.push((*id, CloseReason::Silent));
            }
        }
        for (id, reason) in dead {
            self.close_peer(id, reason);
        }
        let mut owed: Vec<(TrackKey, Option<Rid>)> = Vec::new();
        let mut moves: Vec<(PeerId, TrackKey, Option<Rid>)> = Vec::new();
        let mut trunk_layers: Vec<(PeerId, TrackKey)> = Vec::new();
        let mut awaiting: Vec<(TrackKey, Rid)> = Vec::new();
        for (t, p) in &mut self.tracks {
            for (layer, k) in &mut p.keyframes {
                if k.poll(now) {
                    owed.push((*t, *layer));
                }
            }
            // Follow the best layer that flows: down when the current one stalls, back up when
            // a better one returns. (Size- and bandwidth-aware choice comes with allocation.)
            if p.kind != TrackKind::Video {
                continue;
            }
            for sub in &p.subscribers {
                let Some(speer) = self.peers.get(sub) else {
                    continue;
                };
                if let Some(tl) = speer.out.get(t).and_then(|o| o.trunk.as_ref()) {
                    trunk_layers.push((*sub, *t));
                    // A layer whose keyframe request went unanswered is asked for again
                    // (coalesced per layer like every request).
                    awaiting.extend(
                        tl.wanted()
                            .filter(|l| tl.awaiting_keyframe(*l))
                            .map(|l| (*t, l)),
                    );
                    continue;
                }
                let cap = size_cap(&speer.explicit, p);
                let Some(best) = p.activity.best_active_capped(now, cap) else {
                    continue;
                };
                let target = speer.out.get(t).and_then(|o| o.layers.target());
                if target.is_some() && target != Some(best) {
                    moves.push((*sub, *t, best));
                }
            }
        }
        for (t, layer) in owed {
            self.send_pli(&t, layer);
        }
        for (sub, t, layer) in moves {
            self.retarget(sub, &t, layer, now);
        }
        for (sub, t) in trunk_layers {
            self.sync_trunk_layers(sub, &t, now);
        }
        for (t, layer) in awaiting {
            self.request_keyframe(&t, Some(layer), now);
        }
        self.drain_dirty();
        self.counters.trunk.streams_out = self
            .peers
            .values()
            .filter(|p| p.role == PeerRole::Trunk)
            .flat_map(|p| p.out.values())
            .map(|o| o.trunk.as_ref().map_or(1, |t| t.wanted().count() as u64))
            .sum();
        let tracks = self.tracks.len() as u64;
        self.counters.publish(
            &self.stats,
            self.peers.len() as u64,
            self.conferences.len() as u64,
            tracks,
        );
    }

    fn flush(&mut self) {
        if self.sendq.is_empty() {
            return;
        }
        let st = self.sendq.flush(&self.socket);
        self.counters.datagrams_out += st.datagrams;
        self.counters.bytes_out += st.bytes;
        self.counters.send_calls += st.messages;
        for _ in 0..st.dropped {
            self.counters.drop(DropReason::SendFailed);
        }
    }

    // ---------------------------------------------------------------- teardown

    fn close_peer(&mut self, id: PeerId, reason: CloseReason) {
        let Some(mut peer) = self.peers.remove(&id) else {
            return;
        };
        // A graceful close queues RTCP BYE and DTLS close_notify, so the other side learns at
        // once that the call ended instead of timing out. Drained right away (bounded: a
        // closing engine yields a handful of datagrams), then the engine is dropped.
        if peer.connected && !peer.poisoned && peer.rtc.close().is_ok() {
            let _ = peer.rtc.handle_input(Input::Timeout(Instant::now()));
            for _ in 0..CLOSE_DRAIN_OUTPUTS {
                match peer.rtc.poll_output() {
                    Ok(Output::Transmit(t)) => self.sendq.push(t.destination, &t.contents),
                    Ok(Output::Event(_)) => {}
                    Ok(Output::Timeout(_)) | Err(_) => break,
                }
            }
        }
        peer.rtc.disconnect();
        for a in &peer.addrs {
            self.by_addr.remove(a);
        }
        self.by_ufrag.retain(|_, p| *p != id);
        self.dirty.retain(|d| *d != id);
        for track in peer.out.keys() {
            if let Some(p) = self.tracks.get_mut(track) {
                p.subscribers.retain(|s| *s != id);
            }
        }
        if let Some(members) = self.conferences.get_mut(&peer.conference) {
            members.retain(|m| *m != id);
            if members.is_empty() {
                self.conferences.remove(&peer.conference);
            }
        }
        let published: Vec<TrackKey> = peer.published.into_values().collect();
        let others: Vec<PeerId> = self
            .conferences
            .get(&peer.conference)
            .cloned()
            .unwrap_or_default();
        for tref in &published {
            self.tracks.remove(tref);
        }
        for other in others {
            let mut changed = false;
            if let Some(p) = self.peers.get_mut(&other) {
                for tref in &published {
                    changed |= p.desired.remove(tref).is_some();
                }
            }
            if changed {
                self.offer_soon(other);
            }
        }
        info!(shard = self.index, %id, ?reason, "peer closed");
        self.emit(SfuEvent::PeerClosed { peer: id, reason });
    }
}

/// The best layer rank worth sending a participant: everything without a subscription, else
/// the largest of the sizes it asked for the track at.
fn size_cap(explicit: &Option<Vec<Subscription>>, p: &Published) -> u8 {
    match explicit {
        None => u8::MAX,
        Some(subs) => subs
            .iter()
            .filter(|s| s.stream_id == p.stream_id && s.track_id == p.track_id)
            .map(Subscription::max_rank)
            .max()
            .unwrap_or(u8::MAX),
    }
}

fn first_mid(sdp: &str) -> Option<String> {
    sdp.lines()
        .find_map(|l| l.strip_prefix("a=mid:"))
        .map(|m| m.trim().to_string())
}
