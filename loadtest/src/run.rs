//! One load-test run: measure the floor, set up rooms and accounts (through the homeserver, or
//! nothing in direct mode), start participants at the join rate, measure for the duration,
//! scrape the focus's metrics at both ends, hang up, and gather the reports. Bounded in time
//! (setup cap + duration + a hangup grace) and in count.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use tokio::sync::{watch, Semaphore};
use tracing::{info, warn};

use crate::call::Layout;
use crate::ids::{epoch, PublisherId, RoomIndex};
use crate::impair::Impairment;
use crate::matrix;
use crate::participant::{self, Plan, Shared, Timeline};
use crate::prom;
use crate::report::{FocusCost, RunReport};
use crate::signal::{FocusAddress, SignalCounters, Transport};
use crate::source::{SpeakerSchedule, VideoShape};
use ruma::{OwnedRoomId, OwnedUserId};
use weir_signalling::client::{MatrixClient, Session};

/// Hard cap on participants in one run, whatever the flags say: each is a WebRTC stack and a
/// socket in this process.
pub const MAX_PARTICIPANTS: usize = 2000;
/// Concurrent homeserver requests during setup (registration hashes passwords: CPU-bound on
/// the homeserver, so more does not go faster).
pub const SETUP_CONCURRENCY: usize = 8;
/// A participant on another homeserver joins through federation; its invite can lag the
/// room's creation by a second or two, so a refused join is retried this often...
const JOIN_RETRIES: u32 = 40;
/// ...this far apart (bounded: 40 × 250 ms = 10 s).
const JOIN_RETRY_DELAY: Duration = Duration::from_millis(250);
/// How often a participant of a cascade checks that every focus has joined the room (through
/// its own homeserver) before it publishes its member entry. Bounded by the setup timeout.
const FOCI_JOIN_POLL: Duration = Duration::from_millis(250);
/// After the run, participants get this long to hang up and report.
pub const HANGUP_GRACE: Duration = Duration::from_secs(10);
/// How often the progress line refreshes.
const PROGRESS_TICK: Duration = Duration::from_millis(500);
/// Window over which the progress line's bitrate is computed.
const PROGRESS_WINDOW: Duration = Duration::from_secs(4);

/// Where the focus is reached for signalling.
#[derive(Debug, Clone)]
pub enum Signalling {
    /// Through homeservers: one site, or several (a cascade shape).
    Matrix {
        sites: Vec<Site>,
    },
    Direct {
        url: String,
        token: String,
    },
}

/// One organisation of a cascade: a homeserver and the focus its participants call.
#[derive(Debug, Clone)]
pub struct Site {
    pub homeserver: String,
    pub registration_secret: String,
    pub focus_user: String,
    pub focus_device: String,
    /// The focus's `/metrics` URL (for trunk bandwidth), if given.
    pub metrics: Option<String>,
}

impl Site {
    /// `HOMESERVER_URL,SECRET_FILE,FOCUS_USER,FOCUS_DEVICE[,METRICS_URL]`.
    pub fn parse(spec: &str) -> Result<Site, String> {
        let parts: Vec<&str> = spec.split(',').map(str::trim).collect();
        let (hs, secret_file, user, device, metrics) = match parts.as_slice() {
            [hs, f, u, d] => (hs, f, u, d, None),
            [hs, f, u, d, m] => (hs, f, u, d, Some(m.to_string())),
            _ => {
                return Err(
                    "expected HOMESERVER_URL,SECRET_FILE,FOCUS_USER,FOCUS_DEVICE[,METRICS_URL]"
                        .into(),
                )
            }
        };
        let secret = std::fs::read_to_string(secret_file)
            .map_err(|e| format!("reading {secret_file}: {e}"))?;
        Ok(Site {
            homeserver: hs.to_string(),
            registration_secret: secret.trim().to_string(),
            focus_user: user.to_string(),
            focus_device: device.to_string(),
            metrics,
        })
    }
}

