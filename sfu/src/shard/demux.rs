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

/// The local side of a 5-tuple as ICE knows it: one of our advertised host candidates.
///
/// The ICE agent answers a check only if it arrived on one of its local candidates, and those
/// carry the advertised addresses. Behind a NAT, or bound to the wildcard address, the socket's
/// own address is not among them: every check would be discarded and no call would connect.
/// So a datagram is taken to have arrived on the advertised address the participant used: the
/// socket's own when it is advertised, else the first advertised one of the sender's family.
/// (With several advertised addresses of one family behind one NAT the choice may name
/// another of them; the pair still works, since every candidate is the same socket.)
#[derive(Debug, Clone)]
pub(super) struct IceLocal {
    bound: SocketAddr,
    v4: Option<SocketAddr>,
    v6: Option<SocketAddr>,
}

impl IceLocal {
    pub(super) fn new(bound: SocketAddr, advertised: &[std::net::IpAddr]) -> Self {
        let port = bound.port();
        let own = advertised.contains(&bound.ip());
        let first = |v6: bool| {
            advertised
                .iter()
                .find(|ip| ip.is_ipv6() == v6)
                .map(|ip| SocketAddr::new(*ip, port))
        };
        IceLocal {
            bound,
            v4: if own && bound.is_ipv4() {
                Some(bound)
            } else {
                first(false)
            },
            v6: if own && bound.is_ipv6() {
                Some(bound)
            } else {
                first(true)
            },
        }
    }

    /// The advertised address a datagram from `from` arrived on.
    pub(super) fn toward(&self, from: SocketAddr) -> SocketAddr {
        let mapped = if from.is_ipv4() { self.v4 } else { self.v6 };
        mapped.unwrap_or(self.bound)
    }
}

impl<S: EventSink> ShardCore<S> {
    /// One datagram from `from`, received at `now`: demultiplexed to its peer and fed to its
    /// engine; what that produces is drained at once (RTP is fanned out).
    pub fn handle_datagram(&mut self, from: SocketAddr, data: &[u8], now: Instant) {
        self.handle_packet(Protocol::Udp, from, data, now, true);
    }

    /// One frame from the ICE-TCP connection of `from`: handled as a datagram would be.
    pub fn handle_tcp(&mut self, from: SocketAddr, data: &[u8], now: Instant) {
        self.handle_packet(Protocol::Tcp, from, data, now, false);
    }

    /// `may_hand_over`: a datagram from an unknown address may belong to another shard
    /// sharing our port (`single_port`); one handed to us is never handed on.
    pub(super) fn handle_packet(
        &mut self,
        proto: Protocol,
        from: SocketAddr,
        data: &[u8],
        now: Instant,
        may_hand_over: bool,
    ) {
        self.counters.datagrams_in += 1;
        self.counters.bytes_in += data.len() as u64;
        let known = self.by_addr.get(&(proto, from)).copied();
        // Another shard's, sharing our port: handed over unparsed (`single_port`).
        if known.is_none() && may_hand_over && self.hand_over(from, data, now) {
            return;
        }
        let mut local = self.ice_local.toward(from);
        if proto == Protocol::Tcp {
            local.set_port(self.config.tcp_port.unwrap_or(0));
        }
        let receive = match Receive::new(proto, from, local, data) {
            Ok(r) => r,
            Err(_) => {
                self.counters.drop(DropReason::Malformed);
                return;
            }
        };
        let input = Input::Receive(now, receive);
        let id = match known {
            Some(id) => id,
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
                        self.by_addr.insert((proto, from), id);
                        if let Some(p) = self.peers.get_mut(&id) {
                            p.addrs.push((proto, from));
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
        peer.traffic.rx_bytes += data.len() as u64;
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_socket_bound_to_an_advertised_address_is_that_address() {
        let l = IceLocal::new(addr("127.0.0.1:4000"), &[ip("10.0.0.9"), ip("127.0.0.1")]);
        assert_eq!(l.toward(addr("127.0.0.1:5000")), addr("127.0.0.1:4000"));
    }

    #[test]
    fn behind_a_nat_checks_arrive_on_the_public_address() {
        let l = IceLocal::new(addr("10.0.0.2:4000"), &[ip("203.0.113.5")]);
        assert_eq!(
            l.toward(addr("198.51.100.7:5000")),
            addr("203.0.113.5:4000")
        );
    }

    #[test]
    fn a_wildcard_socket_answers_each_family_on_its_advertised_address() {
        let l = IceLocal::new(addr("[::]:4000"), &[ip("2001:db8::1"), ip("203.0.113.5")]);
        assert_eq!(
            l.toward(addr("198.51.100.7:5000")),
            addr("203.0.113.5:4000")
        );
        assert_eq!(
            l.toward(addr("[2001:db8::7]:5000")),
            addr("[2001:db8::1]:4000")
        );
    }

    #[test]
    fn a_family_with_nothing_advertised_keeps_the_socket_address() {
        let l = IceLocal::new(addr("0.0.0.0:4000"), &[ip("203.0.113.5")]);
        assert_eq!(l.toward(addr("[2001:db8::7]:5000")), addr("0.0.0.0:4000"));
    }
}
