//! Story: one conference outgrows its shard. The media plane runs two shards and spreads a
//! conference once it holds two peers on every shard it uses, so a publisher and four
//! watchers end up on both shards. The publisher's video reaches the watchers on the other
//! shard byte for byte; a watcher that joins there late gets its first keyframe from the
//! publisher's shard; audio published on the second shard reaches the publisher on the first;
//! a participant leaving there is withdrawn here; and once the second shard has nobody left,
//! the first stops handing packets over.

use std::collections::HashSet;

use str0m::media::MediaKind;
use weir_sfu::{Command, ConferenceId, PeerId, SfuConfig};

mod support;

use support::{vp8_frame, Client, World};

const CONFERENCE: ConferenceId = ConferenceId(1);
const PUBLISHER: usize = 0;

fn two_shards_spreading_at_two() -> SfuConfig {
    SfuConfig {
        shards: 2,
        spread_conference_above: 2,
        ..SfuConfig::default()
    }
}

/// The shard each peer lives on, as the media plane reports it.
fn shard_of(world: &World, peer: usize) -> Option<usize> {
    world
        .sfu
        .peer_reports(support::DEADLINE)
        .iter()
        .find(|r| r.peer == PeerId(peer as u64))
        .map(|r| r.shard)
}

/// Video frames a client received whose payload is exactly one the publisher sent.
fn frames_received(c: &Client, sent: &HashSet<Vec<u8>>) -> usize {
    c.received.iter().filter(|r| sent.contains(&r.2)).count()
}

/// Video-sized packets a client received that the publisher never sent: a changed byte.
fn foreign_video(c: &Client, sent: &HashSet<Vec<u8>>) -> usize {
    c.received
        .iter()
        .filter(|r| r.2.len() > 100 && !sent.contains(&r.2))
        .count()
}

/// The publisher sends frame `n` (a keyframe when asked for one since the last).
struct Camera {
    seq: u64,
    requests_seen: usize,
    sent: HashSet<Vec<u8>>,
}

impl Camera {
    fn frame(&mut self, w: &mut World) {
        let asked = w.clients[PUBLISHER].keyframe_requests;
        let key = self.seq == 0 || asked > self.requests_seen;
        self.requests_seen = asked;
        let frame = vp8_frame(key, self.seq as u8);
        w.clients[PUBLISHER].send("video", 1000 + self.seq, self.seq as u32 * 3000, &frame);
        self.sent.insert(frame);
        self.seq += 1;
    }
}

