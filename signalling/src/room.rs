//! Room state tracker (memberships, `m.call`, `m.call.member`) and invite authorisation.
//!
//! Fed with state events exactly as `/sync` or `/rooms/{id}/state` returns them; anything it
//! cannot read is ignored (a bad state event must not make a whole room unusable). Both the
//! unstable (`org.matrix.msc3401.*`) and stable (`m.call*`) names are tracked; either variant can
//! authorise.

use std::collections::{BTreeMap, HashMap};

use serde_json::Value;

use crate::ids::{ConfId, DeviceId, RoomId, SessionId, UserId};

pub const CALL_TYPES: [&str; 2] = ["org.matrix.msc3401.call", "m.call"];
pub const MEMBER_TYPES: [&str; 2] = ["org.matrix.msc3401.call.member", "m.call.member"];
pub const ROOM_MEMBER: &str = "m.room.member";

/// Most `m.calls` entries / devices read from one `m.call.member` event.
const MAX_MEMBER_CALLS: usize = 8;
const MAX_MEMBER_DEVICES: usize = 64;

/// Why an invite was refused; the label of `weir_invites_refused_total{reason}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RefuseReason {
    /// No room that weir is joined to has an active `m.call` with this `conf_id`.
    NoCall,
    /// The sender is not joined to the call's room.
    NotInRoom,
    /// The sender has no `m.call.member` device entry with this `device_id` for this call.
    NoMemberDevice,
    /// The device entry has expired (or carries no `expires_ts`).
    MemberExpired,
    /// The device entry's `session_id` differs from the invite's `sender_session_id`.
    SessionMismatch,
    /// `allowed_servers` is set and does not contain the sender's server.
    ServerNotAllowed,
    /// The sender has too many unanswered invites, or weir holds too many legs.
    TooManyInvites,
}

impl RefuseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RefuseReason::NoCall => "no_call",
            RefuseReason::NotInRoom => "not_in_room",
            RefuseReason::NoMemberDevice => "no_member_device",
            RefuseReason::MemberExpired => "member_expired",
            RefuseReason::SessionMismatch => "session_mismatch",
            RefuseReason::ServerNotAllowed => "server_not_allowed",
            RefuseReason::TooManyInvites => "too_many_invites",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct MemberDevice {
    device_id: DeviceId,
    session_id: Option<SessionId>,
    expires_ts: Option<u64>,
    /// MSC3898 `foci.active`: the foci this device publishes to.
    foci: Vec<FocusRef>,
}

/// A focus named in a member device's MSC3898 `org.matrix.msc3898.foci.active` (or
/// `m.foci.active`) list: `{"user_id", "device_id"}`, plus weir's optional `session_id` (the
/// `dest_session_id` to call it with; absent means [`DEFAULT_FOCUS_SESSION`]).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FocusRef {
    pub user_id: UserId,
    pub device_id: DeviceId,
    pub session_id: SessionId,
}

/// The session id a focus is called with when its `foci.active` entry does not say.
pub const DEFAULT_FOCUS_SESSION: &str = "sfu";

/// The two spellings of MSC3898's active-foci key in a member device entry.
pub const FOCI_ACTIVE_KEYS: [&str; 2] = ["org.matrix.msc3898.foci.active", "m.foci.active"];

/// Most foci read from one device entry.
const MAX_FOCI_PER_DEVICE: usize = 4;

#[derive(Clone, Debug, Default)]
struct RoomState {
    members: HashMap<UserId, String>,
    /// (variant index, conf id) → active (has valid intent/type and is not terminated).
    calls: BTreeMap<(usize, ConfId), bool>,
    /// (variant index, user) → (conf id → devices).
    call_members: HashMap<(usize, UserId), HashMap<ConfId, Vec<MemberDevice>>>,
}

impl RoomState {
    fn call_active(&self, conf: &ConfId) -> bool {
        (0..CALL_TYPES.len()).any(|v| self.calls.get(&(v, conf.clone())).copied().unwrap_or(false))
    }

