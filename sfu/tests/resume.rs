//! Story: Bob's link narrows below Alice's one video, and the focus pauses it and tells him.
//! When his link widens the video may flow again, but it can only restart on a keyframe,
//! and Alice's encoder is busy: it leaves the first request, and any in the second after it,
//! unanswered. Bob is told the video flows again only when it does, with its first packet,
//! not when the focus decided: in between his tile would show a frozen picture said to flow.

use std::time::{Duration, Instant};

use weir_sfu::sim::{Camera, Publish, SimNet};

const ONE_LAYER: Publish = Publish {
    audio: true,
    video: true,
    simulcast: false,
};

/// When Bob was told that a video flows again, after message `from`.
fn told_flowing(net: &SimNet, bob: usize, from: usize) -> Option<Instant> {
    net.clients[bob].messages[from..]
        .iter()
        .find(|(_, m)| m.contains("io.weir.paused") && m.contains("\"paused\":false"))
        .map(|(at, _)| *at)
}

#[test]
fn a_paused_video_is_told_flowing_again_with_its_first_packet() {
    let mut net = SimNet::new(weir_sfu::SfuConfig {
        estimate_from_bps: Some(1_000_000),
        ..weir_sfu::SfuConfig::default()
    });
    let alice = net.join(10, ONE_LAYER);
    let bob = net.join(10, Publish::NOTHING);
    assert!(net.run_until(Duration::from_secs(10), |n| n.all_connected()));
    // 1.9 Mbit/s of video: flowing to Bob, then paused when his link narrows to 1 Mbit/s.
    let mut cam = Camera::new(alice, &[(None, 0, &[1000; 8])]);
    cam.run(&mut net, Duration::from_secs(8));
    assert!(!cam.video_of(&net, bob).is_empty());
    net.clients[bob].link.rate_down_bps = 1_000_000;
    net.clients[bob].link.delay_down = Duration::from_millis(20);
    cam.run(&mut net, Duration::from_secs(11));
    let told = net.clients[bob].messages.len();
    assert!(
        net.clients[bob]
            .messages
            .iter()
            .any(|(_, m)| m.contains("\"paused\":true")),
        "Bob was told his video is paused"
    );
    let before = cam.video_of(&net, bob).len();

    // His link widens. The first keyframe request after it, and those within a second of
    // it, go unanswered.
    net.clients[bob].link.rate_down_bps = 5_000_000;
    let asked = net.clients[alice].keyframe_requests.len();
    let mut first_request: Option<Instant> = None;
    let mut resumed = false;
    for _ in 0..600 {
        if first_request.is_none() && net.clients[alice].keyframe_requests.len() > asked {
            first_request = Some(net.now());
        }
        if first_request.is_none_or(|t| net.now().duration_since(t) < Duration::from_secs(1)) {
            cam.ignore_keyframe_requests(&net);
        }
        cam.frame(&mut net);
        if cam.video_of(&net, bob).len() > before {
            resumed = true;
            break;
        }
    }
    assert!(resumed, "Bob's video flows again");
    let first_request = first_request.expect("the focus asked for a keyframe");
    cam.run(&mut net, Duration::from_millis(500));
    let first_packet = cam.video_of(&net, bob)[before].at;
    assert!(
        first_packet.duration_since(first_request) >= Duration::from_secs(1),
        "the keyframe came a second after it was first asked for"
    );
    let flowing = told_flowing(&net, bob, told).expect("Bob is told it flows again");
    let (early, late) = (
        first_packet.saturating_duration_since(flowing),
        flowing.saturating_duration_since(first_packet),
    );
    assert!(
        early < Duration::from_millis(200) && late < Duration::from_millis(200),
        "told {early:?} before / {late:?} after the first packet arrived"
    );
}
