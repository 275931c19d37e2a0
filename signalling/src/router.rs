//! The sans-I/O core: to-device events and room state in, [`LegEvent`]s and to-device sends
//! out. Pure state machine: every input carries `now: Instant`; nothing here does I/O, reads
//! a clock or sleeps. The runtime (`runtime.rs`) feeds it from `/sync` and the focus's
//! commands, and performs the [`Output`]s.
//!
//! Policy decisions taken here (see also `docs/decisions.md`):
//! - Refused invites get `m.call.reject` with the refusal reason (`not_in_room`, `no_call`, …);
//!   a refused re-offer on a live leg gets `m.call.hangup`
//!   as `reason`; js-sdk accepts any string and shows it in logs, which helps operators.
//!   Refusals that late room state could fix are first held for [`RouterConfig::auth_grace`]
//!   and re-checked after each room update (the to-device invite can overtake the
//!   `m.call.member` update, especially over federation).
//! - Any non-invite, non-hangup event for an unknown `call_id` gets `m.call.hangup`
//!   `reason: "unknown_error"`, at most once per `call_id` per [`RouterConfig::unknown_call_reply_interval`]
//!   and at most [`RouterConfig::unknown_call_replies_per_sec`] in total, so a flood never
//!   amplifies. Hangups for unknown calls are dropped silently (never answer a hangup with one).
//! - Early candidates (before their invite) are kept per (user, device, call) for
//!   [`RouterConfig::early_ttl`]; if no invite comes they are dropped (`early_expired`) and the
//!   unknown-call hangup is sent.
//! - A re-sent invite for an existing leg: from another owner → `not_leg_owner`; identical
//!   session, SDP and metadata → `duplicate`; otherwise re-authorised and delivered as
//!   [`LegEvent::Invite`] (a re-offer).

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::time::{Duration, Instant};

use serde_json::Value;
use tracing::{debug, error, info, warn};

use crate::ids::{CallId, ConfId, DeviceId, RoomId, UserId};
use crate::leg::{Leg, LegCommand, LegEvent};
use crate::metadata::SdpStreamMetadata;
use crate::metrics::Metrics;
use crate::reorder::{Admit, Reorder, ReorderKey};
use crate::room::{FocusRef, RefuseReason, RoomTracker};
use crate::wire::{
    self, classify, parse_call, received_label, CallBody, CallEventType, Candidate, DropReason,
    Envelope, Identity, InboundCall, OutgoingToDevice, ReplyTo, TypeClass, MAX_ID_LEN,
    MAX_TODEVICE_BODY_BYTES,
};

/// Tunables of the router. [`RouterConfig::new`] gives the defaults.
#[derive(Clone, Debug)]
pub struct RouterConfig {
    pub me: Identity,
    /// Server names allowed to open legs; empty = any.
    pub allowed_servers: Vec<String>,
    pub reorder_timeout: Duration,
    /// How long candidates that arrived before their invite are kept.
    pub early_ttl: Duration,
    /// Most early candidates kept per (user, device, call).
    pub max_early_candidates: usize,
    /// Most calls with early candidates per user.
    pub max_early_calls_per_user: usize,
    /// Most calls with early candidates overall.
    pub max_early_calls: usize,
    /// Most unanswered (within their lifetime) legs per (user, device).
    pub max_unanswered_per_device: usize,
    /// Most legs overall.
    pub max_legs: usize,
    /// Unknown-call hangups: at most one per call id per this interval...
    pub unknown_call_reply_interval: Duration,
    /// ...and at most this many per second overall (token bucket with this burst).
    pub unknown_call_replies_per_sec: u32,
    /// Housekeeping period: member expiry, early-buffer expiry, idle state.
    pub housekeeping_interval: Duration,
    /// An invite refused for a reason that room state arriving late could fix (`no_call`,
    /// `not_in_room`, `no_member_device`, `session_mismatch`, `member_expired`) is held this
    /// long and re-checked after every room update before it is refused. Over federation the
    /// `m.call.member` update and the to-device invite travel separately. Zero disables it.
    pub auth_grace: Duration,
}

impl RouterConfig {
    pub fn new(me: Identity) -> Self {
        Self {
            me,
            allowed_servers: Vec::new(),
            reorder_timeout: Duration::from_secs(1),
            early_ttl: Duration::from_secs(10),
            max_early_candidates: 64,
            max_early_calls_per_user: 8,
            max_early_calls: 2048,
            max_unanswered_per_device: 4,
            max_legs: 10_000,
            unknown_call_reply_interval: Duration::from_secs(30),
            unknown_call_replies_per_sec: 20,
            housekeeping_interval: Duration::from_secs(1),
            auth_grace: Duration::from_secs(3),
        }
    }
}

/// What the router wants done.
#[derive(Clone, Debug, PartialEq)]
pub enum Output {
    /// Deliver to the focus.
    Event(LegEvent),
    /// Send to a device.
    Send(OutgoingToDevice),
    /// Fetch this room's full state and feed it back with [`Router::handle_joined_room`]:
    /// an invite is being held for state that `/sync` may never show (a partial-state join
    /// over federation completes by state resolution, without timeline events).
    RefreshRoom(RoomId),
}

/// Least time between two state refreshes of one room: a refresh costs the homeserver a full
/// state read, and a burst of invites for one room needs only one.
const ROOM_REFRESH_INTERVAL: Duration = Duration::from_secs(2);
/// Every room with an active call has its full state re-read this often. Over federation a
/// state change can reach the homeserver by state resolution or as a pulled event, and
/// `/sync` then never shows it (a far focus or far participants would stay unknown, and no
/// trunk would form). Shorter finds such changes sooner; each re-read is one full state GET
/// per room with a call.
const ROOM_RESYNC_INTERVAL: Duration = Duration::from_secs(10);

struct LegEntry {
    leg: Leg,
    /// Answered by us, or (a trunk we dialled) by the far focus.
    answered: bool,
    /// weir sent the invite (a trunk it dialled).
    caller: bool,
    invited_at: Instant,
    lifetime: Duration,
    offer_hash: u64,
}

