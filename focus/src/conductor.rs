//! The conductor: conferences and participants. It turns authorised call-leg events from
//! signalling into media-plane commands, and media-plane events back into call signalling.
//!
//! Conferences are keyed by (room, conf_id); participants by (user, device) within a
//! conference. A new call from the same device replaces the old leg.

mod admin;
mod cascade;
#[cfg(test)]
mod cascade_tests;
mod drain;
#[cfg(test)]
mod log_tests;
mod screens;
mod speakers;
mod streams;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Instant;

use tracing::{debug, info, warn};
use weir_sfu::{
    CloseReason, Command, ConferenceId, ForwardedTrack, LocalCandidate, PeerId, PeerRole, Sfu,
    SfuEvent, TrackKind,
};
use weir_signalling::{
    Candidate, ConfId, DeviceId, Leg, LegCommand, LegEvent, RoomId, SdpStreamMetadata, SdpType,
    StreamId, StreamMetadata, TrackId, TrackMetadata, UserId,
};

use crate::metrics::Metrics;

/// Where the conductor sends call signalling. Implemented by the signalling handle, and by a
/// recorder in tests.
pub trait LegSender {
    fn send(&self, cmd: LegCommand);
}

impl LegSender for weir_signalling::SignallingHandle {
    fn send(&self, cmd: LegCommand) {
        weir_signalling::SignallingHandle::send(self, cmd)
    }
}

/// Where the conductor sends media commands. Implemented by [`Sfu`], and by a recorder in tests.
pub trait MediaPlane {
    fn command(&self, cmd: Command) -> Result<(), String>;
    fn forget(&self, peer: PeerId);
}

impl MediaPlane for Arc<Sfu> {
    fn command(&self, cmd: Command) -> Result<(), String> {
        self.send(cmd).map_err(|e| e.to_string())
    }

    fn forget(&self, peer: PeerId) {
        self.forget_peer(peer)
    }
}

struct Participant {
    leg: Leg,
    conference: (RoomId, ConfId),
    /// The participant's own streams as it describes them (invite, negotiate, metadata_changed).
    metadata: SdpStreamMetadata,
    invite_at: Instant,
    answered: bool,
    /// MSC3898 subscriptions from the data channel: (stream id, track id) → the heights asked
    /// (`None`: no size given). Empty until the first `m.call.track_subscription`; the media
    /// plane then forwards exactly these instead of everything. A participant asks one size
    /// per track; a far focus asks each size its own subscribers display (docs/cascading.md).
    subscriptions: BTreeMap<(String, String), BTreeSet<Option<u32>>>,
    /// Its data channel is open (focus-initiated messages can be sent).
    channel_open: bool,
}

struct Conference {
    id: ConferenceId,
    members: HashMap<(UserId, DeviceId), PeerId>,
    /// Last known description of every stream forwarded in this conference, by stream id.
    /// Clients never forget metadata, so neither do we while the conference lives.
    streams: HashMap<String, StreamMetadata>,
    /// Audio sources speaking now, and the dominant speaker, as last announced.
    speaking: usize,
    dominant: Option<serde_json::Value>,
    /// The streams last announced to its participants (`io.weir.streams`).
    announced_streams: Option<SdpStreamMetadata>,
}

impl Conference {
    fn new(id: ConferenceId) -> Self {
        Conference {
            id,
            members: HashMap::new(),
            streams: HashMap::new(),
            speaking: 0,
            dominant: None,
            announced_streams: None,
        }
    }
}

pub struct Conductor<L: LegSender, M: MediaPlane> {
    legs: L,
    media: M,
    metrics: Arc<Metrics>,
    /// Our party id (the focus's device id): `select_answer` must name it.
    own_party: String,
    /// Our Matrix user: with `own_party`, who we are among a conference's foci.
    own_user: UserId,
    /// Trunks to other foci and what each conference's foci are (cascade.rs).
    cascade: cascade::Cascade,
    conferences: HashMap<(RoomId, ConfId), Conference>,
    participants: HashMap<PeerId, Participant>,
    /// What each subscriber currently has forwarded, from our last offer to it.
    forwarded: HashMap<PeerId, Vec<ForwardedTrack>>,
    next_peer: u64,
    next_conference: u64,
    /// Draining (drain.rs): no new conferences, stop when the last participant leaves.
    draining: Option<drain::Drain>,
}

pub use admin::{AdminReply, AdminRequest};
pub use drain::DrainStatus;

impl<L: LegSender, M: MediaPlane> Conductor<L, M> {
    pub fn new(
        legs: L,
        media: M,
        metrics: Arc<Metrics>,
        own_user: UserId,
        own_party: String,
    ) -> Self {
        Conductor {
            legs,
            media,
            metrics,
            own_party,
            own_user,
            cascade: cascade::Cascade::default(),
            conferences: HashMap::new(),
            participants: HashMap::new(),
            forwarded: HashMap::new(),
            next_peer: 1,
            next_conference: 1,
            draining: None,
        }
    }

    pub fn participant_count(&self) -> usize {
        self.participants.len()
    }

    fn find_leg(&self, leg: &Leg) -> Option<PeerId> {
        let conf = self
            .conferences
            .get(&(leg.room_id.clone(), leg.conf_id.clone()))?;
        let peer = *conf
            .members
            .get(&(leg.user_id.clone(), leg.device_id.clone()))?;
        let p = self.participants.get(&peer)?;
        (p.leg.call_id == leg.call_id).then_some(peer)
    }

    // ------------------------------------------------------------ signalling → media

