//! The shard core without sockets or a clock: participants are real WebRTC engines in memory
//! (`weir_sfu::sim`), time is virtual, so every scenario runs the same way each time.

use std::time::Duration;

use weir_sfu::sim::{Publish, SimNet};
use weir_sfu::SfuEvent;

const VIDEO: Publish = Publish {
    audio: true,
    video: true,
    simulcast: false,
};
const WATCH: Publish = Publish {
    audio: false,
    video: false,
    simulcast: false,
};

/// Alice publishes; Bob and Carol join and connect; both receive the video weir was offered
/// for them, every payload identical to what Alice sent, sequence numbers without a gap.
#[test]
fn every_subscriber_receives_every_payload_unchanged_and_in_sequence() {
    let mut net = SimNet::default();
    let alice = net.join(1, VIDEO);
    let bob = net.join(1, WATCH);
    let carol = net.join(1, WATCH);
    assert!(
        net.run_until(Duration::from_secs(10), |n| n.all_connected()),
        "ICE and DTLS complete in memory within 10 s of virtual time"
    );
    // Weir offers Alice's tracks to Bob and Carol; their answers come back in the same step.
    net.run_for(Duration::from_millis(200));
    let offers = net
        .log
        .iter()
        .filter(|e| matches!(e, SfuEvent::Offer { .. }))
        .count();
    assert_eq!(
        offers, 2,
        "one offer per subscriber, with audio and video together"
    );

    let mut sent = vec![net.send_video(alice, None, true, 1100)];
    for _ in 0..49 {
        net.run_for(Duration::from_millis(1));
        sent.push(net.send_video(alice, None, false, 1100));
    }
    net.run_for(Duration::from_millis(50));

    for who in [bob, carol] {
        let got = &net.clients[who].received;
        eprintln!("{:?}", weir_sfu::StatsSnapshot::sum([net.stats.as_ref()]));
        assert_eq!(got.len(), sent.len(), "client {who} receives every packet");
        for (i, (r, s)) in got.iter().zip(&sent).enumerate() {
            assert!(
                r.payload == *s,
                "client {who}: payload {i} differs from what was sent"
            );
        }
        for w in got.windows(2) {
            assert_eq!(w[1].seq, w[0].seq.wrapping_add(1), "client {who}: no gap");
        }
    }
    assert!(
        net.clients[alice].received.is_empty(),
        "nothing comes back to Alice"
    );
}

/// A busy room for a while: people join, publish, watch and leave in waves. Whoever is still
/// there keeps receiving, and once everyone has gone the core holds nothing of them: no peer,
/// track, conference, address, ufrag or subscription, and only a bounded timer heap.
#[test]
fn people_coming_and_going_leave_nothing_behind() {
    let mut net = SimNet::default();
    let host = net.join(7, VIDEO);
    let mut present = Vec::new();
    for wave in 0..5 {
        for _ in 0..6 {
            present.push(net.join(7, if wave % 2 == 0 { WATCH } else { VIDEO }));
        }
        assert!(
            net.run_until(Duration::from_secs(10), |n| n.all_connected()),
            "wave {wave}: the newcomers connect"
        );
        net.run_for(Duration::from_millis(200));
        let sizes = net.core.sizes();
        assert_eq!(
            sizes.peers,
            1 + present.len(),
            "wave {wave}: one peer per participant"
        );
        let sent = net.send_video(host, None, true, 500);
        net.run_for(Duration::from_millis(30));
        for &i in &present {
            assert!(
                net.clients[i].received.iter().any(|r| r.payload == sent),
                "wave {wave}: participant {i} receives the host"
            );
        }
        // Half of those present leave.
        let leaving: Vec<usize> = present.iter().copied().step_by(2).collect();
        for i in &leaving {
            net.leave(*i);
        }
        present.retain(|i| !leaving.contains(i));
        net.run_for(Duration::from_millis(200));
    }
    for i in present.drain(..) {
        net.leave(i);
    }
    net.leave(host);
    net.run_for(Duration::from_secs(2));
    let sizes = net.core.sizes();
    assert_eq!(
        (sizes.peers, sizes.conferences, sizes.tracks),
        (0, 0, 0),
        "no peer, conference or track outlives its participants"
    );
    assert_eq!(
        (sizes.addresses, sizes.ufrags, sizes.subscriptions),
        (0, 0, 0),
        "no address, ufrag or subscription outlives its peer"
    );
    assert!(
        sizes.timers <= 64,
        "the timer heap is pruned: {} entries",
        sizes.timers
    );
}

