//! Shard counters. Counted in plain integers on the hot path and published to shared atomics
//! once per housekeeping tick, so the control plane never contends with packet processing.

use std::sync::atomic::{AtomicU64, Ordering};

/// Why a packet (or an event) was dropped. Every drop in the media plane has one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Not a datagram the engine can classify (not STUN/DTLS/RTP/RTCP), or rejected by it.
    Malformed,
    /// From an address no peer has been introduced from by a valid STUN check.
    UnknownSource,
    /// RTP on an SSRC or mid no published track owns.
    UnknownStream,
    /// RTP whose payload type the publisher did not negotiate.
    UnknownPayloadType,
    /// Padding-only RTP (bandwidth probes); weir generates its own.
    Padding,
    /// A new subscriber is waiting for a keyframe; delta frames before it are useless to it.
    AwaitingKeyframe,
    /// Older than a source switch for this subscriber.
    Stale,
    /// The subscriber negotiated no codec matching the publisher's.
    NoCommonCodec,
    /// The subscriber's send stream for the track is missing.
    NoSendStream,
    /// The kernel refused a datagram.
    SendFailed,
    /// An SDP offer/answer was unusable.
    BadSdp,
    /// The control plane's event queue was full.
    EventQueueFull,
    /// A data-channel message that was binary, too large, not UTF-8, or could not be sent.
    DataChannel,
    /// An offer from a focus we dialled while ours was outstanding (we are the impolite side).
    Glare,
    /// An answer to an offer that was rolled back or replaced, arriving after it.
    StaleAnswer,
    /// A data-channel message over its peer's budget (a flood).
    DataChannelFlood,
    /// An audio packet of a source not among the conference's loudest, while only the
    /// loudest are forwarded (`SfuConfig::audio_loudest_n`).
    NotLoudest,
    /// A datagram for another shard's peer (one port for all shards) that could not be handed
    /// over: that shard's queue was full.
    HandOverFull,
    /// An ICE-TCP connection closed before it reached a peer: its first frame was no check
    /// for one of our peers, it broke RFC 4571 framing, it sent nothing in time, or there
    /// were too many.
    TcpRefused,
    /// A packet toward an ICE-TCP participant whose connection had a full queue or was gone.
    TcpCongested,
    /// A copy for a subscriber whose connection is not up yet (ICE and DTLS): its engine
    /// would keep every copy until it connects, or until the connect timeout if it never
    /// does, and what it kept would arrive as a burst of stale media.
    NotConnected,
    /// A packet of a scalable (SVC) stream whose dependency descriptor could not be read: which
    /// layer it belongs to is unknown, so it goes only to trunks, which take every layer.
    BadDescriptor,
}

impl DropReason {
    pub const ALL: [DropReason; 22] = [
        DropReason::Malformed,
        DropReason::UnknownSource,
        DropReason::UnknownStream,
        DropReason::UnknownPayloadType,
        DropReason::Padding,
        DropReason::AwaitingKeyframe,
        DropReason::Stale,
        DropReason::NoCommonCodec,
        DropReason::NoSendStream,
        DropReason::SendFailed,
        DropReason::BadSdp,
        DropReason::EventQueueFull,
        DropReason::DataChannel,
        DropReason::Glare,
        DropReason::StaleAnswer,
        DropReason::DataChannelFlood,
        DropReason::NotLoudest,
        DropReason::TcpRefused,
        DropReason::TcpCongested,
        DropReason::HandOverFull,
        DropReason::NotConnected,
        DropReason::BadDescriptor,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::UnknownSource => "unknown_source",
            DropReason::UnknownStream => "unknown_stream",
            DropReason::UnknownPayloadType => "unknown_payload_type",
            DropReason::Padding => "padding",
            DropReason::AwaitingKeyframe => "awaiting_keyframe",
            DropReason::Stale => "stale",
            DropReason::NoCommonCodec => "no_common_codec",
            DropReason::NoSendStream => "no_send_stream",
            DropReason::SendFailed => "send_failed",
            DropReason::BadSdp => "bad_sdp",
            DropReason::EventQueueFull => "event_queue_full",
            DropReason::DataChannel => "data_channel",
            DropReason::Glare => "glare",
            DropReason::StaleAnswer => "stale_answer",
            DropReason::DataChannelFlood => "data_channel_flood",
            DropReason::NotLoudest => "not_loudest",
            DropReason::TcpRefused => "tcp_refused",
            DropReason::TcpCongested => "tcp_congested",
            DropReason::HandOverFull => "hand_over_full",
            DropReason::NotConnected => "not_connected",
            DropReason::BadDescriptor => "bad_descriptor",
        }
    }

    fn index(self) -> usize {
        DropReason::ALL.iter().position(|d| *d == self).unwrap_or(0)
    }
}

