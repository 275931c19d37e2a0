//! Bandwidth allocation on the shard core, in the simulated network (`weir_sfu::sim`): each
//! subscriber's link is a bottleneck with its own rate, a 20 ms delay and a 200 ms queue; the
//! publisher is a simulated browser camera. The policy is in docs/adaptation.md.

use std::time::{Duration, Instant};

use weir_sfu::sim::{
    cameras_to_one_watcher, longest_stop, media_bytes, run_together, sequence_loss, unwrap_seqs,
    Camera, Publish, SimNet,
};

const WATCH: Publish = Publish::NOTHING;

/// A camera without simulcast, with a microphone.
const ONE_LAYER: Publish = Publish {
    audio: true,
    video: true,
    simulcast: false,
};

/// Alice publishing `camera` and `watchers` participants watching, in one conference whose
/// estimates start at 1 Mbit/s, all connected.
fn connected(camera: Publish, watchers: usize) -> (SimNet, usize, Vec<usize>) {
    let mut net = SimNet::new(weir_sfu::SfuConfig {
        estimate_from_bps: Some(1_000_000),
        ..weir_sfu::SfuConfig::default()
    });
    let alice = net.join(10, camera);
    let watchers = (0..watchers).map(|_| net.join(10, WATCH)).collect();
    assert!(net.run_until(Duration::from_secs(10), |n| n.all_connected()));
    (net, alice, watchers)
}

/// Alice's camera sends one layer of 1.9 Mbit/s to Bob and Carol. Then Bob's link narrows to
/// 1 Mbit/s, less than that one layer: his copy is paused rather than sent into a link that
/// would lose half of it (once the estimate has been short for `PAUSE_AFTER`, and the media
/// the estimator's pacer held has drained: within 8 s), and he is told so on his data
/// channel. When Bob's link
/// widens, his video resumes on a keyframe, its sequence numbers continuing where the pause
/// left them, and he is told that too.
#[test]
fn a_video_the_link_cannot_carry_is_paused_and_resumes_when_it_can() {
    let (mut net, alice, watchers) = connected(ONE_LAYER, 2);
    let (bob, carol) = (watchers[0], watchers[1]);
    // 30 frames a second of 8 packets of 1000 bytes: 1.9 Mbit/s with the overhead; and
    // her microphone.
    let mut cam = Camera::new(alice, &[(None, 0, &[1000; 8])]);
    // The estimate starts at 1 Mbit/s: until a probe finds more, even Carol waits.
    cam.run(&mut net, Duration::from_secs(2));
    let (sent, carol_got) = (cam.sent.len(), cam.video_of(&net, carol).len());
    cam.run(&mut net, Duration::from_secs(6));
    let sent = cam.sent.len() - sent;
    let carol_got = cam.video_of(&net, carol).len() - carol_got;
    assert!(
        carol_got as f64 >= 0.99 * sent as f64,
        "Carol, on a free link, got {carol_got} of {sent}"
    );
    assert!(
        cam.video_of(&net, bob).len() as f64 >= 0.99 * sent as f64,
        "so did Bob"
    );
    let told_before = net.clients[bob].messages.len();
    net.clients[bob].link.rate_down_bps = 1_000_000;
    net.clients[bob].link.delay_down = Duration::from_millis(20);
    cam.run(&mut net, Duration::from_secs(8));
    let before = cam.video_of(&net, bob).len();
    cam.run(&mut net, Duration::from_secs(3));
    assert_eq!(
        cam.video_of(&net, bob).len(),
        before,
        "Bob receives no video while his link cannot carry it"
    );
    // Each notice is sent again a few times (`NOTICE_ECHOES`, for SCTP): the states he is
    // told, repeats folded.
    let notices = |net: &SimNet| -> Vec<bool> {
        let mut states: Vec<bool> = pause_notices(net, bob, told_before)
            .iter()
            .map(|(_, paused)| *paused)
            .collect();
        states.dedup();
        states
    };
    assert_eq!(notices(&net), vec![true], "Bob is told his video is paused");

    net.clients[bob].link.rate_down_bps = 5_000_000;
    let widened = net.now();
    let mut back = None;
    for _ in 0..300 {
        cam.frame(&mut net);
        if cam.video_of(&net, bob).len() > before {
            back = Some(net.now().duration_since(widened));
            break;
        }
    }
    assert!(
        back.is_some_and(|d| d < Duration::from_secs(10)),
        "Bob's video resumed {back:?} after his link widened"
    );
    cam.run(&mut net, Duration::from_millis(500));
    assert_eq!(notices(&net), vec![true, false], "Bob is told it resumed");
    let got = cam.video_of(&net, bob);
    assert!(
        got[before].payload[1] & 1 == 0,
        "the resumed video starts on a keyframe"
    );
    let seqs = unwrap_seqs(got.iter().map(|r| r.seq));
    assert_eq!(
        seqs[before..].iter().min().copied(),
        seqs[..before].iter().max().map(|l| l + 1),
        "the sequence continues across the pause"
    );
    eprintln!("resumed {back:?} after the link widened");
}

