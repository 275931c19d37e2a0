//! Direct mode: the same call signalling as to-device `m.call.*`, carried over an authenticated
//! HTTP endpoint of the focus instead of a homeserver. It exists so the media plane can be
//! load-tested without the homeserver being the bottleneck (see docs/direct-mode.md).
//!
//! Events go through the same signalling router as Matrix ones (parsing, seq reordering,
//! duplicate and ownership checks, early candidates), so a leg behaves identically in both
//! modes. What replaces room-state authorisation is the bearer token: a direct-mode caller is
//! trusted like a joined member, and the router is shown the equivalent room state.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use axum::{Json, Router as HttpRouter};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::{mpsc, Notify};
use weir_signalling::router::{Output, Router, RouterConfig};
use weir_signalling::wire::Identity;
use weir_signalling::{LegCommand, LegEvent, RoomId, UserId};

/// The room every direct-mode leg belongs to. Not a real room (room ids from a homeserver
/// always contain a server name after `:`); the conductor keys conferences by (room, conf_id),
/// so direct-mode conferences never mix with Matrix ones.
pub const DIRECT_ROOM: &str = "!direct-mode";

fn direct_room() -> RoomId {
    RoomId::try_from(DIRECT_ROOM).expect("DIRECT_ROOM is a valid room id (tested)")
}
/// Longest a `GET /direct/v1/events` long-poll waits.
const MAX_POLL: Duration = Duration::from_secs(30);
/// Most events kept for one device that is not polling. A client that stops polling loses the
/// oldest events (counted), never the focus's memory.
const MAX_OUTBOX: usize = 256;
/// Largest request body accepted (an offer with many m-lines is ~40 KiB).
pub const MAX_BODY: usize = 256 * 1024;
/// How long a direct-mode device counts as a call member after its last event.
const MEMBER_TTL_MS: u64 = 3_600_000;

struct Outbox {
    events: VecDeque<Value>,
    notify: Arc<Notify>,
}

struct Inner {
    router: Router,
    /// Devices seen per (user, conf): the member state shown to the router.
    members: HashMap<(String, String), Vec<(String, String)>>,
    outboxes: HashMap<(String, String), Outbox>,
    dropped: u64,
}

