//! The values exchanged with the focus: legs, events delivered to it, commands it sends.

use crate::ids::{CallId, ConfId, DeviceId, PartyId, RoomId, SessionId, UserId};
use crate::metadata::SdpStreamMetadata;
use crate::room::FocusRef;
use crate::wire::{Candidate, SdpType};

/// One client↔focus call leg, as opened by an authorised invite.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Leg {
    pub room_id: RoomId,
    pub conf_id: ConfId,
    pub call_id: CallId,
    pub user_id: UserId,
    pub device_id: DeviceId,
    pub party_id: PartyId,
    /// The client's `sender_session_id` (weir's `dest_session_id` towards it).
    pub session_id: SessionId,
    /// A trunk: the other end is a focus serving this conference (docs/cascading.md), not a
    /// participant. Its metadata keeps the owners it names (checked against room state).
    pub trunk: bool,
}

/// Delivered to the focus: parsed, authorised, ordered by `seq`, de-duplicated.
///
/// Metadata in these events has `user_id`/`device_id` of every stream overwritten with the
/// leg's authenticated user and device (clients may claim anything there).
#[derive(Clone, Debug, PartialEq)]
pub enum LegEvent {
    /// A new leg, or a re-offer on an existing one (same `call_id`, same owner, different
    /// offer): the focus treats the second case as a renegotiation.
    Invite {
        leg: Leg,
        sdp: String,
        metadata: SdpStreamMetadata,
        lifetime_ms: Option<u64>,
    },
    /// Candidates; those that arrived before their invite are delivered right after it.
    Candidates {
        leg: Leg,
        candidates: Vec<Candidate>,
    },
    SelectAnswer {
        leg: Leg,
        selected_party_id: PartyId,
    },
    Negotiate {
        leg: Leg,
        kind: SdpType,
        sdp: String,
        metadata: Option<SdpStreamMetadata>,
    },
    MetadataChanged {
        leg: Leg,
        metadata: SdpStreamMetadata,
    },
    /// `m.call.hangup` or `m.call.reject` from the client, or a re-invite on this leg that
    /// failed authorisation (reason `refused:<why>`). The leg is gone from the router.
    Hangup { leg: Leg, reason: String },
    /// The device's `m.call.member` entry was removed or expired, the user left the room, the
    /// call was terminated, or weir left the room. Every leg of this device in this conference
    /// is gone from the router; the focus should tear them down (it need not send a hangup,
    /// but may).
    MemberGone {
        room_id: RoomId,
        conf_id: ConfId,
        user_id: UserId,
        device_id: DeviceId,
    },
    /// The answer of the focus weir dialled ([`LegCommand::Invite`]).
    Answer {
        leg: Leg,
        sdp: String,
        metadata: SdpStreamMetadata,
    },
    /// The set of foci serving a conference changed (MSC3898 `foci.active` of its unexpired
    /// member devices; weir itself included when named). Empty when the call ended.
    Foci {
        room_id: RoomId,
        conf_id: ConfId,
        foci: Vec<FocusRef>,
    },
}

impl LegEvent {
    /// The leg the event is about (`None` for [`LegEvent::MemberGone`]).
    pub fn leg(&self) -> Option<&Leg> {
        match self {
            LegEvent::Invite { leg, .. }
            | LegEvent::Candidates { leg, .. }
            | LegEvent::SelectAnswer { leg, .. }
            | LegEvent::Negotiate { leg, .. }
            | LegEvent::MetadataChanged { leg, .. }
            | LegEvent::Hangup { leg, .. }
            | LegEvent::Answer { leg, .. } => Some(leg),
            LegEvent::MemberGone { .. } | LegEvent::Foci { .. } => None,
        }
    }
}

/// Sent by the focus. Each becomes one to-device event to the leg's device; events of one leg
/// go out in the order they were sent.
#[derive(Clone, Debug, PartialEq)]
pub enum LegCommand {
    /// Dial another focus (a trunk): opens the leg in the router, so the far focus's answer,
    /// candidates and hangup for this `call_id` are accepted from it.
    Invite {
        leg: Leg,
        sdp: String,
        metadata: SdpStreamMetadata,
    },
    Answer {
        leg: Leg,
        sdp: String,
        metadata: SdpStreamMetadata,
    },
    Negotiate {
        leg: Leg,
        kind: SdpType,
        sdp: String,
        metadata: SdpStreamMetadata,
    },
    Candidates {
        leg: Leg,
        candidates: Vec<Candidate>,
    },
    MetadataChanged {
        leg: Leg,
        metadata: SdpStreamMetadata,
    },
    /// Ends the leg: the router forgets it, and late events for its `call_id` are dropped
    /// without a reply for a while.
    Hangup { leg: Leg, reason: String },
}

impl LegCommand {
    pub fn leg(&self) -> &Leg {
        match self {
            LegCommand::Invite { leg, .. }
            | LegCommand::Answer { leg, .. }
            | LegCommand::Negotiate { leg, .. }
            | LegCommand::Candidates { leg, .. }
            | LegCommand::MetadataChanged { leg, .. }
            | LegCommand::Hangup { leg, .. } => leg,
        }
    }
}