/// The `io.weir.paused` notices participant `who` received from message `from` on: when
/// each arrived, and whether it says paused.
fn pause_notices(net: &SimNet, who: usize, from: usize) -> Vec<(Instant, bool)> {
    net.clients[who].messages[from..]
        .iter()
        .filter(|(_, m)| m.contains("io.weir.paused"))
        .map(|(at, m)| (*at, m.contains("\"paused\":true")))
        .collect()
}

/// As above, Bob's link narrows below Alice's one video, but the datagram carrying his pause
/// notice is lost; how long after that loss Bob learns of the pause. Bob opens the unordered
/// notices channel (`io.weir.notices`) or not: then notices come on his ordered data channel.
fn pause_notice_after_a_loss(notices_channel: bool) -> Duration {
    let mut net = SimNet::new(weir_sfu::SfuConfig {
        estimate_from_bps: Some(1_000_000),
        ..weir_sfu::SfuConfig::default()
    });
    net.notices_channel = notices_channel;
    let alice = net.join(10, ONE_LAYER);
    let bob = net.join(10, WATCH);
    assert!(net.run_until(Duration::from_secs(10), |n| n.all_connected()));
    let mut cam = Camera::new(alice, &[(None, 0, &[1000; 8])]);
    cam.run(&mut net, Duration::from_secs(8));
    assert!(!cam.video_of(&net, bob).is_empty(), "Bob watches Alice");
    let told_before = net.clients[bob].messages.len();
    net.clients[bob].link.rate_down_bps = 1_000_000;
    net.clients[bob].link.delay_down = Duration::from_millis(20);
    net.clients[bob].link.lose_dtls_down = 1;
    // Bounded: the pause comes within 8 s (the test above).
    for _ in 0..450 {
        cam.frame(&mut net);
        if !pause_notices(&net, bob, told_before).is_empty() {
            break;
        }
    }
    let told = pause_notices(&net, bob, told_before);
    let lost = net.clients[bob].lost_dtls_at.clone();
    assert_eq!(lost.len(), 1, "one datagram of Bob's channels was lost");
    let Some(&(at, true)) = told.first() else {
        panic!("Bob was never told his video is paused: {told:?}");
    };
    at.duration_since(lost[0])
}

/// On the ordered data channel, SCTP alone would resend the lost notice after its
/// retransmission timeout, 1 s at least; the focus sends the notice again in the next
/// rounds, Bob's acknowledgements of those report the gap, and after three such reports
/// SCTP resends the lost one. The link is still flooded by the video sent before the pause,
/// so some repeats are lost too: Bob learns of the pause 0.49 s after the loss (0.8 s before
/// a congested link paused at once), where SCTP's timer alone took 1.2 s.
#[test]
fn a_lost_pause_notice_is_resent_well_before_sctps_timer() {
    let late = pause_notice_after_a_loss(false);
    eprintln!("the pause notice arrived {late:?} after its first copy was lost");
    // SCTP's timer never resends sooner than 1 s (its minimum), and here took 1.2 s:
    // earlier can only be the fast retransmission the repeats brought about.
    assert!(
        late < Duration::from_secs(1),
        "Bob learnt of the pause {late:?} after the notice was lost"
    );
}

