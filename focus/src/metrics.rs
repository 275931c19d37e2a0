//! Prometheus metrics. The media plane's counters are read from its shards at scrape time (a
//! custom collector), so nothing on the packet path touches Prometheus.

use std::sync::Arc;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use weir_sfu::{DropReason, Sfu};

/// Conductor-level metrics.
pub struct Metrics {
    pub registry: Registry,
    pub conferences: IntGauge,
    pub participants: IntGauge,
    pub invite_to_answer: Histogram,
    pub legs_closed: IntCounterVec,
    pub refused_legs: IntCounterVec,
    pub metadata_relayed: IntCounter,
    pub data_messages: IntCounterVec,
    /// Trunks to other foci, by who dialled (`dialled` = us, `answered` = them).
    pub trunks: IntGaugeVec,
    /// Tracks crossing trunks, by direction: `out` = local tracks forwarded onto a trunk,
    /// `in` = tracks that arrived on one. One per (stream track, trunk), however many
    /// subscribers watch it on the far side.
    pub trunk_tracks: IntGaugeVec,
    /// Trunk dials, by outcome of the previous one (`first`, `redial`).
    pub trunk_dials: IntCounterVec,
    /// Times a conference's dominant speaker changed.
    pub speaker_changes: IntCounter,
    /// Audio sources speaking now, over all conferences.
    pub speaking: IntGauge,
    /// 1 while the focus drains (no new conferences), else 0.
    pub draining: IntGauge,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let conferences = IntGauge::new(
            "weir_conferences",
            "Conferences with at least one participant",
        )
        .unwrap();
        let participants = IntGauge::new(
            "weir_participants",
            "Participants (call legs) in conferences",
        )
        .unwrap();
        let invite_to_answer = Histogram::with_opts(
            HistogramOpts::new(
                "weir_invite_to_answer_seconds",
                "Time inside the focus from receiving an invite to queueing its answer",
            )
            .buckets(vec![
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0,
            ]),
        )
        .unwrap();
        let legs_closed = IntCounterVec::new(
            Opts::new("weir_legs_closed_total", "Call legs ended, by reason"),
            &["reason"],
        )
        .unwrap();
        let refused_legs = IntCounterVec::new(
            Opts::new(
                "weir_legs_refused_total",
                "Authorised invites the focus still could not serve, by reason",
            ),
            &["reason"],
        )
        .unwrap();
        let metadata_relayed = IntCounter::new(
            "weir_metadata_relayed_total",
            "sdp_stream_metadata_changed events relayed to subscribers",
        )
        .unwrap();
        let data_messages = IntCounterVec::new(
            Opts::new(
                "weir_data_messages_total",
                "MSC3898 data-channel messages from participants, by type",
            ),
            &["type"],
        )
        .unwrap();
        let trunks = IntGaugeVec::new(
            Opts::new("weir_trunks", "Trunks to other foci, by who dialled"),
            &["side"],
        )
        .unwrap();
        let trunk_tracks = IntGaugeVec::new(
            Opts::new(
                "weir_trunk_tracks",
                "Tracks crossing trunks: out = local tracks sent onto trunks, in = tracks received on them",
            ),
            &["direction"],
        )
        .unwrap();
        let trunk_dials = IntCounterVec::new(
            Opts::new(
                "weir_trunk_dials_total",
                "Trunk dials: first, or redial after a loss",
            ),
            &["kind"],
        )
        .unwrap();
        let speaker_changes = IntCounter::new(
            "weir_dominant_speaker_changes_total",
            "Times a conference's dominant speaker changed (announced as io.weir.speakers)",
        )
        .unwrap();
        let speaking = IntGauge::new(
            "weir_speaking_sources",
            "Audio sources speaking now, over all conferences",
        )
        .unwrap();
        let draining = IntGauge::new(
            "weir_draining",
            "1 while the focus drains: it takes no new conferences and stops when the last participant leaves or at the deadline",
        )
        .unwrap();
        for c in [
            Box::new(data_messages.clone()) as Box<dyn Collector>,
            Box::new(draining.clone()),
            Box::new(speaker_changes.clone()),
            Box::new(speaking.clone()),
            Box::new(trunks.clone()),
            Box::new(trunk_tracks.clone()),
            Box::new(trunk_dials.clone()),
            Box::new(conferences.clone()),
            Box::new(participants.clone()),
            Box::new(invite_to_answer.clone()),
            Box::new(legs_closed.clone()),
            Box::new(refused_legs.clone()),
            Box::new(metadata_relayed.clone()),
            Box::new(ProcessCollector::new()),
        ] {
            registry.register(c).unwrap();
        }
        Metrics {
            registry,
            conferences,
            participants,
            invite_to_answer,
            legs_closed,
            refused_legs,
            metadata_relayed,
            data_messages,
            trunks,
            trunk_tracks,
            trunk_dials,
            speaker_changes,
            speaking,
            draining,
        }
    }

    pub fn register_sfu(&self, sfu: Arc<Sfu>) {
        self.registry
            .register(Box::new(SfuCollector::new(sfu)))
            .unwrap();
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn counter(name: &str, help: &str, v: u64) -> MetricFamily {
    let c = IntCounter::new(name, help).unwrap();
    c.inc_by(v);
    c.collect().remove(0)
}

/// A Prometheus histogram from counts the media plane keeps itself.
fn histogram(name: &str, help: &str, h: &weir_sfu::DelayHistogram) -> MetricFamily {
    let mut hist = prometheus::proto::Histogram::default();
    hist.set_sample_count(h.count);
    hist.set_sample_sum(h.sum_us as f64 / 1e6);
    hist.set_bucket(
        h.cumulative()
            .into_iter()
            // The encoder writes the `+Inf` bucket itself, from the sample count.
            .filter(|(bound, _)| bound.is_finite())
            .map(|(bound, n)| {
                let mut b = prometheus::proto::Bucket::default();
                b.set_upper_bound(bound);
                b.set_cumulative_count(n);
                b
            })
            .collect(),
    );
    let mut m = prometheus::proto::Metric::default();
    m.set_histogram(hist);
    let mut f = MetricFamily::default();
    f.set_name(name.to_string());
    f.set_help(help.to_string());
    f.set_field_type(prometheus::proto::MetricType::HISTOGRAM);
    f.set_metric(vec![m]);
    f
}

fn gauge(name: &str, help: &str, v: u64) -> MetricFamily {
    let g = IntGauge::new(name, help).unwrap();
    g.set(v as i64);
    g.collect().remove(0)
}

struct SfuCollector {
    sfu: Arc<Sfu>,
    descs: Vec<Desc>,
}

impl SfuCollector {
    fn new(sfu: Arc<Sfu>) -> Self {
        let descs = Self::families(&weir_sfu::StatsSnapshot::default())
            .iter()
            .map(|f| {
                Desc::new(
                    f.name().to_string(),
                    f.help().to_string(),
                    vec![],
                    Default::default(),
                )
                .unwrap()
            })
            .collect();
        SfuCollector { sfu, descs }
    }

    fn families(s: &weir_sfu::StatsSnapshot) -> Vec<MetricFamily> {
        let drops = IntCounterVec::new(
            Opts::new(
                "weir_media_dropped_total",
                "Packets and events the media plane dropped, by reason",
            ),
            &["reason"],
        )
        .unwrap();
        for reason in DropReason::ALL {
            drops.with_label_values(&[reason.as_str()]);
        }
        for (reason, n) in &s.drops {
            drops.with_label_values(&[reason.as_str()]).inc_by(*n);
        }
        let mut f = vec![
            gauge(
                "weir_media_peers",
                "WebRTC connections in the media plane",
                s.peers,
            ),
            gauge(
                "weir_media_conferences",
                "Conferences in the media plane",
                s.conferences,
            ),
            gauge("weir_tracks", "Tracks published to the focus", s.tracks),
            counter(
                "weir_datagrams_in_total",
                "UDP datagrams received",
                s.datagrams_in,
            ),
            counter("weir_bytes_in_total", "UDP bytes received", s.bytes_in),
            counter(
                "weir_datagrams_out_total",
                "UDP datagrams sent",
                s.datagrams_out,
            ),
            counter("weir_bytes_out_total", "UDP bytes sent", s.bytes_out),
            counter(
                "weir_rtp_packets_in_total",
                "RTP packets received from publishers",
                s.rtp_in,
            ),
            counter(
                "weir_rtp_packets_forwarded_total",
                "RTP packets written to subscribers (one per subscriber copy)",
                s.rtp_forwarded,
            ),
            counter(
                "weir_trunk_rtp_packets_in_total",
                "RTP packets received on trunks from other foci",
                s.trunk.packets_in,
            ),
            counter(
                "weir_trunk_rtp_packets_out_total",
                "RTP packets sent onto trunks to other foci",
                s.trunk.packets_out,
            ),
            counter(
                "weir_trunk_payload_bytes_in_total",
                "RTP payload bytes received on trunks (no headers or SRTP overhead)",
                s.trunk.payload_bytes_in,
            ),
            counter(
                "weir_trunk_payload_bytes_out_total",
                "RTP payload bytes sent onto trunks (no headers or SRTP overhead)",
                s.trunk.payload_bytes_out,
            ),
            gauge(
                "weir_trunk_streams_out",
                "RTP streams sent onto trunks now: one per (track, simulcast layer) a far focus pulls",
                s.trunk.streams_out,
            ),
            counter(
                "weir_send_messages_total",
                "Send messages handed to the kernel; a GSO run of datagrams to one destination counts once",
                s.send_messages,
            ),
            counter(
                "weir_engine_timeouts_total",
                "Engine timers fired (per-peer RTCP, ICE, DTLS and SCTP housekeeping)",
                s.engine_timeouts,
            ),
            gauge(
                "weir_videos_paused",
                "Videos paused toward subscribers whose downlink cannot carry even their smallest layer now",
                s.videos_paused,
            ),
            gauge(
                "weir_layers_off",
                "Simulcast layers publishers were told to stop encoding because no subscriber needs them (dynacast)",
                s.layers_off,
            ),
            counter(
                "weir_estimator_restarts_total",
                "Bandwidth estimators restarted because their estimate stayed unchanged while holding a subscriber back with no loss",
                s.estimator_restarts,
            ),
            counter(
                "weir_temporal_skipped_packets_total",
                "Packets of temporal layers (VP8) left out for subscribers whose bandwidth allocation lowered their frame rate",
                s.temporal_skipped,
            ),
            counter(
                "weir_svc_skipped_packets_total",
                "Packets of scalable (VP9/AV1 SVC) streams left out for subscribers that get fewer spatial or temporal layers than the publisher sends",
                s.svc_skipped,
            ),
            counter(
                "weir_stale_queues_dropped_total",
                "Send queues dropped at a move down, just before the keyframe the subscriber moves on, their oldest packet having waited over 100 ms: the keyframe goes first",
                s.stale_queues_dropped,
            ),
            counter(
                "weir_datagrams_handed_over_total",
                "Datagrams one media shard received for another shard's participant and handed over (media.single_port)",
                s.handed_over,
            ),
            counter(
                "weir_spread_packets_total",
                "RTP packets handed from their publisher's media shard to the other shards of a conference spread over several (media.spread_conference_above)",
                s.spread_out,
            ),
            gauge(
                "weir_ice_tcp_connections",
                "ICE-TCP connections the media shards hold (participants whose UDP is blocked; media.tcp_port)",
                s.tcp_links,
            ),
            counter(
                "weir_peer_panics_total",
                "Panics caught while a media shard handled one peer; each closed that peer only",
                s.peer_panics,
            ),
            counter(
                "weir_udp_receive_drops_total",
                "Datagrams the kernel dropped because a shard's UDP receive buffer was full (media.socket_buffer_bytes)",
                s.kernel_drops,
            ),
            counter(
                "weir_keyframe_requests_total",
                "Keyframe requests (PLI) sent to publishers after coalescing",
                s.keyframe_requests,
            ),
        ];
        f.extend(drops.collect());
        f.push(histogram(
            "weir_forwarding_delay_seconds",
            "Per loop turn of a media shard that forwarded something: from reading the batch of datagrams to handing the copies to the kernel",
            &s.forward_delay,
        ));
        f
    }
}

impl Collector for SfuCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        Self::families(&self.sfu.stats())
    }
}

