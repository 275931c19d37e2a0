//! Story: a watcher whose connection cannot come up (everything toward it is lost) still
//! negotiates its m-lines over signalling, so the focus has a copy of Alice's camera ready for
//! it from the start. While it cannot connect, the focus writes nothing toward it: its engine
//! would keep every copy until it connects, or until the connect timeout (33 MB of an
//! 8.8 Mbit/s stream per such leg, in a load test that found it). When the link heals, the
//! watcher starts on a fresh keyframe, with no burst of stale video before it.

use std::time::Duration;

use weir_sfu::sim::{payload_tag, Publish, SimNet};
use weir_sfu::{DropReason, SfuConfig, SfuEvent};

const CAMERA: Publish = Publish {
    audio: false,
    video: true,
    simulcast: false,
};

/// Alice sends one 1000-byte frame, a keyframe if asked for one since `asked`.
fn frame(net: &mut SimNet, alice: usize, asked: &mut usize) -> u64 {
    let requests = net.clients[alice].keyframe_requests.len();
    let key = requests > *asked;
    *asked = requests;
    let sent = net.send_video(alice, None, key, 1000);
    net.run_for(Duration::from_millis(33));
    payload_tag(&sent).expect("tagged")
}

#[test]
fn a_watcher_that_cannot_connect_is_sent_nothing_and_starts_fresh_once_it_does() {
    let mut net = SimNet::new(SfuConfig {
        estimate_from_bps: None,
        ..SfuConfig::default()
    });
    let alice = net.join(1, CAMERA);
    let bob = net.join(1, Publish::NOTHING);
    net.clients[bob].link.loss_down = 1.0;
    let bob_peer = net.clients[bob].peer;
    assert!(net.run_until(Duration::from_secs(10), |n| {
        n.clients[alice].connected
            && n.log
                .iter()
                .any(|e| matches!(e, SfuEvent::Offer { peer, .. } if *peer == bob_peer))
    }));

    // Three seconds of Alice's camera while Bob cannot connect: a keyframe first.
    let mut asked = 0;
    let first = net.send_video(alice, None, true, 1000);
    let before = payload_tag(&first).expect("tagged");
    let mut last_before = before;
    for _ in 0..90 {
        last_before = frame(&mut net, alice, &mut asked);
    }
    assert!(!net.clients[bob].connected);
    assert!(net.clients[bob].received.is_empty());
    net.run_for(Duration::from_millis(200)); // a housekeeping round publishes the counters
    assert!(
        net.dropped(DropReason::NotConnected) >= 90,
        "each frame for Bob dropped and counted: {}",
        net.dropped(DropReason::NotConnected)
    );

    // Bob's link heals: he connects, and receives only what Alice sent after that, starting
    // on a keyframe she was asked for.
    net.clients[bob].link.loss_down = 0.0;
    assert!(net.run_until(Duration::from_secs(10), |n| n.clients[bob].connected));
    let mut fresh = Vec::new();
    for _ in 0..60 {
        fresh.push(frame(&mut net, alice, &mut asked));
    }
    let got: Vec<u64> = net.clients[bob]
        .received
        .iter()
        .filter_map(|r| payload_tag(&r.payload))
        .collect();
    assert!(got.len() >= 30, "Bob's picture runs: {} frames", got.len());
    assert!(
        got.iter().all(|t| *t > last_before),
        "nothing sent before Bob connected reached him: first tags {:?}",
        &got[..got.len().min(5)]
    );
    let first_payload = &net.clients[bob].received[0].payload;
    assert_eq!(first_payload[1] & 0x01, 0, "Bob starts on a keyframe");
    assert!(fresh.contains(&got[0]));
}
