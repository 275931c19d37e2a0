//! The synthetic media payload: opaque bytes standing in for encrypted frames, with just enough
//! codec framing for a focus to find keyframes, and a header of ours that lets a receiver measure
//! loss, latency and freezes and detect any modification. Pure: no I/O, no clock.
//!
//! Video payload (every RTP packet):
//! ```text
//! [0]    VP8 payload descriptor (RFC 7741): 0x10 (S=1, PID 0) on a frame's first packet, else 0x00
//! [1]    VP8 frame-header byte: bit 0 (P) is 0 on keyframes, 1 on delta frames
//! [2..]  our header (HEADER_LEN bytes), then filler up to the packet size
//! ```
//! Audio payload: `[0]` an Opus TOC byte, then our header and filler.
//!
//! Our header (big endian): magic u16, version u8, kind u8, layer u8, flags u8, publisher u32,
//! frame u32, packet u16, packets u16, layer_seq u32, sent_us u64, total_len u16, checksum u64.
//! The checksum covers every byte of the payload except the checksum field itself.

use crate::ids::{Layer, PublisherId};

/// Marks our payloads ("WL").
pub const MAGIC: u16 = 0x574c;
/// Header format version.
pub const VERSION: u8 = 1;
/// Length of our header, after the codec prefix.
pub const HEADER_LEN: usize = 2 + 1 + 1 + 1 + 1 + 4 + 4 + 2 + 2 + 4 + 8 + 2 + 8;
/// VP8 descriptor byte of a frame's first packet: S=1, partition 0, no extensions.
pub const VP8_DESC_START: u8 = 0x10;
/// VP8 descriptor byte of a continuation packet.
pub const VP8_DESC_CONT: u8 = 0x00;
/// VP8 frame-header byte of a keyframe (P=0, show_frame=1).
pub const VP8_HDR_KEY: u8 = 0x10;
/// VP8 frame-header byte of a delta frame (P=1, show_frame=1).
pub const VP8_HDR_DELTA: u8 = 0x11;
/// Opus TOC byte: config 31 (CELT fullband 20 ms), mono, one frame.
pub const OPUS_TOC: u8 = 0xf8;
/// Length of the codec prefix before our header.
pub const VIDEO_PREFIX: usize = 2;
pub const AUDIO_PREFIX: usize = 1;
/// Smallest payloads we produce.
pub const MIN_VIDEO_PAYLOAD: usize = VIDEO_PREFIX + HEADER_LEN;
pub const MIN_AUDIO_PAYLOAD: usize = AUDIO_PREFIX + HEADER_LEN;

const KIND_AUDIO: u8 = 1;
const KIND_VIDEO: u8 = 2;
const FLAG_KEYFRAME: u8 = 0x01;
/// Offset of the checksum inside our header.
const CHECKSUM_OFFSET: usize = HEADER_LEN - 8;

/// What a packet says about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MediaHeader {
    pub publisher: PublisherId,
    /// `None` for audio.
    pub layer: Option<Layer>,
    pub keyframe: bool,
    /// Frame number within the layer (audio: packet number).
    pub frame: u32,
    /// Index of this packet within its frame, and the frame's packet count.
    pub packet: u16,
    pub packets: u16,
    /// Serial number of this packet within (publisher, layer) or (publisher, audio).
    pub layer_seq: u32,
    /// Send time, µs since the process's clock epoch.
    pub sent_us: u64,
}

impl MediaHeader {
    pub fn is_audio(&self) -> bool {
        self.layer.is_none()
    }
}

/// Why a received payload is not what was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IntegrityError {
    #[error("payload of {0} bytes is shorter than our header")]
    TooShort(usize),
    #[error("magic or version does not match")]
    BadMagic,
    #[error("VP8 payload descriptor does not match the packet's place in its frame")]
    BadDescriptor,
    #[error("VP8 keyframe bit does not match our header")]
    KeyframeBitMismatch,
    #[error("payload length {got} differs from the {sent} bytes sent")]
    LengthMismatch { got: usize, sent: usize },
    #[error("checksum mismatch")]
    Checksum,
    #[error("unknown media kind or layer")]
    BadKind,
}

/// Write one video packet's payload of `len` bytes into `buf` (cleared first).
pub fn encode_video(h: &MediaHeader, len: usize, buf: &mut Vec<u8>) {
    let len = len.max(MIN_VIDEO_PAYLOAD);
    buf.clear();
    buf.push(if h.packet == 0 {
        VP8_DESC_START
    } else {
        VP8_DESC_CONT
    });
    buf.push(if h.keyframe {
        VP8_HDR_KEY
    } else {
        VP8_HDR_DELTA
    });
    finish(h, KIND_VIDEO, len, buf);
}

/// Write one audio packet's payload of `len` bytes into `buf` (cleared first).
pub fn encode_audio(h: &MediaHeader, len: usize, buf: &mut Vec<u8>) {
    let len = len.max(MIN_AUDIO_PAYLOAD);
    buf.clear();
    buf.push(OPUS_TOC);
    finish(h, KIND_AUDIO, len, buf);
}

