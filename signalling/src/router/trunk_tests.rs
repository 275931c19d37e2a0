//! Stories of two organisations' foci meeting in one conference: who is a focus, what a trunk
//! invite must prove, what a trunk's metadata may claim, and how weir dials.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::*;
use crate::metadata::StreamMetadata;
use crate::room::tests::join_event;

const ME: &str = "@focus:a.example";
const FAR: &str = "@focus:b.example";
const ALICE: &str = "@alice:a.example";
const BOB: &str = "@bob:b.example";
const CONF: &str = "conf-1";
const ROOM: &str = "!room:a.example";
const NOW: u64 = 1_800_000_000_000;

fn member(user: &str, device: &str, focus_user: &str, focus_device: &str) -> Value {
    json!({"type": "org.matrix.msc3401.call.member", "state_key": user, "sender": user,
    "content": {"m.calls": [{"m.call_id": CONF, "m.devices": [{
        "device_id": device, "session_id": "s", "expires_ts": NOW + 3_600_000, "feeds": [],
        "org.matrix.msc3898.foci.active": [{"user_id": focus_user, "device_id": focus_device}]
    }]}]}})
}

fn left(user: &str) -> Value {
    json!({"type": "org.matrix.msc3401.call.member", "state_key": user, "sender": user,
        "content": {"m.calls": []}})
}

fn call_state() -> Value {
    json!({"type": "org.matrix.msc3401.call", "state_key": CONF, "sender": ALICE,
        "content": {"m.intent": "m.room", "m.type": "m.video"}})
}

/// A router for focus A with Alice (on A) and Bob (on B, using focus B) in the call.
fn setup() -> (Router, Instant) {
    let t0 = Instant::now();
    let me = Identity {
        user_id: ME.try_into().unwrap(),
        device_id: "FA".into(),
        session_id: "sfu".into(),
    };
    let mut cfg = RouterConfig::new(me);
    cfg.auth_grace = Duration::ZERO;
    let mut r = Router::new(cfg, Metrics::unregistered().unwrap(), (t0, NOW));
    let state = vec![
        join_event(ME),
        join_event(FAR),
        join_event(ALICE),
        join_event(BOB),
        call_state(),
        member(ALICE, "AD", ME, "FA"),
        member(BOB, "BD", FAR, "FB"),
    ];
    r.handle_joined_room(&ROOM.try_into().unwrap(), &state, &[], true, t0);
    (r, t0)
}

fn drain(r: &mut Router) -> Vec<Output> {
    std::iter::from_fn(|| r.poll_output()).collect()
}

fn far_event(sender: &str, device: &str, ty: &str, call: &str, extra: Value) -> Value {
    let mut content = json!({"version": "1", "call_id": call, "party_id": device,
        "conf_id": CONF, "device_id": device, "sender_session_id": "far-sess",
        "dest_session_id": "sfu"});
    content
        .as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    json!({"sender": sender, "type": ty, "content": content})
}

/// A trunk leg weir dials to focus B.
fn far_leg(call: &str) -> Leg {
    Leg {
        room_id: ROOM.try_into().unwrap(),
        conf_id: CONF.into(),
        call_id: call.into(),
        user_id: FAR.try_into().unwrap(),
        device_id: "FB".into(),
        party_id: "FB".into(),
        session_id: "sfu".into(),
        trunk: true,
    }
}

fn stream(owner: &str, device: &str) -> Value {
    json!({"purpose": "m.usermedia", "user_id": owner, "device_id": device})
}

fn trunk_invite(sender: &str, device: &str, call: &str) -> Value {
    far_event(
        sender,
        device,
        "m.call.invite",
        call,
        json!({"offer": {"type": "offer", "sdp": "v=0\r\n"}, "lifetime": 60000,
        "sdp_stream_metadata": {
            "bob-stream": stream(BOB, "BD"),
            "fake-alice": stream(ALICE, "AD"),
        }}),
    )
}

fn foci_event(outs: &[Output]) -> Option<Vec<(String, String)>> {
    outs.iter().rev().find_map(|o| match o {
        Output::Event(LegEvent::Foci { foci, .. }) => Some(
            foci.iter()
                .map(|f| (f.user_id.to_string(), f.device_id.to_string()))
                .collect(),
        ),
        _ => None,
    })
}

