//! Conferences spread over shards: a conference that outgrows one shard
//! (`SfuConfig::spread_conference_above`) takes its next peers on another, so its fan-out
//! uses more than one core.
//!
//! Each shard of a spread conference fans out to its own peers. A track lives on the shard of
//! its publisher (its *home*); the other shards hold it as a *remote* track, announced to them
//! ([`SpreadMessage::TrackUp`]), and every packet of it is handed to them once per shard
//! ([`SpreadMessage::Rtp`], the payload a shared buffer, never copied). There a remote track
//! is forwarded exactly like a local one: layers, temporal layers, allocation and rewriting
//! are each subscriber's own, decided where the subscriber is. What only the home shard can
//! do comes back to it: keyframe requests ([`SpreadMessage::Keyframe`]) and the layers
//! subscribers need, for dynacast ([`SpreadMessage::Demand`]).
//!
//! The control plane decides which shards a conference uses and tells each of them
//! ([`SpreadMessage::Span`]). A shard that sees a shard join a span announces its own tracks
//! there. Messages between shards are not ordered with the control plane's, so a track may be
//! announced to a shard before it learns it is in the span: it keeps such a track for
//! [`SPAN_GRACE`], and drops it after that if it still is not.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use str0m::format::PayloadParams;
use str0m::media::Rid;
use tracing::{debug, info};

use crate::api::PeerRole;
use crate::ids::{ConferenceId, PeerId, TrackKind};
use crate::stats::DropReason;

use super::fanout::Incoming;
use super::single_port::{Outgoing, ShardMessage};
use super::{EventSink, Published, ShardCore, TrackKey};

/// How long a track announced by another shard is kept on a shard that does not know yet
/// that the conference spans it. The control plane tells every shard of a span at once, so
/// the news follows within a loop turn; longer only keeps a stale announcement (one that
/// crossed the shard's leaving the span) around for longer.
const SPAN_GRACE: Duration = Duration::from_secs(2);

/// Between the shards of a conference spread over several.
#[derive(Debug, Clone)]
pub enum SpreadMessage {
    /// From the control plane: the shards `conference` uses now. Each of them is told, and a
    /// shard that is told it is no longer among them drops what it held of the conference.
    Span {
        conference: ConferenceId,
        shards: Vec<usize>,
    },
    /// A track published on its home shard.
    TrackUp(Box<TrackUp>),
    /// A track is gone from its home shard (unpublished, or its publisher left).
    TrackDown { track: TrackKey },
    /// One RTP packet of a track, from its home shard.
    Rtp(Arc<Relayed>),
    /// A subscriber on another shard needs a keyframe of this layer.
    Keyframe { track: TrackKey, layer: Option<Rid> },
    /// The best layer rank the subscribers of a dynacast track on shard `shard` need
    /// (`None`: it has none).
    Demand {
        track: TrackKey,
        shard: usize,
        cap: Option<u8>,
    },
    /// The streams a publisher shares as screens (for allocation's priority on other shards).
    Screens {
        publisher: PeerId,
        streams: Vec<String>,
    },
}

/// What another shard needs to know of a track to forward it.
#[derive(Debug, Clone)]
pub struct TrackUp {
    conference: ConferenceId,
    track: TrackKey,
    home: usize,
    kind: TrackKind,
    stream_id: String,
    track_id: String,
    /// Published by a trunk (the origin rule applies on every shard).
    from_trunk: bool,
    /// Its publisher may be told which layers anyone needs (a participant's video: simulcast
    /// from the start, scalable video once its structure shows): send
    /// [`SpreadMessage::Demand`].
    dynacast: bool,
    screen: bool,
    /// Its simulcast layers, as it arrives (a trunk offers it with them).
    rids: Vec<Rid>,
}

/// One RTP packet handed from its home shard.
#[derive(Clone)]
pub struct Relayed {
    track: TrackKey,
    rid: Option<Rid>,
    /// The publisher's parameters for the packet's payload type.
    params: PayloadParams,
    pub(super) packet: Incoming,
}

impl fmt::Debug for Relayed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Relayed")
            .field("track", &self.track)
            .field("rid", &self.rid)
            .field("seq", &self.packet.seq_no)
            .finish_non_exhaustive()
    }
}