/// Shared direct-mode state: the router, and per-device outboxes.
#[derive(Clone)]
pub struct DirectHub {
    token: Arc<str>,
    inner: Arc<Mutex<Inner>>,
    events: mpsc::Sender<LegEvent>,
    anchor: (Instant, u64),
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl DirectHub {
    /// `me` is the focus's identity (what its events carry); events for the conductor go to
    /// `events`.
    pub fn new(
        token: &str,
        me: Identity,
        events: mpsc::Sender<LegEvent>,
    ) -> Result<Self, prometheus::Error> {
        let anchor = (Instant::now(), wall_ms());
        let metrics = weir_signalling::Metrics::unregistered()?;
        let mut router = Router::new(RouterConfig::new(me.clone()), metrics, anchor);
        let room = direct_room();
        let join = json!({"type": "m.room.member", "state_key": me.user_id.as_str(),
            "sender": me.user_id.as_str(), "content": {"membership": "join"}});
        router.handle_joined_room(&room, &[join], &[], true, anchor.0);
        Ok(DirectHub {
            token: token.into(),
            inner: Arc::new(Mutex::new(Inner {
                router,
                members: HashMap::new(),
                outboxes: HashMap::new(),
                dropped: 0,
            })),
            events,
            anchor,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn authorised(&self, headers: &HeaderMap) -> bool {
        crate::http::token_matches(crate::http::bearer(headers), &self.token)
    }

    /// A direct-mode client's event, as if it had arrived by to-device.
    fn incoming(&self, user: &str, device: &str, conf: &str, ty: &str, content: Value) {
        let now = Instant::now();
        let mut inner = self.lock();
        let session = content
            .get("sender_session_id")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        // Show the router the room state a real member would have: the call, the user
        // joined, and this device's member entry.
        let devices = inner
            .members
            .entry((user.to_string(), conf.to_string()))
            .or_default();
        let known = devices.iter().any(|(d, s)| d == device && *s == session);
        if !known {
            devices.retain(|(d, _)| d != device);
            devices.push((device.to_string(), session));
            let expires = self.anchor.1
                + now.duration_since(self.anchor.0).as_millis() as u64
                + MEMBER_TTL_MS;
            let devs: Vec<Value> = devices
                .iter()
                .map(|(d, s)| json!({"device_id": d, "session_id": s, "expires_ts": expires, "feeds": [{"purpose": "m.usermedia"}]}))
                .collect();
            let state = [
                json!({"type": "org.matrix.msc3401.call", "state_key": conf, "sender": user,
                    "content": {"m.intent": "m.room", "m.type": "m.video"}}),
                json!({"type": "m.room.member", "state_key": user, "sender": user, "content": {"membership": "join"}}),
                json!({"type": "org.matrix.msc3401.call.member", "state_key": user, "sender": user,
                    "content": {"m.calls": [{"m.call_id": conf, "m.devices": devs}]}}),
            ];
            inner
                .router
                .handle_joined_room(&direct_room(), &state, &[], false, now);
        }
        let event = json!({"type": ty, "sender": user, "content": content});
        inner.router.handle_to_device(event, now);
        self.drain(&mut inner);
    }

    /// A conductor command for a direct-mode leg.
    pub fn command(&self, cmd: LegCommand) {
        let mut inner = self.lock();
        inner.router.handle_command(cmd, Instant::now());
        self.drain(&mut inner);
    }

    /// Drive the router's timers (seq reordering, early candidates, housekeeping).
    pub fn tick(&self) {
        let mut inner = self.lock();
        let now = Instant::now();
        inner.router.handle_timeout(now);
        self.drain(&mut inner);
    }

    fn drain(&self, inner: &mut Inner) {
        while let Some(out) = inner.router.poll_output() {
            match out {
                // Direct mode has no homeserver: its room state is what the endpoint was given.
                Output::RefreshRoom(_) => {}
                Output::Event(ev) => {
                    if self.events.try_send(ev).is_err() {
                        inner.dropped += 1;
                    }
                }
                Output::Send(o) => {
                    let key = (
                        o.to_user.as_str().to_string(),
                        o.to_device.as_str().to_string(),
                    );
                    let outbox = inner.outboxes.entry(key).or_insert_with(|| Outbox {
                        events: VecDeque::new(),
                        notify: Arc::new(Notify::new()),
                    });
                    if outbox.events.len() >= MAX_OUTBOX {
                        outbox.events.pop_front();
                        inner.dropped += 1;
                    }
                    outbox
                        .events
                        .push_back(json!({"type": o.event_type, "content": o.content}));
                    outbox.notify.notify_waiters();
                    outbox.notify.notify_one();
                }
            }
        }
    }

    /// Take what is queued for a device, or a handle to wait on.
    fn take(&self, user: &str, device: &str) -> Result<Vec<Value>, Arc<Notify>> {
        let mut inner = self.lock();
        let outbox = inner
            .outboxes
            .entry((user.to_string(), device.to_string()))
            .or_insert_with(|| Outbox {
                events: VecDeque::new(),
                notify: Arc::new(Notify::new()),
            });
        if outbox.events.is_empty() {
            Err(outbox.notify.clone())
        } else {
            Ok(outbox.events.drain(..).collect())
        }
    }
}

/// Whether a leg is a direct-mode one.
pub fn is_direct(room: &RoomId) -> bool {
    room.as_str() == DIRECT_ROOM
}

#[derive(Deserialize)]
struct PostEvent {
    user_id: String,
    device_id: String,
    conf_id: String,
    #[serde(rename = "type")]
    event_type: String,
    content: Value,
}

#[derive(Deserialize)]
struct PollQuery {
    user_id: String,
    device_id: String,
    #[serde(default)]
    timeout_ms: u64,
}

pub fn routes(hub: DirectHub) -> HttpRouter {
    HttpRouter::new()
        .route("/direct/v1/events", post(post_event).get(poll_events))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(hub)
}

async fn post_event(
    State(hub): State<DirectHub>,
    headers: HeaderMap,
    body: Json<Value>,
) -> impl IntoResponse {
    if !hub.authorised(&headers) {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": "missing or wrong bearer token"})),
        );
    }
    let ev: PostEvent = match serde_json::from_value(body.0) {
        Ok(e) => e,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({"error": e.to_string()})),
            )
        }
    };
    if UserId::try_from(ev.user_id.as_str()).is_err()
        || ev.device_id.is_empty()
        || ev.conf_id.is_empty()
    {
        return (
            StatusCode::BAD_REQUEST,
            Json(
                json!({"error": "user_id must be @local:server; device_id and conf_id non-empty"}),
            ),
        );
    }
    hub.incoming(
        &ev.user_id,
        &ev.device_id,
        &ev.conf_id,
        &ev.event_type,
        ev.content,
    );
    (StatusCode::OK, Json(json!({})))
}