/// An invite waiting for room state that may still arrive.
struct Held {
    call: InboundCall,
    until: Instant,
}

/// Most invites held at once, and per (user, device).
const MAX_HELD: usize = 256;
const MAX_HELD_PER_DEVICE: usize = 2;

struct EarlyBuf {
    first_at: Instant,
    events: Vec<(Envelope, Vec<Candidate>)>,
    count: usize,
}

/// Rate limiter for unknown-call hangups.
struct ReplyLimiter {
    per_call: HashMap<CallId, Instant>,
    tokens: f64,
    refilled_at: Instant,
    rate: f64,
    interval: Duration,
}

const MAX_LIMITER_ENTRIES: usize = 8192;

impl ReplyLimiter {
    fn new(rate: u32, interval: Duration, now: Instant) -> Self {
        Self {
            per_call: HashMap::new(),
            tokens: rate as f64,
            refilled_at: now,
            rate: rate as f64,
            interval,
        }
    }

    /// Suppresses replies for `call` for one interval (used when a leg ends).
    fn mark(&mut self, call: &CallId, now: Instant) {
        if self.per_call.len() < MAX_LIMITER_ENTRIES || self.per_call.contains_key(call) {
            self.per_call.insert(call.clone(), now);
        }
    }

    fn allow(&mut self, call: &CallId, now: Instant) -> bool {
        if let Some(at) = self.per_call.get(call) {
            if now.saturating_duration_since(*at) < self.interval {
                return false;
            }
        }
        let elapsed = now
            .saturating_duration_since(self.refilled_at)
            .as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate);
        self.refilled_at = now;
        if self.tokens < 1.0 {
            return false;
        }
        if self.per_call.len() >= MAX_LIMITER_ENTRIES {
            self.sweep(now);
            if self.per_call.len() >= MAX_LIMITER_ENTRIES {
                return false;
            }
        }
        self.tokens -= 1.0;
        self.per_call.insert(call.clone(), now);
        true
    }

    fn sweep(&mut self, now: Instant) {
        let interval = self.interval;
        self.per_call
            .retain(|_, at| now.saturating_duration_since(*at) < interval);
    }
}

/// The signalling state machine. See the module docs.
pub struct Router {
    cfg: RouterConfig,
    metrics: Metrics,
    rooms: RoomTracker,
    reorder: Reorder<InboundCall>,
    legs: HashMap<CallId, LegEntry>,
    early: HashMap<ReorderKey, EarlyBuf>,
    held: Vec<Held>,
    limiter: ReplyLimiter,
    out: VecDeque<Output>,
    anchor: (Instant, u64),
    next_housekeeping: Instant,
    /// The foci of every active conference, as last reported in [`LegEvent::Foci`].
    foci: HashMap<(RoomId, ConfId), Vec<FocusRef>>,
    /// When each room's state was last asked to be refreshed ([`Output::RefreshRoom`]).
    refreshed: HashMap<RoomId, Instant>,
    /// A member device or focus that `/sync` shows gone, since when: the absence is acted on
    /// only once the room's full state confirms it, or after [`ABSENCE_GRACE`].
    suspects: HashMap<(RoomId, ConfId, UserId, DeviceId), Instant>,
    /// When each room's full state was last applied from the homeserver itself (a first full
    /// sync or a state re-read): what it shows is the room's resolved state.
    authoritative: HashMap<RoomId, Instant>,
}

/// How long an absence seen only through `/sync` waits for the room's full state to confirm
/// it. Federation can deliver an older event after a newer one (a member's `invite` after
/// their `join`), and `/sync` then shows a member or a focus gone who is not: ending their
/// call on that would be wrong. The confirming re-read normally comes within tens of ms; the
/// grace bounds the wait when it fails. Longer tolerates slower homeservers; shorter ends a
/// really departed member's leg sooner (they normally hang up first anyway).
const ABSENCE_GRACE: Duration = Duration::from_secs(5);

/// How long weir's own trunk invite waits for the far focus's answer before the leg is
/// dropped (the focus redials). Federation delivers in seconds; a minute covers a homeserver
/// that is still catching up without leaving a dead dial around for long.
pub const TRUNK_INVITE_LIFETIME_MS: u64 = 60_000;

impl Router {
    /// `anchor` ties the monotonic clock to wall-clock time: `(instant, unix ms at that instant)`.
    /// `m.call.member` expiry (`expires_ts`) is wall-clock; it is compared with
    /// `anchor.1 + (now - anchor.0)`.
    pub fn new(cfg: RouterConfig, metrics: Metrics, anchor: (Instant, u64)) -> Self {
        let now = anchor.0;
        Self {
            rooms: RoomTracker::new(cfg.me.user_id.clone()),
            reorder: Reorder::new(cfg.reorder_timeout),
            legs: HashMap::new(),
            early: HashMap::new(),
            held: Vec::new(),
            limiter: ReplyLimiter::new(
                cfg.unknown_call_replies_per_sec,
                cfg.unknown_call_reply_interval,
                now,
            ),
            out: VecDeque::new(),
            next_housekeeping: now + cfg.housekeeping_interval,
            foci: HashMap::new(),
            refreshed: HashMap::new(),
            suspects: HashMap::new(),
            authoritative: HashMap::new(),
            anchor,
            metrics,
            cfg,
        }
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn rooms(&self) -> &RoomTracker {
        &self.rooms
    }

    pub fn identity(&self) -> &Identity {
        &self.cfg.me
    }

    /// The legs currently open, in no particular order.
    pub fn legs(&self) -> impl Iterator<Item = &Leg> {
        self.legs.values().map(|e| &e.leg)
    }

    /// Wall-clock unix milliseconds at `now`.
    pub fn wall_ms(&self, now: Instant) -> u64 {
        let (i, ms) = self.anchor;
        if now >= i {
            ms.saturating_add(now.duration_since(i).as_millis() as u64)
        } else {
            ms.saturating_sub(i.duration_since(now).as_millis() as u64)
        }
    }

    /// Next output to perform, if any.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// When [`Self::handle_timeout`] should next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let housekeeping = self.has_timed_state().then_some(self.next_housekeeping);
        let held = self.held.iter().map(|h| h.until).min();
        [self.reorder.poll_timeout(), housekeeping, held]
            .into_iter()
            .flatten()
            .min()
    }

