//! The core's interface to its thread: commands, datagrams and time in; datagrams, events and
//! the next deadline out. No socket and no clock here: every input carries its `now`.

use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use crate::api::{CloseReason, Command, SfuConfig, SfuEvent};
use crate::net::{SendQueue, SendStats};
use crate::stats::{DropReason, ShardCounters, ShardStats};

use super::timers::HOUSEKEEPING_INTERVAL;
use super::{EventSink, FastMap, ShardCore, SpreadMessage, MAX_SCREENS};

/// Entry counts of a core's maps ([`ShardCore::sizes`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CoreSizes {
    pub peers: usize,
    pub conferences: usize,
    pub tracks: usize,
    /// Source addresses known (each maps to its peer).
    pub addresses: usize,
    pub ufrags: usize,
    /// Engine deadlines queued, live or superseded.
    pub timers: usize,
    /// (track, subscriber) pairs being forwarded.
    pub subscriptions: usize,
    /// Conferences whose speech activity is tracked.
    pub speaker_conferences: usize,
}

impl<S: EventSink> ShardCore<S> {
    /// A core for shard `index`, whose socket is bound to `local_addr`.
    pub fn new(
        index: usize,
        config: SfuConfig,
        local_addr: SocketAddr,
        events: S,
        stats: Arc<ShardStats>,
        now: Instant,
    ) -> Self {
        ShardCore {
            index,
            ice_local: super::demux::IceLocal::new(local_addr, &config.advertise_ips),
            config,
            local_addr,
            events,
            peers: FastMap::default(),
            conferences: FastMap::default(),
            tracks: FastMap::default(),
            by_addr: HashMap::new(),
            by_ufrag: FastMap::default(),
            timers: BinaryHeap::new(),
            dirty: Vec::new(),
            transmits: SendQueue::default(),
            tcp_transmits: SendQueue::without_gso(),
            foreign: HashMap::new(),
            outgoing: Vec::new(),
            counters: ShardCounters::default(),
            stats,
            next_housekeeping: now,
            keyframes_due: None,
            speakers: FastMap::default(),
            spans: FastMap::default(),
            relayed_since: None,
            offers_due: Vec::new(),
            current: None,
        }
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Apply one command from the control plane.
    pub fn handle_command(&mut self, cmd: Command, now: Instant) {
        let prev = self.current.replace(cmd.peer());
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
            Command::RemoteOffer { peer, sdp } => self.remote_offer(peer, &sdp, now),
            Command::RemoteAnswer { peer, sdp } => self.remote_answer(peer, &sdp, now),
            Command::ClosePeer { peer } => self.close_peer(peer, CloseReason::Requested, now),
            Command::Subscribe {
                peer,
                subscriptions,
            } => {
                self.subscribe(peer, subscriptions, now);
                // A layer someone now needs is switched on without waiting for housekeeping.
                self.update_dynacast(now);
            }
            Command::SendData { peer, text } => {
                self.send_data(peer, &text);
            }
            Command::Screens { peer, streams } => {
                if let Some(p) = self.peers.get_mut(&peer) {
                    // Bounded like the metadata it comes from.
                    p.screens = streams.into_iter().take(MAX_SCREENS).collect();
                    let (conference, streams) = (p.conference, p.screens.clone());
                    let msg = SpreadMessage::Screens {
                        publisher: peer,
                        streams,
                    };
                    self.tell_span(conference, msg);
                }
            }
        }
        self.current = prev;
    }

