//! One simulated participant: a real WebRTC stack (str0m in RTP mode: ICE, DTLS, SRTP, SCTP)
//! on its own loopback UDP socket, publishing synthetic simulcast video and audio, receiving and
//! measuring what the focus forwards, and speaking the to-device call protocol.
//!
//! Between the engine and the socket sits an impairment [`Link`] per direction.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::channel::{ChannelConfig, ChannelId};
use str0m::format::Codec;
use str0m::media::{Direction, MediaKind, Mid, Pt, Rid, Simulcast, SimulcastLayer};
use str0m::net::{Protocol, Receive};
use str0m::rtp::{ExtensionValues, RtpWrite};
use str0m::{Candidate, Event, Input, Output, Rtc};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::call::{self, CallLeg, FromFocus, Layout};
use crate::ids::{
    audio_track_id, epoch, micros_since_epoch, publisher_of_stream, stream_id, video_track_id,
    Layer, PublisherId, RoomIndex,
};
use crate::impair::{Impairment, Link, LinkCounters};
use crate::payload::{encode_audio, encode_video, MediaHeader};
use crate::signal::{self, FocusAddress, Incoming, Outgoing, SignalCounters, Transport};
use crate::source::{AudioSource, SpeakerSchedule, VideoShape, VideoSource};
use crate::stats::{Roster, RxStats, SecondBucket};

/// Wall-clock Unix milliseconds now.
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Wait this long for the focus's answer before calling again with a new call id.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(15);
/// Wait this long after the answer for ICE+DTLS before calling again.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// Calls a participant places before giving up (js-sdk retries an invite 3 times).
pub const MAX_ATTEMPTS: u32 = 5;
/// Pause before calling again after a refusal; doubles per attempt. A refusal usually means the
/// focus has not yet seen our room state, which its next sync brings.
pub const RETRY_BACKOFF: Duration = Duration::from_millis(1000);
/// How long a participant waits at the end for its queued hangup to be sent.
pub const HANGUP_FLUSH: Duration = Duration::from_secs(5);
/// Datagrams read from the socket per wake-up before timers get a turn.
const RECV_BURST: usize = 64;

/// Our data channel's label, as JS-SFU names it (MSC3898 messages both ways).
const DATA_LABEL: &str = "datachannel";

/// The unordered channel on which the focus sends pause notices (docs/data-channel.md).
const NOTICES_LABEL: &str = "io.weir.notices";

/// Who this participant is and what it does.
#[derive(Debug, Clone)]
pub struct Plan {
    pub publisher: PublisherId,
    pub room: RoomIndex,
    pub conf_id: String,
    pub publish_video: bool,
    pub publish_audio: bool,
    pub layout: Layout,
    pub video: VideoShape,
    /// The room's video publishers and audio publishers (both include this participant if it
    /// publishes), in roster order.
    pub room_video: Vec<PublisherId>,
    pub room_audio: Vec<PublisherId>,
    pub speakers: SpeakerSchedule,
    pub uplink: Impairment,
    pub downlink: Impairment,
    pub seed: u64,
    pub focus: FocusAddress,
    pub focus_session: String,
    /// Where our media socket binds.
    pub local_ip: std::net::IpAddr,
    /// Our to-device session id (also in our `m.call.member` device entry).
    pub session_id: String,
    /// Publishers of this room that call another focus (a cascade): their media reaches us
    /// through a trunk.
    pub far_publishers: BTreeSet<PublisherId>,
}

/// Time series of the whole run, one bucket per second since the run started.
#[derive(Default)]
pub struct Timeline {
    pub seconds: Vec<SecondBucket>,
}

impl Timeline {
    pub fn add(&mut self, second: usize, b: &SecondBucket) {
        if second >= self.seconds.len() {
            self.seconds.resize_with(second + 1, SecondBucket::default);
        }
        self.seconds[second].merge(b);
    }
}

/// What all participants share: progress counters, the timeline, the run's clock.
pub struct Shared {
    pub run_start: Instant,
    /// Participants stop trying to connect after this.
    pub setup_deadline: Instant,
    pub joined: AtomicU64,
    pub active: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub timeline: Mutex<Timeline>,
    pub signal: Arc<SignalCounters>,
}

/// What one participant measured.
#[derive(Debug)]
pub struct Report {
    pub publisher: PublisherId,
    pub room: RoomIndex,
    pub user_id: String,
    /// Calls placed (1 unless refused or timed out).
    pub attempts: u32,
    /// Wall-clock Unix ms at which the last call was placed (so a test can tell a call placed
    /// after some event from one placed before it).
    pub last_call_unix_ms: Option<u64>,
    /// From the first invite to ICE+DTLS connected.
    pub join_ms: Option<f64>,
    /// From the first invite to the first complete video frame.
    pub first_frame_ms: Option<f64>,
    pub rx: RxStats,
    /// Seconds from the first connect to the end of the run (what received rates divide by).
    pub active_s: f64,
    pub subscribed_video: BTreeSet<PublisherId>,
    pub subscribed_audio: BTreeSet<PublisherId>,
    pub sent_packets: u64,
    pub sent_bytes: u64,
    pub keyframe_requests: u64,
    pub focus_offers: u64,
    pub subscriptions_sent: u64,
    pub uplink: LinkCounters,
    pub downlink: LinkCounters,
    /// The bottleneck rate of its downlink (`--rate-kbps` on an impaired participant), bit/s;
    /// 0 when unlimited.
    pub downlink_bps: u64,
    pub socket_send_errors: u64,
    pub ended_by_focus: Option<String>,
    pub error: Option<String>,
}