    fn has_timed_state(&self) -> bool {
        !self.legs.is_empty()
            || !self.foci.is_empty()
            || !self.suspects.is_empty()
            || !self.early.is_empty()
            || !self.limiter.per_call.is_empty()
            || self.reorder.len() > 0
    }

    /// Fires due timers: reorder timeouts, early-buffer expiry, member expiry.
    pub fn handle_timeout(&mut self, now: Instant) {
        let (released, skipped) = self.reorder.handle_timeout(now);
        if skipped > 0 {
            self.metrics.seq_gaps.inc_by(skipped);
            debug!(skipped, "reorder timeout: skipping seq gap");
        }
        for call in released {
            self.route(call, now);
        }
        if self.held.iter().any(|h| h.until <= now) {
            self.retry_held(now);
        }
        if now >= self.next_housekeeping {
            self.next_housekeeping = now + self.cfg.housekeeping_interval;
            self.expire_early(now);
            self.check_members(None, now);
            self.update_foci(now);
            self.resync_call_rooms(now);
            self.reorder.sweep(now);
            self.limiter.sweep(now);
        }
    }

    // ----------------------------------------------------------------------------------------
    // Room state

    /// Applies one joined room's part of a sync response. `full_state` means `state` is the
    /// complete state (first sync of this process), replacing what was known.
    pub fn handle_joined_room(
        &mut self,
        room: &RoomId,
        state: &[Value],
        timeline: &[Value],
        full_state: bool,
        now: Instant,
    ) {
        if full_state {
            self.rooms.reset_room(room);
            self.authoritative.insert(room.clone(), now);
        } else {
            self.rooms.mark_joined(room);
        }
        for ev in state {
            self.rooms.apply_event(room, ev);
        }
        for ev in timeline.iter().filter(|e| e.get("state_key").is_some()) {
            self.rooms.apply_event(room, ev);
        }
        self.check_members(Some(room), now);
        self.update_foci(now);
        if !self.held.is_empty() {
            self.retry_held(now);
        }
    }

    /// Re-derives the foci of every active conference and reports the sets that changed. A
    /// focus that vanished from what `/sync` shows stays reported until the room's state
    /// confirms it is gone ([`Self::absence_confirmed`]).
    fn update_foci(&mut self, now: Instant) {
        let wall = self.wall_ms(now);
        let mut current: HashMap<(RoomId, ConfId), Vec<FocusRef>> = HashMap::new();
        for (room, conf) in self.rooms.active_calls() {
            let foci = self.rooms.active_foci(&room, &conf, wall);
            if !foci.is_empty() {
                current.insert((room, conf), foci);
            }
        }
        let previous = std::mem::take(&mut self.foci);
        let mut prev_keys: Vec<&(RoomId, ConfId)> = previous.keys().collect();
        prev_keys.sort();
        for key in prev_keys {
            for f in &previous[key] {
                let still = current.get(key).is_some_and(|c| {
                    c.iter()
                        .any(|x| x.user_id == f.user_id && x.device_id == f.device_id)
                });
                let skey = (
                    key.0.clone(),
                    key.1.clone(),
                    f.user_id.clone(),
                    f.device_id.clone(),
                );
                if still {
                    self.suspects.remove(&skey);
                } else if !self.absence_confirmed(&skey, now) {
                    let list = current.entry(key.clone()).or_default();
                    list.push(f.clone());
                    list.sort();
                }
            }
        }
        let mut changed: Vec<((RoomId, ConfId), Vec<FocusRef>)> = Vec::new();
        for (key, foci) in &current {
            if previous.get(key) != Some(foci) {
                changed.push((key.clone(), foci.clone()));
            }
        }
        for key in previous.keys() {
            if !current.contains_key(key) {
                changed.push((key.clone(), Vec::new()));
            }
        }
        changed.sort();
        self.foci = current;
        for ((room_id, conf_id), foci) in changed {
            info!(room = %room_id, conf = %conf_id, n = foci.len(), "foci of the conference changed");
            self.out.push_back(Output::Event(LegEvent::Foci {
                room_id,
                conf_id,
                foci,
            }));
        }
    }

    /// Applies a room's full state as the homeserver reports it now (`GET /rooms/{id}/state`,
    /// asked for by [`Output::RefreshRoom`]). Unlike `/sync` events, this is the resolved
    /// state, so absences it shows are acted on at once.
    pub fn handle_room_state(&mut self, room: &RoomId, events: &[Value], now: Instant) {
        if !self.rooms.joined_rooms().any(|r| r == room) {
            return;
        }
        for ev in events {
            self.rooms.apply_event(room, ev);
        }
        self.authoritative.insert(room.clone(), now);
        self.check_members(Some(room), now);
        self.update_foci(now);
        if !self.held.is_empty() {
            self.retry_held(now);
        }
    }

    /// Whether an absence of `key` seen now is to be acted on: the room is gone, its full state
    /// was read since the absence was first seen, or the grace ran out. Otherwise the room's
    /// state is asked for and the absence waits.
    fn absence_confirmed(
        &mut self,
        key: &(RoomId, ConfId, UserId, DeviceId),
        now: Instant,
    ) -> bool {
        let first = *self.suspects.entry(key.clone()).or_insert(now);
        let room = &key.0;
        let confirmed = !self.rooms.joined_rooms().any(|r| r == room)
            || self.authoritative.get(room).is_some_and(|t| *t >= first)
            || now.saturating_duration_since(first) >= ABSENCE_GRACE;
        if confirmed {
            self.suspects.remove(key);
        } else {
            self.refresh(vec![room.clone()], ROOM_REFRESH_INTERVAL, now);
        }
        confirmed
    }

