//! Keyframe detection from the first bytes of an RTP payload.
//!
//! weir never changes payload bytes and reads only what a switch decision needs: the codec's
//! RTP payload descriptor and, for VP8, the first byte of the frame header. These stay in clear
//! under the frame-encryption schemes real clients use (the descriptor is added by the
//! packetiser after the encoded-frame transform, and the VP8 header byte is part of the
//! unencrypted prefix), so detection works on end-to-end encrypted media too.

use super::vp8::Vp8Descriptor;

/// Codecs whose keyframes weir can recognise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VideoCodec {
    Vp8,
    Vp9,
    H264,
    Av1,
    /// A codec weir forwards without looking inside (H.265, ...). Switches then cannot wait
    /// for a keyframe.
    Opaque,
}

/// Whether this packet starts a keyframe (the first packet of an intra frame).
///
/// Returns `false` for anything truncated or malformed: a wrong `false` only delays a
/// subscriber's start until the next keyframe, while a wrong `true` would show corruption.
pub fn starts_keyframe(codec: VideoCodec, payload: &[u8]) -> bool {
    match codec {
        VideoCodec::Vp8 => vp8_starts_keyframe(payload),
        VideoCodec::Vp9 => vp9_starts_keyframe(payload),
        VideoCodec::H264 => h264_starts_keyframe(payload),
        VideoCodec::Av1 => av1_starts_keyframe(payload),
        VideoCodec::Opaque => false,
    }
}

/// RFC 7741 payload descriptor, then the VP8 frame header whose bit 0 (P) is 0 on keyframes.
fn vp8_starts_keyframe(p: &[u8]) -> bool {
    Vp8Descriptor::parse(p).is_ok_and(|d| d.keyframe)
}

/// VP9 payload descriptor (draft-ietf-payload-vp9): B (start of frame) set and P (inter-picture
/// predicted) clear; with flexible mode off, also the first spatial layer.
fn vp9_starts_keyframe(p: &[u8]) -> bool {
    let Some(&b0) = p.first() else { return false };
    let inter_predicted = b0 & 0x40 != 0;
    let begins_frame = b0 & 0x08 != 0;
    if inter_predicted || !begins_frame {
        return false;
    }
    let has_layer_indices = b0 & 0x20 != 0;
    if !has_layer_indices {
        return true;
    }
    let picture_id_present = b0 & 0x80 != 0;
    let mut i = 1;
    if picture_id_present {
        let Some(&pid) = p.get(i) else { return false };
        i += if pid & 0x80 != 0 { 2 } else { 1 };
    }
    match p.get(i) {
        // Spatial layer id is bits 1..3 of the layer byte; a keyframe starts at layer 0.
        Some(&l) => (l >> 1) & 0x07 == 0,
        None => false,
    }
}

/// The AV1 RTP specification's aggregation header: N (the first packet of a coded video
/// sequence, which starts with a keyframe) set, and Z (the packet continues an OBU from the
/// previous one) clear.
fn av1_starts_keyframe(p: &[u8]) -> bool {
    p.first().is_some_and(|b| b & 0x08 != 0 && b & 0x80 == 0)
}