/// On the unordered notices channel nothing waits for the lost notice: the first of its
/// repeats to arrive is delivered, without the three acknowledgements the ordered channel
/// needs before SCTP resends. Here that is 0.31 s after the loss against 0.49 s (the
/// scenario is the same every run): at least one housekeeping round (100 ms, one repeat)
/// sooner.
#[test]
fn on_the_notices_channel_a_lost_pause_notice_is_overtaken_by_its_repeat() {
    let unordered = pause_notice_after_a_loss(true);
    let ordered = pause_notice_after_a_loss(false);
    eprintln!("the pause notice arrived {unordered:?} after its first copy was lost ({ordered:?} on the ordered channel)");
    assert!(
        unordered + Duration::from_millis(100) <= ordered,
        "Bob learnt of the pause {unordered:?} after the loss, {ordered:?} on the ordered channel"
    );
}

/// Fifty people watch Alice's simulcast camera over 3 Mbit/s links, and all their links
/// narrow to 400 kbit/s at the same moment. All move down a layer, and Alice is asked for
/// keyframes no more often than the coalescing allows: at most once per
/// `KEYFRAME_REQUEST_INTERVAL` (350 ms) for the track, whatever the layers and the number of
/// subscribers switching.
#[test]
fn fifty_subscribers_switching_at_once_cost_the_publisher_few_keyframes() {
    let mut net = SimNet::new(weir_sfu::SfuConfig {
        estimate_from_bps: Some(1_000_000),
        ..weir_sfu::SfuConfig::default()
    });
    let alice = net.join(
        12,
        Publish {
            audio: true,
            video: true,
            simulcast: true,
        },
    );
    let watchers: Vec<usize> = (0..50).map(|_| net.join(12, WATCH)).collect();
    assert!(net.run_until(Duration::from_secs(20), |n| n.all_connected()));
    for &w in &watchers {
        net.clients[w].link.rate_down_bps = 3_000_000;
        net.clients[w].link.delay_down = Duration::from_millis(20);
    }
    let mut cam = Camera::new(alice, &Camera::SIMULCAST);
    cam.run(&mut net, Duration::from_secs(8));
    let top = |net: &SimNet, cam: &Camera, w: usize| {
        cam.video_of(net, w).last().map(|r| cam.rank(&r.payload))
    };
    let on_top = watchers
        .iter()
        .filter(|&&w| top(&net, &cam, w) == Some(4))
        .count();
    assert_eq!(on_top, 50, "everyone on the full layer first");

    let narrowed = net.now();
    let asked_before = net.clients[alice].keyframe_requests.len();
    for &w in &watchers {
        net.clients[w].link.rate_down_bps = 400_000;
    }
    let window = Duration::from_secs(6);
    cam.run(&mut net, window);
    let lower = watchers
        .iter()
        .filter(|&&w| top(&net, &cam, w).is_some_and(|r| r < 4))
        .count();
    assert_eq!(lower, 50, "everyone moved down");
    let asked = &net.clients[alice].keyframe_requests[asked_before..];
    let bound = (window.as_millis() / weir_sfu::forward::KEYFRAME_REQUEST_INTERVAL.as_millis())
        as usize
        + 1;
    for rid in ["q", "h", "f"] {
        let n = asked
            .iter()
            .filter(|(at, r)| *at >= narrowed && r.is_some_and(|r| r.to_string() == rid))
            .count();
        assert!(
            n <= bound,
            "{n} keyframe requests for layer {rid} in {window:?}: over {bound}"
        );
    }
    // The window is the track's, whatever layers the requests name: Chromium acts on one
    // request per 300 ms for all its layers and drops the others. Requests owed for several
    // layers go out together when the window ends (one arrival time, within a millisecond).
    let mut moments: Vec<std::time::Instant> = Vec::new();
    for (at, _) in asked.iter().filter(|(at, _)| *at >= narrowed) {
        if moments
            .last()
            .is_none_or(|m| at.duration_since(*m) > Duration::from_millis(5))
        {
            moments.push(*at);
        }
    }
    for pair in moments.windows(2) {
        let gap = pair[1].duration_since(pair[0]);
        assert!(
            gap >= Duration::from_millis(300),
            "keyframe requests {gap:?} apart: Chromium would drop the second"
        );
    }
    eprintln!(
        "{} keyframe requests in all for 50 switching subscribers",
        asked.len()
    );
}

