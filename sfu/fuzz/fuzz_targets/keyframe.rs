//! Keyframe detection reads codec payload descriptors from untrusted RTP payloads.
#![no_main]
use libfuzzer_sys::fuzz_target;
use weir_sfu::forward::{starts_keyframe, VideoCodec};

fuzz_target!(|data: &[u8]| {
    for codec in [VideoCodec::Vp8, VideoCodec::Vp9, VideoCodec::H264, VideoCodec::Av1, VideoCodec::Opaque] {
        let _ = starts_keyframe(codec, data);
    }
});