/// `process_cpu_seconds_total` and `process_resident_memory_bytes` from /proc/self.
struct ProcessCollector {
    descs: Vec<Desc>,
}

impl ProcessCollector {
    fn new() -> Self {
        let descs = vec![
            Desc::new(
                "process_cpu_seconds_total".into(),
                "User and system CPU time".into(),
                vec![],
                Default::default(),
            )
            .unwrap(),
            Desc::new(
                "process_resident_memory_bytes".into(),
                "Resident set size".into(),
                vec![],
                Default::default(),
            )
            .unwrap(),
        ];
        ProcessCollector { descs }
    }
}

/// (CPU seconds, RSS bytes) of this process, from /proc/self/stat.
pub fn process_usage() -> Option<(f64, u64)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15,
    // rss (pages) is field 24 (1-based over the whole line).
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = 100.0; // USER_HZ on Linux
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    let rss_pages: u64 = fields.get(21)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
    Some(((utime + stime) / ticks, rss_pages * page))
}

impl Collector for ProcessCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let Some((cpu, rss)) = process_usage() else {
            return vec![];
        };
        let c = prometheus::Counter::new("process_cpu_seconds_total", "User and system CPU time")
            .unwrap();
        c.inc_by(cpu);
        let mut f = c.collect();
        f.push(gauge(
            "process_resident_memory_bytes",
            "Resident set size",
            rss,
        ));
        f
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_usage_reads_this_process() {
        let (cpu, rss) = process_usage().expect("/proc/self/stat is readable on Linux");
        // Burn CPU until the kernel's 10 ms ticks show it (bounded: a reading that never
        // moves fails the test).
        let mut x: u64 = 1;
        let mut later = cpu;
        for _ in 0..2_000 {
            for i in 0..1_000_000u64 {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(i));
            }
            later = process_usage().expect("readable").0;
            if later > cpu {
                break;
            }
        }
        assert!(later > cpu, "CPU time never advanced from {cpu} s");
        assert!(
            rss > 1024 * 1024,
            "a test process has more than 1 MiB resident, got {rss}"
        );
    }

    #[test]
    fn text_output_has_process_and_conductor_metrics() {
        let m = Metrics::new();
        m.participants.set(3);
        let text = m.render();
        assert!(text.contains("weir_participants 3"), "{text}");
        assert!(text.contains("process_resident_memory_bytes"), "{text}");
    }

    #[test]
    fn the_forwarding_delay_is_a_prometheus_histogram() {
        let mut s = weir_sfu::StatsSnapshot::default();
        s.forward_delay.record(40);
        s.forward_delay.record(3_000);
        let families = SfuCollector::families(&s);
        let mut text = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&families, &mut text)
            .unwrap();
        let text = String::from_utf8(text).unwrap();
        for line in [
            "# TYPE weir_forwarding_delay_seconds histogram",
            "weir_forwarding_delay_seconds_bucket{le=\"0.00005\"} 1",
            "weir_forwarding_delay_seconds_bucket{le=\"0.0025\"} 1",
            "weir_forwarding_delay_seconds_bucket{le=\"0.005\"} 2",
            "weir_forwarding_delay_seconds_bucket{le=\"+Inf\"} 2",
            "weir_forwarding_delay_seconds_count 2",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
    }
}
