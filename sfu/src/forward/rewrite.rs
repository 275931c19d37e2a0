//! Per-subscriber RTP header rewriting: one continuous outgoing stream per forwarded track.
//!
//! The subscriber sees its own SSRC (chosen by the engine) and a sequence number and timestamp
//! space that stays continuous when the source changes (a simulcast layer switch, or the
//! publisher restarting its encoder). Within one source the publisher's spacing is kept exactly,
//! so gaps from real loss stay gaps and the receiver's NACK and jitter logic keep working.
//! Packets the focus itself leaves out (frames of a temporal layer the subscriber does not
//! get) are [`SeqTsRewriter::skip`]ped: they leave no gap, so the receiver never asks for them.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How many of the latest skipped packets are remembered, so that a packet arriving late (after
/// later packets were skipped) still gets its own number. Reordering deeper than this many
/// skipped packets numbers a late packet as if they came after it: it may then repeat a number
/// already sent, which the receiver drops as a duplicate. More costs memory per subscriber and
/// track; a frame of a skipped layer is a few packets.
const SKIP_MEMORY: usize = 32;

/// What to do with one incoming packet for one subscriber.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rewritten {
    /// Send with these extended sequence number and RTP timestamp.
    Send { seq: u64, ts: u32 },
    /// Older than the start of the current source: forwarding it would move the subscriber's
    /// sequence backwards across a switch.
    DropStale,
}

#[derive(Debug, Clone, Copy)]
struct Epoch {
    /// Source identity (the publisher-side SSRC).
    source: u32,
    /// First extended sequence number forwarded from this source.
    first_in_seq: u64,
    /// Output = input + offset (sequence), wrapping add (timestamp), for a packet newer than
    /// every packet skipped.
    seq_offset: i64,
    ts_offset: u32,
    /// The highest input sequence number seen, forwarded or skipped.
    highest_in: u64,
}

/// Sequence/timestamp mapping for one subscriber's copy of one track.
#[derive(Debug, Clone)]
pub struct SeqTsRewriter {
    clock_rate: u32,
    epoch: Option<Epoch>,
    /// Highest output sequence number and the timestamp/time it was sent with.
    last_out: Option<(u64, u32, Instant)>,
    first_out_seq: u64,
    first_out_ts: u32,
    /// Input sequence numbers of the latest packets skipped in this epoch, oldest first.
    skipped: VecDeque<u64>,
}

impl SeqTsRewriter {
    /// `first_out_seq` must stay below 2^16 - a few thousand: a receiver assumes SRTP rollover
    /// counter 0 for a new stream, so a stream that starts near the top of the range would
    /// wrap into ROC 1 before the receiver has seen it and fail authentication.
    pub fn new(clock_rate: u32, first_out_seq: u16, first_out_ts: u32) -> Self {
        SeqTsRewriter {
            clock_rate: clock_rate.max(1),
            epoch: None,
            last_out: None,
            first_out_seq: u64::from(first_out_seq.min(u16::MAX / 2)),
            first_out_ts,
            skipped: VecDeque::new(),
        }
    }

    /// Whether a source has been forwarded yet.
    pub fn started(&self) -> bool {
        self.epoch.is_some()
    }

    /// Forget the current source after a pause: the next packet starts a new epoch that
    /// continues the output where it stopped, even if it comes from the same source, so the
    /// packets skipped during the pause do not look lost to the receiver.
    pub fn resume(&mut self) {
        self.epoch = None;
        self.skipped.clear();
    }

    /// Leave this packet of the current source out without a gap: the packets after it move
    /// down by one. Only a packet newer than every packet seen shifts the numbering; an older
    /// one (a late retransmission) leaves a gap rather than renumber packets already sent.
    pub fn skip(&mut self, source: u32, in_seq: u64) {
        let Some(e) = self.epoch.as_mut() else { return };
        if e.source != source || in_seq <= e.highest_in {
            return;
        }
        e.highest_in = in_seq;
        e.seq_offset -= 1;
        if self.skipped.len() == SKIP_MEMORY {
            self.skipped.pop_front();
        }
        self.skipped.push_back(in_seq);
    }

    /// Map one packet. `in_seq` is the publisher's extended (rollover-free) sequence number.
    pub fn rewrite(&mut self, source: u32, in_seq: u64, in_ts: u32, now: Instant) -> Rewritten {
        if self.epoch.is_none_or(|e| e.source != source) {
            self.start_epoch(source, in_seq, in_ts, now);
        }
        let Some(epoch) = self.epoch.as_mut() else {
            return Rewritten::DropStale; // start_epoch always sets one
        };
        if in_seq < epoch.first_in_seq {
            return Rewritten::DropStale;
        }
        // Skipped packets newer than this one have already moved the offset down.
        let later_skips = if in_seq > epoch.highest_in {
            epoch.highest_in = in_seq;
            0
        } else {
            self.skipped.iter().filter(|s| **s > in_seq).count() as i64
        };
        let epoch = *epoch;
        let seq = (in_seq as i64 + epoch.seq_offset + later_skips) as u64;
        let ts = in_ts.wrapping_add(epoch.ts_offset);
        match self.last_out {
            Some((last_seq, _, _)) if last_seq >= seq => {}
            _ => self.last_out = Some((seq, ts, now)),
        }
        Rewritten::Send { seq, ts }
    }