/// A 25-person meeting where everyone publishes audio and video: everyone receives every
/// other participant's audio, and a video keyframe from each of them.
#[test]
fn in_a_25_person_meeting_everyone_receives_everyone() {
    let mut net = SimNet::default();
    let people: Vec<usize> = (0..25).map(|_| net.join(3, VIDEO)).collect();
    assert!(
        net.run_until(Duration::from_secs(20), |n| n.all_connected()),
        "everyone connects"
    );
    net.run_for(Duration::from_millis(500));
    // Each offer travels in a to-device event, which Synapse caps at 64 KiB of JSON (line
    // breaks escaped): 24 forwarded tracks of audio and video must fit with room to spare.
    let largest = net
        .log
        .iter()
        .filter_map(|e| match e {
            SfuEvent::Offer { sdp, .. } => Some(sdp.len() + sdp.lines().count() * 2),
            _ => None,
        })
        .max()
        .unwrap_or(0);
    eprintln!("largest offer: {largest} bytes escaped");
    assert!(
        largest < 56 * 1024,
        "the largest offer takes {largest} bytes escaped"
    );
    let mut sent = Vec::new();
    for &p in &people {
        sent.push(net.send_video(p, None, true, 300));
    }
    net.run_for(Duration::from_millis(100));
    for &who in &people {
        for (from, payload) in people.iter().zip(&sent) {
            if *from == who {
                continue;
            }
            assert!(
                net.clients[who]
                    .received
                    .iter()
                    .any(|r| r.payload == *payload),
                "participant {who} receives participant {from}'s video"
            );
        }
    }
}

/// Alice has been sending three simulcast layers for a while when Bob joins. Bob's first
/// packet is the top layer's next keyframe: weir does not wait for another one, and never
/// starts him on a lower layer first.
#[test]
fn a_newcomer_starts_on_the_top_layers_keyframe_in_flight() {
    let mut net = SimNet::default();
    let alice = net.join(
        5,
        Publish {
            audio: false,
            video: true,
            simulcast: true,
        },
    );
    assert!(net.run_until(Duration::from_secs(10), |n| n.all_connected()));
    for frame in 0..30 {
        for rid in ["q", "h", "f"] {
            net.send_video(alice, Some(rid), frame == 0, 400);
        }
        net.run_for(Duration::from_millis(33));
    }
    let bob = net.join(5, WATCH);
    assert!(net.run_until(Duration::from_secs(10), |n| n.all_connected()));
    // Bob's offer and answer go through; Alice keeps sending deltas meanwhile.
    for _ in 0..10 {
        for rid in ["q", "h", "f"] {
            net.send_video(alice, Some(rid), false, 400);
        }
        net.run_for(Duration::from_millis(33));
    }
    assert!(
        net.clients[bob].received.is_empty(),
        "no delta frame starts a subscriber"
    );
    let q = net.send_video(alice, Some("q"), true, 400);
    let f = net.send_video(alice, Some("f"), true, 400);
    net.run_for(Duration::from_millis(20));
    let got = &net.clients[bob].received;
    assert!(!got.is_empty(), "Bob starts on the keyframe in flight");
    assert!(
        got[0].payload == f,
        "Bob's first packet is the top layer's keyframe"
    );
    assert!(
        got.iter().all(|r| r.payload != q),
        "and never the bottom layer"
    );
}