/// The shape and bounds of a run.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub signalling: Signalling,
    pub focus_user: String,
    pub focus_device: String,
    pub focus_session: String,
    /// Where participants' media sockets bind.
    pub local_ip: std::net::IpAddr,
    pub rooms: usize,
    /// Per room: publishers of audio and simulcast video.
    pub publishers: usize,
    /// Per room: publishers of audio only.
    pub audio_publishers: usize,
    /// Per room: participants that only receive.
    pub subscribers: usize,
    pub layout: Layout,
    /// What video publishers send.
    pub video: VideoShape,
    /// Participants started per second.
    pub join_rate: f64,
    pub duration: Duration,
    pub setup_timeout: Duration,
    pub speakers: usize,
    pub speaker_turn: Duration,
    pub uplink: Impairment,
    pub downlink: Impairment,
    /// Share of each room's participants (the first ones) that get the impairment.
    pub impaired_fraction: f64,
    pub focus_metrics: Option<String>,
    pub measure_floor: bool,
    pub seed: u64,
    pub run_id: String,
    pub progress: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0} participants asked for; at most {MAX_PARTICIPANTS} per run")]
    TooMany(usize),
    #[error("nothing to run: no participants")]
    Empty,
    #[error("setup: {0}")]
    Setup(String),
    #[error("measuring the floor: {0}")]
    Floor(#[from] crate::floor::FloorError),
}

struct RoomPlan {
    conf_id: String,
    members: Vec<Member>,
    video: Vec<PublisherId>,
    audio: Vec<PublisherId>,
}

struct Member {
    publisher: PublisherId,
    video: bool,
    audio: bool,
    impaired: bool,
    session_id: String,
}

fn plan_rooms(cfg: &RunConfig) -> Vec<RoomPlan> {
    let mut next = 1u32;
    (0..cfg.rooms)
        .map(|_| {
            let n = cfg.publishers + cfg.audio_publishers + cfg.subscribers;
            let impaired = (n as f64 * cfg.impaired_fraction).round() as usize;
            let mut members = Vec::new();
            for i in 0..n {
                let (video, audio) = if i < cfg.publishers {
                    (true, true)
                } else if i < cfg.publishers + cfg.audio_publishers {
                    (false, true)
                } else {
                    (false, false)
                };
                members.push(Member {
                    publisher: PublisherId(next),
                    video,
                    audio,
                    impaired: i < impaired,
                    session_id: crate::call::gen_id(0, 10),
                });
                next += 1;
            }
            RoomPlan {
                conf_id: crate::call::gen_id(
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_millis())
                        .unwrap_or(0),
                    16,
                ),
                video: members
                    .iter()
                    .filter(|m| m.video)
                    .map(|m| m.publisher)
                    .collect(),
                audio: members
                    .iter()
                    .filter(|m| m.audio)
                    .map(|m| m.publisher)
                    .collect(),
                members,
            }
        })
        .collect()
}