    pub fn on_leg_event(&mut self, event: LegEvent) {
        let span = match event.leg() {
            Some(leg) => leg_span(leg, self.find_leg(leg)),
            None => tracing::Span::none(),
        };
        let _in = span.enter();
        match event {
            LegEvent::Invite {
                leg, sdp, metadata, ..
            } => self.invite(leg, sdp, metadata),
            LegEvent::Negotiate {
                leg,
                kind,
                sdp,
                metadata,
            } => {
                let Some(peer) = self.find_leg(&leg) else {
                    debug!(call = %leg.call_id, "negotiate for a leg we no longer have");
                    return;
                };
                if let Some(md) = metadata {
                    self.update_metadata(peer, md, false);
                }
                let cmd = match kind {
                    SdpType::Offer => Command::RemoteOffer { peer, sdp },
                    SdpType::Answer => Command::RemoteAnswer { peer, sdp },
                };
                self.media_command(peer, cmd);
            }
            LegEvent::MetadataChanged { leg, metadata } => {
                if let Some(peer) = self.find_leg(&leg) {
                    self.update_metadata(peer, metadata, true);
                }
            }
            LegEvent::Candidates { leg, candidates } => {
                // ICE-lite: the participant's checks tell us its addresses; its candidates
                // carry nothing we need. A trunk we dialled runs full ICE and does.
                match self.find_leg(&leg) {
                    Some(peer) if self.cascade.dialled(peer) => {
                        let candidates = candidates
                            .into_iter()
                            .filter(|c| !c.is_end_of_candidates())
                            .map(|c| c.candidate)
                            .collect();
                        self.media_command(peer, Command::RemoteCandidates { peer, candidates });
                    }
                    _ => {
                        debug!(call = %leg.call_id, n = candidates.len(), "candidates (ICE-lite: not needed)")
                    }
                }
            }
            LegEvent::Answer { leg, sdp, metadata } => self.trunk_answered(leg, sdp, metadata),
            LegEvent::Foci {
                room_id,
                conf_id,
                foci,
            } => self.foci_changed(room_id, conf_id, foci),
            LegEvent::SelectAnswer {
                leg,
                selected_party_id,
            } => {
                if let Some(peer) = self.find_leg(&leg) {
                    if selected_party_id.as_str() != self.own_party {
                        info!(call = %leg.call_id, "answer selected elsewhere: dropping leg");
                        self.end(peer, "answered_elsewhere", false);
                    }
                }
            }
            LegEvent::Hangup { leg, reason } => {
                if let Some(peer) = self.find_leg(&leg) {
                    info!(call = %leg.call_id, user = %leg.user_id, %reason, "participant hung up");
                    self.end(peer, "participant_hangup", false);
                }
            }
            LegEvent::MemberGone {
                room_id,
                conf_id,
                user_id,
                device_id,
            } => {
                let peer = self
                    .conferences
                    .get(&(room_id, conf_id))
                    .and_then(|c| c.members.get(&(user_id, device_id)).copied());
                if let Some(peer) = peer {
                    info!(%peer, "participant left the call in room state");
                    self.end(peer, "member_gone", false);
                }
            }
        }
    }

    fn invite(&mut self, leg: Leg, sdp: String, metadata: SdpStreamMetadata) {
        if self.refuse_while_draining(&leg) {
            return;
        }
        let key = (leg.room_id.clone(), leg.conf_id.clone());
        let member = (leg.user_id.clone(), leg.device_id.clone());
        if let Some(conf) = self.conferences.get(&key) {
            if let Some(&old) = conf.members.get(&member) {
                if self.participants[&old].leg.call_id == leg.call_id {
                    // The same call offered again: a renegotiation of the live leg.
                    debug!(call = %leg.call_id, "re-invite on a live leg: treated as a re-offer");
                    self.update_metadata(old, metadata, false);
                    self.media_command(old, Command::RemoteOffer { peer: old, sdp });
                    return;
                }
                info!(user = %leg.user_id, device = %leg.device_id, "new call from the same device replaces the old leg");
                self.end(old, "replaced", true);
            }
        }
        let role = if leg.trunk {
            PeerRole::Trunk
        } else {
            PeerRole::Participant
        };
        let next_conference = &mut self.next_conference;
        let conf = self.conferences.entry(key.clone()).or_insert_with(|| {
            let id = ConferenceId(*next_conference);
            *next_conference += 1;
            Conference::new(id)
        });
        let peer = PeerId(self.next_peer);
        self.next_peer += 1;
        conf.members.insert(member, peer);
        let conference = conf.id;
        info!(%peer, user = %leg.user_id, device = %leg.device_id, call = %leg.call_id, conf = %leg.conf_id, "invite accepted");
        let mut p = Participant {
            leg,
            conference: key,
            metadata: SdpStreamMetadata::new(),
            invite_at: Instant::now(),
            answered: false,
            subscriptions: BTreeMap::new(),
            channel_open: false,
        };
        p.metadata = if p.leg.trunk {
            metadata // owners checked by signalling against room state
        } else {
            self.owned_metadata(&p.leg, metadata)
        };
        let key = p.conference.clone();
        let trunk = p.leg.trunk;
        self.participants.insert(peer, p);
        if trunk {
            self.cascade.answered_trunk(peer);
        }
        self.refresh_gauges();
        self.media_command(
            peer,
            Command::CreatePeer {
                peer,
                conference,
                offer: sdp,
                role,
            },
        );
        self.tell_screens(peer, true);
        // A new local participant may want what the far side publishes.
        self.sync_trunk_subscriptions(&key);
    }

    /// The participant's description of its own streams, with the owner set to the
    /// authenticated sender whatever the client claimed.
    fn owned_metadata(&self, leg: &Leg, metadata: SdpStreamMetadata) -> SdpStreamMetadata {
        metadata
            .into_iter()
            .map(|(id, mut m)| {
                m.user_id = Some(leg.user_id.clone());
                m.device_id = Some(leg.device_id.clone());
                (id, m)
            })
            .collect()
    }

    fn update_metadata(&mut self, peer: PeerId, metadata: SdpStreamMetadata, relay: bool) {
        if self.participants.get(&peer).is_some_and(|p| p.leg.trunk) {
            return self.trunk_catalogue(peer, metadata);
        }
        let Some(p) = self.participants.get_mut(&peer) else {
            return;
        };
        let owned: SdpStreamMetadata = metadata
            .into_iter()
            .map(|(id, mut m)| {
                m.user_id = Some(p.leg.user_id.clone());
                m.device_id = Some(p.leg.device_id.clone());
                (id, m)
            })
            .collect();
        let mut changed = SdpStreamMetadata::new();
        // A client describes all its streams each time (MSC3077): one it no longer describes
        // has ended (a screen share stopped). An empty description is a client that describes
        // nothing, not one that stopped everything.
        let ended = if owned.is_empty() {
            0
        } else {
            let before = p.metadata.len();
            p.metadata.retain(|id, _| owned.contains_key(id));
            before - p.metadata.len()
        };
        for (id, m) in owned {
            // Keep what we learned of the tracks (kind) when a client sends a bare update.
            let merged = match p.metadata.get(&id) {
                Some(old) if m.tracks.is_empty() => StreamMetadata {
                    tracks: old.tracks.clone(),
                    ..m
                },
                _ => m,
            };
            if p.metadata.get(&id) != Some(&merged) {
                changed.insert(id.clone(), merged.clone());
            }
            p.metadata.insert(id, merged);
        }
        if changed.is_empty() && ended == 0 {
            return;
        }
        let key = p.conference.clone();
        let owner = peer;
        if let Some(conf) = self.conferences.get_mut(&key) {
            for (id, m) in &changed {
                if conf.streams.contains_key(id.as_str()) {
                    conf.streams.insert(id.as_str().to_string(), m.clone());
                }
            }
        }
        self.publish_catalogue(&key);
        self.tell_screens(owner, false);
        if !relay {
            return;
        }
        self.relay_metadata(owner, &changed);
    }

