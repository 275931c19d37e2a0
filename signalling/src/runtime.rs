//! The I/O edge: login, `/sync`, joins, `sendToDevice`, persistence, clocks. Three tasks:
//!
//! - **sync**: long-polls `/sync`, joins rooms it is invited to, hands each batch to the core
//!   and persists `next_batch` only once the core says the batch's events were handed over.
//! - **core**: owns the [`Router`]; feeds it batches, focus commands and timer ticks; delivers
//!   events to the focus (bounded channel; while the focus lags, no further batch is taken, so
//!   the backlog stays on the homeserver) and passes sends to the sender.
//! - **sender**: `PUT /sendToDevice`, one request at a time per leg (a negotiate never overtakes
//!   the answer of the same leg), several legs in parallel, bounded retries with backoff.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ruma::api::client::sync::sync_events::v3::{InvitedRoom, State};
use ruma::serde::Raw;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tracing::{debug, error, info, warn};

use crate::appservice::{AppserviceTask, AppserviceTokens, Transaction};
use crate::client::{ClientError, MatrixClient, SyncFilter, SyncResponse};
use crate::ids::{CallId, DeviceId, RoomId, SessionId, UserId};
use crate::leg::{LegCommand, LegEvent};
use crate::metrics::Metrics;
use crate::room::{CALL_TYPES, MEMBER_TYPES, ROOM_MEMBER};
use crate::router::{Output, Router, RouterConfig};
use crate::store::{Persisted, Store};
use crate::wire::{DropReason, Identity, OutgoingToDevice};

/// Configuration of [`start`]. [`SignallingConfig::new`] fills in the defaults.
#[derive(Clone)]
pub struct SignallingConfig {
    /// E.g. `http://127.0.0.1:8008`.
    pub homeserver_url: String,
    pub user_id: UserId,
    /// Used for `m.login.password` when there is no usable access token.
    pub password: Option<String>,
    /// Used when there is no stored token (its device is learned from `/account/whoami`).
    pub access_token: Option<String>,
    /// Device to log in as; default: the stored one, else a new one chosen by the homeserver.
    pub device_id: Option<DeviceId>,
    /// weir's session id on the wire (`sender_session_id`); default `"sfu"`.
    pub session_id: SessionId,
    /// Where credentials, device, filter and sync token are kept.
    pub state_dir: PathBuf,
    /// Server names whose users may open legs and whose users' invites are accepted; empty = any.
    pub allowed_servers: Vec<String>,
    /// How long an event that jumped ahead in `seq` waits for the gap; default 1 s.
    pub reorder_timeout: Duration,
    /// How long an invite refused for missing/stale room state is held for that state to
    /// arrive (see `RouterConfig::auth_grace`); default 3 s.
    pub auth_grace: Duration,
    /// `/sync` long-poll timeout; default 30 s.
    pub sync_timeout: Duration,
    /// Capacity of the event channel to the focus; default 1024.
    pub event_queue: usize,
    /// Capacity of the command queue from the focus; default 1024.
    pub command_queue: usize,
    /// Most to-device sends queued (all legs together); default 4096.
    pub send_queue: usize,
    /// Most sends in flight at once (different legs); default 8.
    pub max_parallel_sends: usize,
    /// How long [`SignallingHandle::shutdown`] waits for queued sends; default 5 s.
    pub shutdown_flush_timeout: Duration,
    /// On shutdown, send `m.call.hangup` (`user_hangup`) on every leg still open; default true.
    pub hangup_on_shutdown: bool,
    /// Join rooms weir is invited to; default true.
    pub auto_join: bool,
    /// How long [`start`] keeps retrying an unreachable homeserver; default 30 s.
    pub startup_timeout: Duration,
    /// Longest wait between retries of a failing `/sync`; default 30 s.
    pub max_backoff: Duration,
    /// Run as an application service with these tokens: the homeserver pushes transactions
    /// (fed through [`SignallingHandle::appservice_inbox`]) instead of the focus syncing.
    pub appservice: Option<AppserviceTokens>,
}

impl std::fmt::Debug for SignallingConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignallingConfig")
            .field("homeserver_url", &self.homeserver_url)
            .field("user_id", &self.user_id)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field(
                "access_token",
                &self.access_token.as_ref().map(|_| "<redacted>"),
            )
            .field("device_id", &self.device_id)
            .field("session_id", &self.session_id)
            .field("state_dir", &self.state_dir)
            .field("allowed_servers", &self.allowed_servers)
            .field("reorder_timeout", &self.reorder_timeout)
            .finish_non_exhaustive()
    }
}

impl SignallingConfig {
    pub fn new(
        homeserver_url: impl Into<String>,
        user_id: UserId,
        state_dir: impl Into<PathBuf>,
    ) -> Self {
        Self {
            homeserver_url: homeserver_url.into(),
            user_id,
            password: None,
            access_token: None,
            device_id: None,
            session_id: SessionId::from("sfu"),
            state_dir: state_dir.into(),
            allowed_servers: Vec::new(),
            reorder_timeout: Duration::from_secs(1),
            auth_grace: Duration::from_secs(3),
            sync_timeout: Duration::from_secs(30),
            event_queue: 1024,
            command_queue: 1024,
            send_queue: 4096,
            max_parallel_sends: 8,
            shutdown_flush_timeout: Duration::from_secs(5),
            hangup_on_shutdown: true,
            auto_join: true,
            startup_timeout: Duration::from_secs(30),
            max_backoff: Duration::from_secs(30),
            appservice: None,
        }
    }
}