async fn poll_events(
    State(hub): State<DirectHub>,
    headers: HeaderMap,
    Query(q): Query<PollQuery>,
) -> impl IntoResponse {
    if !hub.authorised(&headers) {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": "missing or wrong bearer token"})),
        );
    }
    let deadline = Instant::now() + Duration::from_millis(q.timeout_ms).min(MAX_POLL);
    loop {
        let notify = match hub.take(&q.user_id, &q.device_id) {
            Ok(events) => return (StatusCode::OK, Json(json!({"events": events}))),
            Err(n) => n,
        };
        let wait = deadline.saturating_duration_since(Instant::now());
        if wait.is_zero() || tokio::time::timeout(wait, notify.notified()).await.is_err() {
            return (StatusCode::OK, Json(json!({"events": []})));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub() -> (DirectHub, mpsc::Receiver<LegEvent>) {
        let (tx, rx) = mpsc::channel(16);
        let me = Identity {
            user_id: "@focus:hs".try_into().unwrap(),
            device_id: "FOCUS".into(),
            session_id: "sfu".into(),
        };
        (DirectHub::new("secret", me, tx).unwrap(), rx)
    }

    fn invite() -> Value {
        json!({"call_id": "c1", "conf_id": "conf", "party_id": "D1", "device_id": "D1", "version": "1",
            "sender_session_id": "s1", "dest_session_id": "sfu", "lifetime": 60000,
            "offer": {"type": "offer", "sdp": "v=0\r\n"}, "sdp_stream_metadata": {}})
    }

    #[test]
    fn an_invite_reaches_the_conductor_as_a_leg_of_the_direct_room() {
        let (hub, mut rx) = hub();
        hub.incoming("@u:hs", "D1", "conf", "m.call.invite", invite());
        match rx.try_recv().expect("the invite is delivered") {
            LegEvent::Invite { leg, sdp, .. } => {
                assert!(is_direct(&leg.room_id));
                assert_eq!(leg.user_id.as_str(), "@u:hs");
                assert_eq!(sdp, "v=0\r\n");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn answers_land_in_the_callers_outbox_with_the_to_device_envelope() {
        let (hub, mut rx) = hub();
        hub.incoming("@u:hs", "D1", "conf", "m.call.invite", invite());
        let LegEvent::Invite { leg, .. } = rx.try_recv().unwrap() else {
            panic!()
        };
        hub.command(LegCommand::Answer {
            leg,
            sdp: "answer".into(),
            metadata: Default::default(),
        });
        let events = hub.take("@u:hs", "D1").expect("an event is queued");
        assert_eq!(events[0]["type"], "m.call.answer");
        let c = &events[0]["content"];
        assert_eq!(c["answer"]["sdp"], "answer");
        assert_eq!(c["dest_session_id"], "s1");
        assert_eq!(c["party_id"], "FOCUS");
        assert!(c.get("seq").is_none());
        assert!(hub.take("@u:hs", "D1").is_err(), "taken events are gone");
    }

    #[test]
    fn garbage_is_dropped_by_the_router_not_delivered() {
        let (hub, mut rx) = hub();
        hub.incoming(
            "@u:hs",
            "D1",
            "conf",
            "m.call.invite",
            json!({"call_id": 5}),
        );
        hub.incoming("@u:hs", "D1", "conf", "m.room.encrypted", json!({}));
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn the_token_is_checked() {
        let (hub, _rx) = hub();
        let mut h = HeaderMap::new();
        assert!(!hub.authorised(&h));
        h.insert("authorization", "Bearer secreT".parse().unwrap());
        assert!(!hub.authorised(&h));
        h.insert("authorization", "Bearer secret".parse().unwrap());
        assert!(hub.authorised(&h));
    }
}
