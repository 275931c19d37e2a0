//! Three simulcast cameras (with microphones) to one subscriber whose downlink carries
//! 600 kbit/s, in the simulated network: what the focus sends that subscriber, on the wire
//! and as media payload, every 4 s of 20. A measurement, not a test: runs differ (the
//! engines draw SSRCs and keys at random), and today they differ a lot
//! (docs/adaptation.md, "Known limits"). `cargo run -p weir-sfu --example narrow_link`.

use std::time::Duration;

use weir_sfu::sim::{Camera, Publish, SimNet};

fn main() {
    let mut net = SimNet::default();
    let simulcast = Publish {
        audio: true,
        video: true,
        simulcast: true,
    };
    let mut cams: Vec<Camera> = (0..3)
        .map(|_| Camera::new(net.join(1, simulcast), &Camera::SIMULCAST))
        .collect();
    let bob = net.join(1, Publish::NOTHING);
    assert!(net.run_until(Duration::from_secs(10), |n| n.all_connected()));
    net.clients[bob].link.rate_down_bps = 600_000;
    net.clients[bob].link.delay_down = Duration::from_millis(20);
    let mut last = (0u64, 0usize);
    println!("second  wire kbit/s  media kbit/s");
    for s in 1..=20 {
        for _ in 0..30 {
            for c in cams.iter_mut() {
                c.frame_only(&mut net);
            }
            net.run_for(Duration::from_micros(33_333));
        }
        let c = &net.clients[bob];
        let media: usize = c.received.iter().map(|r| r.payload.len() + 12).sum();
        if s % 4 == 0 {
            println!(
                "{s:>6}  {:>11}  {:>12}",
                (c.bytes_in - last.0) * 8 / 1000,
                (media - last.1) * 8 / 1000
            );
        }
        last = (c.bytes_in, media);
    }
}