/// Run the load test. `cancel` ends it early (Ctrl-C) with a partial report.
pub async fn run(cfg: RunConfig, cancel_rx: watch::Receiver<bool>) -> Result<RunReport, RunError> {
    let _ = epoch();
    let total = cfg.rooms * (cfg.publishers + cfg.audio_publishers + cfg.subscribers);
    if total > MAX_PARTICIPANTS {
        return Err(RunError::TooMany(total));
    }
    if total == 0 {
        return Err(RunError::Empty);
    }
    let cpu_start = crate::own_cpu_seconds();
    let floor = if cfg.measure_floor {
        let f = tokio::task::spawn_blocking(crate::floor::measure)
            .await
            .map_err(|e| RunError::Setup(e.to_string()))??;
        info!(
            gso_us = f.gso_us,
            gcm_us = f.gcm_us,
            sendto_us = f.sendto_us,
            "floor measured"
        );
        Some(f)
    } else {
        None
    };
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(total + 16)
        .build()
        .map_err(|e| RunError::Setup(e.to_string()))?;
    let rooms = plan_rooms(&cfg);
    let start = Instant::now();
    let setup_deadline = start + cfg.setup_timeout;
    let focus = FocusAddress {
        user_id: cfg.focus_user.clone(),
        device_id: cfg.focus_device.clone(),
    };

    let pb = if cfg.progress {
        let pb = ProgressBar::new(total as u64);
        pb.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} joined {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        pb
    } else {
        ProgressBar::hidden()
    };
    pb.set_message("setting up");

    // ---------------------------------------------------------------- accounts and rooms
    // (homeserver, session, room) of every Matrix participant, to take their member entries
    // out of the room at the end, as a client leaving a call does.
    let mut members_to_remove: Vec<(MatrixClient, Session, OwnedRoomId)> = Vec::new();
    let transports = match &cfg.signalling {
        Signalling::Matrix { sites } => {
            let hss: Vec<MatrixClient> = sites
                .iter()
                .map(|s| MatrixClient::with_http(http.clone(), &s.homeserver))
                .collect();
            let setup = setup_matrix(&cfg, sites, &hss, &rooms, &pb);
            let mut c = cancel_rx.clone();
            let setup = tokio::select! {
                r = tokio::time::timeout_at(setup_deadline.into(), setup) => match r {
                    Ok(r) => r.map_err(RunError::Setup)?,
                    Err(_) => return Err(RunError::Setup(format!("homeserver setup did not finish within {:?}", cfg.setup_timeout))),
                },
                _ = c.changed() => return Err(RunError::Setup("interrupted during setup".into())),
            };
            let (per_room, room_ids) = setup;
            per_room
                .into_iter()
                .zip(room_ids)
                .map(|(sessions, room_id)| {
                    sessions
                        .into_iter()
                        .enumerate()
                        .map(|(i, session)| {
                            let client = hss[i % hss.len()].with_token(&session.access_token);
                            members_to_remove.push((
                                client.clone(),
                                session.clone(),
                                room_id.clone(),
                            ));
                            Transport::Matrix { client, session }
                        })
                        .collect::<Vec<_>>()
                })
                .collect::<Vec<_>>()
        }
        Signalling::Direct { url, token } => rooms
            .iter()
            .map(|r| {
                r.members
                    .iter()
                    .map(|m| Transport::Direct {
                        http: http.clone(),
                        base: url.trim_end_matches('/').to_string(),
                        token: token.clone(),
                        user_id: format!("@wl-{}-{}:direct", cfg.run_id, m.publisher.0),
                        device_id: format!("WL{}", m.publisher.0),
                    })
                    .collect()
            })
            .collect(),
    };
    let setup_s = start.elapsed().as_secs_f64();
    info!(setup_s, "accounts and rooms ready");

    // ---------------------------------------------------------------- participants
    let shared = Arc::new(Shared {
        run_start: start,
        setup_deadline,
        joined: AtomicU64::new(0),
        active: AtomicU64::new(0),
        rx_bytes: AtomicU64::new(0),
        timeline: Mutex::new(Timeline::default()),
        signal: Arc::new(SignalCounters::default()),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    // Ctrl-C (the caller's cancel) also stops participants.
    let interrupted = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let mut c = cancel_rx.clone();
        let stop_tx = stop_tx.clone();
        let interrupted = interrupted.clone();
        tokio::spawn(async move {
            if c.changed().await.is_ok() && *c.borrow() {
                interrupted.store(true, Ordering::Relaxed);
                let _ = stop_tx.send(true);
            }
        });
    }
    let progress = {
        let shared = shared.clone();
        let pb = pb.clone();
        tokio::spawn(async move {
            // Participants add their bytes once a second each, so the rate is taken over a
            // window of several seconds to keep it from jumping.
            let mut window: std::collections::VecDeque<(Instant, u64)> =
                std::collections::VecDeque::new();
            loop {
                tokio::time::sleep(PROGRESS_TICK).await;
                let now = Instant::now();
                let bytes = shared.rx_bytes.load(Ordering::Relaxed);
                window.push_back((now, bytes));
                while window.len() > 1 && now - window[0].0 > PROGRESS_WINDOW {
                    window.pop_front();
                }
                let (t0, b0) = window[0];
                let dt = (now - t0).as_secs_f64();
                let mbps = if dt > 0.0 {
                    bytes.saturating_sub(b0) as f64 * 8.0 / dt / 1e6
                } else {
                    0.0
                };
                pb.set_position(shared.joined.load(Ordering::Relaxed));
                pb.set_message(format!(
                    "active {} rx {:.1} Mbit/s",
                    shared.active.load(Ordering::Relaxed),
                    mbps
                ));
            }
        })
    };

    let interval = Duration::from_secs_f64(1.0 / cfg.join_rate.max(0.01));
    let mut handles = Vec::new();
    let mut next_start = Instant::now();
    let schedule = |room: usize| SpeakerSchedule {
        speakers: cfg.speakers,
        turn_us: cfg.speaker_turn.as_micros() as u64,
        seed: cfg.seed ^ (room as u64).wrapping_mul(0x5851_f42d),
    };
    'start: for (ri, (room, tps)) in rooms.iter().zip(transports).enumerate() {
        for (mi, (m, transport)) in room.members.iter().zip(tps).enumerate() {
            if *stop_rx.borrow() {
                break 'start;
            }
            let plan = Plan {
                publisher: m.publisher,
                room: RoomIndex(ri),
                conf_id: room.conf_id.clone(),
                publish_video: m.video,
                publish_audio: m.audio,
                layout: cfg.layout,
                video: cfg.video,
                room_video: room.video.clone(),
                room_audio: room.audio.clone(),
                speakers: schedule(ri),
                uplink: if m.impaired {
                    cfg.uplink
                } else {
                    Impairment::default()
                },
                downlink: if m.impaired {
                    cfg.downlink
                } else {
                    Impairment::default()
                },
                seed: cfg.seed ^ u64::from(m.publisher.0).wrapping_mul(0x9e37_79b9),
                focus: site_focus(&cfg, mi).unwrap_or_else(|| focus.clone()),
                focus_session: cfg.focus_session.clone(),
                local_ip: cfg.local_ip,
                session_id: m.session_id.clone(),
                far_publishers: far_publishers(&cfg, room, mi),
            };
            let mut c = stop_rx.clone();
            tokio::select! {
                _ = tokio::time::sleep_until(next_start.into()) => {}
                _ = c.changed() => break 'start,
            }
            next_start += interval;
            handles.push(tokio::spawn(participant::run(
                plan,
                transport,
                shared.clone(),
                stop_rx.clone(),
            )));
        }
    }

    // Setup phase: until everyone joined or the cap.
    {
        let mut c = stop_rx.clone();
        loop {
            if shared.joined.load(Ordering::Relaxed) as usize >= handles.len()
                || Instant::now() >= setup_deadline
                || *c.borrow()
            {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = c.changed() => {}
            }
        }
    }
    let measure_start = Instant::now();
    let trunk_start = trunk_bytes(&http, &cfg).await;
    let mut focus_cost = FocusCost::default();
    if let Some(url) = &cfg.focus_metrics {
        match prom::scrape(&http, url).await {
            Ok(s) => focus_cost.start = Some(s),
            Err(e) => warn!(error = %e, "focus metrics at start"),
        }
    }
    {
        let mut c = stop_rx.clone();
        pb.println(format!(
            "{} of {} joined in {:.1}s; measuring for {:?}",
            shared.joined.load(Ordering::Relaxed),
            handles.len(),
            setup_s
                + measure_start
                    .duration_since(start + Duration::from_secs_f64(setup_s))
                    .as_secs_f64(),
            cfg.duration
        ));
        if !*c.borrow() {
            tokio::select! {
                _ = tokio::time::sleep(cfg.duration) => {}
                _ = c.changed() => {}
            }
        }
    }
    let measured = measure_start.elapsed();
    let trunk_end = trunk_bytes(&http, &cfg).await;
    if let Some(url) = &cfg.focus_metrics {
        match prom::scrape(&http, url).await {
            Ok(s) => focus_cost.end = Some(s),
            Err(e) => warn!(error = %e, "focus metrics at end"),
        }
    }
    if let (Some(a), Some(b)) = (focus_cost.start, focus_cost.end) {
        focus_cost.cpu_us_per_forwarded_packet = prom::cpu_us_per_packet(&a, &b);
        focus_cost.forwarded_packets = Some(b.forwarded - a.forwarded);
        focus_cost.cpu_seconds = Some(b.cpu_seconds - a.cpu_seconds);
    }
    let _ = stop_tx.send(true);
    pb.set_message("hanging up");
    let elapsed_s = start.elapsed().as_secs_f64();
    let mut reports = Vec::new();
    let deadline = tokio::time::Instant::now() + HANGUP_GRACE;
    for h in handles {
        let abort = h.abort_handle();
        match tokio::time::timeout_at(deadline, h).await {
            Ok(Ok(r)) => reports.push(r),
            Ok(Err(e)) => warn!(error = %e, "participant task failed"),
            Err(_) => {
                abort.abort();
                warn!("participant did not stop in time");
            }
        }
    }
    leave_calls(members_to_remove).await;
    progress.abort();
    pb.finish_and_clear();
    let timeline = std::mem::take(&mut *shared.timeline.lock().unwrap_or_else(|e| e.into_inner()));
    Ok(RunReport {
        reports,
        rooms: cfg.rooms,
        duration_s: measured.as_secs_f64(),
        elapsed_s,
        setup_s,
        interrupted: interrupted.load(Ordering::Relaxed),
        floor,
        focus: focus_cost,
        loadtest_cpu_s: match (cpu_start, crate::own_cpu_seconds()) {
            (Some(a), Some(b)) => Some(b - a),
            _ => None,
        },
        timeline,
        signal_sent: shared.signal.sent.load(Ordering::Relaxed),
        signal_failures: shared.signal.send_failures.load(Ordering::Relaxed),
        trunk_bytes: match (trunk_start, trunk_end) {
            (Some(a), Some(b)) => Some(b - a),
            _ => None,
        },
    })
}

