//! The homeserver's side of the focus as an application service: `PUT
//! /_matrix/app/v1/transactions/{txnId}` on the focus's HTTP listener, authenticated by the
//! registration's `hs_token`. Each transaction goes to signalling (`weir_signalling::appservice`)
//! and is acknowledged once its events were taken, so the homeserver holds and retries what
//! the focus has not handled (docs/appservice.md).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, put};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};
use weir_signalling::Transaction;

/// How long a transaction may take to be handled before the homeserver is told to retry.
const HANDLE_WAIT: Duration = Duration::from_secs(60);

#[derive(Clone)]
struct AsState {
    hs_token: Arc<str>,
    user_id: Arc<str>,
    inbox: mpsc::Sender<Transaction>,
}

impl AsState {
    fn authorised(
        &self,
        headers: &HeaderMap,
        query: &std::collections::HashMap<String, String>,
    ) -> bool {
        let given =
            crate::http::bearer(headers).or_else(|| query.get("access_token").map(String::as_str));
        crate::http::token_matches(given, &self.hs_token)
    }
}

/// The appservice routes, for `http::serve`'s extra routes.
pub fn routes(hs_token: &str, user_id: &str, inbox: mpsc::Sender<Transaction>) -> Router {
    let state = AsState {
        hs_token: hs_token.into(),
        user_id: user_id.into(),
        inbox,
    };
    Router::new()
        .route("/_matrix/app/v1/transactions/{txn}", put(transaction))
        .route("/transactions/{txn}", put(transaction))
        .route("/_matrix/app/v1/users/{user}", get(user_query))
        .with_state(state)
}

fn forbidden() -> (StatusCode, Json<Value>) {
    (
        StatusCode::FORBIDDEN,
        Json(json!({"errcode": "M_FORBIDDEN", "error": "wrong or missing hs_token"})),
    )
}

async fn transaction(
    State(s): State<AsState>,
    headers: HeaderMap,
    Query(query): Query<std::collections::HashMap<String, String>>,
    Path(txn): Path<String>,
    body: Json<Value>,
) -> impl IntoResponse {
    if !s.authorised(&headers, &query) {
        return forbidden();
    }
    let (done, taken) = oneshot::channel();
    let t = Transaction {
        id: txn,
        body: body.0,
        done,
    };
    let busy = || {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"errcode": "M_UNKNOWN", "error": "the focus is busy or stopping; retry"})),
        )
    };
    if s.inbox.send_timeout(t, HANDLE_WAIT).await.is_err() {
        return busy();
    }
    match tokio::time::timeout(HANDLE_WAIT, taken).await {
        Ok(Ok(())) => (StatusCode::OK, Json(json!({}))),
        _ => busy(),
    }
}

/// The homeserver asks whether a user of our namespace exists: only the focus's own.
async fn user_query(
    State(s): State<AsState>,
    headers: HeaderMap,
    Query(query): Query<std::collections::HashMap<String, String>>,
    Path(user): Path<String>,
) -> impl IntoResponse {
    if !s.authorised(&headers, &query) {
        return forbidden();
    }
    if user == *s.user_id {
        (StatusCode::OK, Json(json!({})))
    } else {
        (
            StatusCode::NOT_FOUND,
            Json(json!({"errcode": "M_NOT_FOUND", "error": "not a user of this focus"})),
        )
    }
}
