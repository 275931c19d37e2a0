//! Temporal layers in the simulated network (`weir_sfu::sim`): Alice's camera encodes each
//! simulcast layer with three temporal layers, as Chromium does (L1T3). When Carol's link
//! narrows below even the smallest layer, she is sent that layer at a lower frame rate instead
//! of nothing; what she gets stays a clean stream: whole frames, no gap in the sequence
//! numbers, picture ids counting up by one, and payloads byte for byte what Alice sent except
//! the renumbered picture id. Bob, on a free link, gets every frame untouched.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use weir_sfu::sim::{payload_tag, unwrap_seqs, Camera, CameraLayer, Publish, Received, SimNet};

/// Chromium's three layers, the smallest in two packets a frame so that a frame can be
/// checked whole: q about 170, h 500 and f 1500 kbit/s with the per-packet overhead.
const LAYERS: [CameraLayer; 3] = [
    (Some("q"), 2, &[300, 300]),
    (Some("h"), 3, &[1000, 1000]),
    (Some("f"), 4, &[1000, 1000, 1000, 1000, 1000, 1000]),
];

/// What one participant received of the camera between two times: per RTP timestamp (a
/// frame), its packets as (sequence number, received payload, original payload, rank, tid,
/// sent picture id).
type Frames<'a> = BTreeMap<
    u32,
    Vec<(
        i64,
        &'a Received,
        &'a (std::sync::Arc<[u8]>, u8, weir_sfu::sim::Vp8Temporal),
    )>,
>;

fn frames<'a>(net: &'a SimNet, cam: &'a Camera, who: usize, from: usize) -> Frames<'a> {
    let got = &cam.video_of(net, who)[from..];
    let seqs = unwrap_seqs(got.iter().map(|r| r.seq));
    let mut out: Frames = BTreeMap::new();
    for (r, seq) in got.iter().zip(seqs) {
        let tag = payload_tag(&r.payload).expect("a tagged payload");
        let sent = &cam.by_tag[&tag];
        out.entry(r.timestamp).or_default().push((seq, r, sent));
    }
    out
}

/// A received payload is what the camera sent except, at most, the picture id and TL0PICIDX
/// (bytes 2 to 4 of the simulated descriptor), which the focus renumbers.
fn same_but_numbers(received: &[u8], original: &[u8]) {
    assert_eq!(received.len(), original.len());
    let differs: Vec<usize> = (0..original.len())
        .filter(|&i| received[i] != original[i])
        .collect();
    assert!(
        differs.iter().all(|i| (2..=4).contains(i)),
        "only the picture id and TL0PICIDX may be renumbered, bytes {differs:?} changed"
    );
}

/// The received payload's picture id.
fn picture_id(p: &[u8]) -> u16 {
    u16::from(p[2] & 0x7f) << 8 | u16::from(p[3])
}