/// Bob's subscription to Alice's simulcast camera flips between 180 and 720 lines 100 times,
/// 400 ms apart (Alice's camera, like Chromium, makes at most one keyframe per 300 ms, and
/// weir spaces its requests 350 ms apart). Every switch lands on a keyframe of the new layer, his sequence numbers run
/// on without a gap, his timestamps only move forward and by no more than the time between
/// frames, and every payload is byte for byte one Alice sent. (Without bandwidth
/// allocation, so that each flip is a switch: with it, a tile that grows waits for the
/// estimate, which the narrowing-link test covers.)
#[test]
fn a_hundred_forced_switches_keep_sequence_and_timestamps_continuous() {
    let mut net = SimNet::new(weir_sfu::SfuConfig {
        estimate_from_bps: None,
        ..weir_sfu::SfuConfig::default()
    });
    let alice = net.join(
        13,
        Publish {
            audio: false,
            video: true,
            simulcast: true,
        },
    );
    let bob = net.join(13, WATCH);
    assert!(net.run_until(Duration::from_secs(10), |n| n.all_connected()));
    let mut cam = Camera::new(alice, &Camera::SIMULCAST);
    cam.run(&mut net, Duration::from_secs(1));
    for i in 0..100 {
        let height = if i % 2 == 0 { 180 } else { 720 };
        net.subscribe_video(bob, alice, height);
        cam.run(&mut net, Duration::from_millis(400));
    }
    let got = cam.video_of(&net, bob);
    assert!(
        got.iter().all(|r| cam.sent.contains_key(&r.payload)),
        "every payload is one Alice sent"
    );
    let mut in_order: Vec<(i64, u32, u8)> = unwrap_seqs(got.iter().map(|r| r.seq))
        .into_iter()
        .zip(&got)
        .map(|(seq, r)| (seq, r.timestamp, cam.rank(&r.payload)))
        .collect();
    in_order.sort_unstable();
    let (first, last) = (in_order[0].0, in_order[in_order.len() - 1].0);
    assert_eq!(
        in_order.len() as i64,
        last - first + 1,
        "no sequence number skipped or repeated"
    );
    let mut changes = 0;
    for w in in_order.windows(2) {
        let step = w[1].1.wrapping_sub(w[0].1);
        assert!(
            step <= 3_000 + 10,
            "timestamp moved by {step} at seq {}: backwards, or more than a frame",
            w[1].0
        );
        changes += usize::from(w[0].2 != w[1].2);
    }
    assert!(changes >= 95, "{changes} layer changes for 100 switches");
    assert_switches_on_keyframes(&net, bob, &cam);
}

