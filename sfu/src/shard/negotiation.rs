//! Negotiation: creating a peer from its offer, dialling a trunk, remote offers, answers and
//! candidates, and the offers weir makes when what a peer should receive changes.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::Instant;

use str0m::bwe::Bitrate;
use str0m::format::Codec;
use str0m::media::{Direction, MediaKind, Rid, Rids, Simulcast, SimulcastLayer};
use str0m::net::TcpType;
use str0m::{Candidate, Rtc};
use tracing::{debug, info, warn};

use crate::api::{ForwardedTrack, LocalCandidate, PeerRole, SfuEvent};
use crate::engine::{self, parse_answer, parse_offer};
use crate::ids::{ConferenceId, PeerId, TrackKind};
use crate::stats::DropReason;

use super::{EventSink, Peer, PendingNegotiation, ShardCore, TrackKey};

/// Label of the data channel weir opens on a trunk it dials.
const TRUNK_CHANNEL_LABEL: &str = "weir-trunk";
/// Most remote candidates taken from one message: a trunk peer has a handful of host
/// candidates; more is refused rather than fed to ICE.
const MAX_REMOTE_CANDIDATES: usize = 32;
/// The `rtx-time` (milliseconds) weir's offers give forwarded cameras. Chromium asks for a
/// keyframe once it has had no decodable frame for three times this (0.9 s) instead of 3 s:
/// a picture broken by losses that retransmission did not repair stands that much shorter.
/// Lower asks sooner, but a camera sending under one frame per 3× this (a muted camera's
/// black frame each second) draws a keyframe request per frame; those are small, and
/// coalesced per layer. Three times it (plus a round trip and the keyframe) is about the
/// shortest a broken picture can stand.
const FORWARDED_RTX_TIME_MS: u32 = 300;
/// The largest offer (in bytes once its line breaks are escaped in JSON) that gets
/// [`FORWARDED_RTX_TIME_MS`]; a larger one goes without. A to-device event is capped at 64 KiB
/// by Synapse, and an offer shares it with the tracks' metadata: in a 25-person load test
/// the last joiners' offers reached 66-69 KB with `rtx-time` and were not sent, so they
/// received no video at all. `rtx-time` adds about 13 bytes per retransmission format of
/// each forwarded camera; it shortens a stall, and an offer that is not sent is worse than
/// any stall. Higher gives it to larger meetings, closer to the cap.
const RTX_TIME_OFFER_BUDGET: usize = 48 * 1024;

impl<S: EventSink> ShardCore<S> {
    /// Renegotiate with `id` at the end of this turn rather than now: a participant who joins
    /// publishes its audio and video in the same turn, and each other participant then gets
    /// one offer with both instead of one per track (each offer is a to-device message
    /// through the homeservers, and the second would wait for the first's answer anyway).
    pub(super) fn offer_soon(&mut self, id: PeerId) {
        if let Some(p) = self.peers.get_mut(&id) {
            if !p.offer_due {
                p.offer_due = true;
                self.offers_due.push(id);
            }
        }
    }

    pub(super) fn make_due_offers(&mut self, now: Instant) {
        if self.offers_due.is_empty() {
            return;
        }
        for id in std::mem::take(&mut self.offers_due) {
            if let Some(p) = self.peers.get_mut(&id) {
                p.offer_due = false;
                self.maybe_offer(id);
            }
        }
        self.drain_dirty(now);
    }