#[test]
fn a_link_too_narrow_for_the_smallest_layer_gets_it_at_a_lower_frame_rate() {
    let mut net = SimNet::new(weir_sfu::SfuConfig::default());
    let camera = Publish {
        audio: true,
        video: true,
        simulcast: true,
    };
    let alice = net.join(15, camera);
    let bob = net.join(15, Publish::NOTHING);
    let carol = net.join(15, Publish::NOTHING);
    assert!(net.run_until(Duration::from_secs(10), |n| n.all_connected()));
    let mut cam = Camera::new(alice, &LAYERS).with_temporal_layers();
    net.clients[carol].link.rate_down_bps = 3_000_000;
    net.clients[carol].link.delay_down = Duration::from_millis(20);
    cam.run(&mut net, Duration::from_secs(5));

    // Carol's link narrows to 110 kbit/s: q whole (about 170 k) and her audio do not fit.
    net.clients[carol].link.rate_down_bps = 110_000;
    let told = net.clients[carol].messages.len();
    cam.run(&mut net, Duration::from_secs(12));
    let (carol_from, bob_from) = (
        cam.video_of(&net, carol).len(),
        cam.video_of(&net, bob).len(),
    );
    let window = Duration::from_secs(5);
    cam.run(&mut net, window);

    let carol_frames = frames(&net, &cam, carol, carol_from);
    let fps = carol_frames.len() as f64 / window.as_secs_f64();
    assert!(
        (5.0..=20.0).contains(&fps),
        "Carol gets q at a lower frame rate, not every frame nor none: {fps:.1} frames/s"
    );
    let mut seqs = BTreeSet::new();
    for (ts, packets) in &carol_frames {
        for (seq, r, (original, rank, t)) in packets {
            assert_eq!(*rank, 2, "only q fits her link");
            assert!(t.tid <= 1, "frame {ts} of temporal layer {}", t.tid);
            same_but_numbers(&r.payload, original);
            seqs.insert(*seq);
        }
        // The window's first and last frames may straddle its edges.
        let edge = Some(ts) == carol_frames.keys().next() || Some(ts) == carol_frames.keys().last();
        assert!(edge || packets.len() == 2, "frame {ts} arrives whole");
    }
    let (first, last) = (*seqs.first().unwrap(), *seqs.last().unwrap());
    assert_eq!(
        seqs.len() as i64,
        last - first + 1,
        "no gap in Carol's sequence numbers"
    );
    let ids: Vec<u16> = carol_frames
        .values()
        .map(|p| picture_id(&p[0].1.payload))
        .collect();
    assert!(
        ids.windows(2).all(|w| w[1] == (w[0] + 1) % (1 << 15)),
        "picture ids count up by one: {ids:?}"
    );
    let paused = net.clients[carol].messages[told..]
        .iter()
        .any(|(_, m)| m.contains("io.weir.paused") && m.contains("\"paused\":true"));
    assert!(!paused, "Carol's video was never paused");

    // Bob, on a free link, got every frame of f in the same time: Alice's bytes but for the
    // numbers, which continue those of the layer he started on.
    let bob_frames = frames(&net, &cam, bob, bob_from);
    assert!(bob_frames.len() as f64 >= 29.0 * window.as_secs_f64());
    for packets in bob_frames.values() {
        for (_, r, (original, rank, _)) in packets {
            assert_eq!(*rank, 4);
            same_but_numbers(&r.payload, original);
        }
    }
    let skipped = net
        .stats
        .temporal_skipped
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(skipped > 0, "the focus counted what it left out");

    // The link widens again: Carol climbs back to f at its full frame rate. In the
    // simulation that takes 5-6 s, or 10-14 s when her estimator locked while the link was
    // narrow and waits for its next restart (`forward::stall`).
    net.clients[carol].link.rate_down_bps = 5_000_000;
    let mut back = None;
    for second in 1..=20 {
        let from = cam.video_of(&net, carol).len();
        cam.run(&mut net, Duration::from_secs(1));
        let f = frames(&net, &cam, carol, from);
        let full = f
            .values()
            .all(|p| p.iter().all(|(_, _, (_, rank, _))| *rank == 4));
        if full && f.len() >= 29 {
            back = Some(second);
            break;
        }
    }
    eprintln!("Carol back on f at full frame rate within {back:?} s");
    assert!(
        back.is_some(),
        "Carol is back on f at 30 frames/s within 20 s"
    );

    // Down to q and back up to f: every change of layer in what Carol received, in her
    // sequence order, starts on a keyframe of the new layer, and the numbers run on across
    // the changes as if from one encoder: a picture id per frame, a TL0PICIDX per layer-0
    // frame.
    let all = frames(&net, &cam, carol, 0);
    let mut by_seq: Vec<(i64, u8, bool, u16, u8, u8)> = all
        .values()
        .flatten()
        .filter(|(_, r, _)| r.payload[0] & 0x10 != 0) // the first packet of each frame
        .map(|(seq, r, (original, rank, t))| {
            let keyframe = original[6] & 0x01 == 0;
            (
                *seq,
                *rank,
                keyframe,
                picture_id(&r.payload),
                r.payload[4],
                t.tid,
            )
        })
        .collect();
    by_seq.sort_unstable();
    by_seq.dedup();
    // (Only between frames both received: a frame lost on the narrow link is a gap. A
    // frame may end early where the layer changes: the new layer's keyframe can overtake
    // the rest of the old layer's frame, which is then not sent.)
    let packets = |rank: u8, keyframe: bool| {
        let sizes = LAYERS.iter().find(|l| l.1 == rank).map_or(0, |l| l.2.len());
        sizes as i64 * if keyframe { 3 } else { 1 }
    };
    let adjacent: Vec<_> = by_seq
        .windows(2)
        .filter(|w| {
            let gap = w[1].0 - w[0].0;
            gap == packets(w[0].1, w[0].2)
                || (w[0].1 != w[1].1 && gap >= 1 && gap < packets(w[0].1, w[0].2))
        })
        .collect();
    assert!(adjacent.len() > 100);
    let switches: Vec<_> = adjacent
        .iter()
        .filter(|w| w[0].1 != w[1].1)
        .map(|w| w[1])
        .collect();
    assert!(switches.len() >= 2, "Carol moved down and up: {switches:?}");
    assert!(
        switches.iter().all(|s| s.2),
        "every switch lands on a keyframe: {switches:?}"
    );
    for w in &adjacent {
        let ((_, _, _, id0, tl0_0, _), (_, _, _, id1, tl0_1, tid1)) = (w[0], w[1]);
        assert_eq!(id1, (id0 + 1) % (1 << 15), "picture ids run on: {w:?}");
        let step = u8::from(tid1 == 0);
        assert_eq!(tl0_1, tl0_0.wrapping_add(step), "TL0PICIDX runs on: {w:?}");
    }
}
