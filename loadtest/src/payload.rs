//! The synthetic media payload: opaque bytes standing in for encrypted frames, with just enough
//! codec framing for a focus to find keyframes, and a header of ours that lets a receiver measure
//! loss, latency and freezes and detect any modification. Pure: no I/O, no clock.
//!
//! Video payload (every RTP packet), as Chromium's VP8 packetiser writes it:
//! ```text
//! [0]     VP8 payload descriptor (RFC 7741): X=1, S=1 on a frame's first packet, PID 0
//! [1]     I=1 (picture id present), and L=1, T=1 when the stream has temporal layers
//! [2..4]  15-bit picture id (M=1)
//! [4]     TL0PICIDX                      } only with temporal layers
//! [5]     TID (2 bits), Y (1 bit), KEYIDX 0 }
//! [..]    VP8 frame-header byte: bit 0 (P) is 0 on keyframes, 1 on delta frames
//! [..]    our header (HEADER_LEN bytes), then filler up to the packet size
//! ```
//! Audio payload: `[0]` an Opus TOC byte, then our header and filler.
//!
//! Our header (big endian): magic u16, version u8, kind u8, layer u8, flags u8, temporal u8
//! (TID, and Y in bit 7; 0xff without temporal layers), publisher u32, frame u32, packet u16,
//! packets u16, layer_seq u32, sent_us u64, total_len u16, checksum u64.
//!
//! The checksum covers every byte of the payload except the checksum field itself and the
//! picture id and TL0PICIDX: a focus renumbers those into one sequence per subscriber (the one
//! part of a payload it may rewrite, docs/decisions.md), so the receiver checks them for
//! continuity instead ([`Vp8Desc`], `video_rx::VideoRx`). Every other descriptor byte must be
//! what our header says it is.

use crate::ids::{Layer, PublisherId};

/// Marks our payloads ("WL").
pub const MAGIC: u16 = 0x574c;
/// Header format version.
pub const VERSION: u8 = 2;
/// Length of our header, after the codec prefix.
pub const HEADER_LEN: usize = 2 + 1 + 1 + 1 + 1 + 1 + 4 + 4 + 2 + 2 + 4 + 8 + 2 + 8;
/// VP8 descriptor's first byte: X (extensions follow), partition 0; S marks a frame's start.
pub const VP8_DESC_X: u8 = 0x80;
pub const VP8_DESC_S: u8 = 0x10;
/// VP8 descriptor's extension byte: I (picture id), L (TL0PICIDX), T (TID).
pub const VP8_EXT_I: u8 = 0x80;
pub const VP8_EXT_LT: u8 = 0x40 | 0x20;
/// VP8 frame-header byte of a keyframe (P=0, show_frame=1).
pub const VP8_HDR_KEY: u8 = 0x10;
/// VP8 frame-header byte of a delta frame (P=1, show_frame=1).
pub const VP8_HDR_DELTA: u8 = 0x11;
/// Opus TOC byte: config 31 (CELT fullband 20 ms), mono, one frame.
pub const OPUS_TOC: u8 = 0xf8;
/// Length of the codec prefix before our header: the VP8 descriptor (with picture id, and
/// with TL0PICIDX and TID when temporal) and the frame-header byte.
pub const VIDEO_PREFIX_FLAT: usize = 5;
pub const VIDEO_PREFIX_TEMPORAL: usize = 7;
pub const AUDIO_PREFIX: usize = 1;
/// Smallest payloads we produce.
pub const MIN_VIDEO_PAYLOAD: usize = VIDEO_PREFIX_TEMPORAL + HEADER_LEN;
pub const MIN_AUDIO_PAYLOAD: usize = AUDIO_PREFIX + HEADER_LEN;

const KIND_AUDIO: u8 = 1;
const KIND_VIDEO: u8 = 2;
const FLAG_KEYFRAME: u8 = 0x01;
/// Our header's temporal byte without temporal layers.
const NO_TEMPORAL: u8 = 0xff;
/// Offset of the checksum inside our header.
const CHECKSUM_OFFSET: usize = HEADER_LEN - 8;
/// Where the bytes a focus may renumber start: the picture id, right after the two descriptor
/// bytes (then TL0PICIDX, when present).
const RENUMBERED_AT: usize = 2;

