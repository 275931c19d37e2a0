//! weir's one Matrix client-server client. The focus's signalling and the load tester's
//! simulated participants both use it, so both speak to homeservers the same way.
//!
//! - Requests and responses are ruma's (`ruma-client-api`), identifiers are ruma's, and the
//!   events in a response stay [`Raw`]: one odd event never fails a whole `/sync` batch, it is
//!   judged on its own by whoever reads it.
//! - Only the requests listed in [`key_blind`] can be sent, and none of them touches keys: a
//!   device signed in through this client is key-blind by construction (docs/decisions.md).
//! - One `reqwest::Client` (one connection pool) can serve many sessions: see
//!   [`MatrixClient::with_token`].

mod error;
mod key_blind;
mod synapse_admin;

use std::sync::{Arc, RwLock};
use std::time::Duration;

use ruma::api::client::{
    account::whoami,
    filter::{create_filter, FilterDefinition},
    membership::{join_room_by_id, joined_members, joined_rooms, leave_room},
    room::create_room,
    session::login,
    state::{get_state_events, send_state_event},
    sync::sync_events,
    to_device::send_event_to_device,
    uiaa::{MatrixUserIdentifier, UserIdentifier},
};
use ruma::api::IncomingResponseExt;
use ruma::events::{AnyStateEvent, AnyStateEventContent, StateEventType, ToDeviceEventType};
use ruma::serde::Raw;
use ruma::{DeviceId, OwnedDeviceId, OwnedRoomId, OwnedTransactionId, OwnedUserId, RoomId, UserId};
use serde::Deserialize;

pub use error::ClientError;
pub use key_blind::KeyBlind;
pub use ruma::api::client::sync::sync_events::v3::{
    Filter as SyncFilter, Response as SyncResponse,
};
pub use ruma::api::client::to_device::send_event_to_device::v3::Messages as ToDeviceMessages;
pub use synapse_admin::registration_mac;

/// An account signed in on a homeserver.
#[derive(Clone, Debug, Deserialize)]
pub struct Session {
    pub user_id: OwnedUserId,
    pub device_id: OwnedDeviceId,
    pub access_token: String,
}

/// A homeserver client holding a (replaceable) access token.
#[derive(Clone)]
pub struct MatrixClient {
    http: reqwest::Client,
    base: String,
    token: Arc<RwLock<Option<String>>>,
    /// The token is an application service's `as_token` (the focus as an appservice).
    appservice: bool,
}

impl std::fmt::Debug for MatrixClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MatrixClient")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

/// Bound on an ordinary request. Generous: a homeserver busy with federation can be slow,
/// and a request that times out is retried by the caller where that is safe.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on requests that make the homeserver talk to other servers (joining over federation,
/// creating a room with invites, sending state into a federated room).
const FEDERATING_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on a room-state fetch: long enough for a partial-state join to finish resyncing over
/// federation, short enough that a stuck homeserver does not hold up sync for long.
const ROOM_STATE_TIMEOUT: Duration = Duration::from_secs(20);
/// Bound on connecting to the homeserver.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest response body read from a homeserver. A first `/sync` of an account in many large
/// rooms is the biggest answer weir asks for (a few MiB with the call-only filter); more than
/// this is refused rather than buffered, so a broken or hostile server cannot exhaust memory.
const MAX_RESPONSE_BYTES: usize = 32 * 1024 * 1024;

