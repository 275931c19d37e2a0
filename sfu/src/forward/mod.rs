//! The forwarding core: pure functions and small state machines, no I/O and no clock of their
//! own. The shard feeds them packets and `now`.

pub mod keyframe;
pub mod keyreq;
pub mod layers;
pub mod rewrite;
pub mod speakers;
pub mod trunk_layers;

pub use keyframe::{starts_keyframe, VideoCodec};
pub use keyreq::{KeyframeRequests, KEYFRAME_REQUEST_INTERVAL};
pub use layers::{grid_cap, rid_rank, Decision, LayerActivity, LayerSelector, LAYER_STALL};
pub use rewrite::{Rewritten, SeqTsRewriter};
pub use speakers::{SpeakerDetector, Speakers};
pub use trunk_layers::TrunkLayers;
