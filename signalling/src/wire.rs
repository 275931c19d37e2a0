//! The `m.call.*` to-device wire format: parsing what clients send, building what weir sends.
//!
//! Everything here is pure. The parser never panics and turns every kind of bad input into a
//! [`DropReason`]; the builders produce exactly the fields listed in `reference/protocol.md` §c
//! (and never `seq`, which would make a stock js-sdk wait forever after a focus restart).

use ruma::api::client::to_device::send_event_to_device::v3::Messages as ToDeviceMessages;
use ruma::serde::Raw;
use ruma::to_device::DeviceIdOrAllDevices;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::ids::{CallId, ConfId, DeviceId, PartyId, SessionId, UserId};
use crate::metadata::{parse_metadata, SdpStreamMetadata};

/// SDPs larger than this are refused (`too_large`).
pub const MAX_SDP_BYTES: usize = 128 * 1024;
/// Synapse refuses to-device request bodies over 64 KiB (HTTP 413); weir never tries.
pub const MAX_TODEVICE_BODY_BYTES: usize = 64 * 1024;
/// Most candidates accepted in one `m.call.candidates` event.
pub const MAX_CANDIDATES_PER_EVENT: usize = 256;
/// Longest identifier accepted in an envelope field (MSC2746 caps `call_id` at 255).
pub const MAX_ID_LEN: usize = 255;
/// Longest hangup reason kept (longer ones are cut).
pub const MAX_REASON_LEN: usize = 128;
/// `lifetime` weir puts on its negotiate offers (ms), as js-sdk does.
pub const NEGOTIATE_LIFETIME_MS: u64 = 60_000;

/// The unstable metadata key (MSC3077), written beside the stable one.
pub const METADATA_KEY_UNSTABLE: &str = "org.matrix.msc3077.sdp_stream_metadata";
/// The stable metadata key.
pub const METADATA_KEY: &str = "sdp_stream_metadata";

/// One ICE candidate. End-of-candidates is exactly `{"candidate":""}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Candidate {
    pub candidate: String,
    #[serde(rename = "sdpMid", default, skip_serializing_if = "Option::is_none")]
    pub sdp_mid: Option<String>,
    #[serde(
        rename = "sdpMLineIndex",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub sdp_m_line_index: Option<u32>,
    #[serde(
        rename = "usernameFragment",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub username_fragment: Option<String>,
}

impl Candidate {
    /// The end-of-candidates marker, `{"candidate":""}`.
    pub fn end_of_candidates() -> Self {
        Self {
            candidate: String::new(),
            sdp_mid: None,
            sdp_m_line_index: None,
            username_fragment: None,
        }
    }

    /// True for an end-of-candidates marker (empty candidate string, as js-sdk and MSC2746 use it).
    pub fn is_end_of_candidates(&self) -> bool {
        self.candidate.is_empty()
    }
}

/// `description.type` / `offer.type` / `answer.type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SdpType {
    Offer,
    Answer,
}

impl SdpType {
    pub fn as_str(self) -> &'static str {
        match self {
            SdpType::Offer => "offer",
            SdpType::Answer => "answer",
        }
    }
}

/// Why an incoming event was dropped; the label of `weir_todevice_dropped_total{reason}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Not an object, a required field missing or of the wrong type, a bad `seq`, ...
    Malformed,
    /// `dest_session_id` missing or not ours.
    WrongSession,
    /// `m.room.encrypted`: weir holds no keys by design.
    Encrypted,
    /// A key-distribution event; its content is never read, logged or stored.
    KeyEvent,
    /// Any type weir does not handle.
    UnknownType,
    /// An SDP over [`MAX_SDP_BYTES`], too many candidates, or (outgoing) a body over 64 KiB.
    TooLarge,
    /// `version` is not one of `"1"`, `1`, `"0"`, `0`.
    BadVersion,
    /// Same `seq` (or `org.matrix.msgid`) seen before, or a byte-identical re-sent invite.
    Duplicate,
    /// An event for a `call_id` whose leg belongs to another (user, device, party).
    NotLegOwner,
    /// An event for a known `call_id` that names another `conf_id`.
    ConfMismatch,
    /// A non-invite event for a `call_id` weir has no leg for (answered with a hangup).
    UnknownCall,
    /// Early candidates for a call whose invite did not come within the early-buffer window.
    EarlyExpired,
    /// Per-sender / global caps on buffers and legs reached.
    Flood,
    /// The outgoing send queue was full.
    QueueFull,
    /// An outgoing send failed permanently (after retries, or a 4xx).
    SendFailed,
    /// A stream in a trunk's metadata claims an owner that does not use that trunk's focus.
    ForeignOwner,
}

