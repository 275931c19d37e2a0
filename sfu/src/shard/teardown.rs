//! Teardown: closing a peer, and recovering from a panic while handling one.

use std::time::Instant;

use str0m::{Input, Output};
use tracing::{info, warn};

use crate::api::{CloseReason, SfuEvent};
use crate::ids::PeerId;

use super::{EventSink, ShardCore, TrackKey};

/// Most engine outputs drained from a closing peer (RTCP BYE per stream, DTLS close_notify,
/// SCTP shutdown): a bound, not a target.
const CLOSE_DRAIN_OUTPUTS: usize = 256;

impl<S: EventSink> ShardCore<S> {
    pub(super) fn close_peer(&mut self, id: PeerId, reason: CloseReason, now: Instant) {
        let Some(mut peer) = self.peers.remove(&id) else {
            return;
        };
        // A graceful close queues RTCP BYE and DTLS close_notify, so the other side learns at
        // once that the call ended instead of timing out. Drained right away (bounded: a
        // closing engine yields a handful of datagrams), then the engine is dropped.
        if peer.connected && !peer.poisoned && peer.rtc.close().is_ok() {
            let _ = peer.rtc.handle_input(Input::Timeout(now));
            for _ in 0..CLOSE_DRAIN_OUTPUTS {
                match peer.rtc.poll_output() {
                    Ok(Output::Transmit(t)) => {
                        super::queue_transmit(&mut self.transmits, &mut self.tcp_transmits, &t)
                    }
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
                self.speakers.remove(&peer.conference);
            }
        }
        let published: Vec<TrackKey> = peer.published.into_values().collect();
        self.withdraw(peer.conference, &published);
        info!(shard = self.index, %id, conference = %peer.conference, ?reason, "peer closed");
        self.emit(SfuEvent::PeerClosed { peer: id, reason });
    }

    /// After a panic inside a turn: close the peer that was being handled (its engine or its
    /// state may be half-updated), rebuild what the interrupted work may have left
    /// inconsistent, and carry on with everyone else. A panic outside any peer's handling is
    /// a bug of the shard itself: it is not hidden, the shard stops (and `/healthz` says so).
    pub(super) fn recover(&mut self, panic: Box<dyn std::any::Any + Send>, now: Instant) {
        let Some(id) = self.current.take() else {
            std::panic::resume_unwind(panic);
        };
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown".into());
        self.counters.peer_panics += 1;
        let conference = self.peers.get(&id).map(|p| p.conference.0);
        warn!(shard = self.index, %id, ?conference, panic = %what, "panic while handling a peer; closing that peer only");
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
        self.close_peer(id, CloseReason::EngineError(format!("panic: {what}")), now);
    }
}
