//! The conductor driven with recorded signalling and media planes: no network, no clock.

use std::cell::RefCell;
use std::rc::Rc;

use weir_sfu::{CloseReason, MediaId, PublishedTrack, SfuEvent, TrackKind};
use weir_signalling::{StreamId, TrackId, TrackMetadata};

use super::*;

#[derive(Clone, Default)]
pub(super) struct Rec {
    legs: Rc<RefCell<Vec<LegCommand>>>,
    media: Rc<RefCell<Vec<Command>>>,
}

impl LegSender for Rec {
    fn send(&self, cmd: LegCommand) {
        self.legs.borrow_mut().push(cmd);
    }
}

impl MediaPlane for Rec {
    fn command(&self, cmd: Command) -> Result<(), String> {
        self.media.borrow_mut().push(cmd);
        Ok(())
    }
    fn forget(&self, _: PeerId) {}
}

impl Rec {
    pub(super) fn take_legs(&self) -> Vec<LegCommand> {
        std::mem::take(&mut self.legs.borrow_mut())
    }
    pub(super) fn take_media(&self) -> Vec<Command> {
        std::mem::take(&mut self.media.borrow_mut())
    }
}

pub(super) fn leg(user: &str, device: &str, call: &str) -> Leg {
    Leg {
        room_id: "!room:hs".try_into().unwrap(),
        conf_id: "conf1".into(),
        call_id: call.into(),
        user_id: user.try_into().unwrap(),
        device_id: device.into(),
        party_id: device.into(),
        session_id: "sess".into(),
        trunk: false,
    }
}

pub(super) fn setup() -> (Conductor<Rec, Rec>, Rec) {
    let rec = Rec::default();
    let c = Conductor::new(
        rec.clone(),
        rec.clone(),
        Arc::new(Metrics::new()),
        "@focus:hs".try_into().unwrap(),
        "FOCUSDEV".into(),
    );
    (c, rec)
}

pub(super) fn join(c: &mut Conductor<Rec, Rec>, rec: &Rec, l: &Leg, stream: &str) -> PeerId {
    let mut md = SdpStreamMetadata::new();
    // A client may claim someone else owns its stream; the owner must end up as itself.
    let mut claimed = StreamMetadata::new("m.usermedia");
    claimed.user_id = Some("@mallory:hs".try_into().unwrap());
    md.insert(stream.into(), claimed);
    c.on_leg_event(LegEvent::Invite {
        leg: l.clone(),
        sdp: "offer".into(),
        metadata: md,
        lifetime_ms: None,
    });
    let peer = match rec.take_media().pop() {
        Some(Command::CreatePeer { peer, offer, .. }) => {
            assert_eq!(offer, "offer");
            peer
        }
        other => panic!("expected CreatePeer, got {other:?}"),
    };
    c.on_sfu_event(SfuEvent::PeerCreated {
        peer,
        answer: "answer".into(),
        candidates: vec![LocalCandidate {
            candidate: "candidate:1 1 udp 1 127.0.0.1 5000 typ host".into(),
            sdp_mid: "0".into(),
            sdp_m_line_index: 0,
        }],
    });
    peer
}

#[test]
fn an_invite_is_answered_with_metadata_then_candidates_ending_in_the_empty_one() {
    let (mut c, rec) = setup();
    let alice = leg("@alice:hs", "A", "c1");
    join(&mut c, &rec, &alice, "alice-stream");
    let sent = rec.take_legs();
    assert!(
        matches!(&sent[0], LegCommand::Answer { sdp, metadata, leg } if sdp == "answer" && metadata.is_empty() && *leg == alice)
    );
    match &sent[1] {
        LegCommand::Candidates { candidates, .. } => {
            assert_eq!(candidates.len(), 2);
            assert_eq!(candidates[0].sdp_mid.as_deref(), Some("0"));
            assert!(candidates[1].is_end_of_candidates());
        }
        other => panic!("expected candidates, got {other:?}"),
    }
    assert_eq!(c.participant_count(), 1);
    assert_eq!(c.metrics.invite_to_answer.get_sample_count(), 1);
}

