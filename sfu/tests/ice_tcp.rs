//! Story: Alice's network lets no UDP through. The focus announces a passive ICE-TCP candidate
//! beside its UDP one; Alice's engine connects to it and sends everything over that one TCP
//! connection. She publishes audio and video; Bob, on UDP, receives every packet as she sent
//! it, and his audio reaches her over TCP. Connections that are not ICE-TCP for one of the
//! focus's peers are refused and counted, and cost the call nothing.

use std::io::Write;
use std::net::TcpStream;

use str0m::media::MediaKind;
use weir_sfu::{DropReason, PeerId, SfuConfig, SfuEvent};

mod support;

use support::{vp8_frame, Client, World};

fn with_tcp() -> SfuConfig {
    SfuConfig {
        tcp_port: Some(0),
        ..SfuConfig::default()
    }
}

fn dropped(w: &World, reason: DropReason) -> u64 {
    let s = w.sfu.stats();
    s.drops
        .iter()
        .find(|(r, _)| *r == reason)
        .map_or(0, |(_, n)| *n)
}

#[test]
fn a_participant_without_udp_calls_over_ice_tcp_and_media_flows_both_ways() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let clients = vec![Client::tcp_only("alice"), Client::new("bob")];
    let mut world = World::with_clients(clients, with_tcp(), |tx| tx);
    let tcp_addr = world.sfu.tcp_addr().expect("ICE-TCP is on");

    let offer = world.clients[0].offer(&[("audio", MediaKind::Audio), ("video", MediaKind::Video)]);
    world.call(0, offer);
    world.run_until("alice connected over TCP and her tracks published", |w| {
        w.clients[0].connected
            && w.log
                .iter()
                .filter(|e| matches!(e, SfuEvent::TrackPublished { .. }))
                .count()
                == 2
    });
    let announced: Vec<String> = world
        .log
        .iter()
        .find_map(|e| match e {
            SfuEvent::PeerCreated { candidates, .. } => Some(candidates.clone()),
            _ => None,
        })
        .unwrap()
        .into_iter()
        .map(|c| c.candidate)
        .collect();
    assert!(
        announced.iter().any(|c| c.contains(" tcp ")
            && c.contains(&format!(" {} typ host tcptype passive", tcp_addr.port()))),
        "the focus announces its passive TCP candidate: {announced:?}"
    );
    assert_eq!(world.clients[0].udp_sent, 0, "Alice sent nothing over UDP");
    assert!(world.clients[0].tcp.is_some());

    let offer = world.clients[1].offer(&[("audio", MediaKind::Audio)]);
    world.call(1, offer);
    world.run_until("bob connected and offered alice's tracks", |w| {
        w.clients[1].connected
            && w.log.iter().any(
                |e| matches!(e, SfuEvent::Offer { peer: PeerId(1), tracks, .. } if tracks.len() == 2),
            )
    });

    let mut sent = Vec::new();
    let mut seq = 1000u64;
    let mut turn = 0u32;
    world.run_until("bob receives alice's video, alice bob's audio", |w| {
        turn += 1;
        if turn.is_multiple_of(3) && sent.len() < 40 {
            let payload = vp8_frame(sent.is_empty(), sent.len() as u8);
            w.clients[0].send("video", seq, seq as u32 * 3000, &payload);
            w.clients[1].send("audio", seq, seq as u32 * 960, &[0xf8, sent.len() as u8, 9]);
            sent.push(payload);
            seq += 1;
        }
        let video = w.clients[1]
            .received
            .iter()
            .filter(|r| r.2.len() > 100)
            .count();
        let audio = w.clients[0]
            .received
            .iter()
            .filter(|r| r.2.first() == Some(&0xf8))
            .count();
        video >= 35 && audio >= 30
    });
    let video: Vec<&Vec<u8>> = world.clients[1]
        .received
        .iter()
        .filter(|r| r.2.len() > 100)
        .map(|r| &r.2)
        .collect();
    for (i, got) in video.iter().enumerate() {
        assert_eq!(
            **got, sent[i],
            "payload {i} changed on its way from TCP to UDP"
        );
    }
    let stats = world.sfu.stats();
    assert_eq!(stats.tcp_links, 1, "one ICE-TCP connection: {stats:?}");
    assert_eq!(dropped(&world, DropReason::TcpCongested), 0);
    assert_eq!(
        world.clients[0].udp_sent, 0,
        "Alice still sent nothing over UDP"
    );

    // An operator's view of the two: Alice on TCP publishing two tracks, Bob on UDP.
    let reports = world.sfu.peer_reports(std::time::Duration::from_secs(5));
    assert_eq!(reports.len(), 2, "{reports:?}");
    let (a, b) = (&reports[0], &reports[1]);
    assert_eq!((a.peer, b.peer), (PeerId(0), PeerId(1)));
    assert!(a.over_tcp && !b.over_tcp, "{reports:?}");
    assert_eq!((a.publishes, b.publishes), (2, 1));
    assert!(reports
        .iter()
        .all(|r| r.connected && r.rx_bytes > 0 && r.tx_bytes > 0));
    assert!(b.tx_bytes > 35 * 200, "Bob was sent at least Alice's video");
}

#[test]
fn connections_that_are_not_ice_tcp_for_our_peers_are_refused_and_counted() {
    let clients = vec![Client::new("alice"), Client::new("bob")];
    let mut world = World::with_clients(clients, with_tcp(), |tx| tx);
    let tcp_addr = world.sfu.tcp_addr().expect("ICE-TCP is on");

    // Garbage: a length no ICE-TCP frame has; a frame that is no STUN check; a check for a
    // ufrag no shard made; a connection closed at once.
    let mut hostile = Vec::new();
    for bytes in [
        vec![0xff, 0xff, 1, 2, 3],
        vec![0, 4, 0xde, 0xad, 0xbe, 0xef],
        stun_check("nobody:x"),
        vec![],
    ] {
        let mut s = TcpStream::connect(tcp_addr).unwrap();
        s.write_all(&bytes).unwrap();
        if bytes.is_empty() {
            drop(s);
        } else {
            hostile.push(s);
        }
    }
    // Meanwhile Alice and Bob call over UDP as usual.
    let offer = world.clients[0].offer(&[("video", MediaKind::Video)]);
    world.call(0, offer);
    let offer = world.clients[1].offer(&[("audio", MediaKind::Audio)]);
    world.call(1, offer);
    world.run_until("both connected and the garbage refused", |w| {
        w.clients.iter().all(|c| c.connected) && dropped(w, DropReason::TcpRefused) == 4
    });
    assert_eq!(world.sfu.stats().tcp_links, 0);
}

/// A STUN check naming `username`, framed as ICE-TCP sends it.
fn stun_check(username: &str) -> Vec<u8> {
    let mut framed = Vec::new();
    weir_sfu::tcp::frame(&mut framed, &support::stun_check(username)).unwrap();
    framed
}
