//! Summaries of what participants measured: the final tables, the JSON file and SVG charts.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::{json, Value};

use crate::floor::Floor;
use crate::ids::{Layer, RoomIndex};
use crate::participant::{Report, Timeline};
use crate::prom::FocusSample;
use crate::stats::new_histogram;

/// Percentiles in ms.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Percentiles {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
}

fn pct_of(h: &Histogram<u64>, scale: f64) -> Percentiles {
    if h.is_empty() {
        return Percentiles::default();
    }
    Percentiles {
        p50: h.value_at_quantile(0.50) as f64 / scale,
        p95: h.value_at_quantile(0.95) as f64 / scale,
        p99: h.value_at_quantile(0.99) as f64 / scale,
    }
}

fn pct_of_samples(v: &mut [f64]) -> Percentiles {
    if v.is_empty() {
        return Percentiles::default();
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    Percentiles {
        p50: at(0.50),
        p95: at(0.95),
        p99: at(0.99),
    }
}

/// A group of participants (one room, or all) summarised.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub participants: usize,
    pub joined: usize,
    pub failed: usize,
    pub join_ms: Percentiles,
    pub first_frame_ms: Percentiles,
    pub loss_pct: f64,
    pub latency_ms: Percentiles,
    /// A cascade: latency of media from publishers on the same focus, and through a trunk
    /// (one more focus hop); `None` when there was none of that kind.
    pub latency_near_ms: Option<Percentiles>,
    pub latency_far_ms: Option<Percentiles>,
    /// Payload received from publishers on another focus, Mbit/s summed over participants
    /// (each one's bytes over its own time connected): what the trunks fanned out.
    pub rx_far_mbps_total: f64,
    pub jitter_ms: f64,
    /// Received bitrate per layer, kbit/s, averaged over connected participants (each one's
    /// bytes over its own time connected).
    pub rx_kbps_per_participant: BTreeMap<&'static str, f64>,
    pub rx_mbps_total: f64,
    pub layer_switches: u64,
    pub freezes: u64,
    pub freeze_s: f64,
    pub integrity_errors: u64,
    pub duplicates: u64,
    pub missing_subscriptions: usize,
    pub packets_received: u64,
    pub packets_sent: u64,
    pub keyframe_requests: u64,
}

impl Summary {
    pub fn of(reports: &[&Report]) -> Summary {
        let mut lat = new_histogram();
        let mut near = new_histogram();
        let mut far = new_histogram();
        let mut far_bps = 0f64;
        let mut joins = Vec::new();
        let mut firsts = Vec::new();
        let (mut expected, mut lost) = (0u64, 0u64);
        let mut jitters = Vec::new();
        // Rates in bit/s, summed over participants: [q, h, f, audio].
        let mut rates = [0f64; 4];
        let mut connected = 0usize;
        let mut s = Summary {
            participants: reports.len(),
            joined: 0,
            failed: 0,
            join_ms: Percentiles::default(),
            first_frame_ms: Percentiles::default(),
            loss_pct: 0.0,
            latency_ms: Percentiles::default(),
            latency_near_ms: None,
            latency_far_ms: None,
            rx_far_mbps_total: 0.0,
            jitter_ms: 0.0,
            rx_kbps_per_participant: BTreeMap::new(),
            rx_mbps_total: 0.0,
            layer_switches: 0,
            freezes: 0,
            freeze_s: 0.0,
            integrity_errors: 0,
            duplicates: 0,
            missing_subscriptions: 0,
            packets_received: 0,
            packets_sent: 0,
            keyframe_requests: 0,
        };
        for r in reports {
            let _ = lat.add(&r.rx.latency);
            let _ = near.add(&r.rx.latency_near);
            let _ = far.add(&r.rx.latency_far);
            if let Some(j) = r.join_ms {
                s.joined += 1;
                joins.push(j);
            } else {
                s.failed += 1;
            }
            if let Some(f) = r.first_frame_ms {
                firsts.push(f);
            }
            expected += r.rx.rtp_expected();
            lost += r.rx.rtp_lost();
            let secs = (r.active_s > 0.0).then_some(r.active_s);
            if let Some(secs) = secs {
                connected += 1;
                far_bps += r.rx.far_bytes as f64 * 8.0 / secs;
            }
            for v in r.rx.video.values() {
                jitters.push(v.jitter.jitter_us);
                for l in Layer::ALL {
                    if let Some(secs) = secs {
                        rates[l.index()] += v.bytes_per_layer[l.index()] as f64 * 8.0 / secs;
                    }
                }
                s.layer_switches += v.layer_switches;
                s.freezes += v.freezes;
                s.freeze_s += v.freeze_us as f64 / 1e6;
            }
            for a in r.rx.audio.values() {
                jitters.push(a.jitter.jitter_us);
                if let Some(secs) = secs {
                    rates[3] += a.bytes as f64 * 8.0 / secs;
                }
            }
            s.integrity_errors += r.rx.integrity_errors;
            s.duplicates += r.rx.duplicates;
            s.missing_subscriptions += r.missing().len();
            s.packets_received += r.rx.packets;
            s.packets_sent += r.sent_packets;
            s.keyframe_requests += r.keyframe_requests;
        }
        s.join_ms = pct_of_samples(&mut joins);
        s.first_frame_ms = pct_of_samples(&mut firsts);
        s.latency_ms = pct_of(&lat, 1000.0);
        if !far.is_empty() {
            s.latency_far_ms = Some(pct_of(&far, 1000.0));
            s.latency_near_ms = (!near.is_empty()).then(|| pct_of(&near, 1000.0));
        }
        s.rx_far_mbps_total = far_bps / 1e6;
        s.loss_pct = if expected > 0 {
            lost as f64 * 100.0 / expected as f64
        } else {
            0.0
        };
        s.jitter_ms = if jitters.is_empty() {
            0.0
        } else {
            jitters.iter().sum::<f64>() / jitters.len() as f64 / 1000.0
        };
        let n = connected.max(1) as f64;
        for l in Layer::ALL {
            s.rx_kbps_per_participant
                .insert(l.rid(), rates[l.index()] / 1000.0 / n);
        }
        s.rx_kbps_per_participant
            .insert("audio", rates[3] / 1000.0 / n);
        s.rx_mbps_total = rates.iter().sum::<f64>() / 1e6;
        s
    }
}