    fn joined(&self, user: &UserId) -> bool {
        self.members.get(user).is_some_and(|m| m == "join")
    }

    fn devices<'a>(
        &'a self,
        user: &'a UserId,
        conf: &'a ConfId,
    ) -> impl Iterator<Item = &'a MemberDevice> + 'a {
        (0..MEMBER_TYPES.len()).flat_map(move |v| {
            self.call_members
                .get(&(v, user.clone()))
                .and_then(|m| m.get(conf))
                .into_iter()
                .flatten()
        })
    }
}

/// What weir knows about the rooms it is joined to.
#[derive(Debug)]
pub struct RoomTracker {
    me: UserId,
    rooms: BTreeMap<RoomId, RoomState>,
}

impl RoomTracker {
    pub fn new(me: UserId) -> Self {
        Self {
            me,
            rooms: BTreeMap::new(),
        }
    }

    /// Rooms weir is joined to.
    pub fn joined_rooms(&self) -> impl Iterator<Item = &RoomId> {
        self.rooms.keys()
    }

    /// Records that weir is joined to `room` (it appeared under `rooms.join`).
    pub fn mark_joined(&mut self, room: &RoomId) {
        self.rooms.entry(room.clone()).or_default();
    }

    /// Forgets a room weir left or was removed from.
    pub fn remove_room(&mut self, room: &RoomId) -> bool {
        self.rooms.remove(room).is_some()
    }

    /// Drops everything known about `room` (before applying a full state snapshot).
    pub fn reset_room(&mut self, room: &RoomId) {
        self.rooms.insert(room.clone(), RoomState::default());
    }

    /// Applies one event if it is a state event of a tracked type. Returns true if the state
    /// changed in a way that matters (memberships, calls, call members).
    pub fn apply_event(&mut self, room: &RoomId, event: &Value) -> bool {
        let Some(obj) = event.as_object() else {
            return false;
        };
        let (Some(ty), Some(state_key)) = (
            obj.get("type").and_then(Value::as_str),
            obj.get("state_key").and_then(Value::as_str),
        ) else {
            return false;
        };
        let empty = Value::Object(Default::default());
        let content = obj.get("content").unwrap_or(&empty);
        let sender = obj.get("sender").and_then(Value::as_str);
        if ty == ROOM_MEMBER {
            let membership = content
                .get("membership")
                .and_then(Value::as_str)
                .unwrap_or("leave");
            // Only leaving (or being banned) ends our view of the room. A timeline replays
            // history, so our own earlier `invite` arrives after events we must keep.
            if state_key == self.me.as_str() && matches!(membership, "leave" | "ban") {
                return self.remove_room(room);
            }
            let Ok(user) = UserId::try_from(state_key) else {
                return false;
            };
            let state = self.rooms.entry(room.clone()).or_default();
            state.members.insert(user, membership.to_owned());
            return true;
        }
        if let Some(variant) = CALL_TYPES.iter().position(|t| *t == ty) {
            let active = content.get("m.terminated").is_none()
                && content.get("m.intent").is_some_and(Value::is_string)
                && content.get("m.type").is_some_and(Value::is_string);
            let Some(state) = self.rooms.get_mut(room) else {
                return false;
            };
            state
                .calls
                .insert((variant, ConfId::from(state_key)), active);
            return true;
        }
        if let Some(variant) = MEMBER_TYPES.iter().position(|t| *t == ty) {
            // MSC3401: the state key is the user; only that user may speak for their devices.
            let Ok(user) = UserId::try_from(state_key) else {
                return false;
            };
            if sender.is_some_and(|s| s != state_key) {
                return false;
            }
            let Some(state) = self.rooms.get_mut(room) else {
                return false;
            };
            let parsed = parse_member_content(content);
            let key = (variant, user);
            if parsed.is_empty() {
                state.call_members.remove(&key);
            } else {
                state.call_members.insert(key, parsed);
            }
            return true;
        }
        false
    }