    pub(super) fn create_peer(
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
        let offer_sdp = offer;
        let offer = match parse_offer(offer_sdp, &HashSet::new()) {
            Ok(o) => o,
            Err(error) => {
                self.counters.drop(DropReason::BadSdp);
                self.emit(SfuEvent::PeerFailed { peer: id, error });
                return;
            }
        };
        // Participants' downlinks are estimated for allocation. A trunk carries what the far
        // side pulls, with no allocation to keep it under an estimate: pacing it to one would
        // only hold its media back.
        let mut rtc = match self.config.estimate_from_bps {
            Some(bps) if role == PeerRole::Participant => {
                engine::new_rtc_estimating(now, Bitrate::from(bps), self.ice_creds())
            }
            _ => engine::new_rtc(now, self.ice_creds()),
        };
        let candidates = self.add_host_candidates(&mut rtc, role == PeerRole::Participant);
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
        let codec_order = engine::format_order(offer_sdp);
        let answer_sdp = engine::in_format_order(&answer.to_sdp_string(), &codec_order);
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
        peer.codec_order = codec_order;
        let ufrag = peer.rtc.direct_api().local_ice_credentials().ufrag;
        self.by_ufrag.insert(ufrag, id);
        self.peers.insert(id, peer);
        self.conferences.entry(conference).or_default().push(id);
        info!(shard = self.index, %id, %conference, "peer created");
        self.emit(SfuEvent::PeerCreated {
            peer: id,
            answer: answer_sdp,
            candidates,
        });
        // A new peer receives every track of the conference until its first subscription
        // (`want` applies the subscription once there is one).
        for t in self.conference_tracks(conference, id) {
            self.want(id, t);
        }
        self.mark_dirty(id);
        self.maybe_offer(id);
    }

    /// Our host candidates added to `rtc`: one per advertised address on this shard's UDP
    /// port and, `with_tcp` and when ICE-TCP is on, a passive one on the TCP port.
    pub(super) fn add_host_candidates(&self, rtc: &mut Rtc, with_tcp: bool) -> Vec<String> {
        let mut candidates = Vec::new();
        for ip in &self.config.advertise_ips {
            let udp = SocketAddr::new(*ip, self.local_addr.port());
            let tcp = self
                .config
                .tcp_port
                .filter(|_| with_tcp)
                .map(|port| SocketAddr::new(*ip, port));
            let made = std::iter::once(Candidate::host(udp, "udp")).chain(tcp.map(|addr| {
                Candidate::builder()
                    .tcp()
                    .host(addr)
                    .tcptype(TcpType::Passive)
                    .build()
            }));
            for c in made {
                match c {
                    Ok(c) => {
                        if let Some(c) = rtc.add_local_candidate(c) {
                            candidates.push(c.to_sdp_string());
                        }
                    }
                    Err(e) => warn!(%ip, error = %e, "unusable advertise address"),
                }
            }
        }
        candidates
    }

    /// ICE credentials for a new peer of this shard (`tcp::ufrag_prefix`).
    fn ice_creds(&self) -> str0m::IceCreds {
        engine::ice_creds(&crate::tcp::ufrag_prefix(self.index))
    }

