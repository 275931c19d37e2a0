//! Fan-out: one received RTP packet written to every subscriber of its track.

use std::sync::Arc;
use std::time::{Duration, Instant};

use str0m::format::PayloadParams;
use str0m::media::{Pt, Rid};
use str0m::rtp::{ExtensionValues, RtpPacket, RtpWrite, SeqNo, Ssrc};

use crate::api::PeerRole;
use crate::engine::{self, RawDependencyDescriptor};
use crate::forward::dependency_descriptor::Indication;
use crate::forward::svc::{spatial_rank, spatial_within, SvcStream};
use crate::forward::{
    rid_rank, starts_keyframe, Decision, Now, Rewritten, TemporalPacket, VideoCodec, Vp8Descriptor,
};
use crate::ids::{PeerId, TrackKind};
use crate::stats::DropReason;
use tracing::{debug, info};

use super::data_channel::PauseNotice;
use super::{Dynacast, EventSink, ShardCore, TrackKey};

/// How long after a simulcast track's first packet its layers count as known. Browsers start
/// all layers within a frame or two; before this, the first layer to arrive is not taken as
/// the best there is. Longer delays a subscriber's start on a keyframe already in flight for
/// a track that just began; shorter risks starting on a low layer and switching up.
const SIMULCAST_SETTLE: Duration = Duration::from_millis(200);
/// How long a new subscriber waits for a keyframe before asking again.
const KEYFRAME_WAIT_RETRY: Duration = Duration::from_millis(1000);
/// Loss toward a subscriber above which a move down a spatial layer of a scalable stream
/// asks for a keyframe even where the descriptor allows switching without one. Lower asks
/// more often (a keyframe costs every subscriber of the stream a burst); higher leaves a
/// subscriber whose lost frames broke its decoder frozen until Chromium asks, 3 s on.
const LOSSY_MOVE_DOWN: f32 = 0.05;
/// Streams with a dependency descriptor kept per track. A track has one per simulcast layer
/// (up to three) and a new one when its publisher restarts a layer; the oldest goes first.
const MAX_SVC_STREAMS: usize = 4;

/// One received RTP packet as fan-out reads it: from a local publisher's engine, or handed
/// over by the shard its publisher lives on ([`super::spread`]).
#[derive(Clone)]
pub struct Incoming {
    ssrc: Ssrc,
    pub(super) seq_no: SeqNo,
    timestamp: u32,
    marker: bool,
    pt: Pt,
    /// Header extensions a subscriber can use; mid/rid, transport-cc and abs-send-time are
    /// per hop and the engine writes its own.
    ext: ExtensionValues,
    /// The dependency descriptor, if the packet has one (forwarded with VP9 and AV1).
    dd: Option<Arc<RawDependencyDescriptor>>,
    payload: Arc<[u8]>,
    /// When the engine received it.
    pub(super) received: Instant,
}

impl Incoming {
    fn new(pkt: RtpPacket) -> Self {
        let h = &pkt.header;
        Incoming {
            ssrc: h.ssrc,
            seq_no: pkt.seq_no,
            timestamp: h.timestamp,
            marker: h.marker,
            pt: h.payload_type,
            ext: ExtensionValues {
                audio_level: h.ext_vals.audio_level,
                voice_activity: h.ext_vals.voice_activity,
                video_orientation: h.ext_vals.video_orientation,
                video_content_type: h.ext_vals.video_content_type,
                ..Default::default()
            },
            dd: h.ext_vals.user_values.get_arc::<RawDependencyDescriptor>(),
            received: pkt.timestamp,
            payload: pkt.payload,
        }
    }
}

