//! Adaptive forwarding on the shard core, in the simulated network (`weir_sfu::sim`): who
//! speaks, the loudest audio, sizes for clients that never subscribe, and loss repair.
//! Bandwidth allocation is in `allocation.rs`. The policy is in docs/adaptation.md.

use std::time::Duration;

use weir_sfu::sim::{longest_stop, Camera, Publish, SimNet};
use weir_sfu::SfuEvent;

const VIDEO: Publish = Publish::CAMERA;
const WATCH: Publish = Publish::NOTHING;

/// Alice talks, Bob listens: within half a second the media plane reports Alice speaking and
/// dominant. When she falls silent she stops speaking but stays dominant; when Bob then
/// talks, he takes over at once.
#[test]
fn the_media_plane_reports_who_speaks() {
    let mut net = SimNet::default();
    let alice = net.join(4, VIDEO);
    let bob = net.join(4, VIDEO);
    assert!(net.run_until(Duration::from_secs(10), |n| n.all_connected()));
    net.run_for(Duration::from_millis(200));
    let speakers = |net: &SimNet| -> Vec<(Option<u64>, Vec<u64>)> {
        net.log
            .iter()
            .filter_map(|e| match e {
                SfuEvent::Speakers {
                    dominant, speaking, ..
                } => Some((
                    dominant.as_ref().map(|s| s.publisher.0),
                    speaking.iter().map(|s| s.publisher.0).collect(),
                )),
                _ => None,
            })
            .collect()
    };
    let (pa, pb) = (net.clients[alice].peer.0, net.clients[bob].peer.0);
    let talk = |net: &mut SimNet, a: i8, b: i8, ms: u64| {
        for _ in 0..ms / 20 {
            net.send_audio(alice, a);
            net.send_audio(bob, b);
            net.run_for(Duration::from_millis(20));
        }
    };
    talk(&mut net, -20, -90, 600);
    assert_eq!(
        speakers(&net),
        vec![(Some(pa), vec![pa])],
        "Alice speaks and leads"
    );
    talk(&mut net, -90, -90, 2000);
    assert_eq!(
        speakers(&net).last(),
        Some(&(Some(pa), vec![])),
        "silence: nobody speaks, Alice keeps the spotlight"
    );
    talk(&mut net, -90, -25, 600);
    assert_eq!(
        speakers(&net).last(),
        Some(&(Some(pb), vec![pb])),
        "Bob takes over"
    );
}

/// Thirty people talk at once, each at a different level, and only the 3 loudest audio
/// sources are forwarded above 20: the listener receives exactly the three loudest, and the
/// audio it gets has no sequence gaps.
#[test]
fn with_thirty_talkers_a_listener_receives_only_the_three_loudest() {
    let mut net = SimNet::new(weir_sfu::SfuConfig {
        audio_loudest_n: 3,
        audio_loudest_above: 20,
        ..weir_sfu::SfuConfig::default()
    });
    let talkers: Vec<usize> = (0..30).map(|_| net.join(6, Publish::VOICE)).collect();
    let listener = net.join(6, WATCH);
    assert!(net.run_until(Duration::from_secs(30), |n| n.all_connected()));
    net.run_for(Duration::from_millis(500));
    let mut settled = net.now();
    for round in 0..150 {
        if round == 100 {
            // Two seconds in, every talker's loudness score has settled.
            settled = net.now();
        }
        for (k, &t) in talkers.iter().enumerate() {
            // Talker k at -10 - k dBov: talkers 0, 1 and 2 are the loudest.
            net.send_audio(t, -10 - k as i8);
        }
        net.run_for(Duration::from_millis(20));
    }
    let got = &net.clients[listener].received;
    let recent: Vec<_> = got.iter().filter(|r| r.at >= settled).collect();
    let mut from: Vec<u8> = recent.iter().map(|r| r.payload[1]).collect();
    from.sort();
    from.dedup();
    let loudest: Vec<u8> = talkers[..3].iter().map(|t| *t as u8).collect();
    assert_eq!(from, loudest, "only the three loudest are heard");
    for mid in recent
        .iter()
        .map(|r| r.mid)
        .collect::<std::collections::BTreeSet<_>>()
    {
        let seqs: Vec<u16> = got.iter().filter(|r| r.mid == mid).map(|r| r.seq).collect();
        for w in seqs.windows(2) {
            assert_eq!(
                w[1],
                w[0].wrapping_add(1),
                "no gap in a forwarded audio stream"
            );
        }
    }
    let held = net.dropped(weir_sfu::DropReason::NotLoudest);
    assert!(held > 0, "the others' audio is held back and counted");
}