/// Bob watches Alice's simulcast camera over a 3 Mbit/s link and gets her full layer. His
/// link narrows to 400 kbit/s: within 3 s he is on a lower layer, and from then on he loses
/// less than 2 % of what he is sent. When the link widens again he is back on the full layer
/// within 10 s. Every layer change he sees starts on a keyframe.
#[test]
fn a_subscriber_whose_link_narrows_moves_down_a_layer_and_back_up_when_it_widens() {
    let simulcast = Publish {
        audio: false,
        video: true,
        simulcast: true,
    };
    let (mut net, alice, watchers) = connected(simulcast, 1);
    let bob = watchers[0];
    net.clients[bob].link.rate_down_bps = 3_000_000;
    net.clients[bob].link.delay_down = Duration::from_millis(20);
    let mut cam = Camera::new(alice, &Camera::SIMULCAST);
    cam.run(&mut net, Duration::from_secs(10));
    let layer_at = |net: &SimNet, cam: &Camera, from: usize| -> Vec<(std::time::Instant, u8)> {
        net.clients[bob].received[from..]
            .iter()
            .map(|r| (r.at, cam.rank(&r.payload)))
            .collect()
    };
    let wide = layer_at(&net, &cam, 0);
    assert_eq!(
        wide.last().map(|(_, r)| *r),
        Some(4),
        "on a 3 Mbit/s link: the full layer"
    );

    let narrowed = net.now();
    let from = net.clients[bob].received.len();
    net.clients[bob].link.rate_down_bps = 400_000;
    cam.run(&mut net, Duration::from_secs(15));
    let narrow = layer_at(&net, &cam, from);
    let settled = narrow.last().map(|(_, r)| *r).expect("video while narrow");
    assert!(settled < 4, "a lower layer on 400 kbit/s, not {settled}");
    let last_other = narrow
        .iter()
        .rev()
        .find(|(_, r)| *r != settled)
        .map(|(at, _)| at.duration_since(narrowed));
    assert!(
        last_other.is_none_or(|d| d < Duration::from_secs(3)),
        "settled on layer {settled} within 3 s: the last other layer came {last_other:?} after"
    );
    let after: Vec<u16> = net.clients[bob].received[from..]
        .iter()
        .filter(|r| r.at >= narrowed + Duration::from_secs(3))
        .map(|r| r.seq)
        .collect();
    let loss = sequence_loss(&after);
    assert!(loss < 0.02, "{:.2} % lost once settled", loss * 100.0);

    let widened = net.now();
    let from = net.clients[bob].received.len();
    net.clients[bob].link.rate_down_bps = 3_000_000;
    let mut back = None;
    for _ in 0..300 {
        cam.frame(&mut net);
        if layer_at(&net, &cam, from).iter().any(|(_, r)| *r == 4) {
            back = Some(net.now().duration_since(widened));
            break;
        }
    }
    assert!(
        back.is_some_and(|d| d < Duration::from_secs(10)),
        "back on the full layer {back:?} after the link widened"
    );
    assert_switches_on_keyframes(&net, bob, &cam);
    eprintln!(
        "settled on {settled} after {last_other:?}, {:.2} % lost, back on f after {back:?}",
        loss * 100.0
    );
}

/// Bob shows Alice's simulcast camera on f over a 3 Mbit/s link, which then narrows to
/// 500 kbit/s (200 ms queue, tail drop). Issue 8 asks that his picture never stop for more
/// than a second on the way down, and it does not stop for long once there (`Camera::shown`:
/// a frame counts once all its packets are in and its reference was decodable; the simulated
/// receiver never asks for a keyframe, so a packet lost for good would freeze it to the end).
/// Two things stood in the way (docs/adaptation.md, "Moving down"): the lower layer's
/// keyframe lost packets behind the old layer and they were never resent, since the old
/// layer's resends had filled the retransmission budget; and a loss report still counting the
/// old layer cut the loss cap below the layer moved to, which paused it seconds later.
#[test]
fn a_narrowing_link_moves_down_without_freezing_the_picture() {
    let mut net = SimNet::default();
    let (mut cams, bob) = cameras_to_one_watcher(&mut net, 1, 3_000_000);
    let mut cam = cams.remove(0);
    cam.run(&mut net, Duration::from_secs(10));
    let last_rank = |net: &SimNet, cam: &Camera| cam.shown(net, bob).last().map(|(_, r)| *r);
    assert_eq!(last_rank(&net, &cam), Some(4), "over 3 Mbit/s Bob shows f");

    let narrowed = net.now();
    net.clients[bob].link.rate_down_bps = 500_000;
    cam.run(&mut net, Duration::from_secs(10));
    let shown = cam.shown(&net, bob);
    let settled = last_rank(&net, &cam).expect("pictures over 500 kbit/s");
    assert!(settled < 4, "a lower layer over 500 kbit/s, not {settled}");
    let stop = longest_stop(&shown, narrowed, net.now());
    eprintln!("moved down to rank {settled}; the picture stopped at most {stop:?}");
    assert!(
        stop <= Duration::from_secs(1),
        "the picture stopped for {stop:?} in the 10 s after the link narrowed"
    );
}

