//! weir's media plane: one WebRTC connection per participant (ICE-lite, DTLS-SRTP, SCTP),
//! selective forwarding between the participants of a conference, RTP header rewriting only.
//! It knows nothing of Matrix: the control plane drives it with [`Command`]s and reacts to
//! [`SfuEvent`]s.
//!
//! Invariants: payload bytes are never changed or logged; every drop is counted with a
//! [`stats::DropReason`] reason; one peer's bad input never affects another peer.

pub mod api;
pub mod budget;
pub mod engine;
pub mod forward;
pub mod ids;
pub mod net;
mod shard;
pub mod sim;
pub mod stats;
pub mod stun;
pub mod tcp;

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tracing::warn;

pub use api::{
    AudioSource, CloseReason, Command, ForwardedTrack, LocalCandidate, PeerReport, PeerRole,
    PublishedTrack, SfuConfig, SfuError, SfuEvent, Subscription, DEFAULT_ESTIMATE_FROM_BPS,
    DEFAULT_RTX_HISTORY_PACKETS, DEFAULT_SOCKET_BUFFER_BYTES, DEFAULT_SPREAD_CONFERENCE_ABOVE,
};
pub use ids::{ConferenceId, MediaId, PeerId, TrackKind};
pub use shard::{
    CoreSizes, EventSink, Relayed, ShardCore, ShardMessage, SpreadMessage, TrackKey, TrackUp,
};
pub use stats::{DelayHistogram, DropReason, ShardStats, StatsSnapshot, TrunkCounts};

/// Capacity of each shard's command queue. Commands are rare (per signalling event), so a full
/// queue means a shard is stuck; the caller gets [`SfuError::QueueFull`] rather than blocking.
const COMMAND_QUEUE: usize = 4096;

/// Where a shard sends its answer to a report request.
type ReportReply = crossbeam_channel::Sender<Vec<PeerReport>>;

struct ShardHandle {
    commands: crossbeam_channel::Sender<Command>,
    /// Report requests (`Sfu::peer_reports`), answered on the sender each carries.
    reports: crossbeam_channel::Sender<ReportReply>,
    waker: Arc<net::Waker>,
    stats: Arc<ShardStats>,
    addr: SocketAddr,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// The running media plane: K shard threads. Cheap to share behind an `Arc`.
pub struct Sfu {
    shards: Vec<ShardHandle>,
    /// Which shard each conference and peer lives on (control plane only; never on the hot path).
    placement: Mutex<Placement>,
    /// Each shard's queue of messages from the others, where the shards of a spread
    /// conference are told which shards it uses.
    messages: Vec<(crossbeam_channel::Sender<ShardMessage>, Arc<net::Waker>)>,
    stop: Arc<AtomicBool>,
    /// The ICE-TCP listener's address, its thread and its counters (`tcp::accept`).
    tcp: Option<TcpAcceptor>,
}

struct TcpAcceptor {
    addr: SocketAddr,
    stats: Arc<ShardStats>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// Connections handed from the ICE-TCP acceptor to one shard, not yet taken. A shard takes
/// them every loop turn; a full queue means it is stuck, and the connection is refused.
const TCP_HANDOFF_QUEUE: usize = 256;

/// Datagrams and claims waiting for one shard from the others when they share one port
/// (`SfuConfig::single_port`). About 50 ms of a busy shard's traffic; beyond it the sender
/// drops and counts (`hand_over_full`).
const SHARD_MESSAGE_QUEUE: usize = 4096;

/// Report requests waiting for one shard. Operators ask now and then; more at once are
/// refused (the caller gets what the other shards said).
const REPORT_QUEUE: usize = 8;

/// Which shards each conference uses and which shard each peer lives on. New conferences go
/// to the shard with the fewest peers, counted here as they are placed: the shards' own
/// published counts lag by up to a housekeeping round, and a burst of new conferences would
/// all land on one shard. A conference holding `spread_above` peers on every shard it uses
/// takes its next peer on the least loaded shard it does not use yet (`shard::spread`); else
/// a new peer goes to the conference's shard with the fewest of its peers.
struct Placement {
    /// Conference → the shards it uses, each with its peers there.
    conferences: HashMap<ConferenceId, Vec<(usize, usize)>>,
    peers: HashMap<PeerId, (usize, ConferenceId)>,
    /// Peers placed on each shard.
    per_shard: Vec<usize>,
    /// `SfuConfig::spread_conference_above` (0: never spread).
    spread_above: usize,
}

/// The shards a conference uses changed: `tell` are the shards to tell (those it uses now and
/// any it stopped using).
#[derive(Debug, PartialEq, Eq)]
struct SpanChange {
    conference: ConferenceId,
    shards: Vec<usize>,
    tell: Vec<usize>,
}

impl Placement {
    fn new(shards: usize, spread_above: usize) -> Self {
        Placement {
            conferences: HashMap::new(),
            peers: HashMap::new(),
            per_shard: vec![0; shards.max(1)],
            spread_above,
        }
    }

