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

/// A move down does not wait behind a stale queue of the layer left (`shard::send_queue`).
/// Bob watches Alice's full layer when one of its frames comes far larger than his
/// connection's pacer lets out in a second (5.3 Mbit, against an estimate that starts at
/// 1 Mbit/s). Allocation takes him to the half layer at once, its queue not stale yet, and
/// 160 ms later his tile shrinks to 180 lines. What is still queued of the large frame has
/// waited past `STALE_BEFORE_KEYFRAME` when the quarter layer's keyframe comes: it is
/// dropped, the keyframe goes first, and nothing of the full layer follows it.
#[test]
fn a_move_down_does_not_wait_behind_a_stale_queue_of_the_layer_left() {
    let frame = Duration::from_millis(33);
    let mut net = SimNet::default();
    let alice = net.join(7, SIMULCAST);
    let bob = net.join(7, Publish::NOTHING);
    assert!(net.run_until(Duration::from_secs(10), |n| n.all_connected()));
    net.subscribe_video(bob, alice, 720);
    // Alice keys every layer when asked, as Chromium does. Returns the quarter layer's
    // keyframe, if this frame was one.
    let mut answered = 0;
    let mut frame_of_all = |net: &mut SimNet, first: bool| {
        let asked = net.clients[alice].keyframe_requests.len();
        let key = first || asked > answered;
        answered = asked;
        let q = net.send_frame(alice, Some("q"), key, &[300], None);
        net.send_frame(alice, Some("h"), key, &[600], None);
        net.send_frame(alice, Some("f"), key, &[1000, 1000], None);
        net.run_for(frame);
        key.then(|| q[0].clone())
    };
    for i in 0..60 {
        frame_of_all(&mut net, i == 0);
    }
    let f_now = net.send_frame(alice, Some("f"), false, &[1000], None);
    net.run_for(frame);
    assert!(
        net.clients[bob]
            .received
            .iter()
            .any(|r| r.payload == f_now[0]),
        "Bob receives the full layer after 2 s"
    );

    let heavy = net.send_frame(alice, Some("f"), false, &[1100; 600], None);
    for _ in 0..4 {
        frame_of_all(&mut net, false);
    }
    net.subscribe_video(bob, alice, 180);
    let keyframe = (0..15)
        .filter_map(|_| frame_of_all(&mut net, false))
        .next()
        .expect("the move down asked Alice for a keyframe");
    for _ in 0..15 {
        frame_of_all(&mut net, false);
    }
    net.run_for(Duration::from_secs(1));

    let got: Vec<_> = net.clients[bob]
        .received
        .iter()
        .map(|r| r.payload.clone())
        .collect();
    let at = got
        .iter()
        .position(|p| *p == keyframe)
        .expect("Bob receives the quarter layer's keyframe");
    let of_heavy = |ps: &[std::sync::Arc<[u8]>]| ps.iter().filter(|p| heavy.contains(p)).count();
    assert!(
        of_heavy(&got[..at]) < heavy.len(),
        "the large frame was still queued when the keyframe came ({} of {} packets before it)",
        of_heavy(&got[..at]),
        heavy.len()
    );
    assert_eq!(
        of_heavy(&got[at..]),
        0,
        "packets of the stale full-layer frame followed the keyframe"
    );
}