    /// Tell every local subscriber that has one of `owner`'s streams forwarded about the
    /// changed descriptions (trunks get the whole catalogue instead: `publish_catalogue`).
    fn relay_metadata(&self, owner: PeerId, changed: &SdpStreamMetadata) {
        for (sub, tracks) in &self.forwarded {
            if *sub == owner || self.cascade.is_trunk(*sub) {
                continue;
            }
            let relevant: SdpStreamMetadata = changed
                .iter()
                .filter(|(id, _)| {
                    tracks
                        .iter()
                        .any(|t| t.publisher == owner && t.stream_id == id.as_str())
                })
                .map(|(id, m)| (id.clone(), m.clone()))
                .collect();
            if relevant.is_empty() {
                continue;
            }
            if let Some(sp) = self.participants.get(sub) {
                self.metrics.metadata_relayed.inc();
                self.legs.send(LegCommand::MetadataChanged {
                    leg: sp.leg.clone(),
                    metadata: relevant,
                });
            }
        }
    }

    fn media_command(&mut self, peer: PeerId, cmd: Command) {
        if let Err(e) = self.media.command(cmd) {
            warn!(%peer, error = %e, "media plane refused a command: ending the leg");
            self.metrics
                .refused_legs
                .with_label_values(&["media_plane_busy"])
                .inc();
            self.end(peer, "media_plane_busy", true);
        }
    }

    // ------------------------------------------------------------ media → signalling

    pub fn on_sfu_event(&mut self, event: SfuEvent) {
        let span = event
            .peer()
            .and_then(|peer| Some(leg_span(&self.participants.get(&peer)?.leg, Some(peer))))
            .unwrap_or_else(tracing::Span::none);
        let _in = span.enter();
        match event {
            SfuEvent::PeerCreated {
                peer,
                answer,
                candidates,
            } => {
                let Some(p) = self.participants.get_mut(&peer) else {
                    return;
                };
                p.answered = true;
                let leg = p.leg.clone();
                let elapsed = p.invite_at.elapsed();
                let metadata = self.metadata_for(peer);
                self.legs.send(LegCommand::Answer {
                    leg: leg.clone(),
                    sdp: answer,
                    metadata,
                });
                self.metrics.invite_to_answer.observe(elapsed.as_secs_f64());
                let mut cands: Vec<Candidate> = candidates.into_iter().map(to_candidate).collect();
                cands.push(Candidate::end_of_candidates());
                self.legs.send(LegCommand::Candidates {
                    leg,
                    candidates: cands,
                });
            }
            SfuEvent::PeerFailed { peer, error } => {
                warn!(%peer, %error, "could not set up media for the invite");
                self.metrics
                    .refused_legs
                    .with_label_values(&["bad_offer"])
                    .inc();
                self.end(peer, "bad_offer", true);
            }
            SfuEvent::Answer { peer, sdp } => {
                let Some(p) = self.participants.get(&peer) else {
                    return;
                };
                let leg = p.leg.clone();
                let metadata = self.metadata_for(peer);
                self.legs.send(LegCommand::Negotiate {
                    leg,
                    kind: SdpType::Answer,
                    sdp,
                    metadata,
                });
            }
            SfuEvent::Offer { peer, sdp, tracks } => {
                let Some(p) = self.participants.get(&peer) else {
                    return;
                };
                let leg = p.leg.clone();
                let conf_key = p.conference.clone();
                // Describe every stream in the offer; remember the descriptions so mute
                // changes and leaves can be described later.
                for t in &tracks {
                    let md = self.describe(t);
                    if let Some(conf) = self.conferences.get_mut(&conf_key) {
                        conf.streams.entry(t.stream_id.clone()).or_insert(md);
                    }
                }
                self.forwarded.insert(peer, tracks);
                self.refresh_trunk_gauges();
                let metadata = self.metadata_for(peer);
                self.legs.send(LegCommand::Negotiate {
                    leg,
                    kind: SdpType::Offer,
                    sdp,
                    metadata,
                });
            }
            SfuEvent::NegotiationFailed { peer, error } => {
                warn!(%peer, %error, "negotiation failed");
            }
            SfuEvent::Connected { peer } => debug!(%peer, "media connected"),
            SfuEvent::TrackPublished { peer, track } => {
                let Some(p) = self.participants.get_mut(&peer) else {
                    return;
                };
                let kind = match track.kind {
                    TrackKind::Audio => "audio",
                    TrackKind::Video => "video",
                };
                let sid = StreamId::from(track.stream_id.as_str());
                if p.leg.trunk {
                    // The far focus describes its streams in its catalogue; never claim the
                    // trunk's own identity as their owner.
                    self.cascade.track_arrived(peer);
                    self.refresh_trunk_gauges();
                    return;
                }
                let key = p.conference.clone();
                let entry = p
                    .metadata
                    .entry(sid)
                    .or_insert_with(|| owned_stream(&p.leg));
                entry
                    .tracks
                    .entry(TrackId::from(track.track_id.as_str()))
                    .or_insert(TrackMetadata {
                        kind: kind.into(),
                        width: None,
                        height: None,
                    });
                self.publish_catalogue(&key);
            }
            SfuEvent::TrackUnpublished { peer, mid } => {
                debug!(%peer, %mid, "track unpublished");
                if self.cascade.track_left(peer) {
                    self.refresh_trunk_gauges();
                }
            }
            SfuEvent::TrunkOffer { peer, sdp } => self.trunk_offer(peer, sdp),
            SfuEvent::ChannelOpen { peer } => {
                if let Some(p) = self.participants.get_mut(&peer) {
                    p.channel_open = true;
                }
                self.announce_streams_to(peer);
                self.channel_open(peer)
            }
            SfuEvent::Speakers {
                conference,
                dominant,
                speaking,
            } => self.speakers_changed(conference, dominant, speaking),
            SfuEvent::DataMessage { peer, text } => self.data_message(peer, &text),
            SfuEvent::PeerClosed { peer, reason } => {
                self.media.forget(peer);
                if self.participants.contains_key(&peer) {
                    let hangup_reason = match reason {
                        CloseReason::ConnectTimeout | CloseReason::Disconnected => "ice_failed",
                        CloseReason::Silent => "ice_timeout",
                        CloseReason::EngineError(_) => "unknown_error",
                        CloseReason::Requested => "user_hangup",
                    };
                    info!(%peer, ?reason, "media plane closed the leg");
                    self.forget_participant(peer, Some(hangup_reason), &format!("{reason:?}"));
                }
            }
        }
    }