    /// Re-checks held invites: accepted, held on, or (past their grace) refused.
    fn retry_held(&mut self, now: Instant) {
        for h in std::mem::take(&mut self.held) {
            self.try_invite(h.call, now, Some(h.until));
        }
    }

    /// weir left (or was removed from) `room`.
    pub fn handle_room_left(&mut self, room: &RoomId, now: Instant) {
        if self.rooms.remove_room(room) {
            info!(%room, "left room");
        }
        self.check_members(Some(room), now);
        self.update_foci(now);
    }

    /// Emits `MemberGone` for every (room, conf, user, device) with legs whose member entry is
    /// no longer valid, and forgets those legs.
    fn check_members(&mut self, room: Option<&RoomId>, now: Instant) {
        let wall = self.wall_ms(now);
        let mut gone: HashSet<(RoomId, ConfId, UserId, DeviceId)> = HashSet::new();
        let mut absent: HashSet<(RoomId, ConfId, UserId, DeviceId)> = HashSet::new();
        let mut present_keys: Vec<(RoomId, ConfId, UserId, DeviceId)> = Vec::new();
        for e in self.legs.values() {
            let l = &e.leg;
            if room.is_some_and(|r| r != &l.room_id) {
                continue;
            }
            let key = (
                l.room_id.clone(),
                l.conf_id.clone(),
                l.user_id.clone(),
                l.device_id.clone(),
            );
            if l.trunk {
                // A trunk lives while the far focus still serves the conference (and, for one
                // we dialled, until its answer is overdue: our own clock, acted on at once).
                let overdue = !e.answered
                    && e.caller
                    && now.saturating_duration_since(e.invited_at) >= e.lifetime;
                let serving = self
                    .rooms
                    .active_foci(&l.room_id, &l.conf_id, wall)
                    .iter()
                    .any(|f| f.user_id == l.user_id && f.device_id == l.device_id);
                if overdue {
                    gone.insert(key);
                } else if !serving {
                    absent.insert(key);
                } else {
                    present_keys.push(key);
                }
            } else if self.rooms.member_present(
                &l.room_id,
                &l.conf_id,
                &l.user_id,
                &l.device_id,
                wall,
            ) {
                present_keys.push(key);
            } else if self.rooms.member_expired(
                &l.room_id,
                &l.conf_id,
                &l.user_id,
                &l.device_id,
                wall,
            ) {
                gone.insert(key); // expiry is our own clock's verdict
            } else {
                absent.insert(key);
            }
        }
        for key in present_keys {
            self.suspects.remove(&key);
        }
        let mut absent: Vec<_> = absent.into_iter().collect();
        absent.sort();
        for key in absent {
            if self.absence_confirmed(&key, now) {
                gone.insert(key);
            }
        }
        if gone.is_empty() {
            return;
        }
        let limiter = &mut self.limiter;
        self.legs.retain(|call, e| {
            let l = &e.leg;
            let key = (
                l.room_id.clone(),
                l.conf_id.clone(),
                l.user_id.clone(),
                l.device_id.clone(),
            );
            let keep = !gone.contains(&key);
            if !keep {
                limiter.mark(call, now);
            }
            keep
        });
        self.metrics.legs.set(self.legs.len() as i64);
        let mut gone: Vec<_> = gone.into_iter().collect();
        gone.sort();
        for (room_id, conf_id, user_id, device_id) in gone {
            info!(%room_id, %conf_id, %user_id, %device_id, "member gone");
            self.out.push_back(Output::Event(LegEvent::MemberGone {
                room_id,
                conf_id,
                user_id,
                device_id,
            }));
        }
    }

    // ----------------------------------------------------------------------------------------
    // To-device input

    /// Feeds one to-device event (`{"sender", "type", "content"}`) from `/sync`.
    pub fn handle_to_device(&mut self, event: Value, now: Instant) {
        let Value::Object(mut obj) = event else {
            self.metrics.received.with_label_values(&["other"]).inc();
            return self.drop_in(DropReason::Malformed, "event is not an object");
        };
        let ty = match obj.get("type") {
            Some(Value::String(s)) => s.clone(),
            _ => {
                self.metrics.received.with_label_values(&["other"]).inc();
                return self.drop_in(DropReason::Malformed, "type missing");
            }
        };
        self.metrics
            .received
            .with_label_values(&[received_label(&ty)])
            .inc();
        let kind = match classify(&ty) {
            TypeClass::Call(k) => k,
            TypeClass::Encrypted => return self.drop_in(DropReason::Encrypted, "m.room.encrypted"),
            TypeClass::Key => {
                // Never read, log or keep the content of a key event.
                warn!(
                    event_type = received_label(&ty),
                    "key event addressed to the focus dropped unread"
                );
                return self.metrics.drop(DropReason::KeyEvent);
            }
            TypeClass::Unknown => return self.drop_in(DropReason::UnknownType, "unhandled type"),
        };
        let sender = match obj.remove("sender") {
            Some(Value::String(s)) if s.len() <= MAX_ID_LEN => match UserId::try_from(s) {
                Ok(u) => u,
                Err(_) => return self.drop_in(DropReason::Malformed, "sender is not a user id"),
            },
            _ => return self.drop_in(DropReason::Malformed, "sender missing or invalid"),
        };
        let Some(Value::Object(content)) = obj.remove("content") else {
            return self.drop_in(DropReason::Malformed, "content is not an object");
        };
        match content.get("dest_session_id") {
            Some(Value::String(s)) if s == self.cfg.me.session_id.as_str() => {}
            _ => return self.drop_in(DropReason::WrongSession, "dest_session_id is not ours"),
        }
        let call = match parse_call(sender, kind, content) {
            Ok(c) => c,
            Err(r) => {
                self.drop_in(r.reason, &r.detail);
                // An unreadable invite would leave the client ringing for its whole lifetime.
                if kind == CallEventType::Invite {
                    if let Some(to) = r.reply_to {
                        if !self.legs.contains_key(&to.call_id)
                            && self.limiter.allow(&to.call_id, now)
                        {
                            self.reply_hangup(&to, "unknown_error");
                        }
                    }
                }
                return;
            }
        };
        let key = ReorderKey {
            user: call.sender.clone(),
            device: call.env.device_id.clone(),
            call: call.env.call_id.clone(),
        };
        let (seq, msgid) = (call.env.seq, call.env.msgid.clone());
        match self.reorder.push(&key, seq, msgid.as_deref(), call, now) {
            Admit::Release(list) => {
                for c in list {
                    self.route(c, now);
                }
            }
            Admit::Duplicate => self.drop_in(DropReason::Duplicate, "seq or msgid seen before"),
            Admit::Flood => self.drop_in(DropReason::Flood, "reorder caps reached"),
        }
    }

