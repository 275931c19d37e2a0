//! The operator's API, on a listener of its own (`[admin] listen`, a private address):
//!
//! - `GET  /admin/v1/conferences`: conferences and their participants (signalling state from
//!   the conductor, media state and rates from the media plane), and the drain, if any;
//! - `POST /admin/v1/participants/{peer}/end`, `POST /admin/v1/conferences/{id}/end`: hang up;
//! - `POST /admin/v1/drain` (`{"within_s": N}`, optional): stop taking new conferences and stop
//!   the focus when the last participant leaves, or after N seconds.
//!
//! Every request carries `Authorization: Bearer <admin.token>`. docs/admin.md has examples.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};
use weir_sfu::{PeerId, Sfu};

use crate::conductor::{AdminReply, AdminRequest};

/// How long a listing waits for the media shards' reports.
const REPORT_WAIT: Duration = Duration::from_secs(1);
/// How long any request waits for the conductor.
const CONDUCTOR_WAIT: Duration = Duration::from_secs(5);
/// The default drain deadline when the configuration gives none.
const DEFAULT_DRAIN: Duration = Duration::from_secs(3600);

#[derive(Clone)]
pub struct AdminState {
    token: Arc<str>,
    conductor: mpsc::Sender<AdminRequest>,
    sfu: Arc<Sfu>,
    drain_deadline: Duration,
}

impl AdminState {
    pub fn new(
        token: &str,
        conductor: mpsc::Sender<AdminRequest>,
        sfu: Arc<Sfu>,
        drain_deadline_s: u64,
    ) -> Self {
        AdminState {
            token: token.into(),
            conductor,
            sfu,
            drain_deadline: if drain_deadline_s == 0 {
                DEFAULT_DRAIN
            } else {
                Duration::from_secs(drain_deadline_s)
            },
        }
    }

    fn authorised(&self, headers: &HeaderMap) -> bool {
        crate::http::token_matches(crate::http::bearer(headers), &self.token)
    }

    async fn ask(
        &self,
        make: impl FnOnce(oneshot::Sender<AdminReply>) -> AdminRequest,
    ) -> Result<AdminReply, (StatusCode, Json<Value>)> {
        let (tx, rx) = oneshot::channel();
        let unavailable = || {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"error": "the focus is not answering (stopping?)"})),
            )
        };
        self.conductor
            .send_timeout(make(tx), CONDUCTOR_WAIT)
            .await
            .map_err(|_| unavailable())?;
        tokio::time::timeout(CONDUCTOR_WAIT, rx)
            .await
            .map_err(|_| unavailable())?
            .map_err(|_| unavailable())
    }
}

pub fn routes(state: AdminState) -> Router {
    Router::new()
        .route("/admin/v1/conferences", get(list))
        .route("/admin/v1/participants/{peer}/end", post(end_participant))
        .route("/admin/v1/conferences/{id}/end", post(end_conference))
        .route("/admin/v1/drain", post(drain))
        .with_state(state)
}

fn unauthorised() -> (StatusCode, Json<Value>) {
    (
        StatusCode::UNAUTHORIZED,
        Json(json!({"error": "missing or wrong bearer token"})),
    )
}

fn reply(r: Result<AdminReply, (StatusCode, Json<Value>)>) -> (StatusCode, Json<Value>) {
    match r {
        Ok(r) if r.found => (StatusCode::OK, Json(r.body)),
        Ok(r) => (StatusCode::NOT_FOUND, Json(r.body)),
        Err(e) => e,
    }
}

async fn list(State(s): State<AdminState>, headers: HeaderMap) -> impl IntoResponse {
    if !s.authorised(&headers) {
        return unauthorised();
    }
    let mut r = match s.ask(|reply| AdminRequest::List { reply }).await {
        Ok(r) => r,
        Err(e) => return e,
    };
    // The media plane's view of each participant, joined by peer id.
    let sfu = s.sfu.clone();
    let reports = tokio::task::spawn_blocking(move || sfu.peer_reports(REPORT_WAIT))
        .await
        .unwrap_or_default();
    let by_peer: HashMap<u64, &weir_sfu::PeerReport> =
        reports.iter().map(|r| (r.peer.0, r)).collect();
    if let Some(confs) = r.body["conferences"].as_array_mut() {
        for c in confs {
            if let Some(ps) = c["participants"].as_array_mut() {
                for p in ps {
                    let media = p["peer"].as_u64().and_then(|id| by_peer.get(&id)).map(|m| {
                        json!({
                            "shard": m.shard,
                            "connected": m.connected,
                            "over_tcp": m.over_tcp,
                            "rx_kbps": m.rx_bps / 1000,
                            "tx_kbps": m.tx_bps / 1000,
                            "rx_bytes": m.rx_bytes,
                            "tx_bytes": m.tx_bytes,
                            "estimate_kbps": m.estimate_bps.map(|b| b / 1000),
                            "loss": m.loss,
                            "publishes": m.publishes,
                            "receives": m.receives,
                            "videos_paused": m.videos_paused,
                        })
                    });
                    p["media"] = media.unwrap_or(Value::Null);
                }
            }
        }
    }
    (StatusCode::OK, Json(r.body))
}

async fn end_participant(
    State(s): State<AdminState>,
    headers: HeaderMap,
    Path(peer): Path<u64>,
) -> impl IntoResponse {
    if !s.authorised(&headers) {
        return unauthorised();
    }
    reply(
        s.ask(|reply| AdminRequest::EndParticipant {
            peer: PeerId(peer),
            reply,
        })
        .await,
    )
}

async fn end_conference(
    State(s): State<AdminState>,
    headers: HeaderMap,
    Path(id): Path<u64>,
) -> impl IntoResponse {
    if !s.authorised(&headers) {
        return unauthorised();
    }
    reply(
        s.ask(|reply| AdminRequest::EndConference { id, reply })
            .await,
    )
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DrainBody {
    within_s: Option<u64>,
}

async fn drain(
    State(s): State<AdminState>,
    headers: HeaderMap,
    body: Option<Json<DrainBody>>,
) -> impl IntoResponse {
    if !s.authorised(&headers) {
        return unauthorised();
    }
    let within = body
        .and_then(|b| b.0.within_s)
        .map(Duration::from_secs)
        .unwrap_or(s.drain_deadline);
    reply(s.ask(|reply| AdminRequest::Drain { within, reply }).await)
}

/// Bind the admin listener and serve until the returned task is aborted.
pub async fn serve(
    addr: std::net::SocketAddr,
    state: AdminState,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "admin API listening");
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, routes(state)).await {
            tracing::error!(error = %e, "admin server failed");
        }
    }))
}