    fn start_epoch(&mut self, source: u32, in_seq: u64, in_ts: u32, now: Instant) {
        let (out_seq, out_ts) = match self.last_out {
            None => (self.first_out_seq, self.first_out_ts),
            Some((last_seq, last_ts, at)) => {
                // Advance the clock by the real time that passed, so the receiver's jitter
                // buffer does not squeeze frames from two sources together.
                let elapsed = now
                    .saturating_duration_since(at)
                    .max(Duration::from_millis(1));
                let ticks = (elapsed.as_micros() * u128::from(self.clock_rate) / 1_000_000) as u32;
                (last_seq + 1, last_ts.wrapping_add(ticks.max(1)))
            }
        };
        self.skipped.clear();
        self.epoch = Some(Epoch {
            source,
            first_in_seq: in_seq,
            seq_offset: out_seq as i64 - in_seq as i64,
            ts_offset: out_ts.wrapping_sub(in_ts),
            highest_in: in_seq,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send(r: Rewritten) -> (u64, u32) {
        match r {
            Rewritten::Send { seq, ts } => (seq, ts),
            Rewritten::DropStale => panic!("unexpected drop"),
        }
    }

    #[test]
    fn first_packet_maps_to_the_chosen_start_and_spacing_is_kept() {
        let t0 = Instant::now();
        let mut r = SeqTsRewriter::new(90_000, 1000, 5000);
        assert_eq!(send(r.rewrite(7, 70_000, 123_456, t0)), (1000, 5000));
        assert_eq!(send(r.rewrite(7, 70_001, 123_456, t0)), (1001, 5000));
        // A lost packet stays a gap, the timestamp keeps the publisher's spacing.
        assert_eq!(send(r.rewrite(7, 70_003, 126_456, t0)), (1003, 8000));
        // Reordered packets of the same source are forwarded in their place.
        assert_eq!(send(r.rewrite(7, 70_002, 126_456, t0)), (1002, 8000));
    }

    #[test]
    fn a_new_source_continues_where_the_old_one_stopped() {
        let t0 = Instant::now();
        let mut r = SeqTsRewriter::new(90_000, 10, 0);
        send(r.rewrite(1, 500, 1_000, t0));
        send(r.rewrite(1, 501, 4_000, t0));
        let t1 = t0 + Duration::from_millis(100);
        let (seq, ts) = send(r.rewrite(2, 9_000, 77, t1));
        assert_eq!(seq, 12);
        // 100 ms at 90 kHz after the last output timestamp (3000).
        assert_eq!(ts, 3_000 + 9_000);
        assert_eq!(send(r.rewrite(2, 9_001, 77 + 3_000, t1)), (13, 15_000));
    }

    #[test]
    fn a_resumed_source_continues_without_a_gap() {
        let t0 = Instant::now();
        let mut r = SeqTsRewriter::new(90_000, 10, 0);
        send(r.rewrite(1, 500, 1_000, t0));
        r.resume();
        // 400 packets later, same source: output continues at 11, not 410.
        let (seq, _) = send(r.rewrite(1, 900, 91_000, t0 + Duration::from_secs(1)));
        assert_eq!(seq, 11);
    }

    #[test]
    fn skipped_packets_leave_no_gap_and_late_packets_keep_their_place() {
        let t0 = Instant::now();
        let mut r = SeqTsRewriter::new(90_000, 100, 0);
        assert_eq!(send(r.rewrite(1, 10, 0, t0)), (100, 0));
        r.skip(1, 11);
        r.skip(1, 12);
        assert_eq!(send(r.rewrite(1, 14, 0, t0)).0, 102, "13 was lost: a gap");
        // 13 arrives late: it keeps the number between 12's skip and 14.
        assert_eq!(send(r.rewrite(1, 13, 0, t0)).0, 101);
        r.skip(1, 15);
        assert_eq!(send(r.rewrite(1, 16, 0, t0)).0, 103);
        // A late packet older than the newest seen, skipped: numbering stays.
        r.skip(1, 9);
        r.skip(1, 15);
        assert_eq!(send(r.rewrite(1, 17, 0, t0)).0, 104);
        // Another source's packet is not this epoch's to skip.
        r.skip(2, 18);
        assert_eq!(send(r.rewrite(1, 18, 0, t0)).0, 105);
    }

    #[test]
    fn skips_before_anything_was_forwarded_change_nothing() {
        let t0 = Instant::now();
        let mut r = SeqTsRewriter::new(90_000, 100, 0);
        r.skip(1, 5);
        assert_eq!(send(r.rewrite(1, 6, 0, t0)).0, 100);
        r.skip(1, 7);
        r.resume();
        assert_eq!(send(r.rewrite(1, 9, 0, t0)).0, 101);
    }

    #[test]
    fn packets_from_before_a_switch_are_dropped() {
        let t0 = Instant::now();
        let mut r = SeqTsRewriter::new(48_000, 0, 0);
        send(r.rewrite(1, 100, 0, t0));
        send(r.rewrite(2, 50, 0, t0));
        assert_eq!(r.rewrite(2, 49, 0, t0), Rewritten::DropStale);
    }

    #[test]
    fn timestamps_wrap_and_the_start_stays_in_rollover_counter_zero() {
        let t0 = Instant::now();
        let mut r = SeqTsRewriter::new(90_000, u16::MAX, u32::MAX - 10);
        let (seq, ts) = send(r.rewrite(1, 1 << 40, 5, t0));
        assert!(seq < 1 << 16);
        assert_eq!(ts, u32::MAX - 10);
        let (_, ts) = send(r.rewrite(1, (1 << 40) + 1, 25, t0));
        assert_eq!(ts, 9);
    }
}
