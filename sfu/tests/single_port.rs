//! Story: the focus runs two shards on one UDP port (`single_port`). The kernel spreads clients
//! over the two sockets by their address, so a shard receives datagrams for the other shard's
//! participants and hands them over. First the rules, on one shard's core: a check names its
//! shard by the ufrag, and that client's later datagrams follow it without being parsed; a
//! STUN response names nobody and goes to every other shard; a claim teaches the shard whose
//! an address is. Then a real media plane on loopback: two conferences on two shards, every
//! participant on the one port, each conference's video reaching all its watchers.

use std::net::SocketAddr;
use std::time::Duration;

use str0m::media::MediaKind;
use weir_sfu::sim::{Publish, SimNet};
use weir_sfu::{ConferenceId, SfuConfig, ShardMessage};

mod support;

use support::{stun_check as check, vp8_frame, Client, World};

fn two_shards_one_port() -> SfuConfig {
    SfuConfig {
        shards: 2,
        single_port: true,
        estimate_from_bps: None,
        ..SfuConfig::default()
    }
}

/// A STUN binding success response (no USERNAME: it answers a check we sent).
fn response() -> Vec<u8> {
    let mut m = vec![0x01, 0x01, 0, 0, 0x21, 0x12, 0xa4, 0x42];
    m.extend_from_slice(&[9; 12]);
    m
}

fn outgoing(net: &mut SimNet) -> Vec<(Option<usize>, ShardMessage)> {
    net.core
        .take_outgoing()
        .map(|o| (o.to, o.message))
        .collect()
}

#[test]
fn a_shard_hands_over_what_belongs_to_the_other_and_learns_whose_an_address_is() {
    // Shard 0's core. Its participants here only lend their addresses: the clock does not
    // run, so they never send a check of their own, and the core knows none of them.
    let mut net = SimNet::new(two_shards_one_port());
    let stranger = net.join(9, Publish::NOTHING);
    let other = net.join(9, Publish::NOTHING);
    assert!(outgoing(&mut net).is_empty());
    let from = net.clients[stranger].addr;

    // A check for a peer of shard 1 (its ufrag starts "1z"): handed to shard 1.
    net.send_raw(stranger, &check("1zAbCd:theirs"));
    let out = outgoing(&mut net);
    assert!(
        matches!(&out[..], [(Some(1), ShardMessage::Datagram { origin: 0, from: f, .. })] if *f == from),
        "{out:?}"
    );
    // Its DTLS and media follow it there, unparsed.
    net.send_raw(stranger, &[22, 254, 253, 0, 0]);
    let out = outgoing(&mut net);
    assert!(
        matches!(&out[..], [(Some(1), ShardMessage::Datagram { .. })]),
        "{out:?}"
    );

    // A check for our own shard, or for a shard that does not exist, is not handed anywhere.
    net.send_raw(other, &check("0zNope:x"));
    net.send_raw(other, &check("7zNope:x"));
    assert!(outgoing(&mut net).is_empty());

    // A response names nobody: every other shard gets it; the one that takes it claims the
    // address, and from then on it is handed straight there.
    net.send_raw(other, &response());
    let out = outgoing(&mut net);
    assert!(
        matches!(&out[..], [(None, ShardMessage::Datagram { .. })]),
        "{out:?}"
    );
    let addr = net.clients[other].addr;
    net.core
        .handle_shard_message(ShardMessage::Claim { addr, owner: 1 }, net.now());
    net.send_raw(other, &[22, 254, 253, 0, 0]);
    let out = outgoing(&mut net);
    assert!(
        matches!(&out[..], [(Some(1), ShardMessage::Datagram { .. })]),
        "{out:?}"
    );
    assert_eq!(
        weir_sfu::StatsSnapshot::sum([net.stats.as_ref()]).handed_over,
        0,
        "published at housekeeping"
    );
    // Housekeeping publishes the count (the participants' own clocks stay still).
    let later = net.now() + Duration::from_millis(150);
    net.core.handle_timeout(later);
    assert_eq!(
        weir_sfu::StatsSnapshot::sum([net.stats.as_ref()]).handed_over,
        4
    );
}

#[test]
fn without_single_port_nothing_is_handed_over() {
    let mut net = SimNet::new(SfuConfig {
        shards: 2,
        estimate_from_bps: None,
        ..SfuConfig::default()
    });
    let stranger = net.join(9, Publish::NOTHING);
    net.send_raw(stranger, &check("1zAbCd:theirs"));
    net.send_raw(stranger, &response());
    assert!(outgoing(&mut net).is_empty());
}

#[test]
fn two_conferences_on_two_shards_share_one_port_and_everyone_gets_their_video() {
    let names = ["a1", "a2", "a3", "a4", "b1", "b2", "b3", "b4"];
    let clients = names.iter().map(|n| Client::new(n)).collect();
    let mut world = World::with_clients(clients, two_shards_one_port(), |tx| tx);
    let ports: Vec<u16> = world
        .sfu
        .local_addrs()
        .iter()
        .map(SocketAddr::port)
        .collect();
    assert_eq!(ports.len(), 2);
    assert_eq!(ports[0], ports[1], "both shards on one port");

    // a1 and b1 publish video, each to three watchers in their own conference.
    for (i, _) in names.iter().enumerate() {
        let conference = ConferenceId(1 + (i / 4) as u64);
        let tracks: &[(&str, MediaKind)] = if i % 4 == 0 {
            &[("video", MediaKind::Video)]
        } else {
            &[("audio", MediaKind::Audio)]
        };
        let offer = world.clients[i].offer(tracks);
        world.call_in(i as u64, conference, offer);
    }
    world.run_until("everyone connected", |w| {
        w.clients.iter().all(|c| c.connected)
    });
    let mut seq = 100u64;
    let mut turn = 0u32;
    world.run_until("every watcher receives its publisher's video", |w| {
        turn += 1;
        if turn.is_multiple_of(3) && seq < 200 {
            for publisher in [0, 4] {
                let frame = vp8_frame(seq == 100, seq as u8);
                w.clients[publisher].send("video", seq, seq as u32 * 3000, &frame);
            }
            seq += 1;
        }
        w.clients
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 4 != 0)
            .all(|(_, c)| c.received.iter().filter(|r| r.2.len() > 100).count() >= 20)
    });
    let stats = world.sfu.stats();
    eprintln!(
        "handed over between shards: {} datagrams (clients spread over the sockets by the kernel)",
        stats.handed_over
    );
}