/// Upper bounds, in µs, of the forwarding-delay histogram's buckets (a last one is unbounded).
/// Fine below a millisecond, where a healthy focus is, coarse above, where it is in trouble.
pub const DELAY_BUCKETS_US: [u64; 10] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000,
];

/// How long a shard took from reading a batch of datagrams to handing the copies it forwarded
/// to the kernel: the focus's own forwarding delay, without the network or the clients.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DelayHistogram {
    /// Counts per bucket of [`DELAY_BUCKETS_US`], and a last one for anything longer.
    pub buckets: [u64; DELAY_BUCKETS_US.len() + 1],
    pub sum_us: u64,
    pub count: u64,
}

impl DelayHistogram {
    pub fn record(&mut self, us: u64) {
        let i = DELAY_BUCKETS_US
            .iter()
            .position(|b| us <= *b)
            .unwrap_or(DELAY_BUCKETS_US.len());
        self.buckets[i] += 1;
        self.sum_us += us;
        self.count += 1;
    }

    /// (upper bound in seconds, count at or below it), as Prometheus buckets are; the last
    /// bound is infinite.
    pub fn cumulative(&self) -> Vec<(f64, u64)> {
        let mut total = 0;
        self.buckets
            .iter()
            .enumerate()
            .map(|(i, n)| {
                total += n;
                let bound = DELAY_BUCKETS_US
                    .get(i)
                    .map_or(f64::INFINITY, |us| *us as f64 / 1e6);
                (bound, total)
            })
            .collect()
    }

    fn add(&mut self, other: &DelayHistogram) {
        for (a, b) in self.buckets.iter_mut().zip(other.buckets) {
            *a += b;
        }
        self.sum_us += other.sum_us;
        self.count += other.count;
    }
}

/// Shard-local counters (not shared; no atomics on the hot path).
#[derive(Debug, Default)]
pub(crate) struct ShardCounters {
    pub datagrams_in: u64,
    pub bytes_in: u64,
    pub datagrams_out: u64,
    pub bytes_out: u64,
    pub rtp_in: u64,
    pub rtp_forwarded: u64,
    /// RTP received from trunks / written onto trunks, and their payload bytes (what crosses
    /// between foci, without headers or SRTP overhead).
    pub trunk: TrunkCounts,
    pub keyframe_requests: u64,
    /// Messages handed to the kernel (a GSO run of datagrams counts once).
    pub send_calls: u64,
    /// Engine timers fired (per-peer housekeeping inside the engine: RTCP, ICE, DTLS, SCTP).
    pub engine_timeouts: u64,
    /// Datagrams the kernel dropped on the shard's socket for want of receive buffer (its
    /// 32-bit counter, as last reported with a received datagram).
    pub kernel_drops: u64,
    /// Panics caught while handling one peer; each closed that peer only.
    pub peer_panics: u64,
    /// Gauge: videos paused toward their subscribers for want of bandwidth.
    pub videos_paused: u64,
    /// Gauge: simulcast layers publishers were told to stop encoding (dynacast).
    pub layers_off: u64,
    /// Bandwidth estimators restarted because they locked (`forward::stall`).
    pub estimator_restarts: u64,
    /// Packets of temporal layers left out for a subscriber (`forward::temporal`).
    pub temporal_skipped: u64,
    /// Packets of scalable (SVC) streams left out for a subscriber: layers above the one it
    /// gets (`forward::svc`).
    pub svc_skipped: u64,
    /// Send queues of the layer a subscriber left, dropped at the switch because they had
    /// gone stale (`shard::send_queue`).
    pub stale_queues_dropped: u64,
    /// Gauge: ICE-TCP connections the shard holds.
    pub tcp_links: u64,
    /// Datagrams received for another shard's peer and handed to it (one port for all).
    pub handed_over: u64,
    /// RTP packets handed to the other shards of a conference spread over several
    /// (`shard::spread`), one per packet and other shard.
    pub spread_out: u64,
    /// Batch read → copies handed to the kernel, per loop turn that forwarded something.
    pub forward_delay: DelayHistogram,
    drops: [u64; DropReason::ALL.len()],
}

/// Media crossing trunks (see [`ShardCounters::trunk`]).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TrunkCounts {
    pub packets_in: u64,
    pub payload_bytes_in: u64,
    pub packets_out: u64,
    pub payload_bytes_out: u64,
    /// Gauge: RTP streams sent onto trunks now, one per (track, simulcast layer) carried.
    pub streams_out: u64,
}

impl ShardCounters {
    pub fn drop(&mut self, reason: DropReason) {
        self.drops[reason.index()] += 1;
    }