    /// Authorises an invite for `conf` from (`user`, `device`, `session`) at wall-clock `now_ms`.
    /// Returns the room the call lives in.
    ///
    /// When several rooms carry the same `conf_id` (anyone can create a room with any state
    /// key), the first room (by id) where the sender is fully authorised wins; the leg is then
    /// bound to that room, so conferences of different rooms never mix.
    pub fn authorise(
        &self,
        user: &UserId,
        device: &DeviceId,
        session: &SessionId,
        conf: &ConfId,
        now_ms: u64,
    ) -> Result<RoomId, RefuseReason> {
        self.first_room_with(conf, |_, state| {
            if !state.joined(user) {
                return Err(RefuseReason::NotInRoom);
            }
            let mut r = Err(RefuseReason::NoMemberDevice);
            for d in state.devices(user, conf).filter(|d| &d.device_id == device) {
                let this = if d.expires_ts.is_none_or(|e| e <= now_ms) {
                    Err(RefuseReason::MemberExpired)
                } else if d.session_id.as_ref().is_some_and(|s| s != session) {
                    Err(RefuseReason::SessionMismatch)
                } else {
                    Ok(())
                };
                r = match (r, this) {
                    (Ok(()), _) | (_, Ok(())) => Ok(()),
                    (Err(a), Err(b)) => Err(more_specific(a, b)),
                };
            }
            r
        })
    }

    /// The first room (by id) with an active call `conf` that `check` accepts; otherwise the
    /// most specific refusal any such room gave (`no_call` when none has the call).
    fn first_room_with(
        &self,
        conf: &ConfId,
        mut check: impl FnMut(&RoomId, &RoomState) -> Result<(), RefuseReason>,
    ) -> Result<RoomId, RefuseReason> {
        let mut best: Option<RefuseReason> = None;
        for (room_id, state) in &self.rooms {
            if !state.call_active(conf) {
                continue;
            }
            match check(room_id, state) {
                Ok(()) => return Ok(room_id.clone()),
                Err(reason) => best = Some(best.map_or(reason, |b| more_specific(b, reason))),
            }
        }
        Err(best.unwrap_or(RefuseReason::NoCall))
    }

    /// True while (`user`, `device`) is a live participant of `conf` in `room`: the user is
    /// joined, the call is active and an unexpired device entry exists. (A changed session id
    /// does not count as gone: a re-joining device sends a new invite, which replaces the leg.)
    pub fn member_present(
        &self,
        room: &RoomId,
        conf: &ConfId,
        user: &UserId,
        device: &DeviceId,
        now_ms: u64,
    ) -> bool {
        self.any_device(room, conf, user, device, |live| live(now_ms))
    }

    /// Whether a device entry of (`user`, `device`) exists but has expired: an absence weir
    /// computes from its own clock, so nothing late from `/sync` can undo it.
    pub fn member_expired(
        &self,
        room: &RoomId,
        conf: &ConfId,
        user: &UserId,
        device: &DeviceId,
        now_ms: u64,
    ) -> bool {
        self.any_device(room, conf, user, device, |live| !live(now_ms))
    }

    /// Whether `user` is joined, the call is active, and some entry of `device` passes `test`
    /// (given a function telling whether that entry is unexpired at a wall-clock time).
    fn any_device(
        &self,
        room: &RoomId,
        conf: &ConfId,
        user: &UserId,
        device: &DeviceId,
        test: impl Fn(&dyn Fn(u64) -> bool) -> bool,
    ) -> bool {
        let Some(state) = self.rooms.get(room) else {
            return false;
        };
        state.joined(user)
            && state.call_active(conf)
            && state.devices(user, conf).any(|d| {
                &d.device_id == device && test(&|now: u64| d.expires_ts.is_some_and(|e| e > now))
            })
    }