impl Report {
    /// Nothing measured yet.
    fn new(publisher: PublisherId, room: RoomIndex, user_id: String, downlink_bps: u64) -> Report {
        Report {
            publisher,
            room,
            user_id,
            attempts: 0,
            last_call_unix_ms: None,
            join_ms: None,
            first_frame_ms: None,
            rx: RxStats::default(),
            active_s: 0.0,
            subscribed_video: BTreeSet::new(),
            subscribed_audio: BTreeSet::new(),
            sent_packets: 0,
            sent_bytes: 0,
            keyframe_requests: 0,
            focus_offers: 0,
            subscriptions_sent: 0,
            uplink: LinkCounters::default(),
            downlink: LinkCounters::default(),
            downlink_bps,
            socket_send_errors: 0,
            ended_by_focus: None,
            error: None,
        }
    }

    /// A report with only what a summary reads, for the report's own tests.
    #[cfg(test)]
    pub(crate) fn for_test(
        publisher: PublisherId,
        room: RoomIndex,
        rx: RxStats,
        active_s: f64,
        downlink_bps: u64,
    ) -> Report {
        Report {
            rx,
            active_s,
            ..Report::new(publisher, room, String::new(), downlink_bps)
        }
    }

    /// Publishers subscribed to whose media never arrived (video: no frame shown; audio: no
    /// packet).
    pub fn missing(&self) -> Vec<(PublisherId, &'static str)> {
        let mut m = Vec::new();
        for p in &self.subscribed_video {
            if self.rx.video.get(p).is_none_or(|v| v.shown_frames == 0) {
                m.push((*p, "video"));
            }
        }
        for p in &self.subscribed_audio {
            if self.rx.audio.get(p).is_none_or(|a| a.packets == 0) {
                m.push((*p, "audio"));
            }
        }
        m
    }
}

enum Outcome {
    /// The run ended (or the participant gave up for good).
    Done,
    /// Call again with a new call id.
    Retry(String),
}

struct SendStream {
    mid: Mid,
    pt: Pt,
}

/// One call attempt's engine state.
struct Call {
    rtc: Rtc,
    leg: CallLeg,
    pending: Option<SdpPendingOffer>,
    invited_at: Instant,
    answered_at: Option<Instant>,
    connected_at: Option<Instant>,
    video: Option<SendStream>,
    audio: Option<SendStream>,
    channel: Option<ChannelId>,
    /// Receive SSRC → is video.
    rx_kind: HashMap<u32, bool>,
    /// Video packets missing for good: a browser then asks for a keyframe.
    lost: weir_sfu::sim::LostForGood,
}

struct Participant {
    plan: Plan,
    shared: Arc<Shared>,
    out: mpsc::Sender<Outgoing>,
    user_id: String,
    device_id: String,
    session_id: String,
    local: SocketAddr,
    uplink: Link<(SocketAddr, Vec<u8>)>,
    downlink: Link<(SocketAddr, Vec<u8>)>,
    roster: Roster,
    rx: RxStats,
    video_src: Option<VideoSource>,
    audio_src: Option<AudioSource>,
    layer_seq: [u32; 3],
    rtp_seq: [u64; 4],
    ts_offset: [u32; 4],
    payload: Vec<u8>,
    first_invite: Option<Instant>,
    first_connect: Option<Instant>,
    join_ms: Option<f64>,
    subscribed_video: BTreeSet<PublisherId>,
    subscribed_audio: BTreeSet<PublisherId>,
    last_turn: Option<u64>,
    last_tiles: Option<Vec<call::Tile>>,
    sent_packets: u64,
    sent_bytes: u64,
    keyframe_requests: u64,
    focus_offers: u64,
    subscriptions_sent: u64,
    socket_send_errors: u64,
    ended_by_focus: Option<String>,
    counted_joined: bool,
    active: bool,
    current_second: usize,
}