    /// The least loaded shard outside `used`.
    fn least_loaded(&self, used: &[(usize, usize)]) -> Option<usize> {
        (0..self.per_shard.len())
            .filter(|i| !used.iter().any(|(s, _)| s == i))
            .min_by_key(|i| self.per_shard[*i])
    }

    /// The shard for a new `peer` of `conference` (placing the conference if new), and the
    /// change to the conference's shards if it spread.
    fn place(&mut self, peer: PeerId, conference: ConferenceId) -> (usize, Option<SpanChange>) {
        if let Some(old) = self.peers.get(&peer).copied() {
            return (old.0, None); // the same peer again: already counted
        }
        let used = self
            .conferences
            .get(&conference)
            .cloned()
            .unwrap_or_default();
        let fewest = used.iter().min_by_key(|(_, n)| *n).copied();
        let (idx, spread) = match fewest {
            None => (self.least_loaded(&[]).unwrap_or(0), false),
            Some((_, n)) if self.spread_above > 0 && n >= self.spread_above => {
                match self.least_loaded(&used) {
                    Some(new) => (new, true),
                    None => (fewest.map_or(0, |(s, _)| s), false),
                }
            }
            Some((s, _)) => (s, false),
        };
        let span = self.conferences.entry(conference).or_default();
        match span.iter_mut().find(|(s, _)| *s == idx) {
            Some((_, n)) => *n += 1,
            None => span.push((idx, 1)),
        }
        let shards: Vec<usize> = span.iter().map(|(s, _)| *s).collect();
        self.peers.insert(peer, (idx, conference));
        self.per_shard[idx] += 1;
        let change = spread.then(|| SpanChange {
            conference,
            tell: shards.clone(),
            shards,
        });
        (idx, change)
    }

    /// Forget `peer`: the shard it was on, and the change to its conference's shards if it
    /// was the last of the conference on a shard the conference shared with others.
    fn remove(&mut self, peer: PeerId) -> Option<(usize, Option<SpanChange>)> {
        let (idx, conf) = self.peers.remove(&peer)?;
        self.per_shard[idx] = self.per_shard[idx].saturating_sub(1);
        let mut change = None;
        if let Some(span) = self.conferences.get_mut(&conf) {
            let spread = span.len() > 1;
            if let Some(e) = span.iter_mut().find(|(s, _)| *s == idx) {
                e.1 -= 1;
            }
            let before: Vec<usize> = span.iter().map(|(s, _)| *s).collect();
            span.retain(|(_, n)| *n > 0);
            if spread && span.len() < before.len() {
                change = Some(SpanChange {
                    conference: conf,
                    shards: span.iter().map(|(s, _)| *s).collect(),
                    tell: before,
                });
            }
            if span.is_empty() {
                self.conferences.remove(&conf);
            }
        }
        Some((idx, change))
    }

