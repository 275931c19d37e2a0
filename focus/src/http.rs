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

/// The bearer token of a request's `Authorization` header, if it has one.
pub fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

/// Whether `given` is `secret`, compared in constant time (a token is the only credential of
/// the direct, admin and appservice endpoints).
pub fn token_matches(given: Option<&str>, secret: &str) -> bool {
    given.is_some_and(|t| {
        t.len() == secret.len()
            && t.bytes()
                .zip(secret.bytes())
                .fold(0u8, |a, (x, y)| a | (x ^ y))
                == 0
    })
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

/// GET `/healthz` of a focus listening on `listen` (its wildcard address asked on loopback),
/// with a plain blocking socket: `weir-focus --healthcheck`. `Err` says why it is not healthy.
pub fn probe_health(listen: SocketAddr, wait: std::time::Duration) -> Result<(), String> {
    use std::io::{Read, Write};
    let mut addr = listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    let mut s = std::net::TcpStream::connect_timeout(&addr, wait)
        .map_err(|e| format!("connecting to {addr}: {e}"))?;
    s.set_read_timeout(Some(wait)).map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(wait)).map_err(|e| e.to_string())?;
    write!(s, "GET /healthz HTTP/1.0\r\nHost: {addr}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut answer = Vec::new();
    s.take(4096)
        .read_to_end(&mut answer)
        .map_err(|e| format!("reading from {addr}: {e}"))?;
    let text = String::from_utf8_lossy(&answer);
    let status = text.split_whitespace().nth(1).unwrap_or("");
    if status == "200" {
        Ok(())
    } else {
        let body = text.split("\r\n\r\n").nth(1).unwrap_or("").trim();
        Err(format!("{addr} answered {status:?}: {body}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn serve_health(
        health: Arc<dyn Fn() -> Result<(), String> + Send + Sync>,
    ) -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let state = HttpState {
            metrics: Arc::new(Metrics::new()),
            health,
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router(state, None)).await;
        });
        (addr, task)
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn the_probe_tells_healthy_from_not() {
        let (ok, a) = serve_health(Arc::new(|| Ok(()))).await;
        let (bad, b) = serve_health(Arc::new(|| Err("draining: no new conferences".into()))).await;
        let wait = std::time::Duration::from_secs(5);
        let r =
            tokio::task::spawn_blocking(move || (probe_health(ok, wait), probe_health(bad, wait)))
                .await
                .unwrap();
        assert_eq!(r.0, Ok(()));
        let e = r.1.unwrap_err();
        assert!(e.contains("503") && e.contains("draining"), "{e}");
        a.abort();
        b.abort();
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        assert!(probe_health(closed, wait).is_err(), "nothing listening");
    }
}
