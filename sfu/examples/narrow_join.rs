//! A participant joins a conference of simulcast cameras already flowing, on a 600 kbit/s
//! downlink from the start, and shows six of them as the load tester's speaker layout does
//! (one 720 lines tall, five 180): when each of its six videos first showed, and how long its
//! picture stood still without being told it was paused, in the simulated network. The
//! 25-person load test's narrow links stop for over a second mostly at join and just before a
//! pause (docs/adaptation.md); this is the scenario to reproduce that in, under a virtual
//! clock. A measurement, not a test: the engines draw SSRCs and keys at random, so runs
//! differ, and fixes are judged over many.
//!
//! `cargo run --release -p weir-sfu --example narrow_join [cameras] [runs]` (default 24
//! cameras, 1 run; one run prints each video, more print one line per run and the totals).
//! `RUST_LOG=weir_sfu=debug` shows why allocation decided what it did.

use std::time::{Duration, Instant};

use weir_sfu::sim::{run_together, Camera, Publish, SimNet};
use weir_sfu::{Command, SfuEvent, Subscription};

/// A stop of the picture longer than this is a freeze, as the issue counts them.
const FREEZE: Duration = Duration::from_secs(1);

/// How one video of the watcher went.
struct Video {
    first_shown: Option<Instant>,
    /// The longest the picture stood still while the video was not told paused, and when
    /// that began.
    frozen: Option<(Duration, Instant)>,
    /// Stops longer than [`FREEZE`] before a pause notice (or with none).
    freezes: usize,
    /// Each pause told: when, and how long the picture had stood still by then.
    pauses: Vec<(Instant, Option<Duration>)>,
}

fn main() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .try_init();
    let arg = |n: usize, default: usize| {
        std::env::args()
            .nth(n)
            .and_then(|a| a.parse().ok())
            .unwrap_or(default)
    };
    let (cameras, runs) = (arg(1, 24), arg(2, 1).max(1));
    let secs = |d: Duration| d.as_secs_f64();
    let (mut freezes, mut worst, mut never, mut paused) = (0, Duration::ZERO, 0, 0);
    for run in 0..runs {
        let (joined, videos) = join_once(cameras);
        let run_worst = videos
            .iter()
            .filter_map(|v| v.frozen.map(|(d, _)| d))
            .max()
            .unwrap_or_default();
        let run_freezes: usize = videos.iter().map(|v| v.freezes).sum();
        freezes += run_freezes;
        worst = worst.max(run_worst);
        never += videos.iter().filter(|v| v.first_shown.is_none()).count();
        paused += videos.iter().filter(|v| !v.pauses.is_empty()).count();
        if runs > 1 {
            println!(
                "run {run:>3}: {} of {} videos shown, {run_freezes} frozen over 1 s, longest frozen {:.2} s",
                videos.iter().filter(|v| v.first_shown.is_some()).count(),
                videos.len(),
                secs(run_worst)
            );
        }
        if runs == 1 || run_freezes > 0 {
            print_videos(joined, &videos);
        }
    }
    println!(
        "{runs} run(s): {freezes} stops over 1 s not told as a pause, longest {:.2} s; {paused} videos paused at some point, {never} never shown",
        secs(worst)
    );
}

/// Each video of one join, one line each.
fn print_videos(joined: Instant, videos: &[Video]) {
    let secs = |d: Duration| d.as_secs_f64();
    println!("video  first shown  longest frozen  pauses told (at, stood still before it)  [s after join]");
    for (i, v) in videos.iter().enumerate() {
        let pauses: Vec<String> = v
            .pauses
            .iter()
            .map(|(at, still)| match still {
                Some(d) => format!("{:.2} ({:.2})", secs(at.duration_since(joined)), secs(*d)),
                None => format!("{:.2} (never shown)", secs(at.duration_since(joined))),
            })
            .collect();
        let first = v.first_shown.map_or("never".to_string(), |f| {
            format!("{:.2}", secs(f.duration_since(joined)))
        });
        let frozen = v.frozen.map_or("-".to_string(), |(d, from)| {
            format!(
                "{:.2} from {:.2}",
                secs(d),
                secs(from.duration_since(joined))
            )
        });
        println!("{i:>5}  {first:>11}  {frozen:>14}  {}", pauses.join(", "));
    }
}