#[test]
fn offers_describe_every_forwarded_stream_with_its_authenticated_owner_and_mute_is_relayed() {
    let (mut c, rec) = setup();
    let alice = leg("@alice:hs", "A", "c1");
    let bob = leg("@bob:hs", "B", "c2");
    let pa = join(&mut c, &rec, &alice, "alice-stream");
    let pb = join(&mut c, &rec, &bob, "bob-stream");
    rec.take_legs();
    c.on_sfu_event(SfuEvent::TrackPublished {
        peer: pa,
        track: PublishedTrack {
            mid: MediaId("0".into()),
            kind: TrackKind::Audio,
            stream_id: "alice-stream".into(),
            track_id: "a-audio".into(),
        },
    });
    c.on_sfu_event(SfuEvent::Offer {
        peer: pb,
        sdp: "offer-to-bob".into(),
        tracks: vec![ForwardedTrack {
            publisher: pa,
            kind: TrackKind::Audio,
            stream_id: "alice-stream".into(),
            track_id: "a-audio".into(),
        }],
    });
    let sent = rec.take_legs();
    let LegCommand::Negotiate {
        leg,
        kind,
        sdp,
        metadata,
    } = &sent[0]
    else {
        panic!("{sent:?}")
    };
    assert_eq!(
        (leg, *kind, sdp.as_str()),
        (&bob, SdpType::Offer, "offer-to-bob")
    );
    let m = &metadata[&StreamId::from("alice-stream")];
    assert_eq!(m.user_id.as_ref().map(|u| u.as_str()), Some("@alice:hs"));
    assert_eq!(m.device_id.as_ref().map(|d| d.as_str()), Some("A"));
    assert_eq!(m.tracks[&TrackId::from("a-audio")].kind, "audio");

    // Bob answers; the answer goes to the media plane for Bob's peer.
    c.on_leg_event(LegEvent::Negotiate {
        leg: bob.clone(),
        kind: SdpType::Answer,
        sdp: "bob-answer".into(),
        metadata: None,
    });
    assert!(
        matches!(rec.take_media().as_slice(), [Command::RemoteAnswer { peer, sdp }] if *peer == pb && sdp == "bob-answer")
    );

    // Alice mutes: Bob, who receives her stream, is told; Alice is not.
    let mut md = SdpStreamMetadata::new();
    let mut muted = StreamMetadata::new("m.usermedia");
    muted.audio_muted = true;
    md.insert("alice-stream".into(), muted);
    c.on_leg_event(LegEvent::MetadataChanged {
        leg: alice.clone(),
        metadata: md.clone(),
    });
    let sent = rec.take_legs();
    assert_eq!(sent.len(), 1, "{sent:?}");
    let LegCommand::MetadataChanged { leg, metadata } = &sent[0] else {
        panic!("{sent:?}")
    };
    assert_eq!(leg, &bob);
    let m = &metadata[&StreamId::from("alice-stream")];
    assert!(m.audio_muted);
    assert_eq!(m.user_id.as_ref().map(|u| u.as_str()), Some("@alice:hs"));
    // The same state again is not relayed twice.
    c.on_leg_event(LegEvent::MetadataChanged {
        leg: alice,
        metadata: md,
    });
    assert!(rec.take_legs().is_empty());
}

#[test]
fn a_new_call_from_the_same_device_replaces_the_old_leg() {
    let (mut c, rec) = setup();
    let old = leg("@alice:hs", "A", "c1");
    let p1 = join(&mut c, &rec, &old, "s1");
    rec.take_legs();
    let new = leg("@alice:hs", "A", "c9");
    c.on_leg_event(LegEvent::Invite {
        leg: new.clone(),
        sdp: "offer".into(),
        metadata: SdpStreamMetadata::new(),
        lifetime_ms: None,
    });
    let media = rec.take_media();
    assert!(matches!(&media[0], Command::ClosePeer { peer } if *peer == p1));
    assert!(matches!(&media[1], Command::CreatePeer { peer, .. } if *peer != p1));
    let legs = rec.take_legs();
    assert!(
        matches!(&legs[..], [LegCommand::Hangup { leg, reason }] if *leg == old && reason == "replaced")
    );
    assert_eq!(c.participant_count(), 1);
}