/// Register every participant, create each room with its call state, join everyone, publish
/// each member's call device, and wait until the focus has joined each room.
/// RTP payload bytes sent onto trunks so far, summed over every focus whose metrics we can
/// read (`--focus-metrics` and each `--site`'s); `None` in a run without a cascade, or if any
/// of them cannot be read (a partial sum would understate the trunks).
async fn trunk_bytes(http: &reqwest::Client, cfg: &RunConfig) -> Option<f64> {
    let Signalling::Matrix { sites } = &cfg.signalling else {
        return None;
    };
    if sites.len() < 2 {
        return None;
    }
    let mut urls: Vec<&String> = cfg.focus_metrics.iter().collect();
    urls.extend(sites[1..].iter().filter_map(|s| s.metrics.as_ref()));
    if urls.len() < sites.len() {
        return None;
    }
    let mut total = 0.0;
    for url in urls {
        match prom::scrape(http, url).await {
            Ok(s) => total += s.trunk_bytes_out,
            Err(e) => {
                warn!(error = %e, %url, "focus metrics for trunk bytes");
                return None;
            }
        }
    }
    Some(total)
}

/// The publishers of `room` on another site than member `index` (none without a cascade).
fn far_publishers(
    cfg: &RunConfig,
    room: &RoomPlan,
    index: usize,
) -> std::collections::BTreeSet<PublisherId> {
    let Signalling::Matrix { sites } = &cfg.signalling else {
        return Default::default();
    };
    let n = sites.len().max(1);
    room.members
        .iter()
        .enumerate()
        .filter(|(i, m)| i % n != index % n && (m.video || m.audio))
        .map(|(_, m)| m.publisher)
        .collect()
}