    fn shard_of(&self, peer: PeerId) -> Option<usize> {
        self.peers.get(&peer).map(|(idx, _)| *idx)
    }
}

impl Sfu {
    /// Bind the shards' sockets and start their threads. Events from every shard go to `events`.
    pub fn start<S: EventSink + Clone>(config: SfuConfig, events: S) -> Result<Sfu, SfuError> {
        let mut config = config;
        let stop = Arc::new(AtomicBool::new(false));
        // ICE-TCP: bound first, so every shard announces the port actually bound.
        let listener = match config.tcp_port {
            Some(port) => {
                let addr = SocketAddr::new(config.bind_ip, port);
                let l = TcpListener::bind(addr).map_err(|source| SfuError::BindTcp {
                    addr: addr.to_string(),
                    source,
                })?;
                l.set_nonblocking(true).map_err(SfuError::Thread)?;
                config.tcp_port = Some(l.local_addr().map_err(SfuError::Thread)?.port());
                Some(l)
            }
            None => None,
        };
        let mut inboxes = Vec::new();
        let mut shards = Vec::new();
        let n = config.shards.max(1);
        config.shards = n;
        // Each shard's waker and queue of messages from the others (one port for all).
        let mut wakers = Vec::new();
        let mut message_queues = Vec::new();
        for _ in 0..n {
            wakers.push(Arc::new(net::Waker::new().map_err(SfuError::Thread)?));
            message_queues.push(crossbeam_channel::bounded(SHARD_MESSAGE_QUEUE));
        }
        let siblings: Vec<_> = message_queues
            .iter()
            .zip(&wakers)
            .map(|((tx, _), w)| (tx.clone(), w.clone()))
            .collect();
        let mut single_port = None;
        for (i, (waker, (_, messages))) in wakers.into_iter().zip(message_queues).enumerate() {
            let port = match (config.single_port, single_port, config.port_base) {
                (true, Some(p), _) => p,
                (true, None, p) => p,
                (false, _, 0) => 0,
                (false, _, p) => p + i as u16,
            };
            let addr = SocketAddr::new(config.bind_ip, port);
            let bound = if config.single_port {
                net::bind_reuseport(addr)
            } else {
                UdpSocket::bind(addr)
            };
            let socket = bound.map_err(|source| SfuError::Bind {
                shard: i,
                addr: addr.to_string(),
                source,
            })?;
            let local = socket.local_addr().map_err(SfuError::Thread)?;
            single_port.get_or_insert(local.port());
            match net::size_buffers(&socket, config.socket_buffer_bytes) {
                Ok((rcv, _)) if rcv / 2 < config.socket_buffer_bytes => warn!(
                    shard = i,
                    asked = config.socket_buffer_bytes,
                    granted = rcv / 2,
                    "UDP receive buffer smaller than asked: raise net.core.rmem_max or grant CAP_NET_ADMIN"
                ),
                Ok(_) => {}
                Err(e) => warn!(shard = i, error = %e, "could not size the UDP buffers"),
            }
            if let Err(e) = net::count_drops(&socket) {
                warn!(shard = i, error = %e, "kernel receive drops will not be counted");
            }
            let (tx, rx) = crossbeam_channel::bounded(COMMAND_QUEUE);
            let stats = Arc::new(ShardStats::default());
            let (tcp_tx, tcp_rx) = crossbeam_channel::bounded(TCP_HANDOFF_QUEUE);
            let (report_tx, report_rx) = crossbeam_channel::bounded(REPORT_QUEUE);
            inboxes.push(tcp::accept::ShardInbox {
                connections: tcp_tx,
                waker: waker.clone(),
            });
            let inputs = shard::Inputs {
                commands: rx,
                tcp_handoffs: tcp_rx,
                reports: report_rx,
                messages,
                siblings: siblings.clone(),
            };
            let shard = shard::Shard::new(
                i,
                config.clone(),
                socket,
                inputs,
                waker.clone(),
                events.clone(),
                stop.clone(),
                stats.clone(),
            )
            .map_err(SfuError::Thread)?;
            let thread = std::thread::Builder::new()
                .name(format!("weir-shard-{i}"))
                .spawn(move || shard.run())
                .map_err(SfuError::Thread)?;
            shards.push(ShardHandle {
                commands: tx,
                reports: report_tx,
                waker,
                stats,
                addr: local,
                thread: Mutex::new(Some(thread)),
            });
        }
        let tcp = match listener {
            Some(l) => {
                let addr = l.local_addr().map_err(SfuError::Thread)?;
                let stats = Arc::new(ShardStats::default());
                let (st, stop) = (stats.clone(), stop.clone());
                let thread = std::thread::Builder::new()
                    .name("weir-ice-tcp".into())
                    .spawn(move || tcp::accept::run(l, inboxes, st, stop))
                    .map_err(SfuError::Thread)?;
                Some(TcpAcceptor {
                    addr,
                    stats,
                    thread: Mutex::new(Some(thread)),
                })
            }
            None => None,
        };
        Ok(Sfu {
            shards,
            placement: Mutex::new(Placement::new(
                config.shards,
                config.spread_conference_above,
            )),
            messages: siblings,
            stop,
            tcp,
        })
    }

