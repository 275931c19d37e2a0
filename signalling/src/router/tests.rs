use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::*;
use crate::metadata::StreamMetadata;
use crate::room::tests::{fixture_dir, join_event, tracker_from_fixture};
use crate::wire::SdpType;

const FOCUS: &str = "@focus-mwyct2zzfae9:localhost";
const FOCUS_SESSION: &str = "r9SObUiHxe";
const ALICE: &str = "@alice-mwyct2zzfae9:localhost";
const BOB: &str = "@bob-mwyct2zzfae9:localhost";
const CONF: &str = "1795746014673K8KMyUuL409CM3qp";
const ALICE_CALL: &str = "17957460152261eYo7hiWEe09whjM";
const ALICE_SESSION: &str = "yfKqxvEvCA";
const ALICE_EXPIRES: u64 = 1795749614846;
/// Wall clock of the fixture run (the first invite was sent about then).
const FIXTURE_NOW: u64 = 1795746015466;

fn identity() -> Identity {
    Identity {
        user_id: FOCUS.try_into().unwrap(),
        device_id: "FOCUSDEV".into(),
        session_id: FOCUS_SESSION.into(),
    }
}

/// A router holding the `focus-emulated-basic` room state, whose clock reads `wall` at `t0`.
/// Refusals are immediate (no grace for late room state) unless a test turns it on.
fn router_at(wall: u64) -> (Router, Instant, RoomId) {
    let t0 = Instant::now();
    let (tracker, room) = tracker_from_fixture("focus-emulated-basic", &FOCUS.try_into().unwrap());
    let mut cfg = RouterConfig::new(identity());
    cfg.auth_grace = Duration::ZERO;
    let mut r = Router::new(cfg, Metrics::unregistered().unwrap(), (t0, wall));
    r.rooms = tracker;
    (r, t0, room)
}

fn read_json(path: std::path::PathBuf) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The to-device events the clients of a fixture sent to the (emulated) focus device.
fn sent_to_focus(name: &str) -> Vec<Value> {
    let sent = read_json(fixture_dir(name).join("to-device.sent-http.json"));
    let mut out = Vec::new();
    for e in sent.as_array().unwrap() {
        let sender = e["sender"].as_str().unwrap().split('|').next().unwrap();
        for (user, devices) in e["body"]["messages"].as_object().unwrap() {
            if !user.starts_with("@focus") {
                continue;
            }
            for content in devices.as_object().unwrap().values() {
                out.push(json!({"sender": sender, "type": e["eventType"], "content": content}));
            }
        }
    }
    out
}

fn drain(r: &mut Router) -> Vec<Output> {
    std::iter::from_fn(|| r.poll_output()).collect()
}

/// Nothing but the periodic room-state re-reads of rooms with a call.
fn quiet(outs: &[Output]) -> bool {
    outs.iter().all(|o| matches!(o, Output::RefreshRoom(_)))
}

fn events(outs: &[Output]) -> Vec<&LegEvent> {
    outs.iter()
        .filter_map(|o| match o {
            Output::Event(e) => Some(e),
            _ => None,
        })
        .collect()
}

fn sends(outs: &[Output]) -> Vec<&OutgoingToDevice> {
    outs.iter()
        .filter_map(|o| match o {
            Output::Send(s) => Some(s),
            _ => None,
        })
        .collect()
}

fn alice_invite() -> Value {
    sent_to_focus("focus-emulated-basic")
        .into_iter()
        .find(|e| e["type"] == "m.call.invite")
        .unwrap()
}

fn content_keys(v: &Value) -> BTreeSet<String> {
    v.as_object().unwrap().keys().cloned().collect()
}

/// A minimal call event from `sender` (no seq unless given).
fn ev(sender: &str, ty: &str, call: &str, device: &str, session: &str, extra: Value) -> Value {
    let mut content = json!({
        "version": "1", "call_id": call, "party_id": device, "conf_id": CONF, "device_id": device,
        "sender_session_id": session, "dest_session_id": FOCUS_SESSION,
    });
    content
        .as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    json!({"sender": sender, "type": ty, "content": content})
}

fn alice(ty: &str, extra: Value) -> Value {
    ev(ALICE, ty, ALICE_CALL, "ALICEDEV", ALICE_SESSION, extra)
}

fn cand(n: u32) -> Value {
    json!({"candidate": format!("candidate:{n} 1 udp 1 127.0.0.1 {n} typ host"), "sdpMid": "0", "sdpMLineIndex": 0})
}

fn open_alice_leg(r: &mut Router, now: Instant) -> Leg {
    r.handle_to_device(alice_invite(), now);
    let outs = drain(r);
    match events(&outs).as_slice() {
        [LegEvent::Invite { leg, .. }] => leg.clone(),
        other => panic!("expected one invite, got {other:?}"),
    }
}

#[test]
fn every_fixture_event_parses() {
    let mut n = 0;
    for dir in std::fs::read_dir(fixture_dir("")).unwrap() {
        let dir = dir.unwrap().path();
        let mut all: Vec<Value> = Vec::new();
        for e in read_json(dir.join("to-device.sent-http.json"))
            .as_array()
            .unwrap()
        {
            for devices in e["body"]["messages"].as_object().unwrap().values() {
                for content in devices.as_object().unwrap().values() {
                    all.push(
                        json!({"type": e["eventType"], "sender": "@x:hs", "content": content}),
                    );
                }
            }
        }
        for e in read_json(dir.join("to-device.received.json"))
            .as_array()
            .unwrap()
        {
            assert_eq!(e["encrypted"], false);
            all.push(e["event"].clone());
        }
        for f in std::fs::read_dir(&dir).unwrap() {
            let f = f.unwrap().path();
            if f.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("to-device.example.")
            {
                all.push(read_json(f));
            }
        }
        for e in all {
            let ty = e["type"].as_str().unwrap().to_owned();
            let content = e["content"].as_object().unwrap().clone();
            let sender = UserId::try_from(e["sender"].as_str().unwrap()).unwrap();
            match classify(&ty) {
                TypeClass::Call(kind) => {
                    let parsed =
                        parse_call(sender, kind, content).unwrap_or_else(|r| panic!("{ty}: {r:?}"));
                    assert!(parsed.env.seq.is_some());
                }
                TypeClass::Unknown if ty == "m.call.answer" => {
                    // Answers are never addressed to a focus; check their envelope and body still read.
                    let answer = content["answer"].clone();
                    let parsed = parse_call(sender, CallEventType::Hangup, content).unwrap();
                    assert!(!parsed.env.call_id.as_str().is_empty());
                    assert_eq!(answer["type"], "answer");
                    assert!(answer["sdp"].as_str().unwrap().starts_with("v=0"));
                }
                other => panic!("unexpected {ty}: {other:?}"),
            }
            n += 1;
        }
    }
    assert!(n > 150, "only {n} fixture events");
}