#[test]
fn a_conference_spread_over_two_shards_forwards_across_them() {
    let names = ["pub", "w1", "w2", "w3", "w4", "late"];
    let clients = names.iter().map(|n| Client::new(n)).collect();
    let mut world = World::with_clients(clients, two_shards_spreading_at_two(), |tx| tx);

    // The publisher sends video and audio; everyone else sends audio.
    for i in 0..5 {
        let tracks: &[(&str, MediaKind)] = if i == PUBLISHER {
            &[("video", MediaKind::Video), ("audio", MediaKind::Audio)]
        } else {
            &[("audio", MediaKind::Audio)]
        };
        let offer = world.clients[i].offer(tracks);
        world.call_in(i as u64, CONFERENCE, offer);
    }
    world.run_until("the first five connected", |w| {
        w.clients[..5].iter().all(|c| c.connected)
    });
    let shards: Vec<Option<usize>> = (0..5).map(|i| shard_of(&world, i)).collect();
    assert_eq!(
        shards,
        vec![Some(0), Some(0), Some(1), Some(1), Some(0)],
        "two peers on shard 0, then the conference spreads onto shard 1"
    );

    // The publisher's video reaches every watcher, on both shards, byte for byte.
    let mut camera = Camera {
        seq: 0,
        requests_seen: 0,
        sent: HashSet::new(),
    };
    let mut turn = 0u32;
    world.run_until("every watcher receives 20 frames", |w| {
        turn += 1;
        if turn.is_multiple_of(3) {
            camera.frame(w);
        }
        (1..5).all(|i| frames_received(&w.clients[i], &camera.sent) >= 20)
    });
    for c in &world.clients[1..5] {
        assert_eq!(foreign_video(c, &camera.sent), 0, "{}", c.name);
    }
    assert!(world.sfu.stats().spread_out > 0);

    // A watcher joins on shard 1 long after the first keyframe: its start needs a keyframe,
    // which only the publisher's shard can ask the publisher for.
    let asked_before = world.clients[PUBLISHER].keyframe_requests;
    let offer = world.clients[5].offer(&[("audio", MediaKind::Audio)]);
    world.call_in(5, CONFERENCE, offer);
    world.run_until("the late watcher connected", |w| w.clients[5].connected);
    assert_eq!(
        shard_of(&world, 5),
        Some(1),
        "where its conference has fewest"
    );
    world.run_until("the late watcher receives 10 frames", |w| {
        turn += 1;
        if turn.is_multiple_of(3) {
            camera.frame(w);
        }
        frames_received(&w.clients[5], &camera.sent) >= 10
    });
    assert!(world.clients[PUBLISHER].keyframe_requests > asked_before);

    // Audio published on shard 1 reaches the publisher on shard 0.
    let voice = vec![0xA2u8; 60];
    let mut n = 0u64;
    world.run_until("the publisher hears w2", |w| {
        n += 1;
        w.clients[2].send("audio", 500 + n, n as u32 * 960, &voice);
        w.clients[PUBLISHER].received.iter().any(|r| r.2 == voice)
    });

    // w2 leaves: the publisher's shard withdraws its audio (an offer stopping that m-line).
    let inactive_before = world.clients[PUBLISHER].inactive_mids;
    world
        .sfu
        .send(Command::ClosePeer { peer: PeerId(2) })
        .unwrap();
    world.run_until("w2's audio is withdrawn from the publisher", |w| {
        w.clients[PUBLISHER].inactive_mids > inactive_before
    });

    // Everyone on shard 1 leaves: shard 0 stops handing packets over, while it still
    // forwards to its own watchers.
    for peer in [3, 5] {
        world
            .sfu
            .send(Command::ClosePeer { peer: PeerId(peer) })
            .unwrap();
    }
    world.run_until("shard 1 is empty", |w| {
        w.sfu
            .peer_reports(support::DEADLINE)
            .iter()
            .all(|r| r.shard == 0)
    });
    // Shard 0's counters are published each housekeeping round, after the turn's messages:
    // the first round after shard 1 emptied has seen the span change. Wait for it, then for
    // 20 more frames to reach watcher 1, counted.
    let shard0 = |w: &World| w.sfu.shard_stats()[0].clone();
    let forwarded = shard0(&world).rtp_forwarded;
    world.run_until("shard 0's counters move on", |w| {
        turn += 1;
        if turn.is_multiple_of(3) {
            camera.frame(w);
        }
        shard0(w).rtp_forwarded > forwarded
    });
    let handed = shard0(&world).spread_out;
    let received = frames_received(&world.clients[1], &camera.sent);
    let forwarded = shard0(&world).rtp_forwarded;
    world.run_until("watcher 1 receives 20 more frames, counted", |w| {
        turn += 1;
        if turn.is_multiple_of(3) {
            camera.frame(w);
        }
        frames_received(&w.clients[1], &camera.sent) >= received + 20
            && shard0(w).rtp_forwarded >= forwarded + 20
    });
    assert_eq!(
        shard0(&world).spread_out,
        handed,
        "nothing handed to a shard with nobody of the conference"
    );
}

/// The layers a publisher was told to encode, message by message (`io.weir.layers`).
fn layers_told(c: &Client) -> Vec<Vec<String>> {
    c.messages
        .iter()
        .filter_map(|m| serde_json::from_str::<serde_json::Value>(m).ok())
        .filter(|v| v["type"] == "io.weir.layers")
        .map(|v| {
            v["content"]["active"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|r| r.as_str().map(str::to_string))
                .collect()
        })
        .collect()
}

fn watch(world: &World, peer: u64, height: u32) {
    let subscriptions = vec![weir_sfu::Subscription {
        stream_id: "pub-stream".into(),
        track_id: "pub-video".into(),
        max_height: Some(height),
        source_height: Some(720),
    }];
    world
        .sfu
        .send(Command::Subscribe {
            peer: PeerId(peer),
            subscriptions,
        })
        .unwrap();
}