/// A frame's temporal layer (Chromium encodes simulcast VP8 as L1T3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Temporal {
    /// 0, 1 or 2.
    pub tid: u8,
    /// Y: the frame depends only on temporal layer 0 (a point to move up at).
    pub layer_sync: bool,
    /// TL0PICIDX: counts temporal layer 0 frames.
    pub tl0_pic_idx: u8,
}

/// The VP8 descriptor fields beyond the start bit: the picture id (15 bits) and, with
/// temporal layers, the frame's temporal layer. Picture id and TL0PICIDX as received are the
/// focus's numbering, not the publisher's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vp8Desc {
    pub picture_id: u16,
    pub temporal: Option<Temporal>,
}

impl Vp8Desc {
    fn prefix_len(&self) -> usize {
        if self.temporal.is_some() {
            VIDEO_PREFIX_TEMPORAL
        } else {
            VIDEO_PREFIX_FLAT
        }
    }

    /// Our header's temporal byte: what the descriptor's TID and Y must say.
    fn temporal_byte(&self) -> u8 {
        self.temporal
            .map_or(NO_TEMPORAL, |t| t.tid | (u8::from(t.layer_sync) << 7))
    }
}

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
    /// Video: the VP8 descriptor's picture id and temporal layer. `None` for audio.
    pub vp8: Option<Vp8Desc>,
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
    #[error("VP8 temporal layer does not match our header")]
    BadTemporal,
    #[error("VP8 keyframe bit does not match our header")]
    KeyframeBitMismatch,
    #[error("payload length {got} differs from the {sent} bytes sent")]
    LengthMismatch { got: usize, sent: usize },
    #[error("checksum mismatch")]
    Checksum,
    #[error("unknown media kind or layer")]
    BadKind,
}

/// Write one video packet's payload of `len` bytes into `buf` (cleared first). `h.vp8` must
/// be set.
pub fn encode_video(h: &MediaHeader, len: usize, buf: &mut Vec<u8>) {
    let len = len.max(MIN_VIDEO_PAYLOAD);
    let d = h.vp8.unwrap_or(Vp8Desc {
        picture_id: 0,
        temporal: None,
    });
    buf.clear();
    buf.push(VP8_DESC_X | if h.packet == 0 { VP8_DESC_S } else { 0 });
    let lt = if d.temporal.is_some() { VP8_EXT_LT } else { 0 };
    buf.push(VP8_EXT_I | lt);
    buf.extend_from_slice(&(0x8000 | (d.picture_id & 0x7fff)).to_be_bytes());
    if let Some(t) = d.temporal {
        buf.push(t.tl0_pic_idx);
        buf.push(tid_byte(t));
    }
    buf.push(if h.keyframe {
        VP8_HDR_KEY
    } else {
        VP8_HDR_DELTA
    });
    finish(h, KIND_VIDEO, d.temporal_byte(), len, buf);
}

/// The descriptor byte after TL0PICIDX: TID in the top two bits, then Y, KEYIDX 0.
fn tid_byte(t: Temporal) -> u8 {
    ((t.tid & 0x03) << 6) | (u8::from(t.layer_sync) << 5)
}

/// Write one audio packet's payload of `len` bytes into `buf` (cleared first).
pub fn encode_audio(h: &MediaHeader, len: usize, buf: &mut Vec<u8>) {
    let len = len.max(MIN_AUDIO_PAYLOAD);
    buf.clear();
    buf.push(OPUS_TOC);
    finish(h, KIND_AUDIO, NO_TEMPORAL, len, buf);
}

fn finish(h: &MediaHeader, kind: u8, temporal: u8, len: usize, buf: &mut Vec<u8>) {
    let start = buf.len();
    buf.extend_from_slice(&MAGIC.to_be_bytes());
    buf.push(VERSION);
    buf.push(kind);
    buf.push(h.layer.map_or(0xff, |l| l.index() as u8));
    buf.push(if h.keyframe { FLAG_KEYFRAME } else { 0 });
    buf.push(temporal);
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
    let sum = payload_checksum(buf, renumbered(kind == KIND_VIDEO, start), start);
    buf[start + CHECKSUM_OFFSET..start + CHECKSUM_OFFSET + 8].copy_from_slice(&sum.to_be_bytes());
}

/// The bytes of a payload whose header starts at `start` that a focus may renumber: the
/// picture id and TL0PICIDX of a video payload, nothing of an audio one.
fn renumbered(video: bool, start: usize) -> std::ops::Range<usize> {
    if video {
        // Two descriptor bytes before, TID byte (if any) and the frame-header byte after.
        let tail = if start == VIDEO_PREFIX_TEMPORAL { 2 } else { 1 };
        RENUMBERED_AT..start - tail
    } else {
        0..0
    }
}