    /// Metadata for a stream forwarded to a subscriber: the publisher's own description if it
    /// is still here, else the last one we knew.
    fn describe(&self, t: &ForwardedTrack) -> StreamMetadata {
        if let Some(p) = self.participants.get(&t.publisher) {
            if let Some(m) = p.metadata.get(&StreamId::from(t.stream_id.as_str())) {
                return m.clone();
            }
            if p.leg.trunk {
                return StreamMetadata::new("m.usermedia");
            }
            return owned_stream(&p.leg);
        }
        StreamMetadata::new("m.usermedia")
    }

    /// Everything forwarded to `peer`, described (every stream id in our SDP must be covered).
    fn subscriber_metadata(&self, peer: PeerId) -> SdpStreamMetadata {
        let mut out = SdpStreamMetadata::new();
        let Some(tracks) = self.forwarded.get(&peer) else {
            return out;
        };
        let conf = self
            .participants
            .get(&peer)
            .and_then(|p| self.conferences.get(&p.conference));
        for t in tracks {
            let sid = StreamId::from(t.stream_id.as_str());
            let mut md = match self.participants.get(&t.publisher) {
                Some(_) => self.describe(t),
                None => conf
                    .and_then(|c| c.streams.get(&t.stream_id).cloned())
                    .unwrap_or_else(|| self.describe(t)),
            };
            let kind = match t.kind {
                TrackKind::Audio => "audio",
                TrackKind::Video => "video",
            };
            md.tracks
                .entry(TrackId::from(t.track_id.as_str()))
                .or_insert(TrackMetadata {
                    kind: kind.into(),
                    width: None,
                    height: None,
                });
            let entry = out.entry(sid).or_insert_with(|| StreamMetadata {
                tracks: BTreeMap::new(),
                ..md.clone()
            });
            entry.tracks.extend(md.tracks);
        }
        out
    }

    // ------------------------------------------------------------ data channel (MSC3898)

    /// A JSON message from a participant's data channel: `{"type": ..., "content": {...}}`.
    fn data_message(&mut self, peer: PeerId, text: &str) {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(text) else {
            self.metrics
                .data_messages
                .with_label_values(&["malformed"])
                .inc();
            return;
        };
        let ty = msg.get("type").and_then(|t| t.as_str()).unwrap_or("");
        let content = msg.get("content").cloned().unwrap_or_default();
        match ty {
            "m.call.track_subscription" => {
                // A garbled subscription must not change what the participant receives.
                let list_or_absent = |k: &str| content.get(k).is_none_or(|v| v.is_array());
                let any =
                    content.get("subscribe").is_some() || content.get("unsubscribe").is_some();
                if !(any && list_or_absent("subscribe") && list_or_absent("unsubscribe")) {
                    self.metrics
                        .data_messages
                        .with_label_values(&["malformed"])
                        .inc();
                    return;
                }
                self.metrics
                    .data_messages
                    .with_label_values(&["track_subscription"])
                    .inc();
                self.track_subscription(peer, &content);
            }
            "m.call.ping" => {
                self.metrics
                    .data_messages
                    .with_label_values(&["ping"])
                    .inc();
                let pong = r#"{"type":"m.call.pong","content":{}}"#.to_string();
                let _ = self.media.command(Command::SendData { peer, text: pong });
            }
            "m.call.pong" => self
                .metrics
                .data_messages
                .with_label_values(&["pong"])
                .inc(),
            _ => self
                .metrics
                .data_messages
                .with_label_values(&["other"])
                .inc(),
        }
    }

    /// Apply `unsubscribe` then `subscribe` (a repeated subscribe updates the size), then tell
    /// the media plane the whole set.
    fn track_subscription(&mut self, peer: PeerId, content: &serde_json::Value) {
        /// More entries than any layout needs; a longer list is cut, not trusted.
        const MAX_SUBSCRIPTIONS: usize = 256;
        /// Sizes of one track a far focus may ask for: one per simulcast layer is all that
        /// can differ, and publishers send at most three.
        const MAX_SIZES_PER_TRACK: usize = 4;
        let Some(p) = self.participants.get_mut(&peer) else {
            return;
        };
        let conference = p.conference.clone();
        let entries = |key: &str| -> Vec<(String, String, Option<u32>, Option<u32>)> {
            content
                .get(key)
                .and_then(|v| v.as_array())
                .map(|a| {
                    a.iter()
                        .take(MAX_SUBSCRIPTIONS)
                        .filter_map(|e| {
                            let s = e.get("stream_id")?.as_str()?.to_string();
                            let t = e.get("track_id")?.as_str()?.to_string();
                            let dim = |k: &str| {
                                e.get(k)
                                    .and_then(|v| v.as_u64())
                                    .map(|v| v.min(16_384) as u32)
                            };
                            Some((s, t, dim("width"), dim("height")))
                        })
                        .collect()
                })
                .unwrap_or_default()
        };
        for (s, t, _, _) in entries("unsubscribe") {
            p.subscriptions.remove(&(s, t));
        }
        // The entries of one message for one track are that track's sizes from now on.
        let mut asked: BTreeMap<(String, String), BTreeSet<Option<u32>>> = BTreeMap::new();
        for (s, t, _, h) in entries("subscribe") {
            let sizes = asked.entry((s, t)).or_default();
            if sizes.len() < MAX_SIZES_PER_TRACK {
                sizes.insert(h);
            }
        }
        for (k, sizes) in asked {
            if p.subscriptions.len() < MAX_SUBSCRIPTIONS || p.subscriptions.contains_key(&k) {
                p.subscriptions.insert(k, sizes);
            }
        }
        let wanted: Vec<((String, String), Option<u32>)> = p
            .subscriptions
            .iter()
            .flat_map(|(k, sizes)| sizes.iter().map(move |h| (k.clone(), *h)))
            .collect();
        let subscriptions = wanted
            .into_iter()
            .map(|((stream_id, track_id), max_height)| {
                let source_height = self.source_height(&stream_id, &track_id);
                weir_sfu::Subscription {
                    stream_id,
                    track_id,
                    max_height,
                    source_height,
                }
            })
            .collect();
        self.media_command(
            peer,
            Command::Subscribe {
                peer,
                subscriptions,
            },
        );
        if !self.cascade.is_trunk(peer) {
            self.sync_trunk_subscriptions(&conference);
        }
    }