impl DropReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::WrongSession => "wrong_session",
            DropReason::Encrypted => "encrypted",
            DropReason::KeyEvent => "key_event",
            DropReason::UnknownType => "unknown_type",
            DropReason::TooLarge => "too_large",
            DropReason::BadVersion => "bad_version",
            DropReason::Duplicate => "duplicate",
            DropReason::NotLegOwner => "not_leg_owner",
            DropReason::ConfMismatch => "conf_mismatch",
            DropReason::UnknownCall => "unknown_call",
            DropReason::EarlyExpired => "early_expired",
            DropReason::Flood => "flood",
            DropReason::QueueFull => "queue_full",
            DropReason::SendFailed => "send_failed",
            DropReason::ForeignOwner => "foreign_owner",
        }
    }
}

/// The call event types weir accepts from clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CallEventType {
    Invite,
    /// Only on a leg weir opened itself (a trunk it dialled).
    Answer,
    Candidates,
    SelectAnswer,
    Negotiate,
    MetadataChanged,
    Hangup,
    Reject,
}

/// What an incoming to-device type is, before its content is looked at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TypeClass {
    Call(CallEventType),
    Encrypted,
    Key,
    Unknown,
}

/// Key-distribution types: dropped unread (design invariant 1).
const KEY_TYPES: &[&str] = &[
    "io.element.call.encryption_keys",
    "m.rtc.encryption_key",
    "org.matrix.msc4143.rtc.encryption_key",
    "m.room_key",
    "m.forwarded_room_key",
    "m.room_key_request",
    "m.room_key.withheld",
    "org.matrix.room_key.withheld",
    "m.secret.request",
    "m.secret.send",
];

pub(crate) fn classify(event_type: &str) -> TypeClass {
    use CallEventType::*;
    match event_type {
        "m.call.invite" => TypeClass::Call(Invite),
        "m.call.answer" => TypeClass::Call(Answer),
        "m.call.candidates" => TypeClass::Call(Candidates),
        "m.call.select_answer" => TypeClass::Call(SelectAnswer),
        "m.call.negotiate" => TypeClass::Call(Negotiate),
        "m.call.sdp_stream_metadata_changed" | "org.matrix.call.sdp_stream_metadata_changed" => {
            TypeClass::Call(MetadataChanged)
        }
        "m.call.hangup" => TypeClass::Call(Hangup),
        "m.call.reject" => TypeClass::Call(Reject),
        "m.room.encrypted" => TypeClass::Encrypted,
        t if KEY_TYPES.contains(&t) => TypeClass::Key,
        _ => TypeClass::Unknown,
    }
}

/// A bounded-cardinality label for `weir_todevice_received_total{type}`: known types by name,
/// everything else as `other` (the type string is sender-controlled).
pub(crate) fn received_label(event_type: &str) -> &'static str {
    const KNOWN: &[&str] = &[
        "m.call.invite",
        "m.call.candidates",
        "m.call.select_answer",
        "m.call.negotiate",
        "m.call.sdp_stream_metadata_changed",
        "org.matrix.call.sdp_stream_metadata_changed",
        "m.call.hangup",
        "m.call.reject",
        "m.call.answer",
        "m.room.encrypted",
        "m.dummy",
    ];
    KNOWN
        .iter()
        .chain(KEY_TYPES.iter())
        .find(|k| **k == event_type)
        .copied()
        .unwrap_or("other")
}

/// The envelope fields every group-call event carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Envelope {
    pub call_id: CallId,
    pub conf_id: ConfId,
    pub device_id: DeviceId,
    pub party_id: PartyId,
    pub sender_session_id: SessionId,
    pub seq: Option<u64>,
    pub msgid: Option<String>,
}

