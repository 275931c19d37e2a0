//! The conductor: conferences and participants. It turns authorised call-leg events from
//! signalling into media-plane commands, and media-plane events back into call signalling.
//!
//! Conferences are keyed by (room, conf_id); participants by (user, device) within a
//! conference. A new call from the same device replaces the old leg.

mod admin;
mod cascade;
#[cfg(test)]
mod cascade_tests;
mod data_channel;
mod drain;
#[cfg(test)]
mod log_tests;
mod media_events;
mod metadata;
mod screens;
mod speakers;
mod streams;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Instant;

use tracing::{debug, info, warn};
use weir_sfu::{Command, ConferenceId, ForwardedTrack, LocalCandidate, PeerId, PeerRole, Sfu};
use weir_signalling::{
    Candidate, ConfId, DeviceId, Leg, LegCommand, LegEvent, RoomId, SdpStreamMetadata, SdpType,
    StreamMetadata, UserId,
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
mod tests;
