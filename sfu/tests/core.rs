//! The shard core without sockets or a clock: participants are real WebRTC engines in memory
//! (`weir_sfu::sim`), time is virtual, so a scenario runs nearly the same way each time.

use std::time::Duration;

use weir_sfu::sim::{Publish, SimNet};
use weir_sfu::SfuEvent;

/// The forwarding core alone: no bandwidth estimation, so every subscriber gets every packet
/// of its layer from the first, whatever the rates these scenarios send at (some send far
/// more than a camera would). Allocation under an estimate is in `tests/adaptation.rs`.
fn forwarding_only() -> SimNet {
    SimNet::new(weir_sfu::SfuConfig {
        estimate_from_bps: None,
        ..weir_sfu::SfuConfig::default()
    })
}

const VIDEO: Publish = Publish::CAMERA;
const WATCH: Publish = Publish::NOTHING;

/// Alice publishes; Bob and Carol join and connect; both receive the video weir was offered
/// for them, every payload identical to what Alice sent, sequence numbers without a gap.
#[test]
fn every_subscriber_receives_every_payload_unchanged_and_in_sequence() {
    let mut net = forwarding_only();
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
    let mut net = forwarding_only();
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
    let mut net = forwarding_only();
    let people: Vec<usize> = (0..25).map(|_| net.join(3, VIDEO)).collect();
    assert!(
        net.run_until(Duration::from_secs(20), |n| n.all_connected()),
        "everyone connects"
    );
    net.run_for(Duration::from_millis(500));
    // Each offer travels in a to-device event, which Synapse caps at 64 KiB of JSON (line
    // breaks escaped): 24 forwarded tracks of audio and video must fit with room to spare for
    // their metadata and for longer ids (the load tester's 25-person offers ran 12 KB larger
    // than these and passed the cap before forwarded m-lines offered only their track's codec).
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
        largest < 48 * 1024,
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
    let mut net = forwarding_only();
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
    let mut net = forwarding_only();
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
    let flood = net.dropped(weir_sfu::DropReason::DataChannelFlood);
    assert!(
        flood > 50_000,
        "Mallory's flood is cut and counted: {flood}"
    );
}