    pub fn publish(&self, to: &ShardStats, peers: u64, conferences: u64, tracks: u64) {
        let r = Ordering::Relaxed;
        to.datagrams_in.store(self.datagrams_in, r);
        to.bytes_in.store(self.bytes_in, r);
        to.datagrams_out.store(self.datagrams_out, r);
        to.bytes_out.store(self.bytes_out, r);
        to.rtp_in.store(self.rtp_in, r);
        to.rtp_forwarded.store(self.rtp_forwarded, r);
        to.trunk_packets_in.store(self.trunk.packets_in, r);
        to.trunk_bytes_in.store(self.trunk.payload_bytes_in, r);
        to.trunk_packets_out.store(self.trunk.packets_out, r);
        to.trunk_bytes_out.store(self.trunk.payload_bytes_out, r);
        to.trunk_streams_out.store(self.trunk.streams_out, r);
        to.keyframe_requests.store(self.keyframe_requests, r);
        to.send_messages.store(self.send_calls, r);
        to.engine_timeouts.store(self.engine_timeouts, r);
        to.kernel_drops.store(self.kernel_drops, r);
        to.peer_panics.store(self.peer_panics, r);
        to.videos_paused.store(self.videos_paused, r);
        to.layers_off.store(self.layers_off, r);
        to.estimator_restarts.store(self.estimator_restarts, r);
        to.temporal_skipped.store(self.temporal_skipped, r);
        to.svc_skipped.store(self.svc_skipped, r);
        to.stale_queues_dropped.store(self.stale_queues_dropped, r);
        to.tcp_links.store(self.tcp_links, r);
        to.handed_over.store(self.handed_over, r);
        to.spread_out.store(self.spread_out, r);
        for (i, n) in self.forward_delay.buckets.iter().enumerate() {
            to.forward_delay_buckets[i].store(*n, r);
        }
        to.forward_delay_sum_us.store(self.forward_delay.sum_us, r);
        to.forward_delay_count.store(self.forward_delay.count, r);
        for (i, d) in self.drops.iter().enumerate() {
            to.drops[i].store(*d, r);
        }
        to.peers.store(peers, r);
        to.conferences.store(conferences, r);
        to.tracks.store(tracks, r);
    }
}

/// One shard's counters as the control plane reads them (totals since start, and gauges).
#[derive(Debug, Default)]
pub struct ShardStats {
    pub datagrams_in: AtomicU64,
    pub bytes_in: AtomicU64,
    pub datagrams_out: AtomicU64,
    pub bytes_out: AtomicU64,
    pub rtp_in: AtomicU64,
    pub rtp_forwarded: AtomicU64,
    pub trunk_packets_in: AtomicU64,
    pub trunk_bytes_in: AtomicU64,
    pub trunk_packets_out: AtomicU64,
    pub trunk_bytes_out: AtomicU64,
    pub trunk_streams_out: AtomicU64,
    pub keyframe_requests: AtomicU64,
    pub send_messages: AtomicU64,
    pub engine_timeouts: AtomicU64,
    pub kernel_drops: AtomicU64,
    pub peer_panics: AtomicU64,
    pub videos_paused: AtomicU64,
    pub layers_off: AtomicU64,
    pub estimator_restarts: AtomicU64,
    pub temporal_skipped: AtomicU64,
    pub svc_skipped: AtomicU64,
    pub stale_queues_dropped: AtomicU64,
    pub tcp_links: AtomicU64,
    pub handed_over: AtomicU64,
    pub spread_out: AtomicU64,
    pub forward_delay_buckets: [AtomicU64; DELAY_BUCKETS_US.len() + 1],
    pub forward_delay_sum_us: AtomicU64,
    pub forward_delay_count: AtomicU64,
    pub drops: [AtomicU64; DropReason::ALL.len()],
    pub peers: AtomicU64,
    pub conferences: AtomicU64,
    pub tracks: AtomicU64,
}

impl ShardStats {
    /// Count a drop from outside a shard's loop (the ICE-TCP acceptor keeps its own
    /// `ShardStats`, summed with the shards').
    pub(crate) fn count_drop(&self, reason: DropReason) {
        self.drops[reason.index()].fetch_add(1, Ordering::Relaxed);
    }
}