#[test]
fn fixture_session_is_delivered_in_order_without_drops() {
    let (mut r, t0, room) = router_at(FIXTURE_NOW);
    for e in sent_to_focus("focus-emulated-basic") {
        r.handle_to_device(e, t0);
    }
    let outs = drain(&mut r);
    assert!(sends(&outs).is_empty(), "no replies: {:?}", sends(&outs));
    let evs = events(&outs);
    let kinds: Vec<&str> = evs
        .iter()
        .map(|e| match e {
            LegEvent::Invite { .. } => "invite",
            LegEvent::Candidates { .. } => "candidates",
            LegEvent::SelectAnswer { .. } => "select_answer",
            LegEvent::Negotiate { .. } => "negotiate",
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(kinds.iter().filter(|k| **k == "invite").count(), 3);
    assert_eq!(evs.len(), 15);
    // Per leg: invite first, then the rest.
    for user in [ALICE, BOB] {
        let mine: Vec<_> = evs
            .iter()
            .filter(|e| e.leg().unwrap().user_id.as_str() == user)
            .collect();
        assert!(matches!(mine[0], LegEvent::Invite { .. }));
        assert!(matches!(
            mine[4],
            LegEvent::Negotiate {
                kind: SdpType::Answer,
                ..
            }
        ));
    }
    let LegEvent::Invite {
        leg,
        metadata,
        lifetime_ms,
        sdp,
    } = evs[0]
    else {
        panic!()
    };
    assert_eq!(
        leg,
        &Leg {
            room_id: room,
            conf_id: CONF.into(),
            call_id: ALICE_CALL.into(),
            user_id: ALICE.try_into().unwrap(),
            device_id: "ALICEDEV".into(),
            party_id: "ALICEDEV".into(),
            session_id: ALICE_SESSION.into(),
            trunk: false,
        }
    );
    assert!(sdp.starts_with("v=0"));
    assert_eq!(*lifetime_ms, Some(60000));
    assert!(!metadata.is_empty());
    for m in metadata.values() {
        assert_eq!(
            m.user_id.as_ref().unwrap().as_str(),
            ALICE,
            "owner comes from the authenticated sender"
        );
    }
    let m = r.metrics();
    assert_eq!(m.dropped.with_label_values(&["duplicate"]).get(), 0);
    assert_eq!(m.received.with_label_values(&["m.call.invite"]).get(), 3);
    assert_eq!(r.legs().count(), 3);
}

#[test]
fn every_fixture_with_a_focus_authorises_its_invites() {
    for name in ["focus-emulated-leave", "focus-emulated-mute"] {
        let inputs = sent_to_focus(name);
        let room_focus = {
            let sent = read_json(fixture_dir(name).join("to-device.sent-http.json"));
            let s = sent
                .as_array()
                .unwrap()
                .iter()
                .find(|e| e["eventType"] == "m.call.answer")
                .unwrap();
            s["sender"]
                .as_str()
                .unwrap()
                .split('|')
                .next()
                .unwrap()
                .to_owned()
        };
        let session = inputs[0]["content"]["dest_session_id"]
            .as_str()
            .unwrap()
            .to_owned();
        let t0 = Instant::now();
        let (tracker, _) = tracker_from_fixture(name, &room_focus.as_str().try_into().unwrap());
        let me = Identity {
            user_id: room_focus.as_str().try_into().unwrap(),
            device_id: "FOCUSDEV".into(),
            session_id: session.into(),
        };
        let mut r = Router::new(
            RouterConfig::new(me),
            Metrics::unregistered().unwrap(),
            (t0, FIXTURE_NOW + 60_000),
        );
        r.rooms = tracker;
        let n_in = inputs.len();
        for e in inputs {
            r.handle_to_device(e, t0);
        }
        let outs = drain(&mut r);
        assert!(sends(&outs).is_empty(), "{name}: {:?}", sends(&outs));
        let invites = events_of(&outs, |e| matches!(e, LegEvent::Invite { .. }));
        if name == "focus-emulated-leave" {
            // Carol hangs up and calls again with a new call_id.
            assert_eq!(invites, 4);
            assert_eq!(
                events_of(&outs, |e| matches!(e, LegEvent::Hangup { .. })),
                1
            );
            assert_eq!(r.legs().count(), 3);
        } else {
            assert_eq!(invites, 3, "{name}");
        }
        assert_eq!(events(&outs).len(), n_in, "{name}: every event delivered");
    }
}

fn events_of(outs: &[Output], f: impl Fn(&LegEvent) -> bool) -> usize {
    events(outs).into_iter().filter(|e| f(e)).count()
}

fn assert_refused_hangup(outs: &[Output], reason: &str, to_user: &str, session: &str) {
    assert!(
        events(outs).is_empty(),
        "nothing delivered: {:?}",
        events(outs)
    );
    let s = sends(outs);
    assert_eq!(s.len(), 1, "{s:?}");
    assert_eq!(s[0].event_type, "m.call.reject");
    assert_eq!(s[0].to_user.as_str(), to_user);
    assert_eq!(s[0].content["reason"], reason);
    assert_eq!(s[0].content["dest_session_id"], session);
    assert!(s[0].content.get("seq").is_none());
}

#[test]
fn invite_is_authorised_before_expiry_and_refused_after() {
    let (mut r, t0, _) = router_at(ALICE_EXPIRES - 1);
    open_alice_leg(&mut r, t0);

    let (mut r, t0, _) = router_at(ALICE_EXPIRES);
    r.handle_to_device(alice_invite(), t0);
    assert_refused_hangup(&drain(&mut r), "member_expired", ALICE, ALICE_SESSION);
    assert_eq!(r.metrics().refused_count(RefuseReason::MemberExpired), 1);
    assert_eq!(r.legs().count(), 0);
}

#[test]
fn invite_from_user_not_in_room_is_refused() {
    let (mut r, t0, _) = router_at(FIXTURE_NOW);
    let mut e = alice_invite();
    e["sender"] = json!("@mallory:localhost");
    r.handle_to_device(e, t0);
    assert_refused_hangup(
        &drain(&mut r),
        "not_in_room",
        "@mallory:localhost",
        ALICE_SESSION,
    );
    assert_eq!(r.metrics().refused_count(RefuseReason::NotInRoom), 1);
}

#[test]
fn invite_with_another_session_is_refused() {
    let (mut r, t0, _) = router_at(FIXTURE_NOW);
    let mut e = alice_invite();
    e["content"]["sender_session_id"] = json!("stale-session");
    r.handle_to_device(e, t0);
    assert_refused_hangup(&drain(&mut r), "session_mismatch", ALICE, "stale-session");
    assert_eq!(r.metrics().refused_count(RefuseReason::SessionMismatch), 1);
}

#[test]
fn invite_for_unknown_conf_or_device_is_refused() {
    let (mut r, t0, _) = router_at(FIXTURE_NOW);
    let mut e = alice_invite();
    e["content"]["conf_id"] = json!("no-such-conf");
    r.handle_to_device(e, t0);
    assert_refused_hangup(&drain(&mut r), "no_call", ALICE, ALICE_SESSION);
    let mut e = alice_invite();
    e["content"]["device_id"] = json!("OTHERDEV");
    e["content"]["call_id"] = json!("another-call");
    r.handle_to_device(e, t0);
    assert_refused_hangup(&drain(&mut r), "no_member_device", ALICE, ALICE_SESSION);
}

#[test]
fn allowed_servers_restrict_senders() {
    let (mut r, t0, _) = router_at(FIXTURE_NOW);
    r.cfg.allowed_servers = vec!["example.org".into()];
    r.handle_to_device(alice_invite(), t0);
    assert_refused_hangup(&drain(&mut r), "server_not_allowed", ALICE, ALICE_SESSION);
    r.cfg.allowed_servers = vec!["example.org".into(), "localhost".into()];
    let mut e = alice_invite();
    e["content"]["call_id"] = json!("second-try");
    r.handle_to_device(e, t0);
    assert_eq!(
        events_of(&drain(&mut r), |e| matches!(e, LegEvent::Invite { .. })),
        1
    );
}

#[test]
fn outgoing_events_have_exactly_the_required_fields_and_no_seq() {
    let (mut r, t0, _) = router_at(FIXTURE_NOW);
    let leg = open_alice_leg(&mut r, t0);
    let mut md = SdpStreamMetadata::new();
    md.insert("bob-stream".into(), StreamMetadata::new("m.usermedia"));
    let common = [
        "version",
        "call_id",
        "party_id",
        "conf_id",
        "device_id",
        "sender_session_id",
        "dest_session_id",
    ];
    let with = |extra: &[&str]| -> BTreeSet<String> {
        common.iter().chain(extra).map(|s| s.to_string()).collect()
    };
    let cmds = vec![
        (
            LegCommand::Answer {
                leg: leg.clone(),
                sdp: "v=0\r\n".into(),
                metadata: md.clone(),
            },
            "m.call.answer",
            with(&[
                "answer",
                "sdp_stream_metadata",
                "org.matrix.msc3077.sdp_stream_metadata",
                "capabilities",
            ]),
        ),
        (
            LegCommand::Negotiate {
                leg: leg.clone(),
                kind: SdpType::Offer,
                sdp: "v=0\r\n".into(),
                metadata: md.clone(),
            },
            "m.call.negotiate",
            with(&[
                "description",
                "lifetime",
                "sdp_stream_metadata",
                "org.matrix.msc3077.sdp_stream_metadata",
                "capabilities",
            ]),
        ),
        (
            LegCommand::Candidates {
                leg: leg.clone(),
                candidates: vec![Candidate::end_of_candidates()],
            },
            "m.call.candidates",
            with(&["candidates"]),
        ),
        (
            LegCommand::MetadataChanged {
                leg: leg.clone(),
                metadata: md.clone(),
            },
            "m.call.sdp_stream_metadata_changed",
            with(&[
                "sdp_stream_metadata",
                "org.matrix.msc3077.sdp_stream_metadata",
            ]),
        ),
        (
            LegCommand::Hangup {
                leg: leg.clone(),
                reason: "user_hangup".into(),
            },
            "m.call.hangup",
            with(&["reason"]),
        ),
    ];
    for (cmd, ty, keys) in cmds {
        r.handle_command(cmd, t0);
        let outs = drain(&mut r);
        let s = sends(&outs);
        assert_eq!(s.len(), 1);
        let c = &s[0].content;
        assert_eq!(s[0].event_type, ty);
        assert_eq!(content_keys(c), keys, "{ty}");
        assert_eq!(c["version"], "1");
        assert_eq!(c["call_id"], ALICE_CALL);
        assert_eq!(c["party_id"], "FOCUSDEV");
        assert_eq!(c["device_id"], "FOCUSDEV");
        assert_eq!(c["conf_id"], CONF);
        assert_eq!(c["sender_session_id"], FOCUS_SESSION);
        assert_eq!(c["dest_session_id"], ALICE_SESSION);
        assert_eq!(s[0].to_user.as_str(), ALICE);
        assert_eq!(s[0].to_device.as_str(), "ALICEDEV");
        match ty {
            "m.call.answer" => {
                assert_eq!(c["answer"], json!({"type": "answer", "sdp": "v=0\r\n"}));
                assert_eq!(
                    c["capabilities"],
                    json!({"m.call.transferee": false, "m.call.dtmf": false})
                );
                assert_eq!(
                    c["sdp_stream_metadata"],
                    c["org.matrix.msc3077.sdp_stream_metadata"]
                );
                assert_eq!(
                    c["sdp_stream_metadata"],
                    json!({"bob-stream": {"purpose": "m.usermedia", "audio_muted": false, "video_muted": false}})
                );
            }
            "m.call.negotiate" => {
                assert_eq!(c["description"], json!({"type": "offer", "sdp": "v=0\r\n"}));
                assert_eq!(c["lifetime"], 60000);
            }
            "m.call.candidates" => assert_eq!(
                serde_json::to_string(&c["candidates"]).unwrap(),
                r#"[{"candidate":""}]"#
            ),
            "m.call.hangup" => assert_eq!(c["reason"], "user_hangup"),
            _ => {}
        }
        let body = s[0].body();
        assert_eq!(body["messages"][ALICE]["ALICEDEV"], *c);
    }
    assert_eq!(r.legs().count(), 0, "the focus's hangup ends the leg");
}

#[test]
fn empty_metadata_is_still_sent_as_an_object() {
    let (mut r, t0, _) = router_at(FIXTURE_NOW);
    let leg = open_alice_leg(&mut r, t0);
    r.handle_command(
        LegCommand::Answer {
            leg,
            sdp: "v=0".into(),
            metadata: SdpStreamMetadata::new(),
        },
        t0,
    );
    let outs = drain(&mut r);
    let c = &sends(&outs)[0].content;
    assert_eq!(c["sdp_stream_metadata"], json!({}));
    assert_eq!(c["org.matrix.msc3077.sdp_stream_metadata"], json!({}));
}

#[test]
fn oversized_outgoing_body_is_not_sent() {
    let (mut r, t0, _) = router_at(FIXTURE_NOW);
    let leg = open_alice_leg(&mut r, t0);
    let sdp = "a".repeat(MAX_TODEVICE_BODY_BYTES);
    r.handle_command(
        LegCommand::Negotiate {
            leg: leg.clone(),
            kind: SdpType::Offer,
            sdp,
            metadata: SdpStreamMetadata::new(),
        },
        t0,
    );
    assert!(drain(&mut r).is_empty());
    assert_eq!(r.metrics().dropped_count(DropReason::TooLarge), 1);
    r.handle_command(
        LegCommand::Negotiate {
            leg,
            kind: SdpType::Offer,
            sdp: "v=0".into(),
            metadata: SdpStreamMetadata::new(),
        },
        t0,
    );
    assert_eq!(sends(&drain(&mut r)).len(), 1);
}

/// Each bad input gets its documented drop reason, never a reply that could loop, and a valid
/// call in the same router carries on unaffected.
#[test]
fn bad_inputs_are_counted_and_do_not_affect_another_call() {
    let (mut r, t0, _) = router_at(FIXTURE_NOW);
    let leg = open_alice_leg(&mut r, t0);

    let bob_call = "bob-call";
    let huge_sdp = "a".repeat(crate::wire::MAX_SDP_BYTES + 1);
    type Case<'a> = (&'a str, Box<dyn Fn(&mut Router) + 'a>);
    let cases: Vec<Case> = vec![
        (
            "malformed",
            Box::new(|r| r.handle_to_device_json("{not json", t0)),
        ),
        (
            "malformed",
            Box::new(|r| r.handle_to_device(json!([1, 2, 3]), t0)),
        ),
        (
            "malformed",
            Box::new(|r| {
                r.handle_to_device(
                    json!({"type": "m.call.invite", "sender": BOB, "content": "x"}),
                    t0,
                )
            }),
        ),
        (
            "malformed",
            Box::new(|r| {
                r.handle_to_device(
                    json!({"type": "m.call.invite", "sender": 5, "content": {}}),
                    t0,
                )
            }),
        ),
        (
            "malformed",
            Box::new(|r| {
                let mut e = ev(
                    BOB,
                    "m.call.candidates",
                    bob_call,
                    "BOBDEV",
                    "G0aDtgpxYJ",
                    json!({"candidates": [{"candidate": 7}]}),
                );
                e["content"].as_object_mut().unwrap().remove("conf_id");
                r.handle_to_device(e, t0)
            }),
        ),
        (
            "malformed",
            Box::new(|r| {
                r.handle_to_device(
                    ev(
                        BOB,
                        "m.call.candidates",
                        bob_call,
                        "BOBDEV",
                        "s",
                        json!({"candidates": "nope"}),
                    ),
                    t0,
                )
            }),
        ),
        (
            "malformed",
            Box::new(|r| {
                r.handle_to_device(
                    ev(
                        BOB,
                        "m.call.hangup",
                        bob_call,
                        "BOBDEV",
                        "s",
                        json!({"call_id": 12}),
                    ),
                    t0,
                )
            }),
        ),
        (
            "wrong_session",
            Box::new(|r| {
                let mut e = alice("m.call.candidates", json!({"candidates": [cand(99)]}));
                e["content"]["dest_session_id"] = json!("someone-else");
                r.handle_to_device(e, t0)
            }),
        ),
        (
            "wrong_session",
            Box::new(|r| {
                let mut e = alice("m.call.candidates", json!({"candidates": [cand(99)]}));
                e["content"]
                    .as_object_mut()
                    .unwrap()
                    .remove("dest_session_id");
                r.handle_to_device(e, t0)
            }),
        ),
        (
            "too_large",
            Box::new(move |r| {
                r.handle_to_device(
                    ev(
                        BOB,
                        "m.call.negotiate",
                        bob_call,
                        "BOBDEV",
                        "s",
                        json!({"description": {"type": "offer", "sdp": huge_sdp}}),
                    ),
                    t0,
                )
            }),
        ),
        (
            "unknown_type",
            Box::new(|r| {
                r.handle_to_device(
                    ev(BOB, "m.call.replaces", bob_call, "BOBDEV", "s", json!({})),
                    t0,
                )
            }),
        ),
        (
            // An answer is only taken on a trunk weir dialled; one without a body is malformed.
            "malformed",
            Box::new(|r| {
                r.handle_to_device(
                    ev(BOB, "m.call.answer", bob_call, "BOBDEV", "s", json!({})),
                    t0,
                )
            }),
        ),
        (
            "unknown_type",
            Box::new(|r| {
                r.handle_to_device(json!({"sender": BOB, "type": "m.dummy", "content": {}}), t0)
            }),
        ),
        (
            "encrypted",
            Box::new(|r| {
                r.handle_to_device(
                    json!({"sender": BOB, "type": "m.room.encrypted", "content": {"algorithm": "m.olm.v1.curve25519-aes-sha2", "ciphertext": {}}}),
                    t0,
                )
            }),
        ),
        (
            "key_event",
            Box::new(|r| {
                r.handle_to_device(
                    json!({"sender": BOB, "type": "io.element.call.encryption_keys", "content": {"keys": {"index": 0, "key": "c2VjcmV0"}}}),
                    t0,
                )
            }),
        ),
        (
            "key_event",
            Box::new(|r| {
                r.handle_to_device(
                    json!({"sender": BOB, "type": "m.rtc.encryption_key", "content": {}}),
                    t0,
                )
            }),
        ),
        (
            "key_event",
            Box::new(|r| {
                r.handle_to_device(
                    json!({"sender": BOB, "type": "m.room_key", "content": {}}),
                    t0,
                )
            }),
        ),
        (
            "key_event",
            Box::new(|r| {
                r.handle_to_device(
                    json!({"sender": BOB, "type": "m.forwarded_room_key", "content": {}}),
                    t0,
                )
            }),
        ),
        (
            "key_event",
            Box::new(|r| {
                r.handle_to_device(
                    json!({"sender": BOB, "type": "m.room_key_request", "content": {}}),
                    t0,
                )
            }),
        ),
        (
            "bad_version",
            Box::new(|r| {
                r.handle_to_device(
                    ev(
                        BOB,
                        "m.call.hangup",
                        bob_call,
                        "BOBDEV",
                        "s",
                        json!({"version": "7"}),
                    ),
                    t0,
                )
            }),
        ),
        (
            "not_leg_owner",
            Box::new(|r| {
                r.handle_to_device(
                    ev(
                        BOB,
                        "m.call.hangup",
                        ALICE_CALL,
                        "BOBDEV",
                        "G0aDtgpxYJ",
                        json!({}),
                    ),
                    t0,
                )
            }),
        ),
        (
            "not_leg_owner",
            Box::new(|r| {
                r.handle_to_device(
                    ev(
                        ALICE,
                        "m.call.hangup",
                        ALICE_CALL,
                        "OTHERDEV",
                        ALICE_SESSION,
                        json!({}),
                    ),
                    t0,
                )
            }),
        ),
        (
            "not_leg_owner",
            Box::new(|r| {
                let mut e = alice("m.call.hangup", json!({}));
                e["content"]["party_id"] = json!("SOMEONE");
                r.handle_to_device(e, t0)
            }),
        ),
        (
            "not_leg_owner",
            Box::new(|r| {
                let mut e = alice_invite();
                e["sender"] = json!(BOB);
                e["content"]["device_id"] = json!("BOBDEV");
                e["content"]["party_id"] = json!("BOBDEV");
                e["content"]["sender_session_id"] = json!("G0aDtgpxYJ");
                r.handle_to_device(e, t0)
            }),
        ),
        (
            "conf_mismatch",
            Box::new(|r| {
                let mut e = alice("m.call.hangup", json!({}));
                e["content"]["conf_id"] = json!("other-conf");
                r.handle_to_device(e, t0)
            }),
        ),
        (
            "unknown_call",
            Box::new(|r| {
                r.handle_to_device(
                    ev(BOB, "m.call.hangup", "nope", "BOBDEV", "s", json!({})),
                    t0,
                )
            }),
        ),
    ];
    for (i, (reason, case)) in cases.iter().enumerate() {
        let before = r.metrics().dropped.with_label_values(&[reason]).get();
        case(&mut r);
        let outs = drain(&mut r);
        assert_eq!(
            r.metrics().dropped.with_label_values(&[reason]).get(),
            before + 1,
            "case {i} ({reason})"
        );
        assert!(
            events(&outs).is_empty(),
            "case {i} ({reason}) delivered {outs:?}"
        );
        if *reason != "too_large" {
            assert!(
                sends(&outs).is_empty(),
                "case {i} ({reason}) replied {outs:?}"
            );
        }
        // Alice's call carries on.
        r.handle_to_device(
            alice("m.call.candidates", json!({"candidates": [cand(i as u32)]})),
            t0,
        );
        let outs = drain(&mut r);
        match events(&outs).as_slice() {
            [LegEvent::Candidates { leg: l, candidates }] => {
                assert_eq!(l, &leg);
                assert_eq!(
                    candidates[0],
                    serde_json::from_value(cand(i as u32)).unwrap()
                );
            }
            other => panic!("case {i} ({reason}) broke alice's call: {other:?}"),
        }
    }
    assert_eq!(r.legs().count(), 1);
}

#[test]
fn garbled_invite_with_readable_envelope_is_answered_with_hangup() {
    let (mut r, t0, _) = router_at(FIXTURE_NOW);
    let mut e = alice_invite();
    e["content"]["offer"]["sdp"] = json!("a".repeat(crate::wire::MAX_SDP_BYTES + 1));
    r.handle_to_device(e, t0);
    let outs = drain(&mut r);
    assert_eq!(r.metrics().dropped_count(DropReason::TooLarge), 1);
    let s = sends(&outs);
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].content["reason"], "unknown_error");
    assert!(events(&outs).is_empty());
}

