//! The few client-server API calls weir makes, over reqwest. Hand-written on purpose
//! (docs/decisions.md): there is no `/keys/*` call here, so the focus device never has keys.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::ids::{DeviceId, RoomId, UserId};

/// A failed request.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("HTTP request failed: {0}")]
    Http(#[from] reqwest::Error),
    #[error("homeserver answered {status} {errcode}: {error}")]
    Status {
        status: u16,
        errcode: String,
        error: String,
        retry_after_ms: Option<u64>,
    },
    #[error("unexpected response: {0}")]
    Response(String),
}

impl ClientError {
    /// Worth retrying: transport errors, timeouts, 5xx and 429.
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Http(e) => !e.is_builder(),
            ClientError::Status { status, .. } => *status == 429 || *status >= 500,
            ClientError::Response(_) => false,
        }
    }

    /// The homeserver refused the request as forbidden (403).
    pub fn is_forbidden(&self) -> bool {
        matches!(self, ClientError::Status { status: 403, .. })
    }

    /// The access token is not (or no longer) valid.
    pub fn is_unknown_token(&self) -> bool {
        matches!(self, ClientError::Status { status: 401, .. })
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ClientError::Status {
                retry_after_ms: Some(ms),
                ..
            } => Some(Duration::from_millis(*ms)),
            _ => None,
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Status { status, .. } => Some(*status),
            ClientError::Http(e) => e.status().map(|s| s.as_u16()),
            ClientError::Response(_) => None,
        }
    }
}

/// Percent-encodes one path segment (everything but RFC 3986 unreserved characters).
pub fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[derive(Debug, Deserialize)]
pub struct LoginResponse {
    pub user_id: UserId,
    pub access_token: String,
    pub device_id: DeviceId,
}

#[derive(Debug, Deserialize)]
pub struct Whoami {
    pub user_id: UserId,
    #[serde(default)]
    pub device_id: Option<DeviceId>,
}

/// A homeserver client holding (a replaceable) access token.
#[derive(Clone)]
pub struct MatrixClient {
    http: reqwest::Client,
    base: String,
    token: Arc<RwLock<Option<String>>>,
}

impl std::fmt::Debug for MatrixClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MatrixClient")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on a room-state fetch: long enough for a partial-state join to finish resyncing over
/// federation, short enough that a stuck homeserver does not hold up sync for long.
const ROOM_STATE_TIMEOUT: Duration = Duration::from_secs(20);