    /// Convenience for tests and tools: feeds raw JSON text; unparseable text is a counted drop.
    pub fn handle_to_device_json(&mut self, text: &str, now: Instant) {
        match serde_json::from_str::<Value>(text) {
            Ok(v) => self.handle_to_device(v, now),
            Err(_) => {
                self.metrics.received.with_label_values(&["other"]).inc();
                self.drop_in(DropReason::Malformed, "not JSON");
            }
        }
    }

    fn drop_in(&self, reason: DropReason, detail: &str) {
        debug!(reason = reason.as_str(), detail, "to-device event dropped");
        self.metrics.drop(reason);
    }

    fn route(&mut self, call: InboundCall, now: Instant) {
        if call.kind == CallEventType::Invite {
            self.on_invite(call, now)
        } else {
            self.on_other(call, now)
        }
    }

    fn owns(leg: &Leg, call: &InboundCall) -> bool {
        leg.user_id == call.sender
            && leg.device_id == call.env.device_id
            && leg.party_id == call.env.party_id
    }

    fn on_invite(&mut self, call: InboundCall, now: Instant) {
        self.try_invite(call, now, None)
    }

    /// Authorises an invite; `held_until` is set when it was held before.
    fn try_invite(&mut self, call: InboundCall, now: Instant, held_until: Option<Instant>) {
        let CallBody::Invite { sdp, metadata, .. } = &call.body else {
            return;
        };
        let (sender, env) = (&call.sender, &call.env);
        let offer_hash = {
            let mut h = DefaultHasher::new();
            env.sender_session_id.hash(&mut h);
            sdp.hash(&mut h);
            serde_json::to_string(metadata)
                .unwrap_or_default()
                .hash(&mut h);
            h.finish()
        };
        let existing = self.legs.get(&env.call_id);
        if let Some(e) = existing {
            if !(&e.leg.user_id == sender
                && e.leg.device_id == env.device_id
                && e.leg.party_id == env.party_id)
            {
                return self.drop_in(
                    DropReason::NotLegOwner,
                    "invite for another owner's call_id",
                );
            }
            if e.leg.conf_id != env.conf_id {
                return self.drop_in(DropReason::ConfMismatch, "re-invite names another conf_id");
            }
            if e.offer_hash == offer_hash {
                return self.drop_in(DropReason::Duplicate, "identical re-sent invite");
            }
        }
        if held_until.is_none() && self.held.iter().any(|h| h.call.env.call_id == env.call_id) {
            return self.drop_in(DropReason::Duplicate, "invite for a call already held");
        }
        let trunk = self.is_focus_caller(sender, env, now);
        let authorised = if trunk {
            self.rooms
                .authorise_focus(sender, &env.device_id, &env.conf_id, self.wall_ms(now))
        } else {
            self.authorise(sender, env, existing.is_none(), now)
        };
        let room_id = match authorised {
            Ok(r) => r,
            Err(reason) => {
                let until = held_until.unwrap_or(now + self.cfg.auth_grace);
                if existing.is_none()
                    && now < until
                    && state_may_be_late(reason)
                    && self.can_hold(&call)
                {
                    if held_until.is_none() {
                        debug!(call = %env.call_id, user = %sender, reason = reason.as_str(),
                            "invite held: room state may still arrive");
                        self.refresh_rooms_of(&env.conf_id, now);
                    }
                    self.held.push(Held { call, until });
                    return;
                }
                let reply_to = ReplyTo {
                    user_id: sender.clone(),
                    device_id: env.device_id.clone(),
                    call_id: env.call_id.clone(),
                    conf_id: env.conf_id.clone(),
                    session_id: env.sender_session_id.clone(),
                };
                return self.refuse(reply_to, reason, now);
            }
        };
        let InboundCall {
            sender, env, body, ..
        } = call;
        let CallBody::Invite {
            sdp,
            mut metadata,
            lifetime_ms,
        } = body
        else {
            return;
        };
        if !trunk {
            for m in metadata.values_mut() {
                m.user_id = Some(sender.clone());
                m.device_id = Some(env.device_id.clone());
            }
        }
        let leg = Leg {
            room_id,
            conf_id: env.conf_id,
            call_id: env.call_id.clone(),
            user_id: sender,
            device_id: env.device_id,
            party_id: env.party_id,
            session_id: env.sender_session_id,
            trunk,
        };
        let metadata = if trunk {
            self.trunk_owned(metadata, &leg, now)
        } else {
            metadata
        };
        let answered = self.legs.get(&leg.call_id).is_some_and(|e| e.answered);
        let lifetime = Duration::from_millis(lifetime_ms.unwrap_or(60_000).clamp(1_000, 600_000));
        info!(room = %leg.room_id, conf = %leg.conf_id, call = %leg.call_id, user = %leg.user_id,
            device = %leg.device_id, reoffer = answered, trunk, "invite accepted");
        self.legs.insert(
            leg.call_id.clone(),
            LegEntry {
                leg: leg.clone(),
                answered,
                caller: false,
                invited_at: now,
                lifetime,
                offer_hash,
            },
        );
        self.metrics.legs.set(self.legs.len() as i64);
        self.out.push_back(Output::Event(LegEvent::Invite {
            leg: leg.clone(),
            sdp,
            metadata,
            lifetime_ms,
        }));
        self.flush_early(&leg);
    }