#[test]
fn unknown_call_gets_one_rate_limited_hangup() {
    let (mut r, t0, _) = router_at(FIXTURE_NOW);
    let negotiate = |call: &str| {
        ev(
            BOB,
            "m.call.negotiate",
            call,
            "BOBDEV",
            "bob-sess",
            json!({"description": {"type": "offer", "sdp": "v=0"}}),
        )
    };
    r.handle_to_device(negotiate("stale-call"), t0);
    let outs = drain(&mut r);
    let s = sends(&outs);
    assert_eq!(s.len(), 1);
    let c = &s[0].content;
    assert_eq!(s[0].event_type, "m.call.hangup");
    assert_eq!(s[0].to_user.as_str(), BOB);
    assert_eq!(s[0].to_device.as_str(), "BOBDEV");
    assert_eq!(c["reason"], "unknown_error");
    assert_eq!(c["party_id"], "FOCUSDEV");
    assert_eq!(c["dest_session_id"], "bob-sess");
    assert_eq!(c["call_id"], "stale-call");
    assert_eq!(c["conf_id"], CONF);
    assert!(c.get("seq").is_none());
    // The same call again within the interval: counted, not answered.
    r.handle_to_device(negotiate("stale-call"), t0 + Duration::from_secs(1));
    assert!(drain(&mut r).is_empty());
    assert_eq!(r.metrics().dropped_count(DropReason::UnknownCall), 2);
    // After the interval it is answered again.
    r.handle_to_device(negotiate("stale-call"), t0 + Duration::from_secs(31));
    assert_eq!(sends(&drain(&mut r)).len(), 1);
    // select_answer and metadata changes for unknown calls are answered too.
    r.handle_to_device(
        ev(
            BOB,
            "m.call.select_answer",
            "c2",
            "BOBDEV",
            "s",
            json!({"selected_party_id": "FOCUSDEV"}),
        ),
        t0 + Duration::from_secs(31),
    );
    assert_eq!(sends(&drain(&mut r)).len(), 1);
}