#[test]
fn the_same_call_offered_again_is_a_renegotiation_not_a_second_participant() {
    let (mut c, rec) = setup();
    let alice = leg("@alice:hs", "A", "c1");
    let p = join(&mut c, &rec, &alice, "s1");
    rec.take_legs();
    c.on_leg_event(LegEvent::Invite {
        leg: alice,
        sdp: "offer2".into(),
        metadata: SdpStreamMetadata::new(),
        lifetime_ms: None,
    });
    assert!(
        matches!(rec.take_media().as_slice(), [Command::RemoteOffer { peer, sdp }] if *peer == p && sdp == "offer2")
    );
    assert_eq!(c.participant_count(), 1);
}

#[test]
fn hangups_and_media_failures_end_only_that_leg() {
    let (mut c, rec) = setup();
    let alice = leg("@alice:hs", "A", "c1");
    let bob = leg("@bob:hs", "B", "c2");
    let carol = leg("@carol:hs", "C", "c3");
    let pa = join(&mut c, &rec, &alice, "sa");
    let pb = join(&mut c, &rec, &bob, "sb");
    let pc = join(&mut c, &rec, &carol, "sc");
    rec.take_legs();
    rec.take_media();

    // Alice hangs up: her peer closes; nothing is sent back to her.
    c.on_leg_event(LegEvent::Hangup {
        leg: alice.clone(),
        reason: "user_hangup".into(),
    });
    assert!(matches!(rec.take_media().as_slice(), [Command::ClosePeer { peer }] if *peer == pa));
    assert!(rec.take_legs().is_empty());
    // A late event for her old call is ignored.
    c.on_leg_event(LegEvent::Negotiate {
        leg: alice,
        kind: SdpType::Answer,
        sdp: "x".into(),
        metadata: None,
    });
    assert!(rec.take_media().is_empty());

    // Bob goes silent: the media plane closed him, we hang up on him.
    c.on_sfu_event(SfuEvent::PeerClosed {
        peer: pb,
        reason: CloseReason::Silent,
    });
    assert!(
        matches!(rec.take_legs().as_slice(), [LegCommand::Hangup { leg, reason }] if *leg == bob && reason == "ice_timeout")
    );

    // Carol's offer was unusable: hang up with a reason.
    c.on_sfu_event(SfuEvent::PeerFailed {
        peer: pc,
        error: "bad".into(),
    });
    assert!(
        matches!(rec.take_legs().as_slice(), [LegCommand::Hangup { leg, reason }] if *leg == carol && reason == "unknown_error")
    );
    assert_eq!(c.participant_count(), 0);
    assert!(c.conferences.is_empty(), "the empty conference is freed");
}

#[test]
fn select_answer_for_another_party_drops_the_leg() {
    let (mut c, rec) = setup();
    let alice = leg("@alice:hs", "A", "c1");
    join(&mut c, &rec, &alice, "s");
    rec.take_legs();
    c.on_leg_event(LegEvent::SelectAnswer {
        leg: alice.clone(),
        selected_party_id: "FOCUSDEV".into(),
    });
    assert_eq!(c.participant_count(), 1);
    c.on_leg_event(LegEvent::SelectAnswer {
        leg: alice,
        selected_party_id: "OTHER".into(),
    });
    assert_eq!(c.participant_count(), 0);
}