    /// The membership of `user` in `room`, if known.
    pub fn membership(&self, room: &RoomId, user: &UserId) -> Option<&str> {
        self.rooms.get(room)?.members.get(user).map(String::as_str)
    }

    /// Whether `room` has an active call `conf`.
    pub fn call_active(&self, room: &RoomId, conf: &ConfId) -> bool {
        self.rooms.get(room).is_some_and(|s| s.call_active(conf))
    }

    /// The foci serving `conf` in `room` at wall-clock `now_ms`: every focus named active by
    /// an unexpired device entry of a joined member, while the call is active. A focus whose
    /// user is not joined to the room is left out (it could not be authorised anyway).
    pub fn active_foci(&self, room: &RoomId, conf: &ConfId, now_ms: u64) -> Vec<FocusRef> {
        let Some(state) = self.rooms.get(room) else {
            return Vec::new();
        };
        if !state.call_active(conf) {
            return Vec::new();
        }
        let mut out: Vec<FocusRef> = state
            .call_members
            .iter()
            .filter(|((_, user), _)| state.joined(user))
            .filter_map(|(_, confs)| confs.get(conf))
            .flatten()
            .filter(|d| d.expires_ts.is_some_and(|e| e > now_ms))
            .flat_map(|d| d.foci.iter().cloned())
            .filter(|f| state.joined(&f.user_id))
            .collect();
        out.sort();
        out.dedup_by(|a, b| a.user_id == b.user_id && a.device_id == b.device_id);
        out
    }

    /// Every (room, conf) that has an active call, for re-deriving the foci of each.
    pub fn active_calls(&self) -> Vec<(RoomId, ConfId)> {
        let mut out = Vec::new();
        for (room, state) in &self.rooms {
            for ((_, conf), active) in &state.calls {
                if *active && !out.iter().any(|(r, c)| r == room && c == conf) {
                    out.push((room.clone(), conf.clone()));
                }
            }
        }
        out
    }

    /// Authorises a trunk invite: (`user`, `device`) must be a focus that an unexpired member
    /// device of `conf` names as active, and `user` must be joined to that room. Returns the
    /// room, chosen as in [`Self::authorise`].
    pub fn authorise_focus(
        &self,
        user: &UserId,
        device: &DeviceId,
        conf: &ConfId,
        now_ms: u64,
    ) -> Result<RoomId, RefuseReason> {
        self.first_room_with(conf, |room_id, state| {
            if !state.joined(user) {
                Err(RefuseReason::NotInRoom)
            } else if self
                .active_foci(room_id, conf, now_ms)
                .iter()
                .any(|f| &f.user_id == user && &f.device_id == device)
            {
                Ok(())
            } else {
                // Neither a member device nor a focus anyone names: refused as a participant
                // without a member device would be.
                Err(RefuseReason::NoMemberDevice)
            }
        })
    }

    /// Whether (`user`, `device`) is a live member device of `conf` in `room` that names
    /// (`focus_user`, `focus_device`) as its active focus.
    #[allow(clippy::too_many_arguments)]
    pub fn device_uses_focus(
        &self,
        room: &RoomId,
        conf: &ConfId,
        user: &UserId,
        device: &DeviceId,
        focus_user: &UserId,
        focus_device: &DeviceId,
        now_ms: u64,
    ) -> bool {
        let Some(state) = self.rooms.get(room) else {
            return false;
        };
        state.joined(user)
            && state.devices(user, conf).any(|d| {
                &d.device_id == device
                    && d.expires_ts.is_some_and(|e| e > now_ms)
                    && d.foci
                        .iter()
                        .any(|f| &f.user_id == focus_user && &f.device_id == focus_device)
            })
    }

    /// Whether `user` has any member device entry (expired or not) in `conf` anywhere: such a
    /// sender is a participant, never a focus, when both would match.
    pub fn has_member_devices(&self, user: &UserId, device: &DeviceId, conf: &ConfId) -> bool {
        self.rooms
            .values()
            .any(|s| s.devices(user, conf).any(|d| &d.device_id == device))
    }
}