    /// The full height a publisher says it sends a track at (its metadata), if any.
    fn source_height(&self, stream_id: &str, track_id: &str) -> Option<u32> {
        self.participants.values().find_map(|p| {
            p.metadata
                .get(&StreamId::from(stream_id))
                .and_then(|m| m.tracks.get(&TrackId::from(track_id)))
                .and_then(|t| t.height)
        })
    }

    // ------------------------------------------------------------ endings

    /// End a leg: tell the media plane, optionally hang up on the participant.
    pub fn end(&mut self, peer: PeerId, reason: &str, hangup: bool) {
        let _ = self.media.command(Command::ClosePeer { peer });
        self.forget_participant(peer, hangup.then_some(hangup_reason(reason)), reason);
    }

    fn forget_participant(&mut self, peer: PeerId, hangup: Option<&str>, reason: &str) {
        let Some(p) = self.participants.remove(&peer) else {
            return;
        };
        self.forwarded.remove(&peer);
        if p.leg.trunk {
            self.trunk_gone(peer, &p.leg);
        }
        self.metrics
            .legs_closed
            .with_label_values(&[reason_label(reason)])
            .inc();
        if let Some(h) = hangup {
            self.legs.send(LegCommand::Hangup {
                leg: p.leg.clone(),
                reason: h.to_string(),
            });
        }
        if let Some(conf) = self.conferences.get_mut(&p.conference) {
            let key = (p.leg.user_id.clone(), p.leg.device_id.clone());
            if conf.members.get(&key) == Some(&peer) {
                conf.members.remove(&key);
            }
            if conf.members.is_empty() {
                self.conferences.remove(&p.conference);
            }
        }
        self.refresh_gauges();
        if !p.leg.trunk {
            // What the far side is asked for, and what it is offered, may have shrunk.
            self.sync_trunk_subscriptions(&p.conference);
            self.publish_catalogue(&p.conference);
        } else {
            // The far participants it carried are gone for ours.
            self.announce_streams(&p.conference);
        }
    }

    /// Hang up every leg (shutdown).
    pub fn hang_up_all(&mut self) {
        let peers: Vec<PeerId> = self.participants.keys().copied().collect();
        for peer in peers {
            self.end(peer, "shutdown", true);
        }
    }

    fn refresh_gauges(&self) {
        self.metrics
            .participants
            .set(self.participants.len() as i64);
        self.metrics.conferences.set(self.conferences.len() as i64);
        let speaking: usize = self.conferences.values().map(|c| c.speaking).sum();
        self.metrics.speaking.set(speaking as i64);
    }
}

/// A span naming the conference and the participant an event concerns: every line logged
/// while handling it carries them as fields (`span` in JSON logs), so one participant's story
/// can be followed by filtering on its user, device or call.
fn leg_span(leg: &Leg, peer: Option<PeerId>) -> tracing::Span {
    tracing::info_span!(
        "leg",
        conf = %leg.conf_id,
        room = %leg.room_id,
        user = %leg.user_id,
        device = %leg.device_id,
        call = %leg.call_id,
        peer = peer.map(|p| p.0),
        trunk = leg.trunk,
    )
}

fn hangup_reason(reason: &str) -> &'static str {
    match reason {
        "replaced" => "replaced",
        "answered_elsewhere" => "answered_elsewhere",
        "shutdown" | "member_gone" | "drained" | "ended_by_operator" => "user_hangup",
        _ => "unknown_error",
    }
}

fn reason_label(reason: &str) -> &'static str {
    match reason {
        "participant_hangup" => "participant_hangup",
        "replaced" => "replaced",
        "answered_elsewhere" => "answered_elsewhere",
        "member_gone" => "member_gone",
        "shutdown" => "shutdown",
        "drained" => "drained",
        "ended_by_operator" => "ended_by_operator",
        "bad_offer" => "bad_offer",
        "media_plane_busy" => "media_plane_busy",
        "ConnectTimeout" => "connect_timeout",
        "Silent" => "silent",
        "Disconnected" => "disconnected",
        _ => "other",
    }
}

/// A user-media stream owned by the leg's authenticated user and device, unmuted.
fn owned_stream(leg: &Leg) -> StreamMetadata {
    let mut m = StreamMetadata::new("m.usermedia");
    m.user_id = Some(leg.user_id.clone());
    m.device_id = Some(leg.device_id.clone());
    m
}

fn to_candidate(c: LocalCandidate) -> Candidate {
    Candidate {
        candidate: c.candidate,
        sdp_mid: Some(c.sdp_mid),
        sdp_m_line_index: Some(c.sdp_m_line_index),
        username_fragment: None,
    }
}

#[cfg(test)]
mod tests {
    //! The conductor driven with recorded signalling and media planes: no network, no clock.

    use std::cell::RefCell;
    use std::rc::Rc;

    use weir_sfu::{MediaId, PublishedTrack};

    use super::*;

    #[derive(Clone, Default)]
    pub(super) struct Rec {
        legs: Rc<RefCell<Vec<LegCommand>>>,
        media: Rc<RefCell<Vec<Command>>>,
    }

    impl LegSender for Rec {
        fn send(&self, cmd: LegCommand) {
            self.legs.borrow_mut().push(cmd);
        }
    }