/// Why [`start`] failed.
#[derive(Debug, thiserror::Error)]
pub enum SignallingError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("homeserver: {0}")]
    Client(#[from] ClientError),
    #[error("no usable credentials: {0}")]
    Auth(String),
    #[error("state directory: {0}")]
    State(#[from] std::io::Error),
    #[error("metrics registration: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// Handle to the running signalling side.
pub struct SignallingHandle {
    cmd_tx: mpsc::Sender<LegCommand>,
    shutdown_tx: Option<oneshot::Sender<()>>,
    core: tokio::task::JoinHandle<()>,
    ready: Arc<AtomicBool>,
    user_id: UserId,
    device_id: DeviceId,
    metrics: Metrics,
    /// Where the homeserver's transactions go, in appservice mode.
    appservice: Option<mpsc::Sender<Transaction>>,
}

/// Transactions from the homeserver waiting for the appservice task. Each is acknowledged
/// only once handled, so the homeserver rarely has more than one in flight.
const TRANSACTION_QUEUE: usize = 16;

impl SignallingHandle {
    /// In appservice mode: where the HTTP endpoint hands the homeserver's transactions.
    pub fn appservice_inbox(&self) -> Option<mpsc::Sender<Transaction>> {
        self.appservice.clone()
    }

    /// Queues a command. Never blocks: when the queue is full the command is dropped and
    /// counted (`weir_todevice_dropped_total{reason="queue_full"}`).
    pub fn send(&self, cmd: LegCommand) {
        if let Err(e) = self.cmd_tx.try_send(cmd) {
            let call = match &e {
                mpsc::error::TrySendError::Full(c) | mpsc::error::TrySendError::Closed(c) => {
                    c.leg().call_id.clone()
                }
            };
            warn!(%call, closed = matches!(e, mpsc::error::TrySendError::Closed(_)), "command queue full; dropped");
            self.metrics.drop(DropReason::QueueFull);
        }
    }

    pub fn user_id(&self) -> &UserId {
        &self.user_id
    }

    pub fn device_id(&self) -> &DeviceId {
        &self.device_id
    }

    /// Logged in and the first sync has been processed.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Stops syncing, handles the commands already queued, hangs up open legs (if configured),
    /// flushes queued sends for at most `shutdown_flush_timeout`, then returns.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown_tx.take() {
            let _ = tx.send(());
        }
        if let Err(e) = (&mut self.core).await {
            error!(error = %e, "signalling core task failed");
        }
    }
}

fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The sync filter: to-device (not filterable), invites, and for joined rooms only the state
/// and timeline events of the types the router tracks. No presence, account data, receipts or
/// typing.
pub fn sync_filter() -> Value {
    let types: Vec<&str> = std::iter::once(ROOM_MEMBER)
        .chain(CALL_TYPES)
        .chain(MEMBER_TYPES)
        .collect();
    json!({
        "presence": {"not_types": ["*"]},
        "account_data": {"not_types": ["*"]},
        "room": {
            "state": {"types": types, "lazy_load_members": false},
            "timeline": {"types": types, "limit": 100},
            "ephemeral": {"not_types": ["*"]},
            "account_data": {"not_types": ["*"]},
            "include_leave": false
        }
    })
}

/// The `/sync` filter of the focus as an application service: its device's to-device messages
/// only (room events are pushed).
pub fn to_device_filter() -> Value {
    json!({
        "presence": {"not_types": ["*"]},
        "account_data": {"not_types": ["*"]},
        "room": {
            "rooms": [],
            "state": {"not_types": ["*"]},
            "timeline": {"not_types": ["*"]},
            "ephemeral": {"not_types": ["*"]},
            "account_data": {"not_types": ["*"]},
            "include_leave": false
        }
    })
}

