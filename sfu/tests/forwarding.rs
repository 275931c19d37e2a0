//! Story: two participants call into one conference on a real media plane over loopback UDP,
//! with real ICE, DTLS and SRTP on both sides (str0m clients). Alice publishes audio and VP8
//! video; Bob publishes audio. Each receives the other's tracks, byte for byte, with a
//! continuous sequence, starting at a keyframe; Bob's keyframe request reaches Alice; when
//! Alice leaves, Bob is offered an SDP with her m-lines stopped.

use std::net::UdpSocket;
use std::time::{Duration, Instant};

use str0m::change::SdpOffer;
use str0m::format::Codec;
use str0m::media::{KeyframeRequestKind, MediaKind, Mid};
use str0m::Rtc;
use weir_sfu::{
    CloseReason, Command, ConferenceId, EventSink, PeerId, PeerRole, Sfu, SfuConfig, SfuEvent,
    Subscription,
};

mod support;

use support::{vp8_frame, World, DEADLINE};

#[test]
fn two_participants_exchange_media_through_a_real_media_plane() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let mut world = World::new(&["alice", "bob"]);

    // Alice calls in with audio and video.
    let offer = world.clients[0].offer(&[("audio", MediaKind::Audio), ("video", MediaKind::Video)]);
    world.call(0, offer);
    world.run_until("alice connected and her tracks published", |w| {
        w.clients[0].connected
            && w.log
                .iter()
                .filter(|e| matches!(e, SfuEvent::TrackPublished { .. }))
                .count()
                == 2
    });

    // Bob calls in with audio; the media plane offers him Alice's two tracks.
    let offer = world.clients[1].offer(&[("audio", MediaKind::Audio)]);
    world.call(1, offer);
    world.run_until("bob connected and offered alice's tracks", |w| {
        w.clients[1].connected
            && w.log.iter().any(|e| matches!(e, SfuEvent::Offer { peer: PeerId(1), tracks, .. } if tracks.len() == 2))
    });
    let offered: Vec<_> = world
        .log
        .iter()
        .filter_map(|e| match e {
            SfuEvent::Offer {
                peer: PeerId(1),
                tracks,
                ..
            } => Some(tracks.clone()),
            _ => None,
        })
        .next_back()
        .unwrap();
    assert!(offered
        .iter()
        .all(|t| t.publisher == PeerId(0) && t.stream_id == "alice-stream"));

    // Alice sends delta frames first (useless to a new subscriber), then a keyframe and more.
    let mut frames = Vec::new();
    let mut seq = 60_000u64; // near the 16-bit wrap: the subscriber must still start at ROC 0
    let mut sent_at = 0u32;
    world.run_until("bob receives alice's video from the keyframe on", |w| {
        sent_at += 1;
        if sent_at.is_multiple_of(3) && frames.len() < 40 {
            let key = frames.len() == 5;
            let payload = vp8_frame(key, frames.len() as u8);
            w.clients[0].send("video", seq, seq as u32 * 3000, &payload);
            w.clients[0].send(
                "audio",
                seq,
                seq as u32 * 960,
                &[0xf8, frames.len() as u8, 1, 2, 3],
            );
            frames.push((seq, key, payload));
            seq += 1;
        }
        let video_mid = w.clients[1]
            .received
            .iter()
            .filter(|r| r.2.len() > 100)
            .count();
        video_mid >= 30
    });

    let bob = &world.clients[1];
    let video: Vec<&(Mid, u64, Vec<u8>)> =
        bob.received.iter().filter(|r| r.2.len() > 100).collect();
    // Nothing before the keyframe; the first packet Bob decodes is the keyframe.
    assert_eq!(
        video[0].2, frames[5].2,
        "first forwarded video packet must be the keyframe"
    );
    // Payload bytes are never changed, and the sequence is continuous with no gaps.
    for (i, r) in video.iter().enumerate() {
        assert_eq!(r.2, frames[5 + i].2, "payload {i} changed in transit");
        assert_eq!(r.1, video[0].1 + i as u64, "sequence gap at {i}");
    }
    assert!(
        video[0].1 < 1 << 16,
        "a new subscriber stream must start in rollover counter 0"
    );
    let audio = bob
        .received
        .iter()
        .filter(|r| r.2.first() == Some(&0xf8))
        .count();
    assert!(
        audio >= 30,
        "bob got {audio} audio packets; {:?}",
        world.sfu.stats()
    );

    // Bob asks for a keyframe; the request reaches Alice (coalesced, not lost).
    let before = world.clients[0].keyframe_requests;
    let bob_video_mid = world.clients[1]
        .received
        .iter()
        .find(|r| r.2.len() > 100)
        .unwrap()
        .0;
    let ssrc = world.clients[1]
        .rtc
        .direct_api()
        .stream_rx_by_mid(bob_video_mid, None)
        .unwrap()
        .ssrc();
    world.clients[1]
        .rtc
        .direct_api()
        .stream_rx(&ssrc)
        .unwrap()
        .request_keyframe(KeyframeRequestKind::Pli);
    world.run_until("alice gets bob's keyframe request", |w| {
        w.clients[0].keyframe_requests > before
    });

    // Alice leaves: Bob is offered an SDP with her m-lines stopped (their slots recyclable),
    // and the media plane reports her gone.
    let mut bob_mids: Vec<Mid> = world.clients[1].received.iter().map(|r| r.0).collect();
    bob_mids.sort();
    bob_mids.dedup();
    assert_eq!(bob_mids.len(), 2);
    world
        .sfu
        .send(Command::ClosePeer { peer: PeerId(0) })
        .unwrap();
    world.run_until("bob's m-lines for alice are stopped", |w| {
        w.clients[1].inactive_mids >= 2
            && bob_mids
                .iter()
                .all(|mid| w.clients[1].rtc.media(*mid).is_none_or(|m| m.disabled()))
            && w.log.iter().any(|e| {
                matches!(
                    e,
                    SfuEvent::PeerClosed {
                        peer: PeerId(0),
                        ..
                    }
                )
            })
    });
    let last_offer = world.log.iter().rev().find_map(|e| match e {
        SfuEvent::Offer {
            peer: PeerId(1),
            tracks,
            ..
        } => Some(tracks.clone()),
        _ => None,
    });
    assert_eq!(
        last_offer,
        Some(vec![]),
        "no forwarded track is left to describe"
    );
    // Counters are published by the shard every housekeeping tick: wait for them.
    world.run_until("the forwarded packets to be counted", |w| {
        w.sfu.stats().rtp_forwarded >= 60
    });
}