/// The focus member `index` of a room calls: its site's (members are spread round-robin).
fn site_focus(cfg: &RunConfig, index: usize) -> Option<FocusAddress> {
    let Signalling::Matrix { sites } = &cfg.signalling else {
        return None;
    };
    let site = sites.get(index % sites.len().max(1))?;
    Some(FocusAddress {
        user_id: site.focus_user.clone(),
        device_id: site.focus_device.clone(),
    })
}

/// Take every participant's member entry out of its room (an empty `m.calls`), as a js-sdk
/// client does when it leaves: the foci then see the call end and drop their trunks, instead
/// of waiting an hour for the entries to expire. Bounded by [`HANGUP_GRACE`]; failures are
/// only logged (the entries then expire).
async fn leave_calls(members: Vec<(MatrixClient, Session, OwnedRoomId)>) {
    if members.is_empty() {
        return;
    }
    let sem = Arc::new(Semaphore::new(SETUP_CONCURRENCY));
    let mut tasks = Vec::new();
    for (client, s, room) in members {
        let sem = sem.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await.ok()?;
            client
                .put_state(
                    &room,
                    matrix::CALL_MEMBER_STATE,
                    s.user_id.as_str(),
                    matrix::state_content(&serde_json::json!({"m.calls": []})),
                )
                .await
                .err()
        }));
    }
    let deadline = tokio::time::Instant::now() + HANGUP_GRACE;
    for t in tasks {
        match tokio::time::timeout_at(deadline, t).await {
            Ok(Ok(Some(e))) => warn!(error = %e, "could not remove a member entry"),
            Ok(_) => {}
            Err(_) => {
                warn!("member entries not all removed in time");
                return;
            }
        }
    }
}

