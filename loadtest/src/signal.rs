//! How a participant's to-device events reach the focus and back: through a Matrix homeserver
//! (what real clients do), or the focus's direct HTTP endpoint that skips the homeserver. Each
//! participant gets one sender task (events leave in order, so `seq` arrives in order) and one
//! receive loop (long-poll), both cheap and both ended by the run's cancel signal.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tracing::{debug, warn};

use weir_signalling::client::{MatrixClient, Session};

use crate::matrix::{self, SYNC_TIMEOUT_MS};

/// Outgoing events queued per participant before the participant waits. Signalling is a handful
/// of events per participant, so this only fills if the homeserver stalls.
const OUT_QUEUE: usize = 64;
/// Incoming events queued per participant.
const IN_QUEUE: usize = 256;
/// Attempts per outgoing event before it is given up (and counted).
const SEND_ATTEMPTS: u32 = 4;
/// Pause after a failed long-poll, so a down server is not hammered.
const POLL_BACKOFF: Duration = Duration::from_millis(500);

/// Where a participant's signalling goes.
#[derive(Clone)]
pub enum Transport {
    /// Through the participant's homeserver, with weir's Matrix client signed in as it.
    Matrix {
        client: MatrixClient,
        session: Session,
    },
    Direct {
        http: reqwest::Client,
        base: String,
        token: String,
        user_id: String,
        device_id: String,
    },
}

impl Transport {
    pub fn user_id(&self) -> &str {
        match self {
            Transport::Matrix { session, .. } => session.user_id.as_str(),
            Transport::Direct { user_id, .. } => user_id,
        }
    }

    pub fn device_id(&self) -> &str {
        match self {
            Transport::Matrix { session, .. } => session.device_id.as_str(),
            Transport::Direct { device_id, .. } => device_id,
        }
    }
}

/// An event to send to the focus device.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub event_type: &'static str,
    pub content: Value,
}

/// An event received for this participant's device.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub event_type: String,
    pub content: Value,
}

/// Signalling counters of the whole run.
#[derive(Debug, Default)]
pub struct SignalCounters {
    pub sent: AtomicU64,
    pub send_failures: AtomicU64,
    pub received: AtomicU64,
    pub poll_failures: AtomicU64,
}

/// Addressing of the focus.
#[derive(Debug, Clone)]
pub struct FocusAddress {
    pub user_id: String,
    pub device_id: String,
}

/// Start the sender task and receive loop of one participant. The sender task ends once every
/// queued event is sent and the returned sender is dropped; await its handle to flush.
pub fn spawn(
    transport: Transport,
    focus: FocusAddress,
    conf_id: String,
    counters: Arc<SignalCounters>,
    cancel: watch::Receiver<bool>,
) -> (
    mpsc::Sender<Outgoing>,
    mpsc::Receiver<Incoming>,
    tokio::task::JoinHandle<()>,
) {
    let (out_tx, out_rx) = mpsc::channel(OUT_QUEUE);
    let (in_tx, in_rx) = mpsc::channel(IN_QUEUE);
    let sender = tokio::spawn(send_loop(
        transport.clone(),
        focus,
        conf_id,
        out_rx,
        counters.clone(),
    ));
    tokio::spawn(receive_loop(transport, in_tx, counters, cancel));
    (out_tx, in_rx, sender)
}