fn finish(h: &MediaHeader, kind: u8, len: usize, buf: &mut Vec<u8>) {
    let start = buf.len();
    buf.extend_from_slice(&MAGIC.to_be_bytes());
    buf.push(VERSION);
    buf.push(kind);
    buf.push(h.layer.map_or(0xff, |l| l.index() as u8));
    buf.push(if h.keyframe { FLAG_KEYFRAME } else { 0 });
    buf.extend_from_slice(&h.publisher.0.to_be_bytes());
    buf.extend_from_slice(&h.frame.to_be_bytes());
    buf.extend_from_slice(&h.packet.to_be_bytes());
    buf.extend_from_slice(&h.packets.to_be_bytes());
    buf.extend_from_slice(&h.layer_seq.to_be_bytes());
    buf.extend_from_slice(&h.sent_us.to_be_bytes());
    buf.extend_from_slice(&(len.min(u16::MAX as usize) as u16).to_be_bytes());
    buf.extend_from_slice(&[0u8; 8]);
    // Filler: a cheap generator seeded by the packet's identity, so it differs per packet.
    let mut x = (u64::from(h.publisher.0) << 40)
        ^ (u64::from(h.layer_seq) << 8)
        ^ u64::from(h.layer.map_or(7, |l| l.index() as u8))
        ^ 0x9e37_79b9_7f4a_7c15;
    let filled = buf.len();
    buf.resize(len.max(filled), 0);
    for chunk in buf[filled..].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let n = chunk.len();
        chunk.copy_from_slice(&x.to_le_bytes()[..n]);
    }
    let sum = checksum(buf, start + CHECKSUM_OFFSET);
    buf[start + CHECKSUM_OFFSET..start + CHECKSUM_OFFSET + 8].copy_from_slice(&sum.to_be_bytes());
}

/// 64-bit hash of `data` without the 8 bytes at `skip` (the checksum field itself). Word-at-a-time
/// multiply/xor: not cryptographic, but any change of any byte changes it with overwhelming
/// probability, and it is cheap enough to run on every packet even in a debug build.
pub fn checksum(data: &[u8], skip: usize) -> u64 {
    let mut h = Hasher::new(data.len() as u64);
    let skip = skip.min(data.len());
    h.write(&data[..skip]);
    h.write(&data[(skip + 8).min(data.len())..]);
    h.finish()
}

/// Streaming form of [`checksum`]'s hash.
struct Hasher {
    h: u64,
    buf: [u8; 8],
    n: usize,
}

impl Hasher {
    const K: u64 = 0x9fb2_1c65_1e98_df25;

    fn new(len: u64) -> Self {
        Hasher {
            h: 0xcbf2_9ce4_8422_2325 ^ len.wrapping_mul(Self::K),
            buf: [0; 8],
            n: 0,
        }
    }

    fn mix(&mut self, w: u64) {
        self.h = (self.h ^ w).wrapping_mul(Self::K);
        self.h ^= self.h >> 29;
    }

    fn write(&mut self, mut d: &[u8]) {
        if self.n > 0 {
            let take = (8 - self.n).min(d.len());
            self.buf[self.n..self.n + take].copy_from_slice(&d[..take]);
            self.n += take;
            d = &d[take..];
            if self.n < 8 {
                return;
            }
            self.mix(u64::from_le_bytes(self.buf));
            self.n = 0;
        }
        let mut chunks = d.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.mix(u64::from_le_bytes(w));
        }
        let rem = chunks.remainder();
        self.buf[..rem.len()].copy_from_slice(rem);
        self.n = rem.len();
    }

    fn finish(mut self) -> u64 {
        if self.n > 0 {
            self.buf[self.n..].fill(0);
            self.mix(u64::from_le_bytes(self.buf));
        }
        self.h ^ (self.h >> 32)
    }
}

