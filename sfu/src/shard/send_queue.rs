//! What waits in a subscriber's send stream when it moves down: a queue that has gone stale is
//! dropped just before the keyframe it moves on, so that keyframe goes first.
//!
//! The engine paces what it sends at its own estimate of the link, which follows a narrowing
//! link within a few hundred milliseconds, while allocation follows the smoothed estimate the
//! engine reports, which lags it by up to a second. Until allocation moves a video down, the
//! layer being left keeps coming faster than the pacer lets it out, and queues: in a Chromium
//! run of `web/test/simulcast.test.mjs` 78 kB of it, its oldest packet 1.2 s old when the
//! quarter layer's keyframe was written behind it. Everything in that queue is of the layer
//! left; the keyframe makes it useless to the subscriber, and sent first it holds the
//! keyframe back for as long as it took to drain.
//!
//! A scalable stream (VP9, AV1 SVC) moves down within one SSRC at a switch point, with no
//! keyframe: the lower layers' frames are in the queue too. So fan-out asks for a keyframe
//! when such a move finds the queue stale, and drops the queue when it comes.
//!
//! str0m 0.25 clears a send stream's queue (and its retransmission history) when its media
//! stops sending; setting the direction away from sending and back, without negotiating,
//! is the one public way to do that and keep the stream's SSRC (`reset_stream_tx` clears it
//! too, but with a new SSRC the subscriber never negotiated). The subscriber sees a gap in
//! the sequence numbers just before the keyframe, as if the link had dropped what was queued
//! (which a link this full would mostly have done). Its NACKs for the gap go unanswered, and decoding the keyframe
//! ends them.

use std::time::{Duration, Instant};

use str0m::media::{Direction, Mid};
use str0m::rtp::Ssrc;
use str0m::Rtc;

/// At a move down, a send queue whose oldest packet has waited longer than this is dropped
/// before the keyframe the subscriber moves on.
/// Shorter drops frames of the old layer that would still have been shown before the new
/// keyframe (the picture skips them); longer leaves the keyframe behind more of them. A link
/// that is not congested keeps the queue at a few milliseconds, so the rule does not fire.
pub const STALE_BEFORE_KEYFRAME: Duration = Duration::from_millis(100);

/// Whether the send stream `ssrc` holds packets that have waited longer than
/// [`STALE_BEFORE_KEYFRAME`], by the engine's last look at its queue (taken every time it polls).
pub fn is_stale(rtc: &mut Rtc, ssrc: Ssrc, now: Instant) -> bool {
    let mut api = rtc.direct_api();
    let Some(tx) = api.stream_tx(&ssrc) else {
        return false;
    };
    tx.queue_info()
        .and_then(|q| q.first_unsent())
        .is_some_and(|t| now.saturating_duration_since(t) > STALE_BEFORE_KEYFRAME)
}

/// Drop what is queued on `mid`'s send streams if the one with `ssrc` has gone stale
/// ([`is_stale`], [`drop_queued`]). Returns whether it did.
pub fn drop_if_stale(rtc: &mut Rtc, ssrc: Ssrc, mid: Mid, now: Instant) -> bool {
    is_stale(rtc, ssrc, now) && drop_queued(rtc, mid)
}