/// The type-specific part of an incoming call event.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum CallBody {
    Invite {
        sdp: String,
        metadata: SdpStreamMetadata,
        lifetime_ms: Option<u64>,
    },
    Answer {
        sdp: String,
        metadata: SdpStreamMetadata,
    },
    Candidates(Vec<Candidate>),
    SelectAnswer {
        selected_party_id: PartyId,
    },
    Negotiate {
        kind: SdpType,
        sdp: String,
        metadata: Option<SdpStreamMetadata>,
    },
    MetadataChanged(SdpStreamMetadata),
    Hangup {
        reason: String,
    },
}

/// A parsed incoming call event.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct InboundCall {
    pub sender: UserId,
    pub kind: CallEventType,
    pub env: Envelope,
    pub body: CallBody,
}

/// A parse failure: the reason it is counted under, and a short detail for debug logs
/// (never containing content of the event).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Rejected {
    pub reason: DropReason,
    pub detail: String,
    /// Enough of the envelope to answer with a hangup, when it could be read.
    pub reply_to: Option<Box<ReplyTo>>,
}

/// Where to send a hangup for an event we cannot route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ReplyTo {
    pub user_id: UserId,
    pub device_id: DeviceId,
    pub call_id: CallId,
    pub conf_id: ConfId,
    pub session_id: SessionId,
}

fn rejected(reason: DropReason, detail: impl Into<String>) -> Rejected {
    Rejected {
        reason,
        detail: detail.into(),
        reply_to: None,
    }
}

fn take_id(content: &mut Map<String, Value>, key: &str) -> Result<String, Rejected> {
    match content.remove(key) {
        Some(Value::String(s)) if !s.is_empty() && s.len() <= MAX_ID_LEN => Ok(s),
        Some(Value::String(s)) if s.is_empty() => {
            Err(rejected(DropReason::Malformed, format!("empty {key}")))
        }
        Some(Value::String(_)) => Err(rejected(DropReason::Malformed, format!("{key} too long"))),
        Some(_) => Err(rejected(
            DropReason::Malformed,
            format!("{key} is not a string"),
        )),
        None => Err(rejected(DropReason::Malformed, format!("missing {key}"))),
    }
}

fn take_sdp(obj: Value, want: Option<SdpType>, field: &str) -> Result<(SdpType, String), Rejected> {
    let Value::Object(mut obj) = obj else {
        return Err(rejected(
            DropReason::Malformed,
            format!("{field} is not an object"),
        ));
    };
    let kind = match obj.remove("type") {
        Some(Value::String(t)) if t == "offer" => SdpType::Offer,
        Some(Value::String(t)) if t == "answer" => SdpType::Answer,
        _ => {
            return Err(rejected(
                DropReason::Malformed,
                format!("{field}.type invalid"),
            ))
        }
    };
    if want.is_some_and(|w| w != kind) {
        return Err(rejected(
            DropReason::Malformed,
            format!("{field}.type unexpected"),
        ));
    }
    let sdp = match obj.remove("sdp") {
        Some(Value::String(s)) => s,
        _ => {
            return Err(rejected(
                DropReason::Malformed,
                format!("{field}.sdp missing"),
            ))
        }
    };
    if sdp.len() > MAX_SDP_BYTES {
        return Err(rejected(
            DropReason::TooLarge,
            format!("sdp of {} bytes", sdp.len()),
        ));
    }
    if sdp.is_empty() {
        return Err(rejected(
            DropReason::Malformed,
            format!("{field}.sdp empty"),
        ));
    }
    Ok((kind, sdp))
}

/// Reads metadata from the stable key, else the unstable one. `Ok(None)` when neither is there.
fn take_metadata(content: &mut Map<String, Value>) -> Result<Option<SdpStreamMetadata>, Rejected> {
    let value = match content.remove(METADATA_KEY) {
        Some(v) => Some(v),
        None => content.remove(METADATA_KEY_UNSTABLE),
    };
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(v) => parse_metadata(v)
            .map(Some)
            .map_err(|e| rejected(DropReason::Malformed, e)),
    }
}

