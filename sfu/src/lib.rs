//! weir's media plane: one WebRTC connection per participant (ICE-lite, DTLS-SRTP, SCTP),
//! selective forwarding between the participants of a conference, RTP header rewriting only.
//! It knows nothing of Matrix: the control plane drives it with [`Command`]s and reacts to
//! [`SfuEvent`]s.
//!
//! Invariants: payload bytes are never changed or logged; every drop is counted with a
//! [`stats::DropReason`] reason; one peer's bad input never affects another peer.

pub mod api;
pub mod engine;
pub mod forward;
pub mod ids;
pub mod net;
mod shard;
pub mod stats;

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

pub use api::{
    CloseReason, Command, ForwardedTrack, LocalCandidate, PeerRole, PublishedTrack, SfuConfig,
    SfuError, SfuEvent, Subscription,
};
pub use ids::{ConferenceId, MediaId, PeerId, TrackKind};
pub use shard::EventSink;
pub use stats::{DropReason, ShardStats, StatsSnapshot, TrunkCounts};

/// Capacity of each shard's command queue. Commands are rare (per signalling event), so a full
/// queue means a shard is stuck; the caller gets [`SfuError::QueueFull`] rather than blocking.
const COMMAND_QUEUE: usize = 4096;

struct ShardHandle {
    commands: crossbeam_channel::Sender<Command>,
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
    stop: Arc<AtomicBool>,
}

#[derive(Default)]
struct Placement {
    conferences: HashMap<ConferenceId, (usize, usize)>,
    peers: HashMap<PeerId, (usize, ConferenceId)>,
}

impl Sfu {
    /// Bind the shards' sockets and start their threads. Events from every shard go to `events`.
    pub fn start<S: EventSink + Clone>(config: SfuConfig, events: S) -> Result<Sfu, SfuError> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut shards = Vec::new();
        for i in 0..config.shards.max(1) {
            let port = if config.port_base == 0 {
                0
            } else {
                config.port_base + i as u16
            };
            let addr = SocketAddr::new(config.bind_ip, port);
            let socket = UdpSocket::bind(addr).map_err(|source| SfuError::Bind {
                shard: i,
                addr: addr.to_string(),
                source,
            })?;
            let local = socket.local_addr().map_err(SfuError::Thread)?;
            let (tx, rx) = crossbeam_channel::bounded(COMMAND_QUEUE);
            let waker = Arc::new(net::Waker::new().map_err(SfuError::Thread)?);
            let stats = Arc::new(ShardStats::default());
            let shard = shard::Shard::new(
                i,
                config.clone(),
                socket,
                rx,
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
                waker,
                stats,
                addr: local,
                thread: Mutex::new(Some(thread)),
            });
        }
        Ok(Sfu {
            shards,
            placement: Mutex::new(Placement::default()),
            stop,
        })
    }

    /// The UDP addresses the shards listen on.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.shards.iter().map(|s| s.addr).collect()
    }

    /// Route a command to the shard that owns its peer (placing new conferences on the shard
    /// with the fewest peers).
    pub fn send(&self, cmd: Command) -> Result<(), SfuError> {
        let shard = {
            let mut pl = self.placement.lock().unwrap_or_else(|e| e.into_inner());
            match &cmd {
                Command::CreatePeer {
                    peer, conference, ..
                }
                | Command::DialTrunk { peer, conference } => {
                    let idx = match pl.conferences.get(conference) {
                        Some((idx, _)) => *idx,
                        None => self.least_loaded(),
                    };
                    let entry = pl.conferences.entry(*conference).or_insert((idx, 0));
                    entry.1 += 1;
                    pl.peers.insert(*peer, (idx, *conference));
                    idx
                }
                Command::ClosePeer { peer } => match pl.peers.remove(peer) {
                    Some((idx, conf)) => {
                        if let Some(e) = pl.conferences.get_mut(&conf) {
                            e.1 -= 1;
                            if e.1 == 0 {
                                pl.conferences.remove(&conf);
                            }
                        }
                        idx
                    }
                    None => return Ok(()),
                },
                Command::RemoteOffer { peer, .. }
                | Command::RemoteAnswer { peer, .. }
                | Command::RemoteCandidates { peer, .. }
                | Command::Subscribe { peer, .. }
                | Command::SendData { peer, .. } => match pl.peers.get(peer) {
                    Some((idx, _)) => *idx,
                    None => return Ok(()),
                },
            }
        };
        let h = &self.shards[shard];
        h.commands.try_send(cmd).map_err(|e| match e {
            crossbeam_channel::TrySendError::Full(_) => SfuError::QueueFull(shard),
            crossbeam_channel::TrySendError::Disconnected(_) => SfuError::ShardGone(shard),
        })?;
        h.waker.wake();
        Ok(())
    }

    /// Forget a peer the media plane closed by itself (keeps placement counts right).
    pub fn forget_peer(&self, peer: PeerId) {
        let mut pl = self.placement.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, conf)) = pl.peers.remove(&peer) {
            if let Some(e) = pl.conferences.get_mut(&conf) {
                e.1 -= 1;
                if e.1 == 0 {
                    pl.conferences.remove(&conf);
                }
            }
        }
    }

    fn least_loaded(&self) -> usize {
        (0..self.shards.len())
            .min_by_key(|i| self.shards[*i].stats.peers.load(Ordering::Relaxed))
            .unwrap_or(0)
    }

    /// Counters summed over all shards.
    pub fn stats(&self) -> StatsSnapshot {
        StatsSnapshot::sum(self.shards.iter().map(|s| s.stats.as_ref()))
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
    }
}

impl Drop for Sfu {
    fn drop(&mut self) {
        self.shutdown();
    }
}
