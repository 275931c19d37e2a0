//! Stories of the conductor's side of cascading, driven with recorded signalling and media
//! planes: who dials, what is pulled over a trunk, what the far focus is told, and redials.

use std::time::{Duration, Instant};

use weir_sfu::{CloseReason, Command, MediaId, PeerId, PublishedTrack, SfuEvent, TrackKind};
use weir_signalling::room::FocusRef;
use weir_signalling::{
    LegCommand, LegEvent, SdpStreamMetadata, StreamId, StreamMetadata, TrackId, TrackMetadata,
};

use super::tests::{join, leg, setup, Rec};
use super::Conductor;

const FAR: &str = "@focus:remote";

fn focus(user: &str, device: &str) -> FocusRef {
    FocusRef {
        user_id: user.try_into().unwrap(),
        device_id: device.into(),
        session_id: "far-session".into(),
    }
}

fn foci(c: &mut Conductor<Rec, Rec>, list: Vec<FocusRef>) {
    c.on_leg_event(LegEvent::Foci {
        room_id: "!room:hs".try_into().unwrap(),
        conf_id: "conf1".into(),
        foci: list,
    });
}

fn me() -> FocusRef {
    focus("@focus:hs", "FOCUSDEV")
}

/// Bob on the far side publishes audio and 720p video.
fn far_catalogue() -> SdpStreamMetadata {
    let mut bob = StreamMetadata::new("m.usermedia");
    bob.user_id = Some("@bob:remote".try_into().unwrap());
    bob.device_id = Some("BOBDEV".into());
    for (t, kind, h) in [
        ("bob-audio", "audio", None),
        ("bob-video", "video", Some(720)),
    ] {
        bob.tracks.insert(
            TrackId::from(t),
            TrackMetadata {
                kind: kind.into(),
                width: None,
                height: h,
            },
        );
    }
    [(StreamId::from("bob-stream"), bob)].into()
}

/// We dial the far focus, it answers with its catalogue, and the data channel opens.
fn dialled_trunk(c: &mut Conductor<Rec, Rec>, rec: &Rec) -> (PeerId, weir_signalling::Leg) {
    rec.take_legs();
    rec.take_media();
    foci(c, vec![me(), focus(FAR, "FARDEV")]);
    let peer = match rec.take_media().as_slice() {
        [Command::DialTrunk { peer, .. }] => *peer,
        other => panic!("expected one dial, got {other:?}"),
    };
    c.on_sfu_event(SfuEvent::TrunkOffer {
        peer,
        sdp: "trunk-offer".into(),
    });
    let trunk_leg = match rec.take_legs().as_slice() {
        [LegCommand::Invite { leg, sdp, .. }] => {
            assert_eq!(sdp, "trunk-offer");
            leg.clone()
        }
        other => panic!("expected the invite, got {other:?}"),
    };
    c.on_leg_event(LegEvent::Answer {
        leg: trunk_leg.clone(),
        sdp: "trunk-answer".into(),
        metadata: far_catalogue(),
    });
    assert!(rec
        .take_media()
        .iter()
        .any(|m| matches!(m, Command::RemoteAnswer { peer: p, sdp } if *p == peer && sdp == "trunk-answer")));
    c.on_sfu_event(SfuEvent::ChannelOpen { peer });
    (peer, trunk_leg)
}

/// The `m.call.track_subscription` content last sent on `peer`'s channel.
fn last_subscription(media: &[Command], peer: PeerId) -> Option<serde_json::Value> {
    media.iter().rev().find_map(|m| match m {
        Command::SendData { peer: p, text } if *p == peer => {
            let v: serde_json::Value = serde_json::from_str(text).unwrap();
            assert_eq!(v["type"], "m.call.track_subscription");
            Some(v["content"].clone())
        }
        _ => None,
    })
}

