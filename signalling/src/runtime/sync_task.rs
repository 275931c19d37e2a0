//! The sync task: long-polls `/sync`, joins rooms it is invited to, hands each batch to the
//! core and persists `next_batch` only once the core says the batch's events were handed over.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use ruma::api::client::sync::sync_events::v3::InvitedRoom;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, error, info, warn};

use crate::client::{MatrixClient, SyncFilter};
use crate::ids::{RoomId, UserId};
use crate::metrics::Metrics;
use crate::room::ROOM_MEMBER;
use crate::store::{Persisted, Store};

use super::{to_values, JoinedBatch, SignallingConfig, SyncBatch, DEVICE_NAME};

pub(super) struct SyncTask {
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
    pub(super) fn new(
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

    pub(super) async fn run(mut self) {
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