    /// The UDP addresses the shards listen on.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.shards.iter().map(|s| s.addr).collect()
    }

    /// The ICE-TCP listener's address, when ICE-TCP is on.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp.as_ref().map(|t| t.addr)
    }

    /// Route a command to the shard that owns its peer (placing new conferences on the shard
    /// with the fewest peers, and spreading a conference that outgrew its shards).
    pub fn send(&self, cmd: Command) -> Result<(), SfuError> {
        let shard = {
            let mut pl = self.placement.lock().unwrap_or_else(|e| e.into_inner());
            let (idx, change) = match &cmd {
                Command::CreatePeer {
                    peer, conference, ..
                }
                | Command::DialTrunk { peer, conference } => pl.place(*peer, *conference),
                Command::ClosePeer { peer } => match pl.remove(*peer) {
                    Some(placed) => placed,
                    None => return Ok(()),
                },
                Command::RemoteOffer { peer, .. }
                | Command::RemoteAnswer { peer, .. }
                | Command::RemoteCandidates { peer, .. }
                | Command::Subscribe { peer, .. }
                | Command::SendData { peer, .. }
                | Command::Screens { peer, .. } => match pl.shard_of(*peer) {
                    Some(idx) => (idx, None),
                    None => return Ok(()),
                },
            };
            // Told under the lock, so the shards learn successive spans in order.
            if let Some(change) = change {
                self.tell_span(change);
            }
            idx
        };
        let h = &self.shards[shard];
        h.commands.try_send(cmd).map_err(|e| match e {
            crossbeam_channel::TrySendError::Full(_) => SfuError::QueueFull(shard),
            crossbeam_channel::TrySendError::Disconnected(_) => SfuError::ShardGone(shard),
        })?;
        h.waker.wake();
        Ok(())
    }

    /// Tell the shards involved which shards a conference uses now.
    fn tell_span(&self, change: SpanChange) {
        tracing::info!(conference = %change.conference, shards = ?change.shards, "conference spread");
        for i in change.tell {
            let Some((tx, waker)) = self.messages.get(i) else {
                continue;
            };
            let msg = ShardMessage::Spread(SpreadMessage::Span {
                conference: change.conference,
                shards: change.shards.clone(),
            });
            if tx.try_send(msg).is_ok() {
                waker.wake();
            } else {
                self.shards[i].stats.count_drop(DropReason::HandOverFull);
            }
        }
    }

    /// Forget a peer the media plane closed by itself (keeps placement counts right).
    pub fn forget_peer(&self, peer: PeerId) {
        let mut pl = self.placement.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, Some(change))) = pl.remove(peer) {
            self.tell_span(change);
        }
    }

    /// Whether each shard's thread is still running. A shard stops only at shutdown or on a
    /// bug outside any one peer's handling (a panic while handling a peer closes that peer).
    pub fn shards_alive(&self) -> Vec<bool> {
        self.shards
            .iter()
            .map(|s| {
                s.thread
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .as_ref()
                    .is_some_and(|t| !t.is_finished())
            })
            .collect()
    }

    /// What every peer is doing now (state, traffic, estimate), from every shard that answers
    /// within `wait`. For an operator's view: each shard builds its list between two turns.
    pub fn peer_reports(&self, wait: std::time::Duration) -> Vec<PeerReport> {
        let deadline = std::time::Instant::now() + wait;
        let mut pending = Vec::new();
        for s in &self.shards {
            let (tx, rx) = crossbeam_channel::bounded(1);
            if s.reports.try_send(tx).is_ok() {
                s.waker.wake();
                pending.push(rx);
            }
        }
        let mut out = Vec::new();
        for rx in pending {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if let Ok(v) = rx.recv_timeout(left) {
                out.extend(v);
            }
        }
        out.sort_by_key(|r| r.peer);
        out
    }

    /// Counters summed over all shards.
    pub fn stats(&self) -> StatsSnapshot {
        let acceptor = self.tcp.iter().map(|t| t.stats.as_ref());
        StatsSnapshot::sum(self.shards.iter().map(|s| s.stats.as_ref()).chain(acceptor))
    }

    /// Each shard's counters, by shard (the ICE-TCP acceptor's not included).
    pub fn shard_stats(&self) -> Vec<StatsSnapshot> {
        self.shards
            .iter()
            .map(|s| StatsSnapshot::sum([s.stats.as_ref()]))
            .collect()
    }

    /// Stop every shard (closing its peers) and wait for the threads.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::Relaxed);
        for s in &self.shards {
            s.waker.wake();
            let thread = s.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(t) = thread {
                let _ = t.join();
            }
        }
        if let Some(tcp) = &self.tcp {
            let thread = tcp.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(t) = thread {
                let _ = t.join();
            }
        }
    }
}