/// Read and verify a payload. Video payloads must carry a VP8 descriptor consistent with our
/// header; every byte must be as sent.
pub fn decode(payload: &[u8], video: bool) -> Result<MediaHeader, IntegrityError> {
    let prefix = if video { VIDEO_PREFIX } else { AUDIO_PREFIX };
    if payload.len() < prefix + HEADER_LEN {
        return Err(IntegrityError::TooShort(payload.len()));
    }
    let b = &payload[prefix..];
    let u16_at = |o: usize| u16::from_be_bytes([b[o], b[o + 1]]);
    let u32_at = |o: usize| u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    let u64_at = |o: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&b[o..o + 8]);
        u64::from_be_bytes(w)
    };
    if u16_at(0) != MAGIC || b[2] != VERSION {
        return Err(IntegrityError::BadMagic);
    }
    let kind = b[3];
    let layer = match (kind, b[4]) {
        (KIND_AUDIO, 0xff) if !video => None,
        (KIND_VIDEO, l) if video => Some(Layer::from_index(l).ok_or(IntegrityError::BadKind)?),
        _ => return Err(IntegrityError::BadKind),
    };
    let keyframe = b[5] & FLAG_KEYFRAME != 0;
    let h = MediaHeader {
        publisher: PublisherId(u32_at(6)),
        layer,
        keyframe,
        frame: u32_at(10),
        packet: u16_at(14),
        packets: u16_at(16),
        layer_seq: u32_at(18),
        sent_us: u64_at(22),
    };
    let sent_len = usize::from(u16_at(30));
    if sent_len != payload.len() {
        return Err(IntegrityError::LengthMismatch {
            got: payload.len(),
            sent: sent_len,
        });
    }
    let want = u64_at(CHECKSUM_OFFSET);
    if checksum(payload, prefix + CHECKSUM_OFFSET) != want {
        return Err(IntegrityError::Checksum);
    }
    if video {
        let desc = if h.packet == 0 {
            VP8_DESC_START
        } else {
            VP8_DESC_CONT
        };
        if payload[0] != desc {
            return Err(IntegrityError::BadDescriptor);
        }
        if (payload[1] & 0x01 == 0) != h.keyframe {
            return Err(IntegrityError::KeyframeBitMismatch);
        }
    } else if payload[0] != OPUS_TOC {
        return Err(IntegrityError::BadDescriptor);
    }
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn video(packet: u16, keyframe: bool) -> MediaHeader {
        MediaHeader {
            publisher: PublisherId(7),
            layer: Some(Layer::H),
            keyframe,
            frame: 42,
            packet,
            packets: 3,
            layer_seq: 1000,
            sent_us: 123_456_789,
        }
    }

    #[test]
    fn video_round_trips_with_the_vp8_prefix_a_focus_reads() {
        let mut buf = Vec::new();
        encode_video(&video(0, true), 1100, &mut buf);
        assert_eq!(buf.len(), 1100);
        assert_eq!(buf[0], 0x10, "S=1 on the first packet");
        assert_eq!(buf[1] & 1, 0, "P=0 on a keyframe");
        assert_eq!(decode(&buf, true), Ok(video(0, true)));

        encode_video(&video(2, false), 900, &mut buf);
        assert_eq!(buf[0], 0x00, "continuation packet");
        assert_eq!(buf[1] & 1, 1, "P=1 on a delta frame");
        assert_eq!(decode(&buf, true), Ok(video(2, false)));
    }

    #[test]
    fn audio_round_trips_behind_an_opus_toc() {
        let h = MediaHeader {
            layer: None,
            packets: 1,
            packet: 0,
            ..video(0, false)
        };
        let mut buf = Vec::new();
        encode_audio(&h, 10, &mut buf);
        assert_eq!(
            buf.len(),
            MIN_AUDIO_PAYLOAD,
            "never shorter than the header"
        );
        assert_eq!(buf[0], OPUS_TOC);
        assert_eq!(decode(&buf, false), Ok(h));
        assert_eq!(decode(&buf, true), Err(IntegrityError::TooShort(buf.len())));
    }

    #[test]
    fn flipping_any_single_bit_is_detected() {
        let mut buf = Vec::new();
        encode_video(&video(0, true), 300, &mut buf);
        for i in 0..buf.len() {
            for bit in 0..8 {
                let mut m = buf.clone();
                m[i] ^= 1 << bit;
                assert!(decode(&m, true).is_err(), "byte {i} bit {bit} undetected");
            }
        }
    }

    #[test]
    fn truncation_and_extension_are_detected() {
        let mut buf = Vec::new();
        encode_video(&video(1, false), 500, &mut buf);
        let mut short = buf.clone();
        short.pop();
        assert!(matches!(
            decode(&short, true),
            Err(IntegrityError::LengthMismatch { .. })
        ));
        let mut long = buf.clone();
        long.push(0);
        assert!(decode(&long, true).is_err());
        assert!(matches!(
            decode(&buf[..10], true),
            Err(IntegrityError::TooShort(10))
        ));
    }

    #[test]
    fn the_checksum_ignores_only_its_own_field_and_is_split_invariant() {
        let data: Vec<u8> = (0..100u8).collect();
        let mut other = data.clone();
        other[40..48].fill(0xee);
        assert_eq!(checksum(&data, 40), checksum(&other, 40));
        other[48] ^= 1;
        assert_ne!(checksum(&data, 40), checksum(&other, 40));
        let mut h = Hasher::new(7);
        h.write(&data[..3]);
        h.write(&data[3..20]);
        let mut g = Hasher::new(7);
        g.write(&data[..20]);
        assert_eq!(h.finish(), g.finish());
    }

    #[test]
    fn filler_differs_between_packets() {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        encode_video(&video(0, true), 400, &mut a);
        let mut h = video(0, true);
        h.layer_seq += 1;
        encode_video(&h, 400, &mut b);
        assert_ne!(a[100..], b[100..]);
    }
}
