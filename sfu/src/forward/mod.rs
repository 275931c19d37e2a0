//! The forwarding core: pure functions and small state machines, no I/O and no clock of their
//! own. The shard feeds them packets and `now`.

pub mod allocate;
pub mod dependency_descriptor;
pub mod dynacast;
pub mod keyframe;
pub mod keyreq;
pub mod layers;
pub mod loss_cap;
pub mod quality;
pub mod rate;
pub mod rewrite;
pub mod share;
pub mod speakers;
pub mod stall;
pub mod svc;
pub mod temporal;
pub mod trunk_layers;
pub mod vp8;
pub mod vp8_ids;

pub use allocate::{Allocator, Demand, Now, Priority, SETTLING};
pub use dynacast::{LayerDemand, LAYER_OFF_DELAY};
pub use keyframe::{starts_keyframe, VideoCodec};
pub use keyreq::{KeyframeRequests, KEYFRAME_REQUEST_INTERVAL};
pub use layers::nominal_bps;
pub use layers::{grid_cap, rid_rank, Decision, LayerActivity, LayerSelector, LAYER_STALL};
pub use quality::{camera_steps, Quality};
pub use rate::RateMeter;
pub use rewrite::{Rewritten, SeqTsRewriter};
pub use speakers::{SpeakerDetector, Speakers};
pub use stall::StallWatch;
pub use temporal::{TemporalFilter, TemporalPacket, ALL_TEMPORAL};
pub use trunk_layers::{trunk_layers_wanted, TrunkLayers};
pub use vp8::{PictureId, Vp8Descriptor};
pub use vp8_ids::{Vp8Ids, Vp8Numbers};
