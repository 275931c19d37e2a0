//! The bitrate of one publisher layer, measured as it arrives: what the allocator charges a
//! subscriber for receiving that layer.

use std::time::{Duration, Instant};

/// Bytes a packet costs on the wire beyond its RTP payload: RTP header with the usual
/// extensions (~24), SRTP tag (10), UDP and IPv4 (28). Charged per packet so a layer of many
/// small packets is not under-counted against the estimate, which sees whole datagrams.
pub const PACKET_OVERHEAD_BYTES: u64 = 60;

/// How long one measurement spans. Longer smooths over keyframes (a keyframe is several times
/// a delta frame, sent once per interval) but notices a publisher's rate change later; one
/// second holds about 30 frames.
pub const RATE_WINDOW: Duration = Duration::from_secs(1);

/// A bitrate measured over consecutive windows of [`RATE_WINDOW`].
#[derive(Debug, Clone, Default)]
pub struct RateMeter {
    window_start: Option<Instant>,
    bytes: u64,
    /// The rate of the last complete window, in bits per second.
    last_bps: Option<u64>,
}

impl RateMeter {
    /// Count a packet of `payload_len` bytes.
    pub fn add(&mut self, payload_len: usize, now: Instant) {
        let start = *self.window_start.get_or_insert(now);
        let elapsed = now.saturating_duration_since(start);
        if elapsed >= RATE_WINDOW * 2 {
            // The stream stopped for a while (a layer the publisher was told to stop, and
            // started again): a window stretched over the pause would read as a trickle, and
            // allocation would take the restarted layer for nearly free. Start measuring anew.
            *self = RateMeter {
                window_start: Some(now),
                ..RateMeter::default()
            };
        } else if elapsed >= RATE_WINDOW {
            self.last_bps = Some(bits_per_second(self.bytes, elapsed));
            self.window_start = Some(now);
            self.bytes = 0;
        }
        self.bytes += payload_len as u64 + PACKET_OVERHEAD_BYTES;
    }

    /// The measured rate: the last complete window's, or, before one completed, what the
    /// first window has seen so far (at least a tenth of a window, so one keyframe does not
    /// read as megabits). `None` before that.
    pub fn bps(&self, now: Instant) -> Option<u64> {
        if self.last_bps.is_some() {
            return self.last_bps;
        }
        let elapsed = now.saturating_duration_since(self.window_start?);
        (elapsed >= RATE_WINDOW / 10).then(|| bits_per_second(self.bytes, elapsed))
    }
}

fn bits_per_second(bytes: u64, over: Duration) -> u64 {
    let micros = over.as_micros().max(1) as u64;
    bytes.saturating_mul(8_000_000) / micros
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_steady_stream_measures_its_rate_with_overhead() {
        let t0 = Instant::now();
        let mut m = RateMeter::default();
        assert_eq!(m.bps(t0), None);
        // 100 packets a second of 940 bytes: 1000 bytes each on the wire, 800 kbit/s.
        for i in 0..=300u64 {
            m.add(940, t0 + Duration::from_millis(10 * i));
        }
        let bps = m.bps(t0 + Duration::from_secs(3)).unwrap();
        assert!((790_000..=810_000).contains(&bps), "{bps}");
    }

    #[test]
    fn the_first_window_reports_what_it_has_seen_once_long_enough() {
        let t0 = Instant::now();
        let mut m = RateMeter::default();
        m.add(9_940, t0);
        assert_eq!(
            m.bps(t0 + Duration::from_millis(50)),
            None,
            "one keyframe alone says nothing yet"
        );
        for i in 1..=20u64 {
            m.add(940, t0 + Duration::from_millis(10 * i));
        }
        // 30 kB in 200 ms.
        let bps = m.bps(t0 + Duration::from_millis(200)).unwrap();
        assert_eq!(bps, 1_200_000);
    }

    #[test]
    fn a_stream_that_stopped_and_started_again_is_measured_afresh() {
        let t0 = Instant::now();
        let mut m = RateMeter::default();
        // 800 kbit/s for 2 s, then nothing for 5 s (switched off), then 800 kbit/s again.
        for i in 0..200u64 {
            m.add(940, t0 + Duration::from_millis(10 * i));
        }
        let back = t0 + Duration::from_secs(7);
        m.add(940, back);
        assert_eq!(m.bps(back), None, "not measured again yet, not a trickle");
        for i in 1..=20u64 {
            m.add(940, back + Duration::from_millis(10 * i));
        }
        let bps = m.bps(back + Duration::from_millis(200)).unwrap();
        assert!((790_000..=850_000).contains(&bps), "{bps}");
    }

    #[test]
    fn a_rate_change_shows_after_one_window() {
        let t0 = Instant::now();
        let mut m = RateMeter::default();
        let mut t = t0;
        for _ in 0..200 {
            m.add(940, t);
            t += Duration::from_millis(10);
        }
        // From 800 to 80 kbit/s.
        for _ in 0..30 {
            m.add(940, t);
            t += Duration::from_millis(100);
        }
        let bps = m.bps(t).unwrap();
        assert!((70_000..=90_000).contains(&bps), "{bps}");
    }
}
