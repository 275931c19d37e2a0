//! Keyframes and layers: which simulcast layer each subscriber gets, which layers a trunk
//! carries, and the keyframe requests that switching needs.

use std::time::Instant;

use tracing::debug;

use str0m::media::{KeyframeRequest, KeyframeRequestKind, Rid};

use crate::forward::{grid_cap, trunk_layers_wanted, LayerActivity};
use crate::ids::{PeerId, TrackKind};

use super::{EventSink, ShardCore, TrackKey};

/// The best layer rank a video may get before its first allocation, where the subscriber's
/// downlink is estimated (`start` is the estimate its engine starts from; `None` when not
/// estimated, or once allocated): within `start`, not the best layer flowing. The first
/// estimate comes with the first transport-wide feedback, after the first packets, and the
/// first allocation at the next round after it: a video that started on the best layer
/// meanwhile put 1.5 Mbit/s into a 600 kbit/s link, lost a third of its packets at once and
/// dragged the estimate down for seconds.
pub(super) fn before_allocation(
    cap: u8,
    start: Option<u64>,
    activity: &LayerActivity<Option<Rid>>,
    now: Instant,
) -> u8 {
    match start {
        Some(bps) => cap.min(activity.best_rank_fitting(now, bps)),
        None => cap,
    }
}

impl<S: EventSink> ShardCore<S> {
    /// Point a subscriber's copy of a track at `layer`, asking for the keyframe it needs.
    pub(super) fn retarget(
        &mut self,
        sub: PeerId,
        track: &TrackKey,
        layer: Option<Rid>,
        now: Instant,
    ) {
        let needs_keyframe = self
            .peers
            .get_mut(&sub)
            .and_then(|p| p.out.get_mut(track))
            .is_some_and(|o| o.kind == TrackKind::Video && o.layers.set_target(layer, now));
        if needs_keyframe {
            self.request_keyframe(track, layer, now);
        }
    }

    /// Whether `sub` receives `track` as simulcast (a trunk), rather than one layer at a time.
    pub(super) fn carries_layers(&self, sub: PeerId, track: &TrackKey) -> bool {
        self.peers
            .get(&sub)
            .and_then(|p| p.out.get(track))
            .is_some_and(|o| o.trunk.is_some())
    }

    /// The layers of `track` a trunk carries ([`trunk_layers_wanted`]: the best layer
    /// flowing within the largest size its far side subscribed at, and every layer flowing
    /// below it). Newly carried layers get a keyframe request.
    pub(super) fn sync_trunk_layers(&mut self, sub: PeerId, track: &TrackKey, now: Instant) {
        let (Some(peer), Some(p)) = (self.peers.get(&sub), self.tracks.get(track)) else {
            return;
        };
        let caps = peer
            .explicit
            .iter()
            .flatten()
            .filter(|s| s.stream_id == p.stream_id && s.track_id == p.track_id)
            .map(|s| s.max_rank());
        let wanted: Vec<Rid> = trunk_layers_wanted(&p.activity, caps, now)
            .into_iter()
            .flatten()
            .collect();
        let added = self
            .peers
            .get_mut(&sub)
            .and_then(|p| p.out.get_mut(track))
            .and_then(|o| o.trunk.as_mut())
            .map(|t| t.set_wanted(&wanted))
            .unwrap_or_default();
        for rid in added {
            self.request_keyframe(track, Some(rid), now);
        }
    }
    /// Ask the publisher for a keyframe of one layer, coalesced with other requests for it.
    pub(super) fn request_keyframe(&mut self, track: &TrackKey, layer: Option<Rid>, now: Instant) {
        let Some(p) = self.tracks.get_mut(track) else {
            return;
        };
        if p.kind != TrackKind::Video {
            return;
        }
        let now_sent = p.keyframes.request(layer, now);
        debug!(publisher = %track.publisher, mid = %track.mid, ?layer, held = !now_sent, "keyframe wanted");
        if now_sent {
            self.send_pli(track, layer);
        } else if let Some(due) = p.keyframes.deadline() {
            self.keyframes_due = Some(self.keyframes_due.map_or(due, |t| t.min(due)));
        }
    }

    /// Send the keyframe requests that coalescing held back and whose window has ended, and
    /// note when the next ones are due.
    pub(super) fn send_owed_keyframe_requests(&mut self, now: Instant) {
        let mut owed: Vec<(TrackKey, Option<Rid>)> = Vec::new();
        let mut next: Option<Instant> = None;
        for (t, p) in &mut self.tracks {
            owed.extend(p.keyframes.poll(now).into_iter().map(|l| (*t, l)));
            if let Some(due) = p.keyframes.deadline() {
                next = Some(next.map_or(due, |n| n.min(due)));
            }
        }
        self.keyframes_due = next;
        for (track, layer) in owed {
            debug!(publisher = %track.publisher, mid = %track.mid, ?layer, "keyframe request sent after the window");
            self.send_pli(&track, layer);
        }
    }