async fn setup_matrix(
    cfg: &RunConfig,
    sites: &[Site],
    hss: &[MatrixClient],
    rooms: &[RoomPlan],
    pb: &ProgressBar,
) -> Result<(Vec<Vec<Session>>, Vec<OwnedRoomId>), String> {
    let hs = &hss[0];
    let sem = Arc::new(Semaphore::new(SETUP_CONCURRENCY));
    let password = format!("wl-{}", crate::call::gen_id(0, 16));
    // Register.
    let mut tasks = Vec::new();
    for room in rooms {
        for (mi, m) in room.members.iter().enumerate() {
            let site = mi % sites.len();
            let hs = hss[site].clone();
            let sem = sem.clone();
            let secret = sites[site].registration_secret.clone();
            let password = password.clone();
            let localpart = format!("wl-{}-{}", cfg.run_id, m.publisher.0);
            tasks.push(tokio::spawn(async move {
                let _permit = sem.acquire_owned().await.map_err(|e| e.to_string())?;
                hs.register_with_shared_secret(&secret, &localpart, &password)
                    .await
                    .map_err(|e| e.to_string())
            }));
        }
    }
    let mut sessions = Vec::new();
    let n = tasks.len();
    for (i, t) in tasks.into_iter().enumerate() {
        sessions.push(t.await.map_err(|e| e.to_string())??);
        pb.set_message(format!("registered {}/{n}", i + 1));
    }
    let mut per_room: Vec<Vec<Session>> = Vec::new();
    let mut it = sessions.into_iter();
    for room in rooms {
        per_room.push(it.by_ref().take(room.members.len()).collect());
    }
    // Rooms: create (inviting members and the focus), call state, joins, member state.
    let expires = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
        + matrix::MEMBER_TTL_MS;
    let foci = sites
        .iter()
        .map(|s| {
            OwnedUserId::try_from(s.focus_user.as_str())
                .map_err(|e| format!("focus user {}: {e}", s.focus_user))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut room_ids = Vec::new();
    for (ri, (room, sess)) in rooms.iter().zip(&per_room).enumerate() {
        let creator = &sess[0];
        let creator_client = hs.with_token(&creator.access_token);
        let mut invite: Vec<OwnedUserId> = sess[1..].iter().map(|s| s.user_id.clone()).collect();
        for focus in &foci {
            if !invite.contains(focus) {
                invite.push(focus.clone());
            }
        }
        let room_id = creator_client
            .create_room(matrix::call_room_request(
                &format!("weir-loadtest {} room {ri}", cfg.run_id),
                invite,
            ))
            .await
            .map_err(|e| e.to_string())?;
        creator_client
            .put_state(
                &room_id,
                matrix::CALL_STATE,
                &room.conf_id,
                matrix::state_content(&matrix::call_content()),
            )
            .await
            .map_err(|e| e.to_string())?;
        let mut tasks = Vec::new();
        for (mi, (m, s)) in room.members.iter().zip(sess).enumerate() {
            let site = &sites[mi % sites.len()];
            let client = hss[mi % sites.len()].with_token(&s.access_token);
            let sem = sem.clone();
            let s = s.clone();
            let room_id = room_id.clone();
            let content = matrix::member_content(
                &room.conf_id,
                s.device_id.as_str(),
                &m.session_id,
                expires,
                &site.focus_user,
                &site.focus_device,
                &cfg.focus_session,
            );
            let is_creator = s.user_id == creator.user_id;
            let foci = foci.clone();
            tasks.push(tokio::spawn(async move {
                let _permit = sem.acquire_owned().await.map_err(|e| e.to_string())?;
                if !is_creator {
                    // Over federation the invite may still be on its way: retry a while.
                    let mut tries = 0;
                    loop {
                        match client.join(&room_id).await {
                            Ok(()) => break,
                            Err(e) if tries < JOIN_RETRIES => {
                                tries += 1;
                                tracing::debug!(error = %e, tries, "join failed; retrying");
                                tokio::time::sleep(JOIN_RETRY_DELAY).await;
                            }
                            Err(e) => return Err(e.to_string()),
                        }
                    }
                }
                // In a cascade, announce ourselves only once our own homeserver sees every
                // focus in the room: a server sends an event to the servers it knows are in
                // the room, so a focus whose server joins later would never receive our
                // member entry (federation does not relay it) and would refuse its trunk.
                if foci.len() > 1 {
                    loop {
                        let members = client
                            .joined_members(&room_id)
                            .await
                            .map_err(|e| e.to_string())?;
                        if foci.iter().all(|f| members.contains(f)) {
                            break;
                        }
                        tokio::time::sleep(FOCI_JOIN_POLL).await;
                    }
                }
                client
                    .put_state(
                        &room_id,
                        matrix::CALL_MEMBER_STATE,
                        s.user_id.as_str(),
                        matrix::state_content(&content),
                    )
                    .await
                    .map_err(|e| e.to_string())
            }));
        }
        for t in tasks {
            t.await.map_err(|e| e.to_string())??;
        }
        pb.set_message(format!("room {}/{} ready", ri + 1, rooms.len()));
        room_ids.push(room_id);
    }
    // Every focus must be in each room (it joins on invite) before it can authorise anyone.
    for (room_id, sess) in room_ids.iter().zip(&per_room) {
        loop {
            let members = hs
                .with_token(&sess[0].access_token)
                .joined_members(room_id)
                .await
                .map_err(|e| e.to_string())?;
            if foci.iter().all(|f| members.contains(f)) {
                break;
            }
            pb.set_message("waiting for the focus to join");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    Ok((per_room, room_ids))
}

/// Register one account (e.g. the focus's) with the shared secret; used by `register`.
pub async fn register_one(
    homeserver: &str,
    secret: &str,
    localpart: &str,
    password: &str,
) -> Result<Session, String> {
    let hs = MatrixClient::new(homeserver).map_err(|e| e.to_string())?;
    hs.register_with_shared_secret(secret, localpart, password)
        .await
        .map_err(|e| e.to_string())
}

/// Files `--json` and `--plot` write to.
#[derive(Debug, Clone, Default)]
pub struct Outputs {
    pub json: Option<PathBuf>,
    pub plot: Option<PathBuf>,
}