impl MatrixClient {
    /// A client with its own connection pool.
    pub fn new(homeserver_url: &str) -> Result<Self, ClientError> {
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .user_agent(concat!("weir/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self::with_http(http, homeserver_url))
    }

    /// A client on an existing connection pool (the load tester shares one among all its
    /// participants).
    pub fn with_http(http: reqwest::Client, homeserver_url: &str) -> Self {
        Self {
            http,
            base: homeserver_url.trim_end_matches('/').to_owned(),
            token: Arc::new(RwLock::new(None)),
            appservice: false,
        }
    }

    /// Another client on the same homeserver and connection pool, signed in with `token`.
    /// Its token is its own: changing it does not change this one's.
    pub fn with_token(&self, token: impl Into<String>) -> Self {
        Self {
            http: self.http.clone(),
            base: self.base.clone(),
            token: Arc::new(RwLock::new(Some(token.into()))),
            appservice: false,
        }
    }

    /// A client acting as an application service: every request carries `as_token`, as the
    /// registration's sender user.
    pub fn as_appservice(&self, as_token: impl Into<String>) -> Self {
        Self {
            http: self.http.clone(),
            base: self.base.clone(),
            token: Arc::new(RwLock::new(Some(as_token.into()))),
            appservice: true,
        }
    }

    /// The homeserver's base URL, without a trailing slash.
    pub fn homeserver_url(&self) -> &str {
        &self.base
    }

    /// Replaces the access token of this client and of its clones.
    pub fn set_token(&self, token: Option<String>) {
        if let Ok(mut t) = self.token.write() {
            *t = token;
        }
    }

    fn token(&self) -> Option<String> {
        self.token.read().ok().and_then(|t| t.clone())
    }

    /// Sends one request of the allow-list and reads its answer with ruma.
    async fn send<R: KeyBlind>(
        &self,
        request: R,
        what: &str,
        timeout: Duration,
    ) -> Result<R::IncomingResponse, ClientError> {
        let token = self.token();
        let token = token.as_deref().map(|t| {
            if self.appservice {
                key_blind::Token::Appservice(t)
            } else {
                key_blind::Token::User(t)
            }
        });
        let request = request
            .into_http(&self.base, token)
            .map_err(|e| ClientError::Request(format!("{what}: {e}")))?;
        let mut request = reqwest::Request::try_from(request)?;
        *request.timeout_mut() = Some(timeout);
        let response = self.http.execute(request).await?;
        let mut answer = http::Response::builder().status(response.status());
        if let Some(headers) = answer.headers_mut() {
            *headers = response.headers().clone();
        }
        let body = read_limited(response, MAX_RESPONSE_BYTES, what).await?;
        let answer = answer
            .body(body.as_ref())
            .map_err(|e| ClientError::Response(format!("{what}: {e}")))?;
        R::IncomingResponse::try_from_http_response(answer)
            .map_err(|e| ClientError::from_ruma(what, e))
    }

    /// A request outside the Matrix specification (Synapse's admin API), answered with JSON.
    async fn raw_json<T: serde::de::DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
        what: &str,
    ) -> Result<T, ClientError> {
        let response = request.send().await?;
        let status = response.status();
        let body = read_limited(response, MAX_RESPONSE_BYTES, what).await?;
        if !status.is_success() {
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let field = |k: &str| v.get(k).and_then(|s| s.as_str()).unwrap_or("").to_owned();
            return Err(ClientError::Status {
                status: status.as_u16(),
                errcode: field("errcode"),
                error: field("error").chars().take(200).collect(),
                retry_after: None,
            });
        }
        serde_json::from_slice(&body).map_err(|e| ClientError::Response(format!("{what}: {e}")))
    }

    /// `POST /login` with a password. `user` is a user id or a localpart. Passing `device_id`
    /// keeps (or creates) that device. The client's token is not changed.
    pub async fn login_password(
        &self,
        user: &str,
        password: &str,
        device_id: Option<&DeviceId>,
        device_display_name: &str,
    ) -> Result<Session, ClientError> {
        let mut req =
            login::v3::Request::new(login::v3::LoginInfo::Password(login::v3::Password::new(
                UserIdentifier::Matrix(MatrixUserIdentifier::new(user.to_owned())),
                password.to_owned(),
            )));
        req.device_id = device_id.map(ToOwned::to_owned);
        req.initial_device_display_name = Some(device_display_name.to_owned());
        let r = self.send(req, "login", REQUEST_TIMEOUT).await?;
        Ok(Session {
            user_id: r.user_id,
            device_id: r.device_id,
            access_token: r.access_token,
        })
    }

    /// `POST /login` as an application service (`m.login.application_service`, with the
    /// as_token): creates (or keeps) `device_id` for the service's `user`, so to-device
    /// messages addressed to that device are stored and pushed to the service.
    pub async fn login_appservice(
        &self,
        user: &str,
        device_id: Option<&DeviceId>,
        device_display_name: &str,
    ) -> Result<Session, ClientError> {
        let mut req = login::v3::Request::new(login::v3::LoginInfo::ApplicationService(
            login::v3::ApplicationService::new(UserIdentifier::Matrix(MatrixUserIdentifier::new(
                user.to_owned(),
            ))),
        ));
        req.device_id = device_id.map(ToOwned::to_owned);
        req.initial_device_display_name = Some(device_display_name.to_owned());
        let r = self.send(req, "appservice login", REQUEST_TIMEOUT).await?;
        Ok(Session {
            user_id: r.user_id,
            device_id: r.device_id,
            access_token: r.access_token,
        })
    }

    /// `POST /register` as an application service, for a user of its namespace (`localpart`),
    /// without logging in. Synapse does not give an appservice's sender user a row of its own,
    /// and a device token of a user without one is refused; registering makes it. A user that
    /// exists already is not an error.
    /// (Sent as plain JSON: ruma's registration request answers with user-interactive auth,
    /// which the key-blind list's requests never need.)
    pub async fn register_appservice_user(&self, localpart: &str) -> Result<(), ClientError> {
        let token = self.token().unwrap_or_default();
        let request = self
            .http
            .post(format!("{}/_matrix/client/v3/register", self.base))
            .bearer_auth(token)
            .timeout(REQUEST_TIMEOUT)
            .json(&serde_json::json!({
                "type": "m.login.application_service",
                "username": localpart,
                "inhibit_login": true,
            }));
        match self
            .raw_json::<serde_json::Value>(request, "appservice register")
            .await
        {
            Ok(_) => Ok(()),
            Err(ClientError::Status { errcode, .. }) if errcode == "M_USER_IN_USE" => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// `GET /joined_rooms`.
    pub async fn joined_rooms(&self) -> Result<Vec<OwnedRoomId>, ClientError> {
        let req = joined_rooms::v3::Request::new();
        Ok(self
            .send(req, "joined rooms", REQUEST_TIMEOUT)
            .await?
            .joined_rooms)
    }

    /// `GET /account/whoami`.
    pub async fn whoami(&self) -> Result<whoami::v3::Response, ClientError> {
        self.send(whoami::v3::Request::new(), "whoami", REQUEST_TIMEOUT)
            .await
    }

    /// `POST /user/{id}/filter`; returns the filter id.
    pub async fn create_filter(
        &self,
        user: &UserId,
        filter: FilterDefinition,
    ) -> Result<String, ClientError> {
        let req = create_filter::v3::Request::new(user.to_owned(), filter);
        Ok(self.send(req, "filter", REQUEST_TIMEOUT).await?.filter_id)
    }

    /// `GET /sync`, long-polling for up to `timeout`. Offline presence: weir never shows up
    /// as online.
    pub async fn sync(
        &self,
        since: Option<&str>,
        filter: Option<SyncFilter>,
        timeout: Duration,
        full_state: bool,
    ) -> Result<SyncResponse, ClientError> {
        let mut req = sync_events::v3::Request::new();
        req.since = since.map(str::to_owned);
        req.filter = filter;
        req.timeout = Some(timeout);
        req.full_state = full_state;
        req.set_presence = ruma::presence::PresenceState::Offline;
        self.send(req, "sync", timeout + REQUEST_TIMEOUT).await
    }

    /// `GET /rooms/{room}/state`: the room's full current state. For a room joined over
    /// federation with partial state (Synapse's faster joins), Synapse answers only once the
    /// state is complete, which `/sync` may never show as events (members that were omitted
    /// from the join arrive by state resolution, not in a timeline).
    pub async fn room_state(&self, room: &RoomId) -> Result<Vec<Raw<AnyStateEvent>>, ClientError> {
        let req = get_state_events::v3::Request::new(room.to_owned());
        Ok(self
            .send(req, "room state", ROOM_STATE_TIMEOUT)
            .await?
            .room_state)
    }

    /// `POST /rooms/{room}/join` (accepts an invite, over federation if need be).
    pub async fn join(&self, room: &RoomId) -> Result<(), ClientError> {
        let req = join_room_by_id::v3::Request::new(room.to_owned());
        self.send(req, "join", FEDERATING_TIMEOUT).await.map(drop)
    }

    /// `POST /rooms/{room}/leave` (also declines an invite).
    pub async fn leave(&self, room: &RoomId) -> Result<(), ClientError> {
        let req = leave_room::v3::Request::new(room.to_owned());
        self.send(req, "leave", REQUEST_TIMEOUT).await.map(drop)
    }

    /// `GET /rooms/{room}/joined_members`: the users joined, as this homeserver knows them.
    pub async fn joined_members(&self, room: &RoomId) -> Result<Vec<OwnedUserId>, ClientError> {
        let req = joined_members::v3::Request::new(room.to_owned());
        let r = self.send(req, "joined members", REQUEST_TIMEOUT).await?;
        Ok(r.joined.into_keys().collect())
    }

    /// `POST /createRoom`; returns the new room's id.
    pub async fn create_room(
        &self,
        request: create_room::v3::Request,
    ) -> Result<OwnedRoomId, ClientError> {
        Ok(self
            .send(request, "create room", FEDERATING_TIMEOUT)
            .await?
            .room_id)
    }

    /// `PUT /rooms/{room}/state/{type}/{state_key}` with content as the caller wrote it.
    pub async fn put_state(
        &self,
        room: &RoomId,
        event_type: &str,
        state_key: &str,
        content: Raw<AnyStateEventContent>,
    ) -> Result<(), ClientError> {
        let req = send_state_event::v3::Request::new_raw(
            room.to_owned(),
            StateEventType::from(event_type),
            state_key.to_owned(),
            content,
        );
        self.send(req, event_type, FEDERATING_TIMEOUT)
            .await
            .map(drop)
    }

    /// `PUT /sendToDevice/{type}/{txn}`. Re-sending with the same `txn` is idempotent on the
    /// homeserver, so a timed-out send can be retried safely.
    pub async fn send_to_device(
        &self,
        event_type: &str,
        txn: &str,
        messages: ToDeviceMessages,
    ) -> Result<(), ClientError> {
        let req = send_event_to_device::v3::Request::new_raw(
            ToDeviceEventType::from(event_type),
            OwnedTransactionId::from(txn),
            messages,
        );
        self.send(req, event_type, REQUEST_TIMEOUT).await.map(drop)
    }
}

/// Reads a response body of at most `limit` bytes; a longer one is an error, found from its
/// `Content-Length` before reading or while reading when it has none.
async fn read_limited(
    mut response: reqwest::Response,
    limit: usize,
    what: &str,
) -> Result<Vec<u8>, ClientError> {
    let too_long = || ClientError::Response(format!("{what}: body over {limit} bytes refused"));
    if response.content_length().is_some_and(|n| n > limit as u64) {
        return Err(too_long());
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > limit {
            return Err(too_long());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Serves one HTTP answer of `len` bytes, with or without a `Content-Length`.
    async fn serve_once(len: usize, declare: bool) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut req = [0u8; 4096];
            let _ = s.read(&mut req).await;
            let head = if declare {
                format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n")
            } else {
                "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n".to_string()
            };
            let _ = s.write_all(head.as_bytes()).await;
            let _ = s.write_all(&vec![b'x'; len]).await;
        });
        format!("http://{addr}/")
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_refused_with_or_without_a_length() {
        let http = reqwest::Client::new();
        for declare in [true, false] {
            let url = serve_once(2000, declare).await;
            let r = http.get(&url).send().await.unwrap();
            let e = read_limited(r, 1000, "test").await.unwrap_err();
            assert!(e.to_string().contains("over 1000 bytes"), "{e}");
            let url = serve_once(2000, declare).await;
            let r = http.get(&url).send().await.unwrap();
            assert_eq!(read_limited(r, 5000, "test").await.unwrap().len(), 2000);
        }
    }
}
