//! The I/O edge: login, `/sync`, joins, `sendToDevice`, persistence, clocks. Three tasks:
//!
//! - **sync** ([`sync_task`]): long-polls `/sync`, joins rooms it is invited to, hands each
//!   batch to the core and persists `next_batch` only once the core says the batch's events
//!   were handed over.
//! - **core** ([`core`]): owns the [`Router`]; feeds it batches, focus commands and timer
//!   ticks; delivers events to the focus (bounded channel; while the focus lags, no further
//!   batch is taken, so the backlog stays on the homeserver) and passes sends to the sender.
//! - **sender** ([`sender`]): `PUT /sendToDevice`, one request at a time per leg (a negotiate
//!   never overtakes the answer of the same leg), several legs in parallel, bounded retries
//!   with backoff.

mod core;
mod sender;
mod sync_task;

use self::core::Core;
use sender::SenderTask;
use sync_task::SyncTask;

use std::collections::{HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ruma::api::client::sync::sync_events::v3::State;
use ruma::serde::Raw;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{error, info, warn};

use crate::appservice::{AppserviceTask, AppserviceTokens, Transaction};
use crate::client::{ClientError, MatrixClient, SyncResponse};
use crate::ids::{DeviceId, RoomId, SessionId, UserId};
use crate::leg::{LegCommand, LegEvent};
use crate::metrics::Metrics;
use crate::room::{CALL_TYPES, MEMBER_TYPES, ROOM_MEMBER};
use crate::router::{Router, RouterConfig};
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
    let core = Core::new(
        router,
        client.clone(),
        metrics.clone(),
        event_tx,
        send_tx,
        ready.clone(),
        config,
    );
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
}
