//! A participant joins a conference of simulcast cameras already flowing, on a 600 kbit/s
//! downlink from the start, and shows six of them as the load tester's speaker layout does
//! (one 720 lines tall, five 180): when each of its six videos first showed, and the longest
//! stop after that, in the simulated network. The 25-person load test's narrow links stop
//! for over a second mostly at join and just before a pause (docs/adaptation.md); this is
//! the scenario to reproduce that in, under a virtual clock. A measurement, not a test.
//!
//! `cargo run --release -p weir-sfu --example narrow_join [cameras]` (default 24).

use std::time::Duration;

use weir_sfu::sim::{longest_stop, run_together, Camera, Publish, SimNet};
use weir_sfu::{Command, SfuEvent, Subscription};

fn main() {
    let cameras: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(24);
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
    let secs = |d: Duration| d.as_secs_f64();
    println!(
        "video  first shown  longest stop  pauses told (at, stopped before it)  [s after join]"
    );
    for (i, cam) in cams.iter().enumerate().take(6) {
        let shown = cam.shown(&net, watcher);
        // Each change of state told (repeats folded): when a pause arrived, and how long the
        // picture had stood still by then (what a viewer saw frozen, not paused).
        let mut told: Vec<(std::time::Instant, bool)> = net.clients[watcher]
            .messages
            .iter()
            .filter(|(_, m)| m.contains("io.weir.paused") && m.contains(&format!("stream-{i}\"")))
            .map(|(at, m)| (*at, m.contains("\"paused\":true")))
            .collect();
        told.dedup_by_key(|(_, paused)| *paused);
        let pauses: Vec<String> = told
            .iter()
            .filter(|(_, paused)| *paused)
            .map(|(at, _)| {
                let last = shown.iter().map(|(t, _)| *t).rfind(|t| t <= at);
                match last {
                    Some(l) => format!(
                        "{:.2} ({:.2})",
                        secs(at.duration_since(joined)),
                        secs(at.duration_since(l))
                    ),
                    None => format!("{:.2} (never shown)", secs(at.duration_since(joined))),
                }
            })
            .collect();
        match shown.first() {
            Some((first, _)) => println!(
                "{i:>5}  {:>11.2}  {:>12.2} from {:>5.2}  {}",
                secs(first.duration_since(joined)),
                secs(longest_stop(&shown, *first, end)),
                secs(stop_start(&shown, end).duration_since(joined)),
                pauses.join(", "),
            ),
            None => println!(
                "{i:>5}  {:>11}  {:>12}  {}",
                "never",
                "-",
                pauses.join(", ")
            ),
        }
    }
    let offers = net
        .log
        .iter()
        .filter(|e| matches!(e, SfuEvent::Offer { peer: p, .. } if *p == peer))
        .count();
    println!(
        "offers to the watcher: {offers}; simulated {:.0} s",
        secs(end.duration_since(joined))
    );
}

/// When the longest stop between pictures shown (or from the last one to `end`) began.
fn stop_start(shown: &[(std::time::Instant, u8)], end: std::time::Instant) -> std::time::Instant {
    let times: Vec<std::time::Instant> = shown.iter().map(|(t, _)| *t).chain([end]).collect();
    times
        .windows(2)
        .max_by_key(|w| w[1].duration_since(w[0]))
        .map_or(end, |w| w[0])
}