/// The focus's side of the run.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct FocusCost {
    pub start: Option<FocusSample>,
    pub end: Option<FocusSample>,
    pub cpu_us_per_forwarded_packet: Option<f64>,
    pub forwarded_packets: Option<f64>,
    pub cpu_seconds: Option<f64>,
}

/// Everything the run found.
pub struct RunReport {
    pub reports: Vec<Report>,
    pub rooms: usize,
    pub duration_s: f64,
    pub elapsed_s: f64,
    pub setup_s: f64,
    pub interrupted: bool,
    pub floor: Option<Floor>,
    pub focus: FocusCost,
    pub loadtest_cpu_s: Option<f64>,
    pub timeline: Timeline,
    pub signal_sent: u64,
    pub signal_failures: u64,
    /// RTP payload bytes all scraped foci sent onto trunks during the measurement.
    pub trunk_bytes: Option<f64>,
}

impl RunReport {
    /// A run of these reports and nothing else, for tests of the summaries.
    #[cfg(test)]
    pub(crate) fn for_test(reports: Vec<Report>) -> RunReport {
        RunReport {
            reports,
            rooms: 1,
            duration_s: 10.0,
            elapsed_s: 10.0,
            setup_s: 0.0,
            interrupted: false,
            floor: None,
            focus: FocusCost::default(),
            loadtest_cpu_s: None,
            timeline: Timeline::default(),
            signal_sent: 0,
            signal_failures: 0,
            trunk_bytes: None,
        }
    }

    pub fn overall(&self) -> Summary {
        let all: Vec<&Report> = self.reports.iter().collect();
        Summary::of(&all)
    }

    pub fn per_room(&self) -> Vec<(RoomIndex, Summary)> {
        let mut rooms: BTreeMap<RoomIndex, Vec<&Report>> = BTreeMap::new();
        for r in &self.reports {
            rooms.entry(r.room).or_default().push(r);
        }
        rooms
            .into_iter()
            .map(|(i, rs)| (i, Summary::of(&rs)))
            .collect()
    }

    /// Payload Mbit/s the scraped foci sent onto trunks during the measurement.
    pub fn trunk_mbps(&self) -> Option<f64> {
        let bytes = self.trunk_bytes?;
        (self.duration_s > 0.0 && bytes > 0.0).then(|| bytes * 8.0 / self.duration_s / 1e6)
    }

