//! Demultiplexing: which peer a datagram belongs to, by its source address or, for a new
//! address, by the ICE username of its STUN check.

use std::net::SocketAddr;
use std::time::Instant;

use str0m::net::{Protocol, Receive};
use str0m::Input;
use tracing::debug;

use crate::api::PeerRole;
use crate::stats::DropReason;
use crate::stun;

use super::{EventSink, ShardCore};

/// Source addresses remembered per peer. A participant changes address on a network switch and
/// may check a few candidate pairs; more than this are forgotten oldest first, so the address
/// map stays bounded whatever a peer sends.
const MAX_ADDRS_PER_PEER: usize = 8;

impl<S: EventSink> ShardCore<S> {
    /// One datagram from `from`, received at `now`: demultiplexed to its peer and fed to its
    /// engine; what that produces is drained at once (RTP is fanned out).
    pub fn handle_datagram(&mut self, from: SocketAddr, data: &[u8], now: Instant) {
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
        self.drain_peer(id, now);
        self.current = prev;
    }
}