/// Every change of layer in what `sub` received, in sequence order, starts with a keyframe.
/// Only changes between consecutive sequence numbers tell: where the link lost the packets
/// around a change, the first one received of the new layer need not be its first.
fn assert_switches_on_keyframes(net: &SimNet, sub: usize, cam: &Camera) {
    let received = &net.clients[sub].received;
    let mut in_order: Vec<(i64, usize)> = unwrap_seqs(received.iter().map(|r| r.seq))
        .into_iter()
        .zip(0..)
        .collect();
    in_order.sort_unstable();
    in_order.dedup_by_key(|(seq, _)| *seq);
    let mut switches = 0;
    for pair in in_order.windows(2) {
        let [(s0, i0), (s1, i1)] = pair else { continue };
        let (before, after) = (&received[*i0], &received[*i1]);
        if *s1 != s0 + 1 || cam.rank(&before.payload) == cam.rank(&after.payload) {
            continue;
        }
        switches += 1;
        assert!(
            after.payload[1] & 1 == 0,
            "the switch to layer {} at seq {} starts on a delta frame",
            cam.rank(&after.payload),
            after.seq
        );
    }
    assert!(switches >= 2, "{switches} layer changes seen");
}

/// Allocation must not cost a new subscriber its first picture. Bob's estimate arrives after
/// Alice's video was negotiated for him; Alice then sends a single keyframe packet, and
/// nothing after it. Bob receives it: the packet itself runs his first allocation. (Found by
/// the `core` fuzz target with an empty input: the video waited for a housekeeping round, and
/// the keyframe was gone by then.)
#[test]
fn the_first_keyframe_starts_a_new_subscriber_under_allocation() {
    let mut net = SimNet::default();
    let alice = net.join(
        14,
        Publish {
            audio: false,
            video: true,
            simulcast: false,
        },
    );
    let bob = net.join(14, WATCH);
    assert!(net.run_until(Duration::from_secs(10), |n| n.all_connected()));
    net.run_for(Duration::from_millis(100));
    assert!(
        net.core.estimate(net.clients[bob].peer).is_some(),
        "Bob's downlink is estimated"
    );
    let sent = net.send_video(alice, None, true, 900);
    net.run_for(Duration::from_millis(20));
    assert!(
        net.clients[bob].received.iter().any(|r| r.payload == sent),
        "Bob got the keyframe"
    );
}

/// Bob watches three simulcast cameras (with their microphones) over a 600 kbit/s link: three
/// lowest layers and the audio fit, the middle layers do not. From 12 s to 20 s he receives
/// at least 300 kbit/s of media. (Paused videos used to resume only all together, so a link
/// with room for one or two stayed with none: 2 runs in 10 ended with 10 kbit/s.)
#[test]
fn three_cameras_share_a_narrow_link() {
    let mut net = SimNet::default();
    let (mut cams, bob) = cameras_to_one_watcher(&mut net, 3, 600_000);
    run_together(&mut cams, &mut net, Duration::from_secs(12));
    let before = media_bytes(&net, bob);
    run_together(&mut cams, &mut net, Duration::from_secs(8));
    let bps = (media_bytes(&net, bob) - before) * 8 / 8;
    eprintln!("{bps} bit/s of media");
    assert!(bps >= 300_000, "{bps} bit/s of media on a 600 kbit/s link");
}