    impl MediaPlane for Rec {
        fn command(&self, cmd: Command) -> Result<(), String> {
            self.media.borrow_mut().push(cmd);
            Ok(())
        }
        fn forget(&self, _: PeerId) {}
    }

    impl Rec {
        pub(super) fn take_legs(&self) -> Vec<LegCommand> {
            std::mem::take(&mut self.legs.borrow_mut())
        }
        pub(super) fn take_media(&self) -> Vec<Command> {
            std::mem::take(&mut self.media.borrow_mut())
        }
    }

    pub(super) fn leg(user: &str, device: &str, call: &str) -> Leg {
        Leg {
            room_id: "!room:hs".try_into().unwrap(),
            conf_id: "conf1".into(),
            call_id: call.into(),
            user_id: user.try_into().unwrap(),
            device_id: device.into(),
            party_id: device.into(),
            session_id: "sess".into(),
            trunk: false,
        }
    }

    pub(super) fn setup() -> (Conductor<Rec, Rec>, Rec) {
        let rec = Rec::default();
        let c = Conductor::new(
            rec.clone(),
            rec.clone(),
            Arc::new(Metrics::new()),
            "@focus:hs".try_into().unwrap(),
            "FOCUSDEV".into(),
        );
        (c, rec)
    }

    pub(super) fn join(c: &mut Conductor<Rec, Rec>, rec: &Rec, l: &Leg, stream: &str) -> PeerId {
        let mut md = SdpStreamMetadata::new();
        // A client may claim someone else owns its stream; the owner must end up as itself.
        let mut claimed = StreamMetadata::new("m.usermedia");
        claimed.user_id = Some("@mallory:hs".try_into().unwrap());
        md.insert(stream.into(), claimed);
        c.on_leg_event(LegEvent::Invite {
            leg: l.clone(),
            sdp: "offer".into(),
            metadata: md,
            lifetime_ms: None,
        });
        let peer = match rec.take_media().pop() {
            Some(Command::CreatePeer { peer, offer, .. }) => {
                assert_eq!(offer, "offer");
                peer
            }
            other => panic!("expected CreatePeer, got {other:?}"),
        };
        c.on_sfu_event(SfuEvent::PeerCreated {
            peer,
            answer: "answer".into(),
            candidates: vec![LocalCandidate {
                candidate: "candidate:1 1 udp 1 127.0.0.1 5000 typ host".into(),
                sdp_mid: "0".into(),
                sdp_m_line_index: 0,
            }],
        });
        peer
    }

    #[test]
    fn an_invite_is_answered_with_metadata_then_candidates_ending_in_the_empty_one() {
        let (mut c, rec) = setup();
        let alice = leg("@alice:hs", "A", "c1");
        join(&mut c, &rec, &alice, "alice-stream");
        let sent = rec.take_legs();
        assert!(
            matches!(&sent[0], LegCommand::Answer { sdp, metadata, leg } if sdp == "answer" && metadata.is_empty() && *leg == alice)
        );
        match &sent[1] {
            LegCommand::Candidates { candidates, .. } => {
                assert_eq!(candidates.len(), 2);
                assert_eq!(candidates[0].sdp_mid.as_deref(), Some("0"));
                assert!(candidates[1].is_end_of_candidates());
            }
            other => panic!("expected candidates, got {other:?}"),
        }
        assert_eq!(c.participant_count(), 1);
        assert_eq!(c.metrics.invite_to_answer.get_sample_count(), 1);
    }

    #[test]
    fn offers_describe_every_forwarded_stream_with_its_authenticated_owner_and_mute_is_relayed() {
        let (mut c, rec) = setup();
        let alice = leg("@alice:hs", "A", "c1");
        let bob = leg("@bob:hs", "B", "c2");
        let pa = join(&mut c, &rec, &alice, "alice-stream");
        let pb = join(&mut c, &rec, &bob, "bob-stream");
        rec.take_legs();
        c.on_sfu_event(SfuEvent::TrackPublished {
            peer: pa,
            track: PublishedTrack {
                mid: MediaId("0".into()),
                kind: TrackKind::Audio,
                stream_id: "alice-stream".into(),
                track_id: "a-audio".into(),
            },
        });
        c.on_sfu_event(SfuEvent::Offer {
            peer: pb,
            sdp: "offer-to-bob".into(),
            tracks: vec![ForwardedTrack {
                publisher: pa,
                kind: TrackKind::Audio,
                stream_id: "alice-stream".into(),
                track_id: "a-audio".into(),
            }],
        });
        let sent = rec.take_legs();
        let LegCommand::Negotiate {
            leg,
            kind,
            sdp,
            metadata,
        } = &sent[0]
        else {
            panic!("{sent:?}")
        };
        assert_eq!(
            (leg, *kind, sdp.as_str()),
            (&bob, SdpType::Offer, "offer-to-bob")
        );
        let m = &metadata[&StreamId::from("alice-stream")];
        assert_eq!(m.user_id.as_ref().map(|u| u.as_str()), Some("@alice:hs"));
        assert_eq!(m.device_id.as_ref().map(|d| d.as_str()), Some("A"));
        assert_eq!(m.tracks[&TrackId::from("a-audio")].kind, "audio");

        // Bob answers; the answer goes to the media plane for Bob's peer.
        c.on_leg_event(LegEvent::Negotiate {
            leg: bob.clone(),
            kind: SdpType::Answer,
            sdp: "bob-answer".into(),
            metadata: None,
        });
        assert!(
            matches!(rec.take_media().as_slice(), [Command::RemoteAnswer { peer, sdp }] if *peer == pb && sdp == "bob-answer")
        );

        // Alice mutes: Bob, who receives her stream, is told; Alice is not.
        let mut md = SdpStreamMetadata::new();
        let mut muted = StreamMetadata::new("m.usermedia");
        muted.audio_muted = true;
        md.insert("alice-stream".into(), muted);
        c.on_leg_event(LegEvent::MetadataChanged {
            leg: alice.clone(),
            metadata: md.clone(),
        });
        let sent = rec.take_legs();
        assert_eq!(sent.len(), 1, "{sent:?}");
        let LegCommand::MetadataChanged { leg, metadata } = &sent[0] else {
            panic!("{sent:?}")
        };
        assert_eq!(leg, &bob);
        let m = &metadata[&StreamId::from("alice-stream")];
        assert!(m.audio_muted);
        assert_eq!(m.user_id.as_ref().map(|u| u.as_str()), Some("@alice:hs"));
        // The same state again is not relayed twice.
        c.on_leg_event(LegEvent::MetadataChanged {
            leg: alice,
            metadata: md,
        });
        assert!(rec.take_legs().is_empty());
    }

