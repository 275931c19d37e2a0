//! The core task: owns the [`Router`]; feeds it batches, focus commands and timer ticks;
//! delivers events to the focus (bounded channel; while the focus lags, no further batch is
//! taken, so the backlog stays on the homeserver) and passes sends to the sender.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use crate::client::MatrixClient;
use crate::ids::RoomId;
use crate::leg::{LegCommand, LegEvent};
use crate::metrics::Metrics;
use crate::router::{Output, Router};
use crate::wire::{DropReason, OutgoingToDevice};

use super::{to_values, SignallingConfig, SyncBatch};

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

pub(super) struct Core {
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
    pub(super) fn new(
        router: Router,
        client: MatrixClient,
        metrics: Metrics,
        event_tx: mpsc::Sender<LegEvent>,
        send_tx: mpsc::Sender<OutgoingToDevice>,
        ready: Arc<AtomicBool>,
        cfg: SignallingConfig,
    ) -> Self {
        let (refresh_tx, refresh_rx) = mpsc::channel(REFRESH_QUEUE);
        Core {
            router,
            client,
            refresh_tx,
            refresh_rx: Some(refresh_rx),
            generations: HashMap::new(),
            metrics,
            event_tx,
            send_tx,
            pending: VecDeque::new(),
            acks: Vec::new(),
            ready,
            cfg,
        }
    }

    pub(super) async fn run(
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