/// One join: the time the watcher joined, and each of its six videos.
fn join_once(cameras: usize) -> (Instant, Vec<Video>) {
    let mut net = SimNet::default();
    let simulcast = Publish {
        audio: true,
        video: true,
        simulcast: true,
    };
    let mut cams: Vec<Camera> = (0..cameras)
        .map(|_| Camera::new(net.join(15, simulcast), &Camera::SIMULCAST))
        .collect();
    assert!(net.run_until(Duration::from_secs(20), |n| n.all_connected()));
    run_together(&mut cams, &mut net, Duration::from_secs(2));

    // The watcher joins on its narrow link and subscribes at once.
    let watcher = net.join(15, Publish::NOTHING);
    net.clients[watcher].link.rate_down_bps = 600_000;
    net.clients[watcher].link.delay_down = Duration::from_millis(20);
    let joined = net.now();
    let subscriptions = (0..6.min(cameras))
        .map(|i| Subscription {
            stream_id: format!("stream-{i}"),
            track_id: format!("video-{i}"),
            max_height: Some(if i == 0 { 720 } else { 180 }),
            source_height: Some(720),
        })
        .collect();
    let peer = net.clients[watcher].peer;
    net.core.handle_command(
        Command::Subscribe {
            peer,
            subscriptions,
        },
        joined,
    );
    run_together(&mut cams, &mut net, Duration::from_secs(20));
    let end = net.now();
    let offers = net
        .log
        .iter()
        .filter(|e| matches!(e, SfuEvent::Offer { peer: p, .. } if *p == peer))
        .count();
    assert_eq!(
        offers, 2,
        "one offer for the data channel, one for the videos"
    );
    let videos = cams
        .iter()
        .enumerate()
        .take(6)
        .map(|(i, cam)| {
            let shown: Vec<Instant> = cam.shown(&net, watcher).iter().map(|(t, _)| *t).collect();
            // Each change of state told (repeats folded).
            let mut told: Vec<(Instant, bool)> = net.clients[watcher]
                .messages
                .iter()
                .filter(|(_, m)| {
                    m.contains("io.weir.paused") && m.contains(&format!("stream-{i}\""))
                })
                .map(|(at, m)| (*at, m.contains("\"paused\":true")))
                .collect();
            told.dedup_by_key(|(_, paused)| *paused);
            let pause_times: Vec<Instant> =
                told.iter().filter(|(_, p)| *p).map(|(at, _)| *at).collect();
            let pauses = pause_times
                .iter()
                .map(|at| {
                    let last = shown.iter().copied().rfind(|t| t <= at);
                    (*at, last.map(|l| at.duration_since(l)))
                })
                .collect();
            // Every stop between pictures shown (and from the last to the end), up to the
            // first pause told within it: what a viewer saw frozen, not paused. A stop that
            // begins paused is not frozen.
            let stops: Vec<(Duration, Instant)> = shown
                .iter()
                .copied()
                .zip(shown.iter().copied().skip(1).chain([end]))
                .map(|(a, b)| {
                    // Told paused before the picture stopped (the last frames were in flight).
                    let paused_already = told
                        .iter()
                        .rfind(|(at, _)| *at <= a)
                        .is_some_and(|(_, p)| *p);
                    if paused_already {
                        return (Duration::ZERO, a);
                    }
                    let until = pause_times
                        .iter()
                        .copied()
                        .find(|p| *p >= a && *p < b)
                        .unwrap_or(b);
                    (until.duration_since(a), a)
                })
                .collect();
            Video {
                first_shown: shown.first().copied(),
                frozen: stops.iter().copied().max_by_key(|(d, _)| *d),
                freezes: stops.iter().filter(|(d, _)| *d > FREEZE).count(),
                pauses,
            }
        })
        .collect();
    (joined, videos)
}