impl<S: EventSink> ShardCore<S> {
    /// Forward one RTP packet from publisher `id` to every subscriber of its track, here and
    /// on the other shards of its conference if it is spread.
    pub(super) fn forward(&mut self, id: PeerId, pkt: RtpPacket, now: Instant) {
        self.counters.rtp_in += 1;
        let ssrc = pkt.header.ssrc;
        let Some(peer) = self.peers.get_mut(&id) else {
            return;
        };
        let (mid, rid) = match peer.ssrc_mid.get(&ssrc) {
            Some(m) => *m,
            None => {
                let found = peer
                    .rtc
                    .direct_api()
                    .stream_rx(&ssrc)
                    .map(|s| (s.mid(), s.rid()));
                let Some(found) = found else {
                    self.counters.drop(DropReason::UnknownStream);
                    return;
                };
                peer.ssrc_mid.insert(ssrc, found);
                found
            }
        };
        let Some(track) = peer.published.get(&mid).cloned() else {
            self.counters.drop(DropReason::UnknownStream);
            return;
        };
        let conference = peer.conference;
        if pkt.payload.is_empty() {
            self.counters.drop(DropReason::Padding);
            return;
        }
        if peer.role == PeerRole::Trunk {
            self.counters.trunk.packets_in += 1;
            self.counters.trunk.payload_bytes_in += pkt.payload.len() as u64;
        }
        let pt = pkt.header.payload_type;
        let spec = peer
            .rtc
            .codec_config()
            .params()
            .iter()
            .find(|p| p.pt() == pt)
            .copied();
        let Some(params) = spec else {
            self.counters.drop(DropReason::UnknownPayloadType);
            return;
        };
        let packet = Incoming::new(pkt);
        if self.spans.contains_key(&conference) {
            let shared = self.relay(conference, track, rid, params, packet);
            self.fan_out(track, rid, params, &shared.packet, now);
        } else {
            self.fan_out(track, rid, params, &packet, now);
        }
    }