#[test]
fn a_flood_of_unknown_calls_does_not_amplify() {
    let (mut r, t0, _) = router_at(FIXTURE_NOW);
    for i in 0..1000 {
        r.handle_to_device(
            ev(
                BOB,
                "m.call.select_answer",
                &format!("c{i}"),
                "BOBDEV",
                "s",
                json!({"selected_party_id": "X"}),
            ),
            t0,
        );
    }
    let replies = sends(&drain(&mut r)).len();
    assert!(
        replies <= r.cfg.unknown_call_replies_per_sec as usize,
        "{replies} replies"
    );
    assert!(replies > 0);
    assert_eq!(r.metrics().dropped_count(DropReason::UnknownCall), 1000);
    // Alice can still open a call.
    open_alice_leg(&mut r, t0);
}

#[test]
fn early_candidates_are_delivered_right_after_the_invite() {
    let (mut r, t0, _) = router_at(FIXTURE_NOW);
    r.handle_to_device(
        alice("m.call.candidates", json!({"candidates": [cand(1)]})),
        t0,
    );
    r.handle_to_device(
        alice(
            "m.call.candidates",
            json!({"candidates": [cand(2), {"candidate": ""}]}),
        ),
        t0,
    );
    assert!(drain(&mut r).is_empty());
    let mut invite = alice_invite();
    invite["content"].as_object_mut().unwrap().remove("seq");
    r.handle_to_device(invite, t0 + Duration::from_secs(2));
    let outs = drain(&mut r);
    let evs = events(&outs);
    assert_eq!(evs.len(), 2);
    assert!(matches!(evs[0], LegEvent::Invite { .. }));
    let LegEvent::Candidates { candidates, .. } = evs[1] else {
        panic!("{evs:?}")
    };
    assert_eq!(candidates.len(), 3);
    assert!(candidates[2].is_end_of_candidates());
}

