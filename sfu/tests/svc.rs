//! Scalable video on the shard core, in the simulated network (`weir_sfu::sim`): Alice sends
//! one VP9 stream with two spatial layers, key-frame SVC, each frame described by the
//! dependency descriptor (`forward::svc`). Bob shows her in a 180-line tile and gets only the
//! small layer's frames; Carol shows her at 720 lines and gets the keyframe's small frame and
//! then only the large layer's. Every payload arrives as sent, and the last packet of what each
//! gets of a picture carries the RTP marker. A packet whose descriptor cannot be read is
//! dropped for both and counted, and the pictures after it play on.

use std::sync::Arc;
use std::time::Duration;

use weir_sfu::forward::dependency_descriptor::write::{descriptor, l2t1_key};
use weir_sfu::sim::{payload_tag, Publish, SimNet};
use weir_sfu::stats::DropReason;

const ONE_STREAM: Publish = Publish {
    audio: false,
    video: true,
    simulcast: false,
};

/// One picture Alice sends: the payloads of its small frame (one packet) and of its large one
/// (two packets).
struct Picture {
    small: Vec<Arc<[u8]>>,
    large: Vec<Arc<[u8]>>,
}

/// Alice, Bob (180-line tile) and Carol (720 lines), connected, with estimation off so that
/// only the tiles decide.
fn room() -> (SimNet, usize, usize, usize) {
    let mut net = SimNet::new(weir_sfu::SfuConfig {
        estimate_from_bps: None,
        ..weir_sfu::SfuConfig::default()
    });
    let alice = net.join(1, ONE_STREAM);
    let bob = net.join(1, Publish::NOTHING);
    let carol = net.join(1, Publish::NOTHING);
    assert!(net.run_until(Duration::from_secs(10), |n| n.all_connected()));
    net.subscribe_video(bob, alice, 180);
    net.subscribe_video(carol, alice, 720);
    net.run_for(Duration::from_millis(500));
    (net, alice, bob, carol)
}

/// Alice sends picture `p` (frames numbered two per picture), a keyframe carrying the
/// structure if `key`, and a frame's time passes.
fn send_picture(net: &mut SimNet, alice: usize, p: u16, key: bool) -> Picture {
    let n = 1000 + 2 * p;
    let (small_template, large_template) = if key { (0, 2) } else { (1, 3) };
    let small_descriptor = match key {
        true => descriptor(true, true, small_template, n, Some(&l2t1_key)),
        false => descriptor(true, true, small_template, n, None),
    };
    let small = vec![net.send_described(alice, key, 300, small_descriptor, false)];
    let large = vec![
        net.send_described(
            alice,
            false,
            600,
            descriptor(true, false, large_template, n + 1, None),
            false,
        ),
        net.send_described(
            alice,
            false,
            600,
            descriptor(false, true, large_template, n + 1, None),
            true,
        ),
    ];
    net.run_for(Duration::from_millis(33));
    Picture { small, large }
}

/// What `who` received, as (payload tag, marker), oldest first.
fn received(net: &SimNet, who: usize) -> Vec<(u64, bool)> {
    net.clients[who]
        .received
        .iter()
        .filter_map(|r| Some((payload_tag(&r.payload)?, r.marker)))
        .collect()
}

fn tags(payloads: &[Arc<[u8]>]) -> Vec<u64> {
    payloads.iter().filter_map(|p| payload_tag(p)).collect()
}

#[test]
fn each_subscriber_gets_the_spatial_layer_that_fits_its_tile() {
    let (mut net, alice, bob, carol) = room();
    let pictures: Vec<Picture> = (0..10)
        .map(|p| send_picture(&mut net, alice, p, p == 0))
        .collect();
    net.run_for(Duration::from_millis(200));

    // Bob: the small frame of every picture, each the last of its picture for him.
    let bob_wanted: Vec<(u64, bool)> = pictures
        .iter()
        .flat_map(|p| tags(&p.small))
        .map(|t| (t, true))
        .collect();
    assert_eq!(received(&net, bob), bob_wanted);
    // Carol: the keyframe's small frame (her large one refers to it), then only the large
    // frames, the marker on each one's last packet as Alice sent it.
    let mut carol_wanted: Vec<(u64, bool)> = tags(&pictures[0].small)
        .into_iter()
        .map(|t| (t, false))
        .collect();
    for p in &pictures {
        let t = tags(&p.large);
        carol_wanted.extend([(t[0], false), (t[1], true)]);
    }
    assert_eq!(received(&net, carol), carol_wanted);
    // Byte for byte as sent, in sequence numbers without a gap.
    for who in [bob, carol] {
        let got = &net.clients[who].received;
        let sent: Vec<&Arc<[u8]>> = pictures
            .iter()
            .flat_map(|p| p.small.iter().chain(&p.large))
            .collect();
        for r in got {
            assert!(
                sent.iter().any(|s| s[..] == r.payload[..]),
                "a payload changed"
            );
        }
        for w in got.windows(2) {
            assert_eq!(
                w[1].seq,
                w[0].seq.wrapping_add(1),
                "a gap in {who}'s sequence"
            );
        }
    }
}

#[test]
fn an_unreadable_descriptor_is_dropped_and_counted_and_the_pictures_after_it_play() {
    let (mut net, alice, bob, carol) = room();
    for p in 0..3 {
        send_picture(&mut net, alice, p, p == 0);
    }
    let bob_before = net.clients[bob].received.len();
    let carol_before = net.clients[carol].received.len();
    // Too short to be a descriptor, then one naming a template the structure lacks.
    net.send_described(alice, false, 300, vec![0xc1], true);
    net.send_described(
        alice,
        false,
        300,
        descriptor(true, true, 9, 1006, None),
        true,
    );
    net.run_for(Duration::from_millis(100));
    assert_eq!(
        net.dropped(DropReason::BadDescriptor),
        4,
        "each of the two packets, for each of the two subscribers"
    );
    assert_eq!(net.clients[bob].received.len(), bob_before);
    assert_eq!(net.clients[carol].received.len(), carol_before);
    let next = send_picture(&mut net, alice, 4, false);
    net.run_for(Duration::from_millis(100));
    let last = |who: usize| received(&net, who).last().map(|(t, _)| *t);
    assert_eq!(last(bob), tags(&next.small).first().copied());
    assert_eq!(last(carol), tags(&next.large).last().copied());
}