fn ids(list: &serde_json::Value) -> Vec<(String, Option<u64>)> {
    let mut v: Vec<(String, Option<u64>)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["track_id"].as_str().unwrap().to_string(),
                e["height"].as_u64(),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn the_lower_focus_dials_with_the_far_session_and_the_higher_waits() {
    let (mut c, rec) = setup();
    let alice = leg("@alice:hs", "A", "c1");
    join(&mut c, &rec, &alice, "alice-stream");
    rec.take_media();
    rec.take_legs();
    // A focus that sorts before us dials us: we wait.
    foci(&mut c, vec![focus("@focus:a.example", "X"), me()]);
    assert!(rec.take_media().is_empty());
    // One that sorts after us: we dial, with the session id its foci.active entry gave.
    foci(&mut c, vec![me(), focus(FAR, "FARDEV")]);
    let peer = match rec.take_media().as_slice() {
        [Command::DialTrunk { peer, .. }] => *peer,
        other => panic!("{other:?}"),
    };
    c.on_sfu_event(SfuEvent::TrunkOffer {
        peer,
        sdp: "o".into(),
    });
    let sent = rec.take_legs();
    let [LegCommand::Invite { leg, .. }] = sent.as_slice() else {
        panic!("{sent:?}")
    };
    assert!(leg.trunk);
    assert_eq!(
        (
            leg.user_id.as_str(),
            leg.device_id.as_str(),
            leg.session_id.as_str()
        ),
        (FAR, "FARDEV", "far-session")
    );
    // The same foci again: no second dial.
    foci(&mut c, vec![me(), focus(FAR, "FARDEV")]);
    assert!(rec.take_media().is_empty());
    assert_eq!(c.metrics.trunks.with_label_values(&["dialled"]).get(), 0);
}

#[test]
fn a_trunk_pulls_what_local_participants_watch_once_per_size_they_display() {
    let (mut c, rec) = setup();
    let alice = join(&mut c, &rec, &leg("@alice:hs", "A", "c1"), "alice-stream");
    let carol = join(&mut c, &rec, &leg("@carol:hs", "C", "c3"), "carol-stream");
    rec.take_media();
    let (trunk, _) = dialled_trunk(&mut c, &rec);
    // Nobody has subscribed explicitly: everyone watches everything, so both far tracks are
    // pulled, uncapped.
    let sub = last_subscription(&rec.take_media(), trunk).expect("a subscription on open");
    assert_eq!(
        ids(&sub["subscribe"]),
        vec![("bob-audio".into(), None), ("bob-video".into(), None)]
    );

    // Alice watches Bob's video small, Carol larger; nobody wants his audio any more.
    let subscribe = |c: &mut Conductor<Rec, Rec>, peer, h: u32| {
        c.on_sfu_event(SfuEvent::DataMessage {
            peer,
            text: format!(
                r#"{{"type":"m.call.track_subscription","content":{{"subscribe":[{{"stream_id":"bob-stream","track_id":"bob-video","height":{h}}}]}}}}"#
            ),
        });
    };
    subscribe(&mut c, alice, 180);
    let sub = last_subscription(&rec.take_media(), trunk).expect("re-sent on change");
    assert_eq!(
        ids(&sub["subscribe"]),
        vec![
            ("bob-audio".into(), None),
            ("bob-video".into(), None),
            ("bob-video".into(), Some(180))
        ],
        "carol still watches everything at full size, alice small: both sizes are pulled"
    );
    assert_eq!(ids(&sub["unsubscribe"]), vec![]);
    subscribe(&mut c, carol, 360);
    let sub = last_subscription(&rec.take_media(), trunk).expect("re-sent on change");
    assert_eq!(
        ids(&sub["subscribe"]),
        vec![
            ("bob-video".into(), Some(180)),
            ("bob-video".into(), Some(360))
        ]
    );
    assert_eq!(ids(&sub["unsubscribe"]), vec![("bob-audio".into(), None)]);
    // The same set again sends nothing.
    subscribe(&mut c, carol, 360);
    assert!(last_subscription(&rec.take_media(), trunk).is_none());

    // Carol leaves: the trunk asks only for Alice's size.
    c.end(carol, "participant_hangup", false);
    let sub = last_subscription(&rec.take_media(), trunk).expect("re-sent");
    assert_eq!(
        ids(&sub["subscribe"]),
        vec![("bob-video".into(), Some(180))]
    );
}

#[test]
fn the_far_focus_is_told_our_streams_with_their_real_owners_once_per_change() {
    let (mut c, rec) = setup();
    let alice = join(&mut c, &rec, &leg("@alice:hs", "A", "c1"), "alice-stream");
    let (_trunk, trunk_leg) = dialled_trunk(&mut c, &rec);
    rec.take_legs();
    let publish = |c: &mut Conductor<Rec, Rec>, mid: &str, kind, track: &str| {
        c.on_sfu_event(SfuEvent::TrackPublished {
            peer: alice,
            track: PublishedTrack {
                mid: MediaId(mid.into()),
                kind,
                stream_id: "alice-stream".into(),
                track_id: track.into(),
            },
        });
    };
    publish(&mut c, "0", TrackKind::Audio, "alice-audio");
    let sent = rec.take_legs();
    let [LegCommand::MetadataChanged { leg, metadata }] = sent.as_slice() else {
        panic!("{sent:?}")
    };
    assert_eq!(leg, &trunk_leg);
    let s = &metadata[&StreamId::from("alice-stream")];
    assert_eq!(s.user_id.as_ref().unwrap().as_str(), "@alice:hs");
    assert_eq!(s.device_id.as_ref().unwrap().as_str(), "A");
    assert!(s.tracks.contains_key(&TrackId::from("alice-audio")));
    // A second track changes the catalogue; publishing nothing new does not.
    publish(&mut c, "1", TrackKind::Video, "alice-video");
    assert_eq!(rec.take_legs().len(), 1);
    publish(&mut c, "1", TrackKind::Video, "alice-video");
    assert!(rec.take_legs().is_empty());
}

#[test]
fn a_lost_trunk_is_redialled_with_backoff_and_dropped_when_the_far_focus_leaves() {
    let (mut c, rec) = setup();
    join(&mut c, &rec, &leg("@alice:hs", "A", "c1"), "alice-stream");
    rec.take_media();
    let (trunk, _) = dialled_trunk(&mut c, &rec);
    rec.take_media();
    rec.take_legs();
    let t0 = Instant::now();
    c.on_sfu_event(SfuEvent::PeerClosed {
        peer: trunk,
        reason: CloseReason::Silent,
    });
    assert!(
        matches!(rec.take_legs().as_slice(), [LegCommand::Hangup { .. }]),
        "the far focus is told"
    );
    c.tick(t0);
    assert!(rec.take_media().is_empty(), "not before the backoff");
    c.tick(t0 + Duration::from_millis(1_100));
    assert!(
        matches!(rec.take_media().as_slice(), [Command::DialTrunk { .. }]),
        "redialled after about a second"
    );
    assert_eq!(
        c.metrics.trunk_dials.with_label_values(&["redial"]).get(),
        1
    );
    // The far focus stops serving the conference: the new trunk is hung up and no redial.
    rec.take_legs();
    foci(&mut c, vec![me()]);
    assert!(rec
        .take_legs()
        .iter()
        .any(|l| matches!(l, LegCommand::Hangup { leg, .. } if leg.trunk)));
    c.tick(t0 + Duration::from_secs(60));
    assert!(!rec
        .take_media()
        .iter()
        .any(|m| matches!(m, Command::DialTrunk { .. })));
}

#[test]
fn a_far_focus_cannot_be_made_the_owner_of_its_streams() {
    let (mut c, rec) = setup();
    join(&mut c, &rec, &leg("@alice:hs", "A", "c1"), "alice-stream");
    let (trunk, _) = dialled_trunk(&mut c, &rec);
    // A track arrives on the trunk before anything describes it: it is not described as the
    // focus's own stream.
    c.on_sfu_event(SfuEvent::TrackPublished {
        peer: trunk,
        track: PublishedTrack {
            mid: MediaId("7".into()),
            kind: TrackKind::Video,
            stream_id: "unknown-stream".into(),
            track_id: "v".into(),
        },
    });
    let md = &c.participants[&trunk].metadata;
    assert!(md.contains_key(&StreamId::from("bob-stream")));
    assert!(!md.contains_key(&StreamId::from("unknown-stream")));
    assert_eq!(c.metrics.trunk_tracks.with_label_values(&["in"]).get(), 1);
}