#[test]
fn early_candidates_expire_and_are_bounded() {
    let (mut r, t0, _) = router_at(FIXTURE_NOW);
    r.handle_to_device(
        alice("m.call.candidates", json!({"candidates": [cand(1)]})),
        t0,
    );
    let many: Vec<Value> = (0..r.cfg.max_early_candidates as u32).map(cand).collect();
    r.handle_to_device(alice("m.call.candidates", json!({"candidates": many})), t0);
    assert_eq!(
        r.metrics().dropped_count(DropReason::Flood),
        1,
        "over the per-call cap"
    );
    assert!(drain(&mut r).is_empty());
    assert!(r.poll_timeout().is_some());
    r.handle_timeout(t0 + Duration::from_secs(9));
    assert!(quiet(&drain(&mut r)), "not yet expired");
    r.handle_timeout(t0 + Duration::from_secs(10));
    let outs = drain(&mut r);
    assert_eq!(r.metrics().dropped_count(DropReason::EarlyExpired), 1);
    let s = sends(&outs);
    assert_eq!(s.len(), 1, "the dead call is told to hang up");
    assert_eq!(s[0].content["reason"], "unknown_error");
    // The invite arriving now does not bring the expired candidates with it.
    let mut invite = alice_invite();
    invite["content"].as_object_mut().unwrap().remove("seq");
    r.handle_to_device(invite, t0 + Duration::from_secs(11));
    let outs = drain(&mut r);
    assert_eq!(events(&outs).len(), 1);
}

#[test]
fn early_candidate_buffers_per_user_are_capped() {
    let (mut r, t0, _) = router_at(FIXTURE_NOW);
    for i in 0..r.cfg.max_early_calls_per_user + 3 {
        r.handle_to_device(
            ev(
                BOB,
                "m.call.candidates",
                &format!("c{i}"),
                "BOBDEV",
                "s",
                json!({"candidates": [cand(1)]}),
            ),
            t0,
        );
    }
    assert_eq!(r.metrics().dropped_count(DropReason::Flood), 3);
    // Alice's early candidates are still buffered.
    r.handle_to_device(
        alice("m.call.candidates", json!({"candidates": [cand(5)]})),
        t0,
    );
    assert_eq!(r.metrics().dropped_count(DropReason::Flood), 3);
}

#[test]
fn candidates_overtaking_the_invite_are_reordered_by_seq() {
    let (mut r, t0, _) = router_at(FIXTURE_NOW);
    r.handle_to_device(
        alice(
            "m.call.candidates",
            json!({"seq": 2, "candidates": [cand(2)]}),
        ),
        t0,
    );
    r.handle_to_device(
        alice(
            "m.call.candidates",
            json!({"seq": 1, "candidates": [cand(1)]}),
        ),
        t0,
    );
    assert!(drain(&mut r).is_empty());
    r.handle_to_device(alice_invite(), t0); // seq 0
    let outs = drain(&mut r);
    let evs = events(&outs);
    assert_eq!(evs.len(), 3);
    assert!(matches!(evs[0], LegEvent::Invite { .. }));
    let LegEvent::Candidates { candidates: c1, .. } = evs[1] else {
        panic!()
    };
    let LegEvent::Candidates { candidates: c2, .. } = evs[2] else {
        panic!()
    };
    assert!(c1[0].candidate.contains("candidate:1 "));
    assert!(c2[0].candidate.contains("candidate:2 "));
    // A re-delivered seq is a duplicate.
    r.handle_to_device(
        alice(
            "m.call.candidates",
            json!({"seq": 1, "candidates": [cand(1)]}),
        ),
        t0,
    );
    assert!(drain(&mut r).is_empty());
    assert_eq!(r.metrics().dropped_count(DropReason::Duplicate), 1);
}