/// Alice calls, describing her camera track `a-video` in `alice-stream` as 1280x720.
fn alice_invites_with_a_720p_camera(c: &mut Conductor<Rec, Rec>) {
    let mut md = SdpStreamMetadata::new();
    let mut cam = StreamMetadata::new("m.usermedia");
    cam.tracks.insert(
        "a-video".into(),
        TrackMetadata {
            kind: "video".into(),
            width: Some(1280),
            height: Some(720),
        },
    );
    md.insert("alice-stream".into(), cam);
    c.on_leg_event(LegEvent::Invite {
        leg: leg("@alice:hs", "A", "c1"),
        sdp: "o".into(),
        metadata: md,
        lifetime_ms: None,
    });
}

#[test]
fn speakers_are_announced_to_participants_with_an_open_channel_and_counted() {
    let (mut c, rec) = setup();
    let pa = join(&mut c, &rec, &leg("@alice:hs", "A", "c1"), "alice-stream");
    let pb = join(&mut c, &rec, &leg("@bob:hs", "B", "c2"), "bob-stream");
    let _pc = join(&mut c, &rec, &leg("@carol:hs", "C", "c3"), "carol-stream");
    for p in [pa, pb] {
        c.on_sfu_event(SfuEvent::ChannelOpen { peer: p });
    }
    rec.take_media();
    let conference = c.conferences.values().next().unwrap().id;
    let alice = weir_sfu::AudioSource {
        publisher: pa,
        stream_id: "alice-stream".into(),
    };
    c.on_sfu_event(SfuEvent::Speakers {
        conference,
        dominant: Some(alice.clone()),
        speaking: vec![alice.clone()],
    });
    let sent = rec.take_media();
    let mut to: Vec<PeerId> = sent
        .iter()
        .map(|m| match m {
            Command::SendData { peer, text } => {
                let v: serde_json::Value = serde_json::from_str(text).unwrap();
                assert_eq!(v["type"], "io.weir.speakers");
                let who = &v["content"]["dominant"];
                assert_eq!(
                    (&who["user_id"], &who["device_id"], &who["stream_id"]),
                    (&"@alice:hs".into(), &"A".into(), &"alice-stream".into())
                );
                assert_eq!(v["content"]["speaking"].as_array().unwrap().len(), 1);
                *peer
            }
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    to.sort();
    assert_eq!(
        to,
        vec![pa, pb],
        "Carol's channel is not open: nothing for her"
    );
    assert_eq!(c.metrics.speaker_changes.get(), 1);
    assert_eq!(c.metrics.speaking.get(), 1);
    // Alice stops: nobody speaks, she stays dominant; not a change of speaker.
    c.on_sfu_event(SfuEvent::Speakers {
        conference,
        dominant: Some(alice),
        speaking: vec![],
    });
    assert_eq!(c.metrics.speaker_changes.get(), 1);
    assert_eq!(c.metrics.speaking.get(), 0);
}

#[test]
fn the_size_a_publisher_announces_survives_its_track_being_published() {
    let (mut c, rec) = setup();
    alice_invites_with_a_720p_camera(&mut c);
    let Some(Command::CreatePeer { peer, .. }) = rec.take_media().pop() else {
        panic!("no CreatePeer")
    };
    c.on_sfu_event(SfuEvent::TrackPublished {
        peer,
        track: PublishedTrack {
            mid: MediaId("1".into()),
            kind: TrackKind::Video,
            stream_id: "alice-stream".into(),
            track_id: "a-video".into(),
        },
    });
    assert_eq!(c.source_height("alice-stream", "a-video"), Some(720));
    let p = &c.participants[&peer];
    let t = &p.metadata[&StreamId::from("alice-stream")].tracks[&TrackId::from("a-video")];
    assert_eq!((t.width, t.height), (Some(1280), Some(720)));
}

#[test]
fn a_track_subscription_becomes_the_subscribers_whole_set_with_sizes() {
    let (mut c, rec) = setup();
    let bob = leg("@bob:hs", "B", "c2");
    alice_invites_with_a_720p_camera(&mut c);
    let pb = join(&mut c, &rec, &bob, "bob-stream");
    rec.take_media();
    let msg = |sub: &str, unsub: &str| {
        format!(
            r#"{{"type":"m.call.track_subscription","content":{{"subscribe":[{sub}],"unsubscribe":[{unsub}]}}}}"#
        )
    };
    c.on_sfu_event(SfuEvent::DataMessage {
        peer: pb,
        text: msg(
            r#"{"stream_id":"alice-stream","track_id":"a-video","width":320,"height":180},{"stream_id":"alice-stream","track_id":"a-audio"}"#,
            "",
        ),
    });
    let Some(Command::Subscribe {
        peer,
        subscriptions,
    }) = rec.take_media().pop()
    else {
        panic!("no subscribe")
    };
    assert_eq!(peer, pb);
    assert_eq!(subscriptions.len(), 2);
    let video = subscriptions
        .iter()
        .find(|s| s.track_id == "a-video")
        .unwrap();
    assert_eq!(
        (video.max_height, video.source_height),
        (Some(180), Some(720))
    );
    // A later message is applied as a delta: unsubscribing audio leaves the video.
    c.on_sfu_event(SfuEvent::DataMessage {
        peer: pb,
        text: msg("", r#"{"stream_id":"alice-stream","track_id":"a-audio"}"#),
    });
    let Some(Command::Subscribe { subscriptions, .. }) = rec.take_media().pop() else {
        panic!("no subscribe")
    };
    assert_eq!(subscriptions.len(), 1);
    assert_eq!(subscriptions[0].track_id, "a-video");
    // Several sizes of one track in one message (what a far focus sends) are all kept,
    // and replace the earlier size.
    c.on_sfu_event(SfuEvent::DataMessage {
        peer: pb,
        text: msg(
            r#"{"stream_id":"alice-stream","track_id":"a-video","height":180},{"stream_id":"alice-stream","track_id":"a-video","height":720},{"stream_id":"alice-stream","track_id":"a-video","height":720}"#,
            "",
        ),
    });
    let Some(Command::Subscribe { subscriptions, .. }) = rec.take_media().pop() else {
        panic!("no subscribe")
    };
    let mut heights: Vec<_> = subscriptions.iter().map(|s| s.max_height).collect();
    heights.sort();
    assert_eq!(heights, vec![Some(180), Some(720)]);
}

#[test]
fn data_channel_ping_is_answered_and_garbage_is_only_counted() {
    let (mut c, rec) = setup();
    let p = join(&mut c, &rec, &leg("@a:hs", "A", "1"), "s");
    rec.take_media();
    c.on_sfu_event(SfuEvent::DataMessage {
        peer: p,
        text: r#"{"type":"m.call.ping","content":{}}"#.into(),
    });
    assert!(
        matches!(rec.take_media().as_slice(), [Command::SendData { peer, text }] if *peer == p && text.contains("m.call.pong"))
    );
    for junk in [
        "not json",
        "[]",
        r#"{"type":5}"#,
        r#"{"type":"m.call.track_subscription","content":{"subscribe":"x"}}"#,
    ] {
        c.on_sfu_event(SfuEvent::DataMessage {
            peer: p,
            text: junk.into(),
        });
    }
    // Nothing was sent, and what the participant receives did not change.
    assert!(rec.take_media().is_empty());
    assert_eq!(
        c.metrics
            .data_messages
            .with_label_values(&["malformed"])
            .get(),
        2
    );
    assert_eq!(c.participant_count(), 1);
}

#[test]
fn shutdown_hangs_up_everyone() {
    let (mut c, rec) = setup();
    join(&mut c, &rec, &leg("@a:hs", "A", "1"), "s1");
    join(&mut c, &rec, &leg("@b:hs", "B", "2"), "s2");
    rec.take_legs();
    c.hang_up_all();
    let hangups = rec
        .take_legs()
        .into_iter()
        .filter(|l| matches!(l, LegCommand::Hangup { .. }))
        .count();
    assert_eq!(hangups, 2);
    assert_eq!(c.participant_count(), 0);
}