/// Victor's client never says what it displays. With one camera in the room he gets its full
/// layer; once three more cameras join, a 2 x 2 grid's tile is 360 lines tall, and he is moved
/// to the half-size layer at its next keyframe.
#[test]
fn a_client_that_never_subscribes_gets_what_fits_a_grid_of_the_room() {
    let simulcast = Publish {
        audio: false,
        video: true,
        simulcast: true,
    };
    let mut net = SimNet::default();
    let alice = net.join(8, simulcast);
    let victor = net.join(8, WATCH);
    assert!(net.run_until(Duration::from_secs(10), |n| n.all_connected()));
    let round = |net: &mut SimNet, key: bool| -> Vec<std::sync::Arc<[u8]>> {
        let sent = ["q", "h", "f"]
            .iter()
            .map(|rid| net.send_video(alice, Some(rid), key, 300))
            .collect();
        net.run_for(Duration::from_millis(33));
        sent
    };
    for i in 0..20 {
        round(&mut net, i == 0);
    }
    let [q, h, f] = <[_; 3]>::try_from(round(&mut net, true)).unwrap();
    let got = |net: &SimNet, p: &std::sync::Arc<[u8]>| {
        net.clients[victor].received.iter().any(|r| r.payload == *p)
    };
    assert!(
        got(&net, &f) && !got(&net, &h) && !got(&net, &q),
        "one camera: the full layer"
    );
    for _ in 0..3 {
        net.join(8, simulcast);
    }
    assert!(net.run_until(Duration::from_secs(10), |n| n.all_connected()));
    for _ in 0..10 {
        round(&mut net, false);
    }
    // The keyframes switch him; the frames after them show which layer he is on.
    round(&mut net, true);
    let [q, h, f] = <[_; 3]>::try_from(round(&mut net, false)).unwrap();
    assert!(
        got(&net, &h) && !got(&net, &f) && !got(&net, &q),
        "four cameras: the half layer"
    );
}

/// Alice's uplink loses 5 % of what she sends, and Bob's downlink 5 % of what the focus sends
/// him. Over 10 s of video, Bob and Carol each end up with more than 99.5 % of Alice's
/// packets: the focus asks Alice again for what her uplink lost (its NACKs, her RTX), and
/// answers Bob's NACKs from its retransmission history. With a publisher that kept nothing to
/// resend, Bob got 94 %.
#[test]
fn five_percent_loss_is_repaired_by_retransmission() {
    let shares = five_percent_loss(None, false);
    assert!(shares.iter().all(|s| *s > 0.995), "recovered: {shares:?}");
}

/// The same under other patterns of loss (the simulation's loss generator seeded
/// otherwise). str0m's loss-based estimate falls under such loss, in some patterns below
/// Alice's 750 kbit/s video; with no queue building, allocation holds the rate the link takes
/// (`Allocator::sent_through_random_loss`). Without that rule Bob's video was paused for
/// seconds under patterns 5 and 424242 (87 % and 81 % of it arrived).
#[test]
fn random_loss_does_not_pause_a_video_whatever_the_pattern() {
    for seed in [5, 7, 12, 77, 1234, 31337, 424242] {
        let shares = five_percent_loss(Some(seed), false);
        assert!(
            shares.iter().all(|s| *s > 0.995),
            "loss pattern {seed}: {shares:?}"
        );
    }
}