impl MatrixClient {
    pub fn new(homeserver_url: &str) -> Result<Self, ClientError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("weir-signalling/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            http,
            base: homeserver_url.trim_end_matches('/').to_owned(),
            token: Arc::new(RwLock::new(None)),
        })
    }

    pub fn set_token(&self, token: Option<String>) {
        if let Ok(mut t) = self.token.write() {
            *t = token;
        }
    }

    fn token(&self) -> Option<String> {
        self.token.read().ok().and_then(|t| t.clone())
    }

    fn url(&self, path: &str) -> String {
        format!("{}/_matrix/client/v3{}", self.base, path)
    }

    async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<Value, ClientError> {
        let mut req = self.http.request(method, self.url(path)).timeout(timeout);
        if !query.is_empty() {
            req = req.query(query);
        }
        if let Some(t) = self.token() {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(b);
        }
        let resp = req.send().await?;
        let status = resp.status();
        let bytes = resp.bytes().await?;
        if status.is_success() {
            return serde_json::from_slice(&bytes)
                .map_err(|e| ClientError::Response(format!("{path}: {e}")));
        }
        let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Err(ClientError::Status {
            status: status.as_u16(),
            errcode: v
                .get("errcode")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned(),
            error: v
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("")
                .chars()
                .take(200)
                .collect(),
            retry_after_ms: v.get("retry_after_ms").and_then(Value::as_u64),
        })
    }

    fn parse<T: serde::de::DeserializeOwned>(v: Value, what: &str) -> Result<T, ClientError> {
        serde_json::from_value(v).map_err(|e| ClientError::Response(format!("{what}: {e}")))
    }

    /// `POST /login` with `m.login.password`. Passing `device_id` keeps the same device.
    pub async fn login_password(
        &self,
        user: &UserId,
        password: &str,
        device_id: Option<&DeviceId>,
    ) -> Result<LoginResponse, ClientError> {
        let mut body = json!({
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": user},
            "password": password,
            "initial_device_display_name": "weir focus",
        });
        if let Some(d) = device_id {
            body["device_id"] = json!(d);
        }
        let v = self
            .request(
                reqwest::Method::POST,
                "/login",
                &[],
                Some(body.to_string().into_bytes()),
                REQUEST_TIMEOUT,
            )
            .await?;
        Self::parse(v, "login")
    }

    /// `GET /account/whoami`.
    pub async fn whoami(&self) -> Result<Whoami, ClientError> {
        let v = self
            .request(
                reqwest::Method::GET,
                "/account/whoami",
                &[],
                None,
                REQUEST_TIMEOUT,
            )
            .await?;
        Self::parse(v, "whoami")
    }

    /// `POST /user/{id}/filter`; returns the filter id.
    pub async fn create_filter(
        &self,
        user: &UserId,
        filter: &Value,
    ) -> Result<String, ClientError> {
        let path = format!("/user/{}/filter", encode_segment(user.as_str()));
        let v = self
            .request(
                reqwest::Method::POST,
                &path,
                &[],
                Some(filter.to_string().into_bytes()),
                REQUEST_TIMEOUT,
            )
            .await?;
        v.get("filter_id")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| ClientError::Response("filter: no filter_id".into()))
    }

    /// `GET /sync`. The response is returned raw: the runtime picks it apart leniently.
    pub async fn sync(
        &self,
        since: Option<&str>,
        filter: Option<&str>,
        timeout: Duration,
        full_state: bool,
    ) -> Result<Value, ClientError> {
        let mut q = vec![
            ("timeout", timeout.as_millis().to_string()),
            ("set_presence", "offline".to_owned()),
        ];
        if let Some(s) = since {
            q.push(("since", s.to_owned()));
        }
        if let Some(f) = filter {
            q.push(("filter", f.to_owned()));
        }
        if full_state {
            q.push(("full_state", "true".to_owned()));
        }
        self.request(
            reqwest::Method::GET,
            "/sync",
            &q,
            None,
            timeout + REQUEST_TIMEOUT,
        )
        .await
    }

    /// `GET /rooms/{room}/state`: the room's full current state. For a room joined over
    /// federation with partial state (Synapse's faster joins), Synapse answers only once the
    /// state is complete, which `/sync` may never show as events (members that were omitted
    /// from the join arrive by state resolution, not in a timeline).
    pub async fn room_state(&self, room: &RoomId) -> Result<Vec<Value>, ClientError> {
        let v = self
            .request(
                reqwest::Method::GET,
                &format!("/rooms/{}/state", encode_segment(room.as_str())),
                &[],
                None,
                ROOM_STATE_TIMEOUT,
            )
            .await?;
        match v {
            Value::Array(events) => Ok(events),
            _ => Err(ClientError::Response("room state: not an array".into())),
        }
    }

    /// `POST /join/{room}`.
    pub async fn join(&self, room: &RoomId) -> Result<(), ClientError> {
        self.post_empty(&format!("/join/{}", encode_segment(room.as_str())))
            .await
    }

    /// `POST /rooms/{room}/leave` (also declines an invite).
    pub async fn leave(&self, room: &RoomId) -> Result<(), ClientError> {
        self.post_empty(&format!("/rooms/{}/leave", encode_segment(room.as_str())))
            .await
    }

    /// `POST {path}` with an empty JSON object, ignoring the response body.
    async fn post_empty(&self, path: &str) -> Result<(), ClientError> {
        self.request(
            reqwest::Method::POST,
            path,
            &[],
            Some(b"{}".to_vec()),
            REQUEST_TIMEOUT,
        )
        .await?;
        Ok(())
    }

    /// `PUT /sendToDevice/{type}/{txn}` with a pre-serialised body. Re-sending with the same
    /// `txn` is idempotent on the homeserver.
    pub async fn send_to_device(
        &self,
        event_type: &str,
        txn: &str,
        body: Vec<u8>,
    ) -> Result<(), ClientError> {
        let path = format!(
            "/sendToDevice/{}/{}",
            encode_segment(event_type),
            encode_segment(txn)
        );
        self.request(
            reqwest::Method::PUT,
            &path,
            &[],
            Some(body),
            REQUEST_TIMEOUT,
        )
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_segments_are_encoded() {
        assert_eq!(encode_segment("!abc:example.org"), "%21abc%3Aexample.org");
        assert_eq!(encode_segment("@sfu:hs"), "%40sfu%3Ahs");
        assert_eq!(encode_segment("m.call.invite"), "m.call.invite");
        assert_eq!(encode_segment("a/b c"), "a%2Fb%20c");
        assert_eq!(encode_segment("é"), "%C3%A9");
    }

    #[test]
    fn error_classification() {
        let e = |status| ClientError::Status {
            status,
            errcode: String::new(),
            error: String::new(),
            retry_after_ms: None,
        };
        assert!(e(500).is_transient());
        assert!(e(429).is_transient());
        assert!(!e(400).is_transient());
        assert!(!e(413).is_transient());
        assert!(e(401).is_unknown_token());
        assert!(!ClientError::Response("x".into()).is_transient());
    }
}