    /// Write one packet of `track` (layer `rid`) to every subscriber of it on this shard: the
    /// layer each gets, its own sequence and timestamp space, its own payload type.
    pub(super) fn fan_out(
        &mut self,
        track: TrackKey,
        rid: Option<Rid>,
        params: PayloadParams,
        pkt: &Incoming,
        now: Instant,
    ) {
        let ssrc = pkt.ssrc;
        let pt = pkt.pt;
        let Some(published) = self.tracks.get_mut(&track) else {
            return;
        };
        let conference = published.conference;
        // By this packet's own codec: a publisher may switch codecs on one m-line.
        let is_video = published.kind == TrackKind::Video;
        let codec = engine::video_codec(params.spec().codec);
        let vp8 = (is_video && codec == VideoCodec::Vp8)
            .then(|| Vp8Descriptor::parse(&pkt.payload).ok())
            .flatten();
        // The dependency descriptor, where the publisher sends one: the frame's spatial and
        // temporal layer. Chromium sends it with every codec once negotiated, and then leaves
        // the temporal layer out of VP8's own descriptor.
        let mut svc_index = None;
        let mut svc_frame = None;
        if let (true, Some(raw)) = (is_video, &pkt.dd) {
            let i = match published.svc.iter().position(|(s, _)| *s == ssrc) {
                Some(i) => i,
                None => {
                    if published.svc.len() == MAX_SVC_STREAMS {
                        published.svc.remove(0);
                    }
                    published.svc.push((ssrc, SvcStream::default()));
                    published.svc.len() - 1
                }
            };
            svc_index = Some(i);
            let layers_before = published.svc[i].1.spatial_layers();
            match published.svc[i].1.read(&raw.0) {
                Ok(f) => {
                    let layers = published.svc[i].1.spatial_layers();
                    // Once per stream and change of layers: whether a stream is read as
                    // scalable is what tells a subscriber's layers apart.
                    if layers != layers_before {
                        info!(shard = self.index, %track.publisher, mid = %track.mid, ssrc = *ssrc, spatial_layers = layers,
                            decode_targets = published.svc[i].1.structure().map(|s| s.decode_targets()),
                            "dependency descriptor structure");
                    }
                    if layers > published.spatial_seen {
                        published.spatial_seen = layers;
                        // A participant's scalable video is dynacast from here on (its home
                        // shard decides; a simulcast track's layers are its rids).
                        let ours = published.home.is_none() && !published.from_trunk;
                        if layers > 1
                            && ours
                            && !matches!(published.dynacast, Some(Dynacast::Rids(_)))
                        {
                            published.dynacast = Some(Dynacast::spatial(layers, now));
                        }
                    }
                    svc_frame = Some(f);
                }
                Err(e) => {
                    debug!(%track.publisher, mid = %track.mid, ssrc = *ssrc, error = %e, "unreadable dependency descriptor")
                }
            }
        } else if is_video {
            // A stream known to be scalable that sent a packet without its descriptor (or one
            // the engine could not take): which layer it belongs to is unknown.
            svc_index = published.svc.iter().position(|(s, _)| *s == ssrc);
        }
        // Spatial layers in this one stream (SVC); 0 or 1 for anything else. They rank among
        // the most the track has had (`spatial_rank`).
        let spatial_layers = svc_index.map_or(0, |i| published.svc[i].1.spatial_layers());
        let full_layers = published.spatial_seen.max(spatial_layers);
        let keyframe = match vp8 {
            Some(d) => d.keyframe,
            None => {
                is_video
                    && (starts_keyframe(codec, &pkt.payload)
                        || svc_frame.is_some_and(|f| {
                            f.start_of_frame && f.dependencies == 0 && f.spatial == 0
                        }))
            }
        };
        let rank = rid_rank(rid.as_deref());
        let tid = vp8.and_then(|d| d.tid).or(svc_frame.map(|f| f.temporal));
        // Temporal layers and switch points: from VP8's descriptor if it says, else, for a
        // stream with one spatial layer, from the dependency descriptor.
        let described = match (svc_frame, svc_index) {
            (Some(f), Some(i)) if spatial_layers == 1 => {
                let own = published.svc[i].1.best_target(0, f.temporal);
                let switch = own.is_some_and(|dt| f.indications.get(dt) == Indication::Switch);
                Some((Some(f.temporal), switch))
            }
            _ => None,
        };
        let temporal = match vp8 {
            Some(d) if d.tid.is_some() => Some((d.tid, d.layer_sync)),
            _ => described.or(vp8.map(|d| (d.tid, d.layer_sync))),
        };
        // What each spatial layer's subscribers receive, for allocation to choose from.
        if let (Some(f), Some(i), true) = (svc_frame, svc_index, spatial_layers > 1) {
            for spatial in 0..spatial_layers {
                if published.svc[i].1.includes(&f, spatial) {
                    let rank = spatial_rank(spatial, full_layers);
                    published
                        .spatial
                        .saw(spatial, rank, Some(f.temporal), pkt.payload.len(), now);
                }
            }
        }
        published
            .activity
            .saw(rid, rank, tid, pkt.payload.len(), now);
        let first_packet = *published.first_packet.get_or_insert(now);
        // Until a simulcast track has flowed a moment, its better layers may not have been
        // seen yet: a subscriber waits for its layer's keyframe rather than starting on the
        // first layer that happens to arrive.
        let layers_settled =
            rid.is_none() || now.saturating_duration_since(first_packet) >= SIMULCAST_SETTLE;
        if keyframe {
            debug!(publisher = %track.publisher, mid = %track.mid, layer = ?rid, "keyframe in");
            published.keyframes.keyframe_received(rid);
        }
        let mut resumed = false;
        if !is_video {
            let detector = self.speakers.entry(conference).or_default();
            if let Some(level) = pkt.ext.audio_level {
                detector.level(track, level, now);
            }
            let n = self.config.audio_loudest_n;
            if n > 0
                && detector.len() > self.config.audio_loudest_above
                && !detector.admit(track, n, now)
            {
                published.held_back = true;
                self.counters.drop(DropReason::NotLoudest);
                return;
            }
            resumed = std::mem::take(&mut published.held_back);
        }
        // A new subscriber of this video whose downlink is estimated gets its allocation now,
        // so that this packet (perhaps the keyframe it needs) can start it on a layer it can
        // afford, instead of waiting for the next housekeeping round.
        if std::mem::take(&mut published.unallocated) {
            for sub in published.subscribers.clone() {
                self.allocate_for(sub, now);
            }
        }
        let Some(published) = self.tracks.get_mut(&track) else {
            return;
        };
        let nackable = is_video;
        let mut need_keyframe: Vec<Option<Rid>> = Vec::new();
        // str0m's reading of the VP8 descriptor, which its patches are built from: read once
        // per packet, when a subscriber first needs its picture id renumbered.
        let mut str0m_vp8: Option<Option<str0m::rtp::Vp8Descriptor>> = None;
        let subscribers = std::mem::take(&mut published.subscribers);
        // The header extensions each copy carries. The dependency descriptor goes as received
        // with VP9 and AV1, so that the subscriber's decoder knows the frames' dependencies,
        // and with every codec over a trunk, so that the far focus can choose layers too.
        // With VP8 a browser builds its references from VP8's own descriptor, whose picture
        // ids weir renumbers around what it leaves out. str0m takes a copy's extensions by
        // value and keeps the descriptor in a map, so a copy that carries it costs one small
        // allocation; one without it (VP8 to a browser, audio) costs none.
        let dd = pkt.dd.as_ref().filter(|_| is_video);
        let dd_to_all = codec != VideoCodec::Vp8;
        // Subscribers told here that this video flows again (`OutTrack::resume_untold`).
        let mut resumed_to: Vec<(crate::ids::PeerId, PauseNotice)> = Vec::new();
        let start_estimate = self.config.estimate_from_bps;
        for sub in &subscribers {
            let Some(speer) = self.peers.get_mut(sub) else {
                continue;
            };
            // Until its connection is up the engine keeps every copy written to it: for the
            // whole connect timeout if it never connects (33 MB of an 8.8 Mbit/s stream). Its
            // layer is chosen on the first packet once it is, on a keyframe.
            if !speer.connected {
                self.counters.drop(DropReason::NotConnected);
                continue;
            }
            let estimating = speer.estimate.is_some();
            // What a video of this subscriber not allocated yet starts within (no lookup).
            let blind_start = speer.before_allocation(start_estimate, Now::New, now);
            let Some(out) = speer.out.get_mut(&track) else {
                continue;
            };
            if out.awaits_allocation(estimating) {
                continue;
            }
            // A trunk carrying this track as simulcast: the layer decides in `trunk` below.
            if out.trunk.is_some() && rid.is_none() {
                continue;
            }
            // The track's first packet for this subscriber: its layer is chosen now, among
            // the layers flowing (this one included), so a keyframe in flight starts it. If
            // only layers above its size flow yet, the smallest of them is the target but
            // this packet does not start it: the smaller layer usually follows within a
            // frame, and housekeeping moves the target there.
            let mut fresh_target = None;
            if out.trunk.is_none() && out.layers.target().is_none() {
                if !is_video {
                    out.layers.set_target(rid, now);
                } else {
                    let cap = super::layers::before_allocation(
                        out.layer_cap(),
                        blind_start.filter(|_| out.allocated == Now::New),
                        &published.activity,
                        now,
                    );
                    let within = published.activity.best_active_within(now, cap);
                    if within.is_none() && !layers_settled {
                        // Only layers above its cap flowed yet, at the track's very start: the
                        // smaller layers of the same picture follow within a frame. Choosing
                        // one above now would ask for its keyframe, and the subscriber would
                        // start on it at the next frame, before housekeeping moves it down.
                        continue;
                    }
                    let layer = within
                        .or_else(|| published.activity.best_active_capped(now, cap))
                        .unwrap_or(rid);
                    let needs_keyframe = out.layers.set_target(layer, now);
                    if within.is_none() || !layers_settled {
                        if needs_keyframe {
                            need_keyframe.push(layer);
                        }
                        continue;
                    }
                    fresh_target = needs_keyframe.then_some(layer);
                }
            }
            let mut switched = false;
            // Moving down, a keyframe of the layer being left means the publisher keyed its
            // layers: Chromium answers a request for any layer with a keyframe on every one,
            // so the target's keyframe is in the same picture. The old layer's keyframe is the
            // largest frame there is (a 720p one takes a second of a 500 kbit/s link), and
            // forwarded it would sit in front of the keyframe the subscriber switches on.
            // Leave the old layer here instead (docs/adaptation.md, "Keyframe requests and
            // Chromium's window").
            if is_video
                && keyframe
                && out.trunk.is_none()
                && out.layers.waiting()
                && out.layers.current() == Some(rid)
                && out
                    .layers
                    .target()
                    .is_some_and(|t| rid_rank(t.as_deref()) < rank)
            {
                out.layers.leave_current();
                debug!(subscriber = %sub, track.publisher = %track.publisher, mid = %out.mid, ?rid,
                    to = ?out.layers.target(), "left the old layer at its keyframe");
            }
            let layer_before = out.layers.current();
            if out.trunk.is_none() {
                match out.layers.on_packet(rid, keyframe || !is_video) {
                    Decision::Forward => {}
                    Decision::Switch => switched = is_video,
                    Decision::Skip => {
                        // Ask at once for the keyframe a new subscriber waits for.
                        need_keyframe.extend(fresh_target);
                        if out.layers.current().is_none() && out.layers.target() == Some(rid) {
                            self.counters.drop(DropReason::AwaitingKeyframe);
                        }
                        if let Some(layer) = out.layers.keyframe_overdue(now, KEYFRAME_WAIT_RETRY) {
                            need_keyframe.push(layer);
                        }
                        continue;
                    }
                }
            }
            let mut marker = pkt.marker;
            // A scalable stream: the spatial and temporal layers the subscriber's screen and
            // link take, switching where the dependency descriptor allows (`forward::svc`).
            // A trunk takes every layer: the far focus chooses for its own subscribers.
            if spatial_layers > 1 && speer.role != PeerRole::Trunk {
                let (Some(f), Some(i)) = (svc_frame, svc_index) else {
                    // Which layer it belongs to is unknown.
                    out.rewriter.skip(*ssrc, *pkt.seq_no);
                    self.counters.drop(DropReason::BadDescriptor);
                    continue;
                };
                let stream = &published.svc[i].1;
                let spatial = spatial_within(out.layer_cap(), spatial_layers, full_layers);
                let top_temporal = out.temporal_cap(spatial_rank(spatial, full_layers));
                out.svc.set_target(spatial, top_temporal);
                let was = out.svc.current();
                let verdict = out.svc.forward(&f, stream);
                if out.svc.current() != was {
                    debug!(subscriber = %sub, %track.publisher, mid = %out.mid, from = ?was,
                        to = ?out.svc.current(), spatial, temporal = top_temporal, "svc layers");
                    // Down a spatial layer while the link loses: the frames after the switch
                    // may refer to frames lost in the overflow, and Chromium would wait 3 s
                    // before asking for a keyframe itself (docs/adaptation.md).
                    let top =
                        |dt: Option<usize>| dt.and_then(|d| stream.target_layers(d)).map(|l| l.0);
                    let down = top(out.svc.current()) < top(was) && was.is_some();
                    let lossy = speer.loss.is_some_and(|l| l > LOSSY_MOVE_DOWN);
                    // Or with a stale queue of the layers left: dropping it takes the lower
                    // layers' frames in it too, so it waits for a keyframe (below).
                    let stale = down
                        && out
                            .tx_ssrc(None)
                            .is_some_and(|s| super::send_queue::is_stale(&mut speer.rtc, s, now));
                    // (Not when the switch came on a keyframe, as key-frame SVC's do.)
                    out.drop_at_keyframe |= stale;
                    if down
                        && (lossy || stale)
                        && f.dependencies > 0
                        && !need_keyframe.contains(&rid)
                    {
                        need_keyframe.push(rid);
                    }
                }
                if out.svc.blocked() && !need_keyframe.contains(&rid) {
                    need_keyframe.push(rid);
                }
                if !verdict.forward {
                    out.rewriter.skip(*ssrc, *pkt.seq_no);
                    self.counters.svc_skipped += 1;
                    continue;
                }
                marker |= verdict.ends_picture;
            }
            // Temporal layers above what the subscriber gets are left out, whole frames at a
            // time, without a gap in its sequence numbers or picture ids.
            if let (Some((tid, layer_sync)), None) = (temporal, &out.trunk) {
                out.temporal.set_target(out.temporal_cap(rank));
                let p = TemporalPacket {
                    source: *ssrc,
                    timestamp: pkt.timestamp,
                    tid,
                    layer_sync,
                    keyframe,
                };
                let was = out.temporal.current();
                let forward = out.temporal.forward(p);
                if out.temporal.current() != was {
                    debug!(subscriber = %sub, %track.publisher, mid = %out.mid, rid = ?rid, from = was,
                        to = out.temporal.current(), target = out.temporal.target(), ?tid,
                        sync = layer_sync, keyframe, "temporal layers");
                }
                if !forward {
                    out.rewriter.skip(*ssrc, *pkt.seq_no);
                    if let Some(id) = vp8.and_then(|d| d.picture_id) {
                        out.vp8_ids.skip(*ssrc, id);
                    }
                    self.counters.temporal_skipped += 1;
                    continue;
                }
            }
            let out_pt = match out.pt_map.iter().find(|(i, _)| *i == pt) {
                Some((_, o)) => *o,
                None => {
                    let o = speer
                        .rtc
                        .codec_config()
                        .match_params(params)
                        .map(|p| p.pt());
                    out.pt_map.push((pt, o));
                    o
                }
            };
            let Some(out_pt) = out_pt else {
                self.counters.drop(DropReason::NoCommonCodec);
                continue;
            };
            let (seq, ts, tx_rid) = if let Some(tl) = out.trunk.as_mut() {
                let Some(r) = rid else { continue };
                let (seq_in, ts_in) = (*pkt.seq_no, pkt.timestamp);
                match tl.on_packet(r, keyframe, *ssrc, seq_in, ts_in, now) {
                    Some((seq, ts)) => (seq, ts, rid),
                    None => continue,
                }
            } else {
                if resumed {
                    out.rewriter.resume();
                    out.vp8_ids.resume();
                }
                match out.rewriter.rewrite(*ssrc, *pkt.seq_no, pkt.timestamp, now) {
                    Rewritten::Send { seq, ts } => (seq, ts, None),
                    Rewritten::DropStale => {
                        self.counters.drop(DropReason::Stale);
                        continue;
                    }
                }
            };
            // VP8 picture id and TL0PICIDX renumbered into one sequence per subscriber
            // (`forward::vp8_ids`): a patch of the descriptor's bytes as the engine copies the
            // payload out; the shared payload is untouched.
            let renumbered = match vp8.and_then(|d| d.picture_id.map(|id| (d, id))) {
                Some((d, id)) if out.trunk.is_none() => {
                    let to = out.vp8_ids.rewrite(*ssrc, id, d.tl0_pic_idx);
                    (to.picture_id != id.value || to.tl0_pic_idx != d.tl0_pic_idx).then_some(to)
                }
                _ => None,
            };
            let patch = renumbered.and_then(|to| {
                let d = str0m_vp8
                    .get_or_insert_with(|| str0m::rtp::Vp8Descriptor::parse(&pkt.payload).ok());
                let mut b = d.as_ref()?.patch().picture_id(to.picture_id);
                if let Some(tl0) = to.tl0_pic_idx {
                    b = b.tl0_pic_idx(tl0);
                }
                b.build().ok()
            });
            // A descriptor str0m will not patch (a field combination RFC 7741 forbids) goes out
            // as the publisher sent it: dropping it here, after its sequence number was given,
            // would leave the subscriber a gap nobody can fill.
            let mid = out.mid;
            // A panic in the subscriber's engine is the subscriber's.
            let publisher = self.current.replace(*sub);
            let mut api = speer.rtc.direct_api();
            debug_assert!(out.trunk.is_some() || out.layers.current() == Some(rid));
            // The send stream by SSRC (a hash lookup), learned by mid once.
            let ssrc = match out.tx_ssrc(tx_rid) {
                Some(s) => Some(s),
                None => {
                    let found = api.stream_tx_by_mid(mid, tx_rid).map(|tx| tx.ssrc());
                    out.tx_ssrcs.extend(found.map(|s| (tx_rid, s)));
                    found
                }
            };
            // A keyframe does not queue behind what it makes useless: what still waits goes if
            // it has gone stale (`super::send_queue`). Moving down a simulcast layer, that is
            // the layer left (not moving up: from a higher layer, or from none, left at its
            // keyframe); after a scalable stream moved down behind a stale queue, it is every
            // layer, the lower ones' frames included, which the keyframe replaces.
            let moved_down = switched && layer_before.is_none_or(|c| rid_rank(c.as_deref()) > rank);
            let drop_now = keyframe && (moved_down || std::mem::take(&mut out.drop_at_keyframe));
            if drop_now
                && ssrc
                    .is_some_and(|s| super::send_queue::drop_if_stale(&mut speer.rtc, s, mid, now))
            {
                self.counters.stale_queues_dropped += 1;
                debug!(subscriber = %sub, track.publisher = %track.publisher, %mid, ?rid, switched,
                    "stale send queue dropped before a keyframe");
            }
            let mut api = speer.rtc.direct_api();
            let Some(tx) = ssrc.and_then(|s| api.stream_tx(&s)) else {
                // Gone from the engine (renegotiated): learned again on the next packet.
                out.tx_ssrcs.retain(|(r, _)| *r != tx_rid);
                self.current = publisher;
                self.counters.drop(DropReason::NoSendStream);
                continue;
            };
            if switched {
                super::tracks::fresh_retransmissions(tx, self.config.rtx_history_packets);
            }
            let mut write =
                RtpWrite::new(out_pt, seq.into(), ts, pkt.received, pkt.payload.clone())
                    .marker(marker)
                    .ext_vals(match dd {
                        Some(dd) if dd_to_all || speer.role == PeerRole::Trunk => {
                            let mut ext = pkt.ext.clone();
                            ext.user_values.set_arc(dd.clone());
                            ext
                        }
                        _ => pkt.ext.clone(),
                    })
                    .nackable(nackable);
            if let Some(patch) = patch {
                write = write.vp8_patch(patch);
            }
            tx.write_rtp(write);
            self.current = publisher;
            if std::mem::take(&mut out.resume_untold) {
                let notice = PauseNotice::new(&out.stream_id, &out.track_id, false);
                resumed_to.push((*sub, notice));
            }
            self.counters.rtp_forwarded += 1;
            if speer.role == PeerRole::Trunk {
                self.counters.trunk.packets_out += 1;
                self.counters.trunk.payload_bytes_out += pkt.payload.len() as u64;
            }
            if !speer.dirty {
                speer.dirty = true;
                self.dirty.push(*sub);
            }
        }
        if let Some(published) = self.tracks.get_mut(&track) {
            published.subscribers = subscribers;
        }
        for layer in need_keyframe {
            self.request_keyframe(&track, layer, now);
        }
        for (sub, notice) in resumed_to {
            self.send_notice(sub, notice);
        }
    }
}