    /// Dial a trunk: a full-ICE engine whose first offer carries only the data channel (media
    /// is added by later offers from either side, as subscriptions ask for it).
    pub(super) fn dial_trunk(&mut self, id: PeerId, conference: ConferenceId, now: Instant) {
        if self.peers.contains_key(&id) {
            self.emit(SfuEvent::PeerFailed {
                peer: id,
                error: "peer id already in use".into(),
            });
            return;
        }
        let mut rtc = engine::new_trunk_rtc(now, self.ice_creds());
        self.add_host_candidates(&mut rtc, false);
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

    pub(super) fn remote_candidates(&mut self, id: PeerId, candidates: &[String]) {
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

    pub(super) fn remote_offer(&mut self, id: PeerId, sdp: &str, now: Instant) {
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
                peer.codec_order = engine::format_order(sdp);
                let sdp = engine::in_format_order(&answer.to_sdp_string(), &peer.codec_order);
                let sdp = self.codecs_only_where_sent(id, &sdp);
                self.mark_dirty(id);
                self.emit(SfuEvent::Answer { peer: id, sdp });
                // New or changed media arrive as engine events while draining.
                self.drain_dirty(now);
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

    pub(super) fn remote_answer(&mut self, id: PeerId, sdp: &str, now: Instant) {
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
        peer.codec_order = engine::format_order(sdp);
        // The orphaned m-lines were stopped by the offer just answered (one offer is out at a
        // time, and only answers make orphans); a rolled-back offer stops them next time.
        peer.orphan_mids.clear();
        for (track, mid, rids) in pending.added {
            self.start_forwarding(id, track, mid, rids, now);
        }
        self.mark_dirty(id);
        self.maybe_offer(id);
    }

    /// offer is outstanding (one negotiation at a time per peer).
    pub(super) fn maybe_offer(&mut self, id: PeerId) {
        let prev = self.current.replace(id);
        self.maybe_offer_inner(id);
        self.current = prev;
    }

    pub(super) fn maybe_offer_inner(&mut self, id: PeerId) {
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
        for mid in &peer.orphan_mids {
            api.stop_media(*mid);
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
        let sdp = engine::in_format_order(&offer.to_sdp_string(), &peer.codec_order);
        // (`peer.out` does not hold the added tracks yet: their mids are named here.)
        let added_mids: Vec<(TrackKey, String)> =
            added.iter().map(|(t, m, _)| (*t, m.to_string())).collect();
        let sdp = self.codecs_only_where_sent_with(id, &sdp, &added_mids);
        let with_rtx_time = engine::compact_offer(&self.rtx_time_on_cameras(id, &sdp, &added_mids));
        let sdp = within_rtx_time_budget(with_rtx_time, || engine::compact_offer(&sdp));
        let Some(peer) = self.peers.get_mut(&id) else {
            return;
        };
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

    /// The simulcast rids a published track arrives with, if it is simulcast (a track of
    /// another shard: as that shard announced them).
    pub(super) fn source_rids(&self, track: &TrackKey) -> Option<Vec<Rid>> {
        if let Some(p) = self.tracks.get(track).filter(|p| p.home.is_some()) {
            return (!p.remote_rids.is_empty()).then(|| p.remote_rids.clone());
        }
        let media = self.peers.get(&track.publisher)?.rtc.media(track.mid)?;
        match media.rids_rx() {
            Rids::Specific(v) if !v.is_empty() => Some(v.clone()),
            _ => None,
        }
    }
}

impl<S: EventSink> ShardCore<S> {
    /// Whether `track` may arrive in `codec`. A participant here sends the first codec of its
    /// m-line (weir answers in its order); where that is not known (no description of the
    /// m-line yet, a trunk, another shard's track) any codec may arrive, except AV1, which a
    /// browser sends only when it asked for it first.
    fn may_send(&self, track: &TrackKey, codec: Codec) -> bool {
        let unknown = codec != Codec::Av1;
        let Some(publisher) = self.peers.get(&track.publisher) else {
            return true;
        };
        if publisher.role == PeerRole::Trunk {
            return true;
        }
        let mid = track.mid.to_string();
        let first = publisher
            .codec_order
            .iter()
            .find(|m| m.mid == mid)
            .and_then(|m| m.first_codec.as_deref());
        match first {
            Some(name) => name.eq_ignore_ascii_case(codec_name(codec)),
            None => unknown,
        }
    }

    /// `sdp` for `id` with each forwarded video m-line offering only the codec its track
    /// arrives in (`engine::without_codec`; see [`Self::may_send`]).
    pub(super) fn codecs_only_where_sent(&self, id: PeerId, sdp: &str) -> String {
        self.codecs_only_where_sent_with(id, sdp, &[])
    }

    /// [`Self::codecs_only_where_sent`], with m-lines of tracks being added (`added`: track
    /// and mid).
    fn codecs_only_where_sent_with(
        &self,
        id: PeerId,
        sdp: &str,
        added: &[(TrackKey, String)],
    ) -> String {
        let Some(peer) = self.peers.get(&id) else {
            return sdp.to_string();
        };
        let mut sdp = sdp.to_string();
        for codec in FORWARDED_VIDEO_CODECS {
            let pts = engine::payload_types(&peer.rtc, codec);
            let mut without: HashSet<String> = HashSet::new();
            for (track, out) in &peer.out {
                if out.kind == TrackKind::Video && !self.may_send(track, codec) {
                    without.insert(out.mid.to_string());
                }
            }
            for (track, mid) in added {
                let video = self
                    .tracks
                    .get(track)
                    .is_some_and(|p| p.kind == TrackKind::Video);
                if video && !self.may_send(track, codec) {
                    without.insert(mid.clone());
                }
            }
            sdp = engine::without_codec(&sdp, &pts, |mid| without.contains(mid));
        }
        sdp
    }
}

/// The video codecs of weir's engines, each left off the forwarded m-lines whose track does
/// not arrive in it.
const FORWARDED_VIDEO_CODECS: [Codec; 4] = [Codec::Vp8, Codec::Vp9, Codec::H264, Codec::Av1];

/// A codec's name as an `a=rtpmap` line gives it.
fn codec_name(codec: Codec) -> &'static str {
    match codec {
        Codec::Vp8 => "VP8",
        Codec::Vp9 => "VP9",
        Codec::H264 => "H264",
        Codec::Av1 => "AV1",
        _ => "",
    }
}

impl<S: EventSink> ShardCore<S> {
    /// `sdp`, an offer to `id`, with [`FORWARDED_RTX_TIME_MS`] on the m-lines of forwarded
    /// cameras (`added`: track and mid of tracks being added), so that a browser whose picture
    /// broke asks for a keyframe after 0.9 s rather than 3 s (`engine::with_rtx_time`).
    /// Screens get none: a still screen share sends a frame a second.
    fn rtx_time_on_cameras(&self, id: PeerId, sdp: &str, added: &[(TrackKey, String)]) -> String {
        let Some(peer) = self.peers.get(&id) else {
            return sdp.to_string();
        };
        let camera = |t: &TrackKey| {
            self.tracks
                .get(t)
                .is_some_and(|p| p.kind == TrackKind::Video && !self.is_screen(t, p))
        };
        let mut cameras: HashSet<String> = HashSet::new();
        for (track, out) in &peer.out {
            if camera(track) {
                cameras.insert(out.mid.to_string());
            }
        }
        for (track, mid) in added {
            if camera(track) {
                cameras.insert(mid.clone());
            }
        }
        engine::with_rtx_time(sdp, |mid| {
            cameras.contains(mid).then_some(FORWARDED_RTX_TIME_MS)
        })
    }
}

/// `with_rtx_time` if it is within [`RTX_TIME_OFFER_BUDGET`], else the offer without it.
fn within_rtx_time_budget(with_rtx_time: String, without: impl FnOnce() -> String) -> String {
    match escaped_len(&with_rtx_time) <= RTX_TIME_OFFER_BUDGET {
        true => with_rtx_time,
        false => without(),
    }
}

/// The length of `sdp` as a JSON string (each line break escaped as `\r\n`).
fn escaped_len(sdp: &str) -> usize {
    sdp.len() + 2 * sdp.matches("\r\n").count()
}

fn first_mid(sdp: &str) -> Option<String> {
    sdp.lines()
        .find_map(|l| l.strip_prefix("a=mid:"))
        .map(|m| m.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_offer_over_the_budget_goes_without_rtx_time() {
        // 100 lines of 400 bytes: 40,200 bytes escaped, within 48 KiB.
        let line = |tag: &str| format!("a={tag}{}\r\n", "x".repeat(396 - tag.len()));
        let small: String = (0..100).map(|_| line("rtx-time")).collect();
        assert_eq!(escaped_len(&small), 40_200);
        assert_eq!(
            within_rtx_time_budget(small.clone(), || "without".into()),
            small
        );
        // 130 of them: 52,260 bytes escaped, over it.
        let large: String = (0..130).map(|_| line("rtx-time")).collect();
        assert_eq!(
            within_rtx_time_budget(large, || "without".into()),
            "without"
        );
    }
}
