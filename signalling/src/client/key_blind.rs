//! The requests [`super::MatrixClient`] can send: a closed list, none of which touches
//! end-to-end keys. A device signed in through this client never uploads device or one-time
//! keys, never claims or queries anyone's, and never joins key backup, so the focus device is
//! key-blind by construction: it could not decrypt media keys sent to it even by mistake.
//! Adding a request here is a design decision (docs/decisions.md); the test below fails if a
//! key endpoint ever joins the list.

use std::borrow::Cow;
use std::sync::LazyLock;

use ruma::api::auth_scheme::SendAccessToken;
use ruma::api::client::{
    account::whoami,
    filter::create_filter,
    membership::{join_room_by_id, joined_members, joined_rooms, leave_room},
    room::create_room,
    session::login,
    state::{get_state_events, send_state_event},
    sync::sync_events,
    to_device::send_event_to_device,
};
use ruma::api::error::{Error as MatrixError, IntoHttpError};
use ruma::api::{MatrixVersion, OutgoingRequest, OutgoingRequestExt, SupportedVersions};

/// The client speaks v1.1 paths (`/_matrix/client/v3/...`), which every current homeserver
/// serves; nothing weir uses is newer.
static VERSIONS: LazyLock<SupportedVersions> = LazyLock::new(|| SupportedVersions {
    versions: [MatrixVersion::V1_1].into(),
    features: Default::default(),
});

/// Whose token a request carries.
#[derive(Debug, Clone, Copy)]
pub enum Token<'a> {
    /// A device's access token.
    User(&'a str),
    /// An application service's `as_token` (the focus as an appservice, issue 10).
    Appservice(&'a str),
}

mod sealed {
    pub trait Sealed {}
}

/// A request the client may send. Sealed: only the list in this file implements it.
pub trait KeyBlind: OutgoingRequest<EndpointError = MatrixError> + sealed::Sealed {
    /// Endpoint paths of this request, for the audit test.
    #[cfg(test)]
    fn paths() -> Vec<&'static str>;

    /// Builds the HTTP request with `token` as bearer where the endpoint needs one (or, for
    /// an application service's token, also where the endpoint accepts one: its login).
    fn into_http(
        self,
        base_url: &str,
        token: Option<Token<'_>>,
    ) -> Result<http::Request<Vec<u8>>, IntoHttpError>;
}

macro_rules! key_blind {
    ($($request:ty),* $(,)?) => {
        $(
            impl sealed::Sealed for $request {}
            impl KeyBlind for $request {
                #[cfg(test)]
                fn paths() -> Vec<&'static str> {
                    use ruma::api::Metadata;
                    let b = &<$request as Metadata>::PATH_BUILDER;
                    b.unstable_paths().map(|(_, p)| p).chain(b.stable_paths().map(|(_, p)| p)).collect()
                }

                fn into_http(
                    self,
                    base_url: &str,
                    token: Option<Token<'_>>,
                ) -> Result<http::Request<Vec<u8>>, IntoHttpError> {
                    let auth = match token {
                        Some(Token::User(t)) => SendAccessToken::IfRequired(t),
                        Some(Token::Appservice(t)) => SendAccessToken::Appservice(t),
                        None => SendAccessToken::None,
                    };
                    self.try_into_http_request(base_url, auth, Cow::Borrowed(&*VERSIONS))
                }
            }
        )*

        #[cfg(test)]
        fn all_paths() -> Vec<&'static str> {
            let mut v = Vec::new();
            $( v.extend(<$request as KeyBlind>::paths()); )*
            v
        }
    };
}

key_blind!(
    login::v3::Request,
    whoami::v3::Request,
    create_filter::v3::Request,
    sync_events::v3::Request,
    get_state_events::v3::Request,
    join_room_by_id::v3::Request,
    leave_room::v3::Request,
    joined_members::v3::Request,
    joined_rooms::v3::Request,
    create_room::v3::Request,
    send_state_event::v3::Request,
    send_event_to_device::v3::Request,
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_allowed_request_touches_keys() {
        let paths = all_paths();
        assert!(paths.len() >= 11, "{paths:?}");
        for p in paths {
            for forbidden in ["/keys", "dehydrated_device"] {
                assert!(!p.contains(forbidden), "{p} is a key endpoint");
            }
        }
    }

    #[test]
    fn requests_use_v3_paths_and_the_token_only_where_needed() {
        let req = whoami::v3::Request::new()
            .into_http("http://hs.test/", Some(Token::User("tok")))
            .unwrap();
        assert_eq!(
            req.uri().to_string(),
            "http://hs.test/_matrix/client/v3/account/whoami"
        );
        assert_eq!(req.headers()["authorization"], "Bearer tok");
        // Login needs no token and must not leak one.
        let login =
            login::v3::Request::new(login::v3::LoginInfo::Password(login::v3::Password::new(
                ruma::api::client::uiaa::UserIdentifier::Matrix(
                    ruma::api::client::uiaa::MatrixUserIdentifier::new("a".into()),
                ),
                "pw".into(),
            )))
            .into_http("http://hs.test", Some(Token::User("tok")))
            .unwrap();
        assert!(!login.headers().contains_key("authorization"));
    }

    #[test]
    fn an_appservice_logs_its_device_in_with_its_token() {
        let login = login::v3::Request::new(login::v3::LoginInfo::ApplicationService(
            login::v3::ApplicationService::new(ruma::api::client::uiaa::UserIdentifier::Matrix(
                ruma::api::client::uiaa::MatrixUserIdentifier::new("focus".into()),
            )),
        ))
        .into_http("http://hs.test", Some(Token::Appservice("as")))
        .unwrap();
        assert_eq!(login.headers()["authorization"], "Bearer as");
        assert!(String::from_utf8_lossy(login.body()).contains("m.login.application_service"));
    }
}
