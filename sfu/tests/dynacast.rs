//! Dynacast on the shard core, in the simulated network (`weir_sfu::sim`): a publisher is told
//! which simulcast layers anyone needs (`io.weir.layers`), and the simulated camera, like weir's
//! web client, stops encoding the others. The policy is in docs/adaptation.md.

use std::time::Duration;

use weir_sfu::forward::LAYER_OFF_DELAY;
use weir_sfu::sim::{Camera, Publish, SimNet};

const SIMULCAST: Publish = Publish {
    audio: false,
    video: true,
    simulcast: true,
};

/// Bob shows Alice's camera in a 180-line tile: after `LAYER_OFF_DELAY` Alice is told to
/// encode only her quarter layer, stops sending the others, and Bob's picture goes on. Bob
/// enlarges the tile to 720 lines: the other layers are switched on at once, each starting
/// with a keyframe, and Bob is on the full one within 8 s (as fast as allocation climbs
/// with his estimate, as in `allocation.rs`), starting on a keyframe; the layers below it stay on (they
/// are what Bob falls back to if his link narrows). Bob leaves: nobody needs any layer, and
/// Alice stops sending video at all.
#[test]
fn a_publisher_encodes_only_the_layers_someone_watches() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let mut net = SimNet::new(weir_sfu::SfuConfig::default());
    let alice = net.join(20, SIMULCAST);
    let bob = net.join(20, Publish::NOTHING);
    assert!(net.run_until(Duration::from_secs(10), |n| n.all_connected()));
    let mut cam = Camera::new(alice, &Camera::SIMULCAST);
    net.subscribe_video(bob, alice, 180);
    cam.run(&mut net, Duration::from_secs(1));
    assert!(
        cam.off.is_empty(),
        "nothing is switched off before the delay"
    );
    cam.run(&mut net, LAYER_OFF_DELAY + Duration::from_secs(1));
    assert_eq!(off(&cam), ["f", "h"], "Alice was told to stop h and f");
    assert_eq!(
        layers_told(&net, alice),
        [vec!["q".to_string()]],
        "one message, naming the one layer needed"
    );

    let before = cam.packets_by_rank.clone();
    let got_before = cam.video_of(&net, bob).len();
    let asked_before = net.clients[alice].keyframe_requests.len();
    cam.run(&mut net, Duration::from_secs(2));
    let sent_since = |rank: u8| cam.packets_by_rank[&rank] - before[&rank];
    assert_eq!((sent_since(3), sent_since(4)), (0, 0), "h and f stopped");
    assert!(
        sent_since(2) >= 59,
        "q goes on: {} packets in 2 s",
        sent_since(2)
    );
    assert!(
        cam.video_of(&net, bob).len() >= got_before + 59,
        "and so does Bob's picture: {} packets in 2 s",
        cam.video_of(&net, bob).len() - got_before
    );
    assert!(
        net.clients[alice].keyframe_requests[asked_before..]
            .iter()
            .all(|(_, rid)| rid.is_some_and(|r| r.to_string() == "q")),
        "no keyframe request for a layer nobody watches"
    );

    net.subscribe_video(bob, alice, 720);
    let switched_at = net.now();
    let mut first_f = None;
    for i in 0..240 {
        cam.frame(&mut net);
        assert!(
            i < 2 || cam.off.is_empty(),
            "h and f are switched on within a round trip"
        );
        first_f = cam
            .video_of(&net, bob)
            .into_iter()
            .find(|r| r.at >= switched_at && cam.rank(&r.payload) == 4)
            .map(|r| (r.at, r.payload.clone()));
        if first_f.is_some() {
            break;
        }
    }
    let (at, payload) = first_f.expect("Bob on the full layer within 8 s of asking");
    assert_eq!(
        payload[1] & 1,
        0,
        "the first packet of f Bob gets is a keyframe"
    );
    assert!(at.duration_since(switched_at) < Duration::from_secs(8));
    cam.run(&mut net, LAYER_OFF_DELAY + Duration::from_secs(1));
    assert!(cam.off.is_empty(), "q and h stay on below f");

    net.leave(bob);
    cam.run(&mut net, LAYER_OFF_DELAY + Duration::from_secs(1));
    assert_eq!(
        off(&cam),
        ["f", "h", "q"],
        "nobody watches: nothing is encoded"
    );
    assert_eq!(
        layers_told(&net, alice).last().map(Vec::len),
        Some(0),
        "the last message names no layer"
    );
}

/// The layers the camera does not encode, sorted.
fn off(cam: &Camera) -> Vec<&'static str> {
    let mut off = cam.off.clone();
    off.sort_unstable();
    off
}

/// The `active` lists of the `io.weir.layers` messages participant `who` received.
fn layers_told(net: &SimNet, who: usize) -> Vec<Vec<String>> {
    net.clients[who]
        .messages
        .iter()
        .filter_map(|(_, m)| serde_json::from_str::<serde_json::Value>(m).ok())
        .filter(|v| v["type"] == "io.weir.layers")
        .map(|v| {
            v["content"]["active"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|r| r.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default()
        })
        .collect()
}
