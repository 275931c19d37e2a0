//! The one place that knows str0m: engine configuration here, and the few SDP adjustments
//! weir makes in [`sdp`]. Upgrading str0m should touch this module and the shard's use of the
//! `Rtc` API only.

mod sdp;

pub use sdp::*;

use std::time::Instant;

use str0m::bwe::Bitrate;
use str0m::format::{Codec, FormatParams};
use str0m::media::Frequency;
use str0m::rtp::{Extension, ExtensionSerializer, ExtensionValues};
use str0m::{IceCreds, Rtc, RtcConfig};

use crate::forward::VideoCodec;

/// A new engine instance for one participant: ICE-lite (weir has a public address and never
/// initiates checks), RTP mode (weir forwards packets, never reassembles frames), and the
/// codec set browsers send. Fewer codecs keep our offers small: to-device events are capped
/// at 64 KiB by Synapse, and every forwarded track adds an m-line with all of them.
pub fn new_rtc(now: Instant, creds: IceCreds) -> Rtc {
    config(true).set_local_ice_credentials(creds).build(now)
}

/// [`new_rtc`], estimating the bandwidth toward the participant from its transport-wide
/// congestion control feedback (and its REMB, if that is all it sends), starting from
/// `initial`.
pub fn new_rtc_estimating(now: Instant, initial: Bitrate, creds: IceCreds) -> Rtc {
    config(true)
        .set_local_ice_credentials(creds)
        .enable_bwe(Some(initial))
        .set_stats_interval(Some(LOSS_REPORT_INTERVAL))
        .build(now)
}

/// How often an estimating engine reports the loss toward its participant (over the last
/// second, from transport-wide feedback) for allocation. Shorter notices congestion sooner;
/// each report walks the engine's streams once.
pub const LOSS_REPORT_INTERVAL: std::time::Duration = std::time::Duration::from_millis(500);

/// A new engine instance for a trunk weir dials to another focus: the same as
/// [`new_rtc`] but full ICE, since the far focus is ICE-lite and two lite agents never check.
pub fn new_trunk_rtc(now: Instant, creds: IceCreds) -> Rtc {
    config(false).set_local_ice_credentials(creds).build(now)
}

/// Fresh ICE credentials whose ufrag starts with `prefix` (the shard's, so that an ICE-TCP
/// connection is routed to its shard by the ufrag its first check names: `tcp::accept`).
pub fn ice_creds(prefix: &str) -> IceCreds {
    let random = IceCreds::new();
    IceCreds {
        ufrag: format!("{prefix}{}", random.ufrag),
        pass: random.pass,
    }
}

/// RTP mode and the codec set browsers send, with or without ICE-lite.
///
/// One payload type per codec browsers actually send to an SFU: Opus, VP8, VP9 profile 0,
/// H.264 constrained baseline (packetization mode 1, level 3.1: the profile Chrome, Firefox
/// and Safari all offer) and AV1, each video codec with RTX. AV1 is left out of the m-lines
/// weir offers for forwarded tracks not sent in AV1 ([`without_codec`]). str0m's defaults add VP9 profile 2 and
/// six more H.264 variants; every forwarded video track repeats the whole list in its m-line,
/// and with them a 25-person meeting's offer passed the 64 KiB Synapse allows in a to-device
/// event. A publisher whose browser offers none of these codecs for video gets its video
/// rejected in the answer rather than forwarded to subscribers who could not decode it.
///
/// Header extensions: audio level, transport-wide sequence numbers, mid, rid and repaired rid,
/// video orientation, and the dependency descriptor (the layers of VP9 and AV1 SVC:
/// `forward::svc`). Not abs-send-time: it serves receive-side estimation, which transport-wide
/// feedback replaces, and it cost one line in every m-line.
fn config(ice_lite: bool) -> RtcConfig {
    let mut config = RtcConfig::new()
        .set_ice_lite(ice_lite)
        .set_rtp_mode(true)
        .clear_codecs()
        .enable_opus(true, false)
        .enable_vp8(true)
        .enable_av1(true)
        .clear_extension_map()
        .set_extension(1, Extension::AudioLevel)
        .set_extension(3, Extension::TransportSequenceNumber)
        .set_extension(4, Extension::RtpMid)
        .set_extension(10, Extension::RtpStreamId)
        .set_extension(11, Extension::RepairedRtpStreamId)
        .set_extension(12, dependency_descriptor_extension())
        .set_extension(13, Extension::VideoOrientation);
    let codecs = config.codec_config();
    codecs.add_config(
        98.into(),
        Some(99.into()),
        Codec::Vp9,
        Frequency::NINETY_KHZ,
        None,
        FormatParams {
            profile_id: Some(0),
            ..Default::default()
        },
    );
    codecs.add_h264(108.into(), Some(109.into()), true, 0x42e01f);
    config
}

/// A dependency descriptor as received: weir reads it (`forward::dependency_descriptor`) and
/// forwards it unchanged, like the payload. Header extensions are not covered by frame
/// encryption, so this is readable on end-to-end encrypted media.
#[derive(Debug)]
pub struct RawDependencyDescriptor(pub Box<[u8]>);

/// The dependency descriptor header extension, read into and written from
/// [`RawDependencyDescriptor`] (for weir's engines and the simulated participants).
pub fn dependency_descriptor_extension() -> Extension {
    Extension::with_serializer(
        crate::forward::dependency_descriptor::URI,
        DependencyDescriptorBytes,
    )
}

/// Moves [`RawDependencyDescriptor`] between the wire and the engine's extension values.
/// str0m keeps user extension values in a map of `Arc`s, so each packet that carries one
/// costs a few small allocations on receive, and one per forwarded copy (the map is cloned).
#[derive(Debug)]
struct DependencyDescriptorBytes;

impl ExtensionSerializer for DependencyDescriptorBytes {
    fn write_to(&self, buf: &mut [u8], ev: &ExtensionValues) -> usize {
        match ev.user_values.get::<RawDependencyDescriptor>() {
            Some(d) if d.0.len() <= buf.len() && d.0.len() <= 255 => {
                buf[..d.0.len()].copy_from_slice(&d.0);
                d.0.len()
            }
            _ => 0,
        }
    }

    fn parse_value(&self, buf: &[u8], ev: &mut ExtensionValues) -> bool {
        if buf.len() < 3 {
            return false;
        }
        ev.user_values
            .set(RawDependencyDescriptor(buf.to_vec().into_boxed_slice()));
        true
    }

    fn is_video(&self) -> bool {
        true
    }

    fn is_audio(&self) -> bool {
        false
    }

    /// A descriptor carrying a structure is longer than the one-byte form's 16 bytes.
    fn requires_two_byte_form(&self, ev: &ExtensionValues) -> bool {
        ev.user_values
            .get::<RawDependencyDescriptor>()
            .is_some_and(|d| d.0.len() > 16)
    }
}

/// Map an engine codec to what keyframe detection understands.
pub fn video_codec(codec: Codec) -> VideoCodec {
    match codec {
        Codec::Vp8 => VideoCodec::Vp8,
        Codec::Vp9 => VideoCodec::Vp9,
        Codec::H264 => VideoCodec::H264,
        Codec::Av1 => VideoCodec::Av1,
        _ => VideoCodec::Opaque,
    }
}