#[test]
fn reorder_timeout_skips_a_missing_seq() {
    let (mut r, t0, _) = router_at(FIXTURE_NOW);
    open_alice_leg(&mut r, t0); // seq 0
    r.handle_to_device(
        alice(
            "m.call.candidates",
            json!({"seq": 2, "candidates": [cand(2)]}),
        ),
        t0,
    );
    assert!(drain(&mut r).is_empty());
    let due = r.poll_timeout().unwrap();
    assert_eq!(due, t0 + Duration::from_secs(1));
    r.handle_timeout(due);
    let outs = drain(&mut r);
    assert_eq!(events(&outs).len(), 1);
    assert_eq!(r.metrics().seq_gaps.get(), 1);
    // seq 1 arriving late is now a duplicate.
    r.handle_to_device(
        alice(
            "m.call.candidates",
            json!({"seq": 1, "candidates": [cand(1)]}),
        ),
        due,
    );
    assert!(drain(&mut r).is_empty());
    assert_eq!(r.metrics().dropped_count(DropReason::Duplicate), 1);
}

#[test]
fn duplicate_msgid_is_dropped() {
    let (mut r, t0, _) = router_at(FIXTURE_NOW);
    open_alice_leg(&mut r, t0);
    r.handle_to_device(
        alice(
            "m.call.candidates",
            json!({"org.matrix.msgid": "m1", "candidates": [cand(1)]}),
        ),
        t0,
    );
    r.handle_to_device(
        alice(
            "m.call.candidates",
            json!({"org.matrix.msgid": "m1", "candidates": [cand(1)]}),
        ),
        t0,
    );
    assert_eq!(events(&drain(&mut r)).len(), 1);
    assert_eq!(r.metrics().dropped_count(DropReason::Duplicate), 1);
}

#[test]
fn re_sent_invite_is_deduplicated_and_a_changed_one_is_a_re_offer() {
    let (mut r, t0, _) = router_at(FIXTURE_NOW);
    let mut invite = alice_invite();
    invite["content"].as_object_mut().unwrap().remove("seq");
    invite["content"]
        .as_object_mut()
        .unwrap()
        .remove("org.matrix.msgid");
    r.handle_to_device(invite.clone(), t0);
    assert_eq!(events(&drain(&mut r)).len(), 1);
    r.handle_to_device(invite.clone(), t0);
    assert!(drain(&mut r).is_empty());
    assert_eq!(r.metrics().dropped_count(DropReason::Duplicate), 1);
    invite["content"]["offer"]["sdp"] = json!("v=0\r\nchanged");
    r.handle_to_device(invite, t0);
    let outs = drain(&mut r);
    let evs = events(&outs);
    assert!(matches!(evs.as_slice(), [LegEvent::Invite { sdp, .. }] if sdp.ends_with("changed")));
    assert_eq!(r.legs().count(), 1);
}

#[test]
fn unanswered_invites_per_device_are_capped() {
    let (mut r, t0, _) = router_at(FIXTURE_NOW);
    let cap = r.cfg.max_unanswered_per_device;
    for i in 0..cap + 1 {
        let mut invite = alice_invite();
        invite["content"]["call_id"] = json!(format!("call-{i}"));
        r.handle_to_device(invite, t0);
    }
    let outs = drain(&mut r);
    assert_eq!(
        events_of(&outs, |e| matches!(e, LegEvent::Invite { .. })),
        cap
    );
    assert_eq!(r.metrics().refused_count(RefuseReason::TooManyInvites), 1);
    // Answering one frees a slot.
    let leg = r.legs().next().unwrap().clone();
    r.handle_command(
        LegCommand::Answer {
            leg,
            sdp: "v=0".into(),
            metadata: SdpStreamMetadata::new(),
        },
        t0,
    );
    let mut invite = alice_invite();
    invite["content"]["call_id"] = json!("call-late");
    r.handle_to_device(invite, t0);
    assert_eq!(
        events_of(&drain(&mut r), |e| matches!(e, LegEvent::Invite { .. })),
        1
    );
}

#[test]
fn client_hangup_ends_the_leg_and_later_events_get_no_reply() {
    let (mut r, t0, _) = router_at(FIXTURE_NOW);
    let leg = open_alice_leg(&mut r, t0);
    r.handle_to_device(alice("m.call.hangup", json!({"reason": "user_hangup"})), t0);
    let outs = drain(&mut r);
    assert_eq!(
        events(&outs),
        vec![&LegEvent::Hangup {
            leg,
            reason: "user_hangup".into()
        }]
    );
    assert_eq!(r.legs().count(), 0);
    r.handle_to_device(
        alice(
            "m.call.negotiate",
            json!({"description": {"type": "offer", "sdp": "v=0"}}),
        ),
        t0,
    );
    assert!(
        drain(&mut r).is_empty(),
        "a call that just ended is not answered again"
    );
    r.handle_to_device(alice("m.call.reject", json!({})), t0);
    assert!(drain(&mut r).is_empty());
}

#[test]
fn metadata_and_negotiate_are_attributed_to_the_leg_owner() {
    let (mut r, t0, _) = router_at(FIXTURE_NOW);
    open_alice_leg(&mut r, t0);
    r.handle_to_device(
        alice(
            "m.call.sdp_stream_metadata_changed",
            json!({"sdp_stream_metadata": {"s": {"purpose": "m.usermedia", "audio_muted": true, "user_id": "@bob-mwyct2zzfae9:localhost"}}}),
        ),
        t0,
    );
    r.handle_to_device(
        alice("m.call.negotiate", json!({"description": {"type": "offer", "sdp": "v=0"}, "org.matrix.msc3077.sdp_stream_metadata": {"s": {"purpose": "m.screenshare"}}})),
        t0,
    );
    r.handle_to_device(
        alice(
            "m.call.select_answer",
            json!({"selected_party_id": "FOCUSDEV"}),
        ),
        t0,
    );
    let outs = drain(&mut r);
    let evs = events(&outs);
    let LegEvent::MetadataChanged { metadata, .. } = evs[0] else {
        panic!()
    };
    assert!(metadata[&crate::ids::StreamId::from("s")].audio_muted);
    assert_eq!(
        metadata[&crate::ids::StreamId::from("s")]
            .user_id
            .as_ref()
            .unwrap()
            .as_str(),
        ALICE
    );
    let LegEvent::Negotiate {
        kind,
        metadata: Some(m),
        ..
    } = evs[1]
    else {
        panic!()
    };
    assert_eq!(*kind, SdpType::Offer);
    assert_eq!(
        m[&crate::ids::StreamId::from("s")]
            .device_id
            .as_ref()
            .unwrap()
            .as_str(),
        "ALICEDEV"
    );
    assert!(
        matches!(evs[2], LegEvent::SelectAnswer { selected_party_id, .. } if selected_party_id.as_str() == "FOCUSDEV")
    );
}

