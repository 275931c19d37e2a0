//! A router joined to one room with an active call, Alice a member with a live device entry,
//! and Alice's leg open.
use std::time::Instant;

use serde_json::{json, Value};
use weir_signalling::router::{Output, Router, RouterConfig};
use weir_signalling::wire::Identity;
use weir_signalling::{LegEvent, Metrics, RoomId};

pub const ALICE: &str = "@alice:hs";
pub const CALL: &str = "alice-call";
pub const CONF: &str = "conf";

pub fn alice_event(ty: &str, extra: Value) -> Value {
    let mut c = json!({"version": "1", "call_id": CALL, "party_id": "ADEV", "conf_id": CONF,
        "device_id": "ADEV", "sender_session_id": "asess", "dest_session_id": "sfu"});
    c.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    json!({"sender": ALICE, "type": ty, "content": c})
}

pub fn setup(now: Instant) -> Router {
    let me = Identity {
        user_id: "@sfu:hs".try_into().expect("valid user id"),
        device_id: "SFUDEV".into(),
        session_id: "sfu".into(),
    };
    let mut cfg = RouterConfig::new(me);
    cfg.auth_grace = std::time::Duration::ZERO;
    let mut r = Router::new(cfg, Metrics::unregistered().unwrap(), (now, 1_000_000));
    let room = RoomId::try_from("!r:hs").expect("valid room id");
    let state = [
        json!({"type": "m.room.member", "state_key": "@sfu:hs", "sender": "@sfu:hs", "content": {"membership": "join"}}),
        json!({"type": "m.room.member", "state_key": ALICE, "sender": ALICE, "content": {"membership": "join"}}),
        json!({"type": "m.room.member", "state_key": "@bob:hs", "sender": "@bob:hs", "content": {"membership": "join"}}),
        json!({"type": "org.matrix.msc3401.call", "state_key": CONF, "sender": ALICE, "content": {"m.intent": "m.room", "m.type": "m.video"}}),
        json!({"type": "org.matrix.msc3401.call.member", "state_key": ALICE, "sender": ALICE, "content": {"m.calls": [
            {"m.call_id": CONF, "m.devices": [{"device_id": "ADEV", "session_id": "asess", "expires_ts": 9_000_000_000_000u64, "feeds": []}]}]}}),
        json!({"type": "org.matrix.msc3401.call.member", "state_key": "@bob:hs", "sender": "@bob:hs", "content": {"m.calls": [
            {"m.call_id": CONF, "m.devices": [{"device_id": "BDEV", "session_id": "bsess", "expires_ts": 9_000_000_000_000u64, "feeds": []}]}]}}),
    ];
    r.handle_joined_room(&room, &state, &[], true, now);
    r.handle_to_device(
        alice_event(
            "m.call.invite",
            json!({"offer": {"type": "offer", "sdp": "v=0"}}),
        ),
        now,
    );
    let outs: Vec<Output> = std::iter::from_fn(|| r.poll_output()).collect();
    assert!(
        matches!(outs.as_slice(), [Output::Event(LegEvent::Invite { .. })]),
        "{outs:?}"
    );
    r
}

/// Alice's call must still work: a candidates event is delivered for her leg.
pub fn assert_alice_unaffected(r: &mut Router, now: Instant) {
    r.handle_to_device(
        alice_event(
            "m.call.candidates",
            json!({"candidates": [{"candidate": ""}]}),
        ),
        now,
    );
    let outs: Vec<Output> = std::iter::from_fn(|| r.poll_output()).collect();
    assert!(
        matches!(outs.as_slice(), [Output::Event(LegEvent::Candidates { leg, .. })] if leg.call_id.as_str() == CALL),
        "{outs:?}"
    );
}
