//! Publications and subscriptions: which tracks exist in a conference, and which of them each
//! peer should receive.

use std::time::Instant;

use str0m::media::{MediaKind, Mid, Rid, Rids};
use tracing::info;

use crate::api::{PeerRole, PublishedTrack, SfuEvent, Subscription, RTX_HISTORY_AGE};
use crate::forward::svc::SvcFilter;
use crate::forward::{
    rid_rank, LayerDemand, LayerSelector, Now, SeqTsRewriter, TemporalFilter, TrunkLayers, Vp8Ids,
};
use crate::ids::{ConferenceId, MediaId, PeerId, TrackKind};

use super::{Dynacast, EventSink, OutTrack, Peer, Published, ShardCore, TrackKey};

/// Queued retransmissions are dropped when they exceed this share of what a stream sends (the
/// engine's default): past it, resending competes with fresh media on a link already losing.
const RTX_RATIO_CAP: f32 = 0.15;

/// Give a video send stream an empty retransmission history, and forget the bytes counted
/// against [`RTX_RATIO_CAP`]: when a track starts, and when a subscriber switches layers
/// ([`super::fanout`]). After a switch, the history holds only packets of the layer left,
/// which the new layer's keyframe makes useless; and the resends that layer caused (a move down
/// is a link losing) would otherwise keep the ratio over the cap for a second, so that lost
/// packets of the keyframe were never resent and the subscriber's picture stayed frozen until
/// it asked for another keyframe (Chromium: after 3 s).
pub(super) fn fresh_retransmissions(tx: &mut str0m::rtp::StreamTx, history: usize) {
    tx.set_rtx_cache(history, RTX_HISTORY_AGE, None);
    tx.set_rtx_cache(history, RTX_HISTORY_AGE, Some(RTX_RATIO_CAP));
}

impl<S: EventSink> ShardCore<S> {
    /// Whether `track` (held here as `p`) is a shared screen: its publisher says so in its
    /// metadata, or, for another shard's track, that shard did.
    pub(super) fn is_screen(&self, track: &TrackKey, p: &Published) -> bool {
        match p.home {
            None => self
                .peers
                .get(&track.publisher)
                .is_some_and(|pp| pp.screens.contains(&p.stream_id)),
            Some(_) => p.screen,
        }
    }

