//! Reading the focus's Prometheus `/metrics` text, and the CPU-per-packet arithmetic.

use serde::Serialize;

/// Sum of every sample of metric `name` (all label sets), or `None` if absent.
pub fn sample(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        // The name must end here: followed by labels or whitespace.
        let rest = if let Some(r) = rest.strip_prefix('{') {
            match r.find('}') {
                Some(i) => &r[i + 1..],
                None => continue,
            }
        } else if rest.starts_with([' ', '\t']) {
            rest
        } else {
            continue;
        };
        let Some(v) = rest.split_whitespace().next() else {
            continue;
        };
        if let Ok(v) = v.parse::<f64>() {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

/// The focus's counters at one moment.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct FocusSample {
    pub cpu_seconds: f64,
    pub rss_bytes: f64,
    pub forwarded: f64,
    /// RTP payload bytes this focus sent onto trunks to other foci (0 without cascading).
    pub trunk_bytes_out: f64,
    /// Stale send queues dropped at a subscriber's move down (0 from a focus without the
    /// counter).
    pub stale_queues_dropped: f64,
}

impl FocusSample {
    pub fn parse(text: &str) -> Option<FocusSample> {
        Some(FocusSample {
            cpu_seconds: sample(text, "process_cpu_seconds_total")?,
            rss_bytes: sample(text, "process_resident_memory_bytes").unwrap_or(0.0),
            forwarded: sample(text, "weir_rtp_packets_forwarded_total")?,
            trunk_bytes_out: sample(text, "weir_trunk_payload_bytes_out_total").unwrap_or(0.0),
            stale_queues_dropped: sample(text, "weir_stale_queues_dropped_total").unwrap_or(0.0),
        })
    }
}

/// µs of focus CPU per forwarded packet between two samples, if any packet was forwarded.
pub fn cpu_us_per_packet(start: &FocusSample, end: &FocusSample) -> Option<f64> {
    let packets = end.forwarded - start.forwarded;
    if packets <= 0.0 {
        return None;
    }
    Some((end.cpu_seconds - start.cpu_seconds).max(0.0) * 1e6 / packets)
}

/// Fetch and parse the focus's metrics.
pub async fn scrape(http: &reqwest::Client, url: &str) -> Result<FocusSample, String> {
    let text = http
        .get(url)
        .send()
        .await
        .map_err(|e| format!("GET {url}: {e}"))?
        .error_for_status()
        .map_err(|e| format!("GET {url}: {e}"))?
        .text()
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    FocusSample::parse(&text).ok_or_else(|| {
        format!("{url} lacks process_cpu_seconds_total or weir_rtp_packets_forwarded_total")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP process_cpu_seconds_total User and system CPU time\n\
# TYPE process_cpu_seconds_total counter\n\
process_cpu_seconds_total 12.5\n\
process_resident_memory_bytes 4.2e7\n\
weir_rtp_packets_forwarded_total 1000\n\
weir_rtp_packets_forwarded_total_extra 5\n\
weir_media_dropped_total{reason=\"stale\"} 3\n\
weir_media_dropped_total{reason=\"bad_sdp\"} 4\n\
weir_trunk_payload_bytes_out_total 2048\n\
weir_stale_queues_dropped_total 6\n";

    #[test]
    fn samples_are_found_by_exact_name_and_summed_over_labels() {
        assert_eq!(sample(TEXT, "process_cpu_seconds_total"), Some(12.5));
        assert_eq!(
            sample(TEXT, "weir_rtp_packets_forwarded_total"),
            Some(1000.0)
        );
        assert_eq!(sample(TEXT, "weir_media_dropped_total"), Some(7.0));
        assert_eq!(sample(TEXT, "absent"), None);
        let s = FocusSample::parse(TEXT).unwrap();
        assert_eq!(s.rss_bytes, 4.2e7);
        assert_eq!(s.trunk_bytes_out, 2048.0);
        assert_eq!(s.stale_queues_dropped, 6.0);
    }

    #[test]
    fn cpu_per_packet_is_the_ratio_of_deltas() {
        let a = FocusSample {
            cpu_seconds: 1.0,
            rss_bytes: 0.0,
            forwarded: 1000.0,
            trunk_bytes_out: 0.0,
            stale_queues_dropped: 0.0,
        };
        let b = FocusSample {
            cpu_seconds: 1.5,
            rss_bytes: 0.0,
            forwarded: 101_000.0,
            trunk_bytes_out: 0.0,
            stale_queues_dropped: 0.0,
        };
        assert_eq!(cpu_us_per_packet(&a, &b), Some(5.0));
        assert_eq!(cpu_us_per_packet(&a, &a), None);
    }
}