#[test]
fn member_gone_on_entry_removal_leave_and_expiry() {
    // Removal of the m.call.member entry.
    let (mut r, t0, room) = router_at(FIXTURE_NOW);
    let leg = open_alice_leg(&mut r, t0);
    let gone = LegEvent::MemberGone {
        room_id: room.clone(),
        conf_id: CONF.into(),
        user_id: ALICE.try_into().unwrap(),
        device_id: "ALICEDEV".into(),
    };
    // An unrelated state change keeps the leg.
    r.handle_joined_room(&room, &[join_event("@dave:localhost")], &[], false, t0);
    assert!(drain(&mut r).is_empty());
    let removal = json!({"type": "org.matrix.msc3401.call.member", "state_key": ALICE, "sender": ALICE, "content": {"m.calls": []}});
    r.handle_joined_room(&room, &[], std::slice::from_ref(&removal), false, t0);
    // Seen through /sync only: the room's state is asked for before the leg is ended.
    assert_eq!(drain(&mut r), vec![Output::RefreshRoom(room.clone())]);
    r.handle_room_state(&room, &[removal], t0);
    assert_eq!(events(&drain(&mut r)), vec![&gone]);
    assert_eq!(r.legs().count(), 0);
    // Late events for that call are not answered.
    r.handle_to_device(
        alice("m.call.candidates", json!({"candidates": [cand(1)]})),
        t0,
    );
    assert!(sends(&drain(&mut r)).is_empty());
    let _ = leg;

    // Leaving the room.
    let (mut r, t0, room) = router_at(FIXTURE_NOW);
    open_alice_leg(&mut r, t0);
    let leave = json!({"type": "m.room.member", "state_key": ALICE, "sender": ALICE, "content": {"membership": "leave"}});
    r.handle_joined_room(&room, &[], &[leave], false, t0);
    assert!(events(&drain(&mut r)).is_empty());
    // No state read comes back: the grace runs out.
    r.handle_timeout(t0 + ABSENCE_GRACE);
    assert_eq!(events(&drain(&mut r)), vec![&gone]);

    // Expiry, noticed by the housekeeping timer.
    let (mut r, t0, _) = router_at(ALICE_EXPIRES - 5_000);
    open_alice_leg(&mut r, t0);
    let next = r.poll_timeout().unwrap();
    assert!(next <= t0 + Duration::from_secs(1));
    r.handle_timeout(t0 + Duration::from_secs(4));
    assert!(quiet(&drain(&mut r)));
    r.handle_timeout(t0 + Duration::from_secs(5));
    assert_eq!(events(&drain(&mut r)), vec![&gone]);

    // weir itself leaving the room.
    let (mut r, t0, room) = router_at(FIXTURE_NOW);
    open_alice_leg(&mut r, t0);
    r.handle_room_left(&room, t0);
    assert_eq!(events(&drain(&mut r)), vec![&gone]);
}

#[test]
fn full_state_replaces_room_state() {
    let (mut r, t0, room) = router_at(FIXTURE_NOW);
    open_alice_leg(&mut r, t0);
    // A full state snapshot without Alice's member entry: she is gone.
    let (_, events_) = crate::room::tests::load_state("focus-emulated-basic");
    let without_alice: Vec<Value> = events_
        .into_iter()
        .filter(|e| e["state_key"] != ALICE)
        .chain([join_event(ALICE), join_event(FOCUS)])
        .collect();
    r.handle_joined_room(&room, &without_alice, &[], true, t0);
    assert_eq!(
        events_of(&drain(&mut r), |e| matches!(e, LegEvent::MemberGone { .. })),
        1
    );
}

#[test]
fn refused_re_offer_ends_the_leg() {
    let (mut r, t0, room) = router_at(FIXTURE_NOW);
    let leg = open_alice_leg(&mut r, t0);
    // Alice's membership entry moves to a new session (she reloaded); the old call re-offers.
    let entry = json!({"type": "org.matrix.msc3401.call.member", "state_key": ALICE, "sender": ALICE, "content": {"m.calls": [
        {"m.call_id": CONF, "m.devices": [{"device_id": "ALICEDEV", "session_id": "new-session", "expires_ts": ALICE_EXPIRES, "feeds": []}]}]}});
    r.handle_joined_room(&room, &[], &[entry], false, t0);
    assert!(drain(&mut r).is_empty(), "a session change is not 'gone'");
    let mut invite = alice_invite();
    invite["content"]["seq"] = json!(1);
    invite["content"]["org.matrix.msgid"] = json!("a-new-message");
    invite["content"]["offer"]["sdp"] = json!("v=0\r\nre-offer");
    r.handle_to_device(invite, t0);
    let outs = drain(&mut r);
    assert_eq!(
        events(&outs),
        vec![&LegEvent::Hangup {
            leg,
            reason: "refused:session_mismatch".into()
        }]
    );
    assert_eq!(sends(&outs).len(), 1);
    assert_eq!(r.legs().count(), 0);
}

#[test]
fn hangup_all_hangs_up_every_leg() {
    let (mut r, t0, _) = router_at(FIXTURE_NOW);
    for e in sent_to_focus("focus-emulated-basic")
        .into_iter()
        .filter(|e| e["type"] == "m.call.invite")
    {
        r.handle_to_device(e, t0);
    }
    drain(&mut r);
    assert_eq!(r.hangup_all("user_hangup", t0), 3);
    let outs = drain(&mut r);
    let s = sends(&outs);
    assert_eq!(s.len(), 3);
    assert!(s
        .iter()
        .all(|s| s.event_type == "m.call.hangup" && s.content["reason"] == "user_hangup"));
    assert_eq!(r.legs().count(), 0);
}

#[test]
fn idle_router_has_no_timer() {
    let (r, _, _) = router_at(FIXTURE_NOW);
    assert_eq!(r.poll_timeout(), None);
}

#[test]
fn wall_clock_follows_the_anchor() {
    let (r, t0, _) = router_at(1_000_000);
    assert_eq!(r.wall_ms(t0 + Duration::from_millis(1500)), 1_001_500);
}

fn with_grace(wall: u64) -> (Router, Instant, RoomId) {
    let (mut r, t0, room) = router_at(wall);
    r.cfg.auth_grace = Duration::from_secs(3);
    (r, t0, room)
}

fn alice_member_entry(session: &str) -> Value {
    json!({"type": "org.matrix.msc3401.call.member", "state_key": ALICE, "sender": ALICE, "content": {"m.calls": [
        {"m.call_id": CONF, "m.devices": [{"device_id": "ALICEDEV", "session_id": session, "expires_ts": ALICE_EXPIRES, "feeds": []}]}]}})
}