/// Run one participant until the run's cancel signal, then hang up and report.
pub async fn run(
    plan: Plan,
    transport: Transport,
    shared: Arc<Shared>,
    mut cancel: watch::Receiver<bool>,
) -> Report {
    let (out, mut inc, sender) = signal::spawn(
        transport.clone(),
        plan.focus.clone(),
        plan.conf_id.clone(),
        shared.signal.clone(),
        cancel.clone(),
    );
    let user_id = transport.user_id().to_string();
    let device_id = transport.device_id().to_string();
    let mut report = Report::new(
        plan.publisher,
        plan.room,
        user_id.clone(),
        plan.downlink.rate_bps,
    );
    let socket = match UdpSocket::bind((plan.local_ip, 0)).await {
        Ok(s) => s,
        Err(e) => {
            report.error = Some(format!("binding a UDP socket: {e}"));
            return report;
        }
    };
    let local = match socket.local_addr() {
        Ok(a) => a,
        Err(e) => {
            report.error = Some(format!("socket address: {e}"));
            return report;
        }
    };
    let roster = Roster {
        all: plan
            .room_video
            .iter()
            .chain(plan.room_audio.iter())
            .copied()
            .collect(),
        far: plan.far_publishers.clone(),
    };
    let session_id = plan.session_id.clone();
    let mut p = Participant {
        uplink: Link::new(plan.uplink, plan.seed ^ 0x11),
        downlink: Link::new(plan.downlink, plan.seed ^ 0x22),
        plan,
        shared,
        out,
        user_id,
        device_id,
        session_id,
        local,
        roster,
        rx: RxStats::default(),
        video_src: None,
        audio_src: None,
        layer_seq: [0; 3],
        rtp_seq: std::array::from_fn(|_| u64::from(rand::random::<u16>() % 16_384)),
        ts_offset: std::array::from_fn(|_| rand::random()),
        payload: Vec::with_capacity(1500),
        first_invite: None,
        first_connect: None,
        join_ms: None,
        subscribed_video: BTreeSet::new(),
        subscribed_audio: BTreeSet::new(),
        last_turn: None,
        last_tiles: None,
        sent_packets: 0,
        sent_bytes: 0,
        keyframe_requests: 0,
        focus_offers: 0,
        subscriptions_sent: 0,
        socket_send_errors: 0,
        ended_by_focus: None,
        counted_joined: false,
        active: false,
        current_second: 0,
    };
    let mut attempt = 0;
    let mut error = None;
    let mut last_call_unix_ms = None;
    loop {
        if *cancel.borrow() {
            break;
        }
        attempt += 1;
        last_call_unix_ms = Some(unix_ms());
        let call = match p.place_call() {
            Ok(c) => c,
            Err(e) => {
                error = Some(e);
                break;
            }
        };
        match p.call_loop(call, &socket, &mut inc, &mut cancel).await {
            Outcome::Done => break,
            Outcome::Retry(why) => {
                let backoff = RETRY_BACKOFF * (1 << (attempt - 1).min(4));
                let giving_up =
                    attempt >= MAX_ATTEMPTS || Instant::now() + backoff >= p.shared.setup_deadline;
                if giving_up {
                    warn!(user = %p.user_id, attempt, %why, "giving up calling the focus");
                    error = Some(format!("no call after {attempt} attempts: {why}"));
                    break;
                }
                debug!(user = %p.user_id, attempt, %why, "calling again");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = cancel.changed() => break,
                }
            }
        }
    }
    if p.active {
        p.shared.active.fetch_sub(1, Ordering::Relaxed);
    }
    let now_us = micros_since_epoch(Instant::now());
    p.rx.finish(now_us);
    p.flush_second(Instant::now(), true);
    report.attempts = attempt;
    report.last_call_unix_ms = last_call_unix_ms;
    report.active_s = p
        .first_connect
        .map(|t| t.elapsed().as_secs_f64())
        .unwrap_or(0.0);
    report.join_ms = p.join_ms;
    report.first_frame_ms = match (p.rx.first_frame_us(), p.first_invite) {
        (Some(f), Some(i)) => Some((f as f64 - micros_since_epoch(i) as f64) / 1000.0),
        _ => None,
    };
    report.subscribed_video = std::mem::take(&mut p.subscribed_video);
    report.subscribed_audio = std::mem::take(&mut p.subscribed_audio);
    report.sent_packets = p.sent_packets;
    report.sent_bytes = p.sent_bytes;
    report.keyframe_requests = p.keyframe_requests;
    report.focus_offers = p.focus_offers;
    report.subscriptions_sent = p.subscriptions_sent;
    report.uplink = p.uplink.counters;
    report.downlink = p.downlink.counters;
    report.socket_send_errors = p.socket_send_errors;
    report.ended_by_focus = p.ended_by_focus.take();
    report.error = error;
    report.rx = std::mem::take(&mut p.rx);
    // Our hangup is queued: let it reach the focus (bounded), so the focus frees the leg now
    // rather than after its silence timeout.
    drop(p);
    let _ = tokio::time::timeout(HANGUP_FLUSH, sender).await;
    report
}

impl Participant {
    fn publishes(&self) -> bool {
        self.plan.publish_audio || self.plan.publish_video
    }