#[test]
fn the_foci_of_a_conference_are_read_from_member_devices_and_follow_them() {
    let (mut r, t0) = setup();
    let outs = drain(&mut r);
    assert_eq!(
        foci_event(&outs).unwrap(),
        vec![(ME.into(), "FA".into()), (FAR.into(), "FB".into())]
    );
    // Nothing changed: nothing reported.
    r.handle_joined_room(&ROOM.try_into().unwrap(), &[], &[], false, t0);
    assert!(foci_event(&drain(&mut r)).is_none());
    // Bob leaves, as /sync shows it a second later. /sync can deliver an older event late, so
    // focus B stays reported until the room's own state confirms it: that state is asked for.
    let t1 = t0 + Duration::from_secs(1);
    r.handle_joined_room(&ROOM.try_into().unwrap(), &[left(BOB)], &[], false, t1);
    let outs = drain(&mut r);
    assert!(foci_event(&outs).is_none(), "not on /sync alone: {outs:?}");
    assert!(outs
        .iter()
        .any(|o| matches!(o, Output::RefreshRoom(room) if room.as_str() == ROOM)));
    // The room's state, read from the homeserver, confirms it.
    r.handle_room_state(&ROOM.try_into().unwrap(), &[left(BOB)], t1);
    assert_eq!(
        foci_event(&drain(&mut r)).unwrap(),
        vec![(ME.into(), "FA".into())]
    );
    // Alice's entry expires and no state read comes: the grace runs out, and the conference
    // has no foci left.
    let expiry = t0 + Duration::from_secs(3_601);
    r.handle_timeout(expiry);
    assert!(foci_event(&drain(&mut r)).is_none());
    r.handle_timeout(expiry + ABSENCE_GRACE);
    assert_eq!(foci_event(&drain(&mut r)).unwrap(), vec![]);
}

#[test]
fn a_member_that_sync_shows_gone_but_the_room_state_keeps_is_not_dropped() {
    // A late, older event in /sync (Bob's invite after his join) makes him look gone; the
    // room's state says he is joined: his focus's trunk, and the foci, stay.
    let (mut r, t0) = setup();
    r.handle_to_device(trunk_invite(FAR, "FB", "trunk-1"), t0);
    drain(&mut r);
    let t1 = t0 + Duration::from_secs(1);
    let invite = json!({"type": "m.room.member", "state_key": BOB, "sender": ALICE,
        "content": {"membership": "invite"}});
    r.handle_joined_room(&ROOM.try_into().unwrap(), &[], &[invite], false, t1);
    let outs = drain(&mut r);
    assert!(
        !outs.iter().any(|o| matches!(o, Output::Event(_))),
        "nothing acted on yet: {outs:?}"
    );
    r.handle_room_state(&ROOM.try_into().unwrap(), &[join_event(BOB)], t1);
    r.handle_timeout(t1 + ABSENCE_GRACE * 2);
    let outs = drain(&mut r);
    assert!(
        !outs.iter().any(|o| matches!(o, Output::Event(_))),
        "still nothing to act on: {outs:?}"
    );
    assert_eq!(r.legs().count(), 1);
}

#[test]
fn a_named_focus_opens_a_trunk_whose_metadata_keeps_only_owners_it_serves() {
    let (mut r, t0) = setup();
    drain(&mut r);
    r.handle_to_device(trunk_invite(FAR, "FB", "trunk-1"), t0);
    let outs = drain(&mut r);
    let Some(Output::Event(LegEvent::Invite { leg, metadata, .. })) = outs.first() else {
        panic!("{outs:?}")
    };
    assert!(leg.trunk);
    assert_eq!(leg.user_id.as_str(), FAR);
    let bob = &metadata[&crate::StreamId::from("bob-stream")];
    assert_eq!(
        bob.user_id.as_ref().unwrap().as_str(),
        BOB,
        "the real owner crosses"
    );
    assert_eq!(bob.device_id.as_ref().unwrap().as_str(), "BD");
    assert!(
        !metadata.contains_key(&crate::StreamId::from("fake-alice")),
        "focus B cannot speak for Alice, who uses focus A"
    );
    assert_eq!(r.metrics().dropped_count(DropReason::ForeignOwner), 1);

    // Bob leaves the call: the trunk's reason to exist is gone, the leg with it.
    r.handle_joined_room(&ROOM.try_into().unwrap(), &[left(BOB)], &[], false, t0);
    let outs = drain(&mut r);
    assert!(outs.iter().any(|o| matches!(o,
        Output::Event(LegEvent::MemberGone { user_id, .. }) if user_id.as_str() == FAR)));
    assert_eq!(r.legs().count(), 0);
}

#[test]
fn hostile_trunk_invites_are_refused_like_unauthorised_callers() {
    let (mut r, t0) = setup();
    drain(&mut r);
    // A device of the far focus's user that nobody names.
    r.handle_to_device(trunk_invite(FAR, "EVIL", "t-1"), t0);
    // A user that is not in the room at all.
    r.handle_to_device(trunk_invite("@mallory:c.example", "FB", "t-2"), t0);
    let outs = drain(&mut r);
    let rejects: Vec<(String, String)> = outs
        .iter()
        .filter_map(|o| match o {
            Output::Send(s) if s.event_type == "m.call.reject" => Some((
                s.to_user.to_string(),
                s.content["reason"].as_str().unwrap().to_string(),
            )),
            Output::Event(e) => panic!("nothing may reach the focus: {e:?}"),
            _ => None,
        })
        .collect();
    assert_eq!(
        rejects,
        vec![
            (FAR.to_string(), "no_member_device".to_string()),
            ("@mallory:c.example".to_string(), "not_in_room".to_string()),
        ]
    );
    assert_eq!(r.legs().count(), 0);
}