#[test]
fn invite_overtaking_its_member_entry_is_held_until_the_state_arrives() {
    let (mut r, t0, room) = with_grace(FIXTURE_NOW);
    // Alice reloaded: her new session's invite arrives before her new member entry.
    let mut invite = alice_invite();
    invite["content"]["sender_session_id"] = json!("new-session");
    r.handle_to_device(invite, t0);
    assert_eq!(
        drain(&mut r),
        vec![Output::RefreshRoom(room.clone())],
        "held, not refused; the room's state is fetched in case sync never shows it"
    );
    assert_eq!(
        r.poll_timeout(),
        Some(t0 + Duration::from_secs(1)),
        "housekeeping first"
    );
    // An unrelated room update re-checks but keeps holding.
    r.handle_joined_room(
        &room,
        &[join_event("@dave:localhost")],
        &[],
        false,
        t0 + Duration::from_secs(1),
    );
    assert!(drain(&mut r).is_empty());
    r.handle_joined_room(
        &room,
        &[],
        &[alice_member_entry("new-session")],
        false,
        t0 + Duration::from_secs(2),
    );
    let outs = drain(&mut r);
    assert!(sends(&outs).is_empty(), "no hangup: {outs:?}");
    match events(&outs).as_slice() {
        [LegEvent::Invite { leg, .. }] => assert_eq!(leg.session_id.as_str(), "new-session"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        r.metrics()
            .refused
            .with_label_values(&["session_mismatch"])
            .get(),
        0
    );
}

#[test]
fn held_invite_is_refused_when_the_grace_runs_out() {
    let (mut r, t0, _) = with_grace(FIXTURE_NOW);
    let mut e = alice_invite();
    e["sender"] = json!("@mallory:localhost");
    r.handle_to_device(e, t0);
    assert!(matches!(drain(&mut r).as_slice(), [Output::RefreshRoom(_)]));
    let mut due = r.poll_timeout().unwrap();
    while due < t0 + Duration::from_secs(3) {
        r.handle_timeout(due);
        assert!(drain(&mut r).is_empty(), "still held at {:?}", due - t0);
        due = r.poll_timeout().unwrap();
    }
    assert_eq!(due, t0 + Duration::from_secs(3));
    r.handle_timeout(due);
    assert_refused_hangup(
        &drain(&mut r),
        "not_in_room",
        "@mallory:localhost",
        ALICE_SESSION,
    );
    assert_eq!(r.metrics().refused_count(RefuseReason::NotInRoom), 1);
}

#[test]
fn refusals_no_state_can_fix_are_immediate_and_holds_are_bounded() {
    let (mut r, t0, _) = with_grace(FIXTURE_NOW);
    r.cfg.allowed_servers = vec!["example.org".into()];
    r.handle_to_device(alice_invite(), t0);
    assert_refused_hangup(&drain(&mut r), "server_not_allowed", ALICE, ALICE_SESSION);

    let (mut r, t0, _) = with_grace(FIXTURE_NOW);
    for i in 0..MAX_HELD_PER_DEVICE + 1 {
        let mut e = alice_invite();
        e["sender"] = json!("@mallory:localhost");
        e["content"]["call_id"] = json!(format!("m{i}"));
        r.handle_to_device(e, t0);
    }
    let outs = drain(&mut r);
    assert_eq!(
        sends(&outs).len(),
        1,
        "only the invite over the hold cap is refused at once"
    );
}

#[test]
fn hangup_of_a_held_invite_cancels_it() {
    let (mut r, t0, room) = with_grace(FIXTURE_NOW);
    let mut invite = alice_invite();
    invite["content"]["sender_session_id"] = json!("new-session");
    r.handle_to_device(invite, t0);
    assert!(matches!(drain(&mut r).as_slice(), [Output::RefreshRoom(_)]));
    let mut hangup = alice("m.call.hangup", json!({"reason": "user_hangup"}));
    hangup["content"]["sender_session_id"] = json!("new-session");
    r.handle_to_device(hangup, t0);
    r.handle_joined_room(&room, &[], &[alice_member_entry("new-session")], false, t0);
    let outs = drain(&mut r);
    assert!(outs.is_empty(), "no leg for a hung-up call: {outs:?}");
    assert_eq!(r.legs().count(), 0);
    assert_eq!(r.metrics().dropped_count(DropReason::UnknownCall), 0);
}

/// Replaces one randomly chosen value somewhere inside `v` with garbage (or removes it).
fn mutate(v: &mut Value, rng: &mut rand::rngs::StdRng) {
    use rand::Rng;
    let garbage = |rng: &mut rand::rngs::StdRng| match rng.random_range(0..9) {
        0 => Value::Null,
        1 => json!(rng.random::<i64>()),
        2 => json!(-1.5),
        3 => json!("x".repeat(rng.random_range(0..300_000))),
        4 => json!([1, "two", null]),
        5 => json!({"nested": {"deeper": [{}]}}),
        6 => json!(true),
        7 => json!(""),
        _ => json!("\u{0}\u{feff}🎉"),
    };
    let descend = rng.random_range(0..3) > 0;
    match v {
        Value::Object(m) if !m.is_empty() => {
            let keys: Vec<String> = m.keys().cloned().collect();
            let k = keys[rng.random_range(0..keys.len())].clone();
            if descend && matches!(m[&k], Value::Object(_) | Value::Array(_)) {
                mutate(m.get_mut(&k).unwrap(), rng);
            } else if rng.random_range(0..4) == 0 {
                m.remove(&k);
            } else {
                let g = garbage(rng);
                m.insert(k, g);
            }
        }
        Value::Array(a) if !a.is_empty() => {
            let i = rng.random_range(0..a.len());
            if descend && matches!(a[i], Value::Object(_) | Value::Array(_)) {
                mutate(&mut a[i], rng);
            } else {
                a[i] = garbage(rng);
            }
        }
        other => *other = garbage(rng),
    }
}

/// Thousands of randomly damaged real events from other users: no panic, every one either
/// dropped with a reason, refused, or delivered for its own sender; Alice's call is untouched.
#[test]
fn damaged_fixture_events_never_panic_or_touch_another_call() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5EED_0001);
    let mut seeds: Vec<Value> = sent_to_focus("focus-emulated-basic")
        .into_iter()
        .filter(|e| e["sender"] != ALICE)
        .collect();
    for name in ["focus-emulated-leave", "focus-emulated-mute"] {
        for mut e in sent_to_focus(name) {
            e["content"]["dest_session_id"] = json!(FOCUS_SESSION);
            seeds.push(e);
        }
    }
    let (mut r, t0, _) = router_at(FIXTURE_NOW);
    let leg = open_alice_leg(&mut r, t0);
    for i in 0..3000u32 {
        let mut e = seeds[rng.random_range(0..seeds.len())].clone();
        for _ in 0..rng.random_range(1..4) {
            mutate(&mut e, &mut rng);
        }
        let now = t0 + Duration::from_millis(u64::from(i));
        if rng.random_range(0..10) == 0 {
            let text = e.to_string();
            let cut = rng.random_range(0..text.len().max(1));
            r.handle_to_device_json(text.get(..cut).unwrap_or("{"), now);
        } else {
            r.handle_to_device(e, now);
        }
        if let Some(due) = r.poll_timeout().filter(|d| *d <= now) {
            r.handle_timeout(due);
        }
        for out in drain(&mut r) {
            if let Output::Event(ev) = &out {
                assert_ne!(ev.leg().map(|l| &l.user_id), Some(&leg.user_id), "{ev:?}");
            }
            if let Output::Send(s) = &out {
                assert_ne!(s.to_user.as_str(), ALICE);
                assert!(s.content.get("seq").is_none());
            }
        }
        if i % 100 == 0 {
            r.handle_to_device(
                alice("m.call.candidates", json!({"candidates": [cand(i)]})),
                now,
            );
            let outs = drain(&mut r);
            assert!(
                matches!(events(&outs).as_slice(), [LegEvent::Candidates { leg: l, .. }] if *l == leg),
                "iteration {i}: {outs:?}"
            );
        }
    }
    assert!(r.legs().any(|l| *l == leg));
    let dropped: u64 = [
        "malformed",
        "wrong_session",
        "too_large",
        "bad_version",
        "unknown_type",
        "duplicate",
        "not_leg_owner",
        "conf_mismatch",
        "unknown_call",
        "flood",
    ]
    .iter()
    .map(|k| r.metrics().dropped.with_label_values(&[k]).get())
    .sum();
    assert!(
        dropped > 1000,
        "most damaged events are counted drops ({dropped})"
    );
}