fn check_version(content: &Map<String, Value>) -> Result<(), Rejected> {
    match content.get("version") {
        None => Ok(()),
        Some(Value::String(s)) if s == "1" || s == "0" => Ok(()),
        Some(Value::Number(n)) if n.as_u64() == Some(1) || n.as_u64() == Some(0) => Ok(()),
        Some(_) => Err(rejected(DropReason::BadVersion, "unsupported version")),
    }
}

/// Parses the content of a call event of type `kind` from `sender`. The caller has already
/// checked the type and `dest_session_id`.
pub(crate) fn parse_call(
    sender: UserId,
    kind: CallEventType,
    content: Map<String, Value>,
) -> Result<InboundCall, Rejected> {
    let mut content = content;
    check_version(&content)?;
    let call_id = CallId::from(take_id(&mut content, "call_id")?);
    let conf_id = ConfId::from(take_id(&mut content, "conf_id")?);
    let device_id = DeviceId::from(take_id(&mut content, "device_id")?);
    let sender_session_id = SessionId::from(take_id(&mut content, "sender_session_id")?);
    let reply_to = ReplyTo {
        user_id: sender.clone(),
        device_id: device_id.clone(),
        call_id: call_id.clone(),
        conf_id: conf_id.clone(),
        session_id: sender_session_id.clone(),
    };
    let with_reply = |mut r: Rejected| {
        r.reply_to = Some(Box::new(reply_to.clone()));
        r
    };
    let party_id = PartyId::from(take_id(&mut content, "party_id").map_err(with_reply)?);
    let seq = match content.remove("seq") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => match n.as_u64() {
            Some(s) => Some(s),
            None => {
                return Err(with_reply(rejected(
                    DropReason::Malformed,
                    "seq is not a u64",
                )))
            }
        },
        Some(_) => {
            return Err(with_reply(rejected(
                DropReason::Malformed,
                "seq is not a number",
            )))
        }
    };
    let msgid = match content.remove("org.matrix.msgid") {
        Some(Value::String(s)) if s.len() <= MAX_ID_LEN => Some(s),
        _ => None,
    };
    let body = parse_body(kind, &mut content).map_err(with_reply)?;
    Ok(InboundCall {
        sender,
        kind,
        env: Envelope {
            call_id,
            conf_id,
            device_id,
            party_id,
            sender_session_id,
            seq,
            msgid,
        },
        body,
    })
}

fn parse_body(kind: CallEventType, content: &mut Map<String, Value>) -> Result<CallBody, Rejected> {
    Ok(match kind {
        CallEventType::Invite => {
            let offer = content
                .remove("offer")
                .ok_or_else(|| rejected(DropReason::Malformed, "missing offer"))?;
            let (_, sdp) = take_sdp(offer, Some(SdpType::Offer), "offer")?;
            let metadata = take_metadata(content)?.unwrap_or_default();
            let lifetime_ms = match content.remove("lifetime") {
                None | Some(Value::Null) => None,
                Some(Value::Number(n)) => Some(
                    n.as_u64()
                        .or_else(|| n.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
                        .ok_or_else(|| rejected(DropReason::Malformed, "lifetime invalid"))?,
                ),
                Some(_) => return Err(rejected(DropReason::Malformed, "lifetime is not a number")),
            };
            CallBody::Invite {
                sdp,
                metadata,
                lifetime_ms,
            }
        }
        CallEventType::Answer => {
            let answer = content
                .remove("answer")
                .ok_or_else(|| rejected(DropReason::Malformed, "missing answer"))?;
            let (_, sdp) = take_sdp(answer, Some(SdpType::Answer), "answer")?;
            CallBody::Answer {
                sdp,
                metadata: take_metadata(content)?.unwrap_or_default(),
            }
        }
        CallEventType::Candidates => {
            let Some(Value::Array(list)) = content.remove("candidates") else {
                return Err(rejected(
                    DropReason::Malformed,
                    "candidates is not an array",
                ));
            };
            if list.len() > MAX_CANDIDATES_PER_EVENT {
                return Err(rejected(
                    DropReason::TooLarge,
                    format!("{} candidates", list.len()),
                ));
            }
            let mut out = Vec::with_capacity(list.len());
            for c in list {
                let c: Candidate = serde_json::from_value(c)
                    .map_err(|e| rejected(DropReason::Malformed, format!("candidate: {e}")))?;
                if c.candidate.len() > 4096 {
                    return Err(rejected(DropReason::TooLarge, "candidate line"));
                }
                out.push(c);
            }
            CallBody::Candidates(out)
        }
        CallEventType::SelectAnswer => CallBody::SelectAnswer {
            selected_party_id: take_id(content, "selected_party_id")?.into(),
        },
        CallEventType::Negotiate => {
            let desc = content
                .remove("description")
                .ok_or_else(|| rejected(DropReason::Malformed, "missing description"))?;
            let (kind, sdp) = take_sdp(desc, None, "description")?;
            CallBody::Negotiate {
                kind,
                sdp,
                metadata: take_metadata(content)?,
            }
        }
        CallEventType::MetadataChanged => CallBody::MetadataChanged(
            take_metadata(content)?
                .ok_or_else(|| rejected(DropReason::Malformed, "missing sdp_stream_metadata"))?,
        ),
        CallEventType::Hangup | CallEventType::Reject => {
            let default = if kind == CallEventType::Reject {
                "reject"
            } else {
                "user_hangup"
            };
            let reason = match content.remove("reason") {
                Some(Value::String(s)) if !s.is_empty() => {
                    let mut s = s;
                    if s.len() > MAX_REASON_LEN {
                        let mut cut = MAX_REASON_LEN;
                        while !s.is_char_boundary(cut) {
                            cut -= 1;
                        }
                        s.truncate(cut);
                    }
                    s
                }
                None | Some(Value::Null) | Some(Value::String(_)) => default.to_owned(),
                Some(_) => return Err(rejected(DropReason::Malformed, "reason is not a string")),
            };
            CallBody::Hangup { reason }
        }
    })
}

/// Who weir is on the wire: the fields of every event it sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub user_id: UserId,
    pub device_id: DeviceId,
    pub session_id: SessionId,
}

