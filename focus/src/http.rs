//! The focus's HTTP listener: `/healthz` for orchestration, `/metrics` for Prometheus.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::metrics::Metrics;

/// What the HTTP handlers need: metrics, and whether the focus can take calls (`Err` says
/// why not).
#[derive(Clone)]
pub struct HttpState {
    pub metrics: Arc<Metrics>,
    pub health: Arc<dyn Fn() -> Result<(), String> + Send + Sync>,
}

pub fn router(state: HttpState, extra: Option<Router>) -> Router {
    let base = Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .with_state(state);
    match extra {
        Some(r) => base.merge(r),
        None => base,
    }
}

async fn healthz(State(s): State<HttpState>) -> impl IntoResponse {
    match (s.health)() {
        Ok(()) => (StatusCode::OK, "ok\n".to_string()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    }
}

async fn metrics(State(s): State<HttpState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
}

/// Bind and serve until the returned task is aborted.
pub async fn serve(
    addr: SocketAddr,
    state: HttpState,
    extra: Option<Router>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "http listening");
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router(state, extra)).await {
            tracing::error!(error = %e, "http server failed");
        }
    }))
}
