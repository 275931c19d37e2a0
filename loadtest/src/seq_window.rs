//! A sliding window of sequence numbers seen: duplicates, loss, and counters that wrap.

/// Width of the duplicate-detection window, in sequence numbers.
pub const SEQ_WINDOW: u64 = 4096;

/// Result of recording a sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    New,
    Duplicate,
    /// Too far behind to tell; counted as neither.
    TooOld,
}

/// Extend `v`, a counter of `bits` bits that wraps, to the u64 nearest `last` (the previous
/// extended value): forward or back by at most half the counter's range.
pub fn unwrap_counter(last: Option<u64>, v: u64, bits: u32) -> u64 {
    let range = 1u64 << bits;
    let Some(last) = last else {
        // Room below, so a late value before the first is not negative.
        return (1 << 40) + v;
    };
    let d = v.wrapping_sub(last) & (range - 1);
    if d < range / 2 {
        last + d
    } else {
        last - (range - d)
    }
}

/// Sliding window of sequence numbers seen, for duplicate detection and loss accounting.
#[derive(Debug, Clone)]
pub struct SeqWindow {
    first: u64,
    max: u64,
    bits: Vec<u64>,
    started: bool,
    /// Distinct sequence numbers received.
    pub received: u64,
}

impl Default for SeqWindow {
    fn default() -> Self {
        SeqWindow {
            first: 0,
            max: 0,
            bits: vec![0; (SEQ_WINDOW / 64) as usize],
            started: false,
            received: 0,
        }
    }
}

impl SeqWindow {
    fn bit(&mut self, seq: u64) -> (&mut u64, u64) {
        let i = seq % SEQ_WINDOW;
        (&mut self.bits[(i / 64) as usize], 1u64 << (i % 64))
    }

    /// Record `seq`; returns whether it is new and how many sequence numbers the highest-seen
    /// advanced by (the "expected" increment).
    pub fn insert(&mut self, seq: u64) -> (Seen, u64) {
        if !self.started {
            self.started = true;
            self.first = seq;
            self.max = seq;
            self.received = 1;
            let (w, b) = self.bit(seq);
            *w |= b;
            return (Seen::New, 1);
        }
        if seq > self.max {
            let advance = seq - self.max;
            // Clear the bits of the numbers we skip over (they leave the window's past).
            let clear = advance.min(SEQ_WINDOW);
            for s in (seq - clear + 1)..=seq {
                let (w, b) = self.bit(s);
                *w &= !b;
            }
            self.max = seq;
            let (w, b) = self.bit(seq);
            *w |= b;
            self.received += 1;
            return (Seen::New, advance);
        }
        if self.max - seq >= SEQ_WINDOW || seq < self.first {
            return (Seen::TooOld, 0);
        }
        let (w, b) = self.bit(seq);
        if *w & b != 0 {
            return (Seen::Duplicate, 0);
        }
        *w |= b;
        self.received += 1;
        (Seen::New, 0)
    }

    /// Sequence numbers between the first and the highest seen.
    pub fn expected(&self) -> u64 {
        if self.started {
            self.max - self.first + 1
        } else {
            0
        }
    }

    /// The highest sequence number seen, if any.
    pub fn highest(&self) -> Option<u64> {
        self.started.then_some(self.max)
    }

    pub fn lost(&self) -> u64 {
        self.expected().saturating_sub(self.received)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_window_counts_loss_duplicates_and_late_fills() {
        let mut w = SeqWindow::default();
        assert_eq!(w.insert(10), (Seen::New, 1));
        assert_eq!(w.insert(11), (Seen::New, 1));
        assert_eq!(w.insert(14), (Seen::New, 3));
        assert_eq!(w.lost(), 2);
        assert_eq!(w.insert(12), (Seen::New, 0));
        assert_eq!(w.insert(12), (Seen::Duplicate, 0));
        assert_eq!(w.lost(), 1);
        assert_eq!(w.insert(9), (Seen::TooOld, 0));
        // Far ahead: the window slides without false duplicates.
        assert_eq!(w.insert(14 + 3 * SEQ_WINDOW), (Seen::New, 3 * SEQ_WINDOW));
        assert_eq!(w.insert(14 + 2 * SEQ_WINDOW + 5), (Seen::New, 0));
    }
}