/// Retries `f` on transient errors until `deadline`.
async fn retry_until<T, F, Fut>(deadline: Instant, what: &str, mut f: F) -> Result<T, ClientError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ClientError>>,
{
    let mut backoff = Duration::from_millis(250);
    loop {
        match f().await {
            Err(e) if e.is_transient() && Instant::now() + backoff < deadline => {
                warn!(error = %e, what, "homeserver request failed; retrying");
                tokio::time::sleep(
                    e.retry_after()
                        .unwrap_or(backoff)
                        .min(Duration::from_secs(10)),
                )
                .await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            r => return r,
        }
    }
}

/// The display name of a device the focus creates by logging in.
const DEVICE_NAME: &str = "weir focus";

/// Logs in (or reuses a token) and returns (user, device, token).
async fn authenticate(
    cfg: &SignallingConfig,
    client: &MatrixClient,
    stored: &Persisted,
    deadline: Instant,
) -> Result<(UserId, DeviceId, String), SignallingError> {
    let want_device = cfg.device_id.clone().or_else(|| stored.device_id.clone());
    // 1. The stored token, if it belongs to the configured user and device.
    if let (Some(token), Some(dev)) = (&stored.access_token, &stored.device_id) {
        if cfg.device_id.as_ref().is_none_or(|d| d == dev) {
            client.set_token(Some(token.clone()));
            match retry_until(deadline, "whoami", || client.whoami()).await {
                Ok(w)
                    if w.user_id == cfg.user_id
                        && w.device_id.as_ref().is_none_or(|d| d == dev) =>
                {
                    info!(user = %w.user_id, device = %dev, "reusing stored access token");
                    return Ok((w.user_id, dev.clone(), token.clone()));
                }
                Ok(w) => {
                    warn!(user = %w.user_id, "stored token belongs to another user or device; ignoring it")
                }
                Err(e) if e.is_unknown_token() => {
                    info!("stored access token no longer valid; logging in again")
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    // 2. A configured token.
    if let Some(token) = &cfg.access_token {
        client.set_token(Some(token.clone()));
        match retry_until(deadline, "whoami", || client.whoami()).await {
            Ok(w) if w.user_id == cfg.user_id => {
                let dev = w
                    .device_id
                    .or_else(|| cfg.device_id.clone())
                    .ok_or_else(|| {
                        SignallingError::Auth(
                            "whoami returned no device_id and none is configured".into(),
                        )
                    })?;
                info!(user = %w.user_id, device = %dev, "using configured access token");
                return Ok((w.user_id, dev, token.clone()));
            }
            Ok(w) => {
                return Err(SignallingError::Auth(format!(
                    "access token is for {}, not {}",
                    w.user_id, cfg.user_id
                )))
            }
            Err(e) if e.is_unknown_token() && cfg.password.is_some() => {
                warn!("configured access token rejected; falling back to password login")
            }
            Err(e) => return Err(e.into()),
        }
    }
    // 3. Password login, keeping the device.
    let Some(password) = &cfg.password else {
        return Err(SignallingError::Auth(
            "no valid access token and no password".into(),
        ));
    };
    client.set_token(None);
    let r = retry_until(deadline, "login", || {
        client.login_password(
            cfg.user_id.as_str(),
            password,
            want_device.as_deref(),
            DEVICE_NAME,
        )
    })
    .await?;
    info!(user = %r.user_id, device = %r.device_id, "logged in with password");
    Ok((r.user_id, r.device_id, r.access_token))
}

/// Starts the signalling side: authenticates, prepares the sync filter, and spawns the sync,
/// core and sender tasks on the current tokio runtime. Events for the focus arrive on the
/// returned receiver.
pub async fn start(
    config: SignallingConfig,
    registry: &prometheus::Registry,
) -> Result<(SignallingHandle, mpsc::Receiver<LegEvent>), SignallingError> {
    if config.event_queue == 0
        || config.command_queue == 0
        || config.send_queue == 0
        || config.max_parallel_sends == 0
    {
        return Err(SignallingError::Config("queue sizes must be > 0".into()));
    }
    let metrics = Metrics::new(registry)?;
    if let Some(tokens) = config.appservice.clone() {
        return start_appservice(config, tokens, metrics).await;
    }
    let store = Store::open(&config.state_dir)?;
    let stored = store
        .load_lenient()?
        .filter(|p| {
            p.homeserver_url == config.homeserver_url && p.user_id.as_ref() == Some(&config.user_id)
        })
        .unwrap_or_default();
    let client = MatrixClient::new(&config.homeserver_url)?;
    let deadline = Instant::now() + config.startup_timeout;
    let (user_id, device_id, token) = authenticate(&config, &client, &stored, deadline).await?;
    client.set_token(Some(token.clone()));

    let mut persisted = Persisted {
        homeserver_url: config.homeserver_url.clone(),
        user_id: Some(user_id.clone()),
        device_id: Some(device_id.clone()),
        access_token: Some(token),
        ..Default::default()
    };
    if stored.device_id.as_ref() == Some(&device_id) {
        // Same device: its to-device inbox position is still valid.
        persisted.next_batch = stored.next_batch.clone();
        persisted.filter_id = stored.filter_id.clone();
        persisted.filter_json = stored.filter_json.clone();
    }
    let filter = sync_filter();
    let filter_json = filter.to_string();
    if persisted.filter_id.is_none()
        || persisted.filter_json.as_deref() != Some(filter_json.as_str())
    {
        let id = retry_until(deadline, "filter", || {
            let filter = serde_json::from_value(filter.clone())
                .map_err(|e| ClientError::Request(format!("sync filter: {e}")));
            let client = &client;
            let user_id = &user_id;
            async move { client.create_filter(user_id, filter?).await }
        })
        .await?;
        persisted.filter_id = Some(id);
        persisted.filter_json = Some(filter_json);
    }
    store.save(&persisted)?;
    info!(user = %user_id, device = %device_id, session = %config.session_id,
        resume = persisted.next_batch.is_some(), "signalling starting");
    Ok(spawn(
        config,
        client,
        user_id,
        device_id,
        metrics,
        Source::Sync { store, persisted },
    ))
}

/// Where the core's batches come from.
enum Source {
    /// `/sync`, resuming from the stored position.
    Sync { store: Store, persisted: Persisted },
    /// The homeserver's transactions (appservice mode), and a to-device-only `/sync` of the
    /// focus's device beside them.
    Appservice {
        transactions: mpsc::Receiver<Transaction>,
        store: Store,
        persisted: Persisted,
        device_client: MatrixClient,
    },
}

/// The focus as an application service: its device made (or kept) with the as_token, then
/// the same core, fed by transactions instead of `/sync`.
async fn start_appservice(
    config: SignallingConfig,
    tokens: AppserviceTokens,
    metrics: Metrics,
) -> Result<(SignallingHandle, mpsc::Receiver<LegEvent>), SignallingError> {
    let service = MatrixClient::new(&config.homeserver_url)?.as_appservice(tokens.as_token.clone());
    let deadline = Instant::now() + config.startup_timeout;
    let localpart = config
        .user_id
        .as_str()
        .trim_start_matches('@')
        .split(':')
        .next()
        .unwrap_or_default()
        .to_owned();
    retry_until(deadline, "appservice register", || {
        service.register_appservice_user(&localpart)
    })
    .await?;
    let session = retry_until(deadline, "appservice login", || {
        service.login_appservice(
            config.user_id.as_str(),
            config.device_id.as_deref(),
            DEVICE_NAME,
        )
    })
    .await?;
    info!(user = %session.user_id, device = %session.device_id, session = %config.session_id,
        "signalling starting as an application service");
    // From here on the focus is its device, as a logged-in client is: its token serves the
    // joins, state reads, sends and the to-device-only /sync (resuming where it stopped).
    let client = MatrixClient::new(&config.homeserver_url)?;
    client.set_token(Some(session.access_token.clone()));
    let device_client = client.clone();
    let store = Store::open(&config.state_dir)?;
    let stored = store
        .load_lenient()?
        .filter(|p| {
            p.homeserver_url == config.homeserver_url
                && p.user_id.as_ref() == Some(&session.user_id)
                && p.device_id.as_ref() == Some(&session.device_id)
        })
        .unwrap_or_default();
    let filter = to_device_filter();
    let filter_json = filter.to_string();
    let mut persisted = Persisted {
        homeserver_url: config.homeserver_url.clone(),
        user_id: Some(session.user_id.clone()),
        device_id: Some(session.device_id.clone()),
        access_token: Some(session.access_token.clone()),
        next_batch: stored.next_batch.clone(),
        ..Default::default()
    };
    if stored.filter_json.as_deref() == Some(filter_json.as_str()) {
        persisted.filter_id = stored.filter_id.clone();
        persisted.filter_json = stored.filter_json.clone();
    } else {
        let user = session.user_id.clone();
        let id = retry_until(deadline, "filter", || {
            let f = serde_json::from_value(filter.clone())
                .map_err(|e| ClientError::Request(format!("to-device filter: {e}")));
            let (c, u) = (&device_client, &user);
            async move { c.create_filter(u, f?).await }
        })
        .await?;
        persisted.filter_id = Some(id);
        persisted.filter_json = Some(filter_json);
        persisted.next_batch = None;
    }
    store.save(&persisted)?;
    let (tx, rx) = mpsc::channel(TRANSACTION_QUEUE);
    let (mut handle, events) = spawn(
        config,
        client,
        session.user_id,
        session.device_id,
        metrics,
        Source::Appservice {
            transactions: rx,
            store,
            persisted,
            device_client,
        },
    );
    handle.appservice = Some(tx);
    Ok((handle, events))
}

/// The router and the three tasks around it, fed by `source`.
fn spawn(
    config: SignallingConfig,
    client: MatrixClient,
    user_id: UserId,
    device_id: DeviceId,
    metrics: Metrics,
    source: Source,
) -> (SignallingHandle, mpsc::Receiver<LegEvent>) {
    let me = Identity {
        user_id: user_id.clone(),
        device_id: device_id.clone(),
        session_id: config.session_id.clone(),
    };
    let mut rcfg = RouterConfig::new(me);
    rcfg.allowed_servers = config.allowed_servers.clone();
    rcfg.reorder_timeout = config.reorder_timeout;
    rcfg.auth_grace = config.auth_grace;
    let router = Router::new(rcfg, metrics.clone(), (Instant::now(), unix_ms_now()));

    let (event_tx, event_rx) = mpsc::channel(config.event_queue);
    let (cmd_tx, cmd_rx) = mpsc::channel(config.command_queue);
    let (batch_tx, batch_rx) = mpsc::channel::<(SyncBatch, oneshot::Sender<()>)>(1);
    let (send_tx, send_rx) = mpsc::channel::<OutgoingToDevice>(config.send_queue);
    let (stop_tx, stop_rx) = watch::channel(false);
    let (shutdown_tx, shutdown_rx) = oneshot::channel();
    let ready = Arc::new(AtomicBool::new(false));

    let sync_handle = match source {
        Source::Sync { store, persisted } => tokio::spawn(
            SyncTask::new(
                client.clone(),
                store,
                persisted,
                config.clone(),
                user_id.clone(),
                metrics.clone(),
                batch_tx,
                stop_rx.clone(),
            )
            .run(),
        ),
        Source::Appservice {
            transactions,
            store,
            persisted,
            device_client,
        } => {
            let pushed = tokio::spawn(
                AppserviceTask {
                    client: client.clone(),
                    user_id: user_id.clone(),
                    device_id: device_id.clone(),
                    allowed_servers: config.allowed_servers.clone(),
                    auto_join: config.auto_join,
                    batch_tx: batch_tx.clone(),
                    stop: stop_rx.clone(),
                    transactions,
                    seen: VecDeque::new(),
                    joined: HashSet::new(),
                    metrics: metrics.clone(),
                }
                .run(),
            );
            // Rooms are pushed; this sync carries the device's to-device messages only, and
            // joins nothing.
            let mut cfg = config.clone();
            cfg.auto_join = false;
            let synced = tokio::spawn(
                SyncTask::new(
                    device_client,
                    store,
                    persisted,
                    cfg,
                    user_id.clone(),
                    metrics.clone(),
                    batch_tx,
                    stop_rx.clone(),
                )
                .run(),
            );
            tokio::spawn(async move {
                let _ = tokio::join!(pushed, synced);
            })
        }
    };
    let sender = SenderTask::new(
        client.clone(),
        metrics.clone(),
        config.max_parallel_sends,
        config.send_queue,
    );
    let sender_handle = tokio::spawn(sender.run(send_rx));
    let (refresh_tx, refresh_rx) = mpsc::channel(REFRESH_QUEUE);
    let core = Core {
        router,
        client: client.clone(),
        refresh_tx,
        refresh_rx: Some(refresh_rx),
        generations: HashMap::new(),
        metrics: metrics.clone(),
        event_tx,
        send_tx,
        pending: VecDeque::new(),
        acks: Vec::new(),
        ready: ready.clone(),
        cfg: config,
    };
    let core_handle = tokio::spawn(core.run(
        cmd_rx,
        batch_rx,
        shutdown_rx,
        stop_tx,
        sync_handle,
        sender_handle,
    ));
    (
        SignallingHandle {
            cmd_tx,
            shutdown_tx: Some(shutdown_tx),
            core: core_handle,
            ready,
            user_id,
            device_id,
            metrics,
            appservice: None,
        },
        event_rx,
    )
}

/// One `/sync` response as the core reads it: each event as JSON, judged on its own by the
/// router's parsers (a malformed event is dropped and counted there, never the batch).
#[derive(Default)]
pub(crate) struct SyncBatch {
    pub joined: Vec<JoinedBatch>,
    pub left: Vec<RoomId>,
    pub to_device: Vec<Value>,
    pub full_state: bool,
}

/// A joined room's part of a batch: its state section, then its timeline.
pub(crate) struct JoinedBatch {
    pub room: RoomId,
    pub state: Vec<Value>,
    pub timeline: Vec<Value>,
}

/// The events of a response as JSON values. ruma already holds each as valid JSON, so the
/// conversion cannot fail short of a bug; an event that somehow does is skipped.
fn to_values<T>(events: Vec<Raw<T>>) -> Vec<Value> {
    events
        .into_iter()
        .filter_map(|e| serde_json::from_str(e.json().get()).ok())
        .collect()
}

impl SyncBatch {
    fn from_response(r: SyncResponse, full_state: bool) -> Self {
        let joined = r
            .rooms
            .join
            .into_iter()
            .map(|(room, data)| {
                let mut timeline = to_values(data.timeline.events);
                let state = match data.state {
                    State::Before(s) => to_values(s.events),
                    // Not asked for (`use_state_after` stays false); should a server send it
                    // anyway, it is the state at the end of the timeline, so it goes last.
                    State::After(s) => {
                        timeline.extend(to_values(s.events));
                        Vec::new()
                    }
                    _ => Vec::new(),
                };
                JoinedBatch {
                    room,
                    state,
                    timeline,
                }
            })
            .collect();
        SyncBatch {
            joined,
            left: r.rooms.leave.into_keys().collect(),
            to_device: to_values(r.to_device.events),
            full_state,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// sync task

struct SyncTask {
    client: MatrixClient,
    store: Store,
    persisted: Persisted,
    cfg: SignallingConfig,
    user_id: UserId,
    metrics: Metrics,
    batch_tx: mpsc::Sender<(SyncBatch, oneshot::Sender<()>)>,
    stop: watch::Receiver<bool>,
    /// Rooms we were invited to and failed to join yet → attempts.
    joins: HashMap<RoomId, u32>,
    /// Joined rooms whose full state we fetched once (see [`SyncTask::complete_new_rooms`]).
    known_rooms: HashSet<RoomId>,
}

const MAX_JOIN_ATTEMPTS: u32 = 5;
/// The sync long-poll while joins wait for a retry: the retry pace (a second apart, five tries
/// at most), instead of the usual 30 s park.
const JOIN_RETRY_SYNC_TIMEOUT: Duration = Duration::from_secs(1);

impl SyncTask {
    #[allow(clippy::too_many_arguments)]
    fn new(
        client: MatrixClient,
        store: Store,
        persisted: Persisted,
        cfg: SignallingConfig,
        user_id: UserId,
        metrics: Metrics,
        batch_tx: mpsc::Sender<(SyncBatch, oneshot::Sender<()>)>,
        stop: watch::Receiver<bool>,
    ) -> Self {
        SyncTask {
            client,
            store,
            persisted,
            cfg,
            user_id,
            metrics,
            batch_tx,
            stop,
            joins: HashMap::new(),
            known_rooms: HashSet::new(),
        }
    }

    async fn run(mut self) {
        let mut first = true;
        let mut backoff = Duration::from_millis(500);
        while !*self.stop.borrow() {
            self.metrics.sync_requests.inc();
            let timeout = if first {
                Duration::ZERO
            } else if !self.joins.is_empty() {
                JOIN_RETRY_SYNC_TIMEOUT // joins are retried after each sync: don't park
            } else {
                self.cfg.sync_timeout
            };
            let since = self.persisted.next_batch.clone();
            let req = self.client.sync(
                since.as_deref(),
                self.persisted.filter_id.clone().map(SyncFilter::FilterId),
                timeout,
                first,
            );
            let res = tokio::select! {
                r = req => r,
                _ = self.stop.changed() => break,
            };
            let response = match res {
                Ok(v) => v,
                Err(e) => {
                    self.metrics.sync_errors.inc();
                    warn!(error = %e, backoff_ms = backoff.as_millis() as u64, "sync failed");
                    if e.is_unknown_token() {
                        self.relogin().await;
                    }
                    let wait = e.retry_after().unwrap_or(backoff).min(self.cfg.max_backoff);
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = self.stop.changed() => break,
                    }
                    backoff = (backoff * 2).min(self.cfg.max_backoff);
                    continue;
                }
            };
            backoff = Duration::from_millis(500);
            if self.cfg.auto_join {
                self.handle_invites(&response.rooms.invite).await;
            }
            let next_batch = response.next_batch.clone();
            let mut batch = SyncBatch::from_response(response, first);
            if !first {
                self.complete_new_rooms(&mut batch.joined).await;
            } else {
                self.known_rooms
                    .extend(batch.joined.iter().map(|j| j.room.clone()));
            }
            let (done_tx, done_rx) = oneshot::channel();
            if self.batch_tx.send((batch, done_tx)).await.is_err() {
                break;
            }
            tokio::select! {
                r = done_rx => if r.is_err() { break },
                _ = self.stop.changed() => break,
            }
            first = false;
            self.persisted.next_batch = Some(next_batch);
            let store = self.store.clone();
            let state = self.persisted.clone();
            match tokio::task::spawn_blocking(move || store.save(&state)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => error!(error = %e, "could not persist sync token"),
                Err(e) => error!(error = %e, "persist task failed"),
            }
        }
        debug!("sync task stopped");
    }

    /// A room that appears joined for the first time after the first sync is one we just
    /// joined: its full state is fetched and added to its `state` events. Over federation
    /// Synapse joins with partial state and completes it by state resolution, so members that
    /// joined before us (another focus, for instance) may never reach us through `/sync`.
    /// The fetched events go before the sync's own, so anything newer in the batch still wins.
    async fn complete_new_rooms(&mut self, joined: &mut [JoinedBatch]) {
        for j in joined.iter_mut() {
            if self.known_rooms.contains(&j.room) {
                continue;
            }
            match self.client.room_state(&j.room).await {
                Ok(events) => {
                    info!(id = %j.room, n = events.len(), "fetched the state of a newly joined room");
                    let mut state = to_values(events);
                    state.append(&mut j.state);
                    j.state = state;
                    self.known_rooms.insert(j.room.clone());
                }
                Err(e) => {
                    warn!(id = %j.room, error = %e, "could not fetch a new room's state; relying on sync")
                }
            }
        }
    }

    async fn relogin(&mut self) {
        let Some(password) = &self.cfg.password else {
            error!("access token rejected and no password configured; sync keeps failing");
            return;
        };
        match self
            .client
            .login_password(
                self.user_id.as_str(),
                password,
                self.persisted.device_id.as_deref(),
                DEVICE_NAME,
            )
            .await
        {
            Ok(r) => {
                info!(device = %r.device_id, "logged in again after token loss");
                self.client.set_token(Some(r.access_token.clone()));
                self.persisted.access_token = Some(r.access_token);
                if self.persisted.device_id.as_ref() != Some(&r.device_id) {
                    self.persisted.device_id = Some(r.device_id);
                    self.persisted.next_batch = None;
                }
                let _ = self.store.save(&self.persisted);
            }
            Err(e) => warn!(error = %e, "re-login failed"),
        }
    }

    /// Joins rooms from `rooms.invite` (only from allowed servers, if restricted) and retries
    /// earlier failed joins a bounded number of times.
    async fn handle_invites(&mut self, invites: &BTreeMap<RoomId, InvitedRoom>) {
        for (room, inv) in invites {
            let room = room.clone();
            // Who invited us: the sender of our own member event in the stripped state.
            let inviter = inv.invite_state.events.iter().find_map(|e| {
                let ty = e.get_field::<String>("type").ok().flatten();
                let key = e.get_field::<String>("state_key").ok().flatten();
                (ty.as_deref() == Some(ROOM_MEMBER)
                    && key.as_deref() == Some(self.user_id.as_str()))
                .then(|| e.get_field::<UserId>("sender").ok().flatten())
                .flatten()
            });
            let allowed = self.cfg.allowed_servers.is_empty()
                || inviter.as_ref().is_some_and(|u| {
                    let server = u.server_name().as_str();
                    self.cfg.allowed_servers.iter().any(|a| a == server)
                });
            if allowed {
                self.joins.entry(room).or_insert(0);
            } else {
                info!(%room, inviter = ?inviter.as_ref().map(|u| u.as_str()), "declining invite from a server not allowed");
                if let Err(e) = self.client.leave(&room).await {
                    warn!(%room, error = %e, "could not decline invite");
                }
            }
        }
        let pending: Vec<RoomId> = self.joins.keys().cloned().collect();
        for room in pending {
            match self.client.join(&room).await {
                Ok(()) => {
                    info!(%room, "joined room");
                    self.joins.remove(&room);
                }
                Err(e) => {
                    let attempts = self.joins.get_mut(&room).map(|a| {
                        *a += 1;
                        *a
                    });
                    warn!(%room, error = %e, ?attempts, "join failed");
                    // Over federation the resident server the homeserver asks may not have
                    // our invite yet and answers 403: worth a few more tries too.
                    let retry = e.is_transient() || e.is_forbidden();
                    if !retry || attempts.unwrap_or(0) >= MAX_JOIN_ATTEMPTS {
                        self.joins.remove(&room);
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// core task

/// Room-state refreshes in flight at once; more are dropped (the held invite is then judged on
/// what sync brought).
const REFRESH_QUEUE: usize = 16;
/// A refresh whose room changed in `/sync` while it was in flight may be older than what the
/// router knows; it is fetched again, at most this many times in a row.
const MAX_REFRESH_TRIES: u32 = 3;

/// A room's full state, fetched when the room's sync generation was `generation`.
struct Refreshed {
    room: RoomId,
    events: Vec<Value>,
    generation: u64,
    tries: u32,
}

struct Core {
    router: Router,
    /// For room-state refreshes the router asks for.
    client: MatrixClient,
    refresh_tx: mpsc::Sender<Refreshed>,
    /// Taken by `run` (its results come back here).
    refresh_rx: Option<mpsc::Receiver<Refreshed>>,
    /// Per room, how many sync batches touched it: a refresh result is applied only if none
    /// did while it was fetched, so an older `/state` never overwrites newer sync events
    /// (a member's `invite` replacing their `join` would end their call).
    generations: HashMap<RoomId, u64>,
    metrics: Metrics,
    event_tx: mpsc::Sender<LegEvent>,
    send_tx: mpsc::Sender<OutgoingToDevice>,
    /// Events the focus has not taken yet (bounded by one sync batch).
    pending: VecDeque<LegEvent>,
    /// Batches whose events are all in `pending` or delivered; acknowledged when it drains.
    acks: Vec<oneshot::Sender<()>>,
    ready: Arc<AtomicBool>,
    cfg: SignallingConfig,
}

impl Core {
    async fn run(
        mut self,
        mut cmd_rx: mpsc::Receiver<LegCommand>,
        mut batch_rx: mpsc::Receiver<(SyncBatch, oneshot::Sender<()>)>,
        mut shutdown_rx: oneshot::Receiver<()>,
        stop_tx: watch::Sender<bool>,
        sync_handle: tokio::task::JoinHandle<()>,
        sender_handle: tokio::task::JoinHandle<()>,
    ) {
        let mut batches_open = true;
        let (_, idle) = mpsc::channel(1);
        let mut refresh_rx = self.refresh_rx.take().unwrap_or(idle);
        let event_tx = self.event_tx.clone();
        loop {
            let deadline = self.router.poll_timeout();
            let sleep_until = deadline.map(tokio::time::Instant::from_std);
            tokio::select! {
                biased;
                _ = &mut shutdown_rx => break,
                permit = event_tx.reserve(), if !self.pending.is_empty() => {
                    match permit {
                        Ok(p) => {
                            if let Some(ev) = self.pending.pop_front() {
                                p.send(ev);
                            }
                        }
                        Err(_) => {
                            warn!(dropped = self.pending.len(), "focus event receiver closed");
                            self.pending.clear();
                        }
                    }
                    self.ack_if_drained();
                }
                cmd = cmd_rx.recv() => match cmd {
                    Some(cmd) => {
                        self.router.handle_command(cmd, Instant::now());
                        self.drain_outputs();
                    }
                    // Every handle is gone: nobody can send commands or shut us down.
                    None => break,
                },
                Some(r) = refresh_rx.recv() => {
                    let now_gen = self.generations.get(&r.room).copied().unwrap_or(0);
                    if now_gen != r.generation {
                        debug!(room = %r.room, "room changed while its state was fetched: fetching again");
                        if r.tries < MAX_REFRESH_TRIES {
                            self.spawn_refresh(r.room, r.tries + 1);
                        }
                    } else if self.router.rooms().joined_rooms().any(|j| j == &r.room) {
                        debug!(room = %r.room, n = r.events.len(), "room state refreshed");
                        self.router.handle_room_state(&r.room, &r.events, Instant::now());
                        self.drain_outputs();
                    }
                }
                batch = batch_rx.recv(), if self.pending.is_empty() && batches_open => match batch {
                    Some(b) => self.apply_batch(b),
                    None => batches_open = false,
                },
                _ = async { if let Some(t) = sleep_until { tokio::time::sleep_until(t).await } }, if sleep_until.is_some() => {
                    self.router.handle_timeout(Instant::now());
                    self.drain_outputs();
                }
            }
        }
        // Shutdown.
        let _ = stop_tx.send(true);
        let now = Instant::now();
        while let Ok(cmd) = cmd_rx.try_recv() {
            self.router.handle_command(cmd, now);
        }
        if self.cfg.hangup_on_shutdown {
            let n = self.router.hangup_all("user_hangup", now);
            if n > 0 {
                info!(legs = n, "hung up open legs on shutdown");
            }
        }
        self.drain_outputs();
        drop(self.send_tx);
        if tokio::time::timeout(self.cfg.shutdown_flush_timeout, sender_handle)
            .await
            .is_err()
        {
            warn!("sends still queued at shutdown were abandoned");
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), sync_handle).await;
        info!("signalling stopped");
    }

    fn apply_batch(&mut self, (batch, done): (SyncBatch, oneshot::Sender<()>)) {
        let now = Instant::now();
        let full_state = batch.full_state;
        for j in batch.joined {
            *self.generations.entry(j.room.clone()).or_default() += 1;
            self.router
                .handle_joined_room(&j.room, &j.state, &j.timeline, full_state, now);
        }
        for room in batch.left {
            self.generations.remove(&room);
            self.router.handle_room_left(&room, now);
        }
        for ev in batch.to_device {
            self.router.handle_to_device(ev, now);
        }
        self.drain_outputs();
        if full_state {
            self.ready.store(true, Ordering::Release);
            info!(
                rooms = self.router.rooms().joined_rooms().count(),
                "first sync processed; ready"
            );
        }
        self.acks.push(done);
        self.ack_if_drained();
    }

    /// Fetch a room's full state in the background; the result comes back through
    /// `refresh_rx` tagged with the room's sync generation at the time of asking.
    fn spawn_refresh(&self, room: RoomId, tries: u32) {
        let (client, tx) = (self.client.clone(), self.refresh_tx.clone());
        if tx.capacity() == 0 {
            return;
        }
        let generation = self.generations.get(&room).copied().unwrap_or(0);
        tokio::spawn(async move {
            match client.room_state(&room).await {
                Ok(events) => {
                    let _ = tx.try_send(Refreshed {
                        room,
                        events: to_values(events),
                        generation,
                        tries,
                    });
                }
                Err(e) => warn!(%room, error = %e, "room state refresh failed"),
            }
        });
    }

    fn ack_if_drained(&mut self) {
        if self.pending.is_empty() {
            for a in self.acks.drain(..) {
                let _ = a.send(());
            }
        }
    }

    fn drain_outputs(&mut self) {
        while let Some(out) = self.router.poll_output() {
            match out {
                Output::Event(ev) => {
                    if self.pending.is_empty() {
                        match self.event_tx.try_send(ev) {
                            Ok(()) => {}
                            Err(mpsc::error::TrySendError::Full(ev)) => self.pending.push_back(ev),
                            Err(mpsc::error::TrySendError::Closed(_)) => {}
                        }
                    } else {
                        self.pending.push_back(ev);
                    }
                }
                Output::RefreshRoom(room) => self.spawn_refresh(room, 1),
                Output::Send(s) => {
                    if let Err(e) = self.send_tx.try_send(s) {
                        let s = match e {
                            mpsc::error::TrySendError::Full(s)
                            | mpsc::error::TrySendError::Closed(s) => s,
                        };
                        warn!(event_type = s.event_type, call = %s.call_id, "send queue full; dropped");
                        self.metrics.drop(DropReason::QueueFull);
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// sender task

struct SenderTask {
    client: MatrixClient,
    metrics: Metrics,
    max_parallel: usize,
    max_queued: usize,
    boot: String,
    txn_counter: u64,
    queues: HashMap<CallId, VecDeque<(OutgoingToDevice, String)>>,
    in_flight: HashSet<CallId>,
    ready: VecDeque<CallId>,
    queued: usize,
}

const SEND_ATTEMPTS: u32 = 5;

impl SenderTask {
    fn new(client: MatrixClient, metrics: Metrics, max_parallel: usize, max_queued: usize) -> Self {
        Self {
            client,
            metrics,
            max_parallel,
            max_queued,
            boot: format!("{:016x}", rand::random::<u64>()),
            txn_counter: 0,
            queues: HashMap::new(),
            in_flight: HashSet::new(),
            ready: VecDeque::new(),
            queued: 0,
        }
    }

    fn enqueue(&mut self, out: OutgoingToDevice) {
        if self.queued >= self.max_queued {
            warn!(event_type = out.event_type, call = %out.call_id, "send queue full; dropped");
            self.metrics.drop(DropReason::QueueFull);
            return;
        }
        self.txn_counter += 1;
        let txn = format!("weir.{}.{}", self.boot, self.txn_counter);
        let call = out.call_id.clone();
        let q = self.queues.entry(call.clone()).or_default();
        let was_idle = q.is_empty() && !self.in_flight.contains(&call);
        q.push_back((out, txn));
        self.queued += 1;
        if was_idle {
            self.ready.push_back(call);
        }
    }

    async fn run(mut self, mut rx: mpsc::Receiver<OutgoingToDevice>) {
        let mut jobs: JoinSet<CallId> = JoinSet::new();
        let mut open = true;
        loop {
            while jobs.len() < self.max_parallel {
                let Some(call) = self.ready.pop_front() else {
                    break;
                };
                let Some((out, txn)) = self.queues.get_mut(&call).and_then(VecDeque::pop_front)
                else {
                    continue;
                };
                self.queued -= 1;
                self.in_flight.insert(call.clone());
                let client = self.client.clone();
                let metrics = self.metrics.clone();
                jobs.spawn(async move {
                    send_with_retries(&client, &metrics, &out, &txn).await;
                    out.call_id
                });
            }
            if !open && jobs.is_empty() && self.queued == 0 {
                break;
            }
            tokio::select! {
                msg = rx.recv(), if open => match msg {
                    Some(out) => self.enqueue(out),
                    None => open = false,
                },
                Some(done) = jobs.join_next(), if !jobs.is_empty() => {
                    let call = match done {
                        Ok(c) => c,
                        Err(e) => { error!(error = %e, "send job failed"); continue; }
                    };
                    self.in_flight.remove(&call);
                    if self.queues.get(&call).is_some_and(|q| !q.is_empty()) {
                        self.ready.push_back(call);
                    } else {
                        self.queues.remove(&call);
                    }
                }
            }
        }
    }
}

async fn send_with_retries(
    client: &MatrixClient,
    metrics: &Metrics,
    out: &OutgoingToDevice,
    txn: &str,
) {
    let messages = match out.messages() {
        Ok(m) => m,
        Err(e) => {
            error!(event_type = out.event_type, call = %out.call_id, error = %e, "could not serialise; not sent");
            return metrics.drop(DropReason::SendFailed);
        }
    };
    let mut backoff = Duration::from_millis(250);
    for attempt in 1..=SEND_ATTEMPTS {
        match client
            .send_to_device(out.event_type, txn, messages.clone())
            .await
        {
            Ok(()) => {
                metrics.sent.with_label_values(&[out.event_type]).inc();
                debug!(event_type = out.event_type, call = %out.call_id, to = %out.to_user, "sent");
                return;
            }
            Err(e) if e.is_transient() && attempt < SEND_ATTEMPTS => {
                warn!(event_type = out.event_type, call = %out.call_id, attempt, error = %e, "send failed; retrying");
                tokio::time::sleep(
                    e.retry_after()
                        .unwrap_or(backoff)
                        .min(Duration::from_secs(10)),
                )
                .await;
                backoff *= 2;
            }
            Err(e) => {
                error!(event_type = out.event_type, call = %out.call_id, error = %e, "send failed; giving up");
                metrics.drop(if e.status() == Some(413) {
                    DropReason::TooLarge
                } else {
                    DropReason::SendFailed
                });
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_keeps_only_call_state_types() {
        let f = sync_filter();
        let types: Vec<&str> = f["room"]["state"]["types"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(
            types,
            [
                "m.room.member",
                "org.matrix.msc3401.call",
                "m.call",
                "org.matrix.msc3401.call.member",
                "m.call.member"
            ]
        );
        assert_eq!(f["room"]["timeline"]["types"], f["room"]["state"]["types"]);
        assert_eq!(f["presence"]["not_types"], json!(["*"]));
        assert_eq!(f["room"]["ephemeral"]["not_types"], json!(["*"]));
        assert_eq!(f["account_data"]["not_types"], json!(["*"]));
    }

    #[test]
    fn config_debug_redacts_secrets() {
        let mut c = SignallingConfig::new("http://hs", "@sfu:hs".try_into().unwrap(), "/tmp/x");
        c.password = Some("hunter2".into());
        c.access_token = Some("syt_secret".into());
        let s = format!("{c:?}");
        assert!(!s.contains("hunter2") && !s.contains("syt_secret"), "{s}");
        assert_eq!(c.session_id.as_str(), "sfu");
        assert_eq!(c.reorder_timeout, Duration::from_secs(1));
    }

    #[test]
    fn sender_keeps_per_leg_order_and_bounds_the_queue() {
        let client = MatrixClient::new("http://127.0.0.1:9").unwrap();
        let mut s = SenderTask::new(client, Metrics::unregistered().unwrap(), 2, 3);
        let out = |call: &str, ty: &'static str| OutgoingToDevice {
            event_type: ty,
            to_user: "@u:hs".try_into().unwrap(),
            to_device: "D".into(),
            call_id: call.into(),
            content: json!({}),
        };
        s.enqueue(out("a", "m.call.answer"));
        s.enqueue(out("a", "m.call.negotiate"));
        s.enqueue(out("b", "m.call.answer"));
        s.enqueue(out("c", "m.call.answer"));
        assert_eq!(s.metrics.dropped_count(DropReason::QueueFull), 1);
        // Leg "a" is ready once, with its answer ahead of its negotiate.
        assert_eq!(
            s.ready,
            VecDeque::from([CallId::from("a"), CallId::from("b")])
        );
        let q: Vec<&str> = s.queues[&CallId::from("a")]
            .iter()
            .map(|(o, _)| o.event_type)
            .collect();
        assert_eq!(q, ["m.call.answer", "m.call.negotiate"]);
        let txns: HashSet<&String> = s.queues.values().flatten().map(|(_, t)| t).collect();
        assert_eq!(txns.len(), 3, "transaction ids are unique");
    }
}