/// A point-in-time sum over all shards.
#[derive(Debug, Default, Clone)]
pub struct StatsSnapshot {
    pub datagrams_in: u64,
    pub bytes_in: u64,
    pub datagrams_out: u64,
    pub bytes_out: u64,
    pub rtp_in: u64,
    pub rtp_forwarded: u64,
    pub trunk: TrunkCounts,
    pub keyframe_requests: u64,
    /// Send messages handed to the kernel (GSO runs count once): datagrams_out / send_messages
    /// is the average GSO batch.
    pub send_messages: u64,
    pub engine_timeouts: u64,
    /// Datagrams the kernel dropped before any shard read them (full receive buffers).
    pub kernel_drops: u64,
    /// Panics caught while handling one peer (each closed that peer, not the shard).
    pub peer_panics: u64,
    /// Videos paused toward their subscribers for want of bandwidth, now.
    pub videos_paused: u64,
    /// Simulcast layers publishers were told to stop encoding because nobody needs them, now.
    pub layers_off: u64,
    /// Bandwidth estimators restarted because they had locked.
    pub estimator_restarts: u64,
    /// Packets of temporal layers left out for subscribers on narrow links.
    pub temporal_skipped: u64,
    /// Packets of scalable streams' layers left out for subscribers that get fewer layers.
    pub svc_skipped: u64,
    /// Stale send queues of a layer left, dropped at a subscriber's switch.
    pub stale_queues_dropped: u64,
    /// ICE-TCP connections held, now.
    pub tcp_links: u64,
    /// Datagrams one shard received for another's peer and handed over (one port for all).
    pub handed_over: u64,
    /// RTP packets handed from the shard of their publisher to the other shards of a
    /// conference spread over several.
    pub spread_out: u64,
    /// The shards' forwarding delay (batch read → copies handed to the kernel).
    pub forward_delay: DelayHistogram,
    pub drops: Vec<(DropReason, u64)>,
    pub peers: u64,
    pub conferences: u64,
    pub tracks: u64,
}

impl StatsSnapshot {
    pub fn sum<'a>(shards: impl IntoIterator<Item = &'a ShardStats>) -> Self {
        let r = Ordering::Relaxed;
        let mut s = StatsSnapshot {
            drops: DropReason::ALL.iter().map(|d| (*d, 0)).collect(),
            ..Default::default()
        };
        for sh in shards {
            s.datagrams_in += sh.datagrams_in.load(r);
            s.bytes_in += sh.bytes_in.load(r);
            s.datagrams_out += sh.datagrams_out.load(r);
            s.bytes_out += sh.bytes_out.load(r);
            s.rtp_in += sh.rtp_in.load(r);
            s.rtp_forwarded += sh.rtp_forwarded.load(r);
            s.trunk.packets_in += sh.trunk_packets_in.load(r);
            s.trunk.payload_bytes_in += sh.trunk_bytes_in.load(r);
            s.trunk.packets_out += sh.trunk_packets_out.load(r);
            s.trunk.payload_bytes_out += sh.trunk_bytes_out.load(r);
            s.trunk.streams_out += sh.trunk_streams_out.load(r);
            s.keyframe_requests += sh.keyframe_requests.load(r);
            s.send_messages += sh.send_messages.load(r);
            s.engine_timeouts += sh.engine_timeouts.load(r);
            s.kernel_drops += sh.kernel_drops.load(r);
            s.peer_panics += sh.peer_panics.load(r);
            s.videos_paused += sh.videos_paused.load(r);
            s.layers_off += sh.layers_off.load(r);
            s.estimator_restarts += sh.estimator_restarts.load(r);
            s.temporal_skipped += sh.temporal_skipped.load(r);
            s.svc_skipped += sh.svc_skipped.load(r);
            s.stale_queues_dropped += sh.stale_queues_dropped.load(r);
            s.tcp_links += sh.tcp_links.load(r);
            s.handed_over += sh.handed_over.load(r);
            s.spread_out += sh.spread_out.load(r);
            let mut d = DelayHistogram {
                sum_us: sh.forward_delay_sum_us.load(r),
                count: sh.forward_delay_count.load(r),
                ..Default::default()
            };
            for (i, b) in sh.forward_delay_buckets.iter().enumerate() {
                d.buckets[i] = b.load(r);
            }
            s.forward_delay.add(&d);
            for (i, d) in sh.drops.iter().enumerate() {
                s.drops[i].1 += d.load(r);
            }
            s.peers += sh.peers.load(r);
            s.conferences += sh.conferences.load(r);
            s.tracks += sh.tracks.load(r);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_land_in_their_buckets_and_add_up() {
        let mut h = DelayHistogram::default();
        for us in [10, 50, 51, 700, 1_000_000] {
            h.record(us);
        }
        let c = h.cumulative();
        assert_eq!(c[0], (50e-6, 2), "10 and 50 µs are at or below 50 µs");
        assert_eq!(c[1], (100e-6, 3));
        assert_eq!(c[4], (1e-3, 4), "700 µs is below 1 ms");
        assert_eq!(c.last().unwrap().1, 5, "the last bucket holds everything");
        assert!(c.last().unwrap().0.is_infinite());
        assert_eq!((h.count, h.sum_us), (5, 1_000_811));
        let mut total = DelayHistogram::default();
        total.add(&h);
        total.add(&h);
        assert_eq!(total.count, 10);
        assert_eq!(total.buckets[0], 4);
    }
}
