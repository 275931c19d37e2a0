//! A subscriber's link narrows under a simulcast camera, in the simulated network: Bob shows
//! Alice's f layer over 3 Mbit/s, then his link carries 500 kbit/s (200 ms queue, tail drop).
//! For each run: the longest stop of his picture in the 10 s after the cut (`Camera::shown`:
//! a frame is shown once all its packets are in and its reference was decodable), the layer
//! shown last, what his link carried from 3 s to 10 s (on the wire, and as media payload),
//! and the keyframes of the new layers with how many of their packets arrived.
//!
//! A measurement, not a test (docs/adaptation.md, "Moving down: where the stops come from").
//! The simulated receiver asks for a keyframe once a packet has been missing for 1 s
//! (`sim::KEYFRAME_AFTER_LOSS`), where Chromium asks after 3 s without a decodable frame: a
//! packet lost for good here freezes the picture for about a second, where a browser's would
//! stand still for three. Runs differ: the engines draw SSRCs and keys at random. `RUNS=8 cargo run -p weir-sfu --example move_down`; with `WHY=1`, also each
//! change of layer and each stop over 150 ms in Bob's picture after the cut, and the
//! allocation's and fan-out's debug log.

use std::collections::BTreeMap;
use std::time::Duration;

use weir_sfu::sim::{cameras_to_one_watcher, longest_stop, media_bytes, SimNet};

fn main() {
    if std::env::var("WHY").is_ok() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter("weir_sfu::shard::allocation=debug,weir_sfu::shard::fanout=debug")
            .try_init();
    }
    let runs: usize = std::env::var("RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    println!("longest stop  shown last  wire kbit/s  media kbit/s  keyframes after the cut (rank: packets in/of)");
    for _ in 0..runs {
        once();
    }
}

fn once() {
    let mut net = SimNet::default();
    let (mut cams, bob) = cameras_to_one_watcher(&mut net, 1, 3_000_000);
    let mut cam = cams.remove(0);
    cam.run(&mut net, Duration::from_secs(10));

    let cut = net.now();
    let received_before = net.clients[bob].received.len();
    net.clients[bob].link.rate_down_bps = 500_000;
    cam.run(&mut net, Duration::from_secs(3));
    let (wire, media) = (net.clients[bob].bytes_in, media_bytes(&net, bob));
    cam.run(&mut net, Duration::from_secs(7));
    let wire = (net.clients[bob].bytes_in - wire) * 8 / 7000;
    let media = (media_bytes(&net, bob) - media) * 8 / 7000;

    let shown = cam.shown(&net, bob);
    let stop = longest_stop(&shown, cut, net.now());
    let last = shown.last().map(|(_, rank)| *rank);
    if std::env::var("WHY").is_ok() {
        for w in shown.windows(2).filter(|w| w[1].0 > cut) {
            if w[1].1 != w[0].1 || w[1].0 - w[0].0 > Duration::from_millis(150) {
                println!(
                    "    {:?} after the cut: rank {} -> {} after {:?}",
                    w[1].0 - cut,
                    w[0].1,
                    w[1].1,
                    w[1].0 - w[0].0
                );
            }
        }
    }
    let mut keyframes: BTreeMap<(u64, u8), (usize, usize)> = BTreeMap::new();
    for r in &net.clients[bob].received[received_before..] {
        if let Some(f) = cam.frame_of(&r.payload).filter(|f| f.keyframe) {
            keyframes
                .entry((f.number, f.rank))
                .or_insert((0, f.packets))
                .0 += 1;
        }
    }
    let keyframes: Vec<String> = keyframes
        .iter()
        .map(|((_, rank), (got, of))| format!("{rank}: {got}/{of}"))
        .collect();
    println!(
        "{:>9} ms  {:>10}  {wire:>11}  {media:>12}  {}",
        stop.as_millis(),
        last.map_or("-".to_string(), |r| r.to_string()),
        keyframes.join(", ")
    );
}