/// Drop everything queued on `mid`'s send streams (and their retransmission histories),
/// keeping its negotiated direction. Only a send-only m-line (what weir offers for a forwarded
/// track): on one that also receives, the toggle would reset the receive side too. Returns
/// whether it did.
pub fn drop_queued(rtc: &mut Rtc, mid: Mid) -> bool {
    if rtc.media(mid).map(|m| m.direction()) != Some(Direction::SendOnly) {
        return false;
    }
    let mut sdp = rtc.sdp_api();
    sdp.set_direction(mid, Direction::Inactive);
    sdp.set_direction(mid, Direction::SendOnly);
    // Dropped unapplied: the direction is back where it was, so there is nothing to negotiate.
    drop(sdp);
    true
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use str0m::bwe::Bitrate;
    use str0m::media::Pt;
    use str0m::rtp::RtpWrite;
    use str0m::IceCreds;

    use super::*;
    use crate::engine::new_rtc_estimating;
    use crate::sim::{vp8_pt, EnginePair};

    const MS: Duration = Duration::from_millis(1);

    fn write(p: &mut EnginePair, pt: Pt, seq: u64, now: Instant) {
        let payload: Arc<[u8]> = vec![0x10u8; 1000].into();
        let mut api = p.sfu.direct_api();
        let tx = api.stream_tx_by_mid(p.mid, None).expect("send stream");
        tx.write_rtp(RtpWrite::new(pt, seq.into(), (seq * 3000) as u32, now, payload).marker(true));
    }

    fn ssrc(p: &mut EnginePair) -> Ssrc {
        let mid = p.mid;
        let mut api = p.sfu.direct_api();
        api.stream_tx_by_mid(mid, None).expect("send stream").ssrc()
    }

    /// Pump every 10 ms for `ms`; the sequence numbers the client took on `ssrc`.
    fn run(p: &mut EnginePair, ssrc: Ssrc, now: &mut Instant, ms: u64) -> Vec<u64> {
        let mut got = Vec::new();
        for _ in 0..ms / 10 {
            let r = p.pump(*now);
            got.extend(r.rtp.iter().filter(|(s, _)| *s == ssrc).map(|(_, q)| **q));
            *now += 10 * MS;
        }
        got
    }

    /// A connected pair whose weir side estimates `estimate`, written `n` packets of 1000
    /// bytes (sequence numbers 1 to `n`) at once, not yet pumped.
    fn written(estimate: Bitrate, n: u64) -> (EnginePair, Pt, Ssrc, Instant) {
        let t0 = Instant::now();
        let rtc = new_rtc_estimating(t0, estimate, IceCreds::new());
        let mut p = EnginePair::connect(rtc, 0, t0);
        let pt = vp8_pt(&p.sfu).expect("VP8 negotiated");
        let ssrc = ssrc(&mut p);
        let now = t0 + 20 * MS;
        for seq in 1..=n {
            write(&mut p, pt, seq, now);
        }
        (p, pt, ssrc, now)
    }

    /// An engine estimating 100 kbit/s, written 800 kbit at once: its pacer lets out about
    /// 110 kbit/s, so the queue goes stale; dropped, the next packet written goes first and
    /// nothing queued before it follows.
    #[test]
    fn a_queue_the_pacer_holds_back_goes_stale_and_dropped_lets_the_next_packet_go_first() {
        let (mut p, pt, ssrc, mut now) = written(Bitrate::kbps(100), 100);
        let before = run(&mut p, ssrc, &mut now, 300);
        assert!(
            !before.is_empty() && before.len() < 50,
            "the pacer let out {} of 100 packets in 300 ms",
            before.len()
        );
        assert!(is_stale(&mut p.sfu, ssrc, now), "300 ms in the queue");
        assert!(drop_queued(&mut p.sfu, p.mid));
        write(&mut p, pt, 101, now);
        let after = run(&mut p, ssrc, &mut now, 1000);
        assert_eq!(
            after,
            vec![101],
            "after the drop only the new packet arrives"
        );
        assert_eq!(
            p.sfu.media(p.mid).map(|m| m.direction()),
            Some(Direction::SendOnly),
            "the m-line still sends, with nothing to negotiate"
        );
        write(&mut p, pt, 102, now);
        assert_eq!(run(&mut p, ssrc, &mut now, 100), vec![102]);
    }

    /// An engine estimating 10 Mbit/s lets ten packets out at once: nothing goes stale.
    #[test]
    fn a_queue_that_keeps_up_is_not_stale() {
        let (mut p, _, ssrc, mut now) = written(Bitrate::mbps(10), 10);
        let got = run(&mut p, ssrc, &mut now, 200);
        assert_eq!(got.len(), 10);
        assert!(!is_stale(&mut p.sfu, ssrc, now));
    }
}