    /// Whether an invite comes from a focus rather than a participant: some unexpired member
    /// device of the conference names (sender, device) as its active focus, and the sender
    /// has no member device of its own with that id (a participant that is also named as a
    /// focus is treated as a participant). Never ourselves.
    fn is_focus_caller(&self, sender: &UserId, env: &Envelope, now: Instant) -> bool {
        if sender == &self.cfg.me.user_id && env.device_id == self.cfg.me.device_id {
            return false;
        }
        let wall = self.wall_ms(now);
        !self
            .rooms
            .has_member_devices(sender, &env.device_id, &env.conf_id)
            && self
                .rooms
                .authorise_focus(sender, &env.device_id, &env.conf_id, wall)
                .is_ok()
    }

    /// A trunk's stream metadata keeps the owners it names, but only owners that really call
    /// through that focus: a member device of the conference naming it active, or a user of
    /// the focus's own server (whose member state may still be on its way over federation).
    /// Any other entry is dropped and counted: a focus cannot speak for another's participants.
    fn trunk_owned(&self, m: SdpStreamMetadata, leg: &Leg, now: Instant) -> SdpStreamMetadata {
        let wall = self.wall_ms(now);
        let focus_server = leg.user_id.server_name();
        m.into_iter()
            .filter(|(_, s)| {
                let ok = match (&s.user_id, &s.device_id) {
                    (Some(u), Some(d)) => {
                        u.server_name() == focus_server
                            || self.rooms.device_uses_focus(
                                &leg.room_id,
                                &leg.conf_id,
                                u,
                                d,
                                &leg.user_id,
                                &leg.device_id,
                                wall,
                            )
                    }
                    _ => false,
                };
                if !ok {
                    self.metrics.drop(DropReason::ForeignOwner);
                }
                ok
            })
            .collect()
    }

    fn authorise(
        &self,
        sender: &UserId,
        env: &Envelope,
        new_leg: bool,
        now: Instant,
    ) -> Result<RoomId, RefuseReason> {
        if !self.cfg.allowed_servers.is_empty() {
            let server = sender.server_name().as_str();
            if !self.cfg.allowed_servers.iter().any(|s| s == server) {
                return Err(RefuseReason::ServerNotAllowed);
            }
        }
        let room = self.rooms.authorise(
            sender,
            &env.device_id,
            &env.sender_session_id,
            &env.conf_id,
            self.wall_ms(now),
        )?;
        if new_leg {
            if self.legs.len() >= self.cfg.max_legs {
                return Err(RefuseReason::TooManyInvites);
            }
            let unanswered = self
                .legs
                .values()
                .filter(|e| {
                    !e.answered
                        && &e.leg.user_id == sender
                        && e.leg.device_id == env.device_id
                        && now.saturating_duration_since(e.invited_at) < e.lifetime
                })
                .count();
            if unanswered >= self.cfg.max_unanswered_per_device {
                return Err(RefuseReason::TooManyInvites);
            }
        }
        Ok(room)
    }

    /// Ask for the full state of every joined room that holds `conf` (every joined room when
    /// none does yet), each at most once per [`ROOM_REFRESH_INTERVAL`].
    fn refresh_rooms_of(&mut self, conf: &ConfId, now: Instant) {
        let mut rooms: Vec<RoomId> = self
            .rooms
            .active_calls()
            .into_iter()
            .filter(|(_, c)| c == conf)
            .map(|(r, _)| r)
            .collect();
        if rooms.is_empty() {
            rooms = self.rooms.joined_rooms().cloned().collect();
        }
        self.refresh(rooms, ROOM_REFRESH_INTERVAL, now);
    }

    /// Ask for the state of each of `rooms` not refreshed within `interval`.
    fn refresh(&mut self, rooms: Vec<RoomId>, interval: Duration, now: Instant) {
        for room in rooms {
            let recent = self
                .refreshed
                .get(&room)
                .is_some_and(|at| now.saturating_duration_since(*at) < interval);
            if recent {
                continue;
            }
            self.refreshed.insert(room.clone(), now);
            self.out.push_back(Output::RefreshRoom(room));
        }
    }

    /// The periodic re-read of rooms with an active call ([`ROOM_RESYNC_INTERVAL`]).
    fn resync_call_rooms(&mut self, now: Instant) {
        let mut rooms: Vec<RoomId> = self
            .rooms
            .active_calls()
            .into_iter()
            .map(|(r, _)| r)
            .collect();
        rooms.dedup();
        let joined: HashSet<&RoomId> = self.rooms.joined_rooms().collect();
        self.refreshed.retain(|r, _| joined.contains(r));
        self.refresh(rooms, ROOM_RESYNC_INTERVAL, now);
    }

    fn can_hold(&self, call: &InboundCall) -> bool {
        self.held.len() < MAX_HELD
            && self
                .held
                .iter()
                .filter(|h| {
                    h.call.sender == call.sender && h.call.env.device_id == call.env.device_id
                })
                .count()
                < MAX_HELD_PER_DEVICE
    }

    fn refuse(&mut self, to: ReplyTo, reason: RefuseReason, now: Instant) {
        info!(user = %to.user_id, device = %to.device_id, call = %to.call_id, conf = %to.conf_id,
            reason = reason.as_str(), "invite refused");
        self.metrics.refuse(reason);
        let key = ReorderKey {
            user: to.user_id.clone(),
            device: to.device_id.clone(),
            call: to.call_id.clone(),
        };
        if let Some(buf) = self.early.remove(&key) {
            for _ in 0..buf.events.len() {
                self.metrics.drop(DropReason::UnknownCall);
            }
        }
        // A refused re-offer ends the leg.
        let had_leg = if let Some(e) = self.legs.remove(&to.call_id) {
            self.metrics.legs.set(self.legs.len() as i64);
            self.out.push_back(Output::Event(LegEvent::Hangup {
                leg: e.leg,
                reason: format!("refused:{}", reason.as_str()),
            }));
            true
        } else {
            false
        };
        if self.limiter.allow(&to.call_id, now) {
            if had_leg {
                self.reply_hangup(&to, reason.as_str());
            } else {
                self.reply_reject(&to, reason.as_str());
            }
        }
        self.limiter.mark(&to.call_id, now);
    }

