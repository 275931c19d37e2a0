//! A minimal Matrix client-server client for the load tester: shared-secret registration, room
//! setup, to-device send and a lightweight `/sync` loop. One `reqwest::Client` (one connection
//! pool) is shared by every simulated participant.

use std::time::Duration;

use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha1::Sha1;

/// Room state type of the call.
pub const CALL_STATE: &str = "org.matrix.msc3401.call";
/// Room state type of a member's call devices.
pub const CALL_MEMBER_STATE: &str = "org.matrix.msc3401.call.member";
/// Long-poll timeout of each participant's `/sync`. Longer means fewer requests when idle;
/// the run's end interrupts a poll anyway.
pub const SYNC_TIMEOUT_MS: u64 = 10_000;
/// How long a member device entry stays valid (js-sdk: one hour).
pub const MEMBER_TTL_MS: u64 = 3_600_000;
/// Sync filter: to-device events only (they cannot be filtered out); no room data, presence or
/// account data, so each long-poll answer stays small.
pub const SYNC_FILTER: &str = r#"{"room":{"rooms":[],"account_data":{"types":[]},"state":{"types":[]},"timeline":{"types":[]},"ephemeral":{"types":[]}},"presence":{"types":[]},"account_data":{"types":[]}}"#;

#[derive(Debug, thiserror::Error)]
pub enum MatrixError {
    #[error("{what}: {source}")]
    Http {
        what: String,
        source: reqwest::Error,
    },
    #[error("{what}: HTTP {status}: {body}")]
    Status {
        what: String,
        status: u16,
        body: String,
    },
    #[error("{what}: unexpected response: {detail}")]
    Response { what: String, detail: String },
}

/// An account signed in on the homeserver.
#[derive(Debug, Clone)]
pub struct Session {
    pub user_id: String,
    pub device_id: String,
    pub access_token: String,
}

/// A to-device event received by `/sync`.
#[derive(Debug, Clone)]
pub struct ToDevice {
    pub sender: String,
    pub event_type: String,
    pub content: Value,
}

/// The homeserver, shared by every participant.
#[derive(Clone)]
pub struct Homeserver {
    http: reqwest::Client,
    base: String,
}

fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// The shared-secret registration MAC: HMAC-SHA1 over `nonce\0user\0password\0notadmin`.
pub fn registration_mac(
    secret: &str,
    nonce: &str,
    user: &str,
    password: &str,
    admin: bool,
) -> String {
    let mut mac =
        Hmac::<Sha1>::new_from_slice(secret.as_bytes()).expect("HMAC accepts keys of any length");
    mac.update(nonce.as_bytes());
    mac.update(b"\0");
    mac.update(user.as_bytes());
    mac.update(b"\0");
    mac.update(password.as_bytes());
    mac.update(b"\0");
    mac.update(if admin {
        b"admin" as &[u8]
    } else {
        b"notadmin"
    });
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Homeserver {
    pub fn new(http: reqwest::Client, base: &str) -> Self {
        Homeserver {
            http,
            base: base.trim_end_matches('/').to_string(),
        }
    }

    async fn call(
        &self,
        what: &str,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
        timeout: Duration,
    ) -> Result<Value, MatrixError> {
        let mut req = self
            .http
            .request(method, format!("{}{}", self.base, path))
            .timeout(timeout);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.map_err(|source| MatrixError::Http {
            what: what.to_string(),
            source,
        })?;
        let status = resp.status();
        let text = resp.text().await.map_err(|source| MatrixError::Http {
            what: what.to_string(),
            source,
        })?;
        if !status.is_success() {
            return Err(MatrixError::Status {
                what: what.to_string(),
                status: status.as_u16(),
                body: text.chars().take(300).collect(),
            });
        }
        serde_json::from_str(&text).map_err(|e| MatrixError::Response {
            what: what.to_string(),
            detail: e.to_string(),
        })
    }

    /// Register a user with the shared secret (Synapse admin API, nonce + HMAC-SHA1).
    pub async fn register(
        &self,
        secret: &str,
        localpart: &str,
        password: &str,
    ) -> Result<Session, MatrixError> {
        const T: Duration = Duration::from_secs(30);
        let path = "/_synapse/admin/v1/register";
        let n = self
            .call("register nonce", reqwest::Method::GET, path, None, None, T)
            .await?;
        let nonce = n["nonce"].as_str().ok_or_else(|| MatrixError::Response {
            what: "register nonce".into(),
            detail: "no nonce".into(),
        })?;
        let body = json!({
            "nonce": nonce,
            "username": localpart,
            "password": password,
            "admin": false,
            "mac": registration_mac(secret, nonce, localpart, password, false),
        });
        let r = self
            .call(
                "register",
                reqwest::Method::POST,
                path,
                None,
                Some(&body),
                T,
            )
            .await?;
        session_from(&r, "register")
    }

    /// Log in with a password (for an account that already exists).
    pub async fn login(&self, user: &str, password: &str) -> Result<Session, MatrixError> {
        let body = json!({
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": user},
            "password": password,
            "initial_device_display_name": "weir-loadtest",
        });
        let r = self
            .call(
                "login",
                reqwest::Method::POST,
                "/_matrix/client/v3/login",
                None,
                Some(&body),
                Duration::from_secs(30),
            )
            .await?;
        session_from(&r, "login")
    }

    /// Create a call room: members may send the call state types at power level 0; `invite`
    /// lists the users invited at creation.
    pub async fn create_call_room(
        &self,
        s: &Session,
        name: &str,
        invite: &[String],
    ) -> Result<String, MatrixError> {
        let body = json!({
            "preset": "private_chat",
            "name": name,
            "invite": invite,
            "power_level_content_override": {
                "events": {CALL_STATE: 0, CALL_MEMBER_STATE: 0},
                "events_default": 0,
                "state_default": 50,
                "invite": 0,
                "users_default": 0,
            },
        });
        let r = self
            .call(
                "createRoom",
                reqwest::Method::POST,
                "/_matrix/client/v3/createRoom",
                Some(&s.access_token),
                Some(&body),
                Duration::from_secs(60),
            )
            .await?;
        r["room_id"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| MatrixError::Response {
                what: "createRoom".into(),
                detail: "no room_id".into(),
            })
    }

    pub async fn put_state(
        &self,
        s: &Session,
        room: &str,
        event_type: &str,
        state_key: &str,
        content: &Value,
    ) -> Result<(), MatrixError> {
        let path = format!(
            "/_matrix/client/v3/rooms/{}/state/{}/{}",
            enc(room),
            enc(event_type),
            enc(state_key)
        );
        self.call(
            event_type,
            reqwest::Method::PUT,
            &path,
            Some(&s.access_token),
            Some(content),
            Duration::from_secs(60),
        )
        .await
        .map(|_| ())
    }

    pub async fn join(&self, s: &Session, room: &str) -> Result<(), MatrixError> {
        let path = format!("/_matrix/client/v3/join/{}", enc(room));
        self.call(
            "join",
            reqwest::Method::POST,
            &path,
            Some(&s.access_token),
            Some(&json!({})),
            Duration::from_secs(60),
        )
        .await
        .map(|_| ())
    }

    pub async fn joined_members(
        &self,
        s: &Session,
        room: &str,
    ) -> Result<Vec<String>, MatrixError> {
        let path = format!("/_matrix/client/v3/rooms/{}/joined_members", enc(room));
        let r = self
            .call(
                "joined_members",
                reqwest::Method::GET,
                &path,
                Some(&s.access_token),
                None,
                Duration::from_secs(30),
            )
            .await?;
        Ok(r["joined"]
            .as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default())
    }

    /// `PUT /sendToDevice/{type}/{txn}` to one device.
    pub async fn send_to_device(
        &self,
        s: &Session,
        event_type: &str,
        txn: &str,
        user: &str,
        device: &str,
        content: &Value,
    ) -> Result<(), MatrixError> {
        let path = format!(
            "/_matrix/client/v3/sendToDevice/{}/{}",
            enc(event_type),
            enc(txn)
        );
        let body = json!({"messages": {user: {device: content}}});
        self.call(
            event_type,
            reqwest::Method::PUT,
            &path,
            Some(&s.access_token),
            Some(&body),
            Duration::from_secs(30),
        )
        .await
        .map(|_| ())
    }

    /// One `/sync` long-poll. Returns the next batch token and the to-device events.
    pub async fn sync(
        &self,
        s: &Session,
        since: Option<&str>,
        timeout_ms: u64,
    ) -> Result<(String, Vec<ToDevice>), MatrixError> {
        let mut path = format!(
            "/_matrix/client/v3/sync?timeout={timeout_ms}&set_presence=offline&filter={}",
            enc(SYNC_FILTER)
        );
        if let Some(since) = since {
            path.push_str("&since=");
            path.push_str(&enc(since));
        }
        let r = self
            .call(
                "sync",
                reqwest::Method::GET,
                &path,
                Some(&s.access_token),
                None,
                Duration::from_millis(timeout_ms) + Duration::from_secs(30),
            )
            .await?;
        let next = r["next_batch"].as_str().unwrap_or_default().to_string();
        let events = r
            .pointer("/to_device/events")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .map(|e| ToDevice {
                        sender: e["sender"].as_str().unwrap_or_default().to_string(),
                        event_type: e["type"].as_str().unwrap_or_default().to_string(),
                        content: e["content"].clone(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok((next, events))
    }
}

fn session_from(r: &Value, what: &str) -> Result<Session, MatrixError> {
    let get = |k: &str| {
        r[k].as_str()
            .map(str::to_string)
            .ok_or_else(|| MatrixError::Response {
                what: what.to_string(),
                detail: format!("no {k}"),
            })
    };
    Ok(Session {
        user_id: get("user_id")?,
        device_id: get("device_id")?,
        access_token: get("access_token")?,
    })
}

/// The `org.matrix.msc3401.call.member` content for one device in one call.
pub fn member_content(
    conf_id: &str,
    device_id: &str,
    session_id: &str,
    expires_ts: u64,
    focus_user: &str,
    focus_device: &str,
    focus_session: &str,
) -> Value {
    json!({
        "m.calls": [{
            "m.call_id": conf_id,
            "m.devices": [{
                "device_id": device_id,
                "session_id": session_id,
                "expires_ts": expires_ts,
                "feeds": [{"purpose": "m.usermedia"}],
                // MSC3898: the focus this device publishes to (foci read it to trunk).
                "org.matrix.msc3898.foci.active": [{
                    "user_id": focus_user,
                    "device_id": focus_device,
                    "session_id": focus_session,
                }],
            }],
            "m.foci": [focus_user],
        }]
    })
}

/// The `org.matrix.msc3401.call` content js-sdk 43 sends.
pub fn call_content() -> Value {
    json!({"m.intent": "m.room", "m.type": "m.video", "io.element.ptt": false})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registration_mac_matches_synapse_documentation_shape() {
        // HMAC-SHA1(key="secret", "abc\0alice\0pw\0notadmin"), computed independently.
        let mac = registration_mac("secret", "abc", "alice", "pw", false);
        assert_eq!(mac.len(), 40);
        assert_ne!(mac, registration_mac("secret", "abc", "alice", "pw", true));
        assert_ne!(mac, registration_mac("secret", "abd", "alice", "pw", false));
    }

    #[test]
    fn hmac_sha1_matches_rfc2202_test_case_2() {
        let mut mac = Hmac::<Sha1>::new_from_slice(b"Jefe").unwrap();
        mac.update(b"what do ya want for nothing?");
        let hex: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(hex, "effcdf6ae5eb2fa2d27416d5f184df9c259a7c79");
    }

    #[test]
    fn path_segments_are_percent_encoded() {
        assert_eq!(enc("!abc:localhost"), "%21abc%3Alocalhost");
        assert_eq!(enc("m.call.invite"), "m.call.invite");
    }

    #[test]
    fn member_content_has_the_device_fields_the_focus_checks() {
        let m = member_content("conf", "DEV", "sess", 99, "@focus:hs", "FOCUSDEV", "sfu");
        let d = &m["m.calls"][0]["m.devices"][0];
        let focus = &d["org.matrix.msc3898.foci.active"][0];
        assert_eq!(
            (&focus["user_id"], &focus["device_id"], &focus["session_id"]),
            (&json!("@focus:hs"), &json!("FOCUSDEV"), &json!("sfu"))
        );
        assert_eq!(d["device_id"], "DEV");
        assert_eq!(d["session_id"], "sess");
        assert_eq!(d["expires_ts"], 99);
        assert_eq!(m["m.calls"][0]["m.call_id"], "conf");
    }
}