/// [`checksum`] of a payload whose header starts at `start`, leaving out the `renumbered`
/// bytes and the checksum field.
fn payload_checksum(data: &[u8], renumbered: std::ops::Range<usize>, start: usize) -> u64 {
    checksum_except(data, renumbered, start + CHECKSUM_OFFSET)
}

/// 64-bit hash of `data` without the 8 bytes at `skip` (the checksum field itself). Word-at-a-time
/// multiply/xor: not cryptographic, but any change of any byte changes it with overwhelming
/// probability, and it is cheap enough to run on every packet even in a debug build.
pub fn checksum(data: &[u8], skip: usize) -> u64 {
    checksum_except(data, 0..0, skip)
}

/// [`checksum`], leaving out the `renumbered` bytes too (they come before `skip`).
fn checksum_except(data: &[u8], renumbered: std::ops::Range<usize>, skip: usize) -> u64 {
    let skip = skip.min(data.len());
    let renumbered = renumbered.start.min(skip)..renumbered.end.min(skip);
    let mut h = Hasher::new(data.len() as u64);
    h.write(&data[..renumbered.start]);
    h.write(&data[renumbered.end..skip]);
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
/// header; every byte must be as sent, except the picture id and TL0PICIDX (returned in
/// `vp8`, for the caller to check their continuity).
pub fn decode(payload: &[u8], video: bool) -> Result<MediaHeader, IntegrityError> {
    let vp8 = if video {
        Some(read_vp8(payload)?)
    } else {
        None
    };
    let prefix = vp8.map_or(AUDIO_PREFIX, |d| d.prefix_len());
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
    let temporal = b[6];
    let h = MediaHeader {
        publisher: PublisherId(u32_at(7)),
        layer,
        keyframe,
        frame: u32_at(11),
        packet: u16_at(15),
        packets: u16_at(17),
        layer_seq: u32_at(19),
        sent_us: u64_at(23),
        vp8,
    };
    let sent_len = usize::from(u16_at(31));
    if sent_len != payload.len() {
        return Err(IntegrityError::LengthMismatch {
            got: payload.len(),
            sent: sent_len,
        });
    }
    let want = u64_at(CHECKSUM_OFFSET);
    if payload_checksum(payload, renumbered(video, prefix), prefix) != want {
        return Err(IntegrityError::Checksum);
    }
    match vp8 {
        Some(d) => {
            if (payload[0] & VP8_DESC_S != 0) != (h.packet == 0) {
                return Err(IntegrityError::BadDescriptor);
            }
            if d.temporal_byte() != temporal {
                return Err(IntegrityError::BadTemporal);
            }
            if (payload[prefix - 1] & 0x01 == 0) != h.keyframe {
                return Err(IntegrityError::KeyframeBitMismatch);
            }
        }
        None if payload[0] != OPUS_TOC || temporal != NO_TEMPORAL => {
            return Err(IntegrityError::BadDescriptor);
        }
        None => {}
    }
    Ok(h)
}

/// The VP8 descriptor as we write it: X and I set, a 15-bit picture id, L and T together or
/// neither, no K, partition 0, and a TID byte with KEYIDX 0.
fn read_vp8(p: &[u8]) -> Result<Vp8Desc, IntegrityError> {
    if p.len() < VIDEO_PREFIX_TEMPORAL {
        return Err(IntegrityError::TooShort(p.len()));
    }
    let ext = p[1];
    if p[0] & !VP8_DESC_S != VP8_DESC_X
        || (ext != VP8_EXT_I && ext != VP8_EXT_I | VP8_EXT_LT)
        || p[2] & 0x80 == 0
    {
        return Err(IntegrityError::BadDescriptor);
    }
    let picture_id = u16::from_be_bytes([p[2], p[3]]) & 0x7fff;
    let temporal = (ext & VP8_EXT_LT != 0)
        .then(|| {
            let tid = p[5] >> 6;
            let t = Temporal {
                tid,
                layer_sync: p[5] & 0x20 != 0,
                tl0_pic_idx: p[4],
            };
            (tid < 3 && p[5] & 0x1f == 0 && tid_byte(t) == p[5]).then_some(t)
        })
        .map(|t| t.ok_or(IntegrityError::BadTemporal))
        .transpose()?;
    Ok(Vp8Desc {
        picture_id,
        temporal,
    })
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
            vp8: Some(Vp8Desc {
                picture_id: 0x1234,
                temporal: Some(Temporal {
                    tid: 2,
                    layer_sync: true,
                    tl0_pic_idx: 200,
                }),
            }),
        }
    }

    #[test]
    fn video_round_trips_with_the_vp8_prefix_a_focus_reads() {
        let mut buf = Vec::new();
        encode_video(&video(0, true), 1100, &mut buf);
        assert_eq!(buf.len(), 1100);
        assert_eq!(buf[0], 0x90, "X=1, S=1 on the first packet");
        assert_eq!(buf[1], 0xe0, "picture id, TL0PICIDX and TID present");
        assert_eq!(&buf[2..4], &[0x92, 0x34], "15-bit picture id");
        assert_eq!(buf[4], 200, "TL0PICIDX");
        assert_eq!(buf[5], 0xa0, "TID 2, Y=1");
        assert_eq!(buf[6] & 1, 0, "P=0 on a keyframe");
        assert_eq!(decode(&buf, true), Ok(video(0, true)));

        encode_video(&video(2, false), 900, &mut buf);
        assert_eq!(buf[0], 0x80, "continuation packet");
        assert_eq!(buf[6] & 1, 1, "P=1 on a delta frame");
        assert_eq!(decode(&buf, true), Ok(video(2, false)));

        // Without temporal layers: picture id only.
        let flat = MediaHeader {
            vp8: Some(Vp8Desc {
                picture_id: 5,
                temporal: None,
            }),
            ..video(0, false)
        };
        encode_video(&flat, 1100, &mut buf);
        assert_eq!(&buf[..5], &[0x90, 0x80, 0x80, 5, VP8_HDR_DELTA]);
        assert_eq!(decode(&buf, true), Ok(flat));
    }

    #[test]
    fn a_focus_may_renumber_the_picture_id_and_tl0picidx_and_nothing_else() {
        let mut buf = Vec::new();
        encode_video(&video(0, false), 300, &mut buf);
        buf[2] = 0x80 | 0x55;
        buf[3] = 0x66;
        buf[4] = 7;
        let d = decode(&buf, true).expect("renumbered ids are not an integrity error");
        let t = d.vp8.and_then(|v| v.temporal).expect("temporal");
        assert_eq!(d.vp8.map(|v| v.picture_id), Some(0x5566));
        assert_eq!((t.tl0_pic_idx, t.tid, t.layer_sync), (7, 2, true));
        // The temporal layer itself is the publisher's: a changed TID is an error.
        buf[5] = 0x40;
        assert!(decode(&buf, true).is_err());
    }

    #[test]
    fn audio_round_trips_behind_an_opus_toc() {
        let h = MediaHeader {
            layer: None,
            packets: 1,
            packet: 0,
            vp8: None,
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
        assert!(decode(&buf, true).is_err(), "audio is not video");
    }

    #[test]
    fn flipping_any_single_bit_is_detected() {
        let mut buf = Vec::new();
        encode_video(&video(0, true), 300, &mut buf);
        // The picture id's low 15 bits and TL0PICIDX are the focus's to renumber.
        let renumbered = |i: usize, bit: u32| (i == 2 && bit < 7) || i == 3 || i == 4;
        for i in 0..buf.len() {
            for bit in 0..8 {
                if renumbered(i, bit) {
                    continue;
                }
                let mut m = buf.clone();
                m[i] ^= 1 << bit;
                assert!(decode(&m, true).is_err(), "byte {i} bit {bit} undetected");
            }
        }
    }

    #[test]
    fn any_bytes_decode_to_an_error_or_a_header_never_a_panic() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut valid = Vec::new();
        encode_video(&video(0, true), 120, &mut valid);
        for n in 0..4000usize {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Random bytes, and a valid payload with a random byte changed and cut short.
            let mut b: Vec<u8> = (0..(x % 160) as usize)
                .map(|i| (x >> (i % 57)) as u8)
                .collect();
            if n % 2 == 0 {
                b = valid.clone();
                let i = (x as usize >> 8) % b.len();
                b[i] = (x >> 16) as u8;
                b.truncate((x as usize >> 24) % (b.len() + 1));
            }
            let _ = decode(&b, n % 3 != 0);
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