/// Mallory floods: every millisecond for five seconds, 20 data-channel messages, 10 RTP
/// packets of garbage through her real SRTP session (any payload type, sequence number and
/// payload) and 10 raw garbage datagrams from her address. Meanwhile Alice talks to Bob in the
/// same conference, Carol to Dave in another, and Erin joins Alice's conference halfway
/// through. Everyone else's media arrives complete and without a gap, nobody's leg ends, and
/// Mallory's flood is cut at her budget and counted.
///
/// This is isolation in the core's logic (budgets, queues, per-peer state); the socket side
/// of a flood (the kernel's receive buffer, `weir_udp_receive_drops_total`) is not simulated.
#[test]
fn a_flooding_participant_costs_the_others_nothing() {
    let mut net = SimNet::default();
    let mallory = net.join(1, VIDEO);
    let alice = net.join(1, VIDEO);
    let bob = net.join(1, WATCH);
    let carol = net.join(2, VIDEO);
    let dave = net.join(2, WATCH);
    assert!(net.run_until(Duration::from_secs(10), |n| n.all_connected()));
    assert!(
        net.run_until(Duration::from_secs(5), |n| n.clients[mallory]
            .channel
            .is_some()),
        "Mallory's data channel opens"
    );
    net.run_for(Duration::from_millis(200));

    let mut noise = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move || {
        noise ^= noise << 13;
        noise ^= noise >> 7;
        noise ^= noise << 17;
        noise
    };
    let mut sent_alice = Vec::new();
    let mut sent_carol = Vec::new();
    let mut erin = None;
    for ms in 0..5000u64 {
        for _ in 0..20 {
            net.send_data(mallory, false, br#"{"type":"m.call.ping","content":{}}"#);
        }
        for k in 0..10 {
            let r = next();
            let garbage: Vec<u8> = (0..(r % 1100) as usize)
                .map(|i| (r >> (i % 56)) as u8)
                .collect();
            net.send_rtp(
                mallory,
                None,
                (r >> 8) as u8 & 0x7f,
                r >> 16 & 0xffff,
                r as u32,
                k % 2 == 0,
                &garbage,
            );
            net.send_raw(mallory, &garbage);
        }
        if ms % 33 == 0 {
            let key = ms % 990 == 0;
            sent_alice.push(net.send_video(alice, None, key, 900));
            sent_carol.push(net.send_video(carol, None, key, 900));
        }
        if ms == 2500 {
            erin = Some(net.join(1, WATCH));
        }
        net.run_for(Duration::from_millis(1));
    }
    net.run_for(Duration::from_millis(100));

    for (who, sent) in [(bob, &sent_alice), (dave, &sent_carol)] {
        let got: Vec<_> = net.clients[who]
            .received
            .iter()
            .filter(|r| sent.contains(&r.payload))
            .collect();
        assert_eq!(
            got.len(),
            sent.len(),
            "participant {who} receives every packet"
        );
        let longest = got
            .windows(2)
            .map(|w| w[1].at.duration_since(w[0].at))
            .max()
            .unwrap_or_default();
        assert!(
            longest < Duration::from_millis(100),
            "participant {who}: a gap of {longest:?}"
        );
    }
    let erin = erin.unwrap();
    let late: Vec<_> = sent_alice[sent_alice.len() - 20..].to_vec();
    assert!(
        late.iter()
            .all(|p| net.clients[erin].received.iter().any(|r| r.payload == *p)),
        "Erin, who joined during the flood, receives Alice"
    );
    let closed: Vec<_> = net
        .log
        .iter()
        .filter_map(|e| match e {
            SfuEvent::PeerClosed { peer, .. } => Some(*peer),
            _ => None,
        })
        .collect();
    assert!(closed.is_empty(), "no leg ended: {closed:?}");
    let stats = weir_sfu::StatsSnapshot::sum([net.stats.as_ref()]);
    let flood = stats
        .drops
        .iter()
        .find(|(r, _)| *r == weir_sfu::DropReason::DataChannelFlood)
        .map_or(0, |(_, n)| *n);
    assert!(
        flood > 50_000,
        "Mallory's flood is cut and counted: {flood}"
    );
}

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
    let voice = Publish {
        audio: true,
        video: false,
        simulcast: false,
    };
    let talkers: Vec<usize> = (0..30).map(|_| net.join(6, voice)).collect();
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
    let stats = weir_sfu::StatsSnapshot::sum([net.stats.as_ref()]);
    let held = stats
        .drops
        .iter()
        .find(|(r, _)| *r == weir_sfu::DropReason::NotLoudest)
        .map_or(0, |(_, n)| *n);
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
    let mut net = SimNet::default();
    let alice = net.join(9, VIDEO);
    let bob = net.join(9, WATCH);
    let carol = net.join(9, WATCH);
    assert!(net.run_until(Duration::from_secs(10), |n| n.all_connected()));
    net.run_for(Duration::from_millis(300));
    net.clients[bob].link.loss_down = 0.05;
    net.clients[alice].link.loss_up = 0.05;
    let mut sent = Vec::new();
    for i in 0..300 {
        // 30 frames a second, 3 packets each, a keyframe every 3 s.
        for k in 0..3 {
            sent.push(net.send_video(alice, None, i % 90 == 0 && k == 0, 1000));
        }
        net.run_for(Duration::from_millis(33));
    }
    net.run_for(Duration::from_millis(500));
    let shares: Vec<f64> = [bob, carol]
        .iter()
        .map(|who| {
            let got = sent
                .iter()
                .filter(|p| net.clients[*who].received.iter().any(|r| r.payload == **p))
                .count();
            got as f64 / sent.len() as f64
        })
        .collect();
    eprintln!(
        "bob {:.2} %, carol {:.2} %",
        shares[0] * 100.0,
        shares[1] * 100.0
    );
    assert!(shares.iter().all(|s| *s > 0.995), "recovered: {shares:?}");
}

