//! Received sequence numbers: extended past their 16-bit wrap, and what is missing.

/// Sequence numbers (16-bit, in arrival order) extended to a continuous count, so that a
/// retransmission arriving late sorts where it belongs.
pub fn unwrap_seqs(seqs: impl IntoIterator<Item = u16>) -> Vec<i64> {
    let mut out = Vec::new();
    let mut last: Option<(u16, i64)> = None;
    for s in seqs {
        let ext = match last {
            Some((l, base)) => base + i64::from(s.wrapping_sub(l) as i16),
            None => i64::from(s),
        };
        last = Some((s, ext));
        out.push(ext);
    }
    out
}

/// The share of packets missing from received sequence numbers (in arrival order, 16-bit,
/// continuous in the subscriber's sequence space).
pub fn sequence_loss(seqs: &[u16]) -> f64 {
    let mut unique = unwrap_seqs(seqs.iter().copied());
    unique.sort_unstable();
    unique.dedup();
    let (Some(lo), Some(hi)) = (unique.first(), unique.last()) else {
        return 0.0;
    };
    let expected = (hi - lo + 1) as f64;
    1.0 - unique.len() as f64 / expected
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_late_retransmission_sorts_in_and_gaps_count_as_loss() {
        assert_eq!(
            unwrap_seqs([65534, 65535, 1, 0, 2]),
            vec![65534, 65535, 65537, 65536, 65538]
        );
        assert_eq!(sequence_loss(&[1, 2, 4, 3, 5]), 0.0);
        assert_eq!(sequence_loss(&[1, 2, 5]), 0.4);
    }
}
