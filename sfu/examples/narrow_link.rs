//! Three simulcast cameras (with microphones) to one subscriber whose downlink carries
//! 600 kbit/s, in the simulated network: what the focus sends that subscriber, on the wire
//! and as media payload, every 4 s of 20. A measurement, not a test (the test
//! `three_cameras_share_a_narrow_link` asserts a floor): runs differ a little, since the
//! engines draw SSRCs and keys at random. `cargo run -p weir-sfu --example narrow_link`.

use std::time::Duration;

use weir_sfu::sim::{cameras_to_one_watcher, media_bytes, run_together, SimNet};

fn main() {
    let mut net = SimNet::default();
    let (mut cams, bob) = cameras_to_one_watcher(&mut net, 3, 600_000);
    let mut last = (0u64, 0usize);
    println!("second  wire kbit/s  media kbit/s");
    for s in (4..=20).step_by(4) {
        run_together(&mut cams, &mut net, Duration::from_secs(4));
        let (wire, media) = (net.clients[bob].bytes_in, media_bytes(&net, bob));
        println!(
            "{s:>6}  {:>11}  {:>12}",
            (wire - last.0) * 8 / 4000,
            (media - last.1) * 8 / 4000
        );
        last = (wire, media);
    }
}
