//! The load report's per-downlink summary: receivers behind a bottleneck (`--rate-kbps` with
//! `--impair down`) against the free ones, which is what adaptive forwarding is judged by.

use crate::participant::Report;
use crate::report::RunReport;

impl RunReport {
    /// Receivers grouped by their downlink, when some have a bottleneck rate (`--rate-kbps`
    /// with `--impair down`): what each group received, lost and froze, and the layer each
    /// of its videos was on at the end. Empty when every downlink is free.
    pub fn links_table(&self) -> String {
        let (limited, free): (Vec<&Report>, Vec<&Report>) =
            self.reports.iter().partition(|r| r.downlink_bps > 0);
        if limited.is_empty() {
            return String::new();
        }
        let median = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v.get(v.len() / 2).copied().unwrap_or(0.0)
        };
        let mut out = format!(
            "\n{:<22} {:>5} {:>14} {:>15} {:>8} {:>12} {:>12}  last layer q/h/f  frames % tid 0/1/2\n",
            "downlink",
            "parts",
            "rx kbit/s med",
            "loss % med/max",
            "freezes",
            "max/partic.",
            "longest ms"
        );
        for (name, group) in [("limited", limited), ("free", free)] {
            if group.is_empty() {
                continue;
            }
            let rates: Vec<u64> = group.iter().map(|r| r.downlink_bps / 1000).collect();
            let label = match (rates.iter().min(), rates.iter().max()) {
                (Some(a), Some(b)) if a == b && *a > 0 => format!("{name} ({a} kbit/s)"),
                _ => name.to_string(),
            };
            let rx = median(
                group
                    .iter()
                    .map(|r| r.rx.bytes as f64 * 8.0 / r.active_s.max(1e-9) / 1000.0)
                    .collect(),
            );
            let losses: Vec<f64> = group
                .iter()
                .map(|r| 100.0 * r.rx.rtp_lost() as f64 / r.rx.rtp_expected().max(1) as f64)
                .collect();
            let max_loss = losses.iter().copied().fold(0.0, f64::max);
            let freezes: Vec<u64> = group
                .iter()
                .map(|r| r.rx.video.values().map(|v| v.freezes).sum())
                .collect();
            // Over the videos still subscribed at the end: a tile the layout dropped stops
            // for good. (A tile dropped and shown again still counts its time away.)
            let longest = group
                .iter()
                .flat_map(|r| {
                    r.rx.video
                        .iter()
                        .filter(|(p, _)| r.subscribed_video.contains(p))
                        .map(|(_, v)| v)
                })
                .filter(|v| v.shown_frames > 0)
                .map(|v| v.longest_gap_us / 1000)
                .max()
                .unwrap_or(0);
            let mut layers = [0usize; 3];
            let mut tids = [0u64; 3];
            for v in group.iter().flat_map(|r| r.rx.video.values()) {
                if let Some(l) = v.last_layer {
                    layers[l.index()] += 1;
                }
                for (t, n) in tids.iter_mut().zip(v.frames_per_tid) {
                    *t += n;
                }
            }
            let frames = tids.iter().sum::<u64>().max(1) as f64;
            let share = |t: u64| (100.0 * t as f64 / frames).round();
            out.push_str(&format!(
                "{:<22} {:>5} {:>14.0} {:>7.2}/{:<7.2} {:>8} {:>12} {:>12}  {:>16}  {}/{}/{}\n",
                label,
                group.len(),
                rx,
                median(losses),
                max_loss,
                freezes.iter().sum::<u64>(),
                freezes.iter().max().unwrap_or(&0),
                longest,
                format!("{}/{}/{}", layers[0], layers[1], layers[2]),
                share(tids[0]),
                share(tids[1]),
                share(tids[2]),
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{Layer, PublisherId, RoomIndex};
    use crate::stats::{RxStats, VideoRx};

    fn receiver(downlink_bps: u64, bytes: u64, freezes: u64, gap_us: u64, layer: Layer) -> Report {
        let mut rx = RxStats {
            bytes,
            ..RxStats::default()
        };
        let mut v = VideoRx::default();
        v.complete_frames = 100;
        v.shown_frames = 100;
        v.freezes = freezes;
        v.longest_gap_us = gap_us;
        v.last_layer = Some(layer);
        v.frames_per_tid = if layer == Layer::Q {
            [100, 0, 0]
        } else {
            [25, 25, 50]
        };
        rx.video.insert(PublisherId(1), v);
        let mut r = Report::for_test(PublisherId(9), RoomIndex(0), rx, 10.0, downlink_bps);
        r.subscribed_video.insert(PublisherId(1));
        r
    }

    #[test]
    fn limited_and_free_downlinks_are_summed_apart() {
        let report = RunReport::for_test(vec![
            receiver(600_000, 187_500, 2, 1_200_000, Layer::Q),
            receiver(600_000, 200_000, 0, 100_000, Layer::Q),
            receiver(0, 3_000_000, 1, 600_000, Layer::F),
        ]);
        let t = report.links_table();
        let rows: Vec<&str> = t.lines().filter(|l| !l.is_empty()).collect();
        assert_eq!(rows.len(), 3, "{t}");
        let limited: Vec<&str> = rows[1].split_whitespace().collect();
        assert_eq!(limited[..4], ["limited", "(600", "kbit/s)", "2"], "{t}");
        // median of 150 and 160 kbit/s (upper), 2 freezes, 2 at most, longest 1200 ms, 2 on q
        assert_eq!(limited[4], "160", "{t}");
        // and every frame in temporal layer 0
        assert_eq!(limited[6..], ["2", "2", "1200", "2/0/0", "100/0/0"], "{t}");
        let free: Vec<&str> = rows[2].split_whitespace().collect();
        assert_eq!(free[..3], ["free", "1", "2400"], "{t}");
        assert_eq!(free[free.len() - 2..], ["0/0/1", "25/25/50"], "{t}");
        assert!(RunReport::for_test(vec![receiver(0, 1, 0, 0, Layer::F)])
            .links_table()
            .is_empty());
    }
}
