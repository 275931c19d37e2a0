//! One UDP port for every shard (`SfuConfig::single_port`): each shard's socket is bound to
//! the same port with `SO_REUSEPORT`, so a firewall needs one rule however many cores the
//! focus uses. The kernel spreads clients over the sockets by their address, not by the shard
//! their conference lives on, so a shard may receive datagrams for another shard's peers. It
//! hands them over:
//! - a connectivity check names its peer by our ufrag, and our ufrags start with their shard's
//!   number (`tcp::ufrag_prefix`): the check goes to that shard, and the sender's address is
//!   remembered as that shard's, so its DTLS and media follow without being parsed;
//! - a STUN response (answering a trunk's own check) names nobody: it goes to every other
//!   shard, and the one whose trunk accepts it claims the address back.
//!
//! What arrives handed over is handled exactly as if it had been received, except that it is
//! never handed on again. Replies leave from the owner shard's own socket, which has the same
//! port, so the client sees one address throughout.

use std::net::SocketAddr;
use std::time::Instant;

use str0m::net::Protocol;

use crate::stats::DropReason;
use crate::stun;

use super::{EventSink, ShardCore, SpreadMessage};

/// Addresses remembered as another shard's. Each costs a map entry; past this, the idlest half
/// is forgotten (their next datagram is a check again or is dropped, as from anyone unknown).
const MAX_FOREIGN: usize = 65_536;

/// Between shards: sharing one port, or the shards of a spread conference
/// ([`super::spread`]).
#[derive(Debug, Clone)]
pub enum ShardMessage {
    /// A datagram one shard received for another's peer.
    Datagram {
        origin: usize,
        from: SocketAddr,
        data: Vec<u8>,
    },
    /// `owner` took a datagram from `addr` that `origin` handed to every shard: its datagrams
    /// go to `owner` from now on.
    Claim { addr: SocketAddr, owner: usize },
    /// About a conference spread over several shards.
    Spread(SpreadMessage),
}

/// A message for another shard (`to`), or for every other shard (`None`).
#[derive(Debug)]
pub struct Outgoing {
    pub to: Option<usize>,
    pub message: ShardMessage,
}

impl<S: EventSink> ShardCore<S> {
    /// A UDP datagram from an address none of our peers was introduced from: hand it to the
    /// shard it belongs to, if there is one. Returns whether it was handed over.
    pub(super) fn hand_over(&mut self, from: SocketAddr, data: &[u8], now: Instant) -> bool {
        if !self.config.single_port {
            return false;
        }
        let to = if let Some((owner, seen)) = self.foreign.get_mut(&from) {
            *seen = now;
            Some(*owner)
        } else if data.first().is_some_and(|b| *b <= 3) {
            match stun::local_ufrag(data) {
                Some(ufrag) => match crate::tcp::shard_of_ufrag(ufrag) {
                    Some(owner) if owner != self.index && owner < self.config.shards => {
                        self.remember_foreign(from, owner, now);
                        Some(owner)
                    }
                    _ => return false,
                },
                // A response: whose trunk asked is unknown here.
                None => None,
            }
        } else {
            return false;
        };
        self.counters.datagrams_in -= 1;
        self.counters.bytes_in -= data.len() as u64;
        self.counters.handed_over += 1;
        self.outgoing.push(Outgoing {
            to,
            message: ShardMessage::Datagram {
                origin: self.index,
                from,
                data: data.to_vec(),
            },
        });
        true
    }

    /// A message from another shard.
    pub fn handle_shard_message(&mut self, msg: ShardMessage, now: Instant) {
        match msg {
            ShardMessage::Datagram { origin, from, data } => {
                let known = self.by_addr.contains_key(&(Protocol::Udp, from));
                self.handle_packet(Protocol::Udp, from, &data, now, false);
                if !known && self.by_addr.contains_key(&(Protocol::Udp, from)) {
                    self.outgoing.push(Outgoing {
                        to: Some(origin),
                        message: ShardMessage::Claim {
                            addr: from,
                            owner: self.index,
                        },
                    });
                }
            }
            ShardMessage::Claim { addr, owner } => self.remember_foreign(addr, owner, now),
            ShardMessage::Spread(m) => self.handle_spread(m, now),
        }
    }

    pub(crate) fn has_outgoing(&self) -> bool {
        !self.outgoing.is_empty()
    }

    /// Messages for other shards, for the shard's thread to deliver.
    pub fn take_outgoing(&mut self) -> std::vec::Drain<'_, Outgoing> {
        self.outgoing.drain(..)
    }

    /// A message that could not be delivered (the other shard's queue was full).
    pub(crate) fn undelivered(&mut self) {
        self.counters.drop(DropReason::HandOverFull);
    }

    fn remember_foreign(&mut self, addr: SocketAddr, owner: usize, now: Instant) {
        if self.foreign.len() >= MAX_FOREIGN && !self.foreign.contains_key(&addr) {
            let mut seen: Vec<Instant> = self.foreign.values().map(|(_, t)| *t).collect();
            seen.sort_unstable();
            let cut = seen[seen.len() / 2];
            self.foreign.retain(|_, (_, t)| *t > cut);
        }
        self.foreign.insert(addr, (owner, now));
    }

    /// Forget other shards' addresses that have been silent this long (housekeeping).
    pub(super) fn prune_foreign(&mut self, now: Instant) {
        let quiet = self.config.silence_timeout;
        self.foreign
            .retain(|_, (_, seen)| now.saturating_duration_since(*seen) < quiet);
    }
}