/// Alice's and Bob's simulcast cameras go to Carol over a 1 Mbit/s link: both lowest layers
/// and the audio fit, and one more step (a half layer), not two. Whichever of them the control
/// plane names a screen (`Command::Screens`, from MSC3077's purpose) gets it: first Bob's,
/// then Alice's.
#[test]
fn a_screen_gets_the_bandwidth_before_a_camera() {
    let mut net = SimNet::default();
    let (mut cams, carol) = cameras_to_one_watcher(&mut net, 2, 1_000_000);
    let screen = |net: &mut SimNet, who: usize| {
        let (peer, now) = (net.clients[who].peer, net.now());
        net.core.handle_command(
            weir_sfu::Command::Screens {
                peer,
                streams: vec![format!("stream-{who}")],
            },
            now,
        );
    };
    let (alice, bob) = (0, 1);
    // The rank of the last packet Carol got from each camera.
    let last_rank = |net: &SimNet, cams: &[Camera], i: usize| {
        cams[i]
            .video_of(net, carol)
            .last()
            .map(|r| cams[i].rank(&r.payload))
    };
    for (shared, other) in [(bob, alice), (alice, bob)] {
        screen(&mut net, shared);
        let (pa, pb) = (net.clients[other].peer, net.now());
        net.core.handle_command(
            weir_sfu::Command::Screens {
                peer: pa,
                streams: vec![],
            },
            pb,
        );
        run_together(&mut cams, &mut net, Duration::from_secs(10));
        assert_eq!(
            (
                last_rank(&net, &cams, shared),
                last_rank(&net, &cams, other)
            ),
            (Some(3), Some(2)),
            "participant {shared}'s screen on h, {other}'s camera on q"
        );
    }
}

/// Thirty people talk, and above 20 only the 3 loudest audio streams are forwarded. Carol, on
/// an 800 kbit/s link, watches the one camera: the 27 streams held back are not charged against
/// her video (all 30 would take nearly all of her link), so she gets the half layer. (On a
/// 700 kbit/s link the half layer and three voices needed an estimate above the link's rate,
/// and one run in about ten stayed on the quarter layer.)
#[test]
fn audio_held_back_is_not_charged_against_a_subscribers_video() {
    let mut net = SimNet::new(weir_sfu::SfuConfig {
        audio_loudest_n: 3,
        audio_loudest_above: 20,
        ..weir_sfu::SfuConfig::default()
    });
    let talkers: Vec<usize> = (0..30).map(|_| net.join(6, Publish::VOICE)).collect();
    let camera = Publish {
        audio: false,
        video: true,
        simulcast: true,
    };
    let alice = net.join(6, camera);
    let carol = net.join(6, WATCH);
    assert!(net.run_until(Duration::from_secs(30), |n| n.all_connected()));
    net.clients[carol].link.rate_down_bps = 800_000;
    net.clients[carol].link.delay_down = Duration::from_millis(20);
    let mut cam = Camera::new(alice, &Camera::SIMULCAST);
    // Each talker's audio: about 25 kbit/s with the overhead; all 30, 750 kbit/s.
    let speak = |cam: &mut Camera, net: &mut SimNet, secs: u64| {
        for _ in 0..secs * 30 {
            for (k, &t) in talkers.iter().enumerate() {
                net.send_audio(t, -10 - k as i8);
            }
            cam.frame(net);
        }
    };
    speak(&mut cam, &mut net, 6);
    let from = cam.video_of(&net, carol).len();
    speak(&mut cam, &mut net, 4);
    let got: Vec<u8> = cam.video_of(&net, carol)[from..]
        .iter()
        .map(|r| cam.rank(&r.payload))
        .collect();
    let on_h = got.iter().filter(|&&rank| rank == 3).count();
    // h (500 kbit/s, 240 packets in 4 s) fits 80 % of her estimate with three audio streams;
    // with thirty it would not, and she would get only q.
    assert!(
        on_h >= 120,
        "Carol receives the camera's half layer ({on_h} of {} packets in 4 s)",
        got.len()
    );
}