/// An event weir wants to send to one device.
#[derive(Clone, Debug, PartialEq)]
pub struct OutgoingToDevice {
    /// E.g. `m.call.answer`.
    pub event_type: &'static str,
    pub to_user: UserId,
    pub to_device: DeviceId,
    /// Per-leg ordering key: sends with the same key go out strictly in order.
    pub call_id: CallId,
    /// The event content.
    pub content: Value,
}

impl OutgoingToDevice {
    /// The `PUT /sendToDevice` request body.
    pub fn body(&self) -> Value {
        let mut devices = Map::new();
        devices.insert(self.to_device.as_str().to_owned(), self.content.clone());
        let mut users = Map::new();
        users.insert(self.to_user.as_str().to_owned(), Value::Object(devices));
        json!({ "messages": users })
    }

    /// Serialised [`Self::body`].
    pub fn body_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(&self.body()).unwrap_or_default()
    }

    /// The request's `messages` as ruma's client sends them: this one device, this content.
    pub fn messages(&self) -> Result<ToDeviceMessages, serde_json::Error> {
        let content = Raw::new(&self.content)?.cast_unchecked();
        let devices = [(
            DeviceIdOrAllDevices::DeviceId(self.to_device.clone()),
            content,
        )];
        Ok([(self.to_user.clone(), devices.into())].into())
    }
}

/// The envelope weir puts on every event: `version`, `call_id`, `party_id`, `conf_id`,
/// `device_id`, `sender_session_id`, `dest_session_id`; never `seq`.
pub(crate) fn envelope(
    me: &Identity,
    call_id: &CallId,
    conf_id: &ConfId,
    dest_session: &SessionId,
) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("version".into(), json!("1"));
    m.insert("call_id".into(), json!(call_id));
    m.insert("party_id".into(), json!(me.device_id));
    m.insert("conf_id".into(), json!(conf_id));
    m.insert("device_id".into(), json!(me.device_id));
    m.insert("sender_session_id".into(), json!(me.session_id));
    m.insert("dest_session_id".into(), json!(dest_session));
    m
}

fn capabilities() -> Value {
    json!({"m.call.transferee": false, "m.call.dtmf": false})
}