#[test]
fn allowed_servers_do_not_stop_trunks() {
    let (mut r, t0) = setup();
    r.cfg.allowed_servers = vec!["a.example".into()];
    drain(&mut r);
    r.handle_to_device(trunk_invite(FAR, "FB", "trunk-1"), t0);
    let outs = drain(&mut r);
    assert!(matches!(outs.first(), Some(Output::Event(LegEvent::Invite { leg, .. })) if leg.trunk));
}

#[test]
fn weir_dials_a_focus_and_only_that_focus_can_answer() {
    let (mut r, t0) = setup();
    drain(&mut r);
    let leg = far_leg("dial-1");
    r.handle_command(
        LegCommand::Invite {
            leg: leg.clone(),
            sdp: "v=0\r\noffer".into(),
            metadata: [("alice-stream".into(), StreamMetadata::new("m.usermedia"))].into(),
        },
        t0,
    );
    let outs = drain(&mut r);
    let [Output::Send(s)] = outs.as_slice() else {
        panic!("{outs:?}")
    };
    assert_eq!(s.event_type, "m.call.invite");
    assert_eq!((s.to_user.as_str(), s.to_device.as_str()), (FAR, "FB"));
    assert_eq!(s.content["offer"]["sdp"], "v=0\r\noffer");
    assert_eq!(s.content["dest_session_id"], "sfu");
    assert_eq!(s.content["lifetime"], TRUNK_INVITE_LIFETIME_MS);
    assert!(s.content["sdp_stream_metadata"]["alice-stream"].is_object());

    let answer = |sender: &str, device: &str| {
        far_event(
            sender,
            device,
            "m.call.answer",
            "dial-1",
            json!({"answer": {"type": "answer", "sdp": "v=0\r\nanswer"},
                "sdp_stream_metadata": {"bob-stream": stream(BOB, "BD")}}),
        )
    };
    // Someone else answering our call is not the far focus.
    r.handle_to_device(answer(BOB, "BD"), t0);
    assert!(drain(&mut r).iter().all(|o| !matches!(o, Output::Event(_))));
    assert_eq!(r.metrics().dropped_count(DropReason::NotLegOwner), 1);
    r.handle_to_device(answer(FAR, "FB"), t0);
    let outs = drain(&mut r);
    let [Output::Event(LegEvent::Answer {
        leg: l,
        sdp,
        metadata,
    })] = outs.as_slice()
    else {
        panic!("{outs:?}")
    };
    assert_eq!(l, &leg);
    assert_eq!(sdp, "v=0\r\nanswer");
    assert!(metadata.contains_key(&crate::StreamId::from("bob-stream")));
    // A second answer is a duplicate.
    r.handle_to_device(answer(FAR, "FB"), t0);
    assert!(drain(&mut r).is_empty());
}

#[test]
fn an_unanswered_dial_is_dropped_after_its_lifetime() {
    let (mut r, t0) = setup();
    drain(&mut r);
    let leg = far_leg("dial-2");
    r.handle_command(
        LegCommand::Invite {
            leg,
            sdp: "v=0\r\n".into(),
            metadata: Default::default(),
        },
        t0,
    );
    drain(&mut r);
    r.handle_timeout(t0 + Duration::from_millis(TRUNK_INVITE_LIFETIME_MS / 2));
    assert_eq!(r.legs().count(), 1);
    r.handle_timeout(t0 + Duration::from_millis(TRUNK_INVITE_LIFETIME_MS + 1_000));
    let outs = drain(&mut r);
    assert!(outs.iter().any(|o| matches!(o,
        Output::Event(LegEvent::MemberGone { user_id, .. }) if user_id.as_str() == FAR)));
    assert_eq!(r.legs().count(), 0);
}

#[test]
fn rooms_with_a_call_have_their_state_reread_periodically() {
    // Federation can change state without a timeline event (a far focus's join resolved in):
    // the periodic re-read is what finds it.
    let (mut r, t0) = setup();
    drain(&mut r);
    let refreshes = |outs: &[Output]| {
        outs.iter()
            .filter(|o| matches!(o, Output::RefreshRoom(room) if room.as_str() == ROOM))
            .count()
    };
    r.handle_timeout(t0 + Duration::from_secs(1));
    assert_eq!(refreshes(&drain(&mut r)), 1);
    r.handle_timeout(t0 + Duration::from_secs(6));
    assert_eq!(
        refreshes(&drain(&mut r)),
        0,
        "not again before the interval"
    );
    r.handle_timeout(t0 + Duration::from_secs(12));
    assert_eq!(refreshes(&drain(&mut r)), 1);
    // What a re-read brings is applied like any state: a focus that joined unseen appears.
    let late = focus_joining_late();
    r.handle_joined_room(
        &ROOM.try_into().unwrap(),
        &late,
        &[],
        false,
        t0 + Duration::from_secs(12),
    );
    assert_eq!(
        foci_event(&drain(&mut r)).unwrap(),
        vec![
            (ME.into(), "FA".into()),
            (FAR.into(), "FB".into()),
            ("@focus:c.example".into(), "FC".into())
        ]
    );
}

fn focus_joining_late() -> Vec<Value> {
    vec![
        join_event("@focus:c.example"),
        join_event("@carol:c.example"),
        member("@carol:c.example", "CD", "@focus:c.example", "FC"),
    ]
}
