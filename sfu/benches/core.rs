//! The whole shard core per forwarded packet, without the kernel: one publisher's video
//! datagrams (real SRTP from a str0m participant, 1100-byte payloads) go into
//! `ShardCore::handle_datagram` in turns of [`BATCH`] datagrams, each followed by the core's
//! timeout round and flush, to N subscribers that completed ICE and DTLS in memory
//! (`weir_sfu::sim`). Virtual time moves at 1000 packets/s, the issue-7 load shape, so engine
//! timers and RTCP come due as often as in a real run. Demux, SRTP decrypt, fan-out, rewrite,
//! the subscribers' engines, SRTP encrypt, timers and queueing are measured; the kernel
//! (recvmmsg, sendmmsg) and the participants' side of the network are not.
//!
//!     cargo bench -p weir-sfu --bench core

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use weir_sfu::sim::{Publish, SimNet};
use weir_sfu::SfuConfig;

const PAYLOAD: usize = 1100;
/// Datagrams per shard turn: what the 1 -> 50 load test averages (about 7) at 1000 packets/s.
const BATCH: u64 = 8;
/// Virtual time between two packets of the publisher.
const PACKET_INTERVAL: Duration = Duration::from_millis(1);

fn core_fanout(c: &mut Criterion) {
    let mut group = c.benchmark_group("core_fanout");
    group.measurement_time(Duration::from_secs(10));
    for n in [1usize, 10, 50, 200] {
        let mut net = SimNet::new(SfuConfig {
            // Virtual time runs far ahead of the participants' consent checks here.
            silence_timeout: Duration::from_secs(3600),
            // The forwarding path alone, as measured before allocation existed: with it,
            // str0m paces each subscriber's copies out over virtual time (docs/benchmarks.md
            // has what allocation costs, measured with the load tester).
            estimate_from_bps: None,
            ..SfuConfig::default()
        });
        let alice = net.join(
            1,
            Publish {
                video: true,
                ..Publish::default()
            },
        );
        for _ in 0..n {
            net.join(1, Publish::default());
        }
        assert!(
            net.run_until(Duration::from_secs(60), |n| n.all_connected()),
            "core_fanout/{n}: participants connect"
        );
        net.run_for(Duration::from_millis(200));
        // Not what it claims unless every subscriber receives the publisher's packets.
        net.send_video(alice, None, true, PAYLOAD);
        net.run_for(Duration::from_millis(20));
        let receiving = net.clients[1..]
            .iter()
            .filter(|c| c.received.len() == 1)
            .count();
        assert_eq!(
            receiving, n,
            "core_fanout/{n}: every subscriber receives the keyframe"
        );
        let from = net.clients[alice].addr;
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                let mut left = iters;
                while left > 0 {
                    let k = left.min(BATCH);
                    let mut batch = Vec::new();
                    for _ in 0..k {
                        net.send_video(alice, None, false, PAYLOAD);
                        batch.extend(net.capture(alice));
                    }
                    let now = net.now();
                    let mut out = 0usize;
                    let start = Instant::now();
                    for d in &batch {
                        net.core.handle_datagram(from, d, now);
                    }
                    net.core.handle_timeout(now);
                    net.core.flush(|q| q.drain_each(|_, d| out += d.len()));
                    timed += start.elapsed();
                    black_box(out);
                    left -= k;
                    // Untimed: the participants' side of the network, as time passes.
                    net.run_for(PACKET_INTERVAL * k as u32);
                }
                timed
            })
        });
    }
    group.finish();
}

criterion_group!(benches, core_fanout);
criterion_main!(benches);