fn put_metadata(m: &mut Map<String, Value>, metadata: &SdpStreamMetadata) {
    let v = serde_json::to_value(metadata).unwrap_or_else(|_| json!({}));
    m.insert(METADATA_KEY.into(), v.clone());
    m.insert(METADATA_KEY_UNSTABLE.into(), v);
}

/// `m.call.answer` content.
pub(crate) fn answer_content(
    mut env: Map<String, Value>,
    sdp: &str,
    metadata: &SdpStreamMetadata,
) -> Value {
    env.insert("answer".into(), json!({"type": "answer", "sdp": sdp}));
    put_metadata(&mut env, metadata);
    env.insert("capabilities".into(), capabilities());
    Value::Object(env)
}

/// `m.call.invite` content (weir dialling another focus: a trunk).
pub(crate) fn invite_content(
    mut env: Map<String, Value>,
    sdp: &str,
    metadata: &SdpStreamMetadata,
    lifetime_ms: u64,
) -> Value {
    env.insert("offer".into(), json!({"type": "offer", "sdp": sdp}));
    env.insert("lifetime".into(), json!(lifetime_ms));
    put_metadata(&mut env, metadata);
    env.insert("capabilities".into(), capabilities());
    Value::Object(env)
}

/// `m.call.negotiate` content.
pub(crate) fn negotiate_content(
    mut env: Map<String, Value>,
    kind: SdpType,
    sdp: &str,
    metadata: &SdpStreamMetadata,
) -> Value {
    env.insert(
        "description".into(),
        json!({"type": kind.as_str(), "sdp": sdp}),
    );
    env.insert("lifetime".into(), json!(NEGOTIATE_LIFETIME_MS));
    put_metadata(&mut env, metadata);
    env.insert("capabilities".into(), capabilities());
    Value::Object(env)
}

/// `m.call.candidates` content.
pub(crate) fn candidates_content(mut env: Map<String, Value>, candidates: &[Candidate]) -> Value {
    env.insert(
        "candidates".into(),
        serde_json::to_value(candidates).unwrap_or_else(|_| json!([])),
    );
    Value::Object(env)
}

/// `m.call.sdp_stream_metadata_changed` content (both metadata keys, like answer/negotiate).
pub(crate) fn metadata_changed_content(
    mut env: Map<String, Value>,
    metadata: &SdpStreamMetadata,
) -> Value {
    put_metadata(&mut env, metadata);
    Value::Object(env)
}