impl<S: EventSink> ShardCore<S> {
    /// A message from another shard of a spread conference, or the control plane's span.
    pub(super) fn handle_spread(&mut self, msg: SpreadMessage, now: Instant) {
        match msg {
            SpreadMessage::Span { conference, shards } => self.on_span(conference, &shards),
            SpreadMessage::TrackUp(up) => self.on_track_up(*up, now),
            SpreadMessage::TrackDown { track } => {
                if let Some(conference) = self.remote_conference(&track) {
                    self.withdraw(conference, &[track]);
                }
            }
            SpreadMessage::Rtp(r) => {
                if self.remote_conference(&r.track).is_none() {
                    self.counters.drop(DropReason::UnknownStream);
                    return;
                }
                // The forwarding delay of this turn counts from the home shard's receipt.
                let received = r.packet.received;
                self.relayed_since = Some(self.relayed_since.map_or(received, |t| t.min(received)));
                self.fan_out(r.track, r.rid, r.params, &r.packet, now);
            }
            SpreadMessage::Keyframe { track, layer } => {
                if self.tracks.get(&track).is_some_and(|p| p.home.is_none()) {
                    self.request_keyframe(&track, layer, now);
                }
            }
            SpreadMessage::Demand { track, shard, cap } => {
                if let Some(p) = self.tracks.get_mut(&track).filter(|p| p.home.is_none()) {
                    p.demand_from.retain(|(s, _)| *s != shard);
                    p.demand_from.extend(cap.map(|c| (shard, c)));
                }
            }
            SpreadMessage::Screens { publisher, streams } => {
                for (t, p) in &mut self.tracks {
                    if t.publisher == publisher && p.home.is_some() {
                        p.screen = streams.contains(&p.stream_id);
                    }
                }
            }
        }
    }

    /// Hand one packet of a local track to the other shards of its spread conference: the
    /// packet, shared with them, for this shard's own fan-out.
    pub(super) fn relay(
        &mut self,
        conference: ConferenceId,
        track: TrackKey,
        rid: Option<Rid>,
        params: PayloadParams,
        packet: Incoming,
    ) -> Arc<Relayed> {
        let relayed = Arc::new(Relayed {
            track,
            rid,
            params,
            packet,
        });
        let others = self.spans.get(&conference).map_or(&[][..], Vec::as_slice);
        for s in others {
            self.outgoing.push(Outgoing {
                to: Some(*s),
                message: ShardMessage::Spread(SpreadMessage::Rtp(relayed.clone())),
            });
        }
        self.counters.spread_out += others.len() as u64;
        relayed
    }

    /// Tell every other shard of `conference`, if it is spread.
    pub(super) fn tell_span(&mut self, conference: ConferenceId, msg: SpreadMessage) {
        let Some(others) = self.spans.get(&conference) else {
            return;
        };
        for s in others {
            self.outgoing.push(Outgoing {
                to: Some(*s),
                message: ShardMessage::Spread(msg.clone()),
            });
        }
    }

    /// A local track was published: the other shards of its conference learn of it.
    pub(super) fn announce(&mut self, track: TrackKey) {
        let Some(up) = self.track_up(&track) else {
            return;
        };
        let conference = up.conference;
        self.tell_span(conference, SpreadMessage::TrackUp(Box::new(up)));
    }

    fn track_up(&self, track: &TrackKey) -> Option<TrackUp> {
        let p = self.tracks.get(track).filter(|p| p.home.is_none())?;
        let publisher = self.peers.get(&track.publisher)?;
        Some(TrackUp {
            conference: p.conference,
            track: *track,
            home: self.index,
            kind: p.kind,
            stream_id: p.stream_id.clone(),
            track_id: p.track_id.clone(),
            from_trunk: p.from_trunk,
            dynacast: p.kind == TrackKind::Video && publisher.role == PeerRole::Participant,
            screen: publisher.screens.contains(&p.stream_id),
            rids: self.source_rids(track).unwrap_or_default(),
        })
    }

    /// The conference of a track held here for another shard.
    fn remote_conference(&self, track: &TrackKey) -> Option<ConferenceId> {
        self.tracks
            .get(track)
            .filter(|p| p.home.is_some())
            .map(|p| p.conference)
    }