    /// A fresh engine and call leg; the invite and our candidates are queued for sending.
    fn place_call(&mut self) -> Result<Call, String> {
        let now = Instant::now();
        let mut rtc = Rtc::builder()
            .set_rtp_mode(true)
            .clear_codecs()
            .enable_opus(true, false)
            .enable_vp8(true)
            .build(now);
        let cand = Candidate::host(self.local, "udp").map_err(|e| e.to_string())?;
        let cand_sdp = rtc
            .add_local_candidate(cand)
            .map(|c| c.to_sdp_string())
            .unwrap_or_default();
        let p = self.plan.publisher;
        let mut api = rtc.sdp_api();
        let mut audio_mid = None;
        let mut video_mid = None;
        if self.plan.publish_audio {
            audio_mid = Some(api.add_media(
                MediaKind::Audio,
                Direction::SendOnly,
                Some(stream_id(p)),
                Some(audio_track_id(p)),
                None,
            ));
        }
        if self.plan.publish_video {
            // Highest layer first, like JS-SFU: a browser drops the later encodings when the
            // source is small, and the full layer must survive.
            let mut sim = Simulcast::new();
            for l in [Layer::F, Layer::H, Layer::Q] {
                sim.add_send_layer(SimulcastLayer::new(l.rid()));
            }
            video_mid = Some(api.add_media(
                MediaKind::Video,
                Direction::SendOnly,
                Some(stream_id(p)),
                Some(video_track_id(p)),
                Some(sim),
            ));
        }
        // The data channel exists before the first offer, as JS-SFU creates it.
        let channel = api.add_channel(DATA_LABEL.into());
        // Pause notices come on a channel of their own, unordered, so that one lost on a
        // congested link does not hold back the later ones (docs/data-channel.md).
        api.add_channel_with_config(ChannelConfig {
            label: NOTICES_LABEL.into(),
            ordered: false,
            ..ChannelConfig::default()
        });
        let (offer, pending) = api.apply().ok_or("nothing to offer")?;
        let call_id = call::gen_id(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or(0),
            16,
        );
        let mut leg = CallLeg::new(
            call_id,
            self.plan.conf_id.clone(),
            self.device_id.clone(),
            self.session_id.clone(),
            self.plan.focus_session.clone(),
            self.plan.focus.user_id.clone(),
        );
        let metadata = call::own_metadata(
            p,
            &self.user_id,
            &self.device_id,
            self.plan.publish_audio,
            self.plan.publish_video,
        );
        let invite = leg.invite(&offer.to_sdp_string(), metadata);
        self.send("m.call.invite", invite);
        let first_mid = audio_mid.or(video_mid).map(|m| m.to_string());
        let mut cands = Vec::new();
        if let Some(c) = cand_sdp.strip_prefix("a=").or(Some(cand_sdp.as_str())) {
            if !c.is_empty() {
                cands.push(call::candidate(
                    c.trim_end(),
                    first_mid.as_deref().unwrap_or("0"),
                    None,
                ));
            }
        }
        cands.push(call::end_of_candidates());
        let c = leg.candidates(cands);
        self.send("m.call.candidates", c);
        self.first_invite.get_or_insert(now);
        let mut c = Call {
            rtc,
            leg,
            pending: Some(pending),
            invited_at: now,
            answered_at: None,
            connected_at: None,
            video: None,
            audio: None,
            channel: Some(channel),
            rx_kind: HashMap::new(),
            lost: Default::default(),
        };
        // Payload types are ours (we offer), known now.
        let pt = |rtc: &Rtc, codec| {
            rtc.codec_config()
                .find(|p| p.spec().codec == codec)
                .map(|p| p.pt())
        };
        if let (Some(mid), Some(pt)) = (video_mid, pt(&c.rtc, Codec::Vp8)) {
            c.video = Some(SendStream { mid, pt });
        }
        if let (Some(mid), Some(pt)) = (audio_mid, pt(&c.rtc, Codec::Opus)) {
            c.audio = Some(SendStream { mid, pt });
        }
        Ok(c)
    }

