//! Engine output: draining the peers touched in a turn, and what their engines report.

use std::cmp::Reverse;
use std::time::Instant;

use str0m::bwe::BweKind;
use str0m::{Event, Output};
use tracing::{debug, info};

use crate::api::{CloseReason, SfuEvent};
use crate::ids::PeerId;

use super::{EventSink, ShardCore, TrackKey};

impl<S: EventSink> ShardCore<S> {
    /// Queue a peer for draining (once: a flag on the peer, not a search of the list, since
    /// fan-out marks every subscriber for every packet).
    pub(super) fn mark_dirty(&mut self, id: PeerId) {
        if let Some(p) = self.peers.get_mut(&id) {
            if !p.dirty {
                p.dirty = true;
                self.dirty.push(id);
            }
        }
    }

    /// Drain engine output of every touched peer. Forwarding touches subscribers, which are
    /// drained in the same pass.
    pub(super) fn drain_dirty(&mut self, now: Instant) {
        while let Some(id) = self.dirty.pop() {
            if let Some(p) = self.peers.get_mut(&id) {
                p.dirty = false;
            }
            self.drain_peer(id, now);
        }
    }

    pub(super) fn drain_peer(&mut self, id: PeerId, now: Instant) {
        let prev = self.current.replace(id);
        self.drain_peer_inner(id, now);
        self.current = prev;
    }

    fn drain_peer_inner(&mut self, id: PeerId, now: Instant) {
        loop {
            let Some(peer) = self.peers.get_mut(&id) else {
                return;
            };
            let out = match peer.rtc.poll_output() {
                Ok(o) => o,
                Err(e) => {
                    self.close_peer(id, CloseReason::EngineError(e.to_string()), now);
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
                        self.close_peer(id, CloseReason::Disconnected, now);
                    }
                    return;
                }
                Output::Transmit(t) => {
                    peer.traffic.tx_bytes += t.contents.len() as u64;
                    super::queue_transmit(&mut self.transmits, &mut self.tcp_transmits, &t);
                }
                Output::Event(e) => self.handle_event(id, e, now),
            }
        }
    }

    fn handle_event(&mut self, id: PeerId, event: Event, now: Instant) {
        match event {
            Event::Connected => {
                let conference = self.peers.get_mut(&id).map(|p| {
                    p.connected = true;
                    p.conference
                });
                info!(shard = self.index, %id, conference = ?conference.map(|c| c.0), "peer connected");
                self.emit(SfuEvent::Connected { peer: id });
            }
            Event::MediaAdded(m) if m.direction.is_receiving() => {
                self.publish(id, m.mid, m.kind, now);
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
                        self.publish(id, m.mid, kind, now);
                    }
                } else if !m.direction.is_receiving() && published {
                    self.unpublish(id, m.mid);
                }
            }
            Event::RtpPacket(pkt) => self.forward(id, pkt, now),
            Event::KeyframeRequest(req) => self.on_keyframe_request(id, req, now),
            Event::Closed => self.close_peer(id, CloseReason::Disconnected, now),
            Event::ChannelOpen(cid, label) => self.on_channel_open(id, cid, &label),
            Event::ChannelData(d) => self.on_channel_data(id, d, now),
            Event::EgressBitrateEstimate(e) => self.on_estimate(id, e),
            Event::PeerStats(s) => {
                if let Some(p) = self.peers.get_mut(&id) {
                    p.loss = s.egress_loss_fraction;
                    if let Some(rtt) = s.rtt {
                        p.allocator.on_rtt(rtt);
                    }
                    // The loss rule cuts the media that was sent (forward::allocate).
                    if let Some((bytes, at)) = p.tx_mark.replace((s.bytes_tx, now)) {
                        let secs = now.saturating_duration_since(at).as_secs_f64();
                        if secs > 0.0 && p.estimate.is_some() {
                            let bps = s.bytes_tx.saturating_sub(bytes) as f64 * 8.0 / secs;
                            p.allocator.on_wire(bps as u64, now);
                        }
                    }
                }
                // What leaves toward the participant in all (media, retransmissions, padding,
                // probes, RTCP, headers) against the media payload in it.
                debug!(%id, sent = s.peer_bytes_tx, media = s.bytes_tx, loss = ?s.egress_loss_fraction,
                    estimate = ?s.bwe_tx.map(|b| b.as_u64()), "egress");
            }
            Event::MediaEgressStats(s) => {
                // Per forwarded stream: bytes and packets with retransmissions, and the NACKs
                // that asked for them (beside `egress` above, where the rest goes shows).
                // And what waits in the engine's pacer for that stream (read only when
                // logged: finding the stream by mid walks the connection's streams).
                let queued = if tracing::enabled!(tracing::Level::DEBUG) {
                    self.peers.get_mut(&id).and_then(|p| {
                        let mut api = p.rtc.direct_api();
                        let q = api.stream_tx_by_mid(s.mid, None)?.queue_info()?;
                        let waited = q.first_unsent().map(|t| now.saturating_duration_since(t));
                        Some((q.byte_size(), q.packet_count(), waited))
                    })
                } else {
                    None
                };
                debug!(%id, mid = %s.mid, bytes = s.bytes, packets = s.packets, nacks = s.nacks,
                    ?queued, "egress stream");
            }
            Event::IceConnectionStateChange(s) => debug!(%id, state = ?s, "ice state"),
            _ => {}
        }
    }

    /// A new estimate of the bandwidth toward `id`: its own transport-wide feedback, or the
    /// REMB it sends if that is all.
    ///
    /// str0m keeps its estimate current only while it can probe (a sending media section
    /// with transport-wide feedback): when it says it no longer can, the last estimate goes
    /// stale, so allocation stops and every video is released to its size cap.
    fn on_estimate(&mut self, id: PeerId, e: BweKind) {
        let Some(p) = self.peers.get_mut(&id) else {
            return;
        };
        let (bps, live) = match e {
            BweKind::Twcc {
                estimate,
                can_probe,
            } => (estimate.as_u64(), can_probe),
            BweKind::Remb { estimate, .. } => (estimate.as_u64(), true),
            _ => return,
        };
        debug!(%id, bps, live, "bandwidth estimate");
        if live {
            p.stall.on_estimate(bps);
            if p.estimate.replace(bps).is_none() {
                // Videos not started yet now wait for an allocation: their next packet runs it.
                let waiting: Vec<TrackKey> = p
                    .out
                    .iter()
                    .filter(|(_, o)| o.awaits_allocation(true))
                    .map(|(t, _)| *t)
                    .collect();
                for t in waiting {
                    if let Some(track) = self.tracks.get_mut(&t) {
                        track.unallocated = true;
                    }
                }
            }
        } else if p.estimate.take().is_some() {
            self.release_allocation(id);
        }
    }
}