    pub fn ratio_to_floor(&self) -> Option<f64> {
        let f = self.floor?.floor_us;
        Some(self.focus.cpu_us_per_forwarded_packet? / f)
    }

    /// The human-readable final table.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let row = |name: &str, s: &Summary| {
            format!(
                "{:<8} {:>5} {:>6} {:>7.0}/{:<6.0} {:>7.0}/{:<6.0} {:>6.2} {:>6.1}/{:<6.1}/{:<6.1} {:>6.1} {:>6.0}/{:<6.0}/{:<6.0}/{:<4.0} {:>7} {:>6} {:>6}\n",
                name,
                s.participants,
                s.joined,
                s.join_ms.p50,
                s.join_ms.p95,
                s.first_frame_ms.p50,
                s.first_frame_ms.p95,
                s.loss_pct,
                s.latency_ms.p50,
                s.latency_ms.p95,
                s.latency_ms.p99,
                s.jitter_ms,
                s.rx_kbps_per_participant["q"],
                s.rx_kbps_per_participant["h"],
                s.rx_kbps_per_participant["f"],
                s.rx_kbps_per_participant["audio"],
                s.layer_switches,
                s.freezes,
                s.integrity_errors,
            )
        };
        let _ = writeln!(
            out,
            "{:<8} {:>5} {:>6} {:>14} {:>14} {:>6} {:>20} {:>6} {:>23} {:>7} {:>6} {:>6}",
            "room",
            "parts",
            "joined",
            "join ms p50/95",
            "1st frame ms",
            "loss%",
            "latency ms p50/95/99",
            "jit ms",
            "rx kbit/s q/h/f/audio",
            "switch",
            "freeze",
            "integ"
        );
        for (i, s) in self.per_room() {
            out.push_str(&row(&format!("room{}", i.0), &s));
        }
        let o = self.overall();
        out.push_str(&row("ALL", &o));
        out.push_str(&self.links_table());
        let _ = writeln!(
            out,
            "\nreceived {:.1} Mbit/s in total; {} duplicates; {} missing subscriptions; {} keyframe requests reached publishers",
            o.rx_mbps_total, o.duplicates, o.missing_subscriptions, o.keyframe_requests
        );
        if let Some(far) = o.latency_far_ms {
            let near = match o.latency_near_ms {
                Some(n) => format!(
                    ", on the same focus {:.1}/{:.1} ms (+{:.1} ms p50 for the second focus hop)",
                    n.p50,
                    n.p95,
                    far.p50 - n.p50
                ),
                None => String::new(),
            };
            let _ = writeln!(
                out,
                "cascade: latency through a trunk p50/p95 {:.1}/{:.1} ms{near}; {:.1} Mbit/s of payload from far publishers received{}",
                far.p50,
                far.p95,
                o.rx_far_mbps_total,
                self.trunk_mbps()
                    .map(|t| format!(", carried by {t:.1} Mbit/s on the trunks (x{:.1} fan-out after the trunk)", o.rx_far_mbps_total / t.max(1e-9)))
                    .unwrap_or_default()
            );
        }
        if let Some(f) = &self.floor {
            let _ = writeln!(
                out,
                "floor: GSO {:.2} µs + AES-128-GCM {:.2} µs = {:.2} µs/packet (plain sendto {:.2} µs){}",
                f.gso_us,
                f.gcm_us,
                f.floor_us,
                f.sendto_us,
                if f.gso_supported { "" } else { " [no UDP GSO]" }
            );
        }
        match (
            self.focus.cpu_us_per_forwarded_packet,
            self.focus.forwarded_packets,
        ) {
            (Some(c), Some(n)) => {
                let _ = writeln!(
                    out,
                    "focus: {c:.2} µs CPU per forwarded packet over {n:.0} packets{}; RSS {:.1} MiB",
                    self.ratio_to_floor()
                        .map(|r| format!(" = {r:.1}x the floor"))
                        .unwrap_or_default(),
                    self.focus.end.map(|e| e.rss_bytes / 1048576.0).unwrap_or(0.0)
                );
            }
            _ => {
                let _ = writeln!(out, "focus: no metrics (use --focus-metrics URL)");
            }
        }
        if self.interrupted {
            let _ = writeln!(out, "INTERRUPTED: partial report");
        }
        for r in &self.reports {
            let missing = r.missing();
            if !missing.is_empty() || r.error.is_some() {
                let _ = writeln!(
                    out,
                    "  {} ({}): {}{}",
                    r.user_id,
                    r.publisher,
                    r.error.clone().unwrap_or_default(),
                    if missing.is_empty() {
                        String::new()
                    } else {
                        format!(
                            " missing {}",
                            missing
                                .iter()
                                .map(|(p, k)| format!("{p}/{k}"))
                                .collect::<Vec<_>>()
                                .join(",")
                        )
                    }
                );
            }
        }
        out
    }

    /// The `--json` document.
    pub fn json(&self) -> Value {
        let o = self.overall();
        let participants: Vec<Value> = self
            .reports
            .iter()
            .map(|r| {
                json!({
                    "user_id": r.user_id,
                    "publisher": r.publisher.0,
                    "room": r.room.0,
                    "attempts": r.attempts,
                    "last_call_unix_ms": r.last_call_unix_ms,
                    "join_ms": r.join_ms,
                    "first_frame_ms": r.first_frame_ms,
                    "active_s": r.active_s,
                    "rx_bytes": r.rx.bytes,
                    "rx_video": r.rx.video.iter().map(|(p, v)| json!({
                        "publisher": p.0,
                        "bytes_q_h_f": v.bytes_per_layer,
                        "last_layer": v.last_layer.map(|l| l.rid()),
                        "complete_frames": v.complete_frames,
                        "shown_frames": v.shown_frames,
                        "keyframes": v.keyframes,
                        "lost": v.lost,
                        "frames_per_tid": v.frames_per_tid,
                        "pictures_missing": v.pictures_missing,
                        "tl0_missing": v.tl0_missing,
                        "first_frame_us": v.first_frame_us,
                        "last_frame_us": v.last_frame_us,
                        "freezes": v.freezes,
                        "freeze_ms": v.freeze_us / 1000,
                        "longest_gap_ms": v.longest_gap_us / 1000,
                        "longest_gap_from_us": v.longest_gap_from_us,
                        "paused_ms": v.paused_us / 1000,
                    })).collect::<Vec<_>>(),
                    "subscribed_video": r.subscribed_video.iter().map(|p| p.0).collect::<Vec<_>>(),
                    "subscribed_audio": r.subscribed_audio.iter().map(|p| p.0).collect::<Vec<_>>(),
                    "received_video": r.rx.video.iter().filter(|(_, v)| v.shown_frames > 0).map(|(p, _)| p.0).collect::<Vec<_>>(),
                    "received_audio": r.rx.audio.iter().filter(|(_, a)| a.packets > 0).map(|(p, _)| p.0).collect::<Vec<_>>(),
                    "missing": r.missing().iter().map(|(p, k)| json!({"publisher": p.0, "kind": k})).collect::<Vec<_>>(),
                    "keyframes_asked": r.rx.keyframes_asked,
                    "integrity_errors": r.rx.integrity_errors,
                    "first_integrity_error": r.rx.first_integrity_error.map(|e| e.to_string()),
                    "rtp_lost": r.rx.rtp_lost(),
                    "rtp_expected": r.rx.rtp_expected(),
                    "layer_switches": r.rx.video.values().map(|v| v.layer_switches).sum::<u64>(),
                    "freezes": r.rx.video.values().map(|v| v.freezes).sum::<u64>(),
                    "freeze_s": r.rx.video.values().map(|v| v.freeze_us).sum::<u64>() as f64 / 1e6,
                    "longest_gap_ms": r.rx.video.values().map(|v| v.longest_gap_us).max().unwrap_or(0) / 1000,
                    "downlink_kbps": (r.downlink_bps > 0).then_some(r.downlink_bps / 1000),
                    "sent_packets": r.sent_packets,
                    "keyframe_requests": r.keyframe_requests,
                    "focus_offers": r.focus_offers,
                    "subscriptions_sent": r.subscriptions_sent,
                    "ended_by_focus": r.ended_by_focus,
                    "error": r.error,
                })
            })
            .collect();
        let rooms: Vec<Value> = self
            .per_room()
            .into_iter()
            .map(|(i, s)| json!({"room": i.0, "summary": s}))
            .collect();
        json!({
            "participants": o.participants,
            "duration_s": self.duration_s,
            "elapsed_s": self.elapsed_s,
            "setup_s": self.setup_s,
            "interrupted": self.interrupted,
            "joined": o.joined,
            "loss_pct": o.loss_pct,
            "latency_ms": o.latency_ms,
            "latency_near_ms": o.latency_near_ms,
            "latency_far_ms": o.latency_far_ms,
            "rx_far_mbps_total": o.rx_far_mbps_total,
            "trunk_mbps": self.trunk_mbps(),
            "jitter_ms": o.jitter_ms,
            "join_ms": o.join_ms,
            "first_frame_ms": o.first_frame_ms,
            "integrity_errors": o.integrity_errors,
            "duplicates": o.duplicates,
            "freezes": o.freezes,
            "freeze_s": o.freeze_s,
            "layer_switches": o.layer_switches,
            "missing_subscriptions": o.missing_subscriptions,
            "rx_kbps_per_participant": o.rx_kbps_per_participant,
            "rx_mbps_total": o.rx_mbps_total,
            "focus_cpu_us_per_forwarded_packet": self.focus.cpu_us_per_forwarded_packet,
            "focus_forwarded_packets": self.focus.forwarded_packets,
            "focus_cpu_seconds": self.focus.cpu_seconds,
            "floor_us_per_packet": self.floor.map(|f| f.floor_us),
            "floor": self.floor,
            "ratio_to_floor": self.ratio_to_floor(),
            "focus_rss_bytes": self.focus.end.map(|e| e.rss_bytes),
            // Over the whole run, joins included (moves down come most at joins).
            "focus_stale_queues_dropped": self.focus.end.map(|e| e.stale_queues_dropped),
            "loadtest_cpu_s": self.loadtest_cpu_s,
            "signalling": {"sent": self.signal_sent, "failed": self.signal_failures},
            "summary": o,
            "rooms": rooms,
            "participants_detail": participants,
        })
    }

    /// Per-second series: (second, Mbit/s, latency p50 ms, latency p95 ms, loss %).
    pub fn series(&self) -> Vec<(f64, f64, f64, f64, f64)> {
        self.timeline
            .seconds
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let (p50, p95) = if b.latency.is_empty() {
                    (0.0, 0.0)
                } else {
                    (
                        b.latency.value_at_quantile(0.5) as f64 / 1000.0,
                        b.latency.value_at_quantile(0.95) as f64 / 1000.0,
                    )
                };
                let loss = if b.expected > 0 {
                    (b.expected.saturating_sub(b.packets)) as f64 * 100.0 / b.expected as f64
                } else {
                    0.0
                };
                (i as f64, b.bytes as f64 * 8.0 / 1e6, p50, p95, loss)
            })
            .collect()
    }

    /// Write bitrate.svg, latency.svg and loss.svg into `dir`. Seconds in which nothing
    /// arrived (setup) have no latency or loss point.
    pub fn plots(&self, dir: &Path) -> std::io::Result<Vec<std::path::PathBuf>> {
        std::fs::create_dir_all(dir)?;
        let s = self.series();
        let live = |p: &&(f64, f64, f64, f64, f64)| p.1 > 0.0;
        let pts = |f: fn(&(f64, f64, f64, f64, f64)) -> f64, only_live: bool| -> Vec<(f64, f64)> {
            s.iter()
                .filter(|p| !only_live || live(p))
                .map(|p| (p.0, f(p)))
                .collect()
        };
        let charts = [
            (
                "bitrate.svg",
                "Received bitrate (all participants)",
                "Mbit/s",
                vec![("received", pts(|p| p.1, false))],
            ),
            (
                "latency.svg",
                "One-way latency",
                "ms",
                vec![("p50", pts(|p| p.2, true)), ("p95", pts(|p| p.3, true))],
            ),
            (
                "loss.svg",
                "Packet loss (RTP sequence gaps)",
                "%",
                vec![("loss", pts(|p| p.4, true))],
            ),
        ];
        let mut written = Vec::new();
        for (file, title, unit, series) in charts {
            let path = dir.join(file);
            std::fs::write(&path, svg_chart(title, unit, &series))?;
            written.push(path);
        }
        Ok(written)
    }
}