    pub(super) fn send_pli(&mut self, track: &TrackKey, layer: Option<Rid>) {
        if self.keyframe_from_home(track, layer) {
            return; // its publisher is on another shard: that shard asks
        }
        let Some(peer) = self.peers.get_mut(&track.publisher) else {
            return;
        };
        let Some(mid) = peer
            .published
            .iter()
            .find(|(_, t)| *t == track)
            .map(|(m, _)| *m)
        else {
            return;
        };
        if let Some(rx) = peer.rtc.direct_api().stream_rx_by_mid(mid, layer) {
            rx.request_keyframe(KeyframeRequestKind::Pli);
            self.counters.keyframe_requests += 1;
        }
        let publisher = track.publisher;
        self.mark_dirty(publisher);
    }

    /// A subscriber asked for a keyframe: pass it on for the layer it receives.
    pub(super) fn on_keyframe_request(&mut self, id: PeerId, req: KeyframeRequest, now: Instant) {
        let track = self
            .peers
            .get(&id)
            .and_then(|p| p.out_by_mid.get(&req.mid))
            .cloned();
        let Some(track) = track else {
            return;
        };
        if self.carries_layers(id, &track) {
            // A far focus asks for the layer it names.
            if req.rid.is_some() {
                self.request_keyframe(&track, req.rid, now);
            }
            return;
        }
        // Forward to the layer this subscriber receives (or is about to).
        let layer = self
            .peers
            .get(&id)
            .and_then(|p| p.out.get(&track))
            .and_then(|o| o.layers.current().or(o.layers.target()));
        if let Some(layer) = layer {
            self.request_keyframe(&track, layer, now);
        }
    }

    /// Housekeeping for layers: follow the best layer that flows (down when the current one stalls, back up when a better one
    /// returns), keep trunks carrying what their far side watches, and ask again for
    /// keyframes a trunk layer still waits for.
    pub(super) fn follow_layers(&mut self, now: Instant) {
        self.refresh_default_caps();
        let mut moves: Vec<(PeerId, TrackKey, Option<Rid>)> = Vec::new();
        let mut trunk_layers: Vec<(PeerId, TrackKey)> = Vec::new();
        let mut awaiting: Vec<(TrackKey, Rid)> = Vec::new();
        for (t, p) in &self.tracks {
            // Follow the best layer that flows: down when the current one stalls, back up when
            // a better one returns, within the size cap and what allocation gives.
            if p.kind != TrackKind::Video {
                continue;
            }
            for sub in &p.subscribers {
                let Some(speer) = self.peers.get(sub) else {
                    continue;
                };
                if let Some(tl) = speer.out.get(t).and_then(|o| o.trunk.as_ref()) {
                    trunk_layers.push((*sub, *t));
                    // A layer whose keyframe request went unanswered is asked for again
                    // (coalesced like every request).
                    awaiting.extend(
                        tl.wanted()
                            .filter(|l| tl.awaiting_keyframe(*l))
                            .map(|l| (*t, l)),
                    );
                    continue;
                }
                let Some(out) = speer.out.get(t) else {
                    continue;
                };
                if out.awaits_allocation(speer.estimate.is_some()) {
                    continue;
                }
                let cap = before_allocation(
                    out.layer_cap(),
                    speer.before_allocation(self.config.estimate_from_bps, out.allocated, now),
                    &p.activity,
                    now,
                );
                let Some(best) = p.activity.best_active_capped(now, cap) else {
                    continue;
                };
                let target = out.layers.target();
                if target.is_some() && target != Some(best) {
                    moves.push((*sub, *t, best));
                }
            }
        }
        for (sub, t, layer) in moves {
            self.retarget(sub, &t, layer, now);
        }
        for (sub, t) in trunk_layers {
            self.sync_trunk_layers(sub, &t, now);
        }
        for (t, layer) in awaiting {
            self.request_keyframe(&t, Some(layer), now);
        }
    }

    /// A participant that never subscribed gets the layers that fit a grid of the videos it
    /// receives; as people come and go the grid changes, and with it the cap of each of its
    /// video tracks (which the layer following just below then applies).
    fn refresh_default_caps(&mut self) {
        for peer in self.peers.values_mut() {
            if peer.explicit.is_some() {
                continue;
            }
            let videos = peer
                .desired
                .values()
                .filter(|(kind, _, _)| *kind == TrackKind::Video)
                .count();
            let cap = grid_cap(videos);
            if cap == peer.default_cap {
                continue;
            }
            peer.default_cap = cap;
            for out in peer.out.values_mut() {
                if out.kind == TrackKind::Video && out.trunk.is_none() {
                    out.cap = cap;
                }
            }
        }
    }
}
