//! weir's Matrix side: the client end of MSC3401 group calls for a focus (SFU).
//!
//! - [`router::Router`] is the sans-I/O core: to-device `m.call.*` events and room state in,
//!   ordered, de-duplicated, authorised [`LegEvent`]s and to-device sends out.
//! - [`start`] runs it against a homeserver: login, `/sync`, joins, `sendToDevice`, persistence.
//!
//! No media, no end-to-end encryption: the focus device never uploads keys (see design.md).

pub mod appservice;
pub mod client;
pub mod ids;
pub mod leg;
pub mod metadata;
pub mod metrics;
pub mod reorder;
pub mod room;
pub mod router;
mod runtime;
pub mod store;
pub mod wire;

pub use appservice::{registration_yaml, AppserviceTokens, Transaction};
pub use ids::{CallId, ConfId, DeviceId, PartyId, RoomId, SessionId, StreamId, TrackId, UserId};
pub use leg::{Leg, LegCommand, LegEvent};
pub use metadata::{SdpStreamMetadata, StreamMetadata, TrackMetadata};
pub use metrics::Metrics;
pub use runtime::{start, sync_filter, SignallingConfig, SignallingError, SignallingHandle};
pub use wire::{Candidate, SdpType};