    fn send(&self, event_type: &'static str, content: Value) {
        if self
            .out
            .try_send(Outgoing {
                event_type,
                content,
            })
            .is_err()
        {
            self.shared
                .signal
                .send_failures
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    async fn call_loop(
        &mut self,
        mut c: Call,
        socket: &UdpSocket,
        inc: &mut mpsc::Receiver<Incoming>,
        cancel: &mut watch::Receiver<bool>,
    ) -> Outcome {
        let mut buf = vec![0u8; 2048];
        let mut rtc_timeout = Instant::now();
        loop {
            // Deadlines of this attempt.
            let now = Instant::now();
            if c.answered_at.is_none() && now >= c.invited_at + ANSWER_TIMEOUT {
                return self.abandon(c, "no answer");
            }
            if c.connected_at.is_none() {
                if let Some(a) = c.answered_at {
                    if now >= a + CONNECT_TIMEOUT {
                        return self.abandon(c, "ICE/DTLS did not connect");
                    }
                }
                if now >= self.shared.setup_deadline {
                    self.hangup(&mut c, "user_hangup");
                    return Outcome::Retry("setup time cap reached".into());
                }
            }
            let wake = self.next_wake(&c, rtc_timeout);
            let sleep = tokio::time::sleep_until(wake.into());
            tokio::select! {
                biased;
                _ = cancel.changed() => {
                    self.hangup(&mut c, "user_hangup");
                    return Outcome::Done;
                }
                ev = inc.recv() => {
                    let Some(ev) = ev else {
                        self.hangup(&mut c, "user_hangup");
                        return Outcome::Done;
                    };
                    if let Some(outcome) = self.on_signal(&mut c, ev) {
                        return outcome;
                    }
                }
                r = socket.recv_from(&mut buf) => {
                    if let Ok((n, from)) = r {
                        self.on_datagram(&mut c, socket, from, &buf[..n]);
                        // More may be waiting: take a bounded burst without sleeping.
                        for _ in 0..RECV_BURST {
                            match socket.try_recv_from(&mut buf) {
                                Ok((n, from)) => self.on_datagram(&mut c, socket, from, &buf[..n]),
                                Err(_) => break,
                            }
                        }
                    }
                }
                _ = sleep => {}
            }
            let now = Instant::now();
            while let Some((from, d)) = self.downlink.pop_ready(now) {
                self.feed(&mut c, socket, from, &d, now);
            }
            if now >= rtc_timeout {
                if let Err(e) = c.rtc.handle_input(Input::Timeout(now)) {
                    warn!(user = %self.user_id, error = %e, "engine failed");
                    return self.abandon(c, "engine error");
                }
            }
            if c.connected_at.is_some() {
                self.produce_media(&mut c, now);
                self.maybe_resubscribe(&mut c, now);
            }
            match self.drain(&mut c, socket) {
                Some(t) => rtc_timeout = t,
                None => return self.abandon(c, "engine closed"),
            }
            while let Some((to, d)) = self.uplink.pop_ready(now) {
                self.transmit(socket, to, &d);
            }
            self.flush_second(now, false);
        }
    }

    fn abandon(&mut self, mut c: Call, why: &str) -> Outcome {
        self.hangup(&mut c, "user_hangup");
        if c.connected_at.is_some() {
            // A call that was up and died: report, don't rejoin.
            self.ended_by_focus.get_or_insert(why.to_string());
            return Outcome::Done;
        }
        Outcome::Retry(why.to_string())
    }

    fn hangup(&mut self, c: &mut Call, reason: &str) {
        let h = c.leg.hangup(reason);
        self.send("m.call.hangup", h);
        c.rtc.disconnect();
        if self.active {
            self.active = false;
            self.shared.active.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn next_wake(&self, c: &Call, rtc_timeout: Instant) -> Instant {
        let at = |us: u64| epoch() + Duration::from_micros(us);
        let mut w = rtc_timeout;
        if c.connected_at.is_some() {
            if let Some(v) = &self.video_src {
                w = w.min(at(v.next_due()));
            }
            if let Some(a) = &self.audio_src {
                w = w.min(at(a.next_due()));
            }
        }
        for t in [self.uplink.next_release(), self.downlink.next_release()]
            .into_iter()
            .flatten()
        {
            w = w.min(t);
        }
        let next_second =
            self.shared.run_start + Duration::from_secs(self.current_second as u64 + 1);
        w = w.min(next_second);
        // Attempt deadlines.
        if c.answered_at.is_none() {
            w = w.min(c.invited_at + ANSWER_TIMEOUT);
        }
        w.max(Instant::now())
    }

    fn on_signal(&mut self, c: &mut Call, ev: Incoming) -> Option<Outcome> {
        let msg = match call::parse(&c.leg, &ev.event_type, &ev.content) {
            Ok(m) => m,
            Err(e) => {
                debug!(user = %self.user_id, error = %e, "ignored event");
                return None;
            }
        };
        match msg {
            FromFocus::Answer { sdp, party_id } => {
                let pending = c.pending.take()?;
                let answer = match SdpAnswer::from_sdp_string(&sdp) {
                    Ok(a) => a,
                    Err(e) => {
                        warn!(user = %self.user_id, error = %e, "unparseable answer");
                        return Some(self.abandon_ref(c, "bad answer"));
                    }
                };
                if let Err(e) = c.rtc.sdp_api().accept_answer(pending, answer) {
                    warn!(user = %self.user_id, error = %e, "answer refused by engine");
                    return Some(self.abandon_ref(c, "bad answer"));
                }
                c.answered_at = Some(Instant::now());
                let s = c.leg.select_answer(&party_id);
                self.send("m.call.select_answer", s);
            }
            FromFocus::Candidates(list) => {
                for cand in list {
                    let text = cand.strip_prefix("a=").unwrap_or(&cand);
                    match Candidate::from_sdp_string(text) {
                        Ok(cand) if loopback(cand.addr()) => c.rtc.add_remote_candidate(cand),
                        Ok(cand) => debug!(addr = %cand.addr(), "non-loopback candidate ignored"),
                        Err(e) => debug!(error = %e, "unparseable candidate"),
                    }
                }
            }
            FromFocus::Negotiate {
                offer: true, sdp, ..
            } => {
                self.focus_offers += 1;
                let offer = match SdpOffer::from_sdp_string(&sdp) {
                    Ok(o) => o,
                    Err(e) => {
                        warn!(user = %self.user_id, error = %e, "unparseable focus offer");
                        return None;
                    }
                };
                match c.rtc.sdp_api().accept_offer(offer) {
                    Ok(answer) => {
                        let md = call::own_metadata(
                            self.plan.publisher,
                            &self.user_id,
                            &self.device_id,
                            self.plan.publish_audio,
                            self.plan.publish_video,
                        );
                        let n = c.leg.negotiate_answer(&answer.to_sdp_string(), md);
                        self.send("m.call.negotiate", n);
                    }
                    Err(e) => warn!(user = %self.user_id, error = %e, "focus offer refused"),
                }
            }
            FromFocus::Negotiate { offer: false, .. } => {
                debug!("negotiate answer without an offer of ours");
            }
            FromFocus::MetadataChanged(_) => {}
            FromFocus::Hangup { reason } => {
                if c.connected_at.is_some() {
                    info!(user = %self.user_id, %reason, "the focus hung up");
                    self.ended_by_focus = Some(reason);
                    if self.active {
                        self.active = false;
                        self.shared.active.fetch_sub(1, Ordering::Relaxed);
                    }
                    return Some(Outcome::Done);
                }
                return Some(Outcome::Retry(format!("refused: {reason}")));
            }
            FromFocus::Other(t) => debug!(event = %t, "other event"),
        }
        None
    }

    fn abandon_ref(&mut self, c: &mut Call, why: &str) -> Outcome {
        self.hangup(c, "user_hangup");
        Outcome::Retry(why.to_string())
    }

    fn on_datagram(&mut self, c: &mut Call, socket: &UdpSocket, from: SocketAddr, data: &[u8]) {
        let now = Instant::now();
        if self.downlink.is_perfect() {
            self.downlink.counters.passed += 1;
            self.feed(c, socket, from, data, now);
        } else {
            let _ = self.downlink.push(now, data.len(), (from, data.to_vec()));
        }
    }

    fn feed(
        &mut self,
        c: &mut Call,
        socket: &UdpSocket,
        from: SocketAddr,
        data: &[u8],
        now: Instant,
    ) {
        let Ok(r) = Receive::new(Protocol::Udp, from, self.local, data) else {
            return;
        };
        if let Err(e) = c.rtc.handle_input(Input::Receive(now, r)) {
            debug!(user = %self.user_id, error = %e, "engine rejected a datagram");
        }
        // RTP mode keeps one received packet until the next poll: drain now.
        let _ = self.drain(c, socket);
    }

    /// Drain engine output; returns the engine's next timeout, or None if it is dead.
    fn drain(&mut self, c: &mut Call, socket: &UdpSocket) -> Option<Instant> {
        loop {
            match c.rtc.poll_output() {
                Ok(Output::Timeout(t)) => {
                    return c.rtc.is_alive().then_some(t);
                }
                Ok(Output::Transmit(t)) => {
                    if self.uplink.is_perfect() {
                        self.uplink.counters.passed += 1;
                        self.transmit(socket, t.destination, &t.contents);
                    } else {
                        let len = t.contents.len();
                        let _ = self.uplink.push(
                            Instant::now(),
                            len,
                            (t.destination, t.contents.to_vec()),
                        );
                    }
                }
                Ok(Output::Event(e)) => self.on_event(c, e),
                Err(e) => {
                    warn!(user = %self.user_id, error = %e, "engine error");
                    return None;
                }
            }
        }
    }

    fn transmit(&mut self, socket: &UdpSocket, to: SocketAddr, data: &[u8]) {
        if socket.try_send_to(data, to).is_err() {
            self.socket_send_errors += 1;
        }
    }

    fn on_event(&mut self, c: &mut Call, e: Event) {
        match e {
            Event::Connected => {
                let now = Instant::now();
                c.connected_at = Some(now);
                if !self.counted_joined {
                    self.counted_joined = true;
                    self.first_connect = Some(now);
                    self.shared.joined.fetch_add(1, Ordering::Relaxed);
                    if let Some(first) = self.first_invite {
                        self.join_ms = Some((now - first).as_secs_f64() * 1000.0);
                    }
                }
                if !self.active {
                    self.active = true;
                    self.shared.active.fetch_add(1, Ordering::Relaxed);
                }
                let now_us = micros_since_epoch(now);
                if self.plan.publish_video && c.video.is_some() {
                    self.video_src =
                        Some(VideoSource::new(now_us, self.plan.seed, self.plan.video));
                }
                if self.plan.publish_audio && c.audio.is_some() {
                    self.audio_src = Some(AudioSource::new(now_us));
                }
                debug!(user = %self.user_id, "connected");
            }
            Event::ChannelOpen(_, label) if label == NOTICES_LABEL => {
                debug!(user = %self.user_id, %label, "notices channel open");
            }
            Event::ChannelOpen(id, label) => {
                debug!(user = %self.user_id, %label, "data channel open");
                c.channel = Some(id);
                self.last_turn = None;
                self.last_tiles = None;
                self.maybe_resubscribe(c, Instant::now());
            }
            Event::RtpPacket(pkt) => {
                let ssrc = *pkt.header.ssrc;
                let video = match c.rx_kind.get(&ssrc) {
                    Some(v) => *v,
                    None => {
                        let mid = c
                            .rtc
                            .direct_api()
                            .stream_rx(&pkt.header.ssrc)
                            .map(|s| s.mid());
                        let v = mid
                            .and_then(|m| c.rtc.media(m).map(|m| m.kind()))
                            .map(|k| k == MediaKind::Video)
                            .unwrap_or(pkt.payload.len() > 200);
                        c.rx_kind.insert(ssrc, v);
                        v
                    }
                };
                let now = Instant::now();
                // A browser's decoder asks for a keyframe once a packet it needs stays lost;
                // without it a lost keyframe would stop the video until someone else asked.
                if video
                    && c.lost
                        .on_packet(pkt.header.ssrc, pkt.header.sequence_number, now)
                {
                    if let Some(s) = c.rtc.direct_api().stream_rx(&pkt.header.ssrc) {
                        s.request_keyframe(str0m::media::KeyframeRequestKind::Pli);
                        self.rx.keyframes_asked += 1;
                    }
                }
                let now_us = micros_since_epoch(now);
                let decoded = crate::payload::decode(&pkt.payload, video);
                let voiced = pkt.header.ext_vals.voice_activity == Some(true);
                let publisher = decoded.as_ref().ok().map(|h| h.publisher);
                let frozen_before = publisher
                    .and_then(|p| self.rx.video.get(&p))
                    .map_or(0, |v| v.freeze_us);
                self.rx.on_packet(
                    ssrc,
                    *pkt.seq_no,
                    decoded,
                    pkt.payload.len(),
                    now_us,
                    &self.roster,
                );
                let frozen = publisher
                    .and_then(|p| self.rx.video.get(&p))
                    .map_or(0, |v| v.freeze_us);
                if frozen > frozen_before {
                    debug!(
                        user = %self.user_id,
                        publisher = ?publisher,
                        stop_ms = (frozen - frozen_before) / 1000,
                        "a video froze and came back"
                    );
                }
                if let (false, true, Some(p)) = (video, voiced, publisher) {
                    self.rx.on_voice(p);
                }
            }
            Event::KeyframeRequest(req) => {
                self.keyframe_requests += 1;
                if let Some(v) = &mut self.video_src {
                    let acted = v.request_keyframe(micros_since_epoch(Instant::now()));
                    debug!(user = %self.user_id, rid = ?req.rid, acted, "keyframe request");
                }
            }
            Event::ChannelData(d) => {
                // The focus says a video toward us is paused for bandwidth, or flows again
                // (io.weir.paused): the tile would say so, so that time is no freeze.
                let Ok(v) = serde_json::from_slice::<Value>(&d.data) else {
                    return;
                };
                if v["type"] != "io.weir.paused" {
                    return;
                }
                let (Some(stream), Some(paused)) = (
                    v["content"]["stream_id"].as_str(),
                    v["content"]["paused"].as_bool(),
                ) else {
                    return;
                };
                let seq = v["content"]["seq"].as_u64();
                if let Some(p) = publisher_of_stream(stream) {
                    let now_us = micros_since_epoch(Instant::now());
                    debug!(user = %self.user_id, publisher = ?p, paused, ?seq, "focus says paused");
                    self.rx
                        .video
                        .entry(p)
                        .or_default()
                        .on_notice(paused, seq, now_us);
                }
            }
            _ => {}
        }
    }

    fn produce_media(&mut self, c: &mut Call, now: Instant) {
        let now_us = micros_since_epoch(now);
        let p = self.plan.publisher;
        if let (Some(src), Some(stream)) = (&mut self.video_src, &c.video) {
            for frame in src.poll(now_us) {
                let li = frame.layer.index();
                let rtp_ts = ((frame.capture_us * 9 / 100) as u32).wrapping_add(self.ts_offset[li]);
                let n = frame.packets.len();
                for (i, &size) in frame.packets.iter().enumerate() {
                    let h = MediaHeader {
                        publisher: p,
                        layer: Some(frame.layer),
                        keyframe: frame.keyframe,
                        frame: frame.frame,
                        packet: i as u16,
                        packets: n as u16,
                        layer_seq: self.layer_seq[li],
                        sent_us: micros_since_epoch(Instant::now()),
                        vp8: Some(frame.vp8),
                    };
                    self.layer_seq[li] = self.layer_seq[li].wrapping_add(1);
                    encode_video(&h, size, &mut self.payload);
                    let seq = self.rtp_seq[li];
                    self.rtp_seq[li] += 1;
                    let rid = Rid::from(frame.layer.rid());
                    let mut api = c.rtc.direct_api();
                    let Some(tx) = api.stream_tx_by_mid(stream.mid, Some(rid)) else {
                        continue;
                    };
                    tx.write_rtp(
                        RtpWrite::new(stream.pt, seq.into(), rtp_ts, now, self.payload.as_slice())
                            .marker(i + 1 == n)
                            .nackable(true),
                    );
                    self.sent_packets += 1;
                    self.sent_bytes += size as u64;
                }
            }
        }
        let talking = self.talking(now_us);
        if let (Some(src), Some(stream)) = (&mut self.audio_src, &c.audio) {
            while let Some(a) = src.poll(now_us, talking) {
                let h = MediaHeader {
                    publisher: p,
                    layer: None,
                    keyframe: false,
                    frame: a.seq,
                    packet: 0,
                    packets: 1,
                    layer_seq: a.seq,
                    sent_us: micros_since_epoch(Instant::now()),
                    vp8: None,
                };
                encode_audio(&h, a.bytes, &mut self.payload);
                let seq = self.rtp_seq[3];
                self.rtp_seq[3] += 1;
                let ts = ((a.capture_us * 48 / 1000) as u32).wrapping_add(self.ts_offset[3]);
                let ext = ExtensionValues {
                    audio_level: Some(a.level),
                    voice_activity: Some(a.voice),
                    ..Default::default()
                };
                let mut api = c.rtc.direct_api();
                if let Some(tx) = api.stream_tx_by_mid(stream.mid, None) {
                    tx.write_rtp(
                        RtpWrite::new(stream.pt, seq.into(), ts, now, self.payload.as_slice())
                            .ext_vals(ext),
                    );
                    self.sent_packets += 1;
                    self.sent_bytes += self.payload.len() as u64;
                }
            }
        }
    }

    /// Whether this participant talks at `now_us` under the room's speaker schedule.
    fn talking(&self, now_us: u64) -> bool {
        let Some(me) = self
            .plan
            .room_audio
            .iter()
            .position(|p| *p == self.plan.publisher)
        else {
            return false;
        };
        let s = &self.plan.speakers;
        s.talking(s.turn(now_us), self.plan.room_audio.len())
            .contains(&me)
    }

    /// The active speaker at `now_us` (first talker), if anyone talks.
    fn speaker(&self, now_us: u64) -> Option<PublisherId> {
        let s = &self.plan.speakers;
        s.talking(s.turn(now_us), self.plan.room_audio.len())
            .first()
            .and_then(|i| self.plan.room_audio.get(*i).copied())
    }

    /// Send `m.call.track_subscription` on the data channel when it opens and whenever the
    /// speaker turn changes (the speaker layout follows the active speaker).
    fn maybe_resubscribe(&mut self, c: &mut Call, now: Instant) {
        let Some(ch) = c.channel else {
            return;
        };
        let now_us = micros_since_epoch(now);
        let turn = self.plan.speakers.turn(now_us);
        if self.last_turn == Some(turn) {
            return;
        }
        let me = self.plan.publisher;
        let others_video: Vec<PublisherId> = self
            .plan
            .room_video
            .iter()
            .copied()
            .filter(|p| *p != me)
            .collect();
        let others_audio: Vec<PublisherId> = self
            .plan
            .room_audio
            .iter()
            .copied()
            .filter(|p| *p != me)
            .collect();
        let tiles = self
            .plan
            .layout
            .tiles(me, &others_video, self.speaker(now_us));
        if self.last_tiles.as_ref() == Some(&tiles) {
            self.last_turn = Some(turn);
            return;
        }
        let msg = call::track_subscription(&others_audio, &tiles, &others_video);
        let Some(mut channel) = c.rtc.channel(ch) else {
            return; // not open yet
        };
        match channel.write(false, msg.to_string().as_bytes()) {
            Ok(_) => {
                self.last_turn = Some(turn);
                self.subscriptions_sent += 1;
                // A video off the layout is not expected to play: its gap is no freeze. That
                // holds for one never received yet too, whose frames already in flight may
                // still come (before the first subscription the focus sends every video).
                for p in &others_video {
                    let shown = tiles.iter().any(|t| t.publisher == *p);
                    self.rx.video.entry(*p).or_default().on_shown(shown, now_us);
                }
                self.subscribed_audio.extend(others_audio);
                self.subscribed_video
                    .extend(tiles.iter().map(|t| t.publisher));
            }
            Err(e) => debug!(error = %e, "subscription not sent"),
        }
    }

    /// Hand the finished second(s) to the shared timeline.
    fn flush_second(&mut self, now: Instant, force: bool) {
        let second = now
            .saturating_duration_since(self.shared.run_start)
            .as_secs() as usize;
        if second == self.current_second && !force {
            return;
        }
        let b = self.rx.take_second();
        self.shared.rx_bytes.fetch_add(b.bytes, Ordering::Relaxed);
        if b.packets > 0 || b.expected > 0 {
            if let Ok(mut t) = self.shared.timeline.lock() {
                t.add(self.current_second, &b);
            }
        }
        self.current_second = second;
        let _ = self.publishes();
    }
}

fn loopback(a: SocketAddr) -> bool {
    a.ip().is_loopback()
}