    fn on_other(&mut self, call: InboundCall, now: Instant) {
        let Some(entry) = self.legs.get(&call.env.call_id) else {
            return self.on_unknown_call(call, now);
        };
        if !Self::owns(&entry.leg, &call) {
            return self.drop_in(DropReason::NotLegOwner, "event for another owner's call_id");
        }
        if entry.leg.conf_id != call.env.conf_id {
            return self.drop_in(DropReason::ConfMismatch, "event names another conf_id");
        }
        let leg = entry.leg.clone();
        let ev = match call.body {
            CallBody::Answer { sdp, metadata } => {
                let Some(e) = self.legs.get_mut(&leg.call_id) else {
                    return;
                };
                if !e.caller || e.answered {
                    return self.drop_in(
                        DropReason::Duplicate,
                        "answer to a call we did not dial, or answered",
                    );
                }
                e.answered = true;
                let metadata = self.trunk_owned(metadata, &leg, now);
                LegEvent::Answer { leg, sdp, metadata }
            }
            CallBody::Candidates(candidates) => LegEvent::Candidates { leg, candidates },
            CallBody::SelectAnswer { selected_party_id } => LegEvent::SelectAnswer {
                leg,
                selected_party_id,
            },
            CallBody::Negotiate {
                kind,
                sdp,
                metadata,
            } => {
                let metadata = metadata.map(|m| self.owned(m, &leg, now));
                LegEvent::Negotiate {
                    leg,
                    kind,
                    sdp,
                    metadata,
                }
            }
            CallBody::MetadataChanged(m) => LegEvent::MetadataChanged {
                metadata: self.owned(m, &leg, now),
                leg,
            },
            CallBody::Hangup { reason } => {
                self.legs.remove(&leg.call_id);
                self.metrics.legs.set(self.legs.len() as i64);
                self.limiter.mark(&leg.call_id, now);
                info!(call = %leg.call_id, user = %leg.user_id, reason, "client hung up");
                LegEvent::Hangup { leg, reason }
            }
            CallBody::Invite { .. } => return,
        };
        self.out.push_back(Output::Event(ev));
    }

    /// Metadata of a leg with its owners settled: a participant's streams are its own; a
    /// trunk's are checked ([`Self::trunk_owned`]).
    fn owned(&self, m: SdpStreamMetadata, leg: &Leg, now: Instant) -> SdpStreamMetadata {
        if leg.trunk {
            self.trunk_owned(m, leg, now)
        } else {
            owned_by(m, leg)
        }
    }

    fn on_unknown_call(&mut self, call: InboundCall, now: Instant) {
        match call.body {
            CallBody::Candidates(candidates) => {
                self.buffer_early(call.sender, call.env, candidates, now)
            }
            CallBody::Hangup { .. } => {
                let before = self.held.len();
                self.held.retain(|h| {
                    !(h.call.env.call_id == call.env.call_id
                        && h.call.sender == call.sender
                        && h.call.env.device_id == call.env.device_id)
                });
                if self.held.len() < before {
                    debug!(call = %call.env.call_id, "client hung up a held invite");
                    self.limiter.mark(&call.env.call_id, now);
                } else {
                    self.drop_in(DropReason::UnknownCall, "hangup for unknown call");
                }
            }
            _ => {
                self.drop_in(DropReason::UnknownCall, "event for unknown call");
                let to = ReplyTo {
                    user_id: call.sender,
                    device_id: call.env.device_id,
                    call_id: call.env.call_id,
                    conf_id: call.env.conf_id,
                    session_id: call.env.sender_session_id,
                };
                if self.limiter.allow(&to.call_id, now) {
                    self.reply_hangup(&to, "unknown_error");
                }
            }
        }
    }

    fn buffer_early(
        &mut self,
        sender: UserId,
        env: Envelope,
        candidates: Vec<Candidate>,
        now: Instant,
    ) {
        let key = ReorderKey {
            user: sender,
            device: env.device_id.clone(),
            call: env.call_id.clone(),
        };
        if !self.early.contains_key(&key) {
            let per_user = self.early.keys().filter(|k| k.user == key.user).count();
            if per_user >= self.cfg.max_early_calls_per_user
                || self.early.len() >= self.cfg.max_early_calls
            {
                return self.drop_in(DropReason::Flood, "early candidate buffers full");
            }
        }
        let buf = self.early.entry(key).or_insert_with(|| EarlyBuf {
            first_at: now,
            events: Vec::new(),
            count: 0,
        });
        if buf.count + candidates.len() > self.cfg.max_early_candidates {
            return self.drop_in(DropReason::Flood, "too many early candidates");
        }
        buf.count += candidates.len();
        buf.events.push((env, candidates));
    }

    /// Delivers early candidates of `leg` right after its invite.
    fn flush_early(&mut self, leg: &Leg) {
        let key = ReorderKey {
            user: leg.user_id.clone(),
            device: leg.device_id.clone(),
            call: leg.call_id.clone(),
        };
        let Some(buf) = self.early.remove(&key) else {
            return;
        };
        let mut all = Vec::new();
        for (env, candidates) in buf.events {
            if env.party_id != leg.party_id {
                self.drop_in(
                    DropReason::NotLegOwner,
                    "early candidates from another party",
                );
            } else if env.conf_id != leg.conf_id {
                self.drop_in(
                    DropReason::ConfMismatch,
                    "early candidates name another conf_id",
                );
            } else {
                all.extend(candidates);
            }
        }
        if !all.is_empty() {
            self.out.push_back(Output::Event(LegEvent::Candidates {
                leg: leg.clone(),
                candidates: all,
            }));
        }
    }