async fn send_loop(
    t: Transport,
    focus: FocusAddress,
    conf_id: String,
    mut rx: mpsc::Receiver<Outgoing>,
    counters: Arc<SignalCounters>,
) {
    let mut n: u64 = 0;
    let txn_base = format!("wl{}", crate::call::gen_id(0, 10));
    // Ends when the participant drops its sender (after its hangup is queued).
    while let Some(ev) = rx.recv().await {
        n += 1;
        let txn = format!("{txn_base}.{n}");
        let mut ok = false;
        for attempt in 0..SEND_ATTEMPTS {
            let r = match &t {
                Transport::Matrix { client, .. } => {
                    match matrix::to_one_device(&focus.user_id, &focus.device_id, &ev.content) {
                        Ok(messages) => client
                            .send_to_device(ev.event_type, &txn, messages)
                            .await
                            .map_err(|e| e.to_string()),
                        Err(e) => Err(e),
                    }
                }
                Transport::Direct {
                    http,
                    base,
                    token,
                    user_id,
                    device_id,
                } => {
                    direct_send(
                        http,
                        base,
                        token,
                        user_id,
                        device_id,
                        &conf_id,
                        ev.event_type,
                        &ev.content,
                    )
                    .await
                }
            };
            match r {
                Ok(()) => {
                    ok = true;
                    break;
                }
                Err(e) => {
                    debug!(attempt, event = ev.event_type, error = %e, "send failed");
                    tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                }
            }
        }
        if ok {
            counters.sent.fetch_add(1, Ordering::Relaxed);
        } else {
            counters.send_failures.fetch_add(1, Ordering::Relaxed);
            warn!(event = ev.event_type, user = t.user_id(), "gave up sending");
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn direct_send(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    user_id: &str,
    device_id: &str,
    conf_id: &str,
    event_type: &str,
    content: &Value,
) -> Result<(), String> {
    let body = json!({
        "user_id": user_id,
        "device_id": device_id,
        "conf_id": conf_id,
        "type": event_type,
        "content": content,
    });
    let r = http
        .post(format!("{base}/direct/v1/events"))
        .bearer_auth(token)
        .json(&body)
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if !r.status().is_success() {
        return Err(format!("HTTP {}", r.status()));
    }
    Ok(())
}

async fn receive_loop(
    t: Transport,
    tx: mpsc::Sender<Incoming>,
    counters: Arc<SignalCounters>,
    mut cancel: watch::Receiver<bool>,
) {
    let mut since: Option<String> = None;
    loop {
        if *cancel.borrow() || tx.is_closed() {
            return;
        }
        let poll = poll_once(&t, since.as_deref());
        let result = tokio::select! {
            r = poll => r,
            _ = cancel.changed() => return,
            _ = tx.closed() => return,
        };
        match result {
            Ok((next, events)) => {
                if next.is_some() {
                    since = next;
                }
                for e in events {
                    counters.received.fetch_add(1, Ordering::Relaxed);
                    if tx.send(e).await.is_err() {
                        return;
                    }
                }
            }
            Err(e) => {
                counters.poll_failures.fetch_add(1, Ordering::Relaxed);
                debug!(error = %e, user = t.user_id(), "long-poll failed");
                tokio::select! {
                    _ = tokio::time::sleep(POLL_BACKOFF) => {}
                    _ = cancel.changed() => return,
                }
            }
        }
    }
}

async fn poll_once(
    t: &Transport,
    since: Option<&str>,
) -> Result<(Option<String>, Vec<Incoming>), String> {
    match t {
        Transport::Matrix { client, .. } => {
            let (next, events) = matrix::sync_to_device(client, since)
                .await
                .map_err(|e| e.to_string())?;
            Ok((
                Some(next),
                events
                    .into_iter()
                    .map(|e| Incoming {
                        event_type: e.event_type,
                        content: e.content,
                    })
                    .collect(),
            ))
        }
        Transport::Direct {
            http,
            base,
            token,
            user_id,
            device_id,
        } => {
            let r = http
                .get(format!("{base}/direct/v1/events"))
                .query(&[
                    ("user_id", user_id.as_str()),
                    ("device_id", device_id.as_str()),
                    ("timeout_ms", &SYNC_TIMEOUT_MS.to_string()),
                ])
                .bearer_auth(token)
                .timeout(Duration::from_millis(SYNC_TIMEOUT_MS) + Duration::from_secs(30))
                .send()
                .await
                .map_err(|e| e.to_string())?;
            if !r.status().is_success() {
                return Err(format!("HTTP {}", r.status()));
            }
            let v: Value = r.json().await.map_err(|e| e.to_string())?;
            let events = v["events"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|e| Incoming {
                            event_type: e["type"].as_str().unwrap_or_default().to_string(),
                            content: e["content"].clone(),
                        })
                        .collect()
                })
                .unwrap_or_default();
            Ok((None, events))
        }
    }
}