    #[test]
    fn a_new_call_from_the_same_device_replaces_the_old_leg() {
        let (mut c, rec) = setup();
        let old = leg("@alice:hs", "A", "c1");
        let p1 = join(&mut c, &rec, &old, "s1");
        rec.take_legs();
        let new = leg("@alice:hs", "A", "c9");
        c.on_leg_event(LegEvent::Invite {
            leg: new.clone(),
            sdp: "offer".into(),
            metadata: SdpStreamMetadata::new(),
            lifetime_ms: None,
        });
        let media = rec.take_media();
        assert!(matches!(&media[0], Command::ClosePeer { peer } if *peer == p1));
        assert!(matches!(&media[1], Command::CreatePeer { peer, .. } if *peer != p1));
        let legs = rec.take_legs();
        assert!(
            matches!(&legs[..], [LegCommand::Hangup { leg, reason }] if *leg == old && reason == "replaced")
        );
        assert_eq!(c.participant_count(), 1);
    }

    #[test]
    fn the_same_call_offered_again_is_a_renegotiation_not_a_second_participant() {
        let (mut c, rec) = setup();
        let alice = leg("@alice:hs", "A", "c1");
        let p = join(&mut c, &rec, &alice, "s1");
        rec.take_legs();
        c.on_leg_event(LegEvent::Invite {
            leg: alice,
            sdp: "offer2".into(),
            metadata: SdpStreamMetadata::new(),
            lifetime_ms: None,
        });
        assert!(
            matches!(rec.take_media().as_slice(), [Command::RemoteOffer { peer, sdp }] if *peer == p && sdp == "offer2")
        );
        assert_eq!(c.participant_count(), 1);
    }

    #[test]
    fn hangups_and_media_failures_end_only_that_leg() {
        let (mut c, rec) = setup();
        let alice = leg("@alice:hs", "A", "c1");
        let bob = leg("@bob:hs", "B", "c2");
        let carol = leg("@carol:hs", "C", "c3");
        let pa = join(&mut c, &rec, &alice, "sa");
        let pb = join(&mut c, &rec, &bob, "sb");
        let pc = join(&mut c, &rec, &carol, "sc");
        rec.take_legs();
        rec.take_media();

        // Alice hangs up: her peer closes; nothing is sent back to her.
        c.on_leg_event(LegEvent::Hangup {
            leg: alice.clone(),
            reason: "user_hangup".into(),
        });
        assert!(
            matches!(rec.take_media().as_slice(), [Command::ClosePeer { peer }] if *peer == pa)
        );
        assert!(rec.take_legs().is_empty());
        // A late event for her old call is ignored.
        c.on_leg_event(LegEvent::Negotiate {
            leg: alice,
            kind: SdpType::Answer,
            sdp: "x".into(),
            metadata: None,
        });
        assert!(rec.take_media().is_empty());

        // Bob goes silent: the media plane closed him, we hang up on him.
        c.on_sfu_event(SfuEvent::PeerClosed {
            peer: pb,
            reason: CloseReason::Silent,
        });
        assert!(
            matches!(rec.take_legs().as_slice(), [LegCommand::Hangup { leg, reason }] if *leg == bob && reason == "ice_timeout")
        );

        // Carol's offer was unusable: hang up with a reason.
        c.on_sfu_event(SfuEvent::PeerFailed {
            peer: pc,
            error: "bad".into(),
        });
        assert!(
            matches!(rec.take_legs().as_slice(), [LegCommand::Hangup { leg, reason }] if *leg == carol && reason == "unknown_error")
        );
        assert_eq!(c.participant_count(), 0);
        assert!(c.conferences.is_empty(), "the empty conference is freed");
    }

    #[test]
    fn select_answer_for_another_party_drops_the_leg() {
        let (mut c, rec) = setup();
        let alice = leg("@alice:hs", "A", "c1");
        join(&mut c, &rec, &alice, "s");
        rec.take_legs();
        c.on_leg_event(LegEvent::SelectAnswer {
            leg: alice.clone(),
            selected_party_id: "FOCUSDEV".into(),
        });
        assert_eq!(c.participant_count(), 1);
        c.on_leg_event(LegEvent::SelectAnswer {
            leg: alice,
            selected_party_id: "OTHER".into(),
        });
        assert_eq!(c.participant_count(), 0);
    }

    /// Alice calls, describing her camera track `a-video` in `alice-stream` as 1280x720.
    fn alice_invites_with_a_720p_camera(c: &mut Conductor<Rec, Rec>) {
        let mut md = SdpStreamMetadata::new();
        let mut cam = StreamMetadata::new("m.usermedia");
        cam.tracks.insert(
            "a-video".into(),
            TrackMetadata {
                kind: "video".into(),
                width: Some(1280),
                height: Some(720),
            },
        );
        md.insert("alice-stream".into(), cam);
        c.on_leg_event(LegEvent::Invite {
            leg: leg("@alice:hs", "A", "c1"),
            sdp: "o".into(),
            metadata: md,
            lifetime_ms: None,
        });
    }

