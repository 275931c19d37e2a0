//! The identifiers that travel in Matrix events.
//!
//! User, device and room ids are ruma's (re-exported under the names the rest of weir uses):
//! a user or room id is checked against the Matrix grammar where it enters, in the event
//! parsers and the client, so an event naming a malformed user is rejected there with a
//! clear reason, and everything past the parsers holds only valid ids. Device ids are opaque
//! in Matrix and ruma accepts any string.
//!
//! The call protocol's own ids (call, party, session, stream, track, conference) are thin
//! string newtypes: opaque values, only ever compared, bounded by the parsers.

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

/// A Matrix device id, opaque (ruma's `OwnedDeviceId`).
pub use ruma::OwnedDeviceId as DeviceId;
/// A Matrix room id, `!opaque:server` or, from room version 12, `!opaque` (ruma's `OwnedRoomId`).
pub use ruma::OwnedRoomId as RoomId;
/// A Matrix user id, `@local:server` (ruma's `OwnedUserId`).
pub use ruma::OwnedUserId as UserId;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids_are_checked_where_they_enter() {
        let u = UserId::try_from("@alice:localhost:8448").unwrap();
        assert_eq!(u.server_name().as_str(), "localhost:8448");
        for bad in ["alice:example.org", "@alice", "@alice:", ""] {
            assert!(UserId::try_from(bad).is_err(), "{bad}");
        }
        assert!(serde_json::from_str::<UserId>("\"@a:hs\"").is_ok());
        assert!(serde_json::from_str::<UserId>("\"a\"").is_err());
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