/// str0m's send-side estimator, measured before anything trusts it. Alice sends 1.9 Mbit/s
/// of video; Bob's link toward him carries 1 Mbit/s (20 ms delay, 200 ms of queue), Carol's is
/// unconstrained. Starting from 600 kbit/s, Carol's estimate climbs past Alice's rate and
/// Bob's falls below his link's. (What it takes, and what pacing to the estimate costs, is in
/// docs/adaptation.md.)
#[test]
fn the_bandwidth_estimate_rises_on_a_free_link_and_falls_on_a_narrow_one() {
    let mut net = SimNet::new(weir_sfu::SfuConfig {
        estimate_from_bps: Some(600_000),
        ..weir_sfu::SfuConfig::default()
    });
    let camera = Publish {
        audio: false,
        video: true,
        simulcast: false,
    };
    let alice = net.join(10, camera);
    let bob = net.join(10, WATCH);
    let carol = net.join(10, WATCH);
    assert!(net.run_until(Duration::from_secs(10), |n| n.all_connected()));
    net.run_for(Duration::from_millis(300));
    net.clients[bob].link.rate_down_bps = 1_000_000;
    net.clients[bob].link.delay_down = Duration::from_millis(20);
    let (pb, pc) = (net.clients[bob].peer, net.clients[carol].peer);
    let mut bob_late = Vec::new();
    let mut carol_max = 0;
    for frame in 0..450 {
        // 30 frames a second of 8 packets of 1000 bytes: 1.9 Mbit/s.
        for k in 0..8 {
            net.send_video(alice, None, frame % 90 == 0 && k == 0, 1000);
        }
        net.run_for(Duration::from_millis(33));
        carol_max = carol_max.max(net.core.estimate(pc).unwrap_or(0));
        if frame >= 240 {
            bob_late.extend(net.core.estimate(pb));
        }
    }
    assert!(
        carol_max > 2_000_000,
        "the free link's estimate reached {carol_max}"
    );
    let bob_max = bob_late.iter().max().copied().unwrap_or(u64::MAX);
    assert!(
        bob_max < 1_000_000,
        "from 8 s on, the narrow link's estimate stays under 1 Mbit/s: {bob_max}"
    );
}