    fn expire_early(&mut self, now: Instant) {
        let ttl = self.cfg.early_ttl;
        let expired: Vec<ReorderKey> = self
            .early
            .iter()
            .filter(|(_, b)| now.saturating_duration_since(b.first_at) >= ttl)
            .map(|(k, _)| k.clone())
            .collect();
        for key in expired {
            let Some(buf) = self.early.remove(&key) else {
                continue;
            };
            for _ in 0..buf.events.len() {
                self.metrics.drop(DropReason::EarlyExpired);
            }
            let Some((env, _)) = buf.events.first() else {
                continue;
            };
            debug!(call = %key.call, user = %key.user, "early candidates expired without an invite");
            let to = ReplyTo {
                user_id: key.user.clone(),
                device_id: key.device.clone(),
                call_id: key.call.clone(),
                conf_id: env.conf_id.clone(),
                session_id: env.sender_session_id.clone(),
            };
            if self.limiter.allow(&to.call_id, now) {
                self.reply_hangup(&to, "unknown_error");
            }
        }
    }

    /// `m.call.hangup` to a device we have no leg with (a refused re-offer, an unknown call).
    fn reply_hangup(&mut self, to: &ReplyTo, reason: &str) {
        self.reply_ending(to, "m.call.hangup", reason);
    }

    /// `m.call.reject` to the sender of an invite we refuse: stock js-sdk ends an unanswered
    /// outgoing call on it, but ignores a hangup there.
    fn reply_reject(&mut self, to: &ReplyTo, reason: &str) {
        self.reply_ending(to, "m.call.reject", reason);
    }

    /// The envelope as on every event, plus `reason`, which clients log or show.
    fn reply_ending(&mut self, to: &ReplyTo, event_type: &'static str, reason: &str) {
        self.metrics.unknown_call_hangups.inc();
        let env = wire::envelope(&self.cfg.me, &to.call_id, &to.conf_id, &to.session_id);
        let content = wire::hangup_content(env, reason);
        self.send(&to.user_id, &to.device_id, &to.call_id, event_type, content);
    }

    // ----------------------------------------------------------------------------------------
    // Commands from the focus

    /// Turns a focus command into a to-device send.
    pub fn handle_command(&mut self, cmd: LegCommand, now: Instant) {
        let me = self.cfg.me.clone();
        let leg = cmd.leg().clone();
        let env = wire::envelope(&me, &leg.call_id, &leg.conf_id, &leg.session_id);
        let (ty, content) = match cmd {
            LegCommand::Invite { sdp, metadata, .. } => {
                info!(call = %leg.call_id, to = %leg.user_id, device = %leg.device_id,
                    conf = %leg.conf_id, "dialling a focus (trunk)");
                self.legs.insert(
                    leg.call_id.clone(),
                    LegEntry {
                        leg: leg.clone(),
                        answered: false,
                        caller: true,
                        invited_at: now,
                        lifetime: Duration::from_millis(TRUNK_INVITE_LIFETIME_MS),
                        offer_hash: 0,
                    },
                );
                self.metrics.legs.set(self.legs.len() as i64);
                (
                    "m.call.invite",
                    wire::invite_content(env, &sdp, &metadata, TRUNK_INVITE_LIFETIME_MS),
                )
            }
            LegCommand::Answer { sdp, metadata, .. } => {
                if let Some(e) = self.legs.get_mut(&leg.call_id) {
                    e.answered = true;
                }
                ("m.call.answer", wire::answer_content(env, &sdp, &metadata))
            }
            LegCommand::Negotiate {
                kind,
                sdp,
                metadata,
                ..
            } => (
                "m.call.negotiate",
                wire::negotiate_content(env, kind, &sdp, &metadata),
            ),
            LegCommand::Candidates { candidates, .. } => (
                "m.call.candidates",
                wire::candidates_content(env, &candidates),
            ),
            LegCommand::MetadataChanged { metadata, .. } => (
                "m.call.sdp_stream_metadata_changed",
                wire::metadata_changed_content(env, &metadata),
            ),
            LegCommand::Hangup { reason, .. } => {
                if self
                    .legs
                    .get(&leg.call_id)
                    .is_some_and(|e| e.leg.user_id == leg.user_id)
                {
                    self.legs.remove(&leg.call_id);
                    self.metrics.legs.set(self.legs.len() as i64);
                }
                self.limiter.mark(&leg.call_id, now);
                ("m.call.hangup", wire::hangup_content(env, &reason))
            }
        };
        self.send(&leg.user_id, &leg.device_id, &leg.call_id, ty, content);
    }

    /// Hangs up every open leg (shutdown). Returns how many.
    pub fn hangup_all(&mut self, reason: &str, now: Instant) -> usize {
        let mut legs: Vec<Leg> = self.legs.values().map(|e| e.leg.clone()).collect();
        legs.sort_by(|a, b| a.call_id.cmp(&b.call_id));
        let n = legs.len();
        for leg in legs {
            self.handle_command(
                LegCommand::Hangup {
                    leg,
                    reason: reason.to_owned(),
                },
                now,
            );
        }
        n
    }

    fn send(
        &mut self,
        to_user: &UserId,
        to_device: &DeviceId,
        call_id: &CallId,
        ty: &'static str,
        content: Value,
    ) {
        let out = OutgoingToDevice {
            event_type: ty,
            to_user: to_user.clone(),
            to_device: to_device.clone(),
            call_id: call_id.clone(),
            content,
        };
        let size = out.body_bytes().len();
        if size > MAX_TODEVICE_BODY_BYTES {
            error!(event_type = ty, call = %call_id, size, "to-device body over 64 KiB not sent; keep offers small");
            self.metrics.drop(DropReason::TooLarge);
            return;
        }
        self.out.push_back(Output::Send(out));
    }
}

/// Refusals that a room-state update still in flight could turn into an acceptance.
fn state_may_be_late(reason: RefuseReason) -> bool {
    matches!(
        reason,
        RefuseReason::NoCall
            | RefuseReason::NotInRoom
            | RefuseReason::NoMemberDevice
            | RefuseReason::SessionMismatch
            | RefuseReason::MemberExpired
    )
}

fn owned_by(mut m: SdpStreamMetadata, leg: &Leg) -> SdpStreamMetadata {
    for s in m.values_mut() {
        s.user_id = Some(leg.user_id.clone());
        s.device_id = Some(leg.device_id.clone());
    }
    m
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod trunk_tests;