/// Ranks refusals so the most informative one is reported: a sender who got further through
/// the checks gets the more specific reason.
fn specificity(r: RefuseReason) -> u8 {
    match r {
        RefuseReason::NoCall => 0,
        RefuseReason::NotInRoom => 1,
        RefuseReason::NoMemberDevice => 2,
        RefuseReason::MemberExpired => 3,
        RefuseReason::SessionMismatch => 4,
        RefuseReason::ServerNotAllowed | RefuseReason::TooManyInvites => 5,
    }
}

fn more_specific(a: RefuseReason, b: RefuseReason) -> RefuseReason {
    if specificity(b) > specificity(a) {
        b
    } else {
        a
    }
}

fn parse_member_content(content: &Value) -> HashMap<ConfId, Vec<MemberDevice>> {
    let mut out: HashMap<ConfId, Vec<MemberDevice>> = HashMap::new();
    let Some(calls) = content.get("m.calls").and_then(Value::as_array) else {
        return out;
    };
    for call in calls.iter().take(MAX_MEMBER_CALLS) {
        let Some(conf) = call.get("m.call_id").and_then(Value::as_str) else {
            continue;
        };
        let Some(devices) = call.get("m.devices").and_then(Value::as_array) else {
            continue;
        };
        let list = out.entry(ConfId::from(conf)).or_default();
        for d in devices.iter().take(MAX_MEMBER_DEVICES) {
            let Some(device_id) = d.get("device_id").and_then(Value::as_str) else {
                continue;
            };
            let session_id = d
                .get("session_id")
                .and_then(Value::as_str)
                .map(SessionId::from);
            let expires_ts = d.get("expires_ts").and_then(|v| {
                v.as_u64()
                    .or_else(|| v.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
            });
            list.push(MemberDevice {
                device_id: DeviceId::from(device_id),
                session_id,
                expires_ts,
                foci: parse_foci(d),
            });
        }
    }
    out.retain(|_, v| !v.is_empty());
    out
}

/// The MSC3898 active foci of one device entry; entries that are not `{user_id, device_id}`
/// strings are skipped.
fn parse_foci(device: &Value) -> Vec<FocusRef> {
    let mut out = Vec::new();
    for key in FOCI_ACTIVE_KEYS {
        let Some(list) = device.get(key).and_then(Value::as_array) else {
            continue;
        };
        for f in list.iter().take(MAX_FOCI_PER_DEVICE) {
            let (Some(user), Some(dev)) = (
                f.get("user_id").and_then(Value::as_str),
                f.get("device_id").and_then(Value::as_str),
            ) else {
                continue;
            };
            let Ok(user) = UserId::try_from(user) else {
                continue;
            };
            if dev.is_empty() || dev.len() > 255 {
                continue;
            }
            let session = f
                .get("session_id")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty() && s.len() <= 255)
                .unwrap_or(DEFAULT_FOCUS_SESSION);
            let r = FocusRef {
                user_id: user,
                device_id: DeviceId::from(dev),
                session_id: SessionId::from(session),
            };
            if !out.contains(&r) {
                out.push(r);
            }
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    pub(crate) fn fixture_dir(name: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("testdata/wire-fixtures")
            .join(name)
    }

    pub(crate) fn load_state(name: &str) -> (RoomId, Vec<Value>) {
        let mut events = Vec::new();
        for f in [
            "state.m.room.power_levels.json",
            "state.org.matrix.msc3401.call.json",
            "state.org.matrix.msc3401.call.member.json",
        ] {
            let text = std::fs::read_to_string(fixture_dir(name).join(f)).unwrap();
            let v: Value = serde_json::from_str(&text).unwrap();
            events.extend(v.as_array().unwrap().iter().cloned());
        }
        let room = events
            .iter()
            .find_map(|e| e.get("room_id").and_then(Value::as_str))
            .map(|r| RoomId::try_from(r).unwrap())
            .unwrap();
        (room, events)
    }

    /// The fixtures do not include `m.room.member` state: synthesise joins for every sender
    /// of a state event, plus the focus.
    pub(crate) fn tracker_from_fixture(name: &str, me: &UserId) -> (RoomTracker, RoomId) {
        let (room, events) = load_state(name);
        let mut t = RoomTracker::new(me.clone());
        t.mark_joined(&room);
        let mut senders: Vec<String> = events
            .iter()
            .filter_map(|e| e.get("sender").and_then(Value::as_str).map(str::to_owned))
            .collect();
        senders.push(me.to_string());
        senders.sort();
        senders.dedup();
        for s in senders {
            t.apply_event(&room, &join_event(&s));
        }
        for e in &events {
            t.apply_event(&room, e);
        }
        (t, room)
    }

    pub(crate) fn join_event(user: &str) -> Value {
        json!({"type": "m.room.member", "state_key": user, "sender": user, "content": {"membership": "join"}})
    }

    const ME: &str = "@focus-mwyct2zzfae9:localhost";
    const ALICE: &str = "@alice-mwyct2zzfae9:localhost";
    const CONF: &str = "1795746014673K8KMyUuL409CM3qp";
    const ALICE_EXPIRES: u64 = 1795749614846;

    #[test]
    fn fixture_member_is_authorised_until_expiry() {
        let (t, room) = tracker_from_fixture("focus-emulated-basic", &ME.try_into().unwrap());
        let ok = t.authorise(
            &ALICE.try_into().unwrap(),
            &"ALICEDEV".into(),
            &"yfKqxvEvCA".into(),
            &CONF.into(),
            ALICE_EXPIRES - 1,
        );
        assert_eq!(ok, Ok(room.clone()));
        let expired = t.authorise(
            &ALICE.try_into().unwrap(),
            &"ALICEDEV".into(),
            &"yfKqxvEvCA".into(),
            &CONF.into(),
            ALICE_EXPIRES,
        );
        assert_eq!(expired, Err(RefuseReason::MemberExpired));
        assert!(t.member_present(
            &room,
            &CONF.into(),
            &ALICE.try_into().unwrap(),
            &"ALICEDEV".into(),
            ALICE_EXPIRES - 1
        ));
        assert!(!t.member_present(
            &room,
            &CONF.into(),
            &ALICE.try_into().unwrap(),
            &"ALICEDEV".into(),
            ALICE_EXPIRES
        ));
    }

    /// A timeline after our join replays the room's history in order, including our own
    /// earlier `invite`: that must not wipe the call state learned just before it.
    #[test]
    fn our_own_invite_in_a_replayed_timeline_keeps_the_room() {
        let (room, state) = load_state("focus-emulated-basic");
        let mut t = RoomTracker::new(ME.try_into().unwrap());
        let mut timeline = vec![join_event(ALICE)];
        timeline.extend(
            state
                .iter()
                .filter(|e| e["type"] == "org.matrix.msc3401.call")
                .cloned(),
        );
        timeline.push(json!({"type": "m.room.member", "state_key": ME, "sender": ALICE, "content": {"membership": "invite"}}));
        timeline.push(join_event(ME));
        timeline.extend(
            state
                .iter()
                .filter(|e| e["type"] == "org.matrix.msc3401.call.member")
                .cloned(),
        );
        for ev in &timeline {
            t.apply_event(&room, ev);
        }
        let ok = t.authorise(
            &ALICE.try_into().unwrap(),
            &"ALICEDEV".into(),
            &"yfKqxvEvCA".into(),
            &CONF.into(),
            ALICE_EXPIRES - 1,
        );
        assert_eq!(ok, Ok(room.clone()));
        // Leaving does end it.
        t.apply_event(&room, &json!({"type": "m.room.member", "state_key": ME, "sender": ME, "content": {"membership": "leave"}}));
        assert!(t
            .authorise(
                &ALICE.try_into().unwrap(),
                &"ALICEDEV".into(),
                &"yfKqxvEvCA".into(),
                &CONF.into(),
                ALICE_EXPIRES - 1
            )
            .is_err());
    }

    #[test]
    fn refusal_reasons() {
        let (mut t, room) = tracker_from_fixture("focus-emulated-basic", &ME.try_into().unwrap());
        let now = ALICE_EXPIRES - 10_000;
        let auth = |t: &RoomTracker, user: &str, dev: &str, sess: &str, conf: &str| {
            t.authorise(
                &user.try_into().unwrap(),
                &dev.into(),
                &sess.into(),
                &conf.into(),
                now,
            )
        };
        assert_eq!(
            auth(&t, ALICE, "ALICEDEV", "other-session", CONF),
            Err(RefuseReason::SessionMismatch)
        );
        assert_eq!(
            auth(&t, ALICE, "BOBDEV", "yfKqxvEvCA", CONF),
            Err(RefuseReason::NoMemberDevice)
        );
        assert_eq!(
            auth(&t, "@mallory:localhost", "M", "s", CONF),
            Err(RefuseReason::NotInRoom)
        );
        assert_eq!(
            auth(&t, ALICE, "ALICEDEV", "yfKqxvEvCA", "other-conf"),
            Err(RefuseReason::NoCall)
        );
        // Alice leaves the room: her member entry no longer counts.
        t.apply_event(&room, &json!({"type": "m.room.member", "state_key": ALICE, "sender": ALICE, "content": {"membership": "leave"}}));
        assert_eq!(
            auth(&t, ALICE, "ALICEDEV", "yfKqxvEvCA", CONF),
            Err(RefuseReason::NotInRoom)
        );
        assert!(!t.member_present(
            &room,
            &CONF.into(),
            &ALICE.try_into().unwrap(),
            &"ALICEDEV".into(),
            now
        ));
    }

    #[test]
    fn terminated_call_and_removed_member_entry() {
        let (mut t, room) = tracker_from_fixture("focus-emulated-basic", &ME.try_into().unwrap());
        let now = ALICE_EXPIRES - 10_000;
        t.apply_event(&room, &json!({"type": "org.matrix.msc3401.call.member", "state_key": ALICE, "sender": ALICE, "content": {"m.calls": []}}));
        assert_eq!(
            t.authorise(
                &ALICE.try_into().unwrap(),
                &"ALICEDEV".into(),
                &"yfKqxvEvCA".into(),
                &CONF.into(),
                now
            ),
            Err(RefuseReason::NoMemberDevice)
        );
        t.apply_event(&room, &json!({"type": "org.matrix.msc3401.call", "state_key": CONF, "sender": ALICE, "content": {"m.intent": "m.room", "m.type": "m.video", "m.terminated": "call_ended"}}));
        assert!(!t.call_active(&room, &CONF.into()));
        assert_eq!(
            t.authorise(
                &ALICE.try_into().unwrap(),
                &"ALICEDEV".into(),
                &"yfKqxvEvCA".into(),
                &CONF.into(),
                now
            ),
            Err(RefuseReason::NoCall)
        );
    }

    #[test]
    fn member_event_for_someone_else_is_ignored() {
        let (mut t, room) = tracker_from_fixture("focus-emulated-basic", &ME.try_into().unwrap());
        let forged = json!({"type": "org.matrix.msc3401.call.member", "state_key": "@bob-mwyct2zzfae9:localhost",
            "sender": ALICE, "content": {"m.calls": []}});
        assert!(!t.apply_event(&room, &forged));
        let now = ALICE_EXPIRES - 10_000;
        assert!(t
            .authorise(
                &"@bob-mwyct2zzfae9:localhost".try_into().unwrap(),
                &"BOBDEV".into(),
                &"G0aDtgpxYJ".into(),
                &CONF.into(),
                now
            )
            .is_ok());
    }

    #[test]
    fn stable_names_and_garbage_state_events() {
        let me = UserId::try_from("@sfu:hs").unwrap();
        let mut t = RoomTracker::new(me.clone());
        let room = RoomId::try_from("!r:hs").unwrap();
        t.mark_joined(&room);
        for garbage in [
            json!(null),
            json!([]),
            json!({"type": 1}),
            json!({"type": "m.call", "state_key": 5}),
            json!({"type": "m.call.member", "state_key": "@u:hs", "content": {"m.calls": "x"}}),
            json!({"type": "m.call.member", "state_key": "@u:hs", "content": {"m.calls": [{"m.call_id": 1}, {"m.call_id": "c", "m.devices": [{"device_id": 3}]}]}}),
        ] {
            t.apply_event(&room, &garbage);
        }
        t.apply_event(&room, &join_event("@u:hs"));
        t.apply_event(&room, &json!({"type": "m.call", "state_key": "c", "sender": "@u:hs", "content": {"m.intent": "m.room", "m.type": "m.voice"}}));
        t.apply_event(&room, &json!({"type": "m.call.member", "state_key": "@u:hs", "sender": "@u:hs",
            "content": {"m.calls": [{"m.call_id": "c", "m.devices": [{"device_id": "D", "expires_ts": 2000.0, "feeds": []}]}]}}));
        // No session id in the entry: any session is accepted.
        assert_eq!(
            t.authorise(
                &"@u:hs".try_into().unwrap(),
                &"D".into(),
                &"any".into(),
                &"c".into(),
                1000
            ),
            Ok(room.clone())
        );
        // Our own leave forgets the room.
        t.apply_event(&room, &json!({"type": "m.room.member", "state_key": "@sfu:hs", "sender": "@u:hs", "content": {"membership": "leave"}}));
        assert_eq!(
            t.authorise(
                &"@u:hs".try_into().unwrap(),
                &"D".into(),
                &"any".into(),
                &"c".into(),
                1000
            ),
            Err(RefuseReason::NoCall)
        );
    }

    #[test]
    fn the_same_conf_id_in_two_rooms_binds_to_the_authorising_room() {
        let me = UserId::try_from("@sfu:hs").unwrap();
        let mut t = RoomTracker::new(me.clone());
        for (room, user) in [("!a:hs", "@attacker:hs"), ("!b:hs", "@u:hs")] {
            let room = RoomId::try_from(room).unwrap();
            t.mark_joined(&room);
            t.apply_event(&room, &join_event(user));
            t.apply_event(&room, &json!({"type": "m.call", "state_key": "c", "sender": user, "content": {"m.intent": "m.room", "m.type": "m.voice"}}));
            t.apply_event(&room, &json!({"type": "m.call.member", "state_key": user, "sender": user,
                "content": {"m.calls": [{"m.call_id": "c", "m.devices": [{"device_id": "D", "session_id": "s", "expires_ts": 5000}]}]}}));
        }
        assert_eq!(
            t.authorise(
                &"@u:hs".try_into().unwrap(),
                &"D".into(),
                &"s".into(),
                &"c".into(),
                1000
            ),
            Ok(RoomId::try_from("!b:hs").unwrap())
        );
        assert_eq!(
            t.authorise(
                &"@attacker:hs".try_into().unwrap(),
                &"D".into(),
                &"s".into(),
                &"c".into(),
                1000
            ),
            Ok(RoomId::try_from("!a:hs").unwrap())
        );
        assert_eq!(
            t.authorise(
                &"@x:hs".try_into().unwrap(),
                &"D".into(),
                &"s".into(),
                &"c".into(),
                1000
            ),
            Err(RefuseReason::NotInRoom)
        );
    }
}