    /// The end of a turn, after its datagrams: drain what they touched, fire due engine
    /// timers, housekeeping when due, and the offers the turn made necessary.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.current = None;
        self.drain_dirty(now);
        self.fire_timers(now);
        if self.keyframes_due.is_some_and(|t| now >= t) {
            self.send_owed_keyframe_requests(now);
        }
        if now >= self.next_housekeeping {
            self.housekeeping(now);
            self.next_housekeeping = now + HOUSEKEEPING_INTERVAL;
        }
        self.make_due_offers(now);
    }

    /// When [`ShardCore::handle_timeout`] is next due (an engine deadline or housekeeping).
    pub fn next_deadline(&self) -> Instant {
        self.timers
            .peek()
            .map(|std::cmp::Reverse((t, _))| *t)
            .unwrap_or(self.next_housekeeping)
            .min(self.next_housekeeping)
            .min(self.keyframes_due.unwrap_or(self.next_housekeeping))
    }

    /// Hand the queued datagrams to `send` (the thread's socket), counting what it did.
    pub fn flush(&mut self, send: impl FnOnce(&mut SendQueue) -> SendStats) {
        if self.transmits.is_empty() {
            return;
        }
        let st = send(&mut self.transmits);
        self.counters.datagrams_out += st.datagrams;
        self.counters.bytes_out += st.bytes;
        self.counters.send_calls += st.messages;
        for _ in 0..st.dropped {
            self.counters.drop(DropReason::SendFailed);
        }
    }

    /// How many entries the core's maps hold: what a long-running shard must not accumulate.
    pub fn sizes(&self) -> CoreSizes {
        CoreSizes {
            peers: self.peers.len(),
            conferences: self.conferences.len(),
            tracks: self.tracks.len(),
            addresses: self.by_addr.len(),
            ufrags: self.by_ufrag.len(),
            timers: self.timers.len(),
            subscriptions: self.tracks.values().map(|t| t.subscribers.len()).sum(),
            speaker_conferences: self.speakers.len(),
        }
    }

    /// The latest estimate of the bandwidth toward `peer` in bits/s, when estimating
    /// ([`SfuConfig::estimate_from_bps`]).
    pub fn estimate(&self, peer: crate::ids::PeerId) -> Option<u64> {
        self.peers.get(&peer).and_then(|p| p.estimate)
    }

    /// Datagrams sent so far (to tell whether a turn forwarded anything).
    /// Hand the packets queued for ICE-TCP connections to `send`, which returns false for one
    /// it could not queue (counted `tcp_congested`).
    pub fn flush_tcp(&mut self, mut send: impl FnMut(SocketAddr, &[u8]) -> bool) {
        if self.tcp_transmits.is_empty() {
            return;
        }
        let (mut sent, mut bytes, mut dropped) = (0u64, 0u64, 0u64);
        self.tcp_transmits.drain_each(|to, data| {
            if send(to, data) {
                sent += 1;
                bytes += data.len() as u64;
            } else {
                dropped += 1;
            }
        });
        self.counters.datagrams_out += sent;
        self.counters.bytes_out += bytes;
        for _ in 0..dropped {
            self.counters.drop(DropReason::TcpCongested);
        }
    }

    /// Count a drop the shard's thread made around the core.
    pub(crate) fn count_drop(&mut self, reason: DropReason) {
        self.counters.drop(reason);
    }

    /// Set the gauge of ICE-TCP connections the shard's thread holds.
    pub(crate) fn set_tcp_links(&mut self, n: usize) {
        self.counters.tcp_links = n as u64;
    }

    pub(crate) fn datagrams_out(&self) -> u64 {
        self.counters.datagrams_out
    }

    /// The earliest home-shard receipt of the packets handed over to this shard and forwarded
    /// since the last call ([`super::spread`]).
    pub(crate) fn take_relayed_since(&mut self) -> Option<Instant> {
        self.relayed_since.take()
    }

    /// Record how long a turn that forwarded took, datagram in to copies out.
    pub(crate) fn record_forward_delay(&mut self, micros: u64) {
        self.counters.forward_delay.record(micros);
    }

    /// Datagrams the kernel dropped on the socket's receive queue, as it last reported.
    pub(crate) fn set_kernel_drops(&mut self, drops: u32) {
        self.counters.kernel_drops = u64::from(drops);
    }

    /// Close every peer (shutdown) and publish the final counters.
    pub fn close_all(&mut self, now: Instant) {
        let ids: Vec<_> = self.peers.keys().copied().collect();
        for id in ids {
            self.close_peer(id, CloseReason::Requested, now);
        }
        self.counters.publish(&self.stats, 0, 0, 0);
    }

    pub(super) fn emit(&mut self, event: SfuEvent) {
        if !self.events.send(event) {
            self.counters.drop(DropReason::EventQueueFull);
        }
    }
}

impl<S: EventSink> ShardCore<S> {
    /// What each peer of this shard is doing now, for an operator (`Sfu::peer_reports`).
    pub fn peer_reports(&self) -> Vec<crate::api::PeerReport> {
        self.peers
            .iter()
            .map(|(id, p)| crate::api::PeerReport {
                peer: *id,
                shard: self.index,
                conference: p.conference,
                trunk: p.role == crate::api::PeerRole::Trunk,
                connected: p.connected,
                over_tcp: p
                    .addrs
                    .iter()
                    .any(|(proto, _)| *proto == str0m::net::Protocol::Tcp),
                rx_bytes: p.traffic.rx_bytes,
                tx_bytes: p.traffic.tx_bytes,
                rx_bps: p.traffic.rx_bps,
                tx_bps: p.traffic.tx_bps,
                estimate_bps: p.estimate,
                loss: p.loss,
                publishes: p.published.len(),
                receives: p.out.len(),
                videos_paused: p.out.values().filter(|o| o.allocated.is_held()).count(),
            })
            .collect()
    }
}