impl Drop for Sfu {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_of_new_conferences_is_spread_over_the_shards() {
        let mut pl = Placement::new(2, 0);
        let shards: Vec<usize> = (0..4)
            .map(|i| pl.place(PeerId(i), ConferenceId(i)).0)
            .collect();
        assert_eq!(shards, vec![0, 1, 0, 1]);
        // A conference's later peers join it where it is, whatever the load.
        assert_eq!(pl.place(PeerId(10), ConferenceId(0)), (0, None));
        assert_eq!(pl.place(PeerId(11), ConferenceId(0)), (0, None));
        assert_eq!(pl.per_shard, vec![4, 2]);
        // Leaving frees room: the next new conference goes where fewest peers are.
        for p in [0, 10, 11] {
            assert_eq!(pl.remove(PeerId(p)), Some((0, None)));
        }
        assert_eq!(pl.remove(PeerId(0)), None, "removed once only");
        assert_eq!(pl.place(PeerId(20), ConferenceId(9)), (0, None));
        assert!(
            !pl.conferences.contains_key(&ConferenceId(0)),
            "an empty conference is forgotten"
        );
    }

    #[test]
    fn a_conference_that_fills_its_shard_spreads_and_shrinks_back() {
        let mut pl = Placement::new(3, 2);
        let conf = ConferenceId(1);
        // Four small conferences: shard 0 holds two peers, shards 1 and 2 one each.
        for i in 0..4 {
            assert_eq!(
                pl.place(PeerId(100 + i), ConferenceId(10 + i)).0,
                i as usize % 3
            );
        }
        assert_eq!(
            pl.place(PeerId(1), conf),
            (1, None),
            "the least loaded shard"
        );
        assert_eq!(pl.place(PeerId(2), conf), (1, None));
        // Shard 1 holds two of it: the third peer opens the least loaded other shard.
        let (idx, change) = pl.place(PeerId(3), conf);
        assert_eq!(idx, 2);
        assert_eq!(
            change,
            Some(SpanChange {
                conference: conf,
                shards: vec![1, 2],
                tell: vec![1, 2],
            })
        );
        // From then on peers go where the conference has the fewest, until both hold two.
        assert_eq!(pl.place(PeerId(4), conf), (2, None));
        let (idx, change) = pl.place(PeerId(5), conf);
        assert_eq!(idx, 0);
        assert_eq!(change.map(|c| c.shards), Some(vec![1, 2, 0]));
        // Shard 0's only peer of it leaves: the others are told, and shard 0 too.
        let (idx, change) = pl.remove(PeerId(5)).unwrap();
        assert_eq!(idx, 0);
        assert_eq!(
            change,
            Some(SpanChange {
                conference: conf,
                shards: vec![1, 2],
                tell: vec![1, 2, 0],
            })
        );
        assert_eq!(
            pl.remove(PeerId(4)),
            Some((2, None)),
            "shard 2 still has peer 3"
        );
        let (_, change) = pl.remove(PeerId(3)).unwrap();
        assert_eq!(
            change.map(|c| (c.shards, c.tell)),
            Some((vec![1], vec![1, 2]))
        );
        // Back on one shard: nothing more to tell when it empties.
        assert_eq!(pl.remove(PeerId(2)), Some((1, None)));
        assert_eq!(pl.remove(PeerId(1)), Some((1, None)));
        assert!(!pl.conferences.contains_key(&conf));
    }

    #[test]
    fn without_spreading_a_conference_stays_on_one_shard_however_large() {
        let mut pl = Placement::new(2, 0);
        for i in 0..500 {
            assert_eq!(pl.place(PeerId(i), ConferenceId(1)), (0, None));
        }
    }
}