/// Bob's and Carol's shares of 10 s of Alice's video, each link losing 5 % (Alice's uplink,
/// Bob's downlink), under loss pattern `seed` and with or without the notices channel.
fn five_percent_loss(seed: Option<u64>, notices: bool) -> Vec<f64> {
    let mut net = SimNet::default();
    net.notices_channel = notices;
    let alice = net.join(9, VIDEO);
    let bob = net.join(9, WATCH);
    let carol = net.join(9, WATCH);
    assert!(net.run_until(Duration::from_secs(10), |n| n.all_connected()));
    net.run_for(Duration::from_millis(300));
    if let Some(seed) = seed {
        net.reseed(seed);
    }
    net.clients[bob].link.loss_down = 0.05;
    net.clients[alice].link.loss_up = 0.05;
    // 30 frames a second of 3 packets (750 kbit/s), and her microphone.
    let mut cam = Camera::new(alice, &[(None, 0, &[1000; 3])]);
    // Once both have started (allocation, then a keyframe):
    for _ in 0..300 {
        cam.frame(&mut net);
        if [bob, carol]
            .iter()
            .all(|w| !cam.video_of(&net, *w).is_empty())
        {
            break;
        }
    }
    assert!(
        [bob, carol]
            .iter()
            .all(|w| !cam.video_of(&net, *w).is_empty()),
        "both receive video"
    );
    let earlier: std::collections::HashSet<_> = cam.sent.keys().cloned().collect();
    cam.run(&mut net, Duration::from_secs(10));
    // Stop sending; let the last repairs arrive.
    net.run_for(Duration::from_millis(500));
    let sent = cam.sent.len() - earlier.len();
    let shares: Vec<f64> = [bob, carol]
        .iter()
        .map(|who| {
            let mut got: Vec<_> = cam
                .video_of(&net, *who)
                .iter()
                .filter(|r| !earlier.contains(&r.payload))
                .map(|r| r.payload.clone())
                .collect();
            got.sort();
            got.dedup();
            got.len() as f64 / sent as f64
        })
        .collect();
    eprintln!(
        "seed {seed:?}, notices {notices}: bob {:.2} %, carol {:.2} %",
        shares[0] * 100.0,
        shares[1] * 100.0
    );
    shares
}

/// The simulation's view of a viewer's picture (`Camera::shown`), which the `move_down`
/// example measures stops with: on a clean link Bob is shown every frame Alice sends; when
/// his link loses everything for 600 ms, his picture stops for at least that long.
#[test]
fn the_picture_model_shows_every_frame_and_sees_a_stop() {
    let mut net = SimNet::default();
    let alice = net.join(13, VIDEO);
    let bob = net.join(13, WATCH);
    assert!(net.run_until(Duration::from_secs(10), |n| n.all_connected()));
    let mut cam = Camera::new(alice, &[(None, 0, &[1000; 3])]);
    cam.run(&mut net, Duration::from_secs(3));
    let started = cam
        .shown(&net, bob)
        .first()
        .map(|(at, _)| *at)
        .expect("Bob shows Alice");
    let clean_until = net.now();
    let shown = cam.shown(&net, bob);
    let stop = longest_stop(&shown, started, clean_until);
    assert!(
        stop < Duration::from_millis(100),
        "on a clean link the picture never stops: {stop:?}"
    );
    assert!(
        shown.len() >= 80,
        "about 30 pictures a second: {}",
        shown.len()
    );

    let cut = net.now();
    net.clients[bob].link.loss_down = 1.0;
    cam.run(&mut net, Duration::from_millis(600));
    net.clients[bob].link.loss_down = 0.0;
    cam.run(&mut net, Duration::from_secs(2));
    let shown = cam.shown(&net, bob);
    let stop = longest_stop(&shown, cut, net.now());
    assert!(
        stop >= Duration::from_millis(600),
        "600 ms of lost packets stop the picture that long at least: {stop:?}"
    );
}