const COLOURS: [&str; 4] = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e"];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A line chart as a standalone SVG document: x in seconds, one polyline per series of points.
pub fn svg_chart(title: &str, unit: &str, series: &[(&str, Vec<(f64, f64)>)]) -> String {
    let (w, h) = (800.0, 400.0);
    let (l, r, t, b) = (70.0, 20.0, 40.0, 50.0);
    let xmax = series
        .iter()
        .flat_map(|(_, v)| v.iter().map(|p| p.0))
        .fold(1.0_f64, f64::max);
    let ymax = series
        .iter()
        .flat_map(|(_, v)| v.iter().map(|p| p.1))
        .fold(0.0_f64, f64::max);
    let ymax = nice_ceiling(ymax);
    let px = |v: f64| l + v / xmax * (w - l - r);
    let py = |v: f64| h - b - v / ymax * (h - t - b);
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="16">{}</text>"#,
        w / 2.0,
        esc(title)
    );
    for i in 0..=5 {
        let v = ymax * i as f64 / 5.0;
        let y = py(v);
        let _ = writeln!(
            svg,
            r##"<line x1="{l}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            w - r,
            l - 6.0,
            y + 4.0,
            fmt_tick(v)
        );
    }
    for i in 0..=10 {
        let v = xmax * i as f64 / 10.0;
        let xx = px(v);
        let _ = writeln!(
            svg,
            r##"<line x1="{xx:.1}" y1="{:.1}" x2="{xx:.1}" y2="{:.1}" stroke="#999"/><text x="{xx:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            h - b,
            h - b + 5.0,
            h - b + 18.0,
            fmt_tick(v)
        );
    }
    let _ = writeln!(
        svg,
        r##"<line x1="{l}" y1="{t}" x2="{l}" y2="{:.1}" stroke="black"/><line x1="{l}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="black"/>"##,
        h - b,
        h - b,
        w - r,
        h - b
    );
    let _ = writeln!(
        svg,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">time since start (s)</text>"#,
        (l + w - r) / 2.0,
        h - 12.0
    );
    let _ = writeln!(
        svg,
        r#"<text x="16" y="{:.1}" text-anchor="middle" transform="rotate(-90 16 {:.1})">{}</text>"#,
        (t + h - b) / 2.0,
        (t + h - b) / 2.0,
        esc(unit)
    );
    for (i, (name, ys)) in series.iter().enumerate() {
        let c = COLOURS[i % COLOURS.len()];
        let pts: Vec<String> = ys
            .iter()
            .map(|(xv, yv)| format!("{:.1},{:.1}", px(*xv), py(*yv)))
            .collect();
        let _ = writeln!(
            svg,
            r#"<polyline fill="none" stroke="{c}" stroke-width="1.5" points="{}"/>"#,
            pts.join(" ")
        );
        let _ = writeln!(
            svg,
            r#"<rect x="{:.1}" y="{:.1}" width="12" height="3" fill="{c}"/><text x="{:.1}" y="{:.1}">{}</text>"#,
            w - r - 120.0,
            t + 10.0 + 16.0 * i as f64,
            w - r - 104.0,
            t + 15.0 + 16.0 * i as f64,
            esc(name)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn nice_ceiling(v: f64) -> f64 {
    if v <= 0.0 {
        return 1.0;
    }
    let mag = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 5.0, 10.0] {
        if v <= m * mag {
            return m * mag;
        }
    }
    10.0 * mag
}

fn fmt_tick(v: f64) -> String {
    if v >= 100.0 || v == v.round() {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_well_formed_svg_with_one_line_per_series() {
        let svg = svg_chart(
            "t <1>",
            "ms",
            &[
                ("a", vec![(0.0, 1.0), (1.0, 2.0), (2.0, 3.0)]),
                ("b", vec![(1.0, 0.5), (2.0, 0.2)]),
            ],
        );
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("t &lt;1&gt;"));
    }

    #[test]
    fn nice_ceilings() {
        assert_eq!(nice_ceiling(0.0), 1.0);
        assert_eq!(nice_ceiling(3.2), 5.0);
        assert_eq!(nice_ceiling(42.0), 50.0);
        assert_eq!(nice_ceiling(100.0), 100.0);
    }

    #[test]
    fn sample_percentiles() {
        let mut v: Vec<f64> = (1..=100).map(f64::from).collect();
        let p = pct_of_samples(&mut v);
        assert_eq!((p.p50, p.p95, p.p99), (51.0, 95.0, 99.0));
        assert_eq!(pct_of_samples(&mut []), Percentiles::default());
    }
}