/// RFC 6184: an IDR slice (5) or a sequence parameter set (7), alone, inside a STAP-A, or at
/// the start of an FU-A.
fn h264_starts_keyframe(p: &[u8]) -> bool {
    let Some(&b0) = p.first() else { return false };
    match b0 & 0x1f {
        5 | 7 => true,
        // STAP-A: 16-bit size then NAL header, repeated.
        24 => {
            let mut i = 1;
            while i + 2 < p.len() {
                let size = usize::from(u16::from_be_bytes([p[i], p[i + 1]]));
                let nal = p[i + 2] & 0x1f;
                if nal == 5 || nal == 7 {
                    return true;
                }
                i += 2 + size;
            }
            false
        }
        // FU-A: start bit and the fragmented NAL type.
        28 => match p.get(1) {
            Some(&fu) => fu & 0x80 != 0 && matches!(fu & 0x1f, 5 | 7),
            None => false,
        },
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vp8_keyframe_with_extended_descriptor_and_15_bit_picture_id() {
        // X=1 S=1 PID=0 | I=1 L=1 T=1 | M=1 pictureId(15) | tl0 | tid | frame header P=0
        let key = [0x90, 0xe0, 0x80 | 0x12, 0x34, 0x05, 0x20, 0x10];
        assert!(starts_keyframe(VideoCodec::Vp8, &key));
        let mut delta = key;
        delta[6] = 0x11; // P=1
        assert!(!starts_keyframe(VideoCodec::Vp8, &delta));
    }

    #[test]
    fn vp8_continuation_packets_never_start_a_keyframe() {
        // S=0: middle of a partition, even though the byte after looks like P=0.
        assert!(!starts_keyframe(VideoCodec::Vp8, &[0x80, 0x80, 0x12, 0x00]));
        // Partition 1 start.
        assert!(!starts_keyframe(VideoCodec::Vp8, &[0x11, 0x00]));
    }

    #[test]
    fn vp8_short_descriptor() {
        assert!(starts_keyframe(VideoCodec::Vp8, &[0x10, 0x9c]));
        assert!(!starts_keyframe(VideoCodec::Vp8, &[0x10, 0x9d]));
    }

    #[test]
    fn truncated_payloads_are_not_keyframes() {
        for codec in [
            VideoCodec::Vp8,
            VideoCodec::Vp9,
            VideoCodec::H264,
            VideoCodec::Av1,
        ] {
            assert!(!starts_keyframe(codec, &[]));
        }
        assert!(!starts_keyframe(VideoCodec::Vp8, &[0x90]));
        assert!(!starts_keyframe(VideoCodec::Vp8, &[0x90, 0x80]));
        assert!(!starts_keyframe(VideoCodec::H264, &[28]));
        // STAP-A whose size field points past the end.
        assert!(!starts_keyframe(VideoCodec::H264, &[24, 0xff, 0xff]));
    }

    #[test]
    fn h264_idr_sps_stap_a_and_fu_a() {
        assert!(starts_keyframe(VideoCodec::H264, &[0x65, 0x88]));
        assert!(starts_keyframe(VideoCodec::H264, &[0x67, 0x42]));
        assert!(!starts_keyframe(VideoCodec::H264, &[0x41, 0x9a]));
        // STAP-A with SPS inside.
        assert!(starts_keyframe(
            VideoCodec::H264,
            &[0x78, 0x00, 0x02, 0x67, 0x42]
        ));
        // FU-A start of IDR, and its continuation.
        assert!(starts_keyframe(VideoCodec::H264, &[0x7c, 0x85, 0x00]));
        assert!(!starts_keyframe(VideoCodec::H264, &[0x7c, 0x05, 0x00]));
    }

    #[test]
    fn vp9_key_and_inter_frames() {
        // I=1 P=0 L=0 F=0 B=1, 15-bit picture id.
        assert!(starts_keyframe(VideoCodec::Vp9, &[0x88, 0x80, 0x01]));
        // P=1.
        assert!(!starts_keyframe(VideoCodec::Vp9, &[0xc8, 0x80, 0x01]));
        // L=1 with spatial id 1: not the start of the keyframe.
        assert!(!starts_keyframe(VideoCodec::Vp9, &[0xa8, 0x01, 0x02]));
        assert!(starts_keyframe(VideoCodec::Vp9, &[0xa8, 0x01, 0x00]));
    }

    #[test]
    fn av1_new_coded_video_sequence() {
        // N=1, W=1: a keyframe's first packet.
        assert!(starts_keyframe(VideoCodec::Av1, &[0x18, 0x0a]));
        // N=0: any other frame.
        assert!(!starts_keyframe(VideoCodec::Av1, &[0x10, 0x0a]));
        // Z=1: a continuation, even with N set.
        assert!(!starts_keyframe(VideoCodec::Av1, &[0x98, 0x0a]));
    }

    #[test]
    fn opaque_codecs_are_never_inspected() {
        assert!(!starts_keyframe(VideoCodec::Opaque, &[0x10, 0x00]));
    }
}