    #[test]
    fn speakers_are_announced_to_participants_with_an_open_channel_and_counted() {
        let (mut c, rec) = setup();
        let pa = join(&mut c, &rec, &leg("@alice:hs", "A", "c1"), "alice-stream");
        let pb = join(&mut c, &rec, &leg("@bob:hs", "B", "c2"), "bob-stream");
        let _pc = join(&mut c, &rec, &leg("@carol:hs", "C", "c3"), "carol-stream");
        for p in [pa, pb] {
            c.on_sfu_event(SfuEvent::ChannelOpen { peer: p });
        }
        rec.take_media();
        let conference = c.conferences.values().next().unwrap().id;
        let alice = weir_sfu::AudioSource {
            publisher: pa,
            stream_id: "alice-stream".into(),
        };
        c.on_sfu_event(SfuEvent::Speakers {
            conference,
            dominant: Some(alice.clone()),
            speaking: vec![alice.clone()],
        });
        let sent = rec.take_media();
        let mut to: Vec<PeerId> = sent
            .iter()
            .map(|m| match m {
                Command::SendData { peer, text } => {
                    let v: serde_json::Value = serde_json::from_str(text).unwrap();
                    assert_eq!(v["type"], "io.weir.speakers");
                    let who = &v["content"]["dominant"];
                    assert_eq!(
                        (&who["user_id"], &who["device_id"], &who["stream_id"]),
                        (&"@alice:hs".into(), &"A".into(), &"alice-stream".into())
                    );
                    assert_eq!(v["content"]["speaking"].as_array().unwrap().len(), 1);
                    *peer
                }
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        to.sort();
        assert_eq!(
            to,
            vec![pa, pb],
            "Carol's channel is not open: nothing for her"
        );
        assert_eq!(c.metrics.speaker_changes.get(), 1);
        assert_eq!(c.metrics.speaking.get(), 1);
        // Alice stops: nobody speaks, she stays dominant; not a change of speaker.
        c.on_sfu_event(SfuEvent::Speakers {
            conference,
            dominant: Some(alice),
            speaking: vec![],
        });
        assert_eq!(c.metrics.speaker_changes.get(), 1);
        assert_eq!(c.metrics.speaking.get(), 0);
    }

    #[test]
    fn the_size_a_publisher_announces_survives_its_track_being_published() {
        let (mut c, rec) = setup();
        alice_invites_with_a_720p_camera(&mut c);
        let Some(Command::CreatePeer { peer, .. }) = rec.take_media().pop() else {
            panic!("no CreatePeer")
        };
        c.on_sfu_event(SfuEvent::TrackPublished {
            peer,
            track: PublishedTrack {
                mid: MediaId("1".into()),
                kind: TrackKind::Video,
                stream_id: "alice-stream".into(),
                track_id: "a-video".into(),
            },
        });
        assert_eq!(c.source_height("alice-stream", "a-video"), Some(720));
        let p = &c.participants[&peer];
        let t = &p.metadata[&StreamId::from("alice-stream")].tracks[&TrackId::from("a-video")];
        assert_eq!((t.width, t.height), (Some(1280), Some(720)));
    }

    #[test]
    fn a_track_subscription_becomes_the_subscribers_whole_set_with_sizes() {
        let (mut c, rec) = setup();
        let bob = leg("@bob:hs", "B", "c2");
        alice_invites_with_a_720p_camera(&mut c);
        let pb = join(&mut c, &rec, &bob, "bob-stream");
        rec.take_media();
        let msg = |sub: &str, unsub: &str| {
            format!(
                r#"{{"type":"m.call.track_subscription","content":{{"subscribe":[{sub}],"unsubscribe":[{unsub}]}}}}"#
            )
        };
        c.on_sfu_event(SfuEvent::DataMessage {
            peer: pb,
            text: msg(
                r#"{"stream_id":"alice-stream","track_id":"a-video","width":320,"height":180},{"stream_id":"alice-stream","track_id":"a-audio"}"#,
                "",
            ),
        });
        let Some(Command::Subscribe {
            peer,
            subscriptions,
        }) = rec.take_media().pop()
        else {
            panic!("no subscribe")
        };
        assert_eq!(peer, pb);
        assert_eq!(subscriptions.len(), 2);
        let video = subscriptions
            .iter()
            .find(|s| s.track_id == "a-video")
            .unwrap();
        assert_eq!(
            (video.max_height, video.source_height),
            (Some(180), Some(720))
        );
        // A later message is applied as a delta: unsubscribing audio leaves the video.
        c.on_sfu_event(SfuEvent::DataMessage {
            peer: pb,
            text: msg("", r#"{"stream_id":"alice-stream","track_id":"a-audio"}"#),
        });
        let Some(Command::Subscribe { subscriptions, .. }) = rec.take_media().pop() else {
            panic!("no subscribe")
        };
        assert_eq!(subscriptions.len(), 1);
        assert_eq!(subscriptions[0].track_id, "a-video");
        // Several sizes of one track in one message (what a far focus sends) are all kept,
        // and replace the earlier size.
        c.on_sfu_event(SfuEvent::DataMessage {
            peer: pb,
            text: msg(
                r#"{"stream_id":"alice-stream","track_id":"a-video","height":180},{"stream_id":"alice-stream","track_id":"a-video","height":720},{"stream_id":"alice-stream","track_id":"a-video","height":720}"#,
                "",
            ),
        });
        let Some(Command::Subscribe { subscriptions, .. }) = rec.take_media().pop() else {
            panic!("no subscribe")
        };
        let mut heights: Vec<_> = subscriptions.iter().map(|s| s.max_height).collect();
        heights.sort();
        assert_eq!(heights, vec![Some(180), Some(720)]);
    }

    #[test]
    fn data_channel_ping_is_answered_and_garbage_is_only_counted() {
        let (mut c, rec) = setup();
        let p = join(&mut c, &rec, &leg("@a:hs", "A", "1"), "s");
        rec.take_media();
        c.on_sfu_event(SfuEvent::DataMessage {
            peer: p,
            text: r#"{"type":"m.call.ping","content":{}}"#.into(),
        });
        assert!(
            matches!(rec.take_media().as_slice(), [Command::SendData { peer, text }] if *peer == p && text.contains("m.call.pong"))
        );
        for junk in [
            "not json",
            "[]",
            r#"{"type":5}"#,
            r#"{"type":"m.call.track_subscription","content":{"subscribe":"x"}}"#,
        ] {
            c.on_sfu_event(SfuEvent::DataMessage {
                peer: p,
                text: junk.into(),
            });
        }
        // Nothing was sent, and what the participant receives did not change.
        assert!(rec.take_media().is_empty());
        assert_eq!(
            c.metrics
                .data_messages
                .with_label_values(&["malformed"])
                .get(),
            2
        );
        assert_eq!(c.participant_count(), 1);
    }

    #[test]
    fn shutdown_hangs_up_everyone() {
        let (mut c, rec) = setup();
        join(&mut c, &rec, &leg("@a:hs", "A", "1"), "s1");
        join(&mut c, &rec, &leg("@b:hs", "B", "2"), "s2");
        rec.take_legs();
        c.hang_up_all();
        let hangups = rec
            .take_legs()
            .into_iter()
            .filter(|l| matches!(l, LegCommand::Hangup { .. }))
            .count();
        assert_eq!(hangups, 2);
        assert_eq!(c.participant_count(), 0);
    }
}
