//! What weir's renegotiation offers tell a browser about the tracks they add. Alice shares a
//! camera and Bob a screen (the control plane names his stream a screen, from MSC3077's
//! purpose); Carol joins and is offered both. The camera's retransmission formats carry
//! `rtx-time=300`, so that Chromium asks for a keyframe after 0.9 s without a decodable frame
//! rather than 3 s; the screen's carry none, since a still screen share sends about one frame
//! a second and would draw a keyframe request for each. And each forwarded m-line offers
//! only the codec its track arrives in (the first its publisher offered), which keeps a
//! 25-person meeting's offers well under the 64 KiB a to-device event may take.

use std::time::Duration;

use weir_sfu::sim::{Publish, SimNet};
use weir_sfu::SfuEvent;

const VIDEO: Publish = Publish {
    audio: false,
    video: true,
    simulcast: false,
};

/// The `rtx-time` values on the retransmission formats of the m-line whose msid names
/// `stream`, in the last offer to `peer` that has such an m-line.
fn rtx_times(net: &SimNet, peer: weir_sfu::PeerId, stream: &str) -> Option<Vec<String>> {
    net.log.iter().rev().find_map(|e| {
        let SfuEvent::Offer { peer: p, sdp, .. } = e else {
            return None;
        };
        if *p != peer {
            return None;
        }
        let section = sdp
            .split("\r\nm=")
            .find(|s| s.contains(&format!("a=msid:{stream} ")))?;
        Some(
            section
                .lines()
                .filter(|l| l.starts_with("a=fmtp:") && l.contains("apt="))
                .map(|l| {
                    l.split(';')
                        .find_map(|p| p.strip_prefix("rtx-time="))
                        .unwrap_or("none")
                        .to_string()
                })
                .collect(),
        )
    })
}

#[test]
fn a_forwarded_camera_is_offered_with_rtx_time_and_a_screen_without() {
    let mut net = SimNet::default();
    let alice = net.join(1, VIDEO);
    let bob = net.join(1, VIDEO);
    let (peer, now) = (net.clients[bob].peer, net.now());
    net.core.handle_command(
        weir_sfu::Command::Screens {
            peer,
            streams: vec![format!("stream-{bob}")],
        },
        now,
    );
    let carol = net.join(1, Publish::NOTHING);
    assert!(net.run_until(Duration::from_secs(10), |n| n.all_connected()));
    net.run_for(Duration::from_millis(500));
    let carol_peer = net.clients[carol].peer;

    let camera = rtx_times(&net, carol_peer, &format!("stream-{alice}"))
        .expect("an offer to Carol with Alice's camera");
    assert!(
        !camera.is_empty(),
        "the camera's m-line has retransmission formats"
    );
    assert!(camera.iter().all(|t| t == "300"), "camera: {camera:?}");
    let screen = rtx_times(&net, carol_peer, &format!("stream-{bob}"))
        .expect("an offer to Carol with Bob's screen");
    assert!(!screen.is_empty());
    assert!(screen.iter().all(|t| t == "none"), "screen: {screen:?}");
}

#[test]
fn a_forwarded_video_is_offered_only_in_the_codec_it_arrives_in() {
    let mut net = SimNet::default();
    let alice = net.join(1, VIDEO);
    let carol = net.join(1, Publish::NOTHING);
    assert!(net.run_until(Duration::from_secs(10), |n| n.all_connected()));
    net.run_for(Duration::from_millis(500));
    let carol_peer = net.clients[carol].peer;
    let section = net
        .log
        .iter()
        .rev()
        .find_map(|e| match e {
            SfuEvent::Offer { peer, sdp, .. } if *peer == carol_peer => sdp
                .split("\r\nm=")
                .find(|s| s.contains(&format!("a=msid:stream-{alice} ")))
                .map(String::from),
            _ => None,
        })
        .expect("an offer to Carol with Alice's camera");
    let codecs: Vec<&str> = section
        .lines()
        .filter_map(|l| l.strip_prefix("a=rtpmap:"))
        .filter_map(|l| l.split(' ').nth(1)?.split('/').next())
        .collect();
    assert_eq!(codecs, ["VP8", "rtx"], "{section}");
}