#[test]
fn a_garbage_offer_fails_that_peer_only() {
    let (tx, rx) = crossbeam_channel::unbounded();
    let sfu = Sfu::start(SfuConfig::default(), tx).unwrap();
    sfu.send(Command::CreatePeer {
        peer: PeerId(7),
        conference: ConferenceId(1),
        offer: "v=0\r\nnonsense".into(),
        role: PeerRole::Participant,
    })
    .unwrap();
    let huge = "a".repeat(weir_sfu::engine::MAX_SDP_BYTES + 1);
    sfu.send(Command::CreatePeer {
        peer: PeerId(8),
        conference: ConferenceId(1),
        offer: huge,
        role: PeerRole::Participant,
    })
    .unwrap();
    let mut failed = Vec::new();
    while failed.len() < 2 {
        match rx
            .recv_timeout(DEADLINE)
            .expect("the media plane must answer every offer")
        {
            SfuEvent::PeerFailed { peer, error } => failed.push((peer, error)),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(failed.iter().any(|(p, _)| *p == PeerId(7)));
    assert!(failed
        .iter()
        .any(|(p, e)| *p == PeerId(8) && e.contains("exceeds")));
    // Garbage datagrams from an unknown address are counted, and the shard keeps serving.
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    for _ in 0..10 {
        s.send_to(&[0xde, 0xad, 0xbe, 0xef], sfu.local_addrs()[0])
            .unwrap();
    }
    let start = Instant::now();
    loop {
        let st = sfu.stats();
        let dropped: u64 = st.drops.iter().map(|(_, n)| n).sum();
        if dropped >= 10 + 2 {
            break;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "garbage was not counted: {st:?}"
        );
        let _ = rx.recv_timeout(Duration::from_millis(20));
    }
}

/// Alice publishes simulcast video (q, h, f) and Bob audio; both are connected and Bob has been
/// offered Alice's video.
fn simulcast_call() -> World {
    let mut world = World::new(&["alice", "bob"]);
    let offer = world.clients[0].offer_with(&[("video", MediaKind::Video)], Some(&["q", "h", "f"]));
    world.call(0, offer);
    let offer = world.clients[1].offer(&[("audio", MediaKind::Audio)]);
    world.call(1, offer);
    world.run_until("both connected and bob offered alice's video", |w| {
        w.clients[0].connected
            && w.clients[1].connected
            && w.log.iter().any(|e| matches!(e, SfuEvent::Offer { peer: PeerId(1), tracks, .. } if tracks.len() == 1))
    });
    world
}

/// Alice's simulcast frames: every layer's payload names its layer in byte 2 (after the VP8
/// descriptor and header byte); a keyframe every 10 frames on every layer; one frame per layer
/// every third pump.
#[derive(Default)]
struct SimulcastSender {
    n: u64,
    tick: u64,
}

impl SimulcastSender {
    fn round(&mut self, w: &mut World, rids: &[&str]) {
        self.tick += 1;
        if !self.tick.is_multiple_of(3) {
            return;
        }
        let n = self.n;
        for rid in rids {
            let mut p = vec![
                0x10,
                if n.is_multiple_of(10) { 0x00 } else { 0x01 },
                rid.as_bytes()[0],
            ];
            p.extend_from_slice(&n.to_be_bytes());
            p.extend(std::iter::repeat_n(0x55, 100));
            w.clients[0].send_layer("video", Some(rid), 1000 + n, (n * 3000) as u32, &p);
        }
        self.n += 1;
    }
}

/// Story: Alice publishes simulcast video (q, h, f). Bob receives exactly one layer at a time as
/// one continuous stream: the best one flowing (f). When Alice's top layer stops, Bob is moved
/// down to h at h's next keyframe, with no sequence gap and no packet of the other layers.
#[test]
fn a_subscriber_gets_one_simulcast_layer_and_moves_down_when_it_stalls() {
    let mut world = simulcast_call();

    let mut alice = SimulcastSender::default();
    world.run_until("bob receives the top layer", |w| {
        alice.round(w, &["q", "h", "f"]);
        w.clients[1]
            .received
            .iter()
            .filter(|r| r.2[2] == b'f')
            .count()
            >= 20
    });
    let before = world.clients[1].received.len();
    world.run_until("bob moved to the middle layer after f stalled", |w| {
        alice.round(w, &["q", "h"]);
        w.clients[1].received[before..]
            .iter()
            .filter(|r| r.2[2] == b'h')
            .count()
            >= 20
    });
    let got = &world.clients[1].received;
    assert!(
        got.iter().all(|r| r.2[2] != b'q'),
        "the bottom layer was never needed"
    );
    let first_h = got.iter().position(|r| r.2[2] == b'h').unwrap();
    assert!(got[..first_h].iter().all(|r| r.2[2] == b'f'));
    assert!(
        got[first_h..].iter().all(|r| r.2[2] == b'h'),
        "no return to f and no mixing"
    );
    assert_eq!(
        got[first_h].2[1] & 1,
        0,
        "the switch happens on a keyframe of the new layer"
    );
    for w in got.windows(2) {
        assert_eq!(
            w[1].1,
            w[0].1 + 1,
            "one continuous sequence across the switch"
        );
    }
}

/// Story: Bob shows Alice's camera as a small tile: he subscribes at 180 px and receives only
/// the quarter-size layer. He enlarges it to 720 px and is moved to the full layer at its next
/// keyframe. Then he unsubscribes, and her m-line is stopped.
#[test]
fn a_subscription_chooses_tracks_and_caps_the_layer_by_displayed_size() {
    let mut world = simulcast_call();
    let sub = |h: u32| Subscription {
        stream_id: "alice-stream".into(),
        track_id: "alice-video".into(),
        max_height: Some(h),
        source_height: Some(720),
    };
    world
        .sfu
        .send(Command::Subscribe {
            peer: PeerId(1),
            subscriptions: vec![sub(180)],
        })
        .unwrap();
    let mut alice = SimulcastSender::default();
    world.run_until("bob receives the small layer", |w| {
        alice.round(w, &["q", "h", "f"]);
        w.clients[1]
            .received
            .iter()
            .filter(|r| r.2[2] == b'q')
            .count()
            >= 15
    });
    assert!(
        world.clients[1].received.iter().all(|r| r.2[2] == b'q'),
        "only the quarter-size layer for a small tile"
    );
    world
        .sfu
        .send(Command::Subscribe {
            peer: PeerId(1),
            subscriptions: vec![sub(720)],
        })
        .unwrap();
    let before = world.clients[1].received.len();
    world.run_until("bob moves to the full layer", |w| {
        alice.round(w, &["q", "h", "f"]);
        w.clients[1].received[before..]
            .iter()
            .filter(|r| r.2[2] == b'f')
            .count()
            >= 15
    });
    let got = &world.clients[1].received;
    let first_f = got.iter().position(|r| r.2[2] == b'f').unwrap();
    assert_eq!(got[first_f].2[1] & 1, 0, "the switch happens on a keyframe");
    assert!(got[first_f..].iter().all(|r| r.2[2] == b'f'));
    for w in got.windows(2) {
        assert_eq!(
            w[1].1,
            w[0].1 + 1,
            "one continuous sequence across the switch"
        );
    }
    // Unsubscribing from everything stops her m-line for Bob.
    world
        .sfu
        .send(Command::Subscribe {
            peer: PeerId(1),
            subscriptions: vec![],
        })
        .unwrap();
    world.run_until("bob is offered nothing", |w| {
        alice.round(w, &["q", "h", "f"]);
        w.log.iter().any(
            |e| matches!(e, SfuEvent::Offer { peer: PeerId(1), tracks, .. } if tracks.is_empty()),
        )
    });
}

/// The offers the media plane made to `peer`, in order.
/// Bob's subscription to Alice's whole simulcast video.
fn alice_video() -> Subscription {
    Subscription {
        stream_id: "alice-stream".into(),
        track_id: "alice-video".into(),
        max_height: None,
        source_height: Some(720),
    }
}

/// Alice sends her three layers until Bob has received ten video packets more.
fn bob_receives_alices_video(world: &mut World, what: &str) {
    let mut alice = SimulcastSender::default();
    let before = world.clients[1].received.len();
    world.run_until(what, |w| {
        alice.round(w, &["q", "h", "f"]);
        w.clients[1].received[before..]
            .iter()
            .filter(|r| r.2.len() > 100)
            .count()
            >= 10
    });
}

/// The `a=msid` values that more than one live (not stopped: port ≠ 0) m-section of `sdp`
/// carries. Chromium refuses such an offer ("Duplicate a=msid lines detected").
fn repeated_msids(sdp: &str) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    let mut repeated = Vec::new();
    let mut live = false;
    for line in sdp.lines() {
        if let Some(m) = line.strip_prefix("m=") {
            live = m.split(' ').nth(1) != Some("0");
        } else if let Some(msid) = line.strip_prefix("a=msid:") {
            if live && !seen.insert(msid.trim().to_string()) {
                repeated.push(msid.trim().to_string());
            }
        }
    }
    repeated
}

fn offers_to(w: &World, peer: PeerId) -> Vec<String> {
    w.log
        .iter()
        .filter_map(|e| match e {
            SfuEvent::Offer { peer: p, sdp, .. } if *p == peer => Some(sdp.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn a_late_answer_to_a_rolled_back_offer_is_ignored_and_negotiation_stays_in_step() {
    let mut world = World::new(&["alice", "bob"]);
    let offer = world.clients[0].offer(&[("audio", MediaKind::Audio), ("video", MediaKind::Video)]);
    world.call(0, offer);
    world.run_until("alice's tracks published", |w| {
        w.log
            .iter()
            .filter(|e| matches!(e, SfuEvent::TrackPublished { .. }))
            .count()
            == 2
    });
    // Bob joins; the focus offers him Alice's tracks (offer 1), which he holds on to.
    world.hold_offers_to.push(PeerId(1));
    let offer = world.clients[1].offer(&[("audio", MediaKind::Audio)]);
    world.call(1, offer);
    world.run_until("offer 1 to bob", |w| {
        w.clients[1].connected && offers_to(w, PeerId(1)).len() == 1
    });
    let offer1 = offers_to(&world, PeerId(1)).remove(0);

    // Glare: Bob offers too (a second track of his). The focus, polite, rolls offer 1 back,
    // answers Bob, and offers Alice's tracks again (offer 2).
    let reoffer = world.clients[1].offer(&[("video", MediaKind::Video)]);
    world
        .sfu
        .send(Command::RemoteOffer {
            peer: PeerId(1),
            sdp: reoffer,
        })
        .unwrap();
    world.run_until("the focus answers bob and makes offer 2", |w| {
        w.log.iter().any(|e| {
            matches!(
                e,
                SfuEvent::Answer {
                    peer: PeerId(1),
                    ..
                }
            )
        }) && offers_to(w, PeerId(1)).len() == 2
    });
    let answer = world
        .log
        .iter()
        .find_map(|e| match e {
            SfuEvent::Answer {
                peer: PeerId(1),
                sdp,
            } => Some(sdp.clone()),
            _ => None,
        })
        .unwrap();
    world.clients[1].accept_answer(&answer, &[]);
    let offer2 = offers_to(&world, PeerId(1)).remove(1);

    // Bob's answer to offer 1 arrives late (it crossed his own offer): it must not be applied
    // to offer 2, nor cost offer 2.
    let late = {
        let mut other = Rtc::builder().set_rtp_mode(true).build(Instant::now());
        other
            .sdp_api()
            .accept_offer(SdpOffer::from_sdp_string(&offer1).unwrap())
            .unwrap()
            .to_sdp_string()
    };
    world
        .sfu
        .send(Command::RemoteAnswer {
            peer: PeerId(1),
            sdp: late,
        })
        .unwrap();
    // Then his answer to offer 2: Alice's media reaches him, and no offer is left unanswered.
    let answer2 = world.clients[1].answer(&offer2);
    world
        .sfu
        .send(Command::RemoteAnswer {
            peer: PeerId(1),
            sdp: answer2,
        })
        .unwrap();
    let mut seq = 100u64;
    world.run_until("bob receives alice's video after offer 2", |w| {
        let key = seq.is_multiple_of(10); // a keyframe now and then: bob starts on one
        w.clients[0].send("video", seq, seq as u32 * 3000, &vp8_frame(key, seq as u8));
        seq += 1;
        w.clients[1]
            .received
            .iter()
            .filter(|r| r.2.len() > 100)
            .count()
            >= 5
    });
    assert!(
        !world.log.iter().any(|e| matches!(
            e,
            SfuEvent::NegotiationFailed {
                peer: PeerId(1),
                ..
            }
        )),
        "the late answer was not applied to offer 2: {:?}",
        world.log
    );
    assert_eq!(
        offers_to(&world, PeerId(1)).len(),
        2,
        "no offer 3 was needed"
    );
    // Counters reach the stats within a housekeeping round.
    let stale = |w: &World| {
        w.sfu
            .stats()
            .drops
            .iter()
            .find(|(r, _)| *r == weir_sfu::DropReason::StaleAnswer)
            .map_or(0, |(_, n)| *n)
    };
    world.run_until("the late answer counted as stale", |w| stale(w) == 1);
}

/// Story: Bob's subscription to Alice's video flips on and off 1000 times, faster than
/// renegotiation can follow: offers and answers cross the flips at every stage. Whatever was
/// asked in between, Bob ends up receiving the track he asked for last, and no offer is left
/// without its answer.
#[test]
fn a_subscription_toggled_a_thousand_times_ends_with_the_track_asked_for_last() {
    let mut world = simulcast_call();
    let video = alice_video();
    for i in 0..1000 {
        let subscriptions = if i % 2 == 0 {
            vec![]
        } else {
            vec![video.clone()]
        };
        world
            .sfu
            .send(Command::Subscribe {
                peer: PeerId(1),
                subscriptions,
            })
            .unwrap();
        // Let whatever is in flight move a little: answers land between flips.
        for c in &mut world.clients {
            c.pump();
        }
        while let Ok(ev) = world.events.try_recv() {
            world.handle(ev);
        }
    }
    // The last flip (i = 999) asked for the video.
    bob_receives_alices_video(&mut world, "bob receives alice's video after the last flip");
    let offers = offers_to(&world, PeerId(1));
    assert!(
        offers.len() > 2,
        "the flips did renegotiate: {} offers",
        offers.len()
    );
    // A flip that withdrew the track while an offer adding it was out must not leave that
    // m-line live: the next offer would carry the track twice, which Chromium refuses.
    for (i, sdp) in offers.iter().enumerate() {
        let repeated = repeated_msids(sdp);
        assert!(
            repeated.is_empty(),
            "offer {i} carries a track twice: {repeated:?}"
        );
    }
    assert!(
        !world.log.iter().any(|e| matches!(
            e,
            SfuEvent::NegotiationFailed {
                peer: PeerId(1),
                ..
            }
        )),
        "every answer matched its offer"
    );
}

/// Story: Bob asks for Alice's video and takes it back while the focus's offer adding it is
/// still out; then he answers that offer. When he asks again, the video is offered once: the
/// m-line of the first offer was stopped, not left live under the same msid. (Chromium
/// refuses an offer that repeats an msid, and with it every track that offer changes: seen in
/// the web app's test as a rejoining participant who received no video.)
#[test]
fn a_track_withdrawn_while_its_offer_is_out_is_not_offered_twice() {
    let mut world = simulcast_call();
    let video = alice_video();
    let subscribe = |w: &mut World, subscriptions: Vec<Subscription>| {
        w.sfu
            .send(Command::Subscribe {
                peer: PeerId(1),
                subscriptions,
            })
            .unwrap();
    };
    let offer_count = |w: &World| offers_to(w, PeerId(1)).len();
    // Nothing, then the video with its offer held: the offer adding the video is out.
    subscribe(&mut world, vec![]);
    let n = offer_count(&world);
    world.run_until("the video withdrawn", |w| offer_count(w) > n);
    world.hold_offers_to.push(PeerId(1));
    subscribe(&mut world, vec![video.clone()]);
    let n = offer_count(&world);
    world.run_until("an offer adding the video", |w| offer_count(w) > n);
    let held = offers_to(&world, PeerId(1)).pop().unwrap();
    assert!(held.contains("a=msid:alice-stream alice-video"), "{held}");
    // Bob takes it back, then answers the offer that adds it.
    subscribe(&mut world, vec![]);
    world.hold_offers_to.clear();
    let answer = world.clients[1].answer(&held);
    world
        .sfu
        .send(Command::RemoteAnswer {
            peer: PeerId(1),
            sdp: answer,
        })
        .unwrap();
    // He asks again and gets the video.
    subscribe(&mut world, vec![video]);
    bob_receives_alices_video(&mut world, "bob receives alice's video");
    for (i, sdp) in offers_to(&world, PeerId(1)).iter().enumerate() {
        let repeated = repeated_msids(sdp);
        assert!(
            repeated.is_empty(),
            "offer {i} carries a track twice: {repeated:?}\n{sdp}"
        );
    }
}

/// Story: the focus hangs up on Bob. His engine learns it at once from the DTLS close_notify
/// the focus sends on closing, instead of waiting for ICE consent to time out, and Alice's
/// call goes on.
#[test]
fn a_closed_peer_is_told_with_close_notify() {
    let mut world = World::new(&["alice", "bob"]);
    let offer = world.clients[0].offer(&[("audio", MediaKind::Audio)]);
    world.call(0, offer);
    let offer = world.clients[1].offer(&[("audio", MediaKind::Audio)]);
    world.call(1, offer);
    world.run_until("both connected", |w| {
        w.clients[0].connected && w.clients[1].connected
    });
    world
        .sfu
        .send(Command::ClosePeer { peer: PeerId(1) })
        .unwrap();
    world.run_until("bob's engine sees the close", |w| w.clients[1].closed);
    assert!(!world.clients[0].closed, "alice's connection stays up");
}

/// Passes events on to the test, but panics when the shard reports `peer`'s first track: a
/// stand-in for a bug that one peer's traffic could trigger in the engine or in weir.
#[derive(Clone)]
struct PanicsOnTrackOf {
    tx: crossbeam_channel::Sender<SfuEvent>,
    peer: PeerId,
}

impl EventSink for PanicsOnTrackOf {
    fn send(&self, event: SfuEvent) -> bool {
        if matches!(&event, SfuEvent::TrackPublished { peer, .. } if *peer == self.peer) {
            panic!("injected panic while handling {:?}", self.peer);
        }
        self.tx.send(event).is_ok()
    }
}

/// Story: Alice and Bob are in a call when Mallory joins, and handling Mallory's track panics.
/// Only Mallory is closed (and the panic counted); the shard, and Alice's audio to Bob, go on.
#[test]
fn a_panic_while_handling_one_peer_closes_that_peer_only() {
    let mut world = World::with_sink(&["alice", "bob", "mallory"], |tx| PanicsOnTrackOf {
        tx,
        peer: PeerId(2),
    });
    let offer = world.clients[0].offer(&[("audio", MediaKind::Audio)]);
    world.call(0, offer);
    let offer = world.clients[1].offer(&[("audio", MediaKind::Audio)]);
    world.call(1, offer);
    world.run_until("alice and bob connected, bob offered alice's audio", |w| {
        w.clients[0].connected
            && w.clients[1].connected
            && w.log.iter().any(|e| {
                matches!(
                    e,
                    SfuEvent::Offer {
                        peer: PeerId(1),
                        ..
                    }
                )
            })
    });
    let offer = world.clients[2].offer(&[("audio", MediaKind::Audio)]);
    world.call(2, offer);
    world.run_until("mallory closed after the panic", |w| {
        w.log.iter().any(|e| {
            matches!(e, SfuEvent::PeerClosed { peer: PeerId(2), reason: CloseReason::EngineError(r) } if r.contains("injected panic"))
        })
    });
    let mut seq = 1u64;
    let before = world.clients[1].received.len();
    world.run_until("bob still receives alice's audio", |w| {
        w.clients[0].send("audio", seq, seq as u32 * 960, &[0xf8, 1, 2, 3]);
        seq += 1;
        w.clients[1].received.len() >= before + 10
    });
    assert!(
        !world.log.iter().any(|e| matches!(
            e,
            SfuEvent::PeerClosed {
                peer: PeerId(0) | PeerId(1),
                ..
            }
        )),
        "nobody else was closed"
    );
    assert_eq!(world.sfu.shards_alive(), vec![true], "the shard survived");
    world.run_until("the panic counted", |w| w.sfu.stats().peer_panics == 1);
    world.sfu.shutdown();
    assert_eq!(
        world.sfu.shards_alive(),
        vec![false],
        "a stopped shard is reported"
    );
}

/// The media plane's data-channel messages from `peer` handed to the control plane so far.
fn data_messages_from(w: &World, peer: PeerId) -> usize {
    w.log
        .iter()
        .filter(|e| matches!(e, SfuEvent::DataMessage { peer: p, .. } if *p == peer))
        .count()
}

/// Story: Alice floods her data channel with 1000 messages at once. The media plane hands the
/// control plane only her budget's worth and counts the rest as dropped; Bob's one message
/// still goes through, on his own budget.
#[test]
fn a_data_channel_flood_is_cut_at_the_peers_budget_and_costs_others_nothing() {
    let mut world = World::new(&["alice", "bob"]);
    for i in 0..2 {
        world.clients[i].wants_channel = true;
        let offer = world.clients[i].offer(&[("audio", MediaKind::Audio)]);
        world.call(i as u64, offer);
    }
    world.run_until("both channels open", |w| {
        w.clients.iter().all(|c| c.channel.is_some())
            && w.log
                .iter()
                .filter(|e| matches!(e, SfuEvent::ChannelOpen { .. }))
                .count()
                == 2
    });
    let ping = br#"{"type":"m.call.ping","content":{}}"#;
    let mut written = 0;
    for i in 0..1000 {
        let alice = &mut world.clients[0];
        let ch = alice.channel.unwrap();
        if alice
            .rtc
            .channel(ch)
            .unwrap()
            .write(false, ping)
            .unwrap_or(false)
        {
            written += 1;
        }
        if i % 50 == 0 {
            alice.pump();
        }
    }
    assert!(written > 900, "the flood was written: {written}");
    let flood = |w: &World| {
        w.sfu
            .stats()
            .drops
            .iter()
            .find(|(r, _)| *r == weir_sfu::DropReason::DataChannelFlood)
            .map_or(0, |(_, n)| *n as usize)
    };
    world.run_until("every flooded message handed over or counted", |w| {
        data_messages_from(w, PeerId(0)) + flood(w) == written
    });
    let passed = data_messages_from(&world, PeerId(0));
    assert!(
        (50..200).contains(&passed),
        "a burst of 50 and 20 per second passed, not the flood: {passed}"
    );
    let bob = &mut world.clients[1];
    let ch = bob.channel.unwrap();
    assert!(bob.rtc.channel(ch).unwrap().write(false, ping).unwrap());
    world.run_until("bob's message still goes through", |w| {
        data_messages_from(w, PeerId(1)) == 1
    });
}

/// Story: Bob is in the call when Alice joins with her microphone and camera. Bob gets one
/// renegotiation offer carrying both her tracks, not one per track (each offer is a to-device
/// message through the homeservers).
#[test]
fn a_join_renegotiates_each_other_participant_once() {
    let mut world = World::new(&["alice", "bob"]);
    let offer = world.clients[1].offer(&[("audio", MediaKind::Audio)]);
    world.call(1, offer);
    world.run_until("bob connected", |w| w.clients[1].connected);
    let offer = world.clients[0].offer(&[("audio", MediaKind::Audio), ("video", MediaKind::Video)]);
    world.call(0, offer);
    world.run_until("alice's two tracks published and bob offered them", |w| {
        w.log
            .iter()
            .filter(|e| matches!(e, SfuEvent::TrackPublished { peer: PeerId(0), .. }))
            .count()
            == 2
            && w.log.iter().any(|e| matches!(e, SfuEvent::Offer { peer: PeerId(1), tracks, .. } if tracks.len() == 2))
    });
    // Let any further offer show up: Alice's media flowing to Bob needs his answer applied.
    let mut seq = 1u64;
    world.run_until("bob receives alice's audio", |w| {
        w.clients[0].send("audio", seq, seq as u32 * 960, &[0xf8, 9, 9, 9]);
        seq += 1;
        !w.clients[1].received.is_empty()
    });
    assert_eq!(
        offers_to(&world, PeerId(1)).len(),
        1,
        "one offer to bob for alice's join"
    );
    // The media plane timed its own forwarding of those packets.
    world.run_until("forwarding delays recorded", |w| {
        w.sfu.stats().forward_delay.count > 0
    });
}

/// Story: Alice's camera starts on VP8, then her browser switches the same m-line to H264 (a
/// payload type of the same negotiation). Bob joins after the switch: he starts on Alice's
/// first H264 keyframe, so weir must read keyframes by each packet's own codec, not the codec
/// the track began with.
#[test]
fn keyframes_are_read_by_each_packets_codec() {
    let mut world = World::new(&["alice", "bob"]);
    let offer = world.clients[0].offer(&[("video", MediaKind::Video)]);
    world.call(0, offer);
    world.run_until("alice connected", |w| w.clients[0].connected);
    let mut seq = 1u64;
    world.run_until("alice's VP8 reaches the media plane", |w| {
        w.clients[0].send(
            "video",
            seq,
            seq as u32 * 3000,
            &vp8_frame(seq.is_multiple_of(5), seq as u8),
        );
        seq += 1;
        w.sfu.stats().rtp_in >= 10
    });
    let offer = world.clients[1].offer(&[("audio", MediaKind::Audio)]);
    world.call(1, offer);
    world.run_until("bob connected", |w| w.clients[1].connected);
    // From now on H264: an IDR (NAL type 5) every tenth frame, other slices (type 1) between.
    world.run_until("bob receives alice's H264", |w| {
        let nal = if seq.is_multiple_of(10) { 0x65 } else { 0x41 };
        let mut p = vec![nal];
        p.extend(std::iter::repeat_n(0x33, 200));
        w.clients[0].send_codec("video", Codec::H264, None, seq, seq as u32 * 3000, &p);
        seq += 1;
        w.clients[1].received.iter().any(|r| r.2.len() > 100)
    });
    let first = world.clients[1]
        .received
        .iter()
        .find(|r| r.2.len() > 100)
        .unwrap();
    assert_eq!(first.2[0], 0x65, "bob starts on an H264 IDR");
}