    /// Record that `track` should be forwarded to `subscriber`.
    pub(super) fn want(&mut self, subscriber: PeerId, track: TrackKey) {
        let Some(p) = self.tracks.get(&track) else {
            return;
        };
        if p.from_trunk && self.is_trunk(subscriber) {
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

    /// Every track of `conference` on this shard (its own and, if the conference is spread,
    /// the other shards'), but those `except` publishes.
    pub(super) fn conference_tracks(
        &self,
        conference: ConferenceId,
        except: PeerId,
    ) -> Vec<TrackKey> {
        self.tracks
            .iter()
            .filter(|(t, p)| p.conference == conference && t.publisher != except)
            .map(|(t, _)| *t)
            .collect()
    }

    pub(super) fn is_trunk(&self, id: PeerId) -> bool {
        self.peers
            .get(&id)
            .is_some_and(|p| p.role == PeerRole::Trunk)
    }

    /// The simulcast layer cap for `track` as received by `sub` (from its subscription).
    pub(super) fn layer_cap(&self, sub: PeerId, track: &TrackKey) -> u8 {
        let (Some(peer), Some(p)) = (self.peers.get(&sub), self.tracks.get(track)) else {
            return u8::MAX;
        };
        size_cap(peer, p)
    }

    /// Replace what `id` receives with `subscriptions` (an explicit set from now on).
    pub(super) fn subscribe(&mut self, id: PeerId, subscriptions: Vec<Subscription>, now: Instant) {
        let Some(peer) = self.peers.get_mut(&id) else {
            return;
        };
        peer.explicit = Some(subscriptions);
        peer.desired.clear();
        let conference = peer.conference;
        for t in self.conference_tracks(conference, id) {
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
            let Some(peer) = self.peers.get_mut(&id) else {
                return;
            };
            let estimating = peer.estimate.is_some();
            let Some(out) = peer.out.get_mut(&t) else {
                continue;
            };
            out.cap = cap;
            if out.awaits_allocation(estimating) {
                continue; // the next allocation applies the new cap
            }
            let cap = out.layer_cap();
            let best = self
                .tracks
                .get(&t)
                .and_then(|p| p.activity.best_active_capped(now, cap));
            if let Some(layer) = best {
                self.retarget(id, &t, layer, now);
            }
        }
    }

    /// Make an offer to `id` if what it should receive differs from what is negotiated and no
    pub(super) fn start_forwarding(
        &mut self,
        id: PeerId,
        track: TrackKey,
        mid: Mid,
        rids: Vec<Rid>,
        now: Instant,
    ) {
        let cap = self.layer_cap(id, &track);
        let Some(peer) = self.peers.get_mut(&id) else {
            return;
        };
        let Some((kind, stream_id, track_id)) = peer.desired.get(&track).cloned() else {
            // withdrawn while the offer was out: the next offer stops its m-line
            peer.orphan_mids.push(mid);
            return;
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
                temporal: TemporalFilter::default(),
                svc: SvcFilter::default(),
                vp8_ids: Vp8Ids::default(),
                cap,
                pt_map: Vec::new(),
                tx_ssrcs: Vec::new(),
                allocated: Now::New,
                flowing_since: None,
                resume_untold: false,
                drop_at_keyframe: false,
                trunk: (!rids.is_empty()).then(|| {
                    TrunkLayers::new(&rids, clock_rate, || {
                        (rand::random::<u16>() % 16_384, rand::random())
                    })
                }),
            },
        );
        peer.out_by_mid.insert(mid, track);
        if kind == TrackKind::Video {
            let history = self.config.rtx_history_packets;
            let mut api = peer.rtc.direct_api();
            let layers: Vec<Option<Rid>> = if rids.is_empty() {
                vec![None]
            } else {
                rids.iter().map(|r| Some(*r)).collect()
            };
            for rid in layers {
                if let Some(tx) = api.stream_tx_by_mid(mid, rid) {
                    fresh_retransmissions(tx, history);
                }
            }
        }
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
        // With an estimate, allocation decides first, on the track's next packet.
        if self.peers.get(&id).is_some_and(|p| p.estimate.is_some()) && kind == TrackKind::Video {
            if let Some(p) = self.tracks.get_mut(&track) {
                p.unallocated = true;
            }
            return;
        }
        let best = self
            .tracks
            .get(&track)
            .and_then(|p| p.activity.best_active_capped(now, cap));
        if let Some(layer) = best {
            self.retarget(id, &track, layer, now);
        }
    }

    pub(super) fn publish(&mut self, id: PeerId, mid: Mid, kind: MediaKind, now: Instant) {
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
        // A participant's simulcast video is dynacast: its publisher is told which layers
        // anyone needs. (A trunk's far focus pulls only what is subscribed already.) Scalable
        // video becomes dynacast when its first structure shows several spatial layers.
        let dynacast = match media.rids_rx() {
            Rids::Specific(rids)
                if !rids.is_empty()
                    && kind == TrackKind::Video
                    && peer.role == PeerRole::Participant =>
            {
                Some(Dynacast::Rids(LayerDemand::new(
                    rids.iter().map(|r| (*r, rid_rank(Some(r)))),
                    now,
                )))
            }
            _ => None,
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
        let from_trunk = peer.role == PeerRole::Trunk;
        self.tracks.insert(
            tref,
            Published {
                from_trunk,
                dynacast,
                ..Published::new(
                    conference,
                    kind,
                    track.stream_id.clone(),
                    track.track_id.clone(),
                    now,
                )
            },
        );
        self.announce(tref);
        info!(shard = self.index, %id, %conference, mid = %mid, %kind, stream = %track.stream_id, "track published");
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

    pub(super) fn unpublish(&mut self, id: PeerId, mid: Mid) {
        let Some(peer) = self.peers.get_mut(&id) else {
            return;
        };
        let Some(tref) = peer.published.remove(&mid) else {
            return;
        };
        peer.ssrc_mid.retain(|_, (m, _)| *m != mid);
        let conference = peer.conference;
        self.emit(SfuEvent::TrackUnpublished {
            peer: id,
            mid: MediaId(tref.mid.to_string()),
        });
        self.withdraw(conference, &[tref]);
    }
}

/// The best layer rank worth sending a participant: without a subscription, what fits a grid
/// of the videos it receives; else the largest of the sizes it asked for the track at.
pub(super) fn size_cap(peer: &Peer, p: &Published) -> u8 {
    match &peer.explicit {
        None => peer.default_cap,
        Some(subs) => subs
            .iter()
            .filter(|s| s.stream_id == p.stream_id && s.track_id == p.track_id)
            .map(Subscription::max_rank)
            .max()
            .unwrap_or(u8::MAX),
    }
}
