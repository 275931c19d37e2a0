//! Keyframes from a publisher that answers like Chromium (`weir_sfu::sim::Camera`): a request
//! for any layer keys every simulcast layer at once, and a request within 300 ms of the last
//! one acted on is dropped. docs/adaptation.md, "Keyframe requests and Chromium's window".

use std::time::Duration;

use weir_sfu::sim::{Camera, Publish, SimNet};

const SIMULCAST: Publish = Publish {
    audio: false,
    video: true,
    simulcast: true,
};

/// Bob's tile shrinks from 720 to 180 lines and grows back, five times. Each move down asks
/// Alice for a keyframe of the quarter layer, and her answer keys the full layer too, in the
/// same picture. The full layer's keyframe is the largest frame there is, and Bob is leaving
/// that layer: he is never sent any of it, whichever keyframe reaches the focus first.
/// (Forwarded, it would sit in a narrow link's queue in front of the keyframe he switches
/// on.) Every move down lands him on the quarter layer's keyframe.
///
/// Which layer's packets leave Alice's engine first depends on its send streams' order,
/// which differs from run to run, so the story is played on twelve calls: the full layer
/// comes first in about half of them (in none, one time in 4096).
#[test]
fn a_subscriber_moving_down_is_not_sent_the_old_layers_keyframe() {
    for call in 0..12 {
        let mut net = SimNet::new(weir_sfu::SfuConfig {
            estimate_from_bps: None,
            ..weir_sfu::SfuConfig::default()
        });
        let alice = net.join(7, SIMULCAST);
        let bob = net.join(7, Publish::NOTHING);
        assert!(net.run_until(Duration::from_secs(10), |n| n.all_connected()));
        let mut cam = Camera::new(alice, &Camera::SIMULCAST);
        net.subscribe_video(bob, alice, 720);
        cam.run(&mut net, Duration::from_secs(2));

        for i in 0..5 {
            net.subscribe_video(bob, alice, 720);
            cam.run(&mut net, Duration::from_secs(1));
            if i % 2 == 1 {
                // One frame more: the camera sends its layers best first every other frame.
                cam.frame(&mut net);
            }
            let on_f = cam.video_of(&net, bob).last().map(|r| cam.rank(&r.payload));
            assert_eq!(on_f, Some(4), "call {call}: Bob back on the full layer");

            let from = cam.video_of(&net, bob).len();
            net.subscribe_video(bob, alice, 180);
            cam.run(&mut net, Duration::from_secs(1));
            let after: Vec<_> = cam.video_of(&net, bob)[from..]
                .iter()
                .filter_map(|r| cam.frame_of(&r.payload))
                .collect();
            let first_q = after
                .iter()
                .position(|f| f.rank == 2)
                .unwrap_or_else(|| panic!("call {call}: Bob moved down to the quarter layer"));
            assert!(
                after[first_q].keyframe,
                "call {call}: the move lands on a keyframe"
            );
            assert!(
                after[..first_q].iter().all(|f| !f.keyframe),
                "call {call}: Bob was sent a keyframe of the layer he was leaving"
            );
            // The full layer was keyed in that picture too: Alice keys every layer.
            let keyed_f = cam
                .sent
                .keys()
                .filter_map(|p| cam.frame_of(p))
                .any(|f| f.rank == 4 && f.keyframe && f.number == after[first_q].number);
            assert!(
                keyed_f,
                "call {call}: the move's keyframe came on every layer"
            );
        }
    }
}
