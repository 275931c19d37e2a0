//! Synapse's shared-secret registration (`/_synapse/admin/v1/register`): how tests, the demo
//! and the load tester create accounts. It is Synapse's own admin API, not in the Matrix
//! specification and so not in ruma; the request is written here by hand.

use std::time::Duration;

use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde_json::json;
use sha1::Sha1;

use super::{ClientError, MatrixClient, Session};

const PATH: &str = "/_synapse/admin/v1/register";
const TIMEOUT: Duration = Duration::from_secs(30);

/// The registration MAC: HMAC-SHA1 keyed with the shared secret over
/// `nonce\0user\0password\0admin|notadmin`, lower-case hex.
pub fn registration_mac(
    secret: &str,
    nonce: &str,
    user: &str,
    password: &str,
    admin: bool,
) -> String {
    let mut mac =
        Hmac::<Sha1>::new_from_slice(secret.as_bytes()).expect("HMAC accepts keys of any length");
    for (i, part) in [nonce, user, password].into_iter().enumerate() {
        if i > 0 {
            mac.update(b"\0");
        }
        mac.update(part.as_bytes());
    }
    mac.update(b"\0");
    mac.update(if admin {
        b"admin"
    } else {
        b"notadmin" as &[u8]
    });
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[derive(Deserialize)]
struct Nonce {
    nonce: String,
}

impl MatrixClient {
    /// Registers `localpart` (not an admin) with Synapse's shared secret and returns the new
    /// account's session. The client's own token is neither used nor changed.
    pub async fn register_with_shared_secret(
        &self,
        secret: &str,
        localpart: &str,
        password: &str,
    ) -> Result<Session, ClientError> {
        let url = format!("{}{PATH}", self.base);
        let nonce: Nonce = self
            .raw_json(self.http.get(&url).timeout(TIMEOUT), "register nonce")
            .await?;
        let body = json!({
            "nonce": nonce.nonce,
            "username": localpart,
            "password": password,
            "admin": false,
            "mac": registration_mac(secret, &nonce.nonce, localpart, password, false),
        });
        self.raw_json(
            self.http.post(&url).json(&body).timeout(TIMEOUT),
            "register",
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn registration_mac_covers_every_field() {
        // HMAC-SHA1("secret", "abc\0alice\0pw\0notadmin"), computed with Python's hmac module.
        let mac = registration_mac("secret", "abc", "alice", "pw", false);
        assert_eq!(mac, "42e32623fe124933c326f9d2d67ff7c617915a10");
        assert_ne!(mac, registration_mac("secret", "abc", "alice", "pw", true));
        assert_ne!(mac, registration_mac("secret", "abd", "alice", "pw", false));
        assert_ne!(mac, registration_mac("secret", "abc", "alicf", "pw", false));
        assert_ne!(mac, registration_mac("secret", "abc", "alice", "pv", false));
        assert_ne!(mac, registration_mac("secreu", "abc", "alice", "pw", false));
    }
}