/// `m.call.hangup` content.
pub(crate) fn hangup_content(mut env: Map<String, Value>, reason: &str) -> Value {
    env.insert("reason".into(), json!(reason));
    Value::Object(env)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Map<String, Value> {
        let v = json!({
            "version": "1", "call_id": "c1", "party_id": "P", "conf_id": "conf",
            "device_id": "DEV", "sender_session_id": "sess", "dest_session_id": "sfu", "seq": 3,
            "org.matrix.msgid": "m-1"
        });
        match v {
            Value::Object(m) => m,
            _ => unreachable!(),
        }
    }

    fn with(extra: Value) -> Map<String, Value> {
        let mut m = base();
        if let Value::Object(e) = extra {
            m.extend(e);
        }
        m
    }

    fn parse(kind: CallEventType, m: Map<String, Value>) -> Result<InboundCall, Rejected> {
        parse_call("@a:x".try_into().unwrap(), kind, m)
    }

    #[test]
    fn envelope_fields_are_read() {
        let ev = parse(
            CallEventType::Hangup,
            with(json!({"reason": "user_hangup"})),
        )
        .unwrap();
        assert_eq!(ev.env.call_id.as_str(), "c1");
        assert_eq!(ev.env.conf_id.as_str(), "conf");
        assert_eq!(ev.env.device_id.as_str(), "DEV");
        assert_eq!(ev.env.party_id.as_str(), "P");
        assert_eq!(ev.env.sender_session_id.as_str(), "sess");
        assert_eq!(ev.env.seq, Some(3));
        assert_eq!(ev.env.msgid.as_deref(), Some("m-1"));
        assert_eq!(
            ev.body,
            CallBody::Hangup {
                reason: "user_hangup".into()
            }
        );
    }

    #[test]
    fn versions_accepted_and_refused() {
        for v in [json!("1"), json!(1), json!("0"), json!(0)] {
            assert!(
                parse(CallEventType::Hangup, with(json!({"version": v}))).is_ok(),
                "{v}"
            );
        }
        let mut m = base();
        m.remove("version");
        assert!(parse(CallEventType::Hangup, m).is_ok());
        for v in [json!("2"), json!(2), json!(1.5), json!(null), json!({})] {
            let r = parse(CallEventType::Hangup, with(json!({"version": v}))).unwrap_err();
            assert_eq!(r.reason, DropReason::BadVersion, "{v}");
        }
    }

    #[test]
    fn missing_or_mistyped_envelope_fields_are_malformed() {
        for key in [
            "call_id",
            "conf_id",
            "device_id",
            "party_id",
            "sender_session_id",
        ] {
            let mut m = base();
            m.remove(key);
            assert_eq!(
                parse(CallEventType::Hangup, m).unwrap_err().reason,
                DropReason::Malformed,
                "{key}"
            );
            let mut m = base();
            m.insert(key.into(), json!(5));
            assert_eq!(
                parse(CallEventType::Hangup, m).unwrap_err().reason,
                DropReason::Malformed,
                "{key}"
            );
            let mut m = base();
            m.insert(key.into(), json!(""));
            assert_eq!(
                parse(CallEventType::Hangup, m).unwrap_err().reason,
                DropReason::Malformed,
                "{key}"
            );
            let mut m = base();
            m.insert(key.into(), json!("x".repeat(MAX_ID_LEN + 1)));
            assert_eq!(
                parse(CallEventType::Hangup, m).unwrap_err().reason,
                DropReason::Malformed,
                "{key}"
            );
        }
        for seq in [json!(-1), json!(1.5), json!("3"), json!([])] {
            let r = parse(CallEventType::Hangup, with(json!({"seq": seq}))).unwrap_err();
            assert_eq!(r.reason, DropReason::Malformed);
            assert!(
                r.reply_to.is_some(),
                "envelope was readable, so a reply is possible"
            );
        }
    }

    #[test]
    fn invite_and_negotiate_bodies() {
        let ev = parse(
            CallEventType::Invite,
            with(
                json!({"offer": {"type": "offer", "sdp": "v=0"}, "lifetime": 60000,
                "org.matrix.msc3077.sdp_stream_metadata": {"s": {"purpose": "m.usermedia"}}}),
            ),
        )
        .unwrap();
        match ev.body {
            CallBody::Invite {
                sdp,
                metadata,
                lifetime_ms,
            } => {
                assert_eq!(sdp, "v=0");
                assert_eq!(lifetime_ms, Some(60000));
                assert!(metadata.contains_key("s"), "unstable key read");
            }
            b => panic!("{b:?}"),
        }
        let bad_offer = parse(
            CallEventType::Invite,
            with(json!({"offer": {"type": "answer", "sdp": "v=0"}})),
        );
        assert_eq!(bad_offer.unwrap_err().reason, DropReason::Malformed);
        let no_offer = parse(CallEventType::Invite, with(json!({})));
        assert_eq!(no_offer.unwrap_err().reason, DropReason::Malformed);
        let huge = "a".repeat(MAX_SDP_BYTES + 1);
        let r = parse(
            CallEventType::Invite,
            with(json!({"offer": {"type": "offer", "sdp": huge}})),
        );
        assert_eq!(r.unwrap_err().reason, DropReason::TooLarge);
        let ok_size = "a".repeat(MAX_SDP_BYTES);
        assert!(parse(
            CallEventType::Invite,
            with(json!({"offer": {"type": "offer", "sdp": ok_size}}))
        )
        .is_ok());

        let ev = parse(
            CallEventType::Negotiate,
            with(json!({"description": {"type": "answer", "sdp": "v=0"}})),
        )
        .unwrap();
        assert_eq!(
            ev.body,
            CallBody::Negotiate {
                kind: SdpType::Answer,
                sdp: "v=0".into(),
                metadata: None
            }
        );
        let r = parse(
            CallEventType::Negotiate,
            with(json!({"description": {"type": "pranswer", "sdp": "v"}})),
        );
        assert_eq!(r.unwrap_err().reason, DropReason::Malformed);
        let r = parse(CallEventType::MetadataChanged, with(json!({})));
        assert_eq!(r.unwrap_err().reason, DropReason::Malformed);
        let r = parse(
            CallEventType::MetadataChanged,
            with(json!({"sdp_stream_metadata": {"s": {"purpose": 1}}})),
        );
        assert_eq!(r.unwrap_err().reason, DropReason::Malformed);
    }

    #[test]
    fn candidates_body() {
        let ev = parse(
            CallEventType::Candidates,
            with(json!({"candidates": [
                {"candidate": "candidate:1 1 udp 1 1.2.3.4 5 typ host", "sdpMid": "0", "sdpMLineIndex": 0, "usernameFragment": "u"},
                {"candidate": "", "sdpMid": null, "sdpMLineIndex": null}
            ]})),
        )
        .unwrap();
        let CallBody::Candidates(c) = ev.body else {
            panic!()
        };
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].sdp_m_line_index, Some(0));
        assert!(c[1].is_end_of_candidates());
        assert_eq!(c[1], Candidate::end_of_candidates());
        for bad in [
            json!("x"),
            json!([{"sdpMid": "0"}]),
            json!([{"candidate": 1}]),
            json!([{"candidate": "", "sdpMLineIndex": -1}]),
        ] {
            let r = parse(CallEventType::Candidates, with(json!({"candidates": bad})));
            assert_eq!(r.unwrap_err().reason, DropReason::Malformed);
        }
        let many: Vec<Value> = (0..=MAX_CANDIDATES_PER_EVENT)
            .map(|_| json!({"candidate": ""}))
            .collect();
        let r = parse(CallEventType::Candidates, with(json!({"candidates": many})));
        assert_eq!(r.unwrap_err().reason, DropReason::TooLarge);
    }

    #[test]
    fn hangup_reason_defaults_and_is_bounded() {
        let ev = parse(CallEventType::Reject, base()).unwrap();
        assert_eq!(
            ev.body,
            CallBody::Hangup {
                reason: "reject".into()
            }
        );
        let ev = parse(CallEventType::Hangup, base()).unwrap();
        assert_eq!(
            ev.body,
            CallBody::Hangup {
                reason: "user_hangup".into()
            }
        );
        let long = "é".repeat(MAX_REASON_LEN);
        let ev = parse(CallEventType::Hangup, with(json!({"reason": long}))).unwrap();
        let CallBody::Hangup { reason } = ev.body else {
            panic!()
        };
        assert!(reason.len() <= MAX_REASON_LEN);
    }

    #[test]
    fn classify_types() {
        assert_eq!(
            classify("m.call.invite"),
            TypeClass::Call(CallEventType::Invite)
        );
        assert_eq!(
            classify("org.matrix.call.sdp_stream_metadata_changed"),
            TypeClass::Call(CallEventType::MetadataChanged)
        );
        assert_eq!(classify("m.room.encrypted"), TypeClass::Encrypted);
        for k in [
            "io.element.call.encryption_keys",
            "m.rtc.encryption_key",
            "m.room_key",
            "m.forwarded_room_key",
            "m.room_key_request",
        ] {
            assert_eq!(classify(k), TypeClass::Key);
        }
        assert_eq!(
            classify("m.call.answer"),
            TypeClass::Call(CallEventType::Answer)
        );
        assert_eq!(classify("m.call.replaces"), TypeClass::Unknown);
        assert_eq!(received_label("m.call.invite"), "m.call.invite");
        assert_eq!(received_label("m.room_key"), "m.room_key");
        assert_eq!(received_label("evil.\u{0}type"), "other");
    }

    #[test]
    fn end_of_candidates_serialises_exactly() {
        assert_eq!(
            serde_json::to_string(&Candidate::end_of_candidates()).unwrap(),
            r#"{"candidate":""}"#
        );
        let c = Candidate {
            candidate: "candidate:1".into(),
            sdp_mid: Some("0".into()),
            sdp_m_line_index: Some(0),
            username_fragment: Some("u".into()),
        };
        assert_eq!(
            serde_json::to_value(&c).unwrap(),
            json!({"candidate": "candidate:1", "sdpMid": "0", "sdpMLineIndex": 0, "usernameFragment": "u"})
        );
    }
}
