//! The shard core with participants that completed ICE and DTLS (`weir_sfu::sim`): a
//! publisher sends what the fuzzer chooses through its real SRTP session (any payload type,
//! sequence number, timestamp, marker and payload, on any simulcast layer), data-channel
//! messages, and raw datagrams from its address; the watcher subscribes at sizes the fuzzer
//! picks, and screens are named at random; time moves as the fuzzer says. The core must
//! never panic, and the other participant keeps receiving a well-formed publisher's video
//! (or is told it is paused for bandwidth). Bandwidth allocation is on, as by default.
#![no_main]
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use weir_sfu::sim::{Publish, SimNet};

/// Operations taken from one input: a bound, so one input cannot run for long.
const MAX_OPS: usize = 64;

fuzz_target!(|data: &[u8]| {
    let mut net = SimNet::default();
    let hostile = net.join(
        1,
        Publish {
            audio: true,
            video: true,
            simulcast: true,
        },
    );
    let honest = net.join(
        1,
        Publish {
            audio: false,
            video: true,
            simulcast: false,
        },
    );
    let watcher = net.join(1, Publish::default());
    assert!(net.run_until(Duration::from_secs(10), |n| n.all_connected()));
    net.run_for(Duration::from_millis(100));

    let mut ops = data;
    let mut seq = 1u64;
    for _ in 0..MAX_OPS {
        let Some((&op, rest)) = ops.split_first() else {
            break;
        };
        // Each op takes a length byte and that many bytes (or what is left).
        let Some((&len, rest)) = rest.split_first() else {
            break;
        };
        let n = usize::from(len).min(rest.len());
        let (arg, rest) = rest.split_at(n);
        ops = rest;
        match op % 7 {
            0 if arg.len() >= 8 => {
                let rid = ["q", "h", "f"].get(usize::from(arg[0] % 4)).copied();
                let seq_in = u64::from(u16::from_be_bytes([arg[1], arg[2]]));
                let ts = u32::from_be_bytes([arg[3], arg[4], arg[5], arg[6]]);
                net.send_rtp(hostile, rid, arg[7] & 0x7f, seq_in, ts, arg[0] & 0x80 != 0, &arg[8..]);
            }
            1 => {
                net.send_data(hostile, arg.first().is_some_and(|b| b & 1 == 1), arg);
            }
            2 => net.send_raw(hostile, arg),
            3 => {
                let ms = arg.first().map_or(1, |b| u64::from(*b));
                net.run_for(Duration::from_millis(ms));
            }
            // The watcher resizes its tiles: the honest video always in full, the other at a
            // height the fuzzer picks (dynacast then tells the hostile publisher its layers).
            5 => {
                let height = arg.get(..2).map(|b| u32::from(u16::from_be_bytes([b[0], b[1]])));
                let sub = |who: usize, max_height: Option<u32>| weir_sfu::Subscription {
                    stream_id: format!("stream-{who}"),
                    track_id: format!("video-{who}"),
                    max_height,
                    source_height: arg.get(2).map(|b| u32::from(*b) * 8),
                };
                let (peer, now) = (net.clients[watcher].peer, net.now());
                let subscriptions = vec![sub(honest, None), sub(hostile, height)];
                net.core.handle_command(weir_sfu::Command::Subscribe { peer, subscriptions }, now);
            }
            // The control plane names screens, of either publisher, with any stream ids.
            6 => {
                let who = if arg.first().is_some_and(|b| b & 1 == 1) { honest } else { hostile };
                let streams = arg
                    .chunks(4)
                    .map(|c| String::from_utf8_lossy(c).into_owned())
                    .chain(std::iter::once(format!("stream-{who}")))
                    .collect();
                let (peer, now) = (net.clients[who].peer, net.now());
                net.core.handle_command(weir_sfu::Command::Screens { peer, streams }, now);
            }
            _ => {
                net.send_video(honest, None, seq == 1, 900);
                seq += 1;
            }
        }
        net.step();
    }
    // The honest publisher still gets through to the watcher, unless the watcher's bandwidth
    // allocation paused it and said so (the fuzzer can make the honest camera send more
    // than the watcher's estimate carries). The camera goes on sending keyframes, as a camera
    // answering keyframe requests does: a video that starts only once it fits the watcher's
    // estimate (allocation holds back new videos that do not) starts on the next one.
    // Within a second: with allocation on, str0m paces the watcher's media to its estimate,
    // so what the fuzzer queued ahead of these packets leaves first.
    let mut sent = Vec::new();
    for _ in 0..10 {
        sent.push(net.send_video(honest, None, true, 900));
        let got = |n: &SimNet| n.clients[watcher].received.iter().any(|r| sent.contains(&r.payload));
        if net.run_until(Duration::from_millis(100), got) {
            break;
        }
    }
    let stream = format!("stream-{honest}");
    let paused = net.clients[watcher]
        .messages
        .iter()
        .rev()
        .find(|m| m.contains("io.weir.paused") && m.contains(&stream))
        .is_some_and(|m| m.contains("\"paused\":true"));
    assert!(
        paused || net.clients[watcher].received.iter().any(|r| sent.contains(&r.payload)),
        "the watcher stopped receiving the honest publisher"
    );
});