/// Dynacast across shards: the publisher's shard decides which layers it encodes, but a
/// watcher on the other shard needs them too. Both watchers show the camera small, and the
/// publisher is told to encode its quarter layer alone; the watcher on the other shard
/// enlarges its tile, and the publisher is told to encode every layer again.
#[test]
fn a_watcher_on_another_shard_switches_a_publishers_layers_back_on() {
    let names = ["pub", "w1", "w2"];
    let clients = names.iter().map(|n| Client::new(n)).collect();
    let mut world = World::with_clients(clients, two_shards_spreading_at_two(), |tx| tx);
    world.clients[PUBLISHER].wants_channel = true;
    let offer =
        world.clients[PUBLISHER].offer_with(&[("video", MediaKind::Video)], Some(&["q", "h", "f"]));
    world.call_in(0, CONFERENCE, offer);
    for i in 1..3 {
        let offer = world.clients[i].offer(&[("audio", MediaKind::Audio)]);
        world.call_in(i as u64, CONFERENCE, offer);
    }
    world.run_until("all connected, the publisher's data channel open", |w| {
        w.clients.iter().all(|c| c.connected) && w.clients[PUBLISHER].channel.is_some()
    });
    assert_eq!(shard_of(&world, 2), Some(1), "w2 is on the other shard");
    world.run_until("both watchers receive the video m-line", |w| {
        w.log
            .iter()
            .filter(|e| matches!(e, weir_sfu::SfuEvent::Offer { .. }))
            .count()
            >= 2
    });

    watch(&world, 1, 180);
    watch(&world, 2, 180);
    world.run_until("the publisher is told to encode q alone", |w| {
        layers_told(&w.clients[PUBLISHER]).last() == Some(&vec!["q".to_string()])
    });
    watch(&world, 2, 720);
    world.run_until("the publisher is told to encode every layer again", |w| {
        layers_told(&w.clients[PUBLISHER]).last()
            == Some(&vec!["q".to_string(), "h".to_string(), "f".to_string()])
    });
}

/// Speakers of a spread conference are reported once. Every shard of it sees all its audio
/// and runs the same detection, so each would report the same change; only the lowest shard
/// does. The one talking here sits on the other shard.
#[test]
fn a_spread_conference_reports_its_speaker_once() {
    let names = ["a", "b", "talker"];
    let clients = names.iter().map(|n| Client::new(n)).collect();
    let mut world = World::with_clients(clients, two_shards_spreading_at_two(), |tx| tx);
    for i in 0..3 {
        let offer = world.clients[i].offer(&[("audio", MediaKind::Audio)]);
        world.call_in(i as u64, CONFERENCE, offer);
    }
    world.run_until("all connected", |w| w.clients.iter().all(|c| c.connected));
    assert_eq!(
        shard_of(&world, 2),
        Some(1),
        "the talker is on the other shard"
    );
    let talker_reported = |w: &World| {
        w.log
            .iter()
            .filter(|e| {
                matches!(e, weir_sfu::SfuEvent::Speakers { dominant: Some(d), .. }
                    if d.publisher == PeerId(2))
            })
            .count()
    };
    // The talker speaks (everyone else is quiet), 20 ms packets.
    let mut n = 0u64;
    let mut send = |w: &mut World| {
        n += 1;
        w.clients[2].send_audio_level("audio", 100 + n, n as u32 * 960, 20);
        for quiet in 0..2 {
            w.clients[quiet].send_audio_level("audio", 100 + n, n as u32 * 960, 127);
        }
        n
    };
    world.run_until("the talker is reported dominant", |w| {
        send(w);
        talker_reported(w) > 0
    });
    // A second's more speech: both shards have evaluated it many times over by then.
    let heard = |w: &World| w.clients[0].received.len();
    let target = heard(&world) + 50;
    world.run_until("a second more of speech reaches a", |w| {
        send(w);
        heard(w) >= target
    });
    let speakers: Vec<_> = world
        .log
        .iter()
        .filter(|e| matches!(e, weir_sfu::SfuEvent::Speakers { .. }))
        .collect();
    assert_eq!(talker_reported(&world), 1, "{speakers:?}");
}