    /// The control plane says `conference` uses `shards` now.
    fn on_span(&mut self, conference: ConferenceId, shards: &[usize]) {
        let before = self.spans.remove(&conference).unwrap_or_default();
        let member = shards.contains(&self.index);
        let others: Vec<usize> = shards
            .iter()
            .copied()
            .filter(|s| *s != self.index)
            .collect();
        info!(shard = self.index, %conference, ?shards, "conference span");
        // What shards that left the span (or, if this one left, every shard) held.
        let gone: Vec<TrackKey> = self
            .tracks
            .iter()
            .filter(|(_, p)| p.conference == conference)
            .filter(|(_, p)| p.home.is_some_and(|h| !member || !others.contains(&h)))
            .map(|(t, _)| *t)
            .collect();
        self.withdraw(conference, &gone);
        for p in self.tracks.values_mut() {
            if p.conference == conference {
                p.demand_from.retain(|(s, _)| member && others.contains(s));
            }
        }
        if !member || others.is_empty() {
            return;
        }
        self.spans.insert(conference, others.clone());
        // Shards new to the span learn this shard's tracks, and its publishers' screens.
        let added: Vec<usize> = others.into_iter().filter(|s| !before.contains(s)).collect();
        if added.is_empty() {
            return;
        }
        let ups: Vec<TrackUp> = self
            .tracks
            .keys()
            .filter_map(|t| self.track_up(t))
            .filter(|up| up.conference == conference)
            .collect();
        let screens: Vec<(PeerId, Vec<String>)> = self
            .conferences
            .get(&conference)
            .into_iter()
            .flatten()
            .filter_map(|id| Some((*id, self.peers.get(id)?)))
            .filter(|(_, p)| !p.screens.is_empty())
            .map(|(id, p)| (id, p.screens.clone()))
            .collect();
        for to in added {
            for up in &ups {
                self.outgoing.push(Outgoing {
                    to: Some(to),
                    message: ShardMessage::Spread(SpreadMessage::TrackUp(Box::new(up.clone()))),
                });
            }
            for (publisher, streams) in &screens {
                self.outgoing.push(Outgoing {
                    to: Some(to),
                    message: ShardMessage::Spread(SpreadMessage::Screens {
                        publisher: *publisher,
                        streams: streams.clone(),
                    }),
                });
            }
        }
    }

    /// Another shard's track: held here, and offered to this shard's peers of the conference
    /// as any track of it would be.
    fn on_track_up(&mut self, up: TrackUp, now: Instant) {
        if self.tracks.contains_key(&up.track) || up.home == self.index {
            return;
        }
        debug!(shard = self.index, home = up.home, publisher = %up.track.publisher, mid = %up.track.mid, "remote track");
        self.tracks.insert(
            up.track,
            Published {
                home: Some(up.home),
                from_trunk: up.from_trunk,
                remote_dynacast: up.dynacast,
                screen: up.screen,
                remote_rids: up.rids,
                ..Published::new(up.conference, up.kind, up.stream_id, up.track_id, now)
            },
        );
        let members: Vec<PeerId> = self
            .conferences
            .get(&up.conference)
            .cloned()
            .unwrap_or_default();
        for m in members {
            self.want(m, up.track);
            self.offer_soon(m);
        }
    }

    /// Tracks gone from `conference`: no longer forwarded to anyone here, and (for this
    /// shard's own) gone from the other shards too.
    pub(super) fn withdraw(&mut self, conference: ConferenceId, tracks: &[TrackKey]) {
        if tracks.is_empty() {
            return;
        }
        for t in tracks {
            if let Some(p) = self.tracks.remove(t) {
                if p.home.is_none() {
                    self.tell_span(conference, SpreadMessage::TrackDown { track: *t });
                }
            }
            self.forget_speaker(conference, t);
        }
        let members: Vec<PeerId> = self
            .conferences
            .get(&conference)
            .cloned()
            .unwrap_or_default();
        for m in members {
            let mut changed = false;
            if let Some(p) = self.peers.get_mut(&m) {
                for t in tracks {
                    changed |= p.desired.remove(t).is_some();
                }
            }
            if changed {
                self.offer_soon(m);
            }
        }
    }

    /// Housekeeping: drop tracks announced for a conference this shard is still not told it
    /// spans, after [`SPAN_GRACE`].
    pub(super) fn prune_remote_tracks(&mut self, now: Instant) {
        let stale: Vec<(ConferenceId, TrackKey)> = self
            .tracks
            .iter()
            .filter(|(_, p)| p.home.is_some() && !self.spans.contains_key(&p.conference))
            .filter(|(_, p)| now.saturating_duration_since(p.announced) >= SPAN_GRACE)
            .map(|(t, p)| (p.conference, *t))
            .collect();
        for (conference, t) in stale {
            self.withdraw(conference, &[t]);
        }
    }

    /// Ask the home shard of a remote track for a keyframe of `layer`.
    pub(super) fn keyframe_from_home(&mut self, track: &TrackKey, layer: Option<Rid>) -> bool {
        let Some(home) = self.tracks.get(track).and_then(|p| p.home) else {
            return false;
        };
        self.outgoing.push(Outgoing {
            to: Some(home),
            message: ShardMessage::Spread(SpreadMessage::Keyframe {
                track: *track,
                layer,
            }),
        });
        true
    }
}
