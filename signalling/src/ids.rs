//! String newtypes for the identifiers that travel in Matrix events.
//!
//! They are deliberately thin: no syntax validation beyond what the parsers enforce
//! (non-empty, bounded length), because the values are opaque to us and only ever compared.

use std::fmt;

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Wraps a string without checking it.
            pub fn new(s: impl Into<String>) -> Self {
                Self(s.into())
            }

            /// The identifier as it appears on the wire.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// Unwraps the string.
            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                Self(s.to_owned())
            }
        }

        impl From<String> for $name {
            fn from(s: String) -> Self {
                Self(s)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }
    };
}

string_id!(
    /// A Matrix user id, `@local:server`.
    UserId
);
string_id!(
    /// A Matrix device id (opaque).
    DeviceId
);
string_id!(
    /// A Matrix room id, `!opaque:server`.
    RoomId
);
string_id!(
    /// A group call (conference) id: the state key of the room's `m.call` event.
    ConfId
);
string_id!(
    /// One call leg's id (`call_id`), minted by the caller.
    CallId
);
string_id!(
    /// A party id (`party_id`); js-sdk and weir use their own device id.
    PartyId
);
string_id!(
    /// A client session id (`sender_session_id` / `dest_session_id` / `m.call.member` `session_id`).
    SessionId
);
string_id!(
    /// A `MediaStream` id (the first token of `a=msid`), key of `sdp_stream_metadata`.
    StreamId
);
string_id!(
    /// A `MediaStreamTrack` id (the second token of `a=msid`).
    TrackId
);

impl UserId {
    /// The server name part of `@local:server` (everything after the first `:`), if any.
    pub fn server_name(&self) -> Option<&str> {
        let rest = self.0.strip_prefix('@')?;
        let (_, server) = rest.split_once(':')?;
        (!server.is_empty()).then_some(server)
    }
}

impl RoomId {
    /// The server name part of `!opaque:server`, if any.
    pub fn server_name(&self) -> Option<&str> {
        let (_, server) = self.0.split_once(':')?;
        (!server.is_empty()).then_some(server)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_id_server_name() {
        assert_eq!(
            UserId::from("@alice:example.org").server_name(),
            Some("example.org")
        );
        assert_eq!(
            UserId::from("@alice:localhost:8448").server_name(),
            Some("localhost:8448")
        );
        assert_eq!(UserId::from("alice:example.org").server_name(), None);
        assert_eq!(UserId::from("@alice").server_name(), None);
        assert_eq!(UserId::from("@alice:").server_name(), None);
    }

    #[test]
    fn ids_are_transparent_in_json() {
        let id = CallId::from("abc");
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"abc\"");
        let back: CallId = serde_json::from_str("\"abc\"").unwrap();
        assert_eq!(back, id);
        assert_eq!(id.to_string(), "abc");
        assert_eq!(id.as_str(), "abc");
    }
}
